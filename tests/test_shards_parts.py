"""Partitioned builds (issue 15): `shards.build --part I/N` (or a Slurm array task) and `shards.merge`.

Real builds: the shared synthetic train set (`shard_build_args["train"]`) over a copy of its videos in which two are
broken, at plan positions that put a failure into parts 0 and 1, so that the merge must renumber parts 1 and 2 (and
shorten json members: provisional ids 10, 11 become 8, 9). The one-machine build of the same inputs is the reference
for every byte of every sample.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import module_env
from test_shards_build import build_files

from shards import format as fmt
from shards.build import main as build_main
from shards.inputs import collect_inputs
from shards.merge import main as merge_main
from shards.merge import patch_shard_ids
from shards.plan import part_range, plan_order, resolve_part, slurm_part
from shards.resume import BuildLocked, BuildLocks
from shards.verify import check_shard_members, verify
from shards.writer import ShardWriter, sha256_file

PARTS = 3
BROKEN_POSITIONS = (1, 5)  # plan positions of the broken videos: one in part 0 (0..3), one in part 1 (4..7)


def _option(args: list[str], name: str, value: str | None) -> list[str]:
    """`args` with option `name` set to `value` (None: removed)."""
    out = list(args)
    if name in out:
        i = out.index(name)
        del out[i : i + 2]
    return out + ([name, value] if value is not None else [])


def _members(directory: Path) -> dict[str, bytes]:
    """Every tar member of a finished build, by name, in manifest order."""
    found = {}
    for shard in fmt.read_manifest(directory)["shards"]:
        with tarfile.open(directory / shard["tar"]) as tar:
            found.update((m.name, tar.extractfile(m).read()) for m in tar)
    return found


@pytest.fixture(scope="module")
def base_args(synth_root, shard_build_args, tmp_path_factory) -> list[str]:
    """The shared train build's arguments (no --out) over a copy of its videos with two of them broken, 2 samples per
    shard (so that parts have several shards)."""
    root = tmp_path_factory.mktemp("parts_synth")
    shutil.copytree(synth_root, root, dirs_exist_ok=True)
    args = _option(
        _option(_option(shard_build_args["train"], "--out", None), "--root", str(root)), "--samples-per-shard", "2"
    )
    videos = collect_inputs(csv_path=args[args.index("--csv") + 1], root=str(root), split="train").videos
    plan = plan_order(videos, seed=0)
    assert len(plan) == 12 and [part_range(12, i, PARTS) for i in range(PARTS)] == [(0, 4), (4, 8), (8, 12)]
    for position in BROKEN_POSITIONS:
        Path(plan[position].source).write_bytes(b"this is not a video\n")
    return args


@pytest.fixture(scope="module")
def reference(base_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parts_reference") / "train"
    assert build_main([*base_args, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def unmerged(base_args, tmp_path_factory) -> Path:
    """The three parts built one after the other into one directory, not merged (tests work on copies)."""
    out = tmp_path_factory.mktemp("parts_unmerged") / "train"
    for index in range(PARTS):
        assert build_main([*base_args, "--out", str(out), "--part", f"{index}/{PARTS}"]) == 0
    return out


@pytest.fixture(scope="module")
def merged(unmerged, tmp_path_factory) -> tuple[Path, str]:
    """A merged copy of `unmerged` and what the merge said."""
    out = tmp_path_factory.mktemp("parts_merged") / "train"
    shutil.copytree(unmerged, out)
    proc = subprocess.run(
        [sys.executable, "-m", "shards.merge", str(out)], env=module_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_parts_leave_no_manifest_and_disjoint_shard_names(unmerged):
    assert not (unmerged / fmt.MANIFEST_NAME).exists() and not (unmerged / fmt.FAILURES_NAME).exists()
    tars = sorted(p.name for p in unmerged.glob("*.tar"))
    assert tars == [f"train-p00{i}-00000{k}.tar" for i in range(PARTS) for k in range(2)]
    ranges = [
        json.loads((unmerged / ".build" / f"p00{i}" / "finished.json").read_text())["plan_range"] for i in range(PARTS)
    ]
    assert ranges == [[0, 4], [4, 8], [8, 12]]


def test_merged_parts_hold_every_byte_of_the_one_machine_build(reference, merged):
    out, said = merged
    assert "sample ids renumbered in 4 shard(s)" in said  # parts 1 and 2: the renumbering was exercised
    ours, theirs = fmt.read_manifest(out), fmt.read_manifest(reference)
    assert ours["keys"] == theirs["keys"] and ours["num_samples"] == 10 and ours["parts"] == PARTS
    assert {k: v for k, v in ours.items() if k not in ("shards", "parts")} == {
        k: v for k, v in theirs.items() if k != "shards"
    }
    # Shard boundaries differ (each part ends its last shard): [2, 1, 2, 1, 2, 2] samples, against [2, 2, 2, 2, 2].
    assert [s["num_samples"] for s in ours["shards"]] == [2, 1, 2, 1, 2, 2]
    assert (out / fmt.FAILURES_NAME).read_bytes() == (reference / fmt.FAILURES_NAME).read_bytes()
    mine, expected = _members(out), _members(reference)
    assert list(mine) == list(expected)  # the same samples, members and order
    different = [name for name in expected if mine[name] != expected[name]]
    assert different == []  # video, cuts, cls, json (ids and all) and info: byte for byte
    ids = [fmt.unpack_info(data)["sample_id"] for name, data in mine.items() if name.endswith(".info")]
    assert ids == list(range(10))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no state, no lock files
    assert verify(out) == []


def test_loader_reads_every_merged_sample_once(merged, reference):
    from pipeline import build_loader

    out, _ = merged
    loader = build_loader(out, "eval", 2, num_frames=4, stride=4, input_size=48, eval_clips=1, eval_crops=1)
    batches = list(loader)
    ids = [i for b in batches for i in b["sample_id"].tolist()]
    assert sorted(ids) == list(range(10))
    labels = {i: label for b in batches for i, label in zip(b["sample_id"].tolist(), b["label"].tolist())}
    keys = fmt.read_manifest(out)["keys"]
    metas = {
        json.loads(data)["key"]: json.loads(data)
        for name, data in _members(reference).items()
        if name.endswith(".json")
    }
    assert all(labels[i] == metas[keys[i]]["label"] for i in range(10))


def _part_files(directory: Path, index: int) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in directory.glob(f"train-p{index:03d}-*")}
    record = json.loads((directory / ".build" / f"p{index:03d}" / "finished.json").read_text())
    return files | {"finished.json": json.dumps(record, sort_keys=True).encode()}


def test_a_killed_part_resumes_to_the_same_shards_and_merge(base_args, unmerged, merged, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(unmerged, out)
    shutil.rmtree(out / ".build" / "p002")
    for path in out.glob("train-p002-*"):
        path.unlink()
    args = [*_option(base_args, "--workers", "1"), "--out", str(out)]
    marker = out / ".build" / "p002" / "done" / "000000.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shards.build", *args, "--part", f"2/{PARTS}"],
        env=module_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the part and its ffmpeg, mid-way
    proc.wait()
    assert marker.exists(), proc.stderr.read().decode()
    assert not (out / ".build" / "p002" / "finished.json").exists(), "the part finished before it could be killed"

    refused = subprocess.run(
        [sys.executable, "-m", "shards.merge", str(out)], env=module_env(), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "part 2/3 is unfinished (1 shard(s) done" in refused.stderr
    assert not (out / fmt.MANIFEST_NAME).exists()

    # The resume takes its part from a Slurm array task (--array=1-3: ids 1..3, this one the third).
    slurm = {
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_MAX": "3",
        "SLURM_ARRAY_TASK_COUNT": "3",
        "SLURM_ARRAY_TASK_STEP": "1",
    }
    resumed = subprocess.run(
        [sys.executable, "-m", "shards.build", *args],
        env=module_env() | slurm,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: keeping 1 finished shard(s)" in resumed.stdout and "part 2/3" in resumed.stdout
    assert _part_files(out, 2) == _part_files(unmerged, 2)
    assert merge_main([str(out)]) == 0
    assert build_files(out) == build_files(merged[0])  # every tar, index, failures.jsonl and the manifest


def _one_line_refusal(out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "shards.merge", str(out)], env=module_env(), capture_output=True, text=True, timeout=120
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (out / fmt.MANIFEST_NAME).exists() and (out / ".build").is_dir()  # nothing merged, nothing lost
    return lines[0]


def test_merge_refuses_a_missing_unfinished_running_or_foreign_part_in_one_line(unmerged, tmp_path):
    missing = tmp_path / "missing"
    shutil.copytree(unmerged, missing)
    shutil.rmtree(missing / ".build" / "p001")
    line = _one_line_refusal(missing)
    assert f"part 1/3 is missing (no {missing / '.build' / 'p001'}/)" in line and "--part I/3" in line

    unfinished = tmp_path / "unfinished"
    shutil.copytree(unmerged, unfinished)
    (unfinished / ".build" / "p000" / "finished.json").unlink()
    assert "part 0/3 is unfinished (2 shard(s) done, no finished.json)" in _one_line_refusal(unfinished)

    running = tmp_path / "running"
    shutil.copytree(unmerged, running)
    lock = BuildLocks(running, (2, PARTS))
    lock.acquire()
    try:
        line = _one_line_refusal(running)
    finally:
        lock.release()
    assert f"part builds are writing here (a build of part 2/3: pid {os.getpid()} on " in line

    foreign = tmp_path / "foreign"
    shutil.copytree(unmerged, foreign)
    params_path = foreign / ".build" / "p001" / "params.json"
    params = json.loads(params_path.read_text())
    params["params"]["short_side"] = 128
    params_path.write_text(json.dumps(params))
    assert (
        "part 1/3 was built with other settings or inputs than part 0/3 (short_side: 96 -> 128)"
        in _one_line_refusal(foreign)
    )


def test_parts_share_the_directory_but_not_a_part(tmp_path, base_args, run_module):
    first, second = BuildLocks(tmp_path, (0, PARTS)), BuildLocks(tmp_path, (1, PARTS))
    first.acquire()
    second.acquire()  # two parts side by side
    try:
        with pytest.raises(BuildLocked, match=r"a build of part 0/3 is writing here \(pid \d+ on "):
            BuildLocks(tmp_path, (0, PARTS)).acquire()
        with pytest.raises(
            BuildLocked,
            match=r"part builds are writing here \(a build of part 0/3: pid .*; a build "
            r"of part 1/3: pid ",
        ):
            BuildLocks(tmp_path).acquire()  # a one-machine build or a merge waits for every part
        proc = run_module("shards.build", *base_args, "--out", tmp_path, "--part", "0/3")
        assert proc.returncode == 1 and "a build of part 0/3 is writing here" in proc.stderr
    finally:
        second.release()
        first.release()
    whole = BuildLocks(tmp_path)
    whole.acquire()
    try:
        with pytest.raises(BuildLocked, match="another build is writing here"):
            BuildLocks(tmp_path, (2, PARTS)).acquire()
    finally:
        whole.release()


def test_a_one_machine_build_refuses_a_directory_with_parts(unmerged, base_args, tmp_path, run_module):
    out = tmp_path / "train"
    shutil.copytree(unmerged, out)
    proc = run_module("shards.build", *base_args, "--out", out)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "holds parts of a partitioned build (p000, p001, p002" in proc.stderr and "shards.merge" in proc.stderr
    proc = run_module("shards.build", *base_args, "--out", out, "--part", "1/4")
    assert proc.returncode == 1 and "holds part p000 of a build in 3 parts, not 4" in proc.stderr


def test_part_numbers_from_the_command_line_and_slurm():
    assert resolve_part("2/5", {"SLURM_ARRAY_TASK_ID": "0"}) == (2, 5)  # --part wins
    assert resolve_part("none", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"}) is None
    assert resolve_part(None, {}) is None
    array = {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"}
    assert [slurm_part(array | {"SLURM_ARRAY_TASK_ID": str(t)}) for t in (1, 8)] == [(0, 8), (7, 8)]
    stepped = {
        "SLURM_ARRAY_TASK_COUNT": "4",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": "6",
        "SLURM_ARRAY_TASK_STEP": "2",
        "SLURM_ARRAY_TASK_ID": "4",
    }
    assert slurm_part(stepped) == (2, 4)
    with pytest.raises(ValueError, match="not one evenly spaced range"):
        slurm_part(
            {
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "5",
                "SLURM_ARRAY_TASK_STEP": "1",
                "SLURM_ARRAY_TASK_ID": "4",
            }
        )  # --array=1,4,5
    for bad in ("3/3", "1/0", "a/b", "2"):
        with pytest.raises(ValueError, match="--part"):
            resolve_part(bad, {})
    sizes = [end - start for start, end in (part_range(10, i, 4) for i in range(4))]
    assert sizes == [2, 3, 2, 3] and part_range(2, 0, 3) == (0, 0)  # more parts than videos: empty parts


def _fake_shard(directory: Path, ids: list[int], sources: list[str]) -> Path:
    writer = ShardWriter(directory, "t-p001-000000.tar", directory)
    for sample_id, source in zip(ids, sources):
        key = f"k{sample_id}"
        meta = {"key": key, "label": 1, "num_frames": 5, "sample_id": sample_id, "source": source}
        writer.add_sample(
            key,
            [
                ("ivf", b"\1" * 700),
                ("cls", b"1"),
                ("json", fmt.pack_meta(meta)),
                ("info", fmt.pack_info(5, 1, sample_id)),
            ],
        )
    writer.close()
    return directory / "t-p001-000000.tar"


def _json_members(tar_path: Path) -> list[bytes]:
    with tarfile.open(tar_path) as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".json")]


def test_renumbering_rewrites_ids_in_place_and_is_idempotent(tmp_path):
    # Sample 2's json is 513 bytes with id 11: at id 9 it would free a block, so it keeps its size with a space.
    base = fmt.pack_meta({"key": "k11", "label": 1, "num_frames": 5, "sample_id": 11, "source": ""})
    tar_path = _fake_shard(tmp_path, [10, 11], ["/videos/a.mp4", "x" * (513 - len(base))])
    size = tar_path.stat().st_size
    new_sha = patch_shard_ids(tar_path, 10, 8)
    assert tar_path.stat().st_size == size and sha256_file(tar_path) == new_sha
    first, second = _json_members(tar_path)
    assert first == fmt.pack_meta({**json.loads(first), "sample_id": 8})  # shorter by a digit, exactly as built
    assert len(second) == 513 and second.endswith(b"} ") and json.loads(second)["sample_id"] == 9
    problems, count = check_shard_members(tar_path, Path(fmt.index_path_for(tar_path)), lambda sample: None)
    assert problems == [] and count == 2  # the rewritten index matches the tar
    with tarfile.open(tar_path) as tar:
        assert [fmt.unpack_info(tar.extractfile(m).read())["sample_id"] for m in tar if m.name.endswith(".info")] == [
            8,
            9,
        ]
    before = tar_path.read_bytes()
    assert patch_shard_ids(tar_path, 10, 8) == new_sha and tar_path.read_bytes() == before  # a re-run: same bytes
    with pytest.raises(ValueError, match="holds sample_id 8, expected 20"):
        patch_shard_ids(tar_path, 20, 18)
