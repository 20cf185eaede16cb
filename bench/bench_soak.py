"""Host memory of the input pipeline over many epochs: does the loader (a DALI pipeline built per epoch, video
decoders created per sample, keyframe cuts, corrupt-sample substitution) leak?

    python -m bench.bench_soak --epochs 200 --out bench/out/cpu/soak.json

Builds small shards of synthetic videos with the real builder (the default IVF layout in 4 stride phases; one
sample damaged in place, so the recovery path runs), then iterates a pretraining loader (and, every `--eval-every`
epochs, an eval loader) for `--epochs` epochs, reading the process's resident memory (VmRSS, /proc/self/status)
after each epoch. Reports the memory after the warm-up epochs, at the end, the growth per 100 epochs from a
least-squares line through the epochs after warm-up, and the peak. Old DALI versions leaked host memory in video
decoding (DALI issues #4675, #4256, #5775); this is the check that ours does not.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    """Resident memory of this process in MB (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def make_shards(directory: Path, videos: int, frames: int) -> Path:
    """`videos` synthetic clips (shards.synth) built by shards.build in the default layout (IVF, 4 phases), then
    every key frame of the first sample's members overwritten with noise in place (so it fails to decode, as a
    disk-damaged sample would)."""
    from pipeline.shardset import ShardSet
    from shards import format as fmt
    from shards.build import main as build_main
    from shards.synth import main as synth_main

    source = directory / "videos"
    assert (
        synth_main(
            [
                "--out",
                str(source),
                "--classes",
                "2",
                "--per-class",
                str(videos // 2),
                "--val-per-class",
                "1",
                "--size",
                "160x120",
                "--frames",
                str(frames),
                "--workers",
                "2",
            ]
        )
        == 0
    )
    out = directory / "shards"
    assert (
        build_main(
            [
                "--csv",
                str(source / "train.csv"),
                "--root",
                str(source),
                "--split",
                "train",
                "--out",
                str(out),
                "--short-side",
                "96",
                "--phases",
                "4",
                "--samples-per-shard",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    shards = ShardSet(str(out))
    tar = shards.tars[0]
    sample = shards.index(tar)[1][0]
    rows = fmt.unpack_cuts(shards.read_member(tar, *sample.components[fmt.CUTS_EXT][:2]))
    noise = np.random.default_rng(0)
    with open(tar, "r+b") as f:
        for member, ext in enumerate(shards.video_exts):
            start = sample.components[ext][0]
            for frame_offset in rows[(rows[:, 0] == member) & (rows[:, 3] == fmt.CUT_KEY), 2]:
                f.seek(start + int(frame_offset) + 12 + 8)  # inside the key frame's data, past its headers
                f.write(noise.integers(0, 256, size=256, dtype=np.uint8).tobytes())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10, help="epochs before the growth is measured")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=10, help="an eval epoch every this many epochs (0: none)")
    p.add_argument("--out", help="JSON results")
    args = p.parse_args(argv)
    if args.epochs <= args.warmup + 2:
        p.error("--epochs must exceed --warmup by at least 3")

    from pipeline import build_loader

    options = dict(num_frames=8, stride=4, input_size=64, num_threads=2)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        shards = make_shards(Path(tmp), args.videos, args.frames)
        print(f"bench_soak: {args.videos} videos of {args.frames} frames in {shards}; {args.epochs} epochs", flush=True)
        loader = build_loader(str(shards), "pretrain", args.batch_size, num_repeats=2, **options)
        started, memory, batches = time.perf_counter(), [], 0
        for epoch in range(args.epochs):
            for batch in loader:
                batches += 1
                del batch
            if args.eval_every and epoch % args.eval_every == 0:
                evaluator = build_loader(str(shards), "eval", args.batch_size, eval_clips=2, **options)
                batches += sum(1 for _ in evaluator)
                evaluator.close()
                del evaluator
            gc.collect()
            memory.append(rss_mb())
            if epoch % max(1, args.epochs // 10) == 0 or epoch == args.epochs - 1:
                print(
                    f"  epoch {epoch:4d}: {memory[-1]:8.1f} MB resident, {batches} batches, "
                    f"{loader.stats.corrupt_samples} corrupt sample(s) skipped",
                    flush=True,
                )
        seconds = time.perf_counter() - started
        corrupt = loader.stats.corrupt_samples
        loader.close()

    after = np.asarray(memory[args.warmup :])
    slope = float(np.polyfit(np.arange(len(after)), after, 1)[0])
    report = {
        "benchmark": "bench.bench_soak",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench.bench_soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "epochs": args.epochs,
        "batches": batches,
        "seconds": round(seconds, 1),
        "corrupt_samples": corrupt,
        "rss_mb_after_warmup": round(float(after[0]), 1),
        "rss_mb_end": round(float(after[-1]), 1),
        "rss_mb_peak": round(float(np.max(memory)), 1),
        "growth_mb_per_100_epochs": round(100 * slope, 2),
        "rss_mb_per_epoch": [round(m, 1) for m in memory],
    }
    print(
        f"bench_soak: {args.epochs} epochs ({batches} batches, {seconds:.0f} s): {report['rss_mb_after_warmup']} MB "
        f"after {args.warmup} epochs, {report['rss_mb_end']} MB at the end, peak {report['rss_mb_peak']} MB; "
        f"trend {report['growth_mb_per_100_epochs']:+.2f} MB per 100 epochs",
        flush=True,
    )
    if args.out:
        from shards import format as fmt

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fmt.atomic_write(args.out, json.dumps(report, indent=1))
        print(f"bench_soak: -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
