"""Building blocks of the VideoMAE ViT: cube embedding, sinusoidal positions, attention with q/v biases, blocks.

Parameter names follow the official VideoMAE code (modeling_finetune.py), so official checkpoints load without
renaming: `patch_embed.proj`, `blocks.{i}.norm1`, `.attn.qkv`, `.attn.q_bias`, `.attn.v_bias`, `.attn.proj`,
`.norm2`, `.mlp.fc1`, `.mlp.fc2`. The MLP and stochastic depth are timm's layers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# VideoMAEConfig.attn_backend -> the SDPA kernels allowed (None: torch's own choice among all of them)
SDPA_BACKENDS: dict[str, list[SDPBackend] | None] = {
    "auto": None,
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


def sinusoid_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed sin-cos table of the official code: float[1, num_positions, dim].

    angle(pos, j) = pos / 10000^(2 * (j // 2) / dim); even columns take sin, odd columns cos. Computed in float64
    (as the official numpy code does) and rounded once to float32.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(torch.float32).unsqueeze(0)


def tubelet_view(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """View `video: float[B, C, T, H, W]` as float[B, T', H', W', C, tubelet, patch, patch] without copying.

    Splitting a dimension is always expressible as a view, so this works for any strides (e.g. a channels-last
    batch handed over from the data pipeline).
    """
    b, c, t, h, w = video.shape
    v = video.unflatten(4, (w // patch, patch)).unflatten(3, (h // patch, patch)).unflatten(2, (t // tubelet, tubelet))
    # dims now: B, C, T', tubelet, H', patch, W', patch
    return v.permute(0, 2, 4, 6, 1, 3, 5, 7)


def gather_tubelets(video: torch.Tensor, ids: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """The tubelets `ids: int64[B, K]` (token indices in (t, h, w) order) of `video: float[B, C, T, H, W]`.

    Returns float[B, K, C, tubelet, patch, patch] (the Conv3d weight's layout), reading only those tubelets.
    """
    tv = tubelet_view(video, tubelet, patch)
    _, _, hg, wg = tv.shape[:4]
    t_idx = torch.div(ids, hg * wg, rounding_mode="floor")
    h_idx = torch.div(ids, wg, rounding_mode="floor") % hg
    w_idx = ids % wg
    b_idx = torch.arange(ids.shape[0], device=ids.device)[:, None]
    return tv[b_idx, t_idx, h_idx, w_idx]


class PatchEmbed(nn.Module):
    """Cube embedding: a Conv3d with kernel = stride = (tubelet, patch, patch).

    `forward(video: float[B, C, T, H, W]) -> float[B, N, D]` embeds every tubelet (N in (t, h, w) order);
    `forward_tokens(video, ids: int64[B, K]) -> float[B, K, D]` embeds only the tubelets `ids`, as a gather plus
    one matmul with the same weights (a non-overlapping Conv3d is exactly that matmul).
    """

    def __init__(self, in_chans: int, embed_dim: int, tubelet: int, patch: int) -> None:
        super().__init__()
        self.tubelet, self.patch = tubelet, patch
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.proj(video).flatten(2).transpose(1, 2)

    def forward_tokens(self, video: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        tubelets = gather_tubelets(video, ids, self.tubelet, self.patch).flatten(2)  # [B, K, C*t*p*p]
        return F.linear(tubelets, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv matmul, q and v biases and no k bias (official layout).

    `fused=True` runs `F.scaled_dot_product_attention` (flash / memory-efficient kernels, no [N, N] matrix in
    memory), restricted to the kernels of `backend` (a key of SDPA_BACKENDS: "cudnn" is cuDNN's attention, which
    torch ranks below flash by default; "flash" and "math" also run on the CPU); `fused=False` is the explicit
    reference softmax((q * scale) k^T) v.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, fused: bool = True, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.backends = SDPA_BACKENDS[backend]
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float[B, N, dim] -> float[B, N, dim]."""
        b, n, c = x.shape
        bias = None
        if self.q_bias is not None:
            # the k bias is a constant zero so that one matmul with one bias vector yields q, k and v
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        if self.fused:
            with sdpa_kernel(self.backends) if self.backends else contextlib.nullcontext():
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        fused_attn: bool = True,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, fused=fused_attn, backend=attn_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def make_blocks(
    dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    drop_path_rate: float,
    norm_eps: float,
    fused_attn: bool,
    compile_blocks: bool,
    attn_backend: str = "auto",
) -> nn.ModuleList:
    """`depth` blocks with the official linearly increasing drop-path rates 0 .. drop_path_rate."""
    rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth > 0 else []
    blocks = nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias, r, norm_eps, fused_attn, attn_backend) for r in rates
    )
    if compile_blocks:
        for blk in blocks:
            blk.compile()  # regional compilation: identical blocks share one compiled graph
    return blocks


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Apply `blocks` in order; with `grad_checkpointing` (and autograd on), recompute each in backward."""
    use_ckpt = grad_checkpointing and torch.is_grad_enabled() and x.requires_grad
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
    return x


def init_linear_xavier_(module: nn.Module) -> None:
    """Official pretraining init: xavier-uniform Linear weights, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_linear_trunc_normal_(module: nn.Module, std: float = 0.02) -> None:
    """Official fine-tuning init: truncated-normal(std) Linear weights, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def mask_to_ids(mask: torch.Tensor, num_masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `mask: bool[B, N]` (True = masked) into token indices `(ids_visible: int64[B, N - M],
    ids_masked: int64[B, M])`, each in increasing token order (the order of `x[~mask]` / `x[mask]`).

    Every row must mask the same number M of tokens. Knowing M on the host takes one device-to-host sync; pass
    `num_masked` to skip it (then the check that each row masks exactly M runs asynchronously on the device).
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be bool[B, N], got {mask.dtype}{list(mask.shape)}")
    n = mask.shape[1]
    counts = mask.sum(dim=1)
    if num_masked is None:
        counts_host = counts.tolist()
        num_masked = counts_host[0] if counts_host else 0
        if any(c != num_masked for c in counts_host):
            raise ValueError(
                f"every sample must mask the same number of tokens; got per-sample counts {sorted(set(counts_host))}"
            )
    elif not torch.compiler.is_compiling():
        torch._assert_async((counts == num_masked).all(), "mask rows must each mask num_masked tokens")
    # a stable sort of 0 (visible) / 1 (masked) keys lists visible tokens first, each group in token order
    ids = torch.argsort(mask.to(torch.int32), dim=1, stable=True)
    return ids[:, : n - num_masked], ids[:, n - num_masked :]


def decoder_target_ids(
    ids_masked: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """VideoMAE V2's decoder masking (random per clip): of each row's M masked tokens `ids_masked: int64[B, M]`,
    keep K = M - int(ratio * M) drawn uniformly without replacement -> int64[B, K], in increasing token order.

    The draw is torch's RNG on the ids' device (or `generator`): seeded runs repeat it, checkpoints carry it, and it
    is one kernel sequence without host syncs (safe under torch.compile and in CUDA graphs)."""
    b, m = ids_masked.shape
    keep = m - int(ratio * m)
    scores = torch.rand(b, m, device=ids_masked.device, generator=generator)
    chosen = scores.argsort(dim=1)[:, :keep].sort(dim=1).values
    return ids_masked.gather(1, chosen)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: float[B, N, D], ids: int64[B, K] -> float[B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def num_tube_masked(cfg_grid: tuple[int, int, int], mask_ratio: float) -> int:
    """Masked tokens per clip under the official tube masking: int(ratio * H'W') per temporal slot."""
    t, h, w = cfg_grid
    return int(mask_ratio * h * w) * t


__all__ = [
    "sinusoid_position_table",
    "tubelet_view",
    "gather_tubelets",
    "PatchEmbed",
    "Attention",
    "Block",
    "make_blocks",
    "run_blocks",
    "mask_to_ids",
    "decoder_target_ids",
    "gather_tokens",
    "num_tube_masked",
    "init_linear_xavier_",
    "init_linear_trunc_normal_",
]
