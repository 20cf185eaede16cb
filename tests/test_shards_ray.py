"""`shards.build --executor ray` (issue 15): the transcodes run as Ray tasks on a local Ray instance started here
(2 CPUs), and the output is byte-identical to the process pool's; failures and timeouts are recorded as they are
locally, a failure of our own side on a Ray worker stops the build, and the window of tasks in flight is bounded.
The instance is shut down at the end, and no process of it may be left."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import module_env
from test_shards_build import build_files, read_failures

from shards import format as fmt
from shards.build import main as build_main
from shards.executors import ray_ordered_transcodes
from shards.transcode import EncodeSettings

GONE_WITHIN_S = 30  # a deadline for Ray's processes to be gone, not a performance claim


def _processes_with(needle: str) -> list[str]:
    """`pid: command line` of every live process whose command line contains `needle`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
            if needle in command and int(pid) != os.getpid():
                found.append(f"{pid}: {command[:200]}")
    return found


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance for this module; afterwards every process of its session must be gone."""
    import ray

    workers_before = set(_processes_with("ray::"))  # Ray renames its workers "ray::IDLE", "ray::<task>"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    session = Path(ray._private.worker._global_node.get_session_dir_path()).name  # in its daemons' command lines
    yield ray
    ray.shutdown()
    deadline = time.monotonic() + GONE_WITHIN_S
    while (
        left := _processes_with(session) + sorted(set(_processes_with("ray::")) - workers_before)
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"Ray processes left after shutdown: {left}"


def _out(args: list[str], out: Path) -> list[str]:
    i = args.index("--out")
    return [*args[:i], "--out", str(out), *args[i + 2 :]]


def test_ray_build_is_byte_identical_to_the_local_build(ray_instance, shard_dirs, shard_build_args, tmp_path):
    out = tmp_path / "train"
    assert build_main([*_out(shard_build_args["train"], out), "--executor", "ray"]) == 0
    assert build_files(out) == build_files(shard_dirs["train"])  # every tar, index, failures.jsonl, the manifest


def test_ray_records_failures_and_timeouts_as_the_local_build(ray_instance, synth_root, tmp_path):
    videos = sorted(synth_root.glob("train/*/*.mp4"))[:3]
    (tmp_path / "notes.mp4").write_text("not a video\n")
    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)  # ffmpeg waits for a writer that never comes: a timeout
    listing = tmp_path / "videos.list"
    listing.write_text(
        "".join(f"{v}\t{v.parent.name}\n" for v in videos) + f"{tmp_path / 'notes.mp4'}\tjunk\n{fifo}\tjunk\n"
    )
    common = [
        "--list",
        str(listing),
        "--split",
        "train",
        "--short-side",
        "64",
        "--timeout",
        "2",
        "--workers",
        "2",
        "--samples-per-shard",
        "2",
        "--quiet",
    ]
    assert build_main([*common, "--out", str(tmp_path / "local")]) == 0
    assert build_main([*common, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert build_files(tmp_path / "ray") == build_files(tmp_path / "local")
    reasons = {Path(f["source"]).name: f["reason"] for f in read_failures(tmp_path / "ray")}
    assert "not a readable video" in reasons["notes.mp4"] and "timed out after 2 s" in reasons["hangs.mp4"]
    assert fmt.read_manifest(tmp_path / "ray")["num_samples"] == 3


def test_ffmpeg_killed_on_a_ray_worker_stops_the_build(ray_instance, synth_root, tmp_path, capsys):
    videos = sorted(synth_root.glob("train/*/*.mp4"))[:2]
    fifo = tmp_path / "blocks.mp4"
    os.mkfifo(fifo)
    listing = tmp_path / "videos.list"
    listing.write_text("".join(f"{v}\t{v.parent.name}\n" for v in videos) + f"{fifo}\tblocked\n")
    out = tmp_path / "out"
    outcome: dict = {}
    args = [
        "--list",
        str(listing),
        "--split",
        "train",
        "--out",
        str(out),
        "--short-side",
        "64",
        "--quiet",
        "--executor",
        "ray",
    ]
    build = threading.Thread(target=lambda: outcome.update(code=build_main(args)))
    build.start()
    deadline = time.monotonic() + 120
    while (
        not (blocked := [p for p in _processes_with(str(fifo)) if "ffmpeg" in p])
        and build.is_alive()
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert blocked, f"no ffmpeg on {fifo} (build exit {outcome.get('code')})"
    os.kill(int(blocked[0].split(":")[0]), signal.SIGKILL)  # from outside: not the video's fault
    build.join(120)
    assert outcome.get("code") == 75
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"ffmpeg was killed by SIGKILL while transcoding {fifo}" in errors[0], errors
    assert not (out / fmt.FAILURES_NAME).exists()  # nothing recorded against any video


class _CountingFeed:
    """Items whose iteration counts how many were taken."""

    def __init__(self, items: list) -> None:
        self.items, self.taken = items, 0

    def __iter__(self):
        for item in self.items:
            self.taken += 1
            yield item


def test_ray_tasks_in_flight_stay_within_the_window(ray_instance, tmp_path):
    from shards.inputs import VideoInput

    items = [VideoInput(source=str(tmp_path / f"missing{i}.mp4"), label_name="x", key=f"missing{i}") for i in range(12)]
    feed = _CountingFeed(items)
    ordered = ray_ordered_transcodes(feed, EncodeSettings(short_side=64), str(tmp_path), window=3)
    seen = []
    for consumed, (item, result) in enumerate(ordered, start=1):
        assert feed.taken <= consumed + 3  # never more than the window ahead of the consumer
        seen.append((item.key, result.ok, result.reason))
        if consumed == 5:
            break
    ordered.close()  # cancels the tasks still in flight
    assert seen == [(f"missing{i}", False, "file not found") for i in range(5)]
    assert feed.taken == 8  # 5 consumed + the window


def test_missing_ray_is_a_one_line_error(tmp_path, synth_root):
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = module_env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env["PYTHONPATH"]])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shards.build",
            "--csv",
            str(synth_root / "train.csv"),
            "--root",
            str(synth_root),
            "--split",
            "train",
            "--out",
            str(tmp_path / "out"),
            "--executor",
            "ray",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--executor ray: Ray is not installed" in proc.stderr and "videomae-fast[ray]" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
