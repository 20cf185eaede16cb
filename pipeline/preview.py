"""Look at what the model is fed: one batch drawn as a grid, and/or dumped before normalization.

    python -m pipeline.preview --shards data/train --mode pretrain --out preview.png
    python -m pipeline.preview --shards 'data/val/val-{000000..000003}.tar' --mode eval --dump clips.npz

The grid has one row per view (K views per clip, or clips x crops in eval) and one column per shown frame; in
pretraining, masked patches are greyed out. The dump (`.npz`) holds, for every view V of the batch, everything
taken from the DALI graph's own outputs (nothing recomputed here):

    frames     uint8[V, T, H, W, C]  the view before normalization (after crop, flip, RandAugment)
    keys       str[V]                the sample's key (tar member name without extension)
    sources    str[V]                "tar:offset:member" of the video
    sample_id  int64[V]
    frame_idx  int64[V, T]           indices into the transcoded video's timeline (with --phases, frame i is
                                     frame i // P of member p{i % P})
    boxes      int32[V, 5]           (y0, x0, h, w, flipped): source-frame pixels; eval: short-side-resized pixels
    mask       bool[V, N]            pretrain only, (t, h, w) token order, True = masked
    label      int64[V]              finetune/eval
    clip, crop int64[V]              eval only
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np

from pipeline.config import MODES
from pipeline.loader import build_loader
from shards import format as fmt
from shards.logs import configure_logging


def collect(args: argparse.Namespace) -> dict[str, np.ndarray]:
    options = dict(debug_outputs=True)
    if args.mode == "eval":
        options.update(eval_clips=args.eval_clips, eval_crops=args.eval_crops)
    loader = build_loader(
        args.shards,
        args.mode,
        args.batch_size,
        device=args.device,
        num_frames=args.num_frames,
        stride=args.stride,
        input_size=args.input_size,
        num_repeats=args.num_repeats,
        seed=args.seed,
        **options,
    )
    batch = next(iter(loader), None)
    if batch is None:  # training modes drop a last partial batch: fewer samples than one batch yield none
        raise ValueError(
            f"{args.shards}: {loader.num_samples} samples, fewer than one batch of {args.batch_size}; pass a "
            f"smaller --batch-size"
        )
    views = loader.cfg.views_per_sample
    sources = [s for s in batch["source"] for _ in range(views)]
    dump = {
        "frames": batch["frames"].cpu().numpy(),
        "keys": np.array([fmt.split_member_name(s.rpartition(":")[2])[0] for s in sources]),
        "sources": np.array(sources),
        "sample_id": batch["sample_id"].cpu().numpy(),
        "frame_idx": batch["frame_idx"].cpu().numpy(),
        "boxes": batch["box"].cpu().numpy(),
    }
    for key in ("mask", "label", "clip", "crop"):
        if key in batch:
            dump[key] = batch[key].cpu().numpy()
    dump["config"] = np.array(repr(loader.cfg))
    return dump


def draw(
    dump: dict[str, np.ndarray], out: str, patch_size: int, tubelet_size: int, max_rows: int = 12, max_cols: int = 8
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = dump["frames"][:max_rows]
    rows, t, h, w, _ = frames.shape
    cols = np.unique(np.linspace(0, t - 1, min(t, max_cols)).round().astype(int))
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.6 * len(cols), 1.75 * rows), squeeze=False)
    for r in range(rows):
        for c, ti in enumerate(cols):
            image = frames[r, ti].astype(np.float32) / 255.0
            if "mask" in dump:
                grid = dump["mask"][r].reshape(t // tubelet_size, h // patch_size, w // patch_size)[ti // tubelet_size]
                hidden = np.kron(grid, np.ones((patch_size, patch_size)))[..., None].astype(bool)
                tint = np.array([0.15, 0.25, 0.75], dtype=np.float32)  # masked patches: blue, dimmed
                image = np.where(hidden, 0.25 * image + 0.75 * tint, image)
            ax = axes[r, c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"frame {dump['frame_idx'][r, ti]}", fontsize=6)
            if c == 0:
                y0, x0, bh, bw, flipped = dump["boxes"][r]
                label = f"{dump['keys'][r]}\nbox {y0},{x0} {bh}x{bw}{' flip' if flipped else ''}"
                if "clip" in dump:
                    label += f"\nclip {dump['clip'][r]} crop {dump['crop'][r]}"
                ax.set_ylabel(label, fontsize=6)
    fig.tight_layout()
    fmt.atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="shard directory, brace pattern, glob or tar")
    parser.add_argument("--mode", choices=MODES, default="pretrain")
    parser.add_argument("--out", help="PNG grid to write")
    parser.add_argument("--dump", help="NPZ of the batch before normalization")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--num-repeats", type=int, default=2)
    parser.add_argument("--eval-clips", type=int, default=5)
    parser.add_argument("--eval-crops", type=int, default=3)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--tubelet-size", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure_logging()
    if not args.out and not args.dump:
        parser.error("nothing to do: give --out and/or --dump")
    try:
        dump = collect(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"preview: {error}", file=sys.stderr)
        return 2
    if args.dump:
        data = io.BytesIO()
        np.savez_compressed(data, **dump)
        fmt.atomic_write(args.dump, data.getvalue())
    if args.out:
        draw(dump, args.out, args.patch_size, args.tubelet_size)
    print(
        f"preview: {dump['frames'].shape[0]} views of {len(set(dump['sample_id'].tolist()))} clips"
        + (f" -> {args.out}" if args.out else "")
        + (f" -> {args.dump}" if args.dump else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
