"""Tube masks generated inside the DALI graph (no Python callback).

For each view, a uniform random score per spatial token is ranked by pairwise comparison (ties broken by token
index, so the ranks are a permutation); the `masked_per_slot` lowest-ranked tokens are masked, and that spatial
pattern is repeated at every temporal slot: exactly what the official TubeMaskingGenerator does with
`np.random.shuffle` (int(ratio * H/p * W/p) masked per slot, the same pattern for all T/tubelet slots).

Layout: `mask: bool[K, N]` per sample, N = T/tubelet * (H/patch * W/patch), token order (t, h, w), True = masked.
The scores are drawn outside any conditional branch so a skipped (fast-forwarded) batch advances the random state
exactly as a decoded one does.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types


def tube_mask_scores(num_views: int, spatial_tokens: int):
    """Random scores float[K, S] per sample (draw this outside conditional branches)."""
    return fn.random.uniform(range=[0.0, 1.0], shape=[num_views, spatial_tokens])


def tube_mask_from_scores(
    scores, num_views: int, spatial_tokens: int, temporal_slots: int, masked_per_slot: int, device: str = "cpu"
):
    """bool[K, T' * S]: the `masked_per_slot` lowest scores of each view masked, tiled over T' temporal slots.
    `scores` and the result live on `device` ("cpu" or "gpu")."""
    k, s = num_views, spatial_tokens
    const_device = "gpu" if device == "gpu" else "cpu"
    mine = fn.reshape(scores, shape=[k, s, 1])
    other = fn.reshape(scores, shape=[k, 1, s])
    earlier = types.Constant(np.tril(np.ones((s, s), dtype=np.uint8), k=-1)[None], device=const_device)  # j < i
    beats = fn.cast(other < mine, dtype=types.UINT8) + fn.cast(other == mine, dtype=types.UINT8) * earlier
    rank = fn.reductions.sum(fn.cast(beats, dtype=types.INT32), axes=[2])  # [K, S], a permutation of 0..S-1
    masked = fn.cast(rank < masked_per_slot, dtype=types.UINT8)
    slots = types.Constant(np.ones((1, temporal_slots, 1), dtype=np.uint8), device=const_device)
    tiled = fn.reshape(masked, shape=[k, 1, s]) * slots
    return fn.cast(fn.reshape(tiled, shape=[k, temporal_slots * s]), dtype=types.BOOL)
