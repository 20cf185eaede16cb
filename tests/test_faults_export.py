"""`model.export_hf` never deletes what it reads (issue 24, item 4).

`--out` equal to the run directory (or a directory holding it) with `--overwrite` used to replace that directory
by the export: checkpoints, metrics and logs gone. Now one line, exit 2, and every file of the run is still there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_model_export_hf import NAMES, our_model

from model.checkpoint import model_payload, save_checkpoint
from model.export_hf import main


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    ours = our_model("classify", 21, NAMES)
    run = tmp_path / "runs" / "ft"
    for step in (5, 10):
        save_checkpoint(model_payload("classify", ours.cfg, ours, ours.class_names), run, step=step)
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    (run / "tb").mkdir()
    (run / "tb" / "events").write_bytes(b"x" * 100)
    return run


@pytest.mark.parametrize("which", ["run", "parent", "checkpoint_dir_of_file", "hf_dir"])
def test_an_out_that_is_or_holds_the_checkpoint_is_refused(run_dir, tmp_path, capsys, which):
    checkpoint, out = run_dir, run_dir
    if which == "parent":
        out = run_dir.parent
    elif which == "checkpoint_dir_of_file":
        checkpoint = run_dir / "checkpoint-00000010.pt"
    elif which == "hf_dir":  # an export read back and written over itself
        assert main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
        checkpoint = out = tmp_path / "hf"
    capsys.readouterr()
    before = _files(tmp_path)
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out} would replace"), err
    assert _files(tmp_path) == before  # nothing deleted, nothing written


def test_an_out_inside_the_run_directory_is_fine(run_dir, capsys):
    assert main(["--checkpoint", str(run_dir), "--out", str(run_dir / "hf")]) == 0
    assert (run_dir / "checkpoint-00000010.pt").is_file() and (run_dir / "hf" / "config.json").is_file()
