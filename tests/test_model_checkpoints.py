"""Official VideoMAE .pth files and this project's own checkpoints load and match; mismatches stop loudly.

The official key layout is derived here from the Hugging Face conversion script
(transformers/models/videomae/convert_videomae_to_pytorch.py, which maps official names to HF names): this file
applies that mapping backwards to a random HF model, so a state dict in the official layout can be checked against
the HF model's outputs without any official checkpoint on disk.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from model_weights import randomize_
from test_training_checkpointing import crafted_checkpoint
from transformers import VideoMAEConfig as HFConfig
from transformers import VideoMAEForPreTraining, VideoMAEForVideoClassification

from model import CheckpointError, VideoMAEConfig, VideoMAEPretrain, build_model, load_pretrained
from model.checkpoint import model_payload

GEOMETRY = dict(image_size=32, patch_size=8, num_frames=4, tubelet_size=2)
ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
DECODER = dict(
    decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=128
)
# what an official .pth does not record: geometry and head counts of non-standard widths
OFFICIAL_OVERRIDES = dict(num_frames=4, img_size=32, num_heads=4, decoder_num_heads=2, head_norm_eps=1e-5)


def official_layout(hf_state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """HF state dict -> official VideoMAE names (the conversion script's rename_key run backwards)."""
    enc = "encoder." if kind == "pretrain" else ""
    block_names = {
        "attention.output.dense": "attn.proj",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "attention.attention.query.bias": "attn.q_bias",
        "attention.attention.value.bias": "attn.v_bias",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        for hf_prefix, off_prefix in (
            ("videomae.encoder.layer.", f"{enc}blocks."),
            ("decoder.decoder_layers.", "decoder.blocks."),
        ):
            if key.startswith(hf_prefix):
                idx, rest = key[len(hf_prefix) :].split(".", 1)
                base = f"{off_prefix}{idx}."
                if rest in (
                    "attention.attention.query.weight",
                    "attention.attention.key.weight",
                    "attention.attention.value.weight",
                ):
                    qkv.setdefault(base, {})[rest.split(".")[2]] = value
                else:
                    for hf_name, off_name in block_names.items():
                        if rest.startswith(hf_name):
                            out[base + off_name + rest[len(hf_name) :]] = value
                            break
                    else:
                        raise AssertionError(f"unmapped {key}")
                break
        else:
            simple = {
                "videomae.embeddings.patch_embeddings.projection.": f"{enc}patch_embed.proj.",
                "videomae.layernorm.": f"{enc}norm.",
                "classifier.": "head.",
                "fc_norm.": "fc_norm.",
                "decoder.norm.": "decoder.norm.",
                "decoder.head.": "decoder.head.",
                "encoder_to_decoder.": "encoder_to_decoder.",
                "mask_token": "mask_token",
            }
            for hf_name, off_name in simple.items():
                if key.startswith(hf_name):
                    out[off_name + key[len(hf_name) :]] = value
                    break
            else:
                raise AssertionError(f"unmapped {key}")
    for base, parts in qkv.items():
        out[base + "attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


@pytest.fixture(scope="module")
def hf_pretrain():
    torch.manual_seed(0)
    hf = VideoMAEForPreTraining(
        HFConfig(**GEOMETRY, **ENCODER, **DECODER, layer_norm_eps=1e-6, use_mean_pooling=False)
    ).eval()
    randomize_(hf, 11)
    return hf


@pytest.fixture(scope="module")
def hf_classifier():
    torch.manual_seed(0)
    hf = VideoMAEForVideoClassification(HFConfig(**GEOMETRY, **ENCODER, layer_norm_eps=1e-6, num_labels=6)).eval()
    randomize_(hf, 12)
    return hf


def clip(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def random_tube_mask(b: int, seed: int, masked: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            torch.zeros(16, dtype=torch.bool).index_fill(0, torch.randperm(16, generator=g)[:masked], True).repeat(2)
            for _ in range(b)
        ]
    )


def test_official_finetuned_pth_matches_hf(hf_classifier, tmp_path):
    state = official_layout(hf_classifier.state_dict(), "classify")
    assert "blocks.0.attn.qkv.weight" in state and "head.weight" in state and "fc_norm.weight" in state
    path = tmp_path / "checkpoint-best.pth"
    # official runs pickle their argparse Namespace beside the weights
    torch.save({"model": state, "epoch": 99, "args": argparse.Namespace(model="vit_base")}, path)
    ours = load_pretrained(path, **OFFICIAL_OVERRIDES)
    assert ours.cfg.num_classes == 6 and ours.cfg.use_mean_pooling and ours.class_names is None
    video = clip(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(video), hf_classifier(pixel_values=video.transpose(1, 2)).logits, rtol=1e-4, atol=1e-5
        )


def test_official_pretrain_pth_under_module_key_matches_hf(hf_pretrain, tmp_path):
    state = official_layout(hf_pretrain.state_dict(), "pretrain")
    assert {
        "encoder.blocks.1.attn.q_bias",
        "decoder.blocks.1.attn.v_bias",
        "encoder.norm.weight",
        "encoder_to_decoder.weight",
        "mask_token",
        "decoder.head.weight",
    } <= set(state)
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"module": {f"module.{k}": v for k, v in state.items()}}, path)  # a DDP-wrapped save
    ours = load_pretrained(path, **OFFICIAL_OVERRIDES)
    assert isinstance(ours, VideoMAEPretrain)
    video, mask = clip(2, 2), random_tube_mask(2, 3)
    with torch.no_grad():
        expected = hf_pretrain(pixel_values=video.transpose(1, 2), bool_masked_pos=mask)
        loss, pred = ours(video, mask)
    torch.testing.assert_close(pred, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_own_checkpoint_round_trip_and_fine_tuning_start(tmp_path, caplog):
    cfg = VideoMAEConfig(
        img_size=32,
        patch_size=8,
        num_frames=4,
        embed_dim=48,
        depth=2,
        num_heads=3,
        decoder_embed_dim=24,
        decoder_depth=1,
        decoder_num_heads=2,
        num_classes=3,
    )
    torch.manual_seed(0)
    clf = build_model("classify", cfg)
    with torch.no_grad():
        clf.head.weight.normal_()  # make the head matter
    path = tmp_path / "checkpoint-00000010.pt"
    torch.save({**model_payload("classify", cfg, clf, ["a", "b", "c"]), "step": 10, "optimizer": {}}, path)
    loaded = load_pretrained(path, fused_attn=False)
    assert loaded.class_names == ["a", "b", "c"] and loaded.cfg.fused_attn is False
    video = clip(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), clf.eval()(video), rtol=1e-5, atol=1e-6)

    pre = build_model("pretrain", cfg)
    path = tmp_path / "pretrain.pt"
    torch.save(model_payload("pretrain", cfg, pre), path)
    assert isinstance(load_pretrained(path), VideoMAEPretrain)
    with caplog.at_level(logging.WARNING, logger="model.load"):
        start = load_pretrained(path, kind="classify", num_classes=5)
    assert any("fine-tuning start" in r.message for r in caplog.records)
    torch.testing.assert_close(start.blocks[1].mlp.fc2.weight, pre.encoder.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(start.patch_embed.proj.bias, pre.encoder.patch_embed.proj.bias)
    assert start.head.weight.shape == (5, 48)


# ---- mismatches stop with an error naming the keys ------------------------------------------------------------


def _official_file(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


def test_missing_key_is_named(hf_classifier, tmp_path):
    state = official_layout(hf_classifier.state_dict(), "classify")
    del state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"bad\.pth.*missing keys: blocks\.1\.mlp\.fc2\.bias"):
        load_pretrained(_official_file(tmp_path, state), **OFFICIAL_OVERRIDES)


def test_unexpected_key_is_named(hf_classifier, tmp_path):
    state = official_layout(hf_classifier.state_dict(), "classify")
    state["blocks.0.attn.k_bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.0\.attn\.k_bias"):
        load_pretrained(_official_file(tmp_path, state), **OFFICIAL_OVERRIDES)


def test_shape_mismatch_is_named(hf_classifier, tmp_path):
    state = official_layout(hf_classifier.state_dict(), "classify")
    path = _official_file(tmp_path, state)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatches: head\.weight \(checkpoint \[6, 64\] vs model "
        r"\[10, 64\]\)",
    ):
        load_pretrained(path, num_classes=10, **OFFICIAL_OVERRIDES)
    # without geometry overrides the official default (16 frames, 224 px: 8 * 28 * 28 tokens of 8x8 patches)
    # does not fit a learnable position table made for 4 frames of 32 px
    state["pos_embed"] = torch.zeros(1, 32, 64)
    with pytest.raises(CheckpointError, match=r"pos_embed \(checkpoint \[1, 32, 64\] vs model \[1, 6272, 64\]\)"):
        load_pretrained(_official_file(tmp_path, state, "pos.pth"), num_heads=4)


def test_classifier_cannot_become_pretrain_model(hf_classifier, tmp_path):
    path = _official_file(tmp_path, official_layout(hf_classifier.state_dict(), "classify"))
    with pytest.raises(CheckpointError, match="no decoder"):
        load_pretrained(path, kind="pretrain", **OFFICIAL_OVERRIDES)


def test_unreadable_inputs_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="without config.json"):
        load_pretrained(tmp_path)
    torch.save({"format": "someone-else/3", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="someone-else/3"):
        load_pretrained(tmp_path / "other.pt")
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match="no 'model' or 'module'"):
        load_pretrained(tmp_path / "opt.pt")


def test_unsupported_hf_config_is_rejected(hf_classifier, tmp_path):
    hf_classifier.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"hidden_act": "gelu"', '"hidden_act": "relu"')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="hidden_act 'relu'"):
        load_pretrained(tmp_path)


# ---- files that would run code, damaged files --------------------------------------------------------------------


def test_crafted_pickle_is_refused_unless_trusted(hf_classifier, tmp_path):
    """An otherwise valid official checkpoint that also pickles a call creating a file: refused in one line naming
    the file and the opt-in, nothing run; with trust_pickle=True it loads (and the call runs: the file is live)."""
    marker = tmp_path / "created-by-unpickling"
    path = crafted_checkpoint(
        tmp_path / "evil.pth", marker, {"model": official_layout(hf_classifier.state_dict(), "classify")}
    )
    with pytest.raises(
        CheckpointError,
        match=r"evil\.pth: refused: it needs full unpickling, which can run code "
        r"\(UnpicklingError: Unsupported global: GLOBAL io\.open.*\); if you "
        r"trust this file, pass trust_pickle=True \(--trust-pickle",
    ) as e:
        load_pretrained(path, **OFFICIAL_OVERRIDES)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    model = load_pretrained(path, trust_pickle=True, **OFFICIAL_OVERRIDES)
    assert marker.exists() and model.cfg.num_classes == 6


def test_damaged_files_fail_with_one_line(hf_classifier, tmp_path):
    good = _official_file(tmp_path, official_layout(hf_classifier.state_dict(), "classify")).read_bytes()
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "cut.pth").write_bytes(good[: len(good) // 2])
    for name in ("empty.pth", "cut.pth"):
        for trust in (False, True):
            with pytest.raises(CheckpointError, match=rf"{name}: not a readable checkpoint \(\w+Error: .+\)") as e:
                load_pretrained(tmp_path / name, trust_pickle=trust, **OFFICIAL_OVERRIDES)
            assert "\n" not in str(e.value)
