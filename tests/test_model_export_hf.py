"""`python -m model.export_hf`: our models as transformers VideoMAE directories, checked against transformers itself.

Parity: every weight is random (`randomize_`), the exported directory is loaded with transformers'
`from_pretrained` (which must report no missing, unexpected or mis-shaped key: it would otherwise initialise the
missing ones at random and only log it), and its outputs are compared with ours in float32 on the CPU. HF takes
video as [B, T, C, H, W]; ours is [B, C, T, H, W]. Round trips go through `load_pretrained`, the import path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from model_weights import randomize_, tiny_config
from safetensors.torch import load_file

# HF-made tiny directories (transformers' own save_pretrained) and the tube-mask helper of the import parity tests
from test_model_parity_hf import hf_classifier_dir, hf_pretrain_dir, tube_mask  # noqa: F401
from transformers import VideoMAEForPreTraining, VideoMAEForVideoClassification

from model import VideoMAEConfig, build_model, load_pretrained
from model.checkpoint import model_payload, save_checkpoint
from model.export_hf import CONFIG_NAME, WEIGHTS_NAME, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HF_CLASSES = {"classify": VideoMAEForVideoClassification, "pretrain": VideoMAEForPreTraining}
NAMES = ["walk", "run", "jump", "café au lait", "x/y"]  # non-ASCII and a slash must survive JSON
# a second geometry: 32 px at 8 px patches, tubelets of 4 frames (or 1), no q/v bias, other eps and MLP ratio
DECODER_FIELDS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
ODD = dict(img_size=32, patch_size=8, num_frames=4, tubelet_size=4, qkv_bias=False, norm_eps=1e-12, mlp_ratio=2.0)


def our_model(kind: str, seed: int, class_names: list[str] | None = None, **overrides) -> torch.nn.Module:
    """A tiny model of `kind` with every weight random; `overrides` change `tiny_config`."""
    if kind == "classify":
        overrides.setdefault("num_classes", len(class_names) if class_names else 5)
    torch.manual_seed(seed)
    model = build_model(kind, tiny_config(**overrides))
    randomize_(model, seed)
    model.class_names = class_names
    return model.eval()


def save_ours(model: torch.nn.Module, kind: str, path: Path) -> Path:
    torch.save(model_payload(kind, model.cfg, model, model.class_names), path)
    return path


def export(src: Path, out: Path, *extra: str) -> Path:
    assert main(["--checkpoint", str(src), "--out", str(out), *extra]) == 0
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    return out


def hf_load(kind: str, path: Path) -> torch.nn.Module:
    """transformers' model from `path`, failing on any key it did not take from the file."""
    model, info = HF_CLASSES[kind].from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def video(cfg: VideoMAEConfig, b: int, seed: int) -> torch.Tensor:
    """float[B, C, T, H, W], standard normal (ImageNet-normalized values)."""
    return torch.randn(
        b, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed)
    )


def mask_for(cfg: VideoMAEConfig, b: int, seed: int) -> torch.Tensor:
    """bool[B, N] tube mask, three quarters of each temporal slot masked."""
    t, h, w = cfg.grid
    return tube_mask(b, h * w, t, 3 * h * w // 4, seed)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---- parity with transformers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(head_norm_eps=1e-5), dict(ODD, use_mean_pooling=False)],
    ids=["default", "hf-eps", "odd-cls-token"],
)
def test_classifier_export_matches_transformers(tmp_path, overrides):
    ours = our_model("classify", 1, NAMES, **overrides)
    out = export(save_ours(ours, "classify", tmp_path / "ours.pt"), tmp_path / "hf")
    hf = hf_load("classify", out)
    assert hf.config.id2label == dict(enumerate(NAMES))
    assert hf.config.label2id == {n: i for i, n in enumerate(NAMES)}
    assert (hf.fc_norm is not None) == ours.cfg.use_mean_pooling
    x = video(ours.cfg, 3, seed=2)
    with torch.no_grad():
        expected = ours(x)
        logits = hf(pixel_values=x.transpose(1, 2)).logits
    assert logits.shape == (3, len(NAMES))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_head_norm_eps_approximation_is_warned_and_exact_otherwise(tmp_path, caplog):
    """Our default fc_norm eps (1e-6) cannot be written; transformers then computes exactly our model with
    head_norm_eps=1e-5, and the export says so."""
    ours = our_model("classify", 3, NAMES)
    assert ours.cfg.final_head_norm_eps == 1e-6
    src = save_ours(ours, "classify", tmp_path / "ours.pt")
    with caplog.at_level(logging.WARNING, logger="model.export_hf"):
        out = export(src, tmp_path / "hf")
    assert any("fc_norm eps 1e-06 becomes 1e-05" in r.getMessage() for r in caplog.records)
    x = video(ours.cfg, 2, seed=4)
    with torch.no_grad():
        logits = hf_load("classify", out)(pixel_values=x.transpose(1, 2)).logits
        torch.testing.assert_close(logits, load_pretrained(src, head_norm_eps=1e-5)(x), rtol=1e-5, atol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.export_hf"):
        export(
            save_ours(our_model("classify", 3, NAMES, head_norm_eps=1e-5), "classify", tmp_path / "b.pt"),
            tmp_path / "hf2",
        )
    assert not caplog.records


@pytest.mark.parametrize(
    "overrides",
    [
        dict(head_norm_eps=1e-5),
        dict(ODD, tubelet_size=1, norm_pix_loss=False, decoder_embed_dim=48, decoder_num_heads=3, decoder_depth=2),
    ],
    ids=["norm-pix", "odd-raw-pix"],
)
def test_pretraining_export_matches_transformers(tmp_path, overrides):
    ours = our_model("pretrain", 5, **overrides)
    out = export(save_ours(ours, "pretrain", tmp_path / "ours.pt"), tmp_path / "hf")
    hf = hf_load("pretrain", out)
    assert hf.config.norm_pix_loss == ours.cfg.norm_pix_loss and hf.config.use_mean_pooling is False
    x, mask = video(ours.cfg, 2, seed=6), mask_for(ours.cfg, 2, seed=7)
    with torch.no_grad():
        loss, pred = ours(x, mask)
        expected = hf(pixel_values=x.transpose(1, 2), bool_masked_pos=mask)
    assert pred.shape == expected.logits.shape
    torch.testing.assert_close(expected.logits, pred, rtol=0, atol=1e-4)
    torch.testing.assert_close(expected.loss, loss, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["classify", "pretrain"])
def test_official_pth_export_matches_transformers(tmp_path, kind):
    """An official .pth (our parameter names are the official ones; no config inside) with the geometry and head
    counts passed as for `load_pretrained`."""
    ours = our_model(kind, 8, head_norm_eps=1e-5)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": ours.state_dict(), "epoch": 9}, path)
    geometry = ["--num-frames", "8", "--img-size", "64", "--num-heads", "2", "--decoder-num-heads", "2"]
    hf = hf_load(kind, export(path, tmp_path / "hf", *geometry))
    x = video(ours.cfg, 2, seed=9)
    with torch.no_grad():
        if kind == "classify":
            assert hf.config.id2label == {i: f"LABEL_{i}" for i in range(5)}  # transformers' placeholders
            torch.testing.assert_close(hf(pixel_values=x.transpose(1, 2)).logits, ours(x), rtol=0, atol=1e-4)
        else:
            mask = mask_for(ours.cfg, 2, seed=10)
            torch.testing.assert_close(
                hf(pixel_values=x.transpose(1, 2), bool_masked_pos=mask).loss, ours(x, mask)[0], rtol=0, atol=1e-4
            )


# ---- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["classify", "pretrain"])
def test_hf_directory_round_trip_is_exact(tmp_path, kind, request):
    """HF dir (transformers' save_pretrained) -> import -> export -> import: same config, bit-equal weights, same
    labels; the export holds transformers' own tensors under transformers' own names, and exporting again
    writes the same bytes."""
    hf, src = request.getfixturevalue("hf_classifier_dir" if kind == "classify" else "hf_pretrain_dir")
    first = load_pretrained(src)
    out = export(src, tmp_path / "a")
    second = load_pretrained(out)
    assert second.cfg == first.cfg
    assert second.class_names == first.class_names
    assert kind == "pretrain" or first.class_names == [f"action {i}" for i in range(7)]
    assert_same_state(first, second)

    theirs, ours = load_file(str(src / WEIGHTS_NAME)), load_file(str(out / WEIGHTS_NAME))
    assert sorted(ours) == sorted(theirs)  # incl. the q_bias / v_bias spelling save_pretrained writes
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    written = json.loads((out / CONFIG_NAME).read_text())
    original = json.loads((src / CONFIG_NAME).read_text())
    assert {k: original[k] for k in written} == written

    again = export(out, tmp_path / "b")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.parametrize("kind", ["classify", "pretrain"])
def test_own_run_directory_round_trip(tmp_path, kind):
    """Our run dir (latest checkpoint) -> export -> import: bit-equal weights, class names kept; the config
    differs only in what transformers' format fixes (head-norm eps; a pretraining encoder's pooling flag, which
    means nothing there)."""
    ours = our_model(kind, 11, NAMES if kind == "classify" else None)
    run = tmp_path / "run"
    save_checkpoint(model_payload(kind, ours.cfg, ours, ours.class_names), run, step=5)
    save_checkpoint(model_payload(kind, ours.cfg, ours, ours.class_names), run, step=10)
    back = load_pretrained(export(run, tmp_path / "hf"))
    assert type(back) is type(ours)
    assert_same_state(ours, back)
    assert back.class_names == ours.class_names
    expected = ours.cfg.replace(head_norm_eps=1e-5)
    if kind == "pretrain":
        expected = expected.replace(use_mean_pooling=False)
    unused = DECODER_FIELDS if kind == "classify" else ()  # a classifier has no decoder: not read back
    assert {k: v for k, v in dataclasses.asdict(back.cfg).items() if k not in unused} == {
        k: v for k, v in dataclasses.asdict(expected).items() if k not in unused
    }


# ---- refusals and the output directory -----------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    """Temporary directories of an export left beside its output (there must be none)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_missing_checkpoint_is_one_error_line(tmp_path, run_module):
    proc = run_module("model.export_hf", "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "hf", timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.pt" in lines[0], proc.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00not a checkpoint\xff" * 50, b"PK\x03\x04truncated zip"],
    ids=["empty", "garbage", "truncated"],
)
def test_unreadable_checkpoint_is_one_error_line(tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.pt" in err[0], err
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_unexportable_model_is_refused_before_writing(tmp_path, capsys):
    ours = our_model("classify", 12, NAMES, learnable_pos_emb=True)
    src = save_ours(ours, "classify", tmp_path / "learned.pt")
    assert main(["--checkpoint", str(src), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learned.pt" in err[0] and "learnable position embeddings" in err[0], err
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src = save_ours(our_model("classify", 13, NAMES), "classify", tmp_path / "ours.pt")
    parent = tmp_path / "exports"
    out = parent / "hf"
    out.mkdir(parents=True)
    export(src, out)  # an existing empty directory is fine
    before = (out / WEIGHTS_NAME).read_bytes()
    capsys.readouterr()  # the export's console lines (its fc_norm eps warning on stderr) are not the refusal's

    (out / "README.md").write_text("keep me")
    assert main(["--checkpoint", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(out) in err[0] and "--overwrite" in err[0]
    assert (out / "README.md").read_text() == "keep me"

    other = save_ours(our_model("classify", 14, NAMES), "classify", tmp_path / "other.pt")
    export(other, out, "--overwrite")  # replaced as a whole: the stray file is gone, the weights are new
    assert (out / WEIGHTS_NAME).read_bytes() != before
    assert leftovers(parent) == []

    (parent / "file").write_text("x")
    assert main(["--checkpoint", str(src), "--out", str(parent / "file"), "--overwrite"]) == 2
    assert "not a directory" in capsys.readouterr().err
