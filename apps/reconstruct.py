"""`python -m apps.reconstruct`: what a pretrained VideoMAE sees and what it fills in, as a PNG.

    python -m apps.reconstruct --checkpoint runs/pretrain/checkpoint-00008000.pt --shards data/val --out recon.png

A pretraining batch is drawn from the shards by the pipeline (`pipeline.build_loader(mode="pretrain")` with
`debug_outputs`, so the uint8 frames before normalization come from the DALI graph itself, with the graph's own
tube mask), the pretraining model predicts the masked tubelets, and a grid is drawn per clip: original frames,
the masked input (masked tubelets greyed out), and the reconstruction, at a few time steps.

How predictions become pixels (per-tubelet un-normalization, as the official visualization does): `model.pixels`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.pixels import mask_video, reconstruct_pixels
from model.runtime import pipeline_device, resolve_device
from pipeline.config import MASK_TYPES
from shards import format as fmt
from shards.logs import configure_logging

MASK_GREY = 0.5


# ---------------------------------------------------------------------------------------------------- running
def load_pretraining_model(checkpoint_or_model: str | os.PathLike | nn.Module, trust_pickle: bool = False) -> nn.Module:
    from model.loading import load_model_of_class
    from model.videomae import VideoMAEPretrain

    return load_model_of_class(
        checkpoint_or_model,
        VideoMAEPretrain,
        "pretraining model",
        "reconstruction needs a pretraining checkpoint, with its decoder",
        trust_pickle,
    )


@torch.no_grad()
def reconstruct(
    checkpoint_or_model: str | os.PathLike | nn.Module,
    shards: Any,
    *,
    num: int = 2,
    seed: int = 0,
    mask_ratio: float = 0.9,
    mask_type: str = "tube",
    stride: int = 4,
    device: str = "cpu",
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """One pretraining batch of `num` clips from `shards`, reconstructed. Returns numpy arrays:

        frames      uint8[B, T, H, W, C]    the pipeline's views before normalization
        masked      float32[B, T, H, W, C]  the frames with masked tubelets grey
        recon       float32[B, T, H, W, C]  the reconstruction in [0, 1]
        mask        bool[B, N]              (t, h, w) token order, True = masked
        frame_idx   int64[B, T]             indices into the videos
        keys        list[str]               sample keys
        loss        float                   the model's loss on this batch

    trust_pickle: see `model.load_pretrained` (full unpickling of the checkpoint: only for a trusted file).
    """
    from pipeline import build_loader

    model = load_pretraining_model(checkpoint_or_model, trust_pickle)
    cfg = model.cfg
    torch_device = resolve_device(device)
    model = model.to(torch_device).eval()
    loader = build_loader(
        shards,
        "pretrain",
        num,
        device=pipeline_device(torch_device),
        num_frames=cfg.num_frames,
        stride=stride,
        input_size=cfg.img_size,
        patch_size=cfg.patch_size,
        tubelet_size=cfg.tubelet_size,
        mask_ratio=mask_ratio,
        mask_type=mask_type,
        seed=seed,
        debug_outputs=True,
        shuffle_buffer=64,
    )  # a picture needs no 512-sample shuffle buffer filled first
    try:
        if len(loader) == 0:
            raise ValueError(f"{shards}: {loader.num_samples} clips, fewer than --num {num}")
        batch = next(iter(loader))
        video = batch["video"].to(torch_device).float()
        mask = batch["mask"].to(torch_device)
        loss, pred = model(video, mask)
        recon = reconstruct_pixels(video, mask, pred, cfg.tubelet_size, cfg.patch_size, cfg.norm_pix_loss)
        hidden = mask_video(mask, tuple(video.shape), cfg.tubelet_size, cfg.patch_size)
        frames = batch["frames"].cpu().numpy().copy()
        frame_idx = batch["frame_idx"].cpu().numpy().copy()
        sources = list(batch["source"])
    finally:
        loader.close()
    original = torch.from_numpy(frames).float().div(255.0)  # [B, T, H, W, C]
    hidden_thwc = hidden.cpu().permute(0, 2, 3, 4, 1)  # [B, T, H, W, 1]
    masked = torch.where(hidden_thwc, torch.full_like(original, MASK_GREY), original)
    return {
        "frames": frames,
        "masked": masked.numpy(),
        "recon": recon.clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().numpy(),
        "mask": mask.cpu().numpy(),
        "frame_idx": frame_idx,
        "keys": [fmt.split_member_name(s.rpartition(":")[2])[0] for s in sources],
        "loss": float(loss),
    }


def draw(result: dict[str, Any], out: str | os.PathLike, num_times: int = 4, mask_ratio: float | None = None) -> None:
    """The grid: per clip three rows (original, masked input, reconstruction), `num_times` columns spread over T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, masked, recon = result["frames"], result["masked"], result["recon"]
    b, t = frames.shape[:2]
    times = np.unique(np.linspace(0, t - 1, min(t, num_times)).round().astype(int))
    ratio = float(result["mask"].mean()) if mask_ratio is None else mask_ratio
    rows = [
        ("original", lambda i, ti: frames[i, ti]),
        (f"masked ({100 * ratio:.0f}%)", lambda i, ti: masked[i, ti]),
        ("reconstruction", lambda i, ti: recon[i, ti]),
    ]
    fig, axes = plt.subplots(3 * b, len(times), figsize=(1.8 * len(times), 1.9 * 3 * b), squeeze=False)
    for i in range(b):
        for r, (name, image_of) in enumerate(rows):
            for c, ti in enumerate(times):
                ax = axes[3 * i + r, c]
                ax.imshow(image_of(i, ti))
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"t={ti} (frame {result['frame_idx'][i, ti]})", fontsize=7)
                if c == 0:
                    ax.set_ylabel(f"{result['keys'][i]}\n{name}" if r == 0 else name, fontsize=7)
    fig.suptitle(f"VideoMAE reconstruction (loss {result['loss']:.4f})", fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fmt.atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m apps.reconstruct",
        description="Draw original / masked / reconstructed frames of a pretraining "
        "checkpoint on clips from shards (PNG).",
    )
    p.add_argument("--checkpoint", required=True, help="pretraining checkpoint (ours, HF or official), or a run dir")
    p.add_argument("--shards", required=True, help="shard directory, brace pattern, glob or tar")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--num", type=int, default=2, help="clips to show (default 2)")
    p.add_argument("--seed", type=int, default=0, help="which clips, crops and masks (default 0)")
    p.add_argument("--frames", type=int, default=4, help="time steps shown per clip (default 4)")
    p.add_argument("--mask-ratio", type=float, default=0.9, help="masking ratio (default 0.9)")
    p.add_argument("--mask-type", choices=MASK_TYPES, default="tube", help="as the run's data.mask_type (default tube)")
    p.add_argument("--stride", type=int, default=4, help="frame sampling rate (default 4)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a checkpoint that needs full unpickling (it can run code): only a file you trust",
    )
    args = p.parse_args(argv)
    if args.num < 1 or args.frames < 1:
        p.error("--num and --frames must be >= 1")
    configure_logging()
    try:
        result = reconstruct(
            args.checkpoint,
            args.shards,
            num=args.num,
            seed=args.seed,
            mask_ratio=args.mask_ratio,
            mask_type=args.mask_type,
            stride=args.stride,
            device=args.device,
            trust_pickle=args.trust_pickle,
        )
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    draw(result, args.out, args.frames)
    n = len(result["keys"])
    print(
        f"reconstruct: {n} clip{'s' if n != 1 else ''}, {100 * result['mask'].mean():.0f}% of tubelets masked, "
        f"loss {result['loss']:.4f} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
