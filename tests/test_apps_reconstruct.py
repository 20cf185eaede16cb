"""`model.pixels` and `apps.reconstruct`: un-normalizing VideoMAE predictions back to pixels, and the original /
masked / reconstruction picture drawn from a real pretraining batch of the DALI pipeline (CPU).

The key check: feeding the exact training target (`model.pixel_loss.norm_pix_target_reference`, the official
formula) in place of the predictions must give back the pipeline's uint8 frames, so the layout (token order,
pixel-major then channel) and the per-tubelet statistics used to map back agree with what the model is trained on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_weights import tiny_config

from apps.reconstruct import main, reconstruct
from model import build_model
from model.checkpoint import model_payload, save_atomic
from model.pixel_loss import norm_pix_target_reference
from model.pixels import mask_video, reconstruct_pixels, tubelet_pixels, untubelet

TUBELET, PATCH = 2, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("recon") / "pretrain.pt"
    save_atomic(model_payload("pretrain", cfg, build_model("pretrain", cfg)), path)
    return path


@pytest.fixture(scope="module")
def pretrain_batch(shard_dirs):
    """One real pretraining batch with the uint8 frames before normalization (copied out of DALI's buffers)."""
    from pipeline import build_loader

    loader = build_loader(
        shard_dirs["train"],
        "pretrain",
        2,
        device="cpu",
        num_frames=8,
        input_size=64,
        patch_size=PATCH,
        tubelet_size=TUBELET,
        seed=3,
        debug_outputs=True,
    )
    batch = next(iter(loader))
    out = {k: batch[k].clone() for k in ("video", "mask", "frames")}
    loader.close()
    return out


def frames_as_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8[B, T, H, W, C] -> float[B, C, T, H, W] in [0, 1]."""
    return frames.permute(0, 4, 1, 2, 3).double() / 255.0


def test_tubelet_layout_round_trip_and_matches_the_target_layout():
    video = torch.randn(2, 3, 4, 32, 48, dtype=torch.float64)
    tokens = tubelet_pixels(video, TUBELET, PATCH)
    assert tokens.shape == (2, 2 * 2 * 3, TUBELET * PATCH * PATCH, 3)
    torch.testing.assert_close(untubelet(tokens, (2, 2, 3), TUBELET, PATCH), video, rtol=0, atol=0)
    # tokens in (t, h, w) order over a 2 x 3 spatial grid: token 7 is t'=1, h'=0, w'=1; its pixels in (dt, dh, dw)
    # order, each with its 3 channels
    t0, h0, w0 = 1 * TUBELET, 0 * PATCH, 1 * PATCH
    torch.testing.assert_close(tokens[1, 7, 0], video[1, :, t0, h0, w0])
    torch.testing.assert_close(tokens[1, 7, 1], video[1, :, t0, h0, w0 + 1])
    torch.testing.assert_close(tokens[1, 7, PATCH], video[1, :, t0, h0 + 1, w0])
    torch.testing.assert_close(tokens[1, 7, PATCH * PATCH], video[1, :, t0 + 1, h0, w0])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_exact_target_maps_back_to_the_original_pixels(pretrain_batch, norm_pix):
    video, mask, frames = pretrain_batch["video"], pretrain_batch["mask"], pretrain_batch["frames"]
    b, n = mask.shape
    m = int(mask[0].sum())
    assert 0 < m < n and (mask.sum(1) == m).all()
    target = norm_pix_target_reference(video, TUBELET, PATCH, norm_pix)[mask].reshape(b, m, -1)
    recon = reconstruct_pixels(video, mask, target, TUBELET, PATCH, norm_pix)
    assert recon.shape == video.shape
    np.testing.assert_allclose(recon.double().numpy(), frames_as_pixels(frames).numpy(), atol=2e-5, rtol=0)


def test_masked_tubelets_come_from_the_prediction(pretrain_batch):
    """pred = target + d: masked pixels move by d * (std + eps) of their tubelet, visible pixels do not move."""
    video, mask = pretrain_batch["video"], pretrain_batch["mask"]
    b, m = mask.shape[0], int(mask[0].sum())
    target = norm_pix_target_reference(video, TUBELET, PATCH)[mask].reshape(b, m, -1)
    delta = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    moved = reconstruct_pixels(video, mask, target + delta, TUBELET, PATCH) - reconstruct_pixels(
        video, mask, target, TUBELET, PATCH
    )
    pixels = tubelet_pixels(frames_as_pixels(pretrain_batch["frames"]), TUBELET, PATCH)[mask]  # [B*M, P, C]
    std = pixels.var(dim=1, unbiased=True, keepdim=True).sqrt()
    expected = delta.double().reshape(pixels.shape) * (std + 1e-6)
    got = tubelet_pixels(moved.double(), TUBELET, PATCH)
    np.testing.assert_allclose(got[mask].numpy(), expected.numpy(), atol=1e-4, rtol=1e-3)
    assert got[~mask].abs().max() == 0
    hidden = mask_video(mask, tuple(video.shape), TUBELET, PATCH)
    assert hidden.shape == (b, 1, *video.shape[2:])
    assert (moved.abs().amax(dim=1, keepdim=True)[~hidden] == 0).all()


def test_reconstruct_cli_writes_the_picture(pretrain_ckpt, shard_dirs, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "recon.png"
    assert (
        main(
            [
                "--checkpoint",
                str(pretrain_ckpt),
                "--shards",
                str(shard_dirs["train"]),
                "--out",
                str(out),
                "--num",
                "2",
                "--seed",
                "1",
                "--frames",
                "3",
            ]
        )
        == 0
    )
    assert "2 clips" in capsys.readouterr().out
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 200
    assert not list(tmp_path.glob("*.tmp*"))

    result = reconstruct(pretrain_ckpt, shard_dirs["train"], num=2, seed=1)
    frames, recon, masked = result["frames"], result["recon"], result["masked"]
    assert frames.shape == recon.shape == masked.shape == (2, 8, 64, 64, 3)
    hidden = result["mask"].reshape(2, 4, 1, 4, 1, 4, 1).repeat(2, 2).repeat(16, 4).repeat(16, 6)
    hidden = hidden.reshape(2, 8, 64, 64)
    original = frames / 255.0
    np.testing.assert_allclose(recon[~hidden], original[~hidden], atol=1e-5)  # visible: the original
    assert np.abs(recon[hidden] - original[hidden]).mean() > 1e-3  # masked: an untrained model's guess
    assert (masked[hidden] == 0.5).all() and np.allclose(masked[~hidden], original[~hidden])
    assert np.isfinite(result["loss"]) and result["loss"] > 0

    # --mask-type random: the masks of a run pretrained with data.mask_type random, a fresh pattern per slot
    rand = reconstruct(pretrain_ckpt, shard_dirs["train"], num=2, seed=1, mask_ratio=0.75, mask_type="random")
    slots = torch.from_numpy(rand["mask"]).view(2, 4, 16)
    assert (slots.sum((1, 2)) == int(0.75 * 64)).all() and (slots != slots[:, :1]).any()
    hidden = rand["mask"].reshape(2, 4, 1, 4, 1, 4, 1).repeat(2, 2).repeat(16, 4).repeat(16, 6).reshape(2, 8, 64, 64)
    assert (rand["masked"][hidden] == 0.5).all()


def test_classifier_checkpoint_is_refused(tmp_path, shard_dirs):
    cfg = tiny_config()
    path = tmp_path / "cls.pt"
    save_atomic(model_payload("classify", cfg, build_model("classify", cfg)), path)
    with pytest.raises(ValueError, match="pretraining checkpoint"):
        reconstruct(path, shard_dirs["train"])
