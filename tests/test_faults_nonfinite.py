"""Non-finite weights are never saved (issue 24, item 3).

Real runs of train.py (subprocess, the synthetic loader, the tiny ViT of test_train_runs) with optim.lr=1e308: the
warmup's first step is finite, the second update overflows. Two steps used to end "finished" with every tensor of the
final checkpoint NaN, four in an AdamW traceback. Now: one line naming the step, exit 3, no checkpoint; with
run.skip_nonfinite the save is skipped with a warning.
"""

from __future__ import annotations

import subprocess

import pytest
from test_train_runs import ROOT, SYNTHETIC, train_cmd

from model.checkpoint import list_checkpoints

HUGE_LR = ["optim.lr=1e308", "optim.lr_batch_base=0", "run.log_interval=1"]


def _train(out, *overrides) -> subprocess.CompletedProcess:
    cmd = train_cmd("pretrain", out, *SYNTHETIC, *HUGE_LR, *overrides)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize(
    "steps,said",
    [
        ("2", "error: the weights are not finite at step 2 ("),  # the final save
        ("4", "error: the update of step 1 overflows (lr "),  # AdamW's step size past float32
    ],
)
def test_a_run_whose_weights_went_nonfinite_stops_without_saving(tmp_path, steps, said):
    proc = _train(tmp_path, f"optim.max_steps={steps}", "run.ckpt_interval=1")
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(said), proc.stderr
    assert "Traceback" not in proc.stderr
    # step 1's checkpoint (lr 0 in the warmup's first step: finite) is kept, nothing after it is written
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000001.pt"]


def test_skip_nonfinite_skips_the_save(tmp_path):
    proc = _train(tmp_path, "optim.max_steps=2", "run.skip_nonfinite=true")
    assert proc.returncode == 0, proc.stderr
    assert "step 2: the weights are not finite (" in proc.stderr and "checkpoint not saved" in proc.stderr
    assert list_checkpoints(tmp_path) == []
