"""The training objective of a mode, as the Trainer's eager step and the CUDA-graph step (`training.step`) call it.

pretrain   the model's own loss on the masked tubelets: model(video, mask, num_masked) -> (loss, pred)
finetune   cross-entropy against the labels, or against mixup / cutmix soft targets (label smoothing folded in)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model.runtime import autocast

if TYPE_CHECKING:
    from pipeline.mixup import VideoMixup
    from training.config import Config


class StepLoss:
    """`loss(batch) -> float32[]`, the mean loss of one batch (video float[B, C, T, H, W]; mask bool[B, N] when
    pretraining, label int64[B] when fine-tuning), under the run's autocast (run.precision; no weight-cast cache with
    run.cuda_graph_step); `model` is what the step calls (the bare model, or it in DDP and/or torch.compile)."""

    def __init__(
        self, mode: str, model: nn.Module, cfg: Config, device: torch.device, mixup: VideoMixup | None = None
    ) -> None:
        self.mode, self.model, self.device, self.mixup = mode, model, device, mixup
        self.precision, self.label_smoothing = cfg.run.precision, cfg.aug.smoothing
        self.graphed = cfg.run.cuda_graph_step
        self.num_masked: int | None = None  # masked tokens per clip, read once: passing it spares a host sync

    def __call__(self, batch: dict, mix: bool = True) -> torch.Tensor:
        """The batch's loss, mixup / cutmix drawn here unless `mix` is False (the graphed step gets mixed inputs:
        `graph_inputs`)."""
        # a captured step must not reuse autocast's weight casts across replays: no cache under a CUDA graph
        with autocast(self.device, self.precision, cache_enabled=not self.graphed):
            if self.mode == "pretrain":
                if self.num_masked is None:
                    self.num_masked = int(batch["mask"][0].sum())
                return self.model(batch["video"], batch["mask"], self.num_masked)[0]
            video, target = batch["video"], batch["label"]
            if mix and self.mixup is not None:
                video, target = self.mixup(video, target)
            logits = self.model(video).float()
        if target.dtype.is_floating_point:  # soft targets from mixup / cutmix, label smoothing folded in
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def graph_inputs(self, batch: dict) -> dict:
        """The step's inputs as the graph takes them: mixup / cutmix drawn on the host first (a graph would replay
        the first draw forever)."""
        if self.mode == "pretrain":
            return {"video": batch["video"], "mask": batch["mask"]}
        video, target = batch["video"], batch["label"]
        if self.mixup is not None:
            video, target = self.mixup(video, target)
        return {"video": video, "label": target}
