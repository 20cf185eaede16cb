"""Pretraining masks generated inside the DALI graph (no Python callback).

For each view, a uniform random score per token is ranked by pairwise comparison (ties broken by token index, so
the ranks are a permutation) and the lowest-ranked tokens are masked:
- tube (official TubeMaskingGenerator): one score per *spatial* token; the `masked_per_slot` lowest are masked and
  that pattern is repeated at every temporal slot (int(ratio * H/p * W/p) per slot, as `np.random.shuffle` gives);
- random (official RandomMaskingGenerator): one score per token of the clip; the int(ratio * N) lowest are masked,
  so each temporal slot gets its own pattern. Ranking N scores costs N^2 comparisons per view (2.5 M for ViT-B's
  N = 1568, against 38 k for the 196 spatial tokens of a tube mask): an ablation's price, not measured at scale.

Layout: `mask: bool[K, N]` per sample, N = T/tubelet * (H/patch * W/patch), token order (t, h, w), True = masked.
The scores are drawn outside any conditional branch so a skipped (fast-forwarded) batch advances the random state
exactly as a decoded one does.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types


def mask_scores(num_views: int, tokens: int):
    """Random scores float[K, tokens] per sample (draw this outside conditional branches): `tokens` is the spatial
    token count for tube masks, all N tokens for random masks."""
    return fn.random.uniform(range=[0.0, 1.0], shape=[num_views, tokens])


def _lowest(scores, num_views: int, tokens: int, count: int, const_device: str):
    """uint8[K, tokens]: 1 where a score is among the `count` lowest of its view (ties: the lower index first)."""
    k, s = num_views, tokens
    mine = fn.reshape(scores, shape=[k, s, 1])
    other = fn.reshape(scores, shape=[k, 1, s])
    earlier = types.Constant(np.tril(np.ones((s, s), dtype=np.uint8), k=-1)[None], device=const_device)  # j < i
    beats = fn.cast(other < mine, dtype=types.UINT8) + fn.cast(other == mine, dtype=types.UINT8) * earlier
    rank = fn.reductions.sum(fn.cast(beats, dtype=types.INT32), axes=[2])  # [K, S], a permutation of 0..S-1
    return fn.cast(rank < count, dtype=types.UINT8)


def tube_mask_from_scores(
    scores, num_views: int, spatial_tokens: int, temporal_slots: int, masked_per_slot: int, device: str = "cpu"
):
    """bool[K, T' * S]: the `masked_per_slot` lowest scores (float[K, S]) of each view masked, tiled over T'
    temporal slots. `scores` and the result live on `device` ("cpu" or "gpu")."""
    k, s = num_views, spatial_tokens
    const_device = "gpu" if device == "gpu" else "cpu"
    masked = _lowest(scores, k, s, masked_per_slot, const_device)
    slots = types.Constant(np.ones((1, temporal_slots, 1), dtype=np.uint8), device=const_device)
    tiled = fn.reshape(masked, shape=[k, 1, s]) * slots
    return fn.cast(fn.reshape(tiled, shape=[k, temporal_slots * s]), dtype=types.BOOL)


def pretrain_masks(scores, cfg, device: str = "cpu"):
    """bool[K, N]: the masks of `cfg` (a PipelineConfig: mask_type, counts) from `scores` drawn by
    `mask_scores(cfg.num_repeats, mask_score_count(cfg))`."""
    if cfg.mask_type == "random":
        return random_mask_from_scores(scores, cfg.num_repeats, cfg.num_tokens, cfg.num_masked, device)
    slots = cfg.num_frames // cfg.tubelet_size
    return tube_mask_from_scores(scores, cfg.num_repeats, cfg.spatial_tokens, slots, cfg.masked_per_slot, device)


def mask_score_count(cfg) -> int:
    """Scores per view: all N tokens for random masks, the spatial tokens for tube masks."""
    return cfg.num_tokens if cfg.mask_type == "random" else cfg.spatial_tokens


def random_mask_from_scores(scores, num_views: int, num_tokens: int, num_masked: int, device: str = "cpu"):
    """bool[K, N]: the `num_masked` lowest scores (float[K, N]) of each view masked, anywhere in the clip."""
    const_device = "gpu" if device == "gpu" else "cpu"
    return fn.cast(_lowest(scores, num_views, num_tokens, num_masked, const_device), dtype=types.BOOL)
