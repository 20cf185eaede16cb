"""FLOP counts of the VideoMAE models, for model FLOPs utilization (MFU).

Counted: every matrix multiplication of the model, at 2 FLOPs per multiply-add:
  * cube embedding: 2 * tokens_embedded * (C * t * p * p) * D, with tokens_embedded = the visible tokens in
    pretraining (the tokens the model needs; embedding masked tubelets would be wasted work) and all N tokens
    in classification;
  * per block over n tokens of width d (mlp hidden h = mlp_ratio * d):
      qkv 2*n*d*3d, attention scores q k^T 2*n*n*d, attention-weighted values 2*n*n*d, output projection 2*n*d*d,
      MLP 2*n*d*h + 2*n*h*d;
  * pretraining: encoder over the V visible tokens, encoder_to_decoder 2*V*D*Dd, decoder blocks over all N tokens,
    the head 2*M*Dd*patch_dim over the M masked tokens only; with VideoMAE V2's decoder masking
    (`decoder_mask_ratio` r, training only) the decoder runs over the N - M + K tokens it gets (K = M - int(r * M)
    of the masked ones kept) and the head over K;
  * classification: encoder over N tokens, head 2*D*num_classes.
Not counted: LayerNorm, softmax, GELU, bias and residual adds, the loss (all O(n*d), under 1% here).
Training = 3 x forward (backward = 2 x forward: gradients w.r.t. activations and weights), the usual
convention (e.g. PaLM's MFU); attention recomputation inside flash-attention's backward is not counted as useful
work, and neither is activation-checkpointing recompute.

ViT-B, 16x224, 90% tube masking: pretraining 67.5 GFLOPs forward / 203 GFLOPs training per clip;
fine-tuning 361 GFLOPs forward (the paper's "180 GFLOPs" counts multiply-adds) / 1.08 TFLOPs training per clip.
"""

from __future__ import annotations

from .config import VideoMAEConfig
from .layers import num_tube_masked


def _block_flops(n: int, d: int, mlp_ratio: float) -> int:
    h = int(d * mlp_ratio)
    return 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * h


def forward_flops(
    cfg: VideoMAEConfig, kind: str, num_masked: int | None = None, mask_ratio: float = 0.9, mask_type: str = "tube"
) -> dict[str, int]:
    """Forward matmul FLOPs per clip in training, by part. `num_masked` defaults to the official masking at
    `mask_ratio`: tube (int(ratio * H'W') per temporal slot) or random (int(ratio * N))."""
    n = cfg.num_patches
    d = cfg.embed_dim
    parts: dict[str, int] = {}
    if kind == "pretrain":
        if num_masked is None:
            random = mask_type == "random"
            num_masked = int(mask_ratio * n) if random else num_tube_masked(cfg.grid, mask_ratio)
        m = num_masked
        v = n - m
        k = m - int(cfg.decoder_mask_ratio * m)  # masked tokens the decoder reconstructs (all of them without V2's)
        dd = cfg.decoder_embed_dim
        parts["embed"] = 2 * v * cfg.patch_dim * d
        parts["encoder"] = cfg.depth * _block_flops(v, d, cfg.mlp_ratio)
        parts["encoder_to_decoder"] = 2 * v * d * dd
        parts["decoder"] = cfg.decoder_depth * _block_flops(v + k, dd, cfg.mlp_ratio)
        parts["decoder_head"] = 2 * k * dd * cfg.patch_dim
    elif kind == "classify":
        parts["embed"] = 2 * n * cfg.patch_dim * d
        parts["encoder"] = cfg.depth * _block_flops(n, d, cfg.mlp_ratio)
        parts["head"] = 2 * d * cfg.num_classes
    else:
        raise ValueError(f"unknown kind {kind!r}")
    parts["total"] = sum(parts.values())
    return parts


def training_flops_per_clip(
    cfg: VideoMAEConfig, kind: str, num_masked: int | None = None, mask_ratio: float = 0.9, mask_type: str = "tube"
) -> int:
    """FLOPs of one training step per clip = 3 x the forward matmul FLOPs (see module docstring)."""
    return 3 * forward_flops(cfg, kind, num_masked, mask_ratio, mask_type)["total"]
