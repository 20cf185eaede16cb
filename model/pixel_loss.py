"""The VideoMAE reconstruction loss: MSE on masked tubelets against the normalized-pixel target.

Target, exactly as the official engine_for_pretraining.py computes it:
  1. undo the ImageNet normalization of the input: x * std + mean (values back in [0, 1]);
  2. rearrange b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c: per token, pixels in (dt, dh, dw) order, each
     with its channels;
  3. per token and channel: (x - mean) / (unbiased std + 1e-6) over the tubelet's p0*p1*p2 pixels
     (skipped when norm_pix_loss is False);
  4. flatten (p c) -> tubelet*patch*patch*C values, pixel-major then channel;
  5. keep the masked tokens (in token order) and take the mean squared error against the predictions.

Three implementations, all computing this same function:
  `masked_pixel_mse_reference`  the formula above over the whole video (the official code path, for tests);
  `masked_pixel_mse_torch`      the same arithmetic on the masked tubelets only (gathered first), plain torch;
                                the fallback on CPU;
  `model.kernels.norm_pix_mse_triton`  one Triton kernel: reads each masked tubelet once, writes one partial sum
                                per token and (when training) the gradient w.r.t. the predictions; the normalized
                                video is never written to memory.
`masked_pixel_mse` picks one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import gather_tubelets, tubelet_view

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TARGET_EPS = 1e-6


def pixel_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that undo the input normalization: ImageNet for RGB, identity otherwise (as HF does)."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.0,) * in_chans, (1.0,) * in_chans


def _normalize_tokens(pixels: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """pixels: float[..., P, C] (P pixels of one tubelet per channel) -> float[..., P * C] target."""
    if norm_pix:
        mean = pixels.mean(dim=-2, keepdim=True)
        std = pixels.var(dim=-2, unbiased=True, keepdim=True).sqrt()
        pixels = (pixels - mean) / (std + TARGET_EPS)
    return pixels.flatten(-2)


def norm_pix_target_reference(video: torch.Tensor, tubelet: int, patch: int, norm_pix: bool = True) -> torch.Tensor:
    """The official target for every token: video float[B, C, T, H, W] (normalized) -> float[B, N, t*p*p*C]."""
    b, c = video.shape[:2]
    mean, std = pixel_stats(c)
    mean_t = torch.tensor(mean, dtype=video.dtype, device=video.device).view(1, c, 1, 1, 1)
    std_t = torch.tensor(std, dtype=video.dtype, device=video.device).view(1, c, 1, 1, 1)
    raw = video * std_t + mean_t
    tv = tubelet_view(raw, tubelet, patch)  # [B, T', H', W', C, t, p, p]
    tokens = tv.flatten(1, 3).flatten(3).transpose(2, 3)  # [B, N, t*p*p, C]
    return _normalize_tokens(tokens, norm_pix)


def masked_pixel_mse_reference(
    pred: torch.Tensor, video: torch.Tensor, mask: torch.Tensor, tubelet: int, patch: int, norm_pix: bool = True
) -> torch.Tensor:
    """Reference loss. pred: float[B, M, t*p*p*C] (masked tokens in token order), mask: bool[B, N] -> float[]."""
    with torch.no_grad():
        target = norm_pix_target_reference(video.float(), tubelet, patch, norm_pix)
        target = target[mask].reshape(pred.shape)
    return F.mse_loss(pred.float(), target)


def masked_target_torch(
    video: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    norm_pix: bool = True,
    pixel_mean: torch.Tensor | None = None,
    pixel_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Target of the masked tokens only.

    video: float[B, C, T, H, W], ids_masked: int64[B, M] -> float32[B, M, t*p*p*C]."""
    c = video.shape[1]
    if pixel_mean is None or pixel_std is None:
        mean, std = pixel_stats(c)
        pixel_mean = torch.tensor(mean, device=video.device)
        pixel_std = torch.tensor(std, device=video.device)
    tubelets = gather_tubelets(video, ids_masked, tubelet, patch).float()  # [B, M, C, t, p, p]
    tubelets = tubelets.flatten(3).transpose(2, 3)  # [B, M, t*p*p, C]
    raw = tubelets * pixel_std.float() + pixel_mean.float()
    return _normalize_tokens(raw, norm_pix)


def masked_pixel_mse_torch(
    pred: torch.Tensor,
    video: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    norm_pix: bool = True,
    pixel_mean: torch.Tensor | None = None,
    pixel_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather-first torch loss (differentiable w.r.t. pred). Shapes as `masked_pixel_mse_reference`."""
    with torch.no_grad():
        target = masked_target_torch(video, ids_masked, tubelet, patch, norm_pix, pixel_mean, pixel_std)
    return F.mse_loss(pred.float(), target)


def masked_pixel_mse(
    pred: torch.Tensor,
    video: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    norm_pix: bool = True,
    pixel_mean: torch.Tensor | None = None,
    pixel_std: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused masked normalized-pixel MSE.

    pred: float[B, M, t*p*p*C] predictions for the masked tokens `ids_masked: int64[B, M]` (token order),
    video: float[B, C, T, H, W] as fed to the model (ImageNet-normalized). Returns the float32 scalar loss.
    backend: "auto" (Triton on CUDA when available, else torch), "triton", or "torch".
    """
    if backend == "auto":
        from . import kernels

        # inside torch.compile the torch formula is traced instead: inductor fuses it into its own kernels and
        # the graph does not break around the custom kernel
        use_triton = video.is_cuda and kernels.triton_available() and not torch.compiler.is_compiling()
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        from .kernels import norm_pix_mse_triton

        if pixel_mean is None or pixel_std is None:
            mean, std = pixel_stats(video.shape[1])
            pixel_mean = torch.tensor(mean, device=video.device)
            pixel_std = torch.tensor(std, device=video.device)
        return norm_pix_mse_triton(pred, video, ids_masked, tubelet, patch, norm_pix, pixel_mean, pixel_std)
    if backend == "torch":
        return masked_pixel_mse_torch(pred, video, ids_masked, tubelet, patch, norm_pix, pixel_mean, pixel_std)
    raise ValueError(f"unknown loss backend {backend!r}")
