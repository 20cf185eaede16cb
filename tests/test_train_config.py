"""Configuration errors: one line, before any compute (nothing is built, no run directory is made)."""

import subprocess
import sys
from pathlib import Path

import pytest

import train
from model import VideoMAEClassifier, VideoMAEConfig
from model.checkpoint import model_payload, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ["data.source=synthetic", "data.synthetic_samples=8", "data.synthetic_classes=3", "data.num_frames=2",
             "data.input_size=16", "model.overrides={patch_size: 8, depth: 1, embed_dim: 16, num_heads: 1}"]


def test_published_configs_pass_every_check(shard_dirs):
    """Each recipe with its data paths pointed at the test shards: keys, types, pipeline options, model sizes."""
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"pretrain_vitb_k400", "finetune_vitb_k400", "eval_vitb_k400", "demo_pretrain",
                                       "demo_finetune", "demo_eval"}
    for path in paths:
        mode = next(m for m in ("pretrain", "finetune", "eval") if m in path.stem)
        local = [f"data.train={shard_dirs['train']}", f"data.val={shard_dirs['val']}", "data.batch_size=2",
                 "model.pretrained=null"]
        cfg = train.load_config(str(path), local)
        # eval needs weights; its data and model settings are checked the way fine-tuning checks them
        facts = train.check_config(cfg, "finetune" if mode == "eval" else mode)
        assert facts["num_samples"] == 12, path


def test_overrides_are_typed():
    cfg = train.load_config(None, ["optim.lr=1e-3", "optim.betas=[0.9, 0.95]", "run.ema=true",
                                   "model.num_classes=7", "optim.clip_grad=null", "data.options.erase_prob=0.5"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.9, 0.95] and cfg.run.ema is True
    assert cfg.model.num_classes == 7 and cfg.optim.clip_grad is None and cfg.data.options == {"erase_prob": 0.5}


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["trainer.x=1"], "unknown config key 'trainer'"),
    (["data.batch_size=eight"], "data.batch_size must be int"),
    (["run.ema=1"], "run.ema must be bool"),
    (["optim.lr"], "is not key=value"),
])
def test_bad_keys_and_values(overrides, message):
    with pytest.raises(train.ConfigError, match=message) as e:
        train.load_config(None, overrides)
    assert "\n" not in str(e.value)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def assert_one_line_error(proc, message, out_dir):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:") and message in lines[0], proc.stderr
    assert not out_dir.exists()  # failed before building anything


def test_cli_unknown_key_fails_before_compute(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("pretrain", f"run.out_dir={out}", "optim.warmup_epoch=3", *SYNTHETIC, cwd=tmp_path)
    assert_one_line_error(proc, "unknown config key 'optim.warmup_epoch'", out)


def test_cli_missing_shards(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("pretrain", f"run.out_dir={out}", f"data.train={tmp_path}/nowhere", cwd=tmp_path)
    assert_one_line_error(proc, "nowhere", out)


def test_cli_class_count_disagrees_with_checkpoint(tmp_path):
    cfg = VideoMAEConfig.from_name("small", num_frames=2, img_size=16, patch_size=8, depth=1, embed_dim=16,
                                   num_heads=1, num_classes=5)
    model = VideoMAEClassifier(cfg)
    save_checkpoint(model_payload("classify", cfg, model), tmp_path / "ft", step=1)
    out = tmp_path / "run"
    proc = run_cli("eval", f"run.out_dir={out}", f"model.pretrained={tmp_path / 'ft'}", *SYNTHETIC, cwd=tmp_path)
    assert_one_line_error(proc, "checkpoint has 5 classes but the evaluation data has 3", out)


def test_cli_stride_that_the_shards_phases_do_not_divide(tmp_path):
    import pipeline_shards as ps

    shards = ps.make_test_shards(tmp_path / "shards", [20] * 4, per_shard=2, phases=4)
    out = tmp_path / "run"
    proc = run_cli("pretrain", f"run.out_dir={out}", f"data.train={shards.directory}", "data.stride=2",
                   "data.batch_size=2", cwd=tmp_path)
    assert_one_line_error(proc, "shards stored in 4 stride phases need a stride that 4 divides, got stride=2", out)


def test_small_dataset_and_bad_enums(tmp_path):
    with pytest.raises(train.ConfigError, match="fewer than one global batch"):
        train.check_config(train.load_config(None, SYNTHETIC + ["data.batch_size=16"]), "pretrain")
    with pytest.raises(train.ConfigError, match="run.precision"):
        train.check_config(train.load_config(None, SYNTHETIC + ["run.precision=fp8"]), "pretrain")
    with pytest.raises(train.ConfigError, match="eval needs model.pretrained"):
        train.check_config(train.load_config(None, SYNTHETIC), "eval")
