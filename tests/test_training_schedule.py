"""The lr schedule against the official VideoMAE formula (utils.cosine_scheduler, rebuilt here with numpy)."""

import math

import numpy as np
import pytest
import torch

from training.schedule import CosineSchedule


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """MCG-NJU/VideoMAE utils.cosine_scheduler as published: a precomputed per-iteration array."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("epochs,niter,warmup,start", [(801, 3, 40, 0.0), (100, 7, 5, 1e-6), (10, 1, 0, 0.0)])
def test_matches_official_array(epochs, niter, warmup, start):
    base, final = 1.2e-3, 8e-5
    ref = official_cosine_scheduler(base, final, epochs, niter, warmup, start)
    sched = CosineSchedule(base, final, epochs * niter, warmup * niter, start)
    ours = np.array([sched(i) for i in range(epochs * niter)])
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    assert sched(epochs * niter + 5) == final  # past the end: the floor, not an index error


def test_apply_uses_lr_scale():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr_scale": 0.5}, {"params": [p2]}], lr=1.0)
    sched = CosineSchedule(1.0, 0.0, 10, 0)
    lr = sched.apply(opt, 5)
    assert lr == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr)
    assert opt.param_groups[1]["lr"] == pytest.approx(lr)


def test_rejects_bad_lengths():
    with pytest.raises(ValueError):
        CosineSchedule(1.0, 0.0, 0)
    with pytest.raises(ValueError):
        CosineSchedule(1.0, 0.0, 10, 11)
