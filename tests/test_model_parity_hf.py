"""Numerical parity with transformers' VideoMAE (the independent reference) on random weights.

Each test builds a small HF model, randomizes every weight (so biases, LayerNorm affine parameters and the mask
token all matter), saves it with `save_pretrained`, loads the directory with our `load_pretrained`, and compares
outputs in float32. HF takes video as [B, T, C, H, W]; ours is [B, C, T, H, W].
"""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from model_weights import randomize_
from transformers import VideoMAEConfig as HFConfig
from transformers import VideoMAEForPreTraining, VideoMAEForVideoClassification

from model import VideoMAEClassifier, VideoMAEPretrain, load_pretrained

SMALL = dict(
    image_size=32,
    patch_size=8,
    num_frames=4,
    tubelet_size=2,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
)
DECODER = dict(
    decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=128
)


def clip(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        b,
        3,
        SMALL["num_frames"],
        SMALL["image_size"],
        SMALL["image_size"],
        generator=torch.Generator().manual_seed(seed),
    )


def tube_mask(b: int, n_per_frame: int, frames: int, masked: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        m = torch.zeros(n_per_frame, dtype=torch.bool)
        m[torch.randperm(n_per_frame, generator=g)[:masked]] = True
        rows.append(m.repeat(frames))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def hf_pretrain_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = VideoMAEForPreTraining(HFConfig(**SMALL, **DECODER, use_mean_pooling=False, norm_pix_loss=True)).eval()
    randomize_(hf, seed=1)
    path = tmp_path_factory.mktemp("hf_pretrain")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def hf_classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    labels = {i: f"action {i}" for i in range(7)}
    hf = VideoMAEForVideoClassification(
        HFConfig(**SMALL, num_labels=7, id2label=labels, label2id={v: k for k, v in labels.items()})
    ).eval()
    randomize_(hf, seed=2)
    path = tmp_path_factory.mktemp("hf_classifier")
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.parametrize("switches", [{}, dict(fused_attn=False, fused_loss=False, sparse_embed=False)])
def test_pretraining_loss_and_predictions_match_hf(hf_pretrain_dir, switches):
    hf, path = hf_pretrain_dir
    ours = load_pretrained(path, **switches)
    assert isinstance(ours, VideoMAEPretrain) and not ours.training
    video = clip()
    mask = tube_mask(2, (SMALL["image_size"] // SMALL["patch_size"]) ** 2, SMALL["num_frames"] // 2, 12, seed=3)
    with torch.no_grad():
        expected = hf(pixel_values=video.transpose(1, 2), bool_masked_pos=mask)
        loss, pred = ours(video, mask)
    assert pred.shape == expected.logits.shape
    torch.testing.assert_close(pred, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_pretraining_gradients_match_hf(hf_pretrain_dir):
    hf, path = hf_pretrain_dir
    ours = load_pretrained(path)
    video = clip(seed=4)
    mask = tube_mask(2, 16, 2, 10, seed=5)
    hf.zero_grad()
    hf(pixel_values=video.transpose(1, 2), bool_masked_pos=mask).loss.backward()
    ours(video, mask)[0].backward()
    torch.testing.assert_close(
        ours.encoder.blocks[0].attn.qkv.weight.grad,
        torch.cat(
            [
                hf.videomae.encoder.layer[0].attention.attention.query.weight.grad,
                hf.videomae.encoder.layer[0].attention.attention.key.weight.grad,
                hf.videomae.encoder.layer[0].attention.attention.value.weight.grad,
            ]
        ),
        rtol=1e-4,
        atol=1e-7,
    )
    torch.testing.assert_close(ours.mask_token.grad, hf.mask_token.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        ours.encoder.patch_embed.proj.weight.grad,
        hf.videomae.embeddings.patch_embeddings.projection.weight.grad,
        rtol=1e-4,
        atol=1e-7,
    )


@pytest.mark.parametrize("switches", [{}, dict(fused_attn=False)])
def test_classification_logits_and_labels_match_hf(hf_classifier_dir, switches):
    hf, path = hf_classifier_dir
    ours = load_pretrained(path, **switches)
    assert isinstance(ours, VideoMAEClassifier)
    assert ours.class_names == [f"action {i}" for i in range(7)]
    video = clip(b=3, seed=6)
    with torch.no_grad():
        expected = hf(pixel_values=video.transpose(1, 2)).logits
        logits = ours(video)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_pytorch_model_bin_directory_loads(hf_classifier_dir, tmp_path):
    hf, path = hf_classifier_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    state = dict(hf.state_dict())  # newer spelling: query.bias / value.bias
    # a file that also stores HF's constant sin-cos table loads when the table is the one we compute
    state["videomae.embeddings.position_embeddings"] = hf.videomae.embeddings.position_embeddings
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = load_pretrained(tmp_path)
    video = clip(b=1, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(ours(video), hf(pixel_values=video.transpose(1, 2)).logits, rtol=1e-4, atol=1e-5)
    state["videomae.embeddings.position_embeddings"] = state["videomae.embeddings.position_embeddings"] * 2
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not the fixed sin-cos table"):
        load_pretrained(tmp_path)


def test_fine_tuning_start_from_hf_pretraining(hf_pretrain_dir, caplog):
    hf, path = hf_pretrain_dir
    with caplog.at_level(logging.INFO, logger="model.load"):
        clf = load_pretrained(path, kind="classify", num_classes=11)
    assert any(
        "newly initialised" in r.message and "head.weight" in r.message and "fc_norm.weight" in r.message
        for r in caplog.records
    )
    assert clf.cfg.use_mean_pooling and clf.cfg.num_classes == 11 and clf.class_names is None
    # the encoder equals HF's: the mean of HF's last hidden state through our fresh fc_norm/head gives our logits
    video = clip(b=2, seed=8)
    with torch.no_grad():
        hidden = hf.videomae(pixel_values=video.transpose(1, 2)).last_hidden_state  # includes HF's final norm
        blocks_out = clf.forward_blocks(clf.embed(video))  # ours: mean pooling drops the encoder's final norm
        final_norm = torch.nn.functional.layer_norm(
            blocks_out,
            (SMALL["hidden_size"],),
            hf.videomae.layernorm.weight,
            hf.videomae.layernorm.bias,
            hf.config.layer_norm_eps,
        )
        torch.testing.assert_close(final_norm, hidden, rtol=1e-4, atol=1e-5)
        assert clf(video).shape == (2, 11)


def test_classifier_config_with_unrelated_decoder_sizes_loads(tmp_path):
    """A classifier has no decoder: HF configs whose (unused) decoder_* values fit neither the encoder's MLP ratio
    nor a head count load all the same (issue 15); a pretraining config like that is still refused."""
    from model import CheckpointError
    from model.loading import config_from_hf

    decoder = dict(
        decoder_hidden_size=48,
        decoder_num_hidden_layers=3,
        decoder_num_attention_heads=5,
        decoder_intermediate_size=100,
    )  # MLP ratio 100/48, not the encoder's 4; 48 heads of 5 do not fit
    torch.manual_seed(0)
    hf = VideoMAEForVideoClassification(HFConfig(**SMALL, **decoder, num_labels=3)).eval()
    randomize_(hf, seed=9)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, VideoMAEClassifier) and ours.cfg.num_classes == 3
    video = clip(b=2, seed=10)
    with torch.no_grad():
        torch.testing.assert_close(ours(video), hf(pixel_values=video.transpose(1, 2)).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="decoder_intermediate_size 100 != decoder_hidden_size x mlp ratio"):
        config_from_hf(hf.config.to_dict(), "config.json", "pretrain")
