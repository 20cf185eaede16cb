"""The fused normalized-pixel loss equals the official formula, value and gradient.

References: `norm_pix_target_written_out` below re-derives the official target (engine_for_pretraining.py) with
explicit loops over tokens, independent of the model code's rearranges; `masked_pixel_mse_reference` is the
model's whole-video formula. The Triton kernel runs here under TRITON_INTERPRET=1 in a subprocess (the
interpreter must be switched on before Triton decorates the kernel), and on CUDA when a GPU is present.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.layers import mask_to_ids
from model.pixel_loss import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    masked_pixel_mse,
    masked_pixel_mse_reference,
    masked_pixel_mse_torch,
)

ROOT = Path(__file__).resolve().parents[1]

# (batch, frames, size, tubelet, patch): tubelet pixel counts 512 (official), 392 (not a power of two), 64
SHAPES = [(2, 4, 32, 2, 16), (2, 4, 28, 2, 14), (3, 2, 16, 1, 8)]


def random_case(b: int, t: int, s: int, tub: int, patch: int, dtype: torch.dtype, seed: int, ratio: float = 0.75):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, 3, t, s, s, generator=g)
    n = (t // tub) * (s // patch) ** 2
    m = max(1, int(ratio * n))
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n, generator=g)[:m]] = True
    pred = torch.randn(b, m, tub * patch * patch * 3, generator=g).to(dtype)
    return video, mask, pred


def norm_pix_target_written_out(
    video: torch.Tensor, mask: torch.Tensor, tub: int, patch: int, norm_pix: bool = True
) -> torch.Tensor:
    """Official target, token by token in float64: float[B, M, tub*patch*patch*3]."""
    v = video.double() * torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1, 1) + torch.tensor(
        IMAGENET_MEAN, dtype=torch.float64
    ).view(1, 3, 1, 1, 1)
    b, c, t, h, w = v.shape
    hg, wg = h // patch, w // patch
    rows = []
    for i in range(b):
        toks = []
        for n in mask[i].nonzero().flatten().tolist():
            tt, hh, ww = n // (hg * wg), (n // wg) % hg, n % wg
            cube = v[i, :, tt * tub : (tt + 1) * tub, hh * patch : (hh + 1) * patch, ww * patch : (ww + 1) * patch]
            pix = cube.reshape(c, -1).T  # [pixels in (dt, dh, dw) order, C]
            if norm_pix:
                pix = (pix - pix.mean(0)) / (pix.std(0, unbiased=True) + 1e-6)
            toks.append(pix.reshape(-1))  # pixel-major, then channel
        rows.append(torch.stack(toks))
    return torch.stack(rows)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_reference_formula_matches_written_out_target(shape, norm_pix):
    video, mask, pred = random_case(*shape, torch.float32, seed=1)
    target = norm_pix_target_written_out(video, mask, shape[3], shape[4], norm_pix)
    expected = ((pred.double() - target) ** 2).mean()
    got = masked_pixel_mse_reference(pred, video, mask, shape[3], shape[4], norm_pix)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_torch_fallback_equals_reference_with_gradients(shape, dtype, norm_pix):
    video, mask, pred = random_case(*shape, dtype, seed=2)
    _, ids_masked = mask_to_ids(mask)
    p1 = pred.clone().requires_grad_()
    p2 = pred.clone().requires_grad_()
    loss = masked_pixel_mse_torch(p1, video, ids_masked, shape[3], shape[4], norm_pix)
    ref = masked_pixel_mse_reference(p2, video, mask, shape[3], shape[4], norm_pix)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-9)


def test_fallback_reads_strided_video():
    # a channels-last video (as a pipeline may hand over) gives the same loss as a contiguous one
    video, mask, pred = random_case(2, 4, 32, 2, 16, torch.float32, seed=3)
    _, ids_masked = mask_to_ids(mask)
    strided = video.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    assert not strided.is_contiguous()
    torch.testing.assert_close(
        masked_pixel_mse_torch(pred, strided, ids_masked, 2, 16), masked_pixel_mse_reference(pred, video, mask, 2, 16)
    )


# ------------------------------------------------------------------------------------------------------------
# The Triton kernel under the interpreter: this file is run as a script in a subprocess with TRITON_INTERPRET=1.


def _interpreted_checks() -> dict[str, dict]:
    """Compare the Triton kernel (interpreted, CPU tensors) with the reference formula; returns errors per case."""
    results = {}
    cases = [
        (shape, dtype, norm_pix)
        for shape in SHAPES
        for dtype in (torch.float32, torch.bfloat16)
        for norm_pix in (True, False)
    ]
    for k, (shape, dtype, norm_pix) in enumerate(cases):
        video, mask, pred = random_case(*shape, dtype, seed=10 + k)
        _, ids_masked = mask_to_ids(mask)
        strided = k % 2 == 1  # every other case reads a channels-last video
        vid_in = video.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3) if strided else video
        p1 = pred.clone().requires_grad_()
        p2 = pred.clone().requires_grad_()
        loss = masked_pixel_mse(p1, vid_in, ids_masked, shape[3], shape[4], norm_pix, backend="triton")
        ref = masked_pixel_mse_reference(p2, video, mask, shape[3], shape[4], norm_pix)
        (loss * 3.0).backward()  # a non-unit upstream gradient
        (ref * 3.0).backward()
        g_err = (p1.grad.float() - p2.grad.float()).abs().max().item()
        g_scale = p2.grad.float().abs().max().item()
        # no-grad call: no gradient buffer, same value
        with torch.no_grad():
            loss_ng = masked_pixel_mse(pred, vid_in, ids_masked, shape[3], shape[4], norm_pix, backend="triton")
        results[f"{shape}-{dtype}-norm{norm_pix}"] = dict(
            dtype=str(dtype),
            loss=loss.item(),
            ref=ref.item(),
            loss_nograd=loss_ng.item(),
            grad_err=g_err,
            grad_scale=g_scale,
            grad_dtype=str(p1.grad.dtype),
        )
    return results


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(SHAPES) * 4
    for name, r in results.items():
        bf16 = "bfloat16" in r["dtype"]
        assert r["loss"] == pytest.approx(r["ref"], rel=1e-5), name
        assert r["loss_nograd"] == pytest.approx(r["ref"], rel=1e-5), name
        assert r["grad_dtype"] == r["dtype"], name
        # bf16 gradients are rounded twice (stored by the kernel - the interpreter truncates -, then scaled by
        # the upstream gradient): up to 2 ulps = 2 * 2^-7 relative
        assert r["grad_err"] <= (2 * 2**-7 if bf16 else 1e-5) * r["grad_scale"], (name, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", SHAPES + [(4, 16, 224, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_cuda(shape, dtype):
    video, mask, pred = random_case(*shape, dtype, seed=5, ratio=0.9)
    video, mask, pred = video.cuda(), mask.cuda(), pred.cuda()
    _, ids_masked = mask_to_ids(mask)
    p1 = pred.clone().requires_grad_()
    p2 = pred.clone().requires_grad_()
    loss = masked_pixel_mse(p1, video, ids_masked, shape[3], shape[4], backend="triton")
    ref = masked_pixel_mse_reference(p2, video, mask, shape[3], shape[4])
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-2, atol=1e-2 * p2.grad.float().abs().max().item()) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(p1.grad, p2.grad, **tol)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    torch.manual_seed(0)
    print(json.dumps(_interpreted_checks()))
