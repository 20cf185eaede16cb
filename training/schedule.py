"""Per-step learning-rate schedule: linear warmup, then half-cosine decay to a floor.

This is the schedule of the official VideoMAE code (`utils.cosine_scheduler` in MCG-NJU/VideoMAE), written as a
closed form instead of a precomputed array so that it costs nothing to keep and has no fixed length:

    step <  W:  start + (base - start) * step / (W - 1)                  (numpy.linspace: reaches `base` at W - 1)
    step >= W:  final + (base - final) * (1 + cos(pi * (step - W) / (T - W))) / 2
    step >= T:  final                                                  (the official array would index past its end)

with W warmup steps and T total steps. The official scripts scale `min_lr` and `warmup_lr` by batch/256 like the
peak lr, but never pass `warmup_lr` on (`start_warmup_value` keeps its default of 0), so their warmup starts at 0;
our `start` defaults to 0 for the same behaviour.

Not timm's CosineLRScheduler: its warmup reaches `base` at step W, the official at W - 1 (test_matches_official_array).

Each optimizer param group may carry an `lr_scale` (layer-wise decay, see `training.optim`); the group's lr is the
scheduled lr times that scale. The schedule is a pure function of the step: a resumed run keeps its own (possibly
overridden) shape and says so when it differs from the checkpoint's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class CosineSchedule:
    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    start: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        w, t = self.warmup_steps, self.total_steps
        if step < w:
            # numpy.linspace(start, base, w): the last warmup step already reaches base.
            return self.start + (self.base - self.start) * (step / (w - 1) if w > 1 else 1.0)
        if step >= t:
            return self.final
        progress = (step - w) / (t - w)
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every param group's lr for `step` (times its `lr_scale`); returns the unscaled lr."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {
            "base": self.base,
            "final": self.final,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "start": self.start,
        }
