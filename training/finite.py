"""No checkpoint of non-finite weights: the check `Trainer.save` makes before every save.

A finite loss does not mean finite weights: with an absurd learning rate (optim.lr=1e308) the update of a step whose
loss was finite overflows, and the next save would write NaN everywhere and end "finished". Every floating parameter
and buffer of the model (and of its EMA) is checked on its device, with one host sync per save.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("training")


class NonFiniteLoss(RuntimeError):
    """A non-finite loss (or weights, or update) ends the run (exit status 3) without saving the spoiled weights."""


def first_nonfinite(modules: dict[str, nn.Module | None]) -> str | None:
    """The name ("model.blocks.0.attn.qkv.weight", "model_ema....") of the first floating parameter or buffer of
    `modules` (name -> module, None ones skipped) holding a NaN or an infinity; None when all are finite."""
    names, flags = [], []
    for prefix, module in modules.items():
        if module is None:
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point():
                names.append(f"{prefix}.{name}")
                flags.append(torch.isfinite(tensor).all())
    if not flags:
        return None
    finite = torch.stack(flags).cpu()  # the one host sync
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None


def weights_may_be_saved(model: nn.Module, ema, step: int, skip_nonfinite: bool, is_main: bool) -> bool:
    """Whether the weights of `model` (and of the timm EMA `ema`, or None) are all finite. If not: NonFiniteLoss
    naming the step, or with `skip_nonfinite` False after one warning (rank 0) that the checkpoint is not saved.
    DDP keeps the ranks' weights equal, so every rank decides alike."""
    bad = first_nonfinite({"model": model, "model_ema": ema.module if ema is not None else None})
    if bad is None:
        return True
    if not skip_nonfinite:
        raise NonFiniteLoss(f"the weights are not finite at step {step} ({bad}); stopped without saving")
    if is_main:
        log.warning("step %d: the weights are not finite (%s); checkpoint not saved", step, bad)
    return False


def optimizer_step(optimizer: torch.optim.Optimizer, scaler, step: int, lr: float) -> None:
    """`optimizer.step()` (through the fp16 GradScaler `scaler` when there is one); NonFiniteLoss naming the step
    when the update overflows: AdamW's step size (lr / bias correction) beyond the weights' dtype (optim.lr=1e308)
    is a RuntimeError deep inside torch, not a NaN."""
    try:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise NonFiniteLoss(f"the update of step {step} overflows (lr {lr:g}); stopped") from None
