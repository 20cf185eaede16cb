"""Mixup / CutMix with label smoothing for video batches, on whatever device the batch is on.

Follows timm's `Mixup` in 'batch' mode (the mode VideoMAE fine-tuning uses: mixup 0.8, cutmix 1.0, switch prob 0.5,
label smoothing 0.1): one lambda per batch, each row mixed with the row at the mirrored position (`x.flip(0)`).
The difference is the CutMix box: timm cuts `x[:, :, y0:y1, x0:x1]`, which on a 5-D video tensor would cut the
time and height axes; here the box is cut on the last two axes (H, W) and is the same in every frame and channel.
"""

from __future__ import annotations

import numpy as np
import torch


def smooth_one_hot(target: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """float[B, num_classes]: 1 - smoothing + smoothing/num_classes on the target class, smoothing/num_classes
    elsewhere (timm's convention)."""
    off = smoothing / num_classes
    out = torch.full((target.shape[0], num_classes), off, device=target.device, dtype=torch.float32)
    return out.scatter_(1, target.long().view(-1, 1), 1.0 - smoothing + off)


class VideoMixup:
    """`mixed_video, soft_target = VideoMixup(num_classes=400)(video, label)`.

    video: float[B, C, T, H, W] (modified in place, as timm does), label: int64[B] -> soft_target: float[B, classes].
    B must be even. `seed` makes the draws (mode, lambda, box) reproducible.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        cutmix_minmax: tuple[float, float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        seed: int | None = None,
    ):
        if mixup_alpha <= 0 and cutmix_alpha <= 0 and cutmix_minmax is None:
            raise ValueError("mixup_alpha or cutmix_alpha must be positive")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.cutmix_minmax, self.prob, self.switch_prob = cutmix_minmax, prob, switch_prob
        self.label_smoothing = label_smoothing
        self.rng = np.random.default_rng(seed)

    def draw(self) -> tuple[float, bool]:
        """(lambda, use_cutmix) for one batch, as timm's `_params_per_batch`."""
        if self.rng.random() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix_alpha > 0 or self.cutmix_minmax is not None
        if self.mixup_alpha > 0 and use_cutmix:
            use_cutmix = bool(self.rng.random() < self.switch_prob)
        if use_cutmix:
            lam = 1.0 if self.cutmix_minmax is not None else float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        else:
            lam = float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))
        return lam, use_cutmix

    def cut_box(self, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of timm's `rand_bbox` / `rand_bbox_minmax` for an H x W frame."""
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            ch = int(self.rng.integers(int(height * lo), int(height * hi)))
            cw = int(self.rng.integers(int(width * lo), int(width * hi)))
            y0, x0 = int(self.rng.integers(0, height - ch)), int(self.rng.integers(0, width - cw))
            return y0, y0 + ch, x0, x0 + cw
        ratio = np.sqrt(1 - lam)
        ch, cw = int(height * ratio), int(width * ratio)
        cy, cx = int(self.rng.integers(0, height)), int(self.rng.integers(0, width))
        return (
            int(np.clip(cy - ch // 2, 0, height)),
            int(np.clip(cy + ch // 2, 0, height)),
            int(np.clip(cx - cw // 2, 0, width)),
            int(np.clip(cx + cw // 2, 0, width)),
        )

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if video.ndim != 5:
            raise ValueError(f"video of shape {tuple(video.shape)}: expected [B, C, T, H, W]")
        if video.shape[0] % 2:
            raise ValueError(f"batch of {video.shape[0]} rows: mixup needs an even batch size")
        lam, use_cutmix = self.draw()
        if lam != 1.0:
            if use_cutmix:
                y0, y1, x0, x1 = self.cut_box(video.shape[-2], video.shape[-1], lam)
                video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(video.shape[-2] * video.shape[-1])  # the box actually cut
            else:
                mirrored = video.flip(0).mul_(1.0 - lam)  # flip() copies, before `video` changes
                video.mul_(lam).add_(mirrored)
        target = smooth_one_hot(label, self.num_classes, self.label_smoothing)
        return video, target * lam + target.flip(0) * (1.0 - lam)
