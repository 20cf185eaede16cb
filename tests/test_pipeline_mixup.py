"""Video mixup/cutmix against the formulas and timm's soft targets."""

import pytest
import torch
from timm.data.mixup import mixup_target

from pipeline.mixup import VideoMixup, smooth_one_hot


def batch(seed=0, b=4, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 4, 16, 24, generator=g), torch.randint(0, classes, (b,), generator=g)


def test_smooth_one_hot_matches_timm():
    _, label = batch()
    assert torch.allclose(smooth_one_hot(label, 5, 0.1), mixup_target(label, 5, lam=1.0, smoothing=0.1))


def test_mixup_blends_mirrored_rows():
    video, label = batch()
    original = video.clone()
    lam, use_cutmix = VideoMixup(5, cutmix_alpha=0.0, seed=3).draw()
    assert not use_cutmix and 0.0 < lam < 1.0
    mixed, target = VideoMixup(5, cutmix_alpha=0.0, seed=3)(video, label)
    assert torch.allclose(mixed, lam * original + (1 - lam) * original.flip(0), atol=1e-6)
    assert torch.allclose(target, mixup_target(label, 5, lam=lam, smoothing=0.1))


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_cuts_the_same_spatial_box_in_every_frame(seed):
    video, label = batch(seed)
    original = video.clone()
    mixer = VideoMixup(5, mixup_alpha=0.0, cutmix_alpha=1.0, seed=seed)
    mixed, target = mixer(video, label)
    changed = (mixed != original).any(dim=0).any(dim=0)  # [T, H, W]
    assert torch.equal(changed, changed[:1].expand_as(changed))  # the same box in every frame
    region = changed[0]
    area = int(region.sum())
    if area:
        ys, xs = region.nonzero(as_tuple=True)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert area == (y1 - y0) * (x1 - x0)  # a rectangle on (H, W)
        assert torch.equal(mixed[..., y0:y1, x0:x1], original.flip(0)[..., y0:y1, x0:x1])
    lam = 1.0 - area / (16 * 24)
    assert torch.allclose(target, mixup_target(label, 5, lam=lam, smoothing=0.1), atol=1e-6)
    assert torch.allclose(target.sum(1), torch.ones(4))


def test_switches_between_mixup_and_cutmix():
    mixer = VideoMixup(5, seed=0)
    modes = [mixer.draw()[1] for _ in range(400)]
    assert 0.4 < sum(modes) / len(modes) < 0.6


def test_rejects_odd_batches_and_images():
    mixer = VideoMixup(5, seed=0)
    with pytest.raises(ValueError, match="even"):
        mixer(*batch(b=3))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        mixer(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
