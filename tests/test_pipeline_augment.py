"""Spatial augmentation, repeated views, masks and normalization, checked against the official algorithms."""

import numpy as np
import pipeline_shards as ps
import pytest
import torch
from test_pipeline_frames import reference_view

from pipeline import PipelineConfig, build_loader

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def official_multiscale_boxes(w: int, h: int, size: int, scales=(1, 0.875, 0.75, 0.66), max_distort=1) -> set:
    """Every (y0, x0, h, w) that VideoMAE's GroupMultiScaleCrop (fix_crop, more_fix_crop) can return."""
    base = min(w, h)
    crop_sizes = [int(base * x) for x in scales]
    crop_h = [size if abs(x - size) < 3 else x for x in crop_sizes]
    crop_w = [size if abs(x - size) < 3 else x for x in crop_sizes]
    pairs = [(cw, ch) for i, ch in enumerate(crop_h) for j, cw in enumerate(crop_w) if abs(i - j) <= max_distort]
    boxes = set()
    for cw, ch in pairs:
        ws, hs = (w - cw) // 4, (h - ch) // 4
        offsets = [
            (0, 0),
            (4 * ws, 0),
            (0, 4 * hs),
            (4 * ws, 4 * hs),
            (2 * ws, 2 * hs),
            (0, 2 * hs),
            (4 * ws, 2 * hs),
            (2 * ws, 4 * hs),
            (2 * ws, 0),
            (ws, hs),
            (3 * ws, hs),
            (ws, 3 * hs),
            (3 * ws, 3 * hs),
        ]
        boxes |= {(oy, ox, ch, cw) for ox, oy in offsets}
    return boxes


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8[R, T, H, W, C] -> float[R, C, T, H, W], ImageNet mean/std."""
    x = frames.float().div(255.0).sub(torch.from_numpy(MEAN)).div(torch.from_numpy(STD))
    return x.permute(0, 4, 1, 2, 3)


def test_tube_mask_count_and_structure_at_vit_b_size():
    cfg = PipelineConfig(mode="pretrain").resolved()
    assert (cfg.spatial_tokens, cfg.masked_per_slot, cfg.num_tokens) == (196, 176, 1568)
    loader = build_loader(
        ps.train_shards().directory, "pretrain", 2, num_frames=16, stride=1, input_size=224, num_repeats=2
    )
    batch = next(iter(loader))
    mask = batch["mask"]
    assert mask.dtype == torch.bool and mask.shape == (4, 1568)
    assert mask.sum(dim=1).tolist() == [1408] * 4  # 176 of 196 per slot, 8 slots
    slots = mask.view(4, 8, 196)
    assert torch.equal(slots, slots[:, :1].expand_as(slots))  # the same spatial pattern at every slot
    assert len({tuple(m.tolist()) for m in slots[:, 0]}) == 4  # views and samples draw their own pattern
    assert batch["video"].shape == (4, 3, 16, 224, 224)


def test_tube_masks_are_uniform_over_tokens():
    loader = build_loader(
        ps.train_shards().directory, "pretrain", 4, num_frames=4, stride=4, input_size=48, num_repeats=4, mask_ratio=0.5
    )
    masks = torch.cat([b["mask"] for _ in range(3) for b in loader])  # 3 epochs
    assert masks.shape[1] == 2 * 9 and masks.sum(1).eq(2 * 4).all()  # int(0.5 * 9) = 4 per slot
    freq = masks[:, :9].float().mean(0)  # each token masked with probability 4/9
    assert (freq - 4 / 9).abs().max() < 0.2


def test_random_masks_count_every_token_and_differ_between_slots():
    """mask_type "random" (official RandomMaskingGenerator): int(ratio * N) of all N tokens, not tubes, each token
    masked with probability ~ratio."""
    cfg = PipelineConfig(mode="pretrain", mask_type="random", num_frames=4, input_size=48, mask_ratio=0.5)
    assert (cfg.num_tokens, cfg.num_masked) == (18, 9)
    kw = dict(num_frames=4, stride=4, input_size=48, num_repeats=4, mask_ratio=0.5, mask_type="random")
    loader = build_loader(ps.train_shards().directory, "pretrain", 4, **kw)
    masks = torch.cat([b["mask"] for _ in range(3) for b in loader])  # 3 epochs
    assert masks.dtype == torch.bool and masks.shape[1] == 18 and masks.sum(1).eq(9).all()
    slots = masks.view(-1, 2, 9)
    assert (slots[:, 0] != slots[:, 1]).any(1).float().mean() > 0.9  # a fresh pattern per slot (tubes: never)
    assert (slots.sum(-1) != 4).any()  # per-slot counts vary: the count is over the clip, not per slot
    assert (masks.float().mean(0) - 0.5).abs().max() < 0.2
    again = build_loader(ps.train_shards().directory, "pretrain", 4, **kw)
    assert torch.equal(torch.cat([b["mask"] for b in again]), masks[: len(masks) // 3])  # the seed fixes them


def test_unknown_mask_type_is_refused():
    with pytest.raises(ValueError, match="mask_type='block'"):
        PipelineConfig(mode="pretrain", mask_type="block").resolved()


def test_pretrain_boxes_are_official_multiscale_crops_and_views_differ():
    shards = ps.train_shards()
    candidates = official_multiscale_boxes(96, 64, 48)
    loader = build_loader(
        shards.directory,
        "pretrain",
        4,
        num_frames=4,
        stride=4,
        input_size=48,
        num_repeats=3,
        debug_outputs=True,
        mask_ratio=0.5,
    )
    seen, differing, samples = set(), 0, 0
    for _ in range(3):
        for batch in loader:
            boxes = batch["box"].view(-1, 3, 5)
            for views, ids, idx, mask in zip(
                boxes, batch["sample_id"].view(-1, 3), batch["frame_idx"].view(-1, 3, 4), batch["mask"].view(-1, 3, 18)
            ):
                assert ids.eq(ids[0]).all() and idx.eq(idx[0]).all()  # one decoded clip feeds the 3 views
                assert not (mask[0].equal(mask[1]) and mask[1].equal(mask[2]))
                assert views[:, 4].eq(0).all()  # the official pretraining recipe: no flip
                for y0, x0, h, w, _ in views.tolist():
                    assert (y0, x0, h, w) in candidates
                    seen.add((y0, x0, h, w))
                differing += len({tuple(v) for v in views[:, :4].tolist()}) > 1
                samples += 1
    assert differing >= 0.8 * samples
    assert len(seen) >= 0.3 * len(candidates)


def test_finetune_crops_flips_and_normalization():
    shards = ps.train_shards()
    loader = build_loader(
        shards.directory,
        "finetune",
        4,
        num_frames=4,
        stride=4,
        input_size=48,
        num_repeats=2,
        debug_outputs=True,
        rand_augment=False,
        erase_prob=0.0,
        seed=1,
    )
    flips = []
    for _ in range(2):
        for batch in loader:
            assert torch.allclose(batch["video"], normalize(batch["frames"]), atol=1e-5)
            for row, (y0, x0, h, w, flipped) in enumerate(batch["box"].tolist()):
                assert y0 >= 0 and y0 + h <= 64 and x0 >= 0 and x0 + w <= 96
                area, ratio = h * w / (64 * 96), w / h
                fallback = (h, w) == (64, 85) or (h, w) == (64, 96)
                assert fallback or (0.07 <= area <= 1.0 and 0.7 <= ratio <= 1.4), (y0, x0, h, w)
                flips.append(flipped)
                if flipped:
                    video = shards.by_id[int(batch["sample_id"][row])]
                    decoded, idx = ps.decode_cached(video), batch["frame_idx"][row].numpy()
                    got = batch["frames"][row].numpy().astype(np.float32)
                    mirrored = reference_view(decoded, idx, [y0, x0, h, w, 1], 48, False)
                    plain = reference_view(decoded, idx, [y0, x0, h, w, 0], 48, False)
                    assert np.abs(got - mirrored).mean() < np.abs(got - plain).mean()
    assert 0.2 < np.mean(flips) < 0.8


@pytest.mark.parametrize("prob", [1.0, 0.25])
def test_random_erasing_boxes_of_pixel_noise(prob):
    loader = build_loader(
        ps.train_shards().directory,
        "finetune",
        4,
        num_frames=4,
        stride=4,
        input_size=48,
        num_repeats=2,
        debug_outputs=True,
        rand_augment=False,
        erase_prob=prob,
        flip=False,
    )
    erased, frames = 0, 0
    noise = []
    for batch in loader:
        diff = (batch["video"] - normalize(batch["frames"])).abs().amax(dim=1)  # [R, T, H, W]
        for r in range(diff.shape[0]):
            for t in range(diff.shape[1]):
                frames += 1
                changed = diff[r, t] > 1e-4
                if not changed.any():
                    continue
                erased += 1
                ys, xs = changed.nonzero(as_tuple=True)
                y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                box = changed[y0:y1, x0:x1]
                assert box.float().mean() > 0.99  # one filled rectangle
                assert changed.sum() == box.sum()
                h, w = int(y1 - y0), int(x1 - x0)
                assert 0.015 <= h * w / 48**2 <= 0.36 and 0.25 <= h / w <= 4.0
                noise.append(batch["video"][r, :, t, y0:y1, x0:x1].flatten())
    rate = erased / frames
    assert (rate > 0.9) if prob == 1.0 else (0.1 < rate < 0.45)
    noise = torch.cat(noise)
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1.0) < 0.1  # per-pixel N(0, 1) in normalized space


def test_rand_augment_changes_views_and_keeps_shapes():
    shards = ps.train_shards()
    loader = build_loader(
        shards.directory,
        "finetune",
        4,
        num_frames=4,
        stride=4,
        input_size=48,
        num_repeats=2,
        debug_outputs=True,
        erase_prob=0.0,
        flip=False,
        seed=2,
    )
    changed, rows = 0, 0
    for batch in loader:
        assert batch["video"].shape == (8, 3, 4, 48, 48) and batch["frames"].dtype == torch.uint8
        for row in range(batch["frames"].shape[0]):
            video = shards.by_id[int(batch["sample_id"][row])]
            plain = reference_view(
                ps.decode_cached(video), batch["frame_idx"][row].numpy(), batch["box"][row].numpy(), 48, False
            )
            changed += np.abs(batch["frames"][row].numpy() - plain).mean() > 3
            rows += 1
    # each of 4 layers applies an op with probability 1/2 (some ops are mild): most views change
    assert 0.3 * rows <= changed < rows
