"""`apps.demo`'s closing summary: OUT/summary.json with the issue's five numbers, and the table, from the files the
steps leave behind (probe.json, eval.json, metrics.jsonl); a step that did not run gives null, not a crash."""

from __future__ import annotations

import json

from apps.demo import summary

KEYS = (
    "pretrain_heldout_loss_init",
    "pretrain_heldout_loss_final",
    "probe_top1_pretrained",
    "probe_top1_random",
    "finetune_top1",
)


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_summary_json_and_table(tmp_path):
    probe = {
        "pretrained": {"probe_top1": 0.75, "heldout_loss": 0.5},
        "random": {"probe_top1": 0.3, "heldout_loss": 1.25},
    }
    _write(tmp_path / "probe.json", json.dumps(probe))
    _write(tmp_path / "runs" / "eval" / "eval.json", json.dumps({"top1": 0.9375, "top5": 1.0, "videos": 96}))
    _write(tmp_path / "runs" / "eval_scratch" / "eval.json", json.dumps({"top1": 0.3125, "top5": 1.0, "videos": 96}))
    control = [{"step": 96, "loss": 1.39}, {"step": 960, "loss": 1.25}]
    _write(tmp_path / "runs" / "finetune_scratch" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in control))
    lines = [{"step": 48, "loss": 1.2}, {"step": 960, "loss": 0.6}]
    _write(tmp_path / "runs" / "pretrain" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    timings = {"synthetic videos": 10.0, "train shards": 20.0, "pretrain": 100.0, "probe": 9.0, "eval": 5.0}
    text = summary(tmp_path, timings, {"pretrain": 180.0, "eval": 9.0})
    got = json.loads((tmp_path / "summary.json").read_text())
    assert [got[k] for k in KEYS] == [1.25, 0.5, 0.75, 0.3, 0.9375]
    assert got["cpu_seconds"] == {"pretrain": 180.0, "eval": 9.0} and got["pretrain_train_loss"] == [1.2, 0.6]
    assert "held-out 1.250 -> 0.500 (0.40x)" in text
    assert "random 30.0% -> pretrained 75.0%" in text and "93.8%" in text
    assert "CPU user+sys 189 s" in text
    # the control: the same fine-tuning from a random encoder
    assert got["finetune_top1_no_pretraining"] == 0.3125 and got["finetune_no_pretraining_train_loss"] == [1.39, 1.25]
    assert "train 1.390 -> 1.250" in text and "31.2%" in text


def test_summary_of_a_run_that_stopped_early(tmp_path):
    text = summary(tmp_path, {"synthetic videos": 3.0})
    got = json.loads((tmp_path / "summary.json").read_text())
    assert all(got[k] is None for k in KEYS) and got["finetune_top1_no_pretraining"] is None
    assert "data" in text
