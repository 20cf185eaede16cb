"""Checkpoint saves that the disk refuses or that are killed (issue 24, items 7 and 8).

A real run (train.py, the synthetic loader, the tiny ViT of test_train_runs) saves step 2; resumed under a file-size
limit smaller than a checkpoint (RLIMIT_FSIZE with SIGXFSZ ignored: every write past it fails with EFBIG, as a full
disk fails with ENOSPC, through the same code), its save of step 4 fails. It must end in one line naming the file and
the cause (exit 75), with step 2's checkpoint byte-identical and no temp file left. A `checkpoint-*.pt.tmp-PID` left by
a killed save is removed by the next save once PID is gone.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess

import pytest
import torch
from test_train_runs import ROOT, SYNTHETIC, train_cmd

from model.checkpoint import list_checkpoints, model_payload, save_checkpoint
from model.config import VideoMAEConfig

RUN = [*SYNTHETIC, "optim.max_steps=4", "run.log_interval=1"]


def _limited(limit: int):
    def apply() -> None:  # in the child, before exec: a disk that refuses any file past `limit` bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_refused_checkpoint_is_one_line_and_the_previous_one_stays(tmp_path):
    first = subprocess.run(
        train_cmd("pretrain", tmp_path, *RUN, "run.stop_after_steps=2"), capture_output=True, text=True, cwd=ROOT
    )
    assert first.returncode == 0, first.stderr
    (previous,) = list_checkpoints(tmp_path)
    before = previous.read_bytes()
    proc = subprocess.run(
        train_cmd("pretrain", tmp_path, *RUN, resume="auto"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        preexec_fn=_limited(len(before) // 2),
    )
    assert proc.returncode == 75, proc.stderr
    lines = proc.stderr.strip().splitlines()
    said = f"error: {tmp_path / 'checkpoint-00000004.pt'}: cannot be written ("
    assert len(lines) == 1 and lines[0].startswith(said), proc.stderr
    assert "File too large" in lines[0] and "--resume auto" in lines[0]
    assert list_checkpoints(tmp_path) == [previous] and previous.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_killed_saves_temp_file_is_removed_by_the_next_save(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"checkpoint-00000003.pt.tmp-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f"checkpoint-00000003.pt.tmp-{os.getppid()}"  # a running process's save is left alone
    live.write_bytes(b"being written")
    model = torch.nn.Linear(2, 2)
    save_checkpoint(model_payload("pretrain", VideoMAEConfig(), model), tmp_path, step=4)
    assert not stale.exists() and live.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000004.pt"]


def _mount_tmpfs(path, size: int) -> bool:
    """A tmpfs of `size` bytes at `path` (a real full disk: ENOSPC); False where this process may not mount."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays(tmp_path):
    cmd = train_cmd("pretrain", tmp_path / "run", *RUN, "run.stop_after_steps=2")
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    (previous,) = list_checkpoints(tmp_path / "run")
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, previous.stat().st_size * 3 // 2 + 65536):  # room for one checkpoint, not two
        pytest.skip("needs root to mount a small tmpfs (the RLIMIT_FSIZE test covers the same path)")
    try:
        shutil.copytree(tmp_path / "run", disk / "run")
        before = (disk / "run" / previous.name).read_bytes()
        proc = subprocess.run(
            train_cmd("pretrain", disk / "run", *RUN, resume="auto"), capture_output=True, text=True, cwd=ROOT
        )
        assert proc.returncode == 75, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "checkpoint-00000004.pt: cannot be written (No space left on device)" in lines[0]
        assert [p.name for p in list_checkpoints(disk / "run")] == [previous.name]
        assert (disk / "run" / previous.name).read_bytes() == before
        assert not [p for p in (disk / "run").iterdir() if ".tmp-" in p.name]
    finally:
        subprocess.run(["umount", str(disk)])
