"""Fault injection in training: a damaged newest checkpoint costs the steps since the previous one, nothing else.

A real run (train.py in a subprocess, the synthetic-motion shards, the tiny ViT of tests/test_train_runs.py) stops at
step 6 with checkpoints at steps 3 and 6. The newest is then damaged: cut off mid-file (as a full disk, a killed copy
or a bad transfer leaves it), or rewritten without its optimizer state (it loads, but cannot continue a run).
`--resume auto` must skip it with one line naming the file and the reason, set it aside, continue from step 3, and
end with exactly the weights, optimizer state and losses of an uninterrupted run.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from test_train_runs import RESUME, data, metrics, run, train_cmd  # noqa: F401 - data: the shard fixture

from model.checkpoint import list_checkpoints, load_checkpoint

# RESUME: 10 steps, drop path, lr warmup, one log line per step; checkpoints every 3 steps (the later override wins)
CKPT = [*RESUME, "run.ckpt_interval=3"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(train_cmd("pretrain", out, *data, *CKPT))
    return out


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped")
    run(train_cmd("pretrain", out, *data, *CKPT, "run.stop_after_steps=6"))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-00000003.pt", "checkpoint-00000006.pt"]
    return out


def damage(path, how: str) -> None:
    if how == "cut":
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    else:  # "incomplete": a checkpoint without optimizer state cannot continue a run exactly
        ckpt = torch.load(path, weights_only=True)
        del ckpt["optimizer"]
        torch.save(ckpt, path)


@pytest.mark.parametrize(
    "how,why", [("cut", "not a readable checkpoint ("), ("incomplete", "incomplete checkpoint, no optimizer")]
)
def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(uninterrupted, stopped, data, tmp_path, how, why):
    part = tmp_path / "run"
    shutil.copytree(stopped, part)
    newest = part / "checkpoint-00000006.pt"
    damage(newest, how)

    proc = run(train_cmd("pretrain", part, *data, *CKPT, resume="auto"))
    (skipped,) = [line for line in proc.stderr.splitlines() if line.startswith("--resume auto: skipped")]  # a warning
    assert skipped.startswith(f"--resume auto: skipped {newest}: {why}"), proc.stderr
    assert skipped.endswith("renamed to checkpoint-00000006.pt.damaged") and "\n" not in skipped
    assert f"resuming from {part / 'checkpoint-00000003.pt'} at step 3" in proc.stdout
    # set aside and kept; the run wrote step 6 again, and keep-last-3 kept the good files, not the damaged one
    assert (part / "checkpoint-00000006.pt.damaged").is_file()
    assert [p.name for p in list_checkpoints(part)] == [
        "checkpoint-00000006.pt",
        "checkpoint-00000009.pt",
        "checkpoint-00000010.pt",
    ]

    for step in (6, 10):
        a = load_checkpoint(uninterrupted / f"checkpoint-{step:08d}.pt")
        b = load_checkpoint(part / f"checkpoint-{step:08d}.pt")
        assert a["step"] == b["step"] == step and a["epoch"] == b["epoch"]
        for name, value in a["model"].items():
            torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0, msg=name)
        for pid, state in a["optimizer"]["state"].items():
            torch.testing.assert_close(b["optimizer"]["state"][pid]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0)
    # every logged loss (the stopped run's steps 1-6, then the resumed 4-10) is the uninterrupted run's
    full_loss = {m["step"]: m["loss"] for m in metrics(uninterrupted)}
    logged = metrics(part)
    assert [m["step"] for m in logged] == [*range(1, 7), *range(4, 11)]
    for m in logged:
        assert m["loss"] == pytest.approx(full_loss[m["step"]], rel=1e-5, abs=1e-7), m["step"]
