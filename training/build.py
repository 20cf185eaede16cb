"""The parts a run is built from, shared by training and evaluation: this rank's loader, the model, its EMA, mixup."""

from __future__ import annotations

from torch import nn

from model.runtime import pipeline_device, resolve_device
from training.config import Config, ConfigError, model_kind_for, model_overrides
from training.distributed import Dist


def build_loader(cfg: Config, mode: str, dist: Dist, model_cfg, state: dict | None = None):
    """This rank's loader for `mode`: pipeline.build_loader over the shards, or the in-memory synthetic loader;
    `state` (a loader.state_dict()) resumes it where it stopped."""
    d = cfg.data
    evaluating = mode == "eval"
    batch_size = cfg.eval.batch_size if evaluating else d.batch_size
    device = pipeline_device(resolve_device(d.device))
    common = dict(
        num_frames=d.num_frames,
        input_size=d.input_size,
        num_repeats=1 if evaluating else d.num_repeats,
        **d.masking,
        patch_size=model_cfg.patch_size,
        tubelet_size=model_cfg.tubelet_size,
        seed=cfg.run.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        state=state,
    )
    if d.source == "synthetic":
        from pipeline.synthetic import SyntheticLoader

        return SyntheticLoader(
            mode,
            batch_size,
            num_samples=d.synthetic_samples,
            num_classes=d.synthetic_classes,
            num_clips=d.test_clips,
            num_crops=d.test_crops,
            in_memory=d.synthetic_in_memory,
            device=dist.device if device == "gpu" else "cpu",
            **common,
        )
    from pipeline import build_loader as build_pipeline_loader

    extra = dict(d.options)
    if evaluating:
        extra.update(eval_clips=d.test_clips, eval_crops=d.test_crops)
    try:
        return build_pipeline_loader(
            d.val if evaluating else d.train,
            mode,
            batch_size,
            device=device,
            stride=d.stride,
            flip=d.flip,
            num_threads=d.num_threads,
            **common,
            **extra,
        )
    except ValueError as e:  # shards that do not suit the settings (codec, stride phases, ranks): one line
        raise ConfigError(f"{'data.val' if evaluating else 'data.train'}: {str(e).splitlines()[0]}") from e


def make_model(cfg: Config, mode: str, num_classes: int | None, resume_config: dict | None = None):
    """(model on the CPU, its VideoMAEConfig).

    Resuming rebuilds the checkpoint's own architecture (speed switches from model.overrides may change); otherwise
    pretraining starts fresh and fine-tuning / eval start from `model.pretrained` (or fresh without it).
    """
    from model import CheckpointError, VideoMAEConfig, build_model, load_pretrained
    from model.checkpoint import load_checkpoint, resolve_checkpoint_path

    model_kind = model_kind_for(mode)
    overrides = model_overrides(cfg, None if mode == "pretrain" else num_classes)
    if resume_config is not None:
        model_cfg = VideoMAEConfig.from_dict(resume_config).replace(**cfg.model.overrides)
        return build_model(model_kind, model_cfg), model_cfg
    if mode == "pretrain" or not cfg.model.pretrained:
        model_cfg = VideoMAEConfig.from_name(cfg.model.name, **overrides)
        return build_model(model_kind, model_cfg), model_cfg
    path = resolve_checkpoint_path(cfg.model.pretrained)
    overrides.pop("num_classes", None)
    try:
        model: nn.Module = load_pretrained(
            path, kind=model_kind, num_classes=num_classes, trust_pickle=cfg.model.trust_pickle, **overrides
        )
        if mode == "eval" and cfg.eval.use_ema:
            model.load_state_dict(load_checkpoint(path, required=("model_ema",))["model_ema"])
    except (CheckpointError, ValueError) as e:  # CheckpointError is a ValueError; so are foreign model configs
        raise ConfigError(str(e).splitlines()[0]) from e
    return model, model.cfg


def build_ema(cfg: Config, model: nn.Module):
    """timm's ModelEmaV3 of `model` (decay run.ema_decay) when run.ema asks for one, else None."""
    if not cfg.run.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.run.ema_decay)


def build_mixup(cfg: Config, num_classes: int, rank: int):
    """Mixup / CutMix with label smoothing folded into soft targets (pipeline.mixup), when the recipe asks.

    It draws from its own numpy generator (seeded per rank), whose state the checkpoints carry. Not timm's `Mixup`
    on the flattened video: that draws from numpy's global generator, and timm 1.x cuts a box one pixel taller or
    wider for odd sizes than the timm 0.4.12 of the published recipe, which ours follows."""
    a = cfg.aug
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    from pipeline.mixup import VideoMixup

    return VideoMixup(
        num_classes,
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        prob=a.mixup_prob,
        switch_prob=a.switch_prob,
        label_smoothing=a.smoothing,
        seed=cfg.run.seed + rank,
    )
