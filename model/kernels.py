"""Triton kernel: patchify + per-tubelet normalization + masked MSE, with its gradient, in one pass.

One program handles one masked token. It reads that token's tubelet straight from the (strided) input video
(C x tubelet x patch x patch values), undoes the ImageNet normalization, computes per-channel mean and unbiased std
over the tubelet's pixels, forms the normalized target in registers, reads the token's prediction row
(tubelet*patch*patch*C values, pixel-major then channel), and writes

  partial[row] = sum over the row of (pred - target)^2           (float32, one value per masked token)
  grad[row, :] = (pred - target) * 2 / (B * M * P)               (only when the prediction needs a gradient)

The loss is partial.sum() / (B * M * P), deterministic (no atomics). Backward multiplies the stored gradient by the
incoming scalar gradient; nothing is recomputed and no host sync happens anywhere.

The kernel is exercised on CPU under TRITON_INTERPRET=1 by tests/test_model_fused_loss.py; on CUDA it is the
default loss path (`cfg.fused_loss`). Everything is computed in float32 whatever the input dtypes.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _HAVE_TRITON = False


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and can target a CUDA device (or runs in its interpreter)."""
    if not _HAVE_TRITON:
        return False
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available()


if _HAVE_TRITON:

    @triton.jit
    def _norm_pix_mse_kernel(
        video_ptr,
        pred_ptr,
        ids_ptr,
        partial_ptr,
        grad_ptr,
        mean_ptr,
        std_ptr,
        grad_scale,
        num_masked,
        grid_h,
        grid_w,
        s_vb,
        s_vc,
        s_vt,
        s_vh,
        s_vw,  # video strides (elements)
        s_pb,
        s_pn,  # pred strides over batch and token (the last dim is contiguous)
        s_gb,
        s_gn,  # grad strides likewise
        s_ib,  # ids stride over batch
        C: tl.constexpr,
        TUBELET: tl.constexpr,
        PATCH: tl.constexpr,
        BLOCK_PIX: tl.constexpr,
        BLOCK_C: tl.constexpr,
        NORM_PIX: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        EPS: tl.constexpr,
    ):
        NPIX: tl.constexpr = TUBELET * PATCH * PATCH
        row = tl.program_id(0)
        b = (row // num_masked).to(tl.int64)
        j = (row % num_masked).to(tl.int64)
        tok = tl.load(ids_ptr + b * s_ib + j).to(tl.int64)
        tw = tok % grid_w
        th = (tok // grid_w) % grid_h
        tt = tok // (grid_w * grid_h)

        pix = tl.arange(0, BLOCK_PIX)  # pixel within the tubelet, (dt, dh, dw) order
        ch = tl.arange(0, BLOCK_C)
        pix_ok = pix < NPIX
        ch_ok = ch < C
        ok = pix_ok[:, None] & ch_ok[None, :]
        dt = pix // (PATCH * PATCH)
        dh = (pix // PATCH) % PATCH
        dw = pix % PATCH
        v_pix = (tt * TUBELET + dt) * s_vt + (th * PATCH + dh) * s_vh + (tw * PATCH + dw) * s_vw
        v_off = b * s_vb + v_pix[:, None] + ch[None, :].to(tl.int64) * s_vc
        x = tl.load(video_ptr + v_off, mask=ok, other=0.0).to(tl.float32)
        mean_c = tl.load(mean_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)
        std_c = tl.load(std_ptr + ch, mask=ch_ok, other=1.0).to(tl.float32)
        x = tl.where(ok, x * std_c[None, :] + mean_c[None, :], 0.0)  # back to [0, 1] pixels
        if NORM_PIX:
            mu = tl.sum(x, axis=0) / NPIX
            d = tl.where(ok, x - mu[None, :], 0.0)
            var = tl.sum(d * d, axis=0) / (NPIX - 1)
            target = d / (tl.sqrt(var) + EPS)[None, :]
        else:
            target = x

        col = pix[:, None] * C + ch[None, :]  # position in the (pixel, channel) flattened row
        p = tl.load(pred_ptr + b * s_pb + j * s_pn + col, mask=ok, other=0.0).to(tl.float32)
        diff = tl.where(ok, p - target, 0.0)
        tl.store(partial_ptr + row, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
        if WRITE_GRAD:
            g = diff * grad_scale
            tl.store(grad_ptr + b * s_gb + j * s_gn + col, g.to(grad_ptr.dtype.element_ty), mask=ok)


def _launch(
    pred: torch.Tensor,
    video: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    norm_pix: bool,
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
    write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, c, t, h, w = video.shape
    m = ids_masked.shape[1]
    npix = tubelet * patch * patch
    if pred.shape != (b, m, npix * c):
        raise ValueError(f"pred must be [B, M, {npix * c}] = {[b, m, npix * c]}, got {list(pred.shape)}")
    if pred.stride(-1) != 1:
        pred = pred.contiguous()
    ids_masked = ids_masked.contiguous()
    rows = b * m
    partial = torch.empty(rows, dtype=torch.float32, device=pred.device)
    grad = torch.empty_like(pred, memory_format=torch.contiguous_format) if write_grad else partial
    total = max(rows * npix * c, 1)
    block_pix = triton.next_power_of_2(npix)
    block_c = triton.next_power_of_2(c)
    num_warps = 8 if block_pix * block_c >= 2048 else 4
    if rows > 0:
        _norm_pix_mse_kernel[(rows,)](
            video,
            pred,
            ids_masked,
            partial,
            grad,
            pixel_mean.float().contiguous(),
            pixel_std.float().contiguous(),
            2.0 / total,
            m,
            h // patch,
            w // patch,
            *video.stride(),
            pred.stride(0),
            pred.stride(1),
            grad.stride(0) if write_grad else 0,
            grad.stride(1) if write_grad else 0,
            ids_masked.stride(0),
            C=c,
            TUBELET=tubelet,
            PATCH=patch,
            BLOCK_PIX=block_pix,
            BLOCK_C=block_c,
            NORM_PIX=norm_pix,
            WRITE_GRAD=write_grad,
            EPS=1e-6,
            num_warps=num_warps,
        )
    loss = partial.sum() / total
    return loss, (grad if write_grad else None)


class _NormPixMSE(torch.autograd.Function):
    """loss = mean((pred - norm_pix_target(video)[ids_masked])^2); gradient w.r.t. pred only."""

    @staticmethod
    def forward(ctx, pred, video, ids_masked, pixel_mean, pixel_std, tubelet, patch, norm_pix):
        write_grad = ctx.needs_input_grad[0]
        loss, grad = _launch(pred, video, ids_masked, tubelet, patch, norm_pix, pixel_mean, pixel_std, write_grad)
        if write_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


@torch.compiler.disable  # keep the custom kernel out of compiled graphs: it is already one fused launch
def norm_pix_mse_triton(
    pred: torch.Tensor,
    video: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    norm_pix: bool,
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
) -> torch.Tensor:
    """Fused loss. pred: float[B, M, t*p*p*C] (any float dtype), video: float[B, C, T, H, W] (any strides),
    ids_masked: int64[B, M], pixel_mean / pixel_std: float[C] (on the video's device). Returns float32[]."""
    if not _HAVE_TRITON:
        raise RuntimeError(
            "the fused pixel loss needs Triton, which is not installed; set fused_loss=False or use backend='torch'"
        )
    return _NormPixMSE.apply(pred, video, ids_masked, pixel_mean, pixel_std, tubelet, patch, norm_pix)
