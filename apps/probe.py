"""`python -m apps.probe`: does a pretraining run learn? A linear probe and the held-out pretraining loss, each for
the checkpoint and for the same architecture at random initialisation.

    python -m apps.probe --checkpoint runs/pretrain --train data/train --val data/val [--json probe.json]

1. Features: the frozen encoder runs over every token of `--clips` evenly spaced clips (centre crop) of each video;
   its tokens are mean-pooled per clip and the clips averaged per video: float[videos, D].
2. Linear probe: multinomial logistic regression on the train split's features (standardized with the train
   statistics, L2 penalty, full-batch L-BFGS in float64: deterministic), top-1 on the val split.
3. Held-out pretraining loss: the checkpoint's own objective (normalized-pixel MSE on masked tubelets) on the val
   split's clips, with masks (`--mask-type` tube or random, as the run's data.mask_type) drawn from a generator
   seeded by `--seed`: the same masks for both models and on every run, so the numbers are comparable across
   checkpoints of a run.

The random encoder is the checkpoint's architecture initialised after `torch.manual_seed(--seed)`, exactly as
`train.py pretrain` initialises it with run.seed = --seed: its loss is the run's loss at initialisation.
Both models see the same decoded clips (one pass over each split).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shards.format import atomic_write
from shards.logs import configure_logging


# ---------------------------------------------------------------------------------------------------- models
def load_pretraining_encoder(checkpoint: str | os.PathLike, trust_pickle: bool = False) -> nn.Module:
    """The VideoMAEPretrain of `checkpoint` (a file or run directory); ValueError for a classifier checkpoint."""
    from apps.reconstruct import load_pretraining_model

    return load_pretraining_model(checkpoint, trust_pickle)


def random_twin(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture freshly initialised after torch.manual_seed(seed) (as train.py pretrain does)."""
    from model import build_model

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build_model("pretrain", model.cfg).eval()
    finally:
        torch.random.set_rng_state(state)


def tube_masks(num: int, cfg, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """bool[num, N] tube masks as the pipeline draws them: int(ratio * H'W') random spatial tokens per clip,
    the same at every temporal slot; (t, h, w) token order, True = masked."""
    from model.layers import num_tube_masked

    slots, h, w = cfg.grid
    per_slot = num_tube_masked(cfg.grid, mask_ratio) // slots
    order = torch.rand(num, h * w, generator=generator).argsort(dim=1)
    spatial = torch.zeros(num, h * w, dtype=torch.bool).scatter_(1, order[:, :per_slot], True)
    return spatial.repeat(1, slots)


def random_masks(num: int, cfg, mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """bool[num, N] random masks as the pipeline draws them with mask_type "random": int(ratio * N) of all N tokens
    per clip, True = masked."""
    n = cfg.num_patches
    order = torch.rand(num, n, generator=generator).argsort(dim=1)
    return torch.zeros(num, n, dtype=torch.bool).scatter_(1, order[:, : int(mask_ratio * n)], True)


MASKS = {"tube": tube_masks, "random": random_masks}


@torch.no_grad()
def pooled_features(model: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """video float[B, C, T, H, W] -> float[B, D]: the encoder (with its final norm) over all tokens, mean-pooled."""
    enc = model.encoder
    return enc.forward_blocks(enc.embed(video)).mean(dim=1)


# ---------------------------------------------------------------------------------------------------- data
def _loader(shards: Any, cfg, *, clips: int, stride: int, batch_size: int, threads: int | None):
    from pipeline import build_loader

    return build_loader(
        shards,
        "eval",
        batch_size,
        device="cpu",
        num_frames=cfg.num_frames,
        stride=stride,
        input_size=cfg.img_size,
        patch_size=cfg.patch_size,
        tubelet_size=cfg.tubelet_size,
        eval_clips=clips,
        eval_crops=1,
        num_threads=threads,
    )


@torch.no_grad()
def split_pass(
    loader,
    shards: Any,
    models: dict[str, nn.Module],
    *,
    clips: int = 5,
    mask_ratio: float | None = None,
    mask_type: str = "tube",
    seed: int = 0,
) -> dict[str, Any]:
    """One pass of `loader` (an eval loader over `shards`, `clips` clips x 1 crop) for every model, then closes it:
    per-video features {name: float[V, D]}, labels int64[V], and with `mask_ratio` the held-out pretraining loss
    {name: float} (mean over clips, fixed masks from `seed`)."""
    cfg = next(iter(models.values())).cfg
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    losses = dict.fromkeys(models, 0.0)
    ids, labels, seen = [], [], 0
    try:
        for batch in loader:
            video = batch["video"].float()
            mask = MASKS[mask_type](len(video), cfg, mask_ratio, generator) if mask_ratio is not None else None
            for name, model in models.items():
                feats = pooled_features(model, video)
                sums[name].append(feats.view(-1, clips, feats.shape[1]).mean(dim=1))
                if mask is not None:
                    loss, _ = model(video, mask)
                    losses[name] += float(loss) * len(video)
            ids.append(batch["sample_id"].view(-1, clips)[:, 0].long())
            labels.append(batch["label"].view(-1, clips)[:, 0].long())
            seen += len(video)
    finally:
        loader.close()
    label = torch.cat(labels)
    if (label < 0).any():
        raise ValueError(f"{shards}: {int((label < 0).sum())} samples without a label (a probe needs labels)")
    result: dict[str, Any] = {"features": {n: torch.cat(v) for n, v in sums.items()}, "labels": label}
    result["sample_ids"] = torch.cat(ids)
    if mask_ratio is not None:
        result["loss"] = {name: total / seen for name, total in losses.items()}
    return result


# ---------------------------------------------------------------------------------------------------- probe
def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    l2: float = 1e-3,
    steps: int = 100,
) -> float:
    """Top-1 on (val_x float[V, D], val_y) of a multinomial logistic regression fit on (train_x float[N, D],
    train_y int64[N]): features standardized with the train mean/std, loss = cross-entropy + l2 * |W|^2,
    full-batch L-BFGS in float64 from zeros (deterministic)."""
    x, xv = train_x.double(), val_x.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x, xv = (x - mean) / std, (xv - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xv @ weight + bias).argmax(1) == val_y).double().mean())


def probe(
    checkpoint: str | os.PathLike | nn.Module,
    train: Any,
    val: Any,
    *,
    clips: int = 5,
    stride: int = 4,
    mask_ratio: float = 0.9,
    mask_type: str = "tube",
    seed: int = 0,
    batch_size: int = 8,
    threads: int | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """The probe and held-out loss of `checkpoint` and of its random twin (see the module docstring). Returns
    {"pretrained": {"probe_top1", "heldout_loss"}, "random": {...}, "classes", "train_videos", "val_videos",
    "seconds"}; accuracies are fractions."""
    if mask_type not in MASKS:
        raise ValueError(f"mask type must be one of {', '.join(MASKS)}, got {mask_type!r}")
    started = time.perf_counter()
    pretrained = checkpoint if isinstance(checkpoint, nn.Module) else load_pretraining_encoder(checkpoint, trust_pickle)
    if not hasattr(pretrained, "encoder") or not hasattr(pretrained, "decoder"):
        raise ValueError(f"{checkpoint}: a {type(pretrained).__name__} is not a pretraining model")
    models = {"pretrained": pretrained.eval(), "random": random_twin(pretrained, seed)}
    loaders = {}
    try:  # both splits open before any decoding: a bad val split fails at once
        for split, shards in (("val", val), ("train", train)):
            loaders[split] = _loader(
                shards, pretrained.cfg, clips=clips, stride=stride, batch_size=batch_size, threads=threads
            )
            if len(loaders[split]) == 0:
                raise ValueError(f"{shards}: no samples")
    except BaseException:
        for loader in loaders.values():
            loader.close()
        raise
    tr = split_pass(loaders["train"], train, models, clips=clips)
    va = split_pass(loaders["val"], val, models, clips=clips, mask_ratio=mask_ratio, mask_type=mask_type, seed=seed)
    num_classes = int(max(tr["labels"].max(), va["labels"].max())) + 1
    out: dict[str, Any] = {}
    for name in models:
        top1 = linear_probe(tr["features"][name], tr["labels"], va["features"][name], va["labels"], num_classes)
        out[name] = {"probe_top1": top1, "heldout_loss": va["loss"][name]}
    out.update(
        classes=num_classes,
        train_videos=len(tr["labels"]),
        val_videos=len(va["labels"]),
        seconds=time.perf_counter() - started,
    )
    return out


def table(result: dict[str, Any]) -> str:
    """The two rows a person reads: encoder, held-out pretraining loss, linear-probe top-1."""
    lines = [f"  {'encoder':12s} {'held-out loss':>14s} {'probe top-1':>12s}"]
    for name in ("random", "pretrained"):
        r = result[name]
        lines.append(f"  {name:12s} {r['heldout_loss']:14.4f} {100 * r['probe_top1']:11.1f}%")
    lines.append(
        f"  ({result['train_videos']} train / {result['val_videos']} val videos, {result['classes']} classes: "
        f"chance {100 / result['classes']:.0f}%)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apps.probe", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="pretraining checkpoint (file or run directory)")
    p.add_argument("--train", required=True, help="labelled shards the probe is fit on")
    p.add_argument("--val", required=True, help="labelled shards it is scored on (and the held-out loss)")
    p.add_argument("--json", default=None, help="also write the result here (JSON)")
    p.add_argument("--clips", type=int, default=5, help="clips per video, features averaged (default 5)")
    p.add_argument("--stride", type=int, default=4, help="frame sampling rate, as in pretraining (default 4)")
    p.add_argument("--mask-ratio", type=float, default=0.9, help="held-out loss tube masking ratio (default 0.9)")
    p.add_argument(
        "--mask-type", choices=tuple(MASKS), default="tube", help="held-out masks, as the run's data.mask_type"
    )
    p.add_argument("--seed", type=int, default=0, help="masks and random encoder: the run's run.seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch (default 8)")
    p.add_argument("--threads", type=int, default=None, help="pipeline CPU threads (default: all cores)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--trust-pickle", action="store_true", help="full unpickling of a checkpoint you trust")
    args = p.parse_args(argv)
    if args.clips < 1 or args.batch_size < 1 or not 0 < args.mask_ratio < 1:
        p.error("--clips and --batch-size must be >= 1, --mask-ratio in (0, 1)")
    configure_logging()
    if args.torch_threads:
        # the demo's model is tiny next to its decoding: on 2 busy cores a second OpenMP thread, waiting for its core
        # at every op barrier, made each layer 10x slower (measured); a real encoder wants torch's default
        torch.set_num_threads(args.torch_threads)
    for what, path in (("--train", args.train), ("--val", args.val)):
        if not Path(path).exists() and not any(c in str(path) for c in "{*?"):
            print(f"error: {what} {path}: no such file or directory", file=sys.stderr)
            return 2
    try:
        result = probe(
            args.checkpoint,
            args.train,
            args.val,
            clips=args.clips,
            stride=args.stride,
            mask_ratio=args.mask_ratio,
            mask_type=args.mask_type,
            seed=args.seed,
            batch_size=args.batch_size,
            threads=args.threads,
            trust_pickle=args.trust_pickle,
        )
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
