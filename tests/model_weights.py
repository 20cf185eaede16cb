"""Test helper: fully random weights, so that parity tests compare every parameter's effect (initial values such
as zero biases and unit norms would hide a mis-mapped tensor)."""

import torch


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Norm weights near 1, everything else small Gaussian noise, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ("norm" in name and name.endswith("weight")) else 0.05 * noise)
