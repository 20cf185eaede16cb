"""Configuration errors: one line, before any compute (nothing is built, no run directory is made)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from model import VideoMAEClassifier, VideoMAEConfig, build_model
from model.checkpoint import model_payload, save_checkpoint
from training import config

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = [
    "data.source=synthetic",
    "data.synthetic_samples=8",
    "data.synthetic_classes=3",
    "data.num_frames=2",
    "data.input_size=16",
    "model.overrides={patch_size: 8, depth: 1, embed_dim: 16, num_heads: 1}",
]


def test_published_configs_pass_every_check(shard_dirs):
    """Each recipe with its data paths pointed at the test shards: keys, types, pipeline options, model sizes."""
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.stem for p in paths} >= {
        "pretrain_vitb_k400",
        "finetune_vitb_k400",
        "eval_vitb_k400",
        "demo_pretrain",
        "demo_finetune",
        "demo_eval",
    }
    for path in paths:
        mode = next(m for m in ("pretrain", "finetune", "eval") if m in path.stem)
        local = [
            f"data.train={shard_dirs['train']}",
            f"data.val={shard_dirs['val']}",
            "data.batch_size=2",
            "model.pretrained=null",
        ]
        cfg = config.load_config(str(path), local)
        # eval needs weights; its data and model settings are checked the way fine-tuning checks them
        facts = config.check_config(cfg, "finetune" if mode == "eval" else mode)
        assert facts.num_samples == 12, path


def test_overrides_are_typed():
    cfg = config.load_config(
        None,
        [
            "optim.lr=1e-3",
            "optim.betas=[0.9, 0.95]",
            "run.ema=true",
            "model.num_classes=7",
            "optim.clip_grad=null",
            "data.options.erase_prob=0.5",
        ],
    )
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.9, 0.95] and cfg.run.ema is True
    assert cfg.model.num_classes == 7 and cfg.optim.clip_grad is None and cfg.data.options == {"erase_prob": 0.5}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["trainer.x=1"], "unknown config key 'trainer'"),
        (["data.batch_size=eight"], "data.batch_size must be int"),
        (["run.ema=1"], "run.ema must be bool"),
        (["optim.lr"], "is not key=value"),
    ],
)
def test_bad_keys_and_values(overrides, message):
    with pytest.raises(config.ConfigError, match=message) as e:
        config.load_config(None, overrides)
    assert "\n" not in str(e.value)


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


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
    cfg = VideoMAEConfig.from_name(
        "small", num_frames=2, img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=1, num_classes=5
    )
    model = VideoMAEClassifier(cfg)
    save_checkpoint(model_payload("classify", cfg, model), tmp_path / "ft", step=1)
    out = tmp_path / "run"
    proc = run_cli("eval", f"run.out_dir={out}", f"model.pretrained={tmp_path / 'ft'}", *SYNTHETIC, cwd=tmp_path)
    assert_one_line_error(proc, "checkpoint has 5 classes but the evaluation data has 3", out)


def test_cli_stride_that_the_shards_phases_do_not_divide(tmp_path):
    import pipeline_shards as ps

    shards = ps.make_test_shards(tmp_path / "shards", [20] * 4, per_shard=2, phases=4)
    out = tmp_path / "run"
    proc = run_cli(
        "pretrain",
        f"run.out_dir={out}",
        f"data.train={shards.directory}",
        "data.stride=2",
        "data.batch_size=2",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "shards stored in 4 stride phases need a stride that 4 divides, got stride=2", out)


def test_cli_truncated_shard_is_a_config_error(tmp_path):
    """A tar that ends inside its last member would crash DALI (a segfault): refused before anything is built."""
    import pipeline_shards as ps

    from shards import format as fmt

    shards = ps.make_test_shards(tmp_path / "shards", [20] * 4, per_shard=2)
    index = fmt.read_index(fmt.index_path_for(shards.tars[-1]))
    end = max(entry.offset + entry.size for sample in index for entry in sample)
    data = open(shards.tars[-1], "rb").read()
    open(shards.tars[-1], "wb").write(data[: end - 100])  # the tar now ends inside its last member
    out = tmp_path / "run"
    proc = run_cli(
        "pretrain", f"run.out_dir={out}", f"data.train={shards.directory}", "data.batch_size=2", cwd=tmp_path
    )
    assert_one_line_error(proc, f"{shards.tars[-1]}: ", out)
    assert "points to byte" in proc.stderr


def test_small_dataset_and_bad_enums(tmp_path):
    with pytest.raises(config.ConfigError, match="fewer than one global batch"):
        config.check_config(config.load_config(None, SYNTHETIC + ["data.batch_size=16"]), "pretrain")
    with pytest.raises(config.ConfigError, match="run.precision"):
        config.check_config(config.load_config(None, SYNTHETIC + ["run.precision=fp8"]), "pretrain")
    with pytest.raises(config.ConfigError, match="eval needs model.pretrained"):
        config.check_config(config.load_config(None, SYNTHETIC), "eval")


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.max_steps=-5", "optim.max_steps must be at least 1, got -5"),
        ("optim.lr=-1", "optim.lr must be a finite number > 0, got -1.0"),
        ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
        ("optim.lr=.inf", "optim.lr must be a finite number > 0, got inf"),
        ("optim.betas=[0.9, 1.5]", "optim.betas must be two numbers in [0, 1)"),
        ("data.input_size=0", "data.input_size must be at least 1, got 0"),
        ("data.stride=-1", "data.stride must be at least 1, got -1"),
        ("data.mask_ratio=0", "data.mask_ratio must be in (0, 1), got 0.0"),
        ("data.mask_ratio=1", "data.mask_ratio must be in (0, 1), got 1.0"),
        # 16 px frames of 8 px patches: 4 tokens per frame slot, int(0.2 x 4) = 0 of them masked
        ("data.mask_ratio=0.2", "data.mask_ratio 0.2 masks 0 of the 4 tokens per frame slot"),
        ("data.mask_type=block", "data.mask_type must be 'tube' or 'random', got 'block'"),
        ("optim.lr=[1,", "override 'optim.lr=[1,': the value is not valid YAML: expected the node content"),
    ],
)
def test_absurd_values_are_one_line_config_errors(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert train.main(["pretrain", f"run.out_dir={out}", *SYNTHETIC, override]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("config error:") and message in line, line
    assert not out.exists()


def test_broken_yaml_file(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [1,\n")
    assert train.main(["pretrain", "--config", str(tmp_path / "bad.yaml"), *SYNTHETIC]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"config error: {tmp_path / 'bad.yaml'}: not valid YAML:") and "line 3" in line, line


def test_out_dir_that_is_or_lies_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert train.main(["pretrain", f"run.out_dir={out}", *SYNTHETIC]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == f"config error: run.out_dir {out}: {tmp_path / 'file'} is not a directory"


def test_out_dir_under_a_read_only_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):  # root writes into read-only directories: nothing to refuse there
        pytest.skip("running as root: a mode 555 directory is writable")
    assert train.main(["pretrain", f"run.out_dir={locked / 'run'}", *SYNTHETIC]) == 2
    assert capsys.readouterr().err.strip() == f"config error: run.out_dir {locked / 'run'}: {locked} is not writable"


@pytest.mark.parametrize("damage", ["garbage", "empty", "cut", "incomplete"])
def test_cli_resume_from_a_damaged_file(tmp_path, damage):
    """--resume FILE reads the file fully before anything is built; any damage is one line, exit 2."""
    cfg = VideoMAEConfig.from_name("small", num_frames=2, img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=1)
    path = save_checkpoint(model_payload("pretrain", cfg, build_model("pretrain", cfg)), tmp_path / "ckpts", step=3)
    good = path.read_bytes()
    message = f"{path}: not a readable checkpoint"
    if damage == "garbage":
        path.write_bytes(b"\x80\x02 this is no checkpoint" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "cut":
        path.write_bytes(good[: len(good) // 2])
    else:  # loads, but holds only the model: nothing to resume a run from
        message = f"{path}: incomplete checkpoint, no step, optimizer, scheduler, rng, loader"
    out = tmp_path / "run"
    proc = run_cli("pretrain", f"run.out_dir={out}", *SYNTHETIC, "--resume", path, cwd=tmp_path)
    assert_one_line_error(proc, message, out)


def test_cli_resume_auto_with_only_damaged_checkpoints_stops(tmp_path):
    """Starting afresh would overwrite the run's history: a person has to look (the files are left as they are)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-00000004.pt").write_bytes(b"")
    proc = run_cli("pretrain", f"run.out_dir={out}", *SYNTHETIC, "--resume", "auto", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == (
        f"config error: --resume auto: none of the 1 checkpoints in {out} loads (newest: "
        f"{out / 'checkpoint-00000004.pt'}: not a readable checkpoint (EOFError: empty or cut-off file)); "
        "move them away to start afresh"
    )
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-00000004.pt"]


def test_cli_pretrained_file_that_would_run_code(tmp_path):
    from test_training_checkpointing import crafted_checkpoint

    cfg = VideoMAEConfig.from_name(
        "small", num_frames=2, img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=1, num_classes=3
    )
    marker = tmp_path / "created-by-unpickling"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker, model_payload("classify", cfg, VideoMAEClassifier(cfg)))
    out = tmp_path / "run"
    proc = run_cli("finetune", f"run.out_dir={out}", f"model.pretrained={evil}", *SYNTHETIC, cwd=tmp_path)
    assert_one_line_error(proc, f"model.pretrained: {evil}: refused: it needs full unpickling, which can run code", out)
    assert "model.trust_pickle=true" in proc.stderr
    assert not marker.exists()
