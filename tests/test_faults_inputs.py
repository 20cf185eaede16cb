"""Damaged or odd inputs give one line, and the rest of the work goes on (issue 24, items 6 and 9).

Real DALI pipelines over shards written by tests/pipeline_shards.py.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

import pipeline_shards as ps
import pytest
from test_train_runs import ROOT, train_cmd

from pipeline import build_loader
from shards import format as fmt

SMALL = dict(num_frames=4, stride=4, input_size=48)


def test_an_empty_tar_with_an_empty_index_is_one_line(tmp_path):
    tar = tmp_path / "train-000000.tar"
    tar.write_bytes(b"")
    (tmp_path / "train-000000.idx").write_text(f"{fmt.INDEX_VERSION} 0\n")
    with pytest.raises(ValueError) as error:
        build_loader(str(tar), "pretrain", 2, **SMALL)
    assert str(error.value) == f"{tar}: its index {tmp_path / 'train-000000.idx'} lists no samples"
    proc = subprocess.run(
        train_cmd("pretrain", tmp_path / "run", f"data.train={tar}", "data.batch_size=2"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "lists no samples" in proc.stderr


def test_an_empty_shard_among_others_is_skipped_with_one_warning(tmp_path, caplog):
    shards = ps.make_test_shards(tmp_path / "set", [20] * 8)
    empty = tmp_path / "set" / "train-000009.tar"
    empty.write_bytes(b"")
    (tmp_path / "set" / "train-000009.idx").write_text(f"{fmt.INDEX_VERSION} 0\n")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        loader = build_loader([*shards.tars, str(empty)], "eval", 2, **SMALL)
        ids = {i for b in loader for i in b["sample_id"].tolist()}
    assert ids == set(range(8))
    (line,) = [r.getMessage() for r in caplog.records if "lists no samples" in r.getMessage()]
    assert str(empty) in line
    shutil.rmtree(tmp_path / "set")


def test_a_sample_without_its_video_member_is_counted_and_warned_once(tmp_path, caplog):
    shards = ps.make_test_shards(tmp_path / "set", [20] * 8)
    index = fmt.index_path_for(shards.tars[0])
    samples = fmt.read_index(index)
    samples[2] = [e for e in samples[2] if e.ext != fmt.IVF_EXT]  # vid0002 without its video (as if never written)
    with open(index, "w") as f:
        f.write(fmt.index_text(samples))
    for mode in ("pretrain", "eval"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            loader = build_loader(shards.directory, mode, 2, **SMALL)
            ids = {i for b in loader for i in b["sample_id"].tolist()}
        assert 2 not in ids and loader.stats.incomplete_samples == 1
        (line,) = [r.getMessage() for r in caplog.records if "lack a member" in r.getMessage()]
        assert (
            line
            == f"pipeline: 1 sample(s) lack a member and are left out (first: {shards.tars[0]}:vid0002: no vid0002.ivf)"
        )


def test_preview_of_data_smaller_than_one_batch_is_one_line(tmp_path, capsys):
    from pipeline.preview import main as preview_main

    shards = ps.make_test_shards(tmp_path / "two", [20] * 2)
    args = ["--shards", shards.directory, "--batch-size", "4", "--num-frames", "4", "--input-size", "48"]
    assert preview_main([*args, "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"preview: {shards.directory}: 2 samples, fewer than one batch of 4; pass a smaller --batch-size"
    assert not (tmp_path / "p.png").exists()
