"""Test helpers for model tests: a tiny config, and fully random weights so that parity tests compare every
parameter's effect (initial values such as zero biases and unit norms would hide a mis-mapped tensor)."""

import torch

from model import VideoMAEConfig


def tiny_config(**overrides) -> VideoMAEConfig:
    """A 2-block ViT-S-shaped model on 8 x 64 x 64 clips (4 x 4 x 4 tokens): fast on a CPU."""
    base = dict(
        embed_dim=64,
        depth=2,
        num_heads=2,
        img_size=64,
        num_frames=8,
        decoder_embed_dim=32,
        decoder_num_heads=2,
        decoder_depth=1,
    )
    return VideoMAEConfig.from_name("small", **{**base, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Norm weights near 1, everything else small Gaussian noise, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ("norm" in name and name.endswith("weight")) else 0.05 * noise)
