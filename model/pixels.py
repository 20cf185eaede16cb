"""The pretraining model's outputs as pixels: tubelets to and from video, ImageNet un-normalization, and the
reconstruction of masked tubelets (what `apps.reconstruct` draws).

Un-normalizing the predictions. With `norm_pix_loss` (the VideoMAE default) the decoder predicts each masked
tubelet's pixels normalized per channel by that tubelet's own mean and unbiased std (see `model.pixel_loss`), so the
absolute colour and contrast of a masked tubelet are not predicted at all. As the official VideoMAE visualization
(run_videomae_vis.py) does, the picture maps predictions back with the mean and std of the original tubelet:
`pixels = pred * (std + 1e-6) + mean`; the shapes and textures inside each tubelet are the model's, the tubelet's
average colour and contrast are borrowed from the original. Visible tubelets are shown from the original.
Without `norm_pix_loss` the predictions are pixels in [0, 1] already and are shown as they are.
"""

from __future__ import annotations

import torch

from model.layers import tubelet_view
from model.pixel_loss import TARGET_EPS, pixel_stats


def tubelet_pixels(pixels: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """pixels: float[B, C, T, H, W] -> float[B, N, tubelet*patch*patch, C]: per token (t, h, w order) its pixels in
    (dt, dh, dw) order, each with its channels: the layout of the pretraining target before flattening."""
    tv = tubelet_view(pixels, tubelet, patch)  # [B, T', H', W', C, t, p, p]
    return tv.flatten(1, 3).flatten(3).transpose(2, 3)


def untubelet(tokens: torch.Tensor, grid: tuple[int, int, int], tubelet: int, patch: int) -> torch.Tensor:
    """Inverse of `tubelet_pixels`: float[B, N, tubelet*patch*patch, C] -> float[B, C, T, H, W]."""
    b, _, _, c = tokens.shape
    tg, hg, wg = grid
    x = tokens.transpose(2, 3).reshape(b, tg, hg, wg, c, tubelet, patch, patch)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, tg * tubelet, hg * patch, wg * patch)


def unnormalize_video(video: torch.Tensor) -> torch.Tensor:
    """The pipeline's ImageNet-normalized `video: float[B, C, T, H, W]` back to pixels in [0, 1]."""
    mean, std = pixel_stats(video.shape[1])
    shape = (1, -1, 1, 1, 1)
    return video.float() * torch.tensor(std, device=video.device).view(shape) + torch.tensor(
        mean, device=video.device
    ).view(shape)


def reconstruct_pixels(
    video: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, tubelet: int, patch: int, norm_pix: bool = True
) -> torch.Tensor:
    """The reconstructed clip in pixels: float32[B, C, T, H, W] (about [0, 1]; not clamped).

    video: float[B, C, T, H, W] ImageNet-normalized (the model's input); mask: bool[B, N] (True = masked, M per
    row); pred: float[B, M, tubelet*patch*patch*C], masked tokens in increasing token order, pixel-major then
    channel (what `VideoMAEPretrain` returns). Visible tubelets are the original pixels; masked ones are `pred`,
    mapped back with the original tubelet's per-channel mean and unbiased std when `norm_pix` (see the module
    docstring). Feeding the exact training target as `pred` gives the original clip back.
    """
    b, c, t, h, w = video.shape
    grid = (t // tubelet, h // patch, w // patch)
    tokens = tubelet_pixels(unnormalize_video(video), tubelet, patch)  # [B, N, P, C]
    masked = tokens[mask]  # [B*M, P, C], batch then token order
    values = pred.float().reshape(masked.shape)
    if norm_pix:
        mean = masked.mean(dim=-2, keepdim=True)
        std = masked.var(dim=-2, unbiased=True, keepdim=True).sqrt()
        values = values * (std + TARGET_EPS) + mean
    out = tokens.clone()
    out[mask] = values
    return untubelet(out, grid, tubelet, patch)


def mask_video(mask: torch.Tensor, shape: tuple[int, ...], tubelet: int, patch: int) -> torch.Tensor:
    """mask: bool[B, N] -> bool[B, 1, T, H, W], True on every pixel of a masked tubelet."""
    b, _, t, h, w = shape
    tokens = mask[:, :, None, None].expand(b, mask.shape[1], tubelet * patch * patch, 1)
    return untubelet(tokens, (t // tubelet, h // patch, w // patch), tubelet, patch)
