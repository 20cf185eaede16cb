"""`VideoMAEConfig`: every architecture number and speed switch of the VideoMAE models in one dataclass.

The sizes follow the official VideoMAE code (github.com/MCG-NJU/VideoMAE, modeling_pretrain.py and
modeling_finetune.py): a ViT with joint space-time attention over 2x16x16 tubelets, LayerNorm eps 1e-6, q/v
biases, and a narrow decoder (4 blocks) for pretraining.

The config is stored in every checkpoint of this project (`to_dict()` / `from_dict()`), so a checkpoint alone
says how to rebuild its model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# name: (embed_dim, depth, num_heads, decoder_embed_dim, decoder_num_heads), official pretrain_videomae_* sizes
_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "small": (384, 12, 6, 192, 3),
    "base": (768, 12, 12, 384, 6),
    "large": (1024, 24, 16, 512, 8),
    "huge": (1280, 32, 16, 640, 8),
}
ATTN_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")  # SDPA kernels (torch.nn.attention.SDPBackend)
_ALIASES = {
    "s": "small",
    "b": "base",
    "l": "large",
    "h": "huge",
    "vit-s": "small",
    "vit-b": "base",
    "vit-l": "large",
    "vit-h": "huge",
}


_POSITIVE = (
    "img_size",
    "patch_size",
    "tubelet_size",
    "num_frames",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
)


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class VideoMAEConfig:
    """Architecture and speed switches of `VideoMAEPretrain` / `VideoMAEClassifier`.

    Geometry: input `video: float[B, in_chans, num_frames, img_size, img_size]` becomes
    `num_patches = (num_frames // tubelet_size) * (img_size // patch_size) ** 2` tokens in (t, h, w) order, each
    a tubelet of `tubelet_size x patch_size x patch_size` pixels.

    Speed switches (all numerically equivalent to the reference path, which is kept for testing):
      fused_attn:        attention through `F.scaled_dot_product_attention` (flash / cuDNN kernels on GPU);
                         False = explicit softmax(q k^T) v, the reference.
      fused_loss:        normalized-pixel masked MSE in one Triton kernel on CUDA (torch fallback on CPU) that
                         reads only the masked tubelets; False = the official formula over the whole video.
      sparse_embed:      pretraining embeds only the visible tubelets (a gather plus one matmul) instead of
                         running the Conv3d over every tubelet and dropping 90% of the result.
      grad_checkpointing: recompute each block in the backward pass (for L/H at large batch).
      compile_blocks:    `torch.compile` each transformer block (regional compilation: fuses LayerNorm,
                         GELU, bias and residual adds; the gathers and the loss stay eager).
      attn_backend:      which SDPA kernel `fused_attn` may use: "auto" (torch's choice), "flash", "cudnn",
                         "efficient" or "math" (torch.nn.attention.sdpa_kernel); equal results up to rounding.

    Not a speed switch but a change of objective (VideoMAE V2's dual masking, arXiv 2303.16727), off by default:
      decoder_mask_ratio: in training, the decoder reconstructs only a random subset of the masked tokens,
                         M - int(ratio * M) of the M per clip, and the loss is on those only (V2 keeps half: 0.5);
                         in eval mode (reconstructions) it predicts all of them.
    """

    img_size: int = 224
    patch_size: int = 16
    tubelet_size: int = 2
    num_frames: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # q and v biases only (no k bias), as the official checkpoints store them
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6  # LayerNorm eps in blocks and the encoder's final norm (HF configs say 1e-12)
    head_norm_eps: float | None = None  # fc_norm and decoder norm; None = norm_eps (HF uses torch's 1e-5 there)
    # pretraining decoder
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    norm_pix_loss: bool = True
    # classification head
    num_classes: int = 400
    fc_drop_rate: float = 0.0
    use_mean_pooling: bool = True
    init_scale: float = 0.001  # head weights are multiplied by this at init (official --init_scale)
    learnable_pos_emb: bool = False
    # speed switches (see docstring)
    fused_attn: bool = True
    fused_loss: bool = True
    sparse_embed: bool = True
    grad_checkpointing: bool = False
    compile_blocks: bool = False
    attn_backend: str = "auto"
    # VideoMAE V2 decoder masking (see docstring); 0 = the published VideoMAE recipe
    decoder_mask_ratio: float = 0.0

    def __post_init__(self) -> None:
        # sizes first: a zero would divide below, a negative depth would build a model with no blocks
        bad = [n for n in _POSITIVE if not _whole(getattr(self, n), 1)]
        problems = [f"{n} {getattr(self, n)!r} is not a whole number >= 1" for n in bad]
        if not _whole(self.num_classes, 0):
            problems.append(f"num_classes {self.num_classes!r} is not a whole number >= 0")
        if not (isinstance(self.mlp_ratio, (int, float)) and math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            problems.append(f"mlp_ratio {self.mlp_ratio!r} is not a finite number > 0")
        if problems:
            raise ValueError("VideoMAEConfig: " + "; ".join(problems))
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size:
            problems.append(f"num_frames {self.num_frames} is not a multiple of tubelet_size {self.tubelet_size}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            problems.append(
                f"decoder_embed_dim {self.decoder_embed_dim} is not a multiple of "
                f"decoder_num_heads {self.decoder_num_heads}"
            )
        if self.attn_backend not in ATTN_BACKENDS:
            problems.append(f"attn_backend {self.attn_backend!r} is not one of {', '.join(ATTN_BACKENDS)}")
        if not 0.0 <= self.decoder_mask_ratio < 1.0:  # NaN included
            problems.append(f"decoder_mask_ratio {self.decoder_mask_ratio} is not in [0, 1)")
        if problems:
            raise ValueError("VideoMAEConfig: " + "; ".join(problems))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> VideoMAEConfig:
        """The official size `name` ("small" | "base" | "large" | "huge", or s/b/l/h) with `overrides` applied."""
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in _SIZES:
            raise ValueError(f"unknown VideoMAE size {name!r}; expected one of {sorted(_SIZES)}")
        dim, depth, heads, dec_dim, dec_heads = _SIZES[key]
        base = dict(embed_dim=dim, depth=depth, num_heads=heads, decoder_embed_dim=dec_dim, decoder_num_heads=dec_heads)
        base.update(overrides)
        return cls.from_dict(base)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W') = (num_frames / tubelet, img / patch, img / patch)."""
        side = self.img_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def num_patches(self) -> int:
        """Tokens per clip N = T' * H' * W' (1568 for 16x224 with 2x16x16 tubelets)."""
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Values per tubelet = tubelet * patch * patch * in_chans (1536): the decoder's output width."""
        return self.tubelet_size * self.patch_size * self.patch_size * self.in_chans

    @property
    def final_head_norm_eps(self) -> float:
        return self.norm_eps if self.head_norm_eps is None else self.head_norm_eps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoMAEConfig:
        """Inverse of `to_dict`; unknown keys are an error (a checkpoint from another code version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VideoMAEConfig: unknown fields {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> VideoMAEConfig:
        return dataclasses.replace(self, **changes)
