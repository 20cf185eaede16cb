"""`apps.probe`: the linear probe and held-out pretraining loss of a pretraining checkpoint against its random
initialisation, on real shards through the DALI pipeline (CPU); bad inputs give one line and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import module_env
from model_weights import tiny_config

from apps.probe import linear_probe, main, random_masks, random_twin, tube_masks
from model import build_model
from model.checkpoint import model_payload, save_atomic

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A pretraining and a classification checkpoint of the tiny model (8 frames, 64 px, 16 px patches)."""
    out = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    cfg = tiny_config()
    save_atomic(model_payload("pretrain", cfg, build_model("pretrain", cfg)), out / "pretrain.pt")
    classify = cfg.replace(num_classes=3)
    save_atomic(model_payload("classify", classify, build_model("classify", classify)), out / "classify.pt")
    return {"pretrain": out / "pretrain.pt", "classify": out / "classify.pt"}


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def test_classifier_checkpoint_is_refused(checkpoints, shard_dirs, capsys):
    args = ["--checkpoint", checkpoints["classify"], "--train", shard_dirs["train"], "--val", shard_dirs["val"]]
    assert main([str(a) for a in args]) == 2
    _one_line_error(capsys, str(checkpoints["classify"]), "not a pretraining model")


def test_missing_files_are_refused(checkpoints, shard_dirs, tmp_path, capsys):
    missing = tmp_path / "nothing.pt"
    args = ["--checkpoint", missing, "--train", shard_dirs["train"], "--val", shard_dirs["val"]]
    assert main([str(a) for a in args]) == 2
    _one_line_error(capsys, str(missing))
    args = ["--checkpoint", checkpoints["pretrain"], "--train", tmp_path / "no_train", "--val", shard_dirs["val"]]
    assert main([str(a) for a in args]) == 2
    _one_line_error(capsys, "--train", "no_train")


def test_empty_split_is_refused(checkpoints, shard_dirs, tmp_path, capsys):
    """A split directory without shards (e.g. a build where every video failed: only failures.jsonl)."""
    empty = tmp_path / "val"
    empty.mkdir()
    (empty / "failures.jsonl").write_text("")
    args = ["--checkpoint", checkpoints["pretrain"], "--train", shard_dirs["train"], "--val", empty]
    assert main([str(a) for a in args]) == 2
    _one_line_error(capsys, str(empty))


def test_tube_masks_are_fixed_by_the_seed():
    cfg = tiny_config()
    a = tube_masks(5, cfg, 0.75, torch.Generator().manual_seed(3))
    b = tube_masks(5, cfg, 0.75, torch.Generator().manual_seed(3))
    slots, h, w = cfg.grid
    assert a.shape == (5, cfg.num_patches) and torch.equal(a, b)
    per_slot = a.view(5, slots, h * w)
    assert (per_slot.sum(-1) == int(0.75 * h * w)).all()  # the official count per temporal slot ...
    assert (per_slot == per_slot[:, :1]).all()  # ... and the same spatial pattern at every slot (tubes)


def test_random_masks_are_fixed_by_the_seed_and_not_tubes():
    cfg = tiny_config()
    a = random_masks(50, cfg, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(a, random_masks(50, cfg, 0.75, torch.Generator().manual_seed(3)))
    assert a.shape == (50, cfg.num_patches) and (a.sum(1) == int(0.75 * cfg.num_patches)).all()
    slots, h, w = cfg.grid
    per_slot = a.view(50, slots, h * w)
    assert (per_slot != per_slot[:, :1]).any()  # each slot its own pattern


def test_random_twin_is_the_training_initialisation():
    """train.py pretrain seeds torch with run.seed and builds the model: the twin must be that very model."""
    cfg = tiny_config()
    torch.manual_seed(11)
    reference = build_model("pretrain", cfg)
    twin = random_twin(build_model("pretrain", cfg), 11)
    for (name, p), q in zip(reference.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_linear_probe_against_a_known_answer():
    """Separable classes are found; labels independent of the features score near chance."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 16, generator=g)
    x[:, 0] += 6 * (y == 1)
    x[:, 1] += 6 * (y >= 2)
    x[:, 2] += 6 * (y == 3)
    assert linear_probe(x[:150], y[:150], x[150:], y[150:], 4) > 0.9
    noise = torch.randn(200, 16, generator=g)
    assert linear_probe(noise[:150], y[:150], noise[150:], y[150:], 4) < 0.5


def test_json_and_table(checkpoints, shard_dirs, tmp_path, capsys):
    """The command on real shards (random weights here): both rows, the JSON, the same numbers on a second run."""
    out = tmp_path / "probe.json"
    args = ["--checkpoint", checkpoints["pretrain"], "--train", shard_dirs["train"], "--val", shard_dirs["val"]]
    args = [str(a) for a in args] + ["--clips", "2", "--stride", "4", "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "random" in table and "pretrained" in table
    first = json.loads(out.read_text())
    assert first["train_videos"] == 12 and first["val_videos"] == 6 and first["classes"] == 3
    for name in ("pretrained", "random"):
        assert 0 <= first[name]["probe_top1"] <= 1 and first[name]["heldout_loss"] > 0
    assert main(args) == 0
    second = json.loads(out.read_text())
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in second.items() if k != "seconds"}


@pytest.fixture(scope="module")
def objects_shards(tmp_path_factory):
    """Demo-style data at test size: `shards.synth --style objects`, 4 classes x (8 train + 2 val) videos of 24
    frames at 64x48, VP9 shards with 4 stride phases (as the demo builds them)."""
    from shards.build import main as build_main
    from shards.synth import make_dataset

    root = tmp_path_factory.mktemp("objects")
    make_dataset(root / "raw", 4, 8, 2, seed=1, width=64, height=48, num_frames=24, style="objects")
    common = ["--root", str(root / "raw"), "--short-side", "48", "--phases", "4"]
    train = ["--csv", str(root / "raw" / "train.csv"), "--split", "train", "--out", str(root / "train")]
    val = ["--csv", str(root / "raw" / "val.csv"), "--split", "val", "--out", str(root / "val")]
    assert build_main([*train, *common]) == 0
    assert build_main([*val, *common, "--classes", str(root / "train" / "manifest.json")]) == 0
    return {"train": root / "train", "val": root / "val"}


def test_pretraining_lowers_the_heldout_loss(objects_shards, tmp_path, capsys):
    """A briefly pretrained checkpoint (train.py pretrain, 80 steps of a tiny ViT on demo-style shards) has a lower
    held-out pretraining loss than its own initialisation, which apps.probe rebuilds from run.seed."""
    out = tmp_path / "pretrain"
    cmd = [sys.executable, str(ROOT / "train.py"), "pretrain", f"data.train={objects_shards['train']}"]
    cmd += ["data.num_frames=4", "data.stride=4", "data.input_size=32", "data.batch_size=4", "data.device=cpu"]
    cmd += ["data.num_threads=1", "data.mask_ratio=0.75", "data.flip=false", "run.tensorboard=false"]
    cmd += ["model.name=small", "model.overrides={depth: 1, embed_dim: 32, num_heads: 2, patch_size: 8, "]
    cmd[-1] += "decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}"
    cmd += ["optim.lr_batch_base=0", "optim.lr=3e-3", "optim.max_steps=80", "optim.warmup_steps=5"]
    cmd += ["run.seed=5", "run.log_interval=40", f"run.out_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=module_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = tmp_path / "probe.json"
    args = ["--checkpoint", out, "--train", objects_shards["train"], "--val", objects_shards["val"], "--seed", "5"]
    assert main([str(a) for a in args] + ["--mask-ratio", "0.75", "--clips", "2", "--json", str(result)]) == 0
    got = json.loads(result.read_text())
    assert got["val_videos"] == 8 and got["classes"] == 4
    assert got["pretrained"]["heldout_loss"] < 0.9 * got["random"]["heldout_loss"], got
