"""Checkpoint files (model.checkpoint) and run state (training.checkpointing): atomic writes, keep-last-N,
weights_only loading, RNG round trips, damaged files and files that would run code."""

import random

import numpy as np
import pytest
import torch

from model.checkpoint import FORMAT, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint, unwrap_model
from training.checkpointing import capture_rng_state, newest_intact_checkpoint, restore_rng_state, set_aside


def payload(step, **extra):
    return {"format": FORMAT, "kind": "pretrain", "model": {"w": torch.full((3,), float(step))}, "step": step, **extra}


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


# ---- damaged files, and files that would run code -------------------------------------------------------------


class CreatesFile:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a crafted checkpoint can run when loaded
    with full unpickling (the pickle refers to io.open, not to this class, so it works in any process)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(path, marker, contents: dict | None = None):
    """torch.save `contents` (default: none) plus an entry whose unpickling creates the file `marker`."""
    torch.save({**(contents or {}), "args": CreatesFile(marker)}, path)
    return path


def test_crafted_pickle_is_live_but_never_run_by_the_checkpoint_readers(tmp_path):
    from model.checkpoint import stored_num_classes

    marker = tmp_path / "created-by-unpickling"
    path = crafted_checkpoint(tmp_path / "evil.pth", marker, {"model": {"head.weight": torch.zeros(3, 2)}})
    with pytest.raises(ValueError, match=r"evil\.pth: not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(
        ValueError, match=r"evil\.pth: refused: .*io\.open.*--trust-pickle.*model\.trust_pickle=true"
    ) as e:
        stored_num_classes(path)
    assert "\n" not in str(e.value)
    assert stored_num_classes(path, trust_pickle=True) is None  # the loader decides; peeking unpickles nothing
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the fixture is a working exploit: a full unpickling runs it
    assert marker.exists()


def test_empty_and_cut_off_files_fail_with_one_line(tmp_path):
    save_checkpoint(payload(1), tmp_path, 1)
    good = (tmp_path / "checkpoint-00000001.pt").read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    for name in ("empty.pt", "cut.pt"):
        with pytest.raises(ValueError, match=rf"{name}: not a readable checkpoint \(\w+Error: .+\)") as e:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)


def test_required_keys(tmp_path):
    path = save_checkpoint(payload(1), tmp_path, 1)
    assert load_checkpoint(path, required=("model", "step"))["step"] == 1
    with pytest.raises(ValueError, match=r"checkpoint-00000001\.pt: incomplete checkpoint, no optimizer, rng"):
        load_checkpoint(path, required=("model", "optimizer", "rng"))


def test_newest_intact_checkpoint_skips_damaged_newer_files(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(payload(step, optimizer={}), tmp_path, step)
    newest = tmp_path / "checkpoint-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # cut off
    (tmp_path / "checkpoint-00000003.pt").write_bytes(b"")  # empty
    torch.save({"format": FORMAT, "step": 2}, tmp_path / "checkpoint-00000002.pt")  # loads, but lacks keys
    path, ckpt, skipped = newest_intact_checkpoint(tmp_path, required=("model", "step", "optimizer"))
    assert path.name == "checkpoint-00000001.pt" and ckpt["step"] == 1
    assert [p.name for p, _ in skipped] == [
        "checkpoint-00000004.pt",
        "checkpoint-00000003.pt",
        "checkpoint-00000002.pt",
    ]
    assert "checkpoint-00000004.pt: not a readable checkpoint" in skipped[0][1]
    assert "checkpoint-00000003.pt: not a readable checkpoint (EOFError" in skipped[1][1]
    assert "checkpoint-00000002.pt: incomplete checkpoint, no model, optimizer" in skipped[2][1]
    assert all("\n" not in why for _, why in skipped)

    # set aside, a damaged file is kept but no longer counts (keep-last-N would otherwise keep it over good files)
    for bad, _ in skipped:
        assert set_aside(bad).name == bad.name + ".damaged"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000001.pt"]
    save_checkpoint(payload(2, optimizer={}), tmp_path, 2, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt"]
    assert (tmp_path / "checkpoint-00000004.pt.damaged").stat().st_size == 100

    (tmp_path / "checkpoint-00000002.pt").write_bytes(b"junk")
    assert newest_intact_checkpoint(tmp_path)[:2] == (None, None)
    assert newest_intact_checkpoint(tmp_path / "nowhere") == (None, None, [])
