"""Pre-built test shard sets (tests/pipeline_shards.py), as the GPU machine, which has no ffmpeg, uses them: the CLI
writes a set (real ffmpeg encodes, in a subprocess), and with $PIPELINE_TEST_SHARDS a test process reads it back
without encoding anything; the videos decode (PyAV) to the frames they were made from, and the loader reads them."""

import os
import subprocess
import sys

import numpy as np
import pipeline_shards as ps
import pytest
from conftest import REPO_ROOT

from pipeline import build_loader
from shards import format as fmt
from shards import ivf


def test_a_prebuilt_set_is_read_back_without_encoding(tmp_path, monkeypatch):
    out = tmp_path / "prebuilt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    made = subprocess.run(
        [sys.executable, "tests/pipeline_shards.py", str(out), "train_shards:4:ivf"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    assert (out / "train-p4-ivf" / fmt.MANIFEST_NAME).is_file() and not list(out.glob(".*tmp"))

    def no_ffmpeg(*args, **kwargs):
        raise AssertionError("a pre-built set was encoded again")

    monkeypatch.setattr(ps, "encode", no_ffmpeg)
    monkeypatch.setattr(ps, "_CACHE", {})
    monkeypatch.setenv(ps.PREBUILT_ENV, str(out))
    # as in the whole suite, where an earlier test of this process already built the same set under its name
    os.makedirs(os.path.join(ps._root(), "train-p4-ivf"), exist_ok=True)
    shards = ps.train_shards(phases=4)
    assert shards.directory != str(out / "train-p4-ivf")  # a copy: a test that damages it leaves the original
    for name in os.listdir(out / "train-p4-ivf"):
        assert (out / "train-p4-ivf" / name).read_bytes() == open(os.path.join(shards.directory, name), "rb").read()

    assert [v.num_frames for v in shards.videos] == ps.TRAIN_FRAME_COUNTS
    assert [v.sample_id for v in shards.videos] == list(range(len(ps.TRAIN_FRAME_COUNTS)))
    for i, video in enumerate(shards.videos):
        assert video.key == f"vid{i:04d}" and video.label == i % 3 and video.container == fmt.IVF_EXT
        assert len(video.members) == 4 and shards.by_id[i] is video
        assert video.cuts == fmt.pack_cuts([ivf.read_ivf(m) for m in video.members])  # recomputed from the members
        made_from = ps.synthetic_frames(video.num_frames, 64, 96, i)
        decoded = ps.decode_cached(video).astype(np.int16)
        assert decoded.shape == made_from.shape and np.abs(decoded - made_from).max() <= 2, video.key

    batch = next(iter(build_loader(shards.directory, "pretrain", 4, num_frames=4, stride=4, input_size=48)))
    assert batch["video"].shape == (4, 3, 4, 48, 48)


def test_without_ffmpeg_or_a_prebuilt_set_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as on the GPU machine
    monkeypatch.setattr(ps, "_CACHE", {})
    monkeypatch.setenv(ps.PREBUILT_ENV, str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match=r"no ffmpeg .*\$PIPELINE_TEST_SHARDS at OUT"):
        ps.train_shards(phases=4)
