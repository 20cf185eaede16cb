"""AdamW parameter groups: weight-decay exclusions and layer-wise lr decay, checked by name and by behaviour."""

import pytest
import torch
from torch import nn

from training.optim import build_adamw, param_groups, vit_layer_id


class TinyViT(nn.Module):
    """Parameter names as in the VideoMAE classifier: patch_embed, pos_embed, blocks.i, fc_norm, head."""

    def __init__(self, depth: int = 3, dim: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, dim, (2, 4, 4), (2, 4, 4))
        self.pos_embed = nn.Parameter(torch.randn(1, 4, dim))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def no_weight_decay(self):
        return {"pos_embed"}

    def get_num_layers(self):
        return len(self.blocks)


def groups_by_name(groups):
    return {name: g for g in groups for name in g["names"]}


def test_no_decay_for_biases_norms_and_listed_names():
    by_name = groups_by_name(param_groups(TinyViT(), weight_decay=0.05))
    assert by_name["pos_embed"]["weight_decay"] == 0.0
    assert by_name["blocks.0.0.weight"]["weight_decay"] == 0.0  # LayerNorm weight (1-D)
    assert by_name["blocks.0.1.bias"]["weight_decay"] == 0.0
    assert by_name["head.bias"]["weight_decay"] == 0.0
    assert by_name["blocks.2.1.weight"]["weight_decay"] == 0.05
    assert by_name["patch_embed.proj.weight"]["weight_decay"] == 0.05
    assert by_name["head.weight"]["weight_decay"] == 0.05


def test_layer_decay_scales_follow_the_official_assigner():
    depth, decay = 3, 0.75
    by_name = groups_by_name(param_groups(TinyViT(depth), 0.05, layer_decay=decay))
    expected = {
        "patch_embed.proj.weight": 0,
        "pos_embed": 0,
        "blocks.0.1.weight": 1,
        "blocks.2.0.bias": 3,
        "fc_norm.weight": 4,
        "head.weight": 4,
    }
    for name, layer in expected.items():
        assert by_name[name]["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer)), name
    assert vit_layer_id("encoder.blocks.11.attn.qkv.weight", 12) == 12
    assert vit_layer_id("encoder.pos_embed", 12) == 0


def test_model_layer_id_for_is_preferred():
    model = TinyViT()
    model.layer_id_for = lambda name: 0  # everything in layer 0
    groups = param_groups(model, 0.05, layer_decay=0.5)
    assert {g["lr_scale"] for g in groups} == {0.5**4}


def test_weight_decay_reaches_only_decayed_params():
    """With zero gradients AdamW's only change is decoupled decay: p -= lr * wd * p on decayed params."""
    torch.manual_seed(0)
    model = TinyViT()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_adamw(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        decayed = n in ("patch_embed.proj.weight", "head.weight") or (
            n.startswith("blocks.") and n.endswith("1.weight")
        )
        expected = before[n] * (1 - 0.1 * 0.5) if decayed else before[n]
        torch.testing.assert_close(p.detach(), expected, msg=n)
    assert opt.defaults["betas"] == (0.9, 0.95)
