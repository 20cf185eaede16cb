"""VideoMAE pretraining, fine-tuning and 5 clips x 3 crops evaluation, from one CPU to many GPU nodes.

    python train.py pretrain --config configs/pretrain_vitb_k400.yaml data.train=/data/k400/train
    torchrun --nnodes 8 --nproc-per-node 8 ... train.py finetune --config configs/finetune_vitb_k400.yaml
    python train.py eval --config configs/eval_vitb_k400.yaml model.pretrained=runs/finetune_vitb_k400

A run is configured by a YAML file checked against the dataclasses below plus `section.key=value` overrides.
Unknown keys, wrong types, missing shards and class counts that disagree with a checkpoint fail at start with one
line, before anything is built. Under torchrun each process reads its own part of the data (rank and world size
from env://), the model is wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPUs), and rank 0 writes
checkpoints, metrics (console, `metrics.jsonl`, TensorBoard) and evaluation results into `run.out_dir`.

The training step never waits for the GPU: loss sums, grad norms and the non-finite check stay on the device and
are read once every `run.log_interval` steps, which is also when the ranks agree to stop after a SIGTERM.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

MODES = ("pretrain", "finetune", "eval")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ------------------------------------------------------------------------------------------------- configuration
@dataclass
class DataConfig:
    source: str = "shards"  # "shards": pipeline.build_loader | "synthetic": pipeline.synthetic (in memory)
    train: str | None = None  # shard directory (or pattern) for pretrain / finetune
    val: str | None = None  # shard directory (or pattern) for eval
    batch_size: int = 8  # videos per rank per micro-step; each becomes num_repeats clips
    device: str = "auto"  # where the pipeline decodes and augments: auto (gpu if CUDA) | gpu | cpu
    num_threads: int = 4
    num_frames: int = 16
    stride: int = 4
    input_size: int = 224
    num_repeats: int = 1  # repeated augmentation: clips per decoded video
    mask_ratio: float = 0.9
    flip: bool | None = None  # None: the pipeline's default for the mode (VideoMAE pretraining does not flip)
    test_clips: int = 5
    test_crops: int = 3
    options: dict = field(default_factory=dict)  # more keyword arguments for pipeline.build_loader
    synthetic_samples: int = 256
    synthetic_classes: int = 4
    synthetic_in_memory: bool = False  # hand out one ready batch again and again (saturation benchmark)
    synthetic_nan_batches: list = field(default_factory=list)  # fault injection (tests): NaN videos in these batches


@dataclass
class ModelConfig:
    name: str = "base"  # small | base | large | huge
    pretrained: str | None = None  # our checkpoint or run dir, Hugging Face dir, official .pth
    trust_pickle: bool = False  # load `pretrained` with full unpickling (it can run code): only a file you trust
    num_classes: int | None = None  # None: the shard manifest's class count
    drop_path_rate: float = 0.0
    overrides: dict = field(default_factory=dict)  # any other VideoMAEConfig field (depth, fused_attn, ...)


@dataclass
class OptimConfig:
    lr: float = 1.5e-4  # base lr, times videos per optimizer step / lr_batch_base (VideoMAE: lr x batch / 256)
    min_lr: float = 1e-5  # scaled the same way
    warmup_lr: float = 0.0  # scaled the same way (the official scripts effectively start warmup at 0)
    lr_batch_base: int = 256  # 0: take lr, min_lr and warmup_lr as they are
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # < 1: layer-wise lr decay (fine-tuning)
    clip_grad: float | None = None
    epochs: float = 800
    warmup_epochs: float = 40
    max_steps: int | None = None  # schedule length in optimizer steps instead of epochs
    warmup_steps: int | None = None  # instead of warmup_epochs
    grad_accum: int = 1


@dataclass
class AugConfig:  # fine-tuning; RandAugment and random erasing are pipeline options (data.options)
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.0


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    log_interval: int = 10  # steps between host syncs (metrics, non-finite check, agreement to stop)
    ckpt_interval: int = 1000  # steps between checkpoints; 0: only the final one
    ckpt_keep: int = 3
    ckpt_final: bool = True
    skip_nonfinite: bool = False  # skip steps whose gradient is not finite (a host sync per step) instead of stopping
    stop_after_steps: int | None = None  # stop early, with a checkpoint, without changing the schedule
    ema: bool = False
    ema_decay: float = 0.9999
    peak_tflops: float | None = None  # per device, for MFU; None: the data-sheet figure of known GPUs
    tensorboard: bool = True
    record_sample_ids: bool = False  # each rank writes the sample ids it trained on and its final weights (tests)
    compile_mode: str | None = None  # torch.compile the whole model in this mode (COMPILE_MODES); None: eager
    cuda_graph_step: bool = False  # capture forward + backward + clipping + AdamW as one CUDA graph (GraphedStep)


@dataclass
class EvalConfig:
    batch_size: int = 2  # videos per rank per batch (x test_clips x test_crops views)
    predictions: str = "predictions.csv"  # in run.out_dir
    use_ema: bool = False
    save_view_scores: bool = False  # also write each rank's per-view logits (views-rank{r}.pt)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A configuration problem, reported as one line before any compute."""


def load_config(path: str | None, overrides: list[str]) -> Config:
    """The YAML file, then `section.key=value` overrides (values read as YAML), checked against `Config`."""
    raw: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        try:
            node[leaf] = yaml.safe_load(value) if value else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_problem(e)}") from e
    return _build(Config, raw, path or "overrides", "")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line (its message spans several, with a caret under the spot)."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return (getattr(e, "problem", None) or str(e).splitlines()[0]) + where


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(f"{source}: unknown config key '{prefix}{key}' (known in "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)})")
    values = {}
    for name, value in raw.items():
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], value or {}, source, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hints[name], f"{source}: {prefix}{name}")
    return cls(**values)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    kind = typing.get_origin(kind) or kind
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        with contextlib.suppress(ValueError):
            return float(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}")


def check_config(cfg: Config, mode: str) -> dict:
    """Every check that needs no compute. Returns what it learned: manifest, class count and names, sample count."""
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    choices = {"data.source": (d.source, ("shards", "synthetic")), "data.device": (d.device, ("auto", "gpu", "cpu")),
               "run.precision": (r.precision, ("auto", "bf16", "fp16", "fp32"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    for name, value in (("data.batch_size", d.batch_size), ("eval.batch_size", cfg.eval.batch_size),
                        ("optim.grad_accum", o.grad_accum), ("run.log_interval", r.log_interval),
                        ("data.num_repeats", d.num_repeats), ("data.num_frames", d.num_frames),
                        ("data.stride", d.stride), ("data.input_size", d.input_size),
                        ("data.num_threads", d.num_threads), ("data.test_clips", d.test_clips),
                        ("data.test_crops", d.test_crops), ("optim.max_steps", o.max_steps),
                        ("run.stop_after_steps", r.stop_after_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    for name, value in (("optim.warmup_steps", o.warmup_steps), ("optim.lr_batch_base", o.lr_batch_base),
                        ("run.ckpt_interval", r.ckpt_interval), ("run.ckpt_keep", r.ckpt_keep)):
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be at least 0, got {value}")
    # NaN passes every comparison, so each number is also checked to be finite
    for name, value, low in (("optim.lr", o.lr, "> 0"), ("optim.min_lr", o.min_lr, ">= 0"),
                             ("optim.warmup_lr", o.warmup_lr, ">= 0"), ("optim.eps", o.eps, "> 0"),
                             ("optim.weight_decay", o.weight_decay, ">= 0"), ("optim.epochs", o.epochs, "> 0"),
                             ("optim.warmup_epochs", o.warmup_epochs, ">= 0"),
                             ("optim.clip_grad", o.clip_grad, "> 0"),
                             ("model.drop_path_rate", m.drop_path_rate, ">= 0"),
                             ("aug.smoothing", cfg.aug.smoothing, ">= 0")):
        if value is not None and not (math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
            raise ConfigError(f"{name} must be a finite number {low}, got {value}")
    if mode == "finetune" and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and d.batch_size * d.num_repeats % 2:
        raise ConfigError(f"mixup/cutmix pair the rows of a batch: data.batch_size x data.num_repeats must be even, "
                          f"got {d.batch_size} x {d.num_repeats}")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in o.betas) or \
            not 0.0 < o.layer_decay <= 1.0:
        raise ConfigError(f"optim.betas must be two numbers in [0, 1) and optim.layer_decay in (0, 1]; got "
                          f"{o.betas}, {o.layer_decay}")
    check_step_options(cfg)
    facts: dict = {"manifest": None, "class_names": None, "num_samples": None}
    split_key = "data.val" if mode == "eval" else "data.train"
    split = d.val if mode == "eval" else d.train
    if d.source == "synthetic":
        facts["class_names"] = [f"class{i}" for i in range(d.synthetic_classes)]
        facts["num_samples"] = d.synthetic_samples
    else:
        if not split:
            raise ConfigError(f"{mode} needs {split_key} (a shard directory)")
        from shards import format as shard_format

        try:
            shard_format.resolve_shards(split)
            if os.path.isdir(split):
                facts["manifest"] = shard_format.read_manifest(split)
            from pipeline.shardset import ShardSet

            ShardSet(split).check_stride(d.stride)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{split_key}: {str(e).splitlines()[0]}") from e
        from pipeline import PipelineConfig

        known = {f.name for f in dataclasses.fields(PipelineConfig)}
        for key in d.options:
            if key not in known:
                raise ConfigError(f"unknown pipeline option 'data.options.{key}' (PipelineConfig fields: "
                                  f"{', '.join(sorted(known))})")
        manifest = facts["manifest"] or {}
        facts["class_names"] = manifest.get("classes") or None
        facts["num_samples"] = manifest.get("num_samples")
    facts["num_classes"] = m.num_classes or (len(facts["class_names"]) if facts["class_names"] else None)
    if mode != "pretrain" and not facts["num_classes"]:
        raise ConfigError(f"{split_key}: no class list in the manifest; set model.num_classes")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode != "eval" and facts["num_samples"] is not None and facts["num_samples"] < d.batch_size * world:
        raise ConfigError(f"{split}: {facts['num_samples']} samples, fewer than one global batch "
                          f"(data.batch_size {d.batch_size} x {world} ranks)")

    try:
        from model import VideoMAEConfig

        model_cfg = VideoMAEConfig.from_name(m.name, **model_overrides(cfg, num_classes=None))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {str(e).splitlines()[0]}") from e
    if mode == "pretrain":
        # the pipeline's tube mask hides int(ratio x tokens per frame slot) tokens: with none hidden the loss is 0/0,
        # with none visible the encoder sees nothing
        spatial = (d.input_size // model_cfg.patch_size) ** 2
        if not 0.0 < d.mask_ratio < 1.0:  # NaN included
            raise ConfigError(f"data.mask_ratio must be in (0, 1), got {d.mask_ratio}")
        masked = int(d.mask_ratio * spatial)
        if not 0 < masked < spatial:
            raise ConfigError(f"data.mask_ratio {d.mask_ratio} masks {masked} of the {spatial} tokens per frame slot "
                              f"(data.input_size {d.input_size}, patch {model_cfg.patch_size}); pretraining needs "
                              "at least one masked and one visible token")
    import torch

    if d.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.device is gpu but torch sees no CUDA device (use auto or cpu)")
    if model_cfg.attn_backend in ("cudnn", "efficient") and not torch.cuda.is_available():
        raise ConfigError(f"model.overrides.attn_backend {model_cfg.attn_backend} needs a CUDA device (on the CPU: "
                          "auto, flash or math)")
    if r.cuda_graph_step and mode != "eval" and not torch.cuda.is_available():
        raise ConfigError("run.cuda_graph_step needs a CUDA device; torch sees none (leave it off on the CPU)")
    if mode == "eval" and not m.pretrained:
        raise ConfigError("eval needs model.pretrained (a checkpoint, run directory or Hugging Face directory)")
    if m.pretrained and mode != "pretrain":
        from model.checkpoint import resolve_checkpoint_path, stored_num_classes

        path = resolve_checkpoint_path(m.pretrained)
        if not path.exists():
            raise ConfigError(f"model.pretrained: {path} not found")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(f"model.pretrained: {path} holds no checkpoint-*.pt and no Hugging Face config.json")
        try:
            stored = stored_num_classes(path, trust_pickle=m.trust_pickle)
        except ValueError as e:  # unreadable, or refused by the weights-only loader: say so before building anything
            raise ConfigError(f"model.pretrained: {e}") from e
        if stored is not None and stored != facts["num_classes"]:
            data = "evaluation" if mode == "eval" else "training"
            raise ConfigError(f"{path}: checkpoint has {stored} classes but the {data} data has "
                              f"{facts['num_classes']}")
    check_out_dir(r.out_dir)
    return facts


def check_step_options(cfg: Config) -> None:
    """run.compile_mode and run.cuda_graph_step: known values, and a graphed step only where one graph can hold the
    whole step (no per-step host decision, no collective, no loss scaler)."""
    r, o = cfg.run, cfg.optim
    if r.compile_mode is not None and r.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"run.compile_mode must be one of {', '.join(COMPILE_MODES)} (or null); got "
                          f"{r.compile_mode!r}")
    if not r.cuda_graph_step:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    conflicts = [(world > 1, f"{world} processes (DDP's gradient all-reduce is not captured)"),
                 (o.grad_accum > 1, f"optim.grad_accum={o.grad_accum}"),
                 (r.precision == "fp16", "run.precision=fp16 (the loss scaler decides on the host)"),
                 (r.skip_nonfinite, "run.skip_nonfinite (a host decision per step)"),
                 (r.compile_mode in ("reduce-overhead", "max-autotune"),
                  f"run.compile_mode={r.compile_mode} (it captures CUDA graphs of its own; use default or "
                  "max-autotune-no-cudagraphs)")]
    found = [why for bad, why in conflicts if bad]
    if found:
        raise ConfigError(f"run.cuda_graph_step cannot capture a step with {'; '.join(found)}")


def check_out_dir(out_dir: str) -> None:
    """run.out_dir is a directory this process may write into, or one it may create: its nearest existing
    ancestor must be a writable directory (os.access: permissions and read-only mounts; root passes mode bits)."""
    path = os.path.abspath(out_dir)
    existing = path
    while not os.path.exists(existing):  # "/" exists: the loop ends
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"run.out_dir {out_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.out_dir {out_dir}: {existing} is not writable")


def model_overrides(cfg: Config, num_classes: int | None) -> dict:
    """VideoMAEConfig fields implied by the data settings, then the explicit `model.overrides`."""
    out = dict(num_frames=cfg.data.num_frames, img_size=cfg.data.input_size, drop_path_rate=cfg.model.drop_path_rate)
    if num_classes:
        out["num_classes"] = num_classes
    return {**out, **cfg.model.overrides}


# -------------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int
    world_size: int
    device: Any  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """env:// rendezvous from torchrun's variables; one process per GPU (LOCAL_RANK) or per CPU worker."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left outside bf16 autocast
        torch.backends.cudnn.benchmark = True  # fixed clip shapes: pick the fastest Conv3d (tubelet embedding)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=rank,
                                world_size=world, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, device)


def all_reduce(tensor, op: str = "sum"):
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                    "min": dist.ReduceOp.MIN}[op])
    return tensor


def all_gather_objects(obj: Any) -> list:
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def say(message: str, dist: Dist | None = None) -> None:
    if dist is None or dist.is_main:
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------------- builders
def build_data(cfg: Config, mode: str, dist: Dist, model_cfg, state: dict | None = None):
    """This rank's loader for `mode`: pipeline.build_loader over the shards, or the in-memory synthetic loader."""
    import torch

    d = cfg.data
    evaluating = mode == "eval"
    batch_size = cfg.eval.batch_size if evaluating else d.batch_size
    device = d.device if d.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    common = dict(num_frames=d.num_frames, input_size=d.input_size, num_repeats=1 if evaluating else d.num_repeats,
                  mask_ratio=d.mask_ratio, patch_size=model_cfg.patch_size, tubelet_size=model_cfg.tubelet_size,
                  seed=cfg.run.seed, rank=dist.rank, world_size=dist.world_size, state=state)
    if d.source == "synthetic":
        from pipeline.synthetic import SyntheticLoader

        return SyntheticLoader(mode, batch_size, num_samples=d.synthetic_samples, num_classes=d.synthetic_classes,
                               num_clips=d.test_clips, num_crops=d.test_crops, in_memory=d.synthetic_in_memory,
                               nan_batches=tuple(d.synthetic_nan_batches),
                               device=dist.device if device == "gpu" else "cpu", **common)
    from pipeline import build_loader

    extra = dict(d.options)
    if evaluating:
        extra.update(eval_clips=d.test_clips, eval_crops=d.test_crops)
    try:
        return build_loader(d.val if evaluating else d.train, mode, batch_size, device=device, stride=d.stride,
                            flip=d.flip, num_threads=d.num_threads, **common, **extra)
    except ValueError as e:  # shards that do not suit the settings (codec, stride phases, ranks): one line
        raise ConfigError(f"{'data.val' if evaluating else 'data.train'}: {str(e).splitlines()[0]}") from e


def make_model(cfg: Config, mode: str, num_classes: int | None, resume_config: dict | None = None):
    """(model on the CPU, its VideoMAEConfig, checkpoint kind).

    Resuming rebuilds the checkpoint's own architecture (speed switches from model.overrides may change); otherwise
    pretraining starts fresh and fine-tuning / eval start from `model.pretrained` (or fresh without it).
    """
    from model import CheckpointError, VideoMAEConfig, build_model, load_pretrained
    from model.checkpoint import load_checkpoint, resolve_checkpoint_path

    kind = "pretrain" if mode == "pretrain" else "classify"
    overrides = model_overrides(cfg, None if mode == "pretrain" else num_classes)
    if resume_config is not None:
        model_cfg = VideoMAEConfig.from_dict(resume_config).replace(**cfg.model.overrides)
        return build_model(kind, model_cfg), model_cfg, kind
    if mode == "pretrain" or not cfg.model.pretrained:
        model_cfg = VideoMAEConfig.from_name(cfg.model.name, **overrides)
        return build_model(kind, model_cfg), model_cfg, kind
    path = resolve_checkpoint_path(cfg.model.pretrained)
    overrides.pop("num_classes", None)
    try:
        model = load_pretrained(path, kind="classify", num_classes=num_classes, trust_pickle=cfg.model.trust_pickle,
                                **overrides)
        if mode == "eval" and cfg.eval.use_ema:
            model.load_state_dict(load_checkpoint(path, required=("model_ema",))["model_ema"])
    except (CheckpointError, ValueError) as e:  # CheckpointError is a ValueError; so are foreign model configs
        raise ConfigError(str(e).splitlines()[0]) from e
    return model, model.cfg, kind


def build_mixup(cfg: Config, num_classes: int, rank: int):
    """Mixup / CutMix with label smoothing folded into soft targets (pipeline.mixup), when the recipe asks.

    It draws from its own numpy generator (seeded per rank), whose state the checkpoints carry."""
    a = cfg.aug
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    from pipeline.mixup import VideoMixup

    return VideoMixup(num_classes, mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                      switch_prob=a.switch_prob, label_smoothing=a.smoothing, seed=cfg.run.seed + rank)


def skipped_samples(loader) -> int:
    """Corrupt samples the loader has skipped so far on this rank."""
    return int(getattr(getattr(loader, "stats", None), "corrupt_samples", 0) or 0)


# Dense bf16 tensor-core peaks from the vendors' data sheets, FLOP/s per device, for MFU (run.peak_tflops overrides).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
                   "A100": 312e12, "A800": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(cfg: Config, device) -> float | None:
    import torch

    if cfg.run.peak_tflops:
        return cfg.run.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsLog:
    """Rank 0's metrics: a console line, a JSON line in `metrics.jsonl` and TensorBoard scalars per record."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.file = open(out_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))

    def log(self, step: int, record: dict) -> None:
        if self.file is None:
            return
        record = {"step": step, **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if self.tb is not None and k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, step)
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)

    def close(self) -> None:
        for handle in (self.file, self.tb):
            if handle is not None:
                handle.close()


class StopRequest:
    """Set by SIGTERM (preemption; torchrun forwards it to every worker) or SIGUSR1 (Slurm's --signal warning)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


class GraphedStep:
    """One optimizer step (forward, backward, gradient clipping or norm, AdamW) as one CUDA graph, replayed every
    step (run.cuda_graph_step): one launch instead of thousands of kernels, no host work between them.

    `loss_fn(inputs) -> float32[]` maps a dict of device tensors (the same shapes and dtypes every step) to the loss.
    The first `warmup` calls are real steps run eagerly on a side stream (cuDNN, autotuning and torch.compile settle
    there and AdamW creates its state); the next one captures the graph (capture runs nothing), and every call from
    then on copies its inputs into the graph's static ones and replays. Each param group's lr becomes a device
    tensor (`set_lr` refills it) and the optimizer is made capturable; the gradients live in the graph's memory and
    are overwritten, not accumulated, by every replay (so no zero_grad between steps). Returns (loss, grad norm),
    tensors that the next call overwrites. check_step_options refuses what one graph cannot hold."""

    def __init__(self, loss_fn, optimizer, params: list, clip_grad: float | None, warmup: int = 3) -> None:
        import torch

        self.loss_fn, self.optimizer, self.params, self.clip_grad, self.warmup = (loss_fn, optimizer, params,
                                                                                  clip_grad, warmup)
        device = params[0].device
        self.stream, self.graph, self.calls = torch.cuda.Stream(device), None, 0
        self.static_inputs: dict = {}
        self.static_outputs: tuple = ()
        for group in optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)

    def set_lr(self, lr: float) -> None:
        """The schedule's lr for the next step, times each group's lr_scale, written into the lr tensors."""
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))

    def _step(self, inputs: dict) -> tuple:
        import torch

        loss = self.loss_fn(inputs)
        loss.backward()
        if self.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.optimizer.step()
        return loss.detach(), norm

    def __call__(self, inputs: dict) -> tuple:
        import torch

        self.calls += 1
        if self.graph is None:
            current = torch.cuda.current_stream(self.stream.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):  # warm-up and capture off the default stream (torch's recipe)
                self.optimizer.zero_grad(set_to_none=True)  # capture allocates the gradients in the graph's pool
                if self.calls <= self.warmup:
                    out = self._step(inputs)
                else:
                    self.static_inputs = {k: v.clone() for k, v in inputs.items()}
                    self.graph = torch.cuda.CUDAGraph()
                    # thread_local: DALI's threads keep decoding (allocating, synchronizing) during the capture,
                    # which the default "global" mode would turn into a capture error
                    with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                        self.static_outputs = self._step(self.static_inputs)
            current.wait_stream(self.stream)
            if self.graph is None:
                return out
        for key, value in inputs.items():
            self.static_inputs[key].copy_(value)
        self.graph.replay()
        return self.static_outputs


# -------------------------------------------------------------------------------------------------------- train
def train(cfg: Config, mode: str, resume: str | None, facts: dict) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from model.checkpoint import (RESUME_KEYS, capture_rng_state, load_checkpoint, model_payload,
                                  newest_intact_checkpoint, restore_rng_state, save_checkpoint, set_aside)
    from model import flops
    from training.optim import build_adamw
    from training.schedule import CosineSchedule

    stop = StopRequest()
    dist = setup_distributed()
    out_dir = Path(cfg.run.out_dir)
    torch.manual_seed(cfg.run.seed + dist.rank)
    kind = "pretrain" if mode == "pretrain" else "classify"

    # The checkpoint is read (fully: a damaged file fails here, not mid-run) before anything is written.
    ckpt = None
    if resume == "auto":
        path, ckpt, skipped = newest_intact_checkpoint(out_dir, RESUME_KEYS)
        if ckpt is None and skipped:  # a fresh start would overwrite the run's history: a person should look
            raise ConfigError(f"--resume auto: none of the {len(skipped)} checkpoints in {out_dir} loads (newest: "
                              f"{skipped[0][1]}); move them away to start afresh")
        for bad, why in skipped:
            if dist.is_main:  # set aside (renamed, kept): keep-last-N must not keep it in place of good ones to come
                say(f"--resume auto: skipped {why}; renamed to {set_aside(bad).name}", dist)
        if path is None:
            say(f"--resume auto: no checkpoint in {out_dir} yet, starting from scratch", dist)
    elif resume:
        path = Path(resume)
        try:
            ckpt = load_checkpoint(path, required=RESUME_KEYS)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e).splitlines()[0]) from e
    if ckpt is not None:
        if ckpt["kind"] != kind or len(ckpt["rng"]) != dist.world_size:
            raise ConfigError(f"{path}: a {ckpt['kind']} checkpoint of {len(ckpt['rng'])} ranks cannot resume "
                              f"{mode} on {dist.world_size}")
        say(f"resuming from {path} at step {ckpt['step']}", dist)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, model_cfg, _ = make_model(cfg, mode, facts["num_classes"], ckpt["model_config"] if ckpt else None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(dist.device).train()
    loader = build_data(cfg, mode, dist, model_cfg, state=ckpt["loader"][dist.rank] if ckpt else None)

    # VideoMAE's rule: lr = base lr x videos per optimizer step / 256 (repeats are not counted), cosine per step.
    o = cfg.optim
    videos_per_step = cfg.data.batch_size * o.grad_accum * dist.world_size
    scale = videos_per_step / o.lr_batch_base if o.lr_batch_base else 1.0
    steps_per_epoch = max(1, len(loader) // o.grad_accum)
    total_steps = o.max_steps or max(1, round(o.epochs * steps_per_epoch))
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    schedule = CosineSchedule(o.lr * scale, o.min_lr * scale, total_steps, min(warmup, total_steps),
                              o.warmup_lr * scale)
    optimizer = build_adamw(model, lr=schedule.base, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                            layer_decay=o.layer_decay if o.layer_decay < 1 else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None,
                 "auto": torch.bfloat16 if dist.device.type == "cuda" else None}[cfg.run.precision]
    scaler = torch.amp.GradScaler(dist.device.type) if amp_dtype == torch.float16 else None
    ema = None
    if cfg.run.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.run.ema_decay)
    mixup = build_mixup(cfg, facts["num_classes"], dist.rank) if mode == "finetune" else None

    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("model_ema"):
            ema.module.load_state_dict(ckpt["model_ema"])
        if ckpt["scheduler"] != schedule.state_dict():
            say(f"note: lr schedule {ckpt['scheduler']} in the checkpoint, now {schedule.state_dict()}", dist)
        step = int(ckpt["step"])
        restore_rng_state(ckpt["rng"][dist.rank])  # last: building the model and loader above drew random numbers
        if mixup is not None:
            mixup.rng.bit_generator.state = ckpt["rng"][dist.rank]["mixup"]
        ckpt = None

    ddp_model = model if dist.world_size == 1 else \
        DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.run.compile_mode:  # the whole model (DDP's buckets become graph breaks); checkpoints hold the bare one
        ddp_model = torch.compile(ddp_model, mode=None if cfg.run.compile_mode == "default" else cfg.run.compile_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    log = MetricsLog(out_dir, dist.is_main, cfg.run.tensorboard)
    flops_per_clip = flops.training_flops_per_clip(model_cfg, kind, mask_ratio=cfg.data.mask_ratio)
    peak = peak_flops(cfg, dist.device)
    stop_at = min(total_steps, cfg.run.stop_after_steps or total_steps)
    say(f"{mode}: {type(model).__name__} '{cfg.model.name}' {sum(p.numel() for p in params) / 1e6:.1f}M params on "
        f"{dist.world_size} x {dist.device.type}; {videos_per_step} videos x {cfg.data.num_repeats} clips per step, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps (from {step} to {stop_at}), peak lr {schedule.base:.3g}",
        dist)
    if dist.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    def save() -> Path | None:
        """Every rank contributes its RNG and loader state; rank 0 writes."""
        rng = capture_rng_state()
        if mixup is not None:
            rng["mixup"] = mixup.rng.bit_generator.state
        rngs, loaders = all_gather_objects(rng), all_gather_objects(loader.state_dict())
        if not dist.is_main:
            return None
        return save_checkpoint({
            **model_payload(kind, model_cfg, model, facts["class_names"] if kind == "classify" else None),
            "step": step,
            "epoch": getattr(loader, "epoch", None), "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "model_ema": ema.module.state_dict() if ema else None, "rng": rngs, "loader": loaders,
            "train_config": dataclasses.asdict(cfg)}, out_dir, step, keep_last=cfg.run.ckpt_keep)

    def batches() -> Iterator[dict]:
        """The loader's epochs back to back."""
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty and len(loader) == 0:
                raise RuntimeError("the data loader yields no batches")

    num_masked: list[int] = []  # masked tokens per clip, read once: passing it spares the model a host sync

    def forward_loss(batch: dict, mix: bool = True):
        # a captured step must not reuse autocast's weight casts across replays: no cache under a CUDA graph
        with torch.autocast(dist.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                            cache_enabled=not cfg.run.cuda_graph_step):
            if mode == "pretrain":
                if not num_masked:
                    num_masked.append(int(batch["mask"][0].sum()))
                return ddp_model(batch["video"], batch["mask"], num_masked[0])[0]
            video, target = batch["video"], batch["label"]
            if mix and mixup is not None:
                video, target = mixup(video, target)
            logits = ddp_model(video).float()
        if target.dtype.is_floating_point:  # soft targets from mixup / cutmix, label smoothing folded in
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=cfg.aug.smoothing)

    def graph_inputs(batch: dict) -> dict:
        """The step's inputs as the graph takes them: mixup/cutmix drawn on the host first (a graph would replay
        the first draw forever)."""
        if mode == "pretrain":
            return {"video": batch["video"], "mask": batch["mask"]}
        video, target = mixup(batch["video"], batch["label"]) if mixup is not None else (batch["video"],
                                                                                         batch["label"])
        return {"video": video, "label": target}

    graphed = None
    if cfg.run.cuda_graph_step:
        graphed = GraphedStep(lambda inputs: forward_loss(inputs, mix=False), optimizer, params, o.clip_grad)
        say("run.cuda_graph_step: the first 3 steps run eagerly, then each step replays one CUDA graph", dist)

    def next_batch() -> dict:
        """The next batch; the wait counts as data time, and its sample ids are recorded when asked."""
        epoch = loader.epoch  # the batch's epoch: the loader moves on as it hands out an epoch's last batch
        t_wait = time.perf_counter()
        batch = next(data)
        window["wait"] += time.perf_counter() - t_wait
        window["clips"] += batch["video"].shape[0]
        if cfg.run.record_sample_ids:  # rows (epoch, sample_id)
            ids = batch["sample_id"].cpu()
            records.append(torch.stack([torch.full_like(ids, epoch), ids], 1))
        return batch

    data = batches()
    records: list = []
    zero = lambda: torch.zeros((), device=dist.device)  # noqa: E731
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=dist.device)
    NO_BAD = torch.iinfo(torch.int64).min
    loss_sum, skipped_steps = zero(), 0
    window = dict(loss_steps=0, wait=0.0, clips=0, t0=time.perf_counter())
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    stopped_by = None
    while step < stop_at:
        if graphed is not None:  # forward, backward, clipping and AdamW in one replay (check_step_options)
            lr = schedule(step)
            graphed.set_lr(lr)
            step_loss, grad_norm = graphed(graph_inputs(next_batch()))
        else:
            lr = schedule.apply(optimizer, step)
            step_loss = zero()
            for micro in range(o.grad_accum):
                batch = next_batch()
                sync_grads = micro == o.grad_accum - 1 or dist.world_size == 1
                with contextlib.nullcontext() if sync_grads else ddp_model.no_sync():
                    loss = forward_loss(batch)
                    (scaler.scale(loss / o.grad_accum) if scaler else loss / o.grad_accum).backward()
                step_loss += loss.detach() / o.grad_accum
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = None
            if o.clip_grad:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
            elif cfg.run.skip_nonfinite or (step + 1) % cfg.run.log_interval == 0:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # Gradients are already all-reduced, so every rank sees the same norm and decides alike.
        if cfg.run.skip_nonfinite and not torch.isfinite(grad_norm).item():
            skipped_steps += 1
            say(f"step {step}: non-finite loss or gradient, step skipped ({skipped_steps} so far)", dist)
        else:
            if scaler is not None:
                scaler.step(optimizer)
            elif graphed is None:
                optimizer.step()
            if ema is not None:
                ema.update(model, step=step)
            first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(step_loss), step, first_bad_step)
            loss_sum += torch.nan_to_num(step_loss, nan=0.0, posinf=0.0, neginf=0.0)
            window["loss_steps"] += 1
        if scaler is not None:
            scaler.update()
        if graphed is None:  # a graphed step overwrites its gradients; dropping them would free the graph's memory
            optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % cfg.run.log_interval == 0 or step == stop_at or (dist.world_size == 1 and stop.signal):
            # The one host sync: the earliest non-finite step and any rank's stop request, then the metrics.
            flags = torch.stack([torch.where(first_bad_step >= 0, -first_bad_step, NO_BAD),
                                 torch.tensor(int(stop.signal is not None), device=dist.device)])
            all_reduce(flags, "max")
            if flags[0].item() != NO_BAD:
                say(f"error: the loss is not finite at step {-flags[0].item()}; stopped without saving (set "
                    f"run.skip_nonfinite=true to skip such steps instead)", dist)
                return 3
            sums = all_reduce(torch.stack([loss_sum, zero() + window["clips"], zero() + window["wait"],
                                           zero() + skipped_samples(loader)]))
            elapsed = time.perf_counter() - window["t0"]
            clips_per_s = sums[1].item() / elapsed
            record = {"epoch": getattr(loader, "epoch", None),
                      "loss": sums[0].item() / (dist.world_size * max(window["loss_steps"], 1)), "lr": lr,
                      "grad_norm": None if grad_norm is None else grad_norm.item(), "clips_per_s": clips_per_s,
                      "data_wait": sums[2].item() / (dist.world_size * elapsed),
                      "skipped_samples": int(sums[3].item())}
            if peak:
                record["mfu"] = flops_per_clip * clips_per_s / (dist.world_size * peak)
            if dist.device.type == "cuda":
                record["mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            if skipped_steps:
                record["skipped_steps"] = skipped_steps
            log.log(step, record)
            loss_sum = zero()
            window = dict(loss_steps=0, wait=0.0, clips=0, t0=time.perf_counter())
            if flags[1].item():
                stopped_by = stop.signal or "another rank's signal"
                break
        if cfg.run.ckpt_interval and step % cfg.run.ckpt_interval == 0 and step < stop_at:
            if all_reduce(first_bad_step.clone(), "max").item() >= 0:  # never save a model spoiled by NaNs
                say(f"error: the loss is not finite at step {first_bad_step.item()}; stopped", dist)
                return 3
            t_save = time.perf_counter()
            save()
            window["t0"] += time.perf_counter() - t_save  # checkpoint time is not training throughput

    path = save() if cfg.run.ckpt_final or stopped_by else None
    if cfg.run.record_sample_ids:
        torch.save({"sample_ids": torch.cat(records) if records else torch.empty((0, 2), dtype=torch.long),
                    "params": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
                   out_dir / f"rank{dist.rank}-record.pt")
    log.close()
    outcome = f"stopped by {stopped_by}" if stopped_by else "finished"
    say(f"{mode} {outcome} at step {step} of {total_steps}; checkpoint {path}"
        + (f"; resume with --resume auto" if step < total_steps else ""), dist)
    return 0


# --------------------------------------------------------------------------------------------------------- eval
def aggregate_views(probs, sample_id, view, num_samples: int, num_views: int, rank: int):
    """Average softmax scores per video over all views on all ranks, each (video, view) counted once.

    probs: float[R, C] this rank's view scores; sample_id, view: int64[R]. A view may come twice (a padded last
    batch, or a sample handed to two ranks); the lowest rank holding it owns it, and within a rank its first row.
    Returns (mean: float64[num_samples, C], views counted: int64[num_samples]), the same on every rank.
    """
    import torch

    device, rows = probs.device, torch.arange(len(sample_id), device=probs.device)
    slot = sample_id * num_views + view
    owner = torch.full((num_samples * num_views,), 2**30, dtype=torch.int64, device=device)
    owner.scatter_reduce_(0, slot, torch.full_like(slot, rank), reduce="amin")
    all_reduce(owner, "min")
    first_row = torch.full((num_samples * num_views,), len(slot), dtype=torch.int64, device=device)
    first_row.scatter_reduce_(0, slot, rows, reduce="amin")
    keep = (owner[slot] == rank) & (first_row[slot] == rows)
    sums = torch.zeros((num_samples, probs.shape[1]), dtype=torch.float64, device=device)
    sums.index_add_(0, sample_id[keep], probs[keep].double())
    counts = torch.zeros(num_samples, dtype=torch.int64, device=device)
    counts.index_add_(0, sample_id[keep], torch.ones_like(sample_id[keep]))
    all_reduce(sums)
    all_reduce(counts)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


def evaluate(cfg: Config, facts: dict) -> int:
    import torch
    from tqdm import tqdm

    dist = setup_distributed()
    out_dir = Path(cfg.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, model_cfg, _ = make_model(cfg, "eval", facts["num_classes"])
    model.to(dist.device).eval()
    loader = build_data(cfg, "eval", dist, model_cfg)
    amp_dtype = torch.bfloat16 if cfg.run.precision in ("bf16", "auto") and dist.device.type == "cuda" else \
        {"fp16": torch.float16}.get(cfg.run.precision)
    num_views = cfg.data.test_clips * cfg.data.test_crops
    parts: dict[str, list] = {"logits": [], "sample_id": [], "view": [], "label": []}
    t0 = time.perf_counter()
    start_epoch = loader.epoch
    with torch.no_grad():
        for batch in tqdm(loader, desc="eval", total=len(loader), disable=not (dist.is_main and sys.stderr.isatty())):
            with torch.autocast(dist.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                parts["logits"].append(model(batch["video"]).float())
            parts["sample_id"].append(batch["sample_id"].long())
            parts["view"].append(batch["clip"].long() * cfg.data.test_crops + batch["crop"].long())
            parts["label"].append(batch["label"].long())
            if loader.epoch != start_epoch:  # the loader moves to the next epoch as it hands out the last batch
                break
    cat = {k: torch.cat(v) if v else torch.empty(0, dtype=torch.int64, device=dist.device) for k, v in parts.items()}
    logits = cat["logits"].reshape(-1, facts["num_classes"]).float()
    num_samples = facts["num_samples"] or int(all_reduce(cat["sample_id"].max() + 1, "max").item())
    if cfg.eval.save_view_scores:
        torch.save({k: v.cpu() for k, v in cat.items()}, out_dir / f"views-rank{dist.rank}.pt")
    mean, counts = aggregate_views(logits.softmax(-1), cat["sample_id"], cat["view"], num_samples, num_views,
                                   dist.rank)
    labels = torch.full((num_samples,), -1, dtype=torch.int64, device=dist.device)
    labels.scatter_reduce_(0, cat["sample_id"], cat["label"], reduce="amax")
    all_reduce(labels, "max")
    skipped = int(all_reduce(torch.tensor(skipped_samples(loader), device=dist.device)).item())
    if not dist.is_main:
        return 0

    seen, top5 = counts > 0, mean.topk(min(5, mean.shape[1]), dim=1)
    scored = seen & (labels >= 0)
    n = int(scored.sum())
    result = {"top1": float(((top5.indices[:, 0] == labels) & scored).sum()) / max(n, 1),
              "top5": float(((top5.indices == labels[:, None]).any(1) & scored).sum()) / max(n, 1),
              "videos": n, "videos_missing": int((~seen).sum()),
              "videos_with_fewer_views": int((seen & (counts < num_views)).sum()), "skipped_samples": skipped,
              "seconds": time.perf_counter() - t0}
    keys = (facts["manifest"] or {}).get("keys") or [f"sample{i}" for i in range(num_samples)]
    names = facts["class_names"] or [str(i) for i in range(mean.shape[1])]
    pred_path = out_dir / cfg.eval.predictions
    tmp = pred_path.with_name(pred_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "sample_id", "label", "label_name", "views", "top5", "top5_names", "top5_scores"])
        for i in torch.nonzero(seen).flatten().tolist():
            idx, label = top5.indices[i].tolist(), int(labels[i])
            writer.writerow([keys[i], i, label, names[label] if 0 <= label < len(names) else "", int(counts[i]),
                             " ".join(map(str, idx)), "|".join(names[j] for j in idx),
                             " ".join(f"{v:.6f}" for v in top5.values[i].tolist())])
    os.replace(tmp, pred_path)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    say(f"eval: top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  over {n} videos x {num_views} "
        f"views ({result['videos_missing']} missing, {result['videos_with_fewer_views']} with fewer views, {skipped} "
        f"corrupt samples skipped); predictions: {pred_path}")
    return 0


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="VideoMAE pretraining, fine-tuning and evaluation.")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--config", help="YAML file (configs/*.yaml)")
    parser.add_argument("--resume", help="checkpoint file, or 'auto' for the latest one in run.out_dir")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-3")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume and args.mode == "eval":
            raise ConfigError("--resume applies to pretrain and finetune, not eval")
        if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
            raise ConfigError(f"{args.resume}: checkpoint to resume from not found")
        facts = check_config(cfg, args.mode)
        return evaluate(cfg, facts) if args.mode == "eval" else train(cfg, args.mode, args.resume, facts)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if "torch" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
