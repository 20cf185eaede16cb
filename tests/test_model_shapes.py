"""Every official size builds with the published parameter count and cost, and runs with the right shapes.

The full-size models are built and run on the `meta` device (shapes only, no memory, no arithmetic). Published
figures (VideoMAE paper / MODEL_ZOO, Kinetics-400, 16x224): parameters 22M / 87M / 305M / 633M and
57 / 180 / 597 / 1192 GFLOPs per view, where the paper's "FLOPs" count multiply-adds.
"""

from __future__ import annotations

import pytest
import torch

from model import VideoMAEClassifier, VideoMAEConfig, VideoMAEPretrain, build_model, flops
from model.layers import num_tube_masked, sinusoid_position_table

PUBLISHED = {  # size: (params in millions, GMACs per 16x224 view)
    "small": (22, 57),
    "base": (87, 180),
    "large": (305, 597),
    "huge": (633, 1192),
}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_sizes_on_meta_device(size):
    cfg = VideoMAEConfig.from_name(size)
    m = num_tube_masked(cfg.grid, 0.9)
    assert cfg.num_patches == 1568 and m == 1408
    with torch.device("meta"):
        clf = build_model("classify", cfg)
        pre = build_model("pretrain", cfg)
        video = torch.empty(2, 3, 16, 224, 224)
        mask = torch.zeros(2, cfg.num_patches, dtype=torch.bool)
        logits = clf(video)
        feats = clf.forward_features(video)
        loss, pred = pre(video, mask, num_masked=m)
    assert isinstance(clf, VideoMAEClassifier) and isinstance(pre, VideoMAEPretrain)
    assert logits.shape == (2, 400) and feats.shape == (2, cfg.embed_dim)
    assert loss.shape == () and pred.shape == (2, m, 1536)
    params_m = sum(p.numel() for p in clf.parameters()) / 1e6
    assert abs(params_m - PUBLISHED[size][0]) / PUBLISHED[size][0] < 0.01, params_m
    gmacs = flops.forward_flops(cfg, "classify")["total"] / 2e9
    assert abs(gmacs - PUBLISHED[size][1]) / PUBLISHED[size][1] < 0.005, gmacs
    assert clf.get_num_layers() == cfg.depth


def test_training_flops_are_three_forwards_and_count_visible_tokens_only():
    cfg = VideoMAEConfig.from_name("base")
    fwd = flops.forward_flops(cfg, "pretrain")
    assert flops.training_flops_per_clip(cfg, "pretrain") == 3 * fwd["total"]
    # the encoder works on 160 visible tokens: 12 blocks of qkv, q k^T, attn v, proj and MLP matmuls
    v, d = 160, 768
    assert fwd["encoder"] == 12 * (2 * v * d * 3 * d + 4 * v * v * d + 2 * v * d * d + 4 * v * d * 4 * d)
    assert fwd["decoder_head"] == 2 * 1408 * 384 * 1536
    assert flops.forward_flops(cfg, "pretrain", num_masked=0)["encoder"] > 9 * fwd["encoder"]


def test_sinusoid_table_matches_the_published_formula():
    table = sinusoid_position_table(50, 12)[0].double()
    pos, j = 37, 5  # odd column: cos(pos / 10000^(2 * (5 // 2) / 12))
    assert table[pos, j].item() == pytest.approx(torch.cos(torch.tensor(pos / 10000 ** (4 / 12))).item(), abs=1e-6)
    assert table[pos, 4].item() == pytest.approx(torch.sin(torch.tensor(pos / 10000 ** (4 / 12))).item(), abs=1e-6)
    assert table.shape == (50, 12)


def test_config_round_trip_and_validation():
    cfg = VideoMAEConfig.from_name("large", num_frames=8, grad_checkpointing=True)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.decoder_embed_dim, cfg.decoder_num_heads) == (
        1024,
        24,
        16,
        512,
        8,
    )
    assert VideoMAEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.num_patches == 4 * 14 * 14 and cfg.patch_dim == 1536
    with pytest.raises(ValueError, match="unknown fields"):
        VideoMAEConfig.from_dict({**cfg.to_dict(), "colour": "blue"})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VideoMAEConfig(img_size=100)
    with pytest.raises(ValueError, match="unknown VideoMAE size"):
        VideoMAEConfig.from_name("giant")


def test_layer_ids_and_no_weight_decay():
    cfg = VideoMAEConfig(
        img_size=32,
        patch_size=16,
        num_frames=2,
        embed_dim=32,
        depth=3,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        num_classes=4,
        learnable_pos_emb=True,
    )
    clf = build_model("classify", cfg)
    ids = {name: clf.layer_id_for(name) for name, _ in clf.named_parameters()}
    assert ids["pos_embed"] == 0 and ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.2.mlp.fc2.bias"] == 3
    assert ids["fc_norm.weight"] == 4 and ids["head.weight"] == 4
    assert clf.no_weight_decay() == {"pos_embed"}
    pre = build_model("pretrain", cfg)
    pids = {name: pre.layer_id_for(name) for name, _ in pre.named_parameters()}
    assert pids["encoder.blocks.1.norm1.weight"] == 2 and pids["mask_token"] == 0
    assert pids["decoder.blocks.0.attn.qkv.weight"] == 4 and pids["encoder_to_decoder.weight"] == 4
    assert pre.no_weight_decay() <= {name for name, _ in pre.named_parameters()}


def test_official_initialisation():
    cfg = VideoMAEConfig(
        img_size=32,
        patch_size=16,
        num_frames=2,
        embed_dim=64,
        depth=1,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        num_classes=10,
    )
    torch.manual_seed(0)
    pre = VideoMAEPretrain(cfg)
    w = pre.encoder.blocks[0].attn.qkv.weight  # xavier-uniform over the fused [3D, D] matrix
    assert w.abs().max() <= (6 / (64 + 192)) ** 0.5 and w.abs().max() > 0.9 * (6 / (64 + 192)) ** 0.5
    assert torch.count_nonzero(pre.encoder.blocks[0].attn.q_bias) == 0
    assert pre.mask_token.abs().max() <= 0.02 and pre.mask_token.std() > 0.005
    clf = build_model("classify", cfg)
    head_std = clf.head.weight.std().item() / cfg.init_scale  # normal(std .02) x init_scale, as official
    assert 0.016 < head_std < 0.024, head_std
    assert torch.count_nonzero(clf.head.bias) == 0 and torch.all(clf.fc_norm.weight == 1)
