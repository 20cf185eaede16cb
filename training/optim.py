"""AdamW with VideoMAE's parameter groups (no weight decay on biases, norms and embeddings; layer-wise lr decay), and
the whole optimization of a run sized by VideoMAE's lr rule (`build_optimization`).

Grouping follows the official code (MCG-NJU/VideoMAE `optim_factory.get_parameter_groups`): a parameter gets no
weight decay when it is 1-D (biases, LayerNorm weights), its name ends in ".bias", or the model lists it in
`no_weight_decay()` (positional embeddings, tokens). With layer decay d < 1, a parameter in layer i of L+2 layers
(0 = patch embedding and tokens, 1..L = blocks, L+1 = head and final norm) trains at lr x d ** (L + 1 - i), stored
as the group's `lr_scale` and applied by `training.schedule.CosineSchedule.apply`.

Not timm's `param_groups_layer_decay`: same groups for our ViTs, but it counts the layers it finds (max id + 1), not
get_num_layers() + 2 as the official assigner does (tests/test_training_optim.py::test_model_layer_id_for_is_preferred).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.runtime import autocast_dtype
from training.schedule import CosineSchedule

if TYPE_CHECKING:
    from training.config import Config

_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a ViT parameter in [0, num_layers + 1], as `get_num_layer_for_vit` in the official code.

    Used only when the model has no `layer_id_for` of its own.
    """
    if re.search(r"(^|\.)(cls_token|mask_token|pos_embed)$", name) or re.search(r"(^|\.)patch_embed\.", name):
        return 0
    match = _BLOCK_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Parameter groups for `torch.optim.AdamW`: one per (layer, decay/no-decay), each with `lr_scale` and the
    parameters' `names`.

    Names in `model.no_weight_decay()` match exactly or as a suffix after a dot (so that "pos_embed" also matches
    "encoder.pos_embed").
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()

    layer_of: Callable[[str], int] | None = None
    scales: list[float] | None = None
    if layer_decay is not None and layer_decay < 1.0:
        if not hasattr(model, "get_num_layers"):
            raise ValueError(
                f"layer_decay={layer_decay} needs a model with get_num_layers() ({type(model).__name__} has none)"
            )
        num_layers = int(model.get_num_layers())
        scales = [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
        if hasattr(model, "layer_id_for"):
            layer_of = model.layer_id_for
        else:
            layer_of = lambda n: vit_layer_id(n, num_layers)

    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or _matches(name, skip)
        key = "no_decay" if no_decay else "decay"
        scale = 1.0
        if layer_of is not None:
            layer = int(layer_of(name))
            scale = scales[layer]
            key = f"layer_{layer}_{key}"
        group = groups.setdefault(
            key, {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def _matches(name: str, skip: set[str]) -> bool:
    if name in skip:
        return True
    return any(name.endswith("." + s) for s in skip)


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    layer_decay: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, ...)`: the fused CUDA kernel when the parameters live on a GPU (one kernel
    launch for all parameters instead of a loop or foreach chunks), the default implementation on the CPU."""
    groups = param_groups(model, weight_decay, layer_decay)
    fused = any(p.is_cuda for g in groups for p in g["params"])
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)


@dataclass
class Optimization:
    """The optimization of one run: its size in optimizer steps, the lr schedule, AdamW, and a loss scaler (fp16)."""

    videos_per_step: int  # data.batch_size x optim.grad_accum x ranks
    steps_per_epoch: int
    total_steps: int
    lr_schedule: CosineSchedule
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler | None  # fp16 only


def build_optimization(
    cfg: Config, model: nn.Module, batches_per_epoch: int, world_size: int, device: torch.device
) -> Optimization:
    """VideoMAE's rule: lr = base lr x videos per optimizer step / optim.lr_batch_base (repeats are not counted),
    cosine per step over optim.max_steps or optim.epochs of `batches_per_epoch` (this rank's loader); AdamW over
    VideoMAE's parameter groups of `model`; a loss scaler for fp16."""
    o = cfg.optim
    videos_per_step = cfg.data.batch_size * o.grad_accum * world_size
    scale = videos_per_step / o.lr_batch_base if o.lr_batch_base else 1.0
    steps_per_epoch = max(1, batches_per_epoch // o.grad_accum)
    total_steps = o.max_steps or max(1, round(o.epochs * steps_per_epoch))
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    lr_schedule = CosineSchedule(
        o.lr * scale, o.min_lr * scale, total_steps, min(warmup, total_steps), o.warmup_lr * scale
    )
    optimizer = build_adamw(
        model,
        lr=lr_schedule.base,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        eps=o.eps,
        layer_decay=o.layer_decay if o.layer_decay < 1 else None,
    )
    fp16 = autocast_dtype(device, cfg.run.precision) == torch.float16
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    return Optimization(videos_per_step, steps_per_epoch, total_steps, lr_schedule, optimizer, scaler)
