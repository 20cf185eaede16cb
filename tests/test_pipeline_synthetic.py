"""The in-memory synthetic loader keeps the real loader's contract: layout, sharding, masks, exact resume."""

import torch

from pipeline.synthetic import SyntheticLoader


def collect(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if n is not None and i + 1 == n:
            break
    return out


def test_layout_and_tube_masks():
    loader = SyntheticLoader(
        "pretrain",
        3,
        num_samples=12,
        num_frames=4,
        input_size=32,
        patch_size=16,
        tubelet_size=2,
        num_repeats=2,
        mask_ratio=0.75,
    )
    batch = next(iter(loader))
    assert batch["video"].shape == (6, 3, 4, 32, 32) and batch["video"].dtype == torch.float32
    assert batch["mask"].shape == (6, 8) and batch["mask"].dtype == torch.bool
    assert torch.equal(batch["sample_id"][0::2], batch["sample_id"][1::2])  # repeats are consecutive rows
    assert (batch["mask"].sum(1) == 2 * 3).all()  # int(0.75 * 4) masked per time slot, 2 slots
    assert torch.equal(batch["mask"][:, :4], batch["mask"][:, 4:])  # the same spatial pattern in every slot
    assert not torch.equal(batch["video"][0], batch["video"][1])  # different noise per repeat


def test_random_masks_cover_the_clip_not_tubes():
    kw = dict(num_samples=12, num_frames=4, input_size=32, patch_size=16, num_repeats=2, mask_ratio=0.75)
    masks = torch.cat([b["mask"] for b in SyntheticLoader("pretrain", 3, mask_type="random", **kw)])
    assert masks.shape == (24, 8) and (masks.sum(1) == 6).all()  # int(0.75 * 8) of the clip's 8 tokens
    assert not torch.equal(masks[:, :4], masks[:, 4:])  # not one spatial pattern repeated
    try:
        SyntheticLoader("pretrain", 3, mask_type="tubes", **kw)
    except ValueError as e:
        assert "mask_type must be one of" in str(e)
    else:
        raise AssertionError("an unknown mask_type was accepted")


def test_resume_mid_epoch_gives_the_same_batches():
    kw = dict(num_samples=20, num_frames=2, input_size=16, patch_size=8, tubelet_size=2, seed=3)
    full = collect(SyntheticLoader("pretrain", 4, **kw)) + collect(
        SyntheticLoader(
            "pretrain", 4, **kw, state={"kind": "synthetic", "epoch": 1, "position": 0, "seed": 3, "world_size": 1}
        )
    )
    first = SyntheticLoader("pretrain", 4, **kw)
    head = collect(first, 3)
    resumed = SyntheticLoader("pretrain", 4, **kw, state=first.state_dict())
    tail = collect(resumed) + collect(resumed)
    assert len(head) + len(tail) == len(full) == 10
    for a, b in zip(head + tail, full):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_ranks_read_disjoint_samples_and_eval_covers_all():
    kw = dict(num_samples=10, num_frames=2, input_size=16, patch_size=8, tubelet_size=2, world_size=2)
    ids = [torch.cat([b["sample_id"] for b in SyntheticLoader("finetune", 2, rank=r, **kw)]) for r in (0, 1)]
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    ev = [collect(SyntheticLoader("eval", 2, rank=r, num_clips=2, num_crops=3, **kw)) for r in (0, 1)]
    views = torch.cat([torch.stack([b["sample_id"], b["clip"] * 3 + b["crop"]], 1) for r in ev for b in r])
    assert sorted(map(tuple, views.tolist())) == [(s, v) for s in range(10) for v in range(6)]
