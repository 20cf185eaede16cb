"""VideoMAE V2 decoder masking (`decoder_mask_ratio`) and the SDPA kernel choice (`attn_backend`), on the CPU.

Decoder masking: in training the decoder gets mask tokens for a random subset of K = M - int(r * M) of the M masked
tokens and the loss covers only those. Checked against an explicit re-implementation written from VideoMAE V2's
`PretrainVisionTransformer.forward` (encoder on the visible tokens, decoder input = visible tokens + mask tokens at
the decoder's positions, official normalized-pixel target over the whole video restricted to those positions), with
the reference paths (explicit attention, Conv3d over every tubelet, official loss formula) on one side and the fast
paths on the other: loss and every gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import VideoMAEConfig, build_model
from model.layers import decoder_target_ids, mask_to_ids
from model.pixel_loss import norm_pix_target_reference

FAST = dict(fused_attn=True, sparse_embed=True, fused_loss=True)
REFERENCE = dict(fused_attn=False, sparse_embed=False, fused_loss=False)


def tiny(**overrides) -> VideoMAEConfig:
    """4 frames of 64 px: N = 2 x 4 x 4 = 32 tokens; 12 of 16 per slot masked: M = 24."""
    base = dict(
        img_size=64,
        num_frames=4,
        embed_dim=48,
        depth=2,
        num_heads=3,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=2,
    )
    return VideoMAEConfig.from_name("small", **{**base, **overrides})


def inputs(cfg: VideoMAEConfig, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """video float[B, 3, T, S, S], tube mask bool[B, N] (12 of 16 spatial tokens per slot)."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = cfg.grid
    video = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
    spatial = torch.zeros(batch, h * w, dtype=torch.bool)
    spatial.scatter_(1, torch.rand(batch, h * w, generator=g).argsort(1)[:, :12], True)
    return video, spatial.repeat(1, t)


def reference_loss(model, video: torch.Tensor, mask: torch.Tensor, ids_target: torch.Tensor) -> torch.Tensor:
    """VideoMAE V2's forward with decode mask = the masked tokens NOT in ids_target, on `model`'s weights."""
    b, n = mask.shape
    enc = model.encoder
    x = enc.patch_embed(video) + enc.pos_embed
    x = x[~mask].reshape(b, -1, x.shape[-1])
    for blk in enc.blocks:
        x = blk(x)
    x = model.encoder_to_decoder(enc.norm(x))
    decode = torch.zeros_like(mask).scatter_(1, ids_target, True)  # masked and decoder-visible
    pos = model.pos_embed.expand(b, -1, -1)
    x_full = torch.cat(
        [x + pos[~mask].reshape(b, -1, x.shape[-1]), model.mask_token + pos[decode].reshape(b, -1, x.shape[-1])], dim=1
    )
    for blk in model.decoder.blocks:
        x_full = blk(x_full)
    k = ids_target.shape[1]
    pred = model.decoder.head(model.decoder.norm(x_full[:, -k:]))
    target = norm_pix_target_reference(video, model.cfg.tubelet_size, model.cfg.patch_size)[decode]
    return F.mse_loss(pred, target.reshape(pred.shape))


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_decoder_targets_are_a_seeded_random_subset_of_the_masked_tokens():
    ids_masked = torch.stack([torch.arange(24) + 8 * i for i in range(4)])  # [4, 24], increasing
    torch.manual_seed(1)
    kept = decoder_target_ids(ids_masked, 0.5)
    assert kept.shape == (4, 12) and kept.dtype == torch.int64
    for row, masked in zip(kept, ids_masked):
        assert set(row.tolist()) <= set(masked.tolist()) and len(set(row.tolist())) == 12
        assert torch.equal(row, row.sort().values)
    assert len({tuple(r.tolist()) for r in kept}) == 4  # drawn per clip
    torch.manual_seed(1)
    assert torch.equal(decoder_target_ids(ids_masked, 0.5), kept)  # the seed decides
    assert not torch.equal(decoder_target_ids(ids_masked, 0.5), kept)
    assert decoder_target_ids(ids_masked, 0.9).shape == (4, 24 - int(0.9 * 24))
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(24)
    for _ in range(200):
        counts += torch.zeros(24).scatter_(0, decoder_target_ids(ids_masked[:1], 0.25, generator=g)[0], 1.0)
    assert counts.min() > 100 and counts.max() < 200  # every token gets chosen


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_loss_and_gradients_equal_the_explicit_reference(ratio):
    cfg = tiny(decoder_mask_ratio=ratio, **FAST)
    torch.manual_seed(0)
    fast = build_model("pretrain", cfg).train()
    reference = build_model("pretrain", cfg.replace(**REFERENCE)).train()
    reference.load_state_dict(fast.state_dict())
    video, mask = inputs(cfg)
    _, ids_masked = mask_to_ids(mask)

    seen = []
    hook = fast.decoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    torch.manual_seed(5)
    loss, pred = fast(video, mask, num_masked=24)
    hook.remove()
    torch.manual_seed(5)
    ids_target = fast.decoder_targets(ids_masked)  # the draw forward made
    k = 24 - int(ratio * 24)
    assert pred.shape == (3, k, cfg.patch_dim) and ids_target.shape == (3, k)
    assert seen == [32 - 24 + k]  # the decoder runs over N - M + K tokens
    loss.backward()

    expected = reference_loss(reference, video, mask, ids_target)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    ours, theirs = grads(fast), grads(reference)
    assert ours.keys() == theirs.keys() and "mask_token" in ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    # the reference switches take the same decoder subset through the same forward
    reference.zero_grad()
    loss_ref_path, _ = reference(video, mask, ids_target=ids_target)
    torch.testing.assert_close(loss_ref_path, expected, rtol=1e-5, atol=1e-6)


def test_off_by_default_and_in_eval_mode_the_decoder_predicts_every_masked_token():
    cfg = tiny(**FAST)
    assert cfg.decoder_mask_ratio == 0.0
    torch.manual_seed(0)
    plain = build_model("pretrain", cfg).train()
    masked = build_model("pretrain", cfg.replace(decoder_mask_ratio=0.5))
    masked.load_state_dict(plain.state_dict())
    video, mask = inputs(cfg)
    state = torch.get_rng_state()
    loss, pred = plain(video, mask)
    assert pred.shape[1] == 24 and torch.equal(torch.get_rng_state(), state)  # no draw when off
    masked.eval()
    with torch.no_grad():
        loss_eval, pred_eval = masked(video, mask)
    torch.testing.assert_close(pred_eval, pred.detach())
    torch.testing.assert_close(loss_eval, loss.detach())


def test_training_with_decoder_masking_is_reproducible_from_the_seed():
    cfg = tiny(decoder_mask_ratio=0.5, **FAST)
    video, mask = inputs(cfg)

    def run(seed: int) -> list[float]:
        torch.manual_seed(0)
        model = build_model("pretrain", cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(seed)
        losses = []
        for _ in range(3):
            loss, _ = model(video, mask, num_masked=24)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    assert run(7) == run(7) and run(7) != run(8)


def test_bad_decoder_mask_ratio_and_attention_backend_are_refused():
    for bad in (
        dict(decoder_mask_ratio=1.0),
        dict(decoder_mask_ratio=-0.1),
        dict(decoder_mask_ratio=float("nan")),
        dict(attn_backend="fast"),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny(**bad)


@pytest.mark.parametrize("backend", ["flash", "math"])
def test_attention_backends_equal_the_explicit_reference(backend):
    """`attn_backend` restricts SDPA to one kernel; "flash" and "math" exist on the CPU ("cudnn" and "efficient"
    only on CUDA: bench.bench_model measures them). Loss and gradients equal the explicit softmax attention."""
    cfg = tiny(attn_backend=backend, **FAST)
    torch.manual_seed(0)
    model = build_model("pretrain", cfg).train()
    reference = build_model("pretrain", cfg.replace(fused_attn=False))
    reference.load_state_dict(model.state_dict())
    video, mask = inputs(cfg)
    for m in (model, reference):
        loss, _ = m(video, mask)
        loss.backward()
        m.loss = loss
    torch.testing.assert_close(model.loss, reference.loss, rtol=1e-5, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, grads(reference)[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model.encoder.blocks[0].attn.backends is not None


def test_a_backend_missing_on_this_device_is_not_silently_replaced():
    """cuDNN attention on CPU tensors: SDPA refuses (no silent fallback to another kernel), and the restriction is
    scoped to the call (torch's global SDPA switches are untouched)."""
    model = build_model("pretrain", tiny(attn_backend="cudnn", **FAST))
    video, mask = inputs(model.cfg)
    with pytest.raises(RuntimeError, match="No viable backend"):
        model(video, mask)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
