"""Corrupt video members never reach the model as black clips (issue 24, item 2).

The corrupt-member matrix: an IVF member of real VP9 shards overwritten with random bytes whole, after its 32-byte
file header (every frame header random too), or in its frames' data only (frame headers intact); on the training
path (pretrain, a clip cut at a key frame) and the eval path (phase 0, 5 clips). The damaged sample must be skipped
and counted, every other sample must be delivered. A genuinely black video (valid, all frames zero) is not skipped
and decodes to black. The checks run real DALI pipelines on the CPU backend.
"""

from __future__ import annotations

import logging

import numpy as np
import pipeline_shards as ps
import pytest
import torch

from pipeline import build_loader
from pipeline import graph as graph_module
from pipeline.ivfcheck import REASON
from shards import format as fmt
from shards import ivf

SMALL = dict(num_frames=4, stride=4, input_size=48)
BAD = 2  # the damaged sample of 8


def _corrupt(data: bytes, layout: str, rng: np.random.Generator) -> bytes:
    garbage = lambda n: rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
    if layout == "whole":
        return garbage(len(data))
    if layout == "header_kept":  # the IVF file header kept, every frame header and frame random
        return data[: ivf.HEADER_SIZE] + garbage(len(data) - ivf.HEADER_SIZE)
    out = bytearray(data)  # "payload": each frame's data random, its 12-byte header intact
    for frame in ivf.read_ivf(data).frames:
        start = frame.offset + ivf.FRAME_HEADER_SIZE
        out[start : start + frame.size] = garbage(frame.size)
    return bytes(out)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> ps.TestShards:
    return ps.make_test_shards(tmp_path_factory.mktemp("members") / "good", [40] * 8)


def _sample_ids(batch: dict, views: int) -> list[int]:
    """One id per sample of a batch whose tensors hold `views` rows per sample."""
    return batch["sample_id"].view(-1, views)[:, 0].tolist()


@pytest.mark.parametrize("layout", ["whole", "header_kept", "payload"])
@pytest.mark.parametrize("mode", ["pretrain", "eval"])
def test_a_corrupt_ivf_member_is_skipped_and_counted(good, layout, mode, tmp_path, caplog):
    videos = [ps.TestVideo(v.key, v.mp4, v.num_frames, v.label, container="ivf", cuts=v.cuts) for v in good.videos]
    videos[BAD].mp4 = _corrupt(videos[BAD].mp4, layout, np.random.default_rng(7))  # the cuts table stays intact
    shards = ps.write_shards(tmp_path / "bad", videos, per_shard=4)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        loader = build_loader(shards.directory, mode, 2, **SMALL)
        ids = [i for b in loader for i in _sample_ids(b, loader.cfg.views_per_sample)]
    assert loader.stats.corrupt_samples == 1
    lines = [r.getMessage() for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert len(lines) == 1 and f"vid000{BAD}.ivf" in lines[0] and "train-000000.tar" in lines[0]
    if layout != "payload":  # the decoder itself reports damaged frame data; damaged headers it would not
        assert REASON in lines[0]
    if mode == "eval":
        assert sorted(ids) == [i for i in range(8) if i != BAD]
    else:
        assert BAD not in ids and len(ids) == 8  # a healthy substitute takes its place


def test_a_black_video_is_valid_and_not_skipped(good, tmp_path):
    black = ps.encode(np.zeros((40, 64, 96, 3), dtype=np.uint8), gop=8, container="ivf")
    videos = [ps.TestVideo(v.key, v.mp4, v.num_frames, v.label, container="ivf", cuts=v.cuts) for v in good.videos]
    videos[BAD] = ps.TestVideo("black", black, 40, 0, container="ivf")
    shards = ps.write_shards(tmp_path / "black", videos, per_shard=4)
    for mode in ("pretrain", "eval"):
        loader = build_loader(shards.directory, mode, 2, debug_outputs=True, **SMALL)
        frames = {}
        for b in loader:
            for i, sample_id in enumerate(_sample_ids(b, loader.cfg.views_per_sample)):
                frames[sample_id] = b["frames"][i * loader.cfg.views_per_sample]
        assert loader.stats.corrupt_samples == 0, mode
        assert BAD in frames and int(torch.as_tensor(frames[BAD]).max()) <= 2, mode  # black (lossless VP9, yuv420p)


@pytest.mark.parametrize("cut", [True, False])
def test_the_probe_applies_the_same_check_cut_or_whole(good, cut):
    video = good.videos[0]
    inputs = {"frame_idx": [np.arange(0, 16, 4, dtype=np.int32)], "cuts": [np.frombuffer(video.cuts, dtype="<i4")]}
    probe = graph_module.build_probe(fmt.Layout(), 4, "cpu", None, cut=cut)
    probe.build()
    decoded, clip = probe.run(video=[np.frombuffer(video.mp4, dtype=np.uint8)], **inputs)
    assert np.array(clip[0]).shape[0] == 4
    damaged = _corrupt(video.mp4, "header_kept", np.random.default_rng(1))
    probe = graph_module.build_probe(fmt.Layout(), 4, "cpu", None, cut=cut)
    probe.build()
    with pytest.raises(RuntimeError, match="checked_header"):
        probe.run(video=[np.frombuffer(damaged, dtype=np.uint8)], **inputs)


def test_each_phase_member_is_checked_against_its_own_rows(tmp_path, caplog):
    # 4 stride phases: every member of sample 2 has random frame headers, only phase 2 of sample 5 has; eval decodes
    # phase 0 only, so sample 5 is delivered there, while training (clips of any phase) never delivers sample 2
    videos = ps.make_test_shards(tmp_path / "good", [40] * 8, phases=4).videos
    rng = np.random.default_rng(3)
    videos[BAD].phase_mp4s = [_corrupt(m, "header_kept", rng) for m in videos[BAD].phase_mp4s]
    videos[BAD].mp4 = videos[BAD].phase_mp4s[0]
    videos[5].phase_mp4s[2] = _corrupt(videos[5].phase_mp4s[2], "header_kept", rng)
    shards = ps.write_shards(tmp_path / "bad", videos, per_shard=4)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        evaluator = build_loader(shards.directory, "eval", 2, **SMALL)
        ids = [i for b in evaluator for i in _sample_ids(b, evaluator.cfg.views_per_sample)]
    assert sorted(ids) == [i for i in range(8) if i != BAD] and evaluator.stats.corrupt_samples == 1
    trainer = build_loader(shards.directory, "pretrain", 2, **SMALL)
    for _ in range(2):
        ids = [i for b in trainer for i in _sample_ids(b, 1)]
        assert len(ids) == 8 and BAD not in ids
    assert all(REASON in line for line in trainer.stats.corrupt)
