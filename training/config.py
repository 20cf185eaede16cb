"""A run's configuration: the dataclass schema, loading (YAML file + `section.key=value` overrides) and every check
that needs no compute.

Unknown keys, wrong types, missing shards and class counts that disagree with a checkpoint fail at start with one
line (`ConfigError`), before anything is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from model.runtime import PRECISIONS
from pipeline.config import MASK_TYPES, MODES  # the one definition of the modes (pipeline.config loads no DALI)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    source: str = "shards"  # "shards": pipeline.build_loader | "synthetic": pipeline.synthetic (in memory)
    train: str | None = None  # shard directory (or pattern) for pretrain / finetune
    val: str | None = None  # shard directory (or pattern) for eval
    batch_size: int = 8  # videos per rank per micro-step; each becomes num_repeats clips
    device: str = "auto"  # where the pipeline decodes and augments: auto (gpu if CUDA) | gpu | cpu
    # CPU threads of all this rank's DALI pipelines together, split evenly between them (each gets num_threads //
    # pipelines); None: the cores this process may use / local ranks ($LOCAL_WORLD_SIZE). Above the cores can pay
    # on NVDEC (one video per thread). The loader logs the split at start.
    num_threads: int | None = None
    num_frames: int = 16
    stride: int = 4
    input_size: int = 224
    num_repeats: int = 1  # repeated augmentation: clips per decoded video
    mask_ratio: float = 0.9
    mask_type: str = "tube"  # "tube" (VideoMAE) or "random" (the paper's ablation: int(ratio * N) of all tokens)
    flip: bool | None = None  # None: the pipeline's default for the mode (VideoMAE pretraining does not flip)
    test_clips: int = 5
    test_crops: int = 3
    options: dict = field(default_factory=dict)  # more keyword arguments for pipeline.build_loader
    synthetic_samples: int = 256
    synthetic_classes: int = 4
    synthetic_in_memory: bool = False  # hand out one ready batch again and again (saturation benchmark)

    @property
    def masking(self) -> dict:
        """The pretraining masks' keyword arguments (loaders, FLOPs): mask_ratio and mask_type."""
        return {"mask_ratio": self.mask_ratio, "mask_type": self.mask_type}


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
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32 (model.runtime)
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


@dataclass(frozen=True)
class DataFacts:
    """What `check_config` learned about the run's data split (data.train, or data.val for eval), for the run to use.

    manifest     the shard directory's manifest.json (None: synthetic data, or shards given by pattern)
    class_names  the manifest's class list (synthetic: class0, class1, ...), or None
    num_classes  model.num_classes, else the number of class names; None when neither says (pretraining)
    num_samples  videos in the split as the manifest counts them, or None when unknown
    """

    manifest: dict | None
    class_names: list[str] | None
    num_classes: int | None
    num_samples: int | None


def model_kind_for(mode: str) -> str:
    """The kind of model (`model.build_model`) a mode (one of MODES) trains or evaluates: pretrain -> "pretrain"
    (VideoMAEPretrain), finetune and eval -> "classify" (VideoMAEClassifier)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    return "pretrain" if mode == "pretrain" else "classify"


# ------------------------------------------------------------------------------------------------------- loading
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
            raise ConfigError(
                f"{source}: unknown config key '{prefix}{key}' (known in "
                f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)})"
            )
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


def model_overrides(cfg: Config, num_classes: int | None) -> dict:
    """VideoMAEConfig fields implied by the data settings, then the explicit `model.overrides`."""
    out = dict(num_frames=cfg.data.num_frames, img_size=cfg.data.input_size, drop_path_rate=cfg.model.drop_path_rate)
    if num_classes:
        out["num_classes"] = num_classes
    return {**out, **cfg.model.overrides}


# -------------------------------------------------------------------------------------------------------- checks
def check_resume_arg(mode: str, resume: str | None) -> None:
    """--resume: auto or an existing file, and only for the training modes."""
    if resume and mode == "eval":
        raise ConfigError("--resume applies to pretrain and finetune, not eval")
    if resume and resume != "auto" and not os.path.isfile(resume):
        raise ConfigError(f"{resume}: checkpoint to resume from not found")


def check_config(cfg: Config, mode: str) -> DataFacts:
    """Every check that needs no compute. Returns what it learned about the data (manifest, class names and count,
    sample count)."""
    _check_values(cfg, mode)
    check_step_options(cfg)
    data_facts = _data_facts(cfg, mode)
    _check_model(cfg, mode)
    if mode == "eval" and not cfg.model.pretrained:
        raise ConfigError("eval needs model.pretrained (a checkpoint, run directory or Hugging Face directory)")
    if cfg.model.pretrained and mode != "pretrain":
        _check_pretrained(cfg, mode, data_facts.num_classes)
    check_out_dir(cfg.run.out_dir)
    return data_facts


def _check_values(cfg: Config, mode: str) -> None:
    """Choices, counts and finite numbers in range."""
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    if isinstance(r.seed, bool) or not isinstance(r.seed, int) or not 0 <= r.seed < 2**32:
        raise ConfigError(f"run.seed must be a whole number in [0, 2^32 - 1], got {r.seed!r}")
    if mode == "pretrain" and m.pretrained:  # pretraining starts from random weights: it would be ignored
        raise ConfigError(
            f"model.pretrained={m.pretrained}: pretraining does not read it (it starts from random weights; "
            "--resume continues a run); remove it"
        )
    choices = {
        "data.source": (d.source, ("shards", "synthetic")),
        "data.device": (d.device, ("auto", "gpu", "cpu")),
        "run.precision": (r.precision, PRECISIONS),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    for name, value in (
        ("data.batch_size", d.batch_size),
        ("eval.batch_size", cfg.eval.batch_size),
        ("optim.grad_accum", o.grad_accum),
        ("run.log_interval", r.log_interval),
        ("data.num_repeats", d.num_repeats),
        ("data.num_frames", d.num_frames),
        ("data.stride", d.stride),
        ("data.input_size", d.input_size),
        ("data.num_threads", d.num_threads),
        ("data.test_clips", d.test_clips),
        ("data.test_crops", d.test_crops),
        ("optim.max_steps", o.max_steps),
        ("run.stop_after_steps", r.stop_after_steps),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    for name, value in (
        ("optim.warmup_steps", o.warmup_steps),
        ("optim.lr_batch_base", o.lr_batch_base),
        ("run.ckpt_interval", r.ckpt_interval),
        ("run.ckpt_keep", r.ckpt_keep),
    ):
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be at least 0, got {value}")
    # NaN passes every comparison, so each number is also checked to be finite
    for name, value, low in (
        ("optim.lr", o.lr, "> 0"),
        ("optim.min_lr", o.min_lr, ">= 0"),
        ("optim.warmup_lr", o.warmup_lr, ">= 0"),
        ("optim.eps", o.eps, "> 0"),
        ("optim.weight_decay", o.weight_decay, ">= 0"),
        ("optim.epochs", o.epochs, "> 0"),
        ("optim.warmup_epochs", o.warmup_epochs, ">= 0"),
        ("optim.clip_grad", o.clip_grad, "> 0"),
        ("model.drop_path_rate", m.drop_path_rate, ">= 0"),
        ("aug.smoothing", cfg.aug.smoothing, ">= 0"),
    ):
        if value is not None and not (math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
            raise ConfigError(f"{name} must be a finite number {low}, got {value}")
    if mode == "finetune" and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and d.batch_size * d.num_repeats % 2:
        raise ConfigError(
            f"mixup/cutmix pair the rows of a batch: data.batch_size x data.num_repeats must be even, "
            f"got {d.batch_size} x {d.num_repeats}"
        )
    if (
        len(o.betas) != 2
        or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in o.betas)
        or not 0.0 < o.layer_decay <= 1.0
    ):
        raise ConfigError(
            f"optim.betas must be two numbers in [0, 1) and optim.layer_decay in (0, 1]; got {o.betas}, {o.layer_decay}"
        )


def check_step_options(cfg: Config) -> None:
    """run.compile_mode and run.cuda_graph_step: known values, and a graphed step only where one graph can hold the
    whole step (no per-step host decision, no collective, no loss scaler)."""
    r, o = cfg.run, cfg.optim
    if r.compile_mode is not None and r.compile_mode not in COMPILE_MODES:
        raise ConfigError(
            f"run.compile_mode must be one of {', '.join(COMPILE_MODES)} (or null); got {r.compile_mode!r}"
        )
    if not r.cuda_graph_step:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    conflicts = [
        (world > 1, f"{world} processes (DDP's gradient all-reduce is not captured)"),
        (o.grad_accum > 1, f"optim.grad_accum={o.grad_accum}"),
        (r.precision == "fp16", "run.precision=fp16 (the loss scaler decides on the host)"),
        (r.skip_nonfinite, "run.skip_nonfinite (a host decision per step)"),
        (
            r.compile_mode in ("reduce-overhead", "max-autotune"),
            f"run.compile_mode={r.compile_mode} (it captures CUDA graphs of its own; use default or "
            "max-autotune-no-cudagraphs)",
        ),
    ]
    found = [why for bad, why in conflicts if bad]
    if found:
        raise ConfigError(f"run.cuda_graph_step cannot capture a step with {'; '.join(found)}")


def _data_facts(cfg: Config, mode: str) -> DataFacts:
    """The split's shards (readable, suiting the stride) and pipeline options; its manifest, class names and count,
    sample count, checked against the model and one global batch."""
    d = cfg.data
    manifest: dict | None = None
    split_key = "data.val" if mode == "eval" else "data.train"
    split = d.val if mode == "eval" else d.train
    if d.source == "synthetic":
        class_names: list[str] | None = [f"class{i}" for i in range(d.synthetic_classes)]
        num_samples: int | None = d.synthetic_samples
    else:
        if not split:
            raise ConfigError(f"{mode} needs {split_key} (a shard directory)")
        from shards import format as shard_format
        from shards.remote import is_url, open_remote_set

        try:
            if is_url(split):  # s3://, gs://, https://: its manifest now; the loader reads it through its cache
                manifest = open_remote_set(split).manifest
            else:
                shard_format.resolve_shards(split)
                if os.path.isdir(split):
                    manifest = shard_format.read_manifest(split)
                from pipeline.shardset import ShardSet

                ShardSet(split).check_stride(d.stride)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{split_key}: {str(e).splitlines()[0]}") from e
        from pipeline import PipelineConfig

        known = {f.name for f in dataclasses.fields(PipelineConfig)}
        for key in d.options:
            if key not in known:
                raise ConfigError(
                    f"unknown pipeline option 'data.options.{key}' (PipelineConfig fields: {', '.join(sorted(known))})"
                )
        class_names = (manifest or {}).get("classes") or None
        num_samples = (manifest or {}).get("num_samples")
    num_classes = cfg.model.num_classes or (len(class_names) if class_names else None)
    if mode != "pretrain" and not num_classes:
        raise ConfigError(f"{split_key}: no class list in the manifest; set model.num_classes")
    if mode != "pretrain" and class_names and num_classes < len(class_names):
        raise ConfigError(f"model.num_classes={num_classes}, but {split_key} {split} has {len(class_names)} classes")
    if mode != "pretrain" and d.source != "synthetic" and not is_url(split):
        # a remote set's tars are fetched by the loader, in segments: its labels are checked against the manifest's
        # class list only (above)
        _check_labels(split_key, split, num_classes)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode != "eval" and num_samples is not None and num_samples < d.batch_size * world:
        raise ConfigError(
            f"{split}: {num_samples} samples, fewer than one global batch "
            f"(data.batch_size {d.batch_size} x {world} ranks)"
        )
    return DataFacts(manifest=manifest, class_names=class_names, num_classes=num_classes, num_samples=num_samples)


def _check_labels(split_key: str, split: str, num_classes: int) -> None:
    """Every sample's label fits the classifier (training.labels: one read of each 12-byte info member)."""
    from pipeline.shardset import ShardSet
    from training.labels import label_problem

    try:
        problem = label_problem(ShardSet(split), num_classes)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{split_key}: {str(e).splitlines()[0]}") from e
    if problem:
        raise ConfigError(f"{split_key}: {problem}")


def _check_model(cfg: Config, mode: str) -> None:
    """The model's config, the pretraining mask ratio, and what needs a CUDA device."""
    d, r = cfg.data, cfg.run
    try:
        from model import VideoMAEConfig

        model_cfg = VideoMAEConfig.from_name(cfg.model.name, **model_overrides(cfg, num_classes=None))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {str(e).splitlines()[0]}") from e
    if mode == "pretrain":
        # the pipeline's tube mask hides int(ratio x tokens per frame slot) tokens (a random mask int(ratio x all
        # tokens)): with none hidden the loss is 0/0, with none visible the encoder sees nothing
        if d.mask_type not in MASK_TYPES:
            raise ConfigError(f"data.mask_type must be 'tube' or 'random', got {d.mask_type!r}")
        spatial = (d.input_size // model_cfg.patch_size) ** 2
        if not 0.0 < d.mask_ratio < 1.0:  # NaN included
            raise ConfigError(f"data.mask_ratio must be in (0, 1), got {d.mask_ratio}")
        tokens = spatial if d.mask_type == "tube" else spatial * (d.num_frames // model_cfg.tubelet_size)
        masked = int(d.mask_ratio * tokens)
        if not 0 < masked < tokens:
            where = "tokens per frame slot" if d.mask_type == "tube" else "tokens of a clip"
            raise ConfigError(
                f"data.mask_ratio {d.mask_ratio} masks {masked} of the {tokens} {where} "
                f"(data.input_size {d.input_size}, patch {model_cfg.patch_size}); pretraining needs "
                "at least one masked and one visible token"
            )
    import torch

    if d.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.device is gpu but torch sees no CUDA device (use auto or cpu)")
    if model_cfg.attn_backend in ("cudnn", "efficient") and not torch.cuda.is_available():
        raise ConfigError(
            f"model.overrides.attn_backend {model_cfg.attn_backend} needs a CUDA device (on the CPU: "
            "auto, flash or math)"
        )
    if r.cuda_graph_step and mode != "eval" and not torch.cuda.is_available():
        raise ConfigError("run.cuda_graph_step needs a CUDA device; torch sees none (leave it off on the CPU)")


def _check_pretrained(cfg: Config, mode: str, num_classes: int | None) -> None:
    """model.pretrained exists, is read weights-only (unless trusted), and has the data's class count."""
    from model.checkpoint import resolve_checkpoint_path, stored_num_classes

    path = resolve_checkpoint_path(cfg.model.pretrained)
    if not path.exists():
        raise ConfigError(f"model.pretrained: {path} not found")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"model.pretrained: {path} holds no checkpoint-*.pt and no Hugging Face config.json")
    try:
        stored = stored_num_classes(path, trust_pickle=cfg.model.trust_pickle)
    except ValueError as e:  # unreadable, or refused by the weights-only loader: say so before building anything
        raise ConfigError(f"model.pretrained: {e}") from e
    if stored is not None and stored != num_classes:
        data = "evaluation" if mode == "eval" else "training"
        raise ConfigError(f"{path}: checkpoint has {stored} classes but the {data} data has {num_classes}")


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
