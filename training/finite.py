"""No checkpoint of non-finite weights: the check `Trainer.save` makes before every save.

A finite loss does not mean finite weights: with an absurd learning rate (optim.lr=1e308) the update of a step whose
loss was finite overflows, and the next save would write NaN everywhere and end "finished". Every floating parameter
and buffer of the model (and of its EMA) is checked on its device, with one host sync per save.
"""

from __future__ import annotations

import torch
from torch import nn


def first_nonfinite(modules: dict[str, nn.Module | None]) -> str | None:
    """The name ("model.blocks.0.attn.qkv.weight", "model_ema....") of the first floating parameter or buffer of
    `modules` (name -> module, None ones skipped) holding a NaN or an infinity; None when all are finite."""
    names, flags = [], []
    for prefix, module in modules.items():
        if module is None:
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point():
                names.append(f"{prefix}.{name}")
                flags.append(torch.isfinite(tensor).all())
    if not flags:
        return None
    finite = torch.stack(flags).cpu()  # the one host sync
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None
