"""Masking invariants of the pretraining model, and equality of the fast paths with the reference path."""

from __future__ import annotations

import pytest
import torch

from model import VideoMAEConfig, VideoMAEPretrain, build_model
from model.layers import gather_tubelets, mask_to_ids

TINY = dict(
    img_size=32,
    patch_size=8,
    num_frames=4,
    embed_dim=48,
    depth=2,
    num_heads=3,
    decoder_embed_dim=24,
    decoder_depth=2,
    decoder_num_heads=2,
    num_classes=5,
)
REFERENCE = dict(fused_attn=False, fused_loss=False, sparse_embed=False)


def tiny_cfg(**kw) -> VideoMAEConfig:
    return VideoMAEConfig(**{**TINY, **kw})


def tube_mask(b: int, cfg: VideoMAEConfig, ratio: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t, h, w = cfg.grid
    m = int(ratio * h * w)
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(h * w, generator=g)[:m]] = True
    return mask.repeat(1, t)


def make_inputs(cfg: VideoMAEConfig, b: int = 2, seed: int = 0, ratio: float = 0.75):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(b, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
    return video, tube_mask(b, cfg, ratio, seed)


def test_mask_to_ids_order_and_counts():
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, False, False]])
    vis, msk = mask_to_ids(mask)
    assert vis.tolist() == [[1, 3, 4], [0, 3, 4]]
    assert msk.tolist() == [[0, 2], [1, 2]]
    vis2, msk2 = mask_to_ids(mask, num_masked=2)
    assert torch.equal(vis, vis2) and torch.equal(msk, msk2)
    with pytest.raises(ValueError, match="same number"):
        mask_to_ids(torch.tensor([[True, False, False], [True, True, False]]))
    with pytest.raises(ValueError, match="bool"):
        mask_to_ids(mask.int())


def test_encoder_sees_only_visible_tokens():
    cfg = tiny_cfg()
    model = VideoMAEPretrain(cfg).eval()
    video, mask = make_inputs(cfg)
    seen = []
    hooks = [blk.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape)) for blk in model.encoder.blocks]
    with torch.no_grad():
        _, pred = model(video, mask)
    for h in hooks:
        h.remove()
    num_masked = int(mask[0].sum())
    assert seen == [torch.Size([2, cfg.num_patches - num_masked, cfg.embed_dim])] * cfg.depth
    assert pred.shape == (2, num_masked, cfg.patch_dim)


@pytest.mark.parametrize("switches", [{}, REFERENCE])
def test_predictions_ignore_masked_content(switches):
    cfg = tiny_cfg(**switches)
    model = VideoMAEPretrain(cfg).eval()
    video, mask = make_inputs(cfg)
    # overwrite every masked tubelet with other values: predictions must not move, the loss (target) must
    altered = video.clone()
    t, h, w = cfg.grid
    p, tub = cfg.patch_size, cfg.tubelet_size
    for b in range(video.shape[0]):
        for n in mask[b].nonzero().flatten().tolist():
            tt, hh, ww = n // (h * w), (n // w) % h, n % w
            altered[b, :, tt * tub : (tt + 1) * tub, hh * p : (hh + 1) * p, ww * p : (ww + 1) * p] = torch.randn(
                3, tub, p, p
            )
    loss_a, pred_a = model(video, mask)
    loss_b, pred_b = model(altered, mask)
    torch.testing.assert_close(pred_a, pred_b, rtol=0, atol=0)
    # the target (hence the gradient w.r.t. the predictions) does follow the masked content
    (grad_a,) = torch.autograd.grad(loss_a, pred_a)
    (grad_b,) = torch.autograd.grad(loss_b, pred_b)
    assert (grad_a - grad_b).abs().max() > 0.1 * grad_a.abs().max()
    # and visible content does matter
    with torch.no_grad():
        _, pred_c = model(video + 0.5 * torch.randn_like(video), mask)
    assert not torch.allclose(pred_a, pred_c)


def test_gather_tubelets_matches_conv_patch_order():
    cfg = tiny_cfg()
    video, mask = make_inputs(cfg, b=1)
    ids = torch.arange(cfg.num_patches)[None]
    tub = gather_tubelets(video, ids, cfg.tubelet_size, cfg.patch_size)
    t, h, w = cfg.grid
    n = 1 * h * w + 2 * w + 3  # token (t=1, h=2, w=3)
    p, tb = cfg.patch_size, cfg.tubelet_size
    torch.testing.assert_close(tub[0, n], video[0, :, tb : 2 * tb, 2 * p : 3 * p, 3 * p : 4 * p], rtol=0, atol=0)


def assert_variant_matches(cfg: VideoMAEConfig, **variant) -> None:
    """The model with `variant` switched on, given the same weights and inputs, gives the reference model's
    predictions, loss and every parameter's gradient (fp32: within float rounding)."""
    torch.manual_seed(0)
    ref = VideoMAEPretrain(cfg).train()
    other = VideoMAEPretrain(cfg.replace(**variant)).train()
    other.load_state_dict(ref.state_dict())
    video, mask = make_inputs(cfg)
    l1, p1 = ref(video, mask)
    l2, p2 = other(video, mask)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(ref.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fast", ["fused_attn", "sparse_embed", "fused_loss"])
def test_each_fast_path_equals_reference(fast):
    assert_variant_matches(tiny_cfg(**REFERENCE), **{fast: True})


def test_grad_checkpointing_same_gradients():
    assert_variant_matches(tiny_cfg(drop_path_rate=0.0), grad_checkpointing=True)


def test_classifier_fused_attention_equals_reference():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    fast = build_model("classify", cfg).eval()
    ref = build_model("classify", cfg.replace(fused_attn=False)).eval()
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        torch.nn.init.normal_(fast.head.weight, std=0.5)  # the init_scale'd head would make logits ~0
        ref.head.weight.copy_(fast.head.weight)
    video, _ = make_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(fast(video), ref(video), rtol=1e-4, atol=1e-5)
        feats = fast.forward_features(video)
        assert feats.shape == (2, cfg.embed_dim)
        torch.testing.assert_close(fast.forward_head(feats), fast(video))


def test_bad_inputs_are_rejected():
    cfg = tiny_cfg()
    model = VideoMAEPretrain(cfg)
    video, mask = make_inputs(cfg)
    with pytest.raises(ValueError, match=r"float\[B, C, T, H, W\]"):
        model(video[:, :, :2], mask)
    uneven = mask.clone()
    uneven[0, ~mask[0]] = True  # sample 0 masks everything, sample 1 does not
    with pytest.raises(ValueError, match="same number"):
        model(video, uneven)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fast_bf16_step_tracks_fp32_reference():
    cfg = tiny_cfg(img_size=64, patch_size=16, num_frames=8)
    torch.manual_seed(0)
    ref = VideoMAEPretrain(cfg.replace(**REFERENCE)).cuda()
    fast = VideoMAEPretrain(cfg).cuda()
    fast.load_state_dict(ref.state_dict())
    video, mask = make_inputs(cfg, b=4, ratio=0.9)
    video, mask = video.cuda(), mask.cuda()
    l_ref, p_ref = ref(video, mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        l_fast, p_fast = fast(video, mask, num_masked=int(mask[0].sum()))
    assert p_fast.dtype == torch.bfloat16
    torch.testing.assert_close(l_fast, l_ref, rtol=2e-2, atol=0)
    torch.testing.assert_close(p_fast.float(), p_ref, rtol=5e-2, atol=5e-2)
