"""The VideoMAE models: `VideoMAEPretrain` (masked autoencoder) and `VideoMAEClassifier` (fine-tuning / eval).

Architecture as the official code (MCG-NJU/VideoMAE modeling_pretrain.py, modeling_finetune.py), parameter names
identical to it, so official `.pth` state dicts load as they are:

  pretrain:  encoder.{patch_embed, blocks, norm}, encoder_to_decoder, mask_token, decoder.{blocks, norm, head}
  classify:  patch_embed, blocks, norm (only without mean pooling), fc_norm, head

Layouts: `video: float[B, C, T, H, W]` ImageNet-normalized; tokens N = T/t * H/p * W/p in (t, h, w) order;
`mask: bool[B, N]`, True = masked, the same count M in every row.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VideoMAEConfig
from .layers import (
    PatchEmbed,
    decoder_target_ids,
    gather_tokens,
    init_linear_trunc_normal_,
    init_linear_xavier_,
    make_blocks,
    mask_to_ids,
    run_blocks,
    sinusoid_position_table,
)
from .pixel_loss import masked_pixel_mse, masked_pixel_mse_reference, pixel_stats


class _LayerDecayMixin:
    """Layer ids for layer-wise lr decay, as the official `get_layer_id_for_vit`:
    0 = embeddings (patch_embed, pos_embed, mask_token, cls_token); i + 1 = encoder block i;
    depth + 1 = everything after the encoder (final norms, heads, decoder)."""

    cfg: VideoMAEConfig
    _encoder_prefix: str = ""

    def get_num_layers(self) -> int:
        """Encoder depth; layer ids run 0 .. depth + 1 (num_layers + 2 distinct ids)."""
        return self.cfg.depth

    def layer_id_for(self, name: str) -> int:
        """Layer id of parameter `name` (as in `named_parameters()`)."""
        if self._encoder_prefix and name.startswith(self._encoder_prefix):
            name = name[len(self._encoder_prefix) :]
        elif self._encoder_prefix and name != "mask_token":
            return self.cfg.depth + 1  # decoder side
        if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1


class VideoMAEEncoder(nn.Module):
    """Cube embedding + position table + transformer blocks (+ final LayerNorm when `final_norm`)."""

    def __init__(self, cfg: VideoMAEConfig, final_norm: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.tubelet_size, cfg.patch_size)
        if cfg.learnable_pos_emb:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            # a constant, not a weight: never in state_dict, rebuilt on construction (as the official code)
            self.register_buffer("pos_embed", sinusoid_position_table(cfg.num_patches, cfg.embed_dim), persistent=False)
        self.blocks = make_blocks(
            cfg.embed_dim,
            cfg.depth,
            cfg.num_heads,
            cfg.mlp_ratio,
            cfg.qkv_bias,
            cfg.drop_path_rate,
            cfg.norm_eps,
            cfg.fused_attn,
            cfg.compile_blocks,
            cfg.attn_backend,
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if final_norm else nn.Identity()

    def _check_input(self, video: torch.Tensor) -> None:
        c = self.cfg
        want = (c.in_chans, c.num_frames, c.img_size, c.img_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != want:
            raise ValueError(
                f"video must be float[B, C, T, H, W] = [B, {', '.join(map(str, want))}], got {list(video.shape)}"
            )

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """All tokens: float[B, N, D] (embedding + position)."""
        self._check_input(video)
        x = self.patch_embed(video)
        return x + self.pos_embed.to(x.dtype)

    def embed_visible(self, video: torch.Tensor, ids_visible: torch.Tensor) -> torch.Tensor:
        """Only the tokens `ids_visible: int64[B, K]`: float[B, K, D]."""
        self._check_input(video)
        if self.cfg.sparse_embed:
            x = self.patch_embed.forward_tokens(video, ids_visible)
        else:  # reference: embed every tubelet, then drop the masked ones
            x = gather_tokens(self.patch_embed(video), ids_visible)
        pos = self.pos_embed[0].to(x.dtype)[ids_visible]
        return x + pos

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(run_blocks(self.blocks, x, self.cfg.grad_checkpointing))


class VideoMAEDecoder(nn.Module):
    """Narrow transformer over all tokens; predicts tubelet*patch*patch*C values for the last `M` tokens."""

    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = make_blocks(
            cfg.decoder_embed_dim,
            cfg.decoder_depth,
            cfg.decoder_num_heads,
            cfg.mlp_ratio,
            cfg.qkv_bias,
            cfg.drop_path_rate,
            cfg.norm_eps,
            cfg.fused_attn,
            cfg.compile_blocks,
            cfg.attn_backend,
        )
        self.norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=cfg.final_head_norm_eps)
        self.head = nn.Linear(cfg.decoder_embed_dim, cfg.patch_dim)

    def forward(self, x: torch.Tensor, num_masked: int) -> torch.Tensor:
        """x: float[B, N, Dd] (visible tokens first, then masked) -> float[B, num_masked, patch_dim]."""
        x = run_blocks(self.blocks, x, self.cfg.grad_checkpointing)
        return self.head(self.norm(x[:, x.shape[1] - num_masked :]))


class VideoMAEPretrain(_LayerDecayMixin, nn.Module):
    """Masked video autoencoder: `forward(video, mask) -> (loss, pred)`.

    The encoder sees only the visible tokens; its output is projected to the decoder width, the masked positions
    are filled with the learned mask token, positions are added, and the decoder predicts each masked tubelet's
    normalized pixels. `loss` is the MSE against the normalized-pixel target (see `model.pixel_loss`).

    With `cfg.decoder_mask_ratio` r > 0 (VideoMAE V2's dual masking) and in training mode, the decoder gets mask
    tokens only for a random subset of the masked tokens (`decoder_target_ids`: M - int(r * M) per clip) and the loss
    covers those only: the decoder runs over N - M + K tokens instead of N.
    """

    _encoder_prefix = "encoder."

    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.class_names: list[str] | None = None
        self.encoder = VideoMAEEncoder(cfg, final_norm=True)
        self.encoder_to_decoder = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer(
            "pos_embed", sinusoid_position_table(cfg.num_patches, cfg.decoder_embed_dim), persistent=False
        )
        self.decoder = VideoMAEDecoder(cfg)
        mean, std = pixel_stats(cfg.in_chans)
        self.register_buffer("pixel_mean", torch.tensor(mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # official: xavier inside encoder and decoder; encoder_to_decoder and the Conv3d keep torch's default;
        # mask token truncated normal std .02 cut at +-1 std
        init_linear_xavier_(self.encoder)
        init_linear_xavier_(self.decoder)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names the official recipe keeps out of weight decay (besides biases and 1-D weights)."""
        names = {"mask_token"}
        if self.cfg.learnable_pos_emb:
            names.add("encoder.pos_embed")
        return names

    def forward_encoder(self, video: torch.Tensor, ids_visible: torch.Tensor) -> torch.Tensor:
        """Encoder over the visible tokens: float[B, N - M, D]."""
        return self.encoder.forward_blocks(self.encoder.embed_visible(video, ids_visible))

    def forward_pred(self, video: torch.Tensor, ids_visible: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """Predictions for the masked tokens `ids_masked: int64[B, K]` (all M of them, or the decoder's subset):
        float[B, K, patch_dim] in their order. The decoder sees the visible tokens and these mask tokens only."""
        x = self.encoder_to_decoder(self.forward_encoder(video, ids_visible))
        pos = self.pos_embed[0].to(x.dtype)
        x_full = torch.cat([x + pos[ids_visible], (self.mask_token.to(x.dtype) + pos[ids_masked])], dim=1)
        return self.decoder(x_full, ids_masked.shape[1])

    def decoder_targets(self, ids_masked: torch.Tensor) -> torch.Tensor:
        """The masked tokens the decoder reconstructs: int64[B, K] in increasing token order. All of them (K = M)
        unless decoder masking is on and the model is training; then a fresh random subset per call."""
        if self.training and self.cfg.decoder_mask_ratio > 0:
            return decoder_target_ids(ids_masked, self.cfg.decoder_mask_ratio)
        return ids_masked

    def forward(
        self,
        video: torch.Tensor,
        mask: torch.Tensor,
        num_masked: int | None = None,
        ids_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video: float[B, C, T, H, W] (ImageNet-normalized), mask: bool[B, N] (True = masked, M per row).

        Returns (loss: float32[], pred: float[B, K, tubelet*patch*patch*C]); pred rows follow the reconstructed
        tokens in increasing token order, values pixel-major then channel: all M masked tokens (K = M), or with
        decoder masking in training the subset `decoder_targets` draws, or the masked tokens `ids_target:
        int64[B, K]` (increasing) when given. Passing `num_masked` = M avoids the one device-to-host sync needed to
        learn M from the mask.
        """
        ids_visible, ids_masked = mask_to_ids(mask, num_masked)
        if ids_target is None:
            ids_target = self.decoder_targets(ids_masked)
        pred = self.forward_pred(video, ids_visible, ids_target)
        cfg = self.cfg
        if cfg.fused_loss:
            loss = masked_pixel_mse(
                pred,
                video,
                ids_target,
                cfg.tubelet_size,
                cfg.patch_size,
                cfg.norm_pix_loss,
                self.pixel_mean,
                self.pixel_std,
            )
        else:
            if ids_target is not ids_masked:  # the reference formula selects the target tokens with a mask
                mask = torch.zeros_like(mask).scatter_(1, ids_target, True)
            loss = masked_pixel_mse_reference(pred, video, mask, cfg.tubelet_size, cfg.patch_size, cfg.norm_pix_loss)
        return loss, pred


class VideoMAEClassifier(_LayerDecayMixin, VideoMAEEncoder):
    """Video classifier: encoder over all tokens, mean pooling, fc_norm, dropout, linear head.

    `forward(video) -> logits: float[B, num_classes]` = `forward_head(forward_features(video))`.
    Without mean pooling (`use_mean_pooling=False`) the encoder's final norm is applied and token 0 is used,
    as the official code does.
    """

    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__(cfg, final_norm=not cfg.use_mean_pooling)
        self.class_names: list[str] | None = None
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.final_head_norm_eps) if cfg.use_mean_pooling else None
        self.fc_dropout = nn.Dropout(cfg.fc_drop_rate) if cfg.fc_drop_rate > 0 else nn.Identity()
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        init_linear_trunc_normal_(self, std=0.02)
        self.reset_head()

    def reset_head(self) -> None:
        """(Re)initialise fc_norm and head as the official fine-tuning does (head x init_scale)."""
        if self.fc_norm is not None:
            nn.init.ones_(self.fc_norm.weight)
            nn.init.zeros_(self.fc_norm.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            with torch.no_grad():
                self.head.weight.mul_(self.cfg.init_scale)
                self.head.bias.mul_(self.cfg.init_scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.cfg.learnable_pos_emb else set()

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """video: float[B, C, T, H, W] -> pooled features float[B, D] (after fc_norm)."""
        x = self.forward_blocks(self.embed(video))
        if self.fc_norm is not None:
            return self.fc_norm(x.mean(dim=1))
        return x[:, 0]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """features: float[B, D] -> logits float[B, num_classes]."""
        return self.head(self.fc_dropout(features))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(video))
