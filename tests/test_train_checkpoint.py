"""Checkpoint files: atomic writes, keep-last-N, weights_only loading, RNG round trips."""

import random

import numpy as np
import pytest
import torch

from model.checkpoint import (FORMAT, capture_rng_state, latest_checkpoint, list_checkpoints, load_checkpoint,
                              restore_rng_state, save_checkpoint, unwrap_model)


def payload(step, **extra):
    return {"format": FORMAT, "kind": "pretrain", "model": {"w": torch.full((3,), float(step))}, "step": step,
            **extra}


class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_keep_last_and_latest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(payload(step), tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000030.pt", "checkpoint-00000040.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 40


def test_failed_write_leaves_previous_checkpoint_and_no_partial_file(tmp_path):
    save_checkpoint(payload(1), tmp_path, 1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(payload(2, bad=ExplodesWhenPickled()), tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000001.pt"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000001.pt"


def test_stray_temp_file_is_not_a_checkpoint(tmp_path):
    save_checkpoint(payload(5), tmp_path, 5)
    (tmp_path / "checkpoint-00000009.pt.tmp-123").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000005.pt"


def test_foreign_or_truncated_files_fail_with_one_line(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="x.pt: not a readable checkpoint") as e:
        load_checkpoint(tmp_path / "x.pt")
    assert "\n" not in str(e.value)
    torch.save({"model": {}}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="format None"):
        load_checkpoint(tmp_path / "y.pt")


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(payload(1, rng=[capture_rng_state()]), tmp_path, 1)
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "checkpoint-00000001.pt")["rng"][0])
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    assert got[:3] == expected[:3]
    torch.testing.assert_close(got[3], expected[3])


def test_unwrap_compiled_module():
    inner = torch.nn.Linear(2, 2)
    assert unwrap_model(torch.compile(inner)) is inner
