"""Values checked before any work (issue 24, items 5 and 10): one line naming the key or the file.

Labels outside the model's classes (a `.info` label of 77 in 3-class shards, model.num_classes=1 on 3-class data)
used to crash fine-tuning after its first step with an IndexError; config values that make no model or no seed
trained to "finished" or ended in tracebacks.
"""

from __future__ import annotations

import subprocess

import pipeline_shards as ps
import pytest
from test_train_runs import ROOT, train_cmd

from training.config import ConfigError, check_config, load_config

CLASSES = ["class0", "class1", "class2"]


@pytest.fixture(scope="module")
def bad_label_shards(tmp_path_factory) -> ps.TestShards:
    videos = ps.make_test_shards(tmp_path_factory.mktemp("labels") / "good", [20] * 8).videos
    videos[5].label = 77
    return ps.write_shards(tmp_path_factory.mktemp("labels") / "bad", videos, per_shard=4, classes=CLASSES)


def _check(mode: str, *overrides: str):
    return check_config(load_config(None, ["data.batch_size=2", "data.num_frames=4", *overrides]), mode)


@pytest.mark.parametrize("mode,key", [("finetune", "data.train"), ("eval", "data.val")])
def test_a_label_outside_the_classes_is_refused_before_training(bad_label_shards, mode, key, tmp_path):
    extra = ["model.pretrained=/nonexistent"] if mode == "eval" else []
    with pytest.raises(ConfigError) as error:
        _check(mode, f"{key}={bad_label_shards.directory}", f"run.out_dir={tmp_path}", *extra)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{key}: {bad_label_shards.tars[1]}: vid0005.info")
    assert "holds label 77, outside model.num_classes=3" in message


def test_fewer_model_classes_than_the_data_has_is_refused(bad_label_shards, tmp_path):
    good = ps.make_test_shards(tmp_path / "good", [20] * 8)
    with pytest.raises(ConfigError, match=r"model.num_classes=1, but data.train .* has 3 classes"):
        _check("finetune", f"data.train={good.directory}", "model.num_classes=1", f"run.out_dir={tmp_path / 'o'}")
    facts = _check("finetune", f"data.train={good.directory}", f"run.out_dir={tmp_path / 'o'}")
    assert facts.num_classes == 3  # labels 0..2 fit: no refusal


def test_train_py_says_it_in_one_line(bad_label_shards, tmp_path):
    cmd = train_cmd("finetune", tmp_path / "run", f"data.train={bad_label_shards.directory}", "data.batch_size=2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "vid0005.info holds label 77" in lines[0], proc.stderr


@pytest.mark.parametrize(
    "override,said",
    [
        ("model.overrides={depth: -1}", "model: VideoMAEConfig: depth -1 is not a whole number >= 1"),
        ("model.overrides={num_heads: 0}", "model: VideoMAEConfig: num_heads 0 is not a whole number >= 1"),
        ("model.overrides={mlp_ratio: .nan}", "model: VideoMAEConfig: mlp_ratio nan is not a finite number > 0"),
        ("run.seed=-1", "run.seed must be a whole number in [0, 2^32 - 1], got -1"),
        ("run.seed=99999999999999999999999", "run.seed must be a whole number in [0, 2^32 - 1], got 9999"),
        ("model.pretrained=/nonexistent", "model.pretrained=/nonexistent: pretraining does not read it"),
    ],
)
def test_config_values_are_refused_in_one_line_naming_the_key(override, said, tmp_path):
    synthetic = ["data.source=synthetic", "data.synthetic_samples=8", f"run.out_dir={tmp_path}"]
    with pytest.raises(ConfigError) as error:
        _check("pretrain", *synthetic, override)
    assert str(error.value).startswith(said) and "\n" not in str(error.value)


def test_train_py_refuses_a_negative_depth_before_training(tmp_path):
    cmd = train_cmd("pretrain", tmp_path, "data.source=synthetic", "model.overrides={depth: -1}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "config error: model: VideoMAEConfig: depth -1 is not a whole number >= 1"
    ], proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
