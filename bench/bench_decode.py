"""Decoding alone: clips/s from DALI's video decoder for VideoMAE's sampling, timeline-order shards against the
same videos stored in stride phases (`shards.build --phases`), side by side in one process.

    python -m bench.bench_decode --out bench/out/cpu/decode.json          # CPU decoder, bench_pipeline's shards
    python -m bench.bench_decode --device gpu --shards .gpu/data/vp9 --phase-shards .gpu/data/vp9p4   # NVDEC

Each pipeline reads the tars (webdataset reader, shuffled), picks 16 frames at stride 4 from a uniform random start
and finds them exactly as the training graph does (`pipeline.graph.train_frame_indices`, `phase_member`), and
decodes them: nothing else, so the figures are the decoder's own rate. This is the rate
that bounds the GPU backend (NVDEC) and the CPU share of hybrid decoding, where augmentation runs on the GPU; the
full CPU pipeline (`bench.bench_pipeline --phases`) also pays for augmentation on the same cores.

A seek probe runs first: the same videos decoded for their first frame and for their last. A decoder that seeks
to the keyframe before a frame costs about the same for both; one that decodes from the start of the stream costs
in proportion to the frame's position (DALI 2.4.0's CPU decoder does, measured on this project's shards). Both
estimates of frames decoded per clip are printed: from the keyframe before the clip, and from the stream's start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench.bench_pipeline import _cpu_name, expected_decoded_frames, frame_counts, make_bench_shards, shard_gop
from shards import format as fmt


def decode_pipeline(tars: list[str], phases: int, device: str, batch_size: int, threads: int, num_frames: int,
                    stride: int, seed: int):
    """A DALI pipeline whose only work is decoding the frames of one training clip per sample (videos stored in
    `phases` phases); outputs the decoded shapes (int64[B, 4]: T, H, W, C)."""
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath

    from pipeline.config import PipelineConfig
    from pipeline.graph import phase_member, train_frame_indices

    cfg = PipelineConfig(mode="pretrain", num_frames=num_frames, stride=stride)
    exts = fmt.video_exts(phases)

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=0 if device == "gpu" else None, seed=seed,
                  prefetch_queue_depth=2, enable_conditionals=phases > 1)
    def decode_only():
        *members, info = fn.readers.webdataset(
            paths=tars, index_paths=[fmt.index_path_for(t) for t in tars], ext=[*exts, fmt.INFO_EXT],
            dtypes=[types.UINT8] * len(exts) + [types.INT32], random_shuffle=True, initial_fill=64, name="reader")
        frame_idx = train_frame_indices(dmath.max(info[0], 1), cfg, fn.random.uniform(range=[0.0, 1.0]))
        mp4, positions = phase_member(members, frame_idx, phases) if phases > 1 else (members[0], frame_idx)
        video = fn.decoders.video(mp4, device="mixed" if device == "gpu" else "cpu", frames=positions)
        return video.shape()

    pipe = decode_only()
    pipe.build()
    return pipe


def seek_probe(tars: list[str], device: str, threads: int, batch_size: int, batches: int = 4) -> dict:
    """Videos/s decoding only the first frame, and only the last frame, of the same videos."""
    from nvidia.dali import fn, pipeline_def, types

    rates = {}
    for which in ("first", "last"):
        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=0 if device == "gpu" else None,
                      prefetch_queue_depth=1)
        def one_frame():
            mp4, info = fn.readers.webdataset(
                paths=tars, index_paths=[fmt.index_path_for(t) for t in tars], ext=[fmt.VIDEO_EXT, fmt.INFO_EXT],
                dtypes=[types.UINT8, types.INT32], name="reader")
            frame = info[0] - 1 if which == "last" else info[0] * 0
            return fn.decoders.video(mp4, device="mixed" if device == "gpu" else "cpu",
                                     frames=fn.cast(frame, dtype=types.INT32)).shape()

        pipe = one_frame()
        pipe.build()
        pipe.run()
        start = time.perf_counter()
        for _ in range(batches):
            pipe.run()
        rates[which] = round(batch_size * batches / (time.perf_counter() - start), 1)
        del pipe
    return rates


def measure(pipe, warmup: int, batches: int, batch_size: int, num_frames: int) -> dict:
    for _ in range(warmup + 2):  # + the prefetch queue, filled during start-up
        pipe.run()
    start = time.perf_counter()
    for _ in range(batches):
        (shapes,) = pipe.run()
        assert all(int(shapes.at(i)[0]) == num_frames for i in range(batch_size))
    seconds = time.perf_counter() - start
    clips = batch_size * batches
    return {"seconds": round(seconds, 3), "clips_per_s": round(clips / seconds, 2),
            "frames_per_s": round(clips * num_frames / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="timeline-order shards (default: bench_pipeline's synthetic set, built if absent)")
    p.add_argument("--phase-shards", help="the same videos built with --phases (default: built beside --shards' "
                                          "synthetic set)")
    p.add_argument("--phases", type=int, default=4, help="phases of the synthetic phase-ordered set (default 4)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="cpu decoder or mixed (NVDEC)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=16, help="timed batches per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the ratio is the median")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--gop", type=int, default=16,
                   help="keyframe interval of shards without a manifest, for the frame estimate")
    p.add_argument("--out", help="JSON results")
    args = p.parse_args(argv)
    if bool(args.shards) != bool(args.phase_shards):
        p.error("give both --shards and --phase-shards, or neither (synthetic sets)")
    if not args.shards:
        build = lambda phases: str(make_bench_shards(  # noqa: E731
            Path("bench/out/pipeline_shards"), 8, "426x240", 250, 240, args.threads, phases))
        args.shards, args.phase_shards = build(1), build(args.phases)

    layouts = {"timeline": fmt.resolve_shards(args.shards), "phases": fmt.resolve_shards(args.phase_shards)}
    counts = frame_counts(layouts["timeline"])
    if sorted(frame_counts(layouts["phases"])) != sorted(counts):
        p.error(f"{args.phase_shards}: not the same videos as {args.shards} (frame counts differ)")
    from pipeline.shardset import ShardSet

    phases = ShardSet(layouts["phases"]).phases
    estimate = {"timeline": expected_decoded_frames(counts, args.num_frames, args.stride,
                                                    shard_gop(args.shards, args.gop)),
                "phases": expected_decoded_frames(counts, args.num_frames, args.stride,
                                                  shard_gop(args.phase_shards, args.gop), phases)}
    from_start = {"timeline": expected_decoded_frames(counts, args.num_frames, args.stride, None),
                  "phases": expected_decoded_frames(counts, args.num_frames, args.stride, None, phases)}
    print(f"bench_decode: {len(counts)} videos, mean {np.mean(counts):.0f} frames, {phases} phases; {args.device} "
          f"decoder, {args.threads} threads, batch {args.batch_size}. Frames decoded per clip, timeline vs phases: "
          f"~{estimate['timeline']:.1f} vs ~{estimate['phases']:.1f} seeking to the keyframe before the clip, "
          f"~{from_start['timeline']:.1f} vs ~{from_start['phases']:.1f} decoding from the stream's start",
          flush=True)
    probe = seek_probe(layouts["timeline"], args.device, args.threads, args.batch_size)
    probe["verdict"] = "decodes from the start" if probe["first"] > 3 * probe["last"] else "seeks"
    print(f"  seek probe: {probe['first']} videos/s decoding each video's first frame, {probe['last']} its last "
          f"({probe['first'] / probe['last']:.1f}x: {probe['verdict']})", flush=True)

    runs: list[dict] = []
    for round_index in range(args.rounds):
        for layout, tars in layouts.items():
            pipe = decode_pipeline(tars, phases if layout == "phases" else 1, args.device, args.batch_size,
                                   args.threads, args.num_frames, args.stride, seed=round_index)
            result = measure(pipe, args.warmup, args.batches, args.batch_size, args.num_frames)
            del pipe
            result.update(layout=layout, round=round_index)
            runs.append(result)
            print(f"  round {round_index} {layout:8s}: {result['clips_per_s']:8.2f} clips/s", flush=True)
    ratios = [b["clips_per_s"] / a["clips_per_s"] for a, b in zip(runs[::2], runs[1::2])]
    ratio = float(np.median(ratios))
    print(f"  ratio phases / timeline: {ratio:.2f}x clips/s (median of {len(ratios)}: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    if args.out:
        report = {
            "benchmark": "bench.bench_decode", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m bench.bench_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"platform": platform.platform(), "processor": _cpu_name(), "threads": args.threads,
                        "gpu": _gpu_name() if args.device == "gpu" else None},
            "settings": {k: v for k, v in vars(args).items() if k != "out"}, "phases": phases,
            "decoded_frames_per_clip_est": {"seeking": estimate, "from_start": from_start}, "seek_probe": probe,
            "runs": runs, "ratio": round(ratio, 2),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.out)
        print(f"bench_decode: -> {args.out}")
    return 0


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    sys.exit(main())
