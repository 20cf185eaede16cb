"""Input-pipeline throughput: this DALI pipeline against VideoMAE-style baselines (decord + DataLoader, torchcodec).

    python -m bench.bench_pipeline --out bench/out/pipeline_cpu.json                 # CPU backend, this machine
    python -m bench.bench_pipeline --layouts timeline,phases4,cut4                   # the same videos, 3 layouts
    python -m bench.bench_pipeline --device gpu --batch-size 32 --out bench/out/pipeline_h100.json \
        --shards timeline=/data/k400/train                                            # GPU backend on an H100

Both loaders read the same tar shards on the same machine and cores, produce the same pretraining batches (16
frames at stride 4 from a uniform random start, VideoMAE's multi-scale crop to 224, ImageNet normalization, a
90% tube mask; K views per decoded clip) and deliver them on the training device:

  dali      pipeline.build_loader(mode="pretrain", device=cpu|gpu, num_threads=N): N CPU threads in all, split
            between the loader's pipelines (pipeline.plan)
  baseline  a torch DataLoader with N workers over the same tars (the `webdataset` package), each sample decoded
            with decord's VideoReader (VideoMAE's loader) at the official indices, cropped, resized (torch bilinear,
            antialiased), normalized and masked per view in Python/torch; pinned and copied to the GPU with
            --device gpu. It reads the first layout (timeline order, as VideoMAE's loader reads videos).
  torchcodec the same per-sample work with PyTorch's decoder on N threads of the benchmark process instead of
            worker processes (bench.baselines; skipped with one line where FFmpeg's libraries are missing).

`--layouts` runs dali on the same videos stored in several shard layouts (`bench.layouts`: timeline order,
stride phases in MP4, stride phases in IVF cut at key frames, ...). For K = 1, 2, 4 it reports, after `--warmup`
batches, emitted clips/s (views, B*K per batch), decoded clips/s (B per batch), frames/s delivered (decoded clips
x T) and the frames/s DALI actually decodes (decoded clips x the layout's decoded frames per clip, computed from the
shards: `bench.layouts.decoded_frames_per_clip`), plus the ratios dali / baseline and each layout / the first two
(median over `--rounds` alternating rounds). `--sweep` adds runs over decode threads (dali) and workers (baseline)
at K=1, for a plot; `--decode-sweep` compares the GPU backend's decoding strategies (NVDEC instances, CPU decoding
threads feeding GPU augmentation, or both) before anything else. Without --shards, synthetic VP9 shards
(shards.synth + shards.build, Kinetics-like 10 s clips) are built once per layout under bench/out/pipeline_shards.
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
import torch

from bench.baselines import BASELINES, baseline_batches, torchcodec_available
from shards import format as fmt


# -- shards -----------------------------------------------------------------------------------------------------
def layout_sets(shards: str | None, layouts: str, args) -> dict[str, str]:
    """{layout name: shard directory or pattern}: `shards` as NAME=DIR,... (or one DIR, named after the first
    layout), else synthetic sets built once per layout (bench.layouts) from one set of videos."""
    from bench.layouts import make_layout_shards, parse_layout, synthetic_videos

    if shards:
        if "=" not in shards:
            return {layouts.split(",")[0]: shards}
        return dict(item.split("=", 1) for item in shards.split(","))
    root = Path("bench/out/pipeline_shards")
    videos = synthetic_videos(root, args.synth_per_class, args.synth_size, args.synth_frames, args.cores)
    return {
        spec.name: str(make_layout_shards(root, spec, videos, 240, args.cores))
        for spec in (parse_layout(name) for name in layouts.split(","))
    }


def dali_batches(
    shards, batch_size, threads, repeats, t, stride, size, device, strategy: dict, built: dict | None = None
):
    """Batches of pipeline.build_loader without end; `strategy`: its decoding options (decoder_groups,
    cpu_decoder_groups, pipelines, decode); the loader is put in `built["loader"]` once made."""
    from pipeline import build_loader

    loader = build_loader(
        shards,
        "pretrain",
        batch_size,
        device=device.type.replace("cuda", "gpu"),
        num_frames=t,
        stride=stride,
        input_size=size,
        num_repeats=repeats,
        num_threads=threads,
        **strategy,
    )
    if built is not None:
        built["loader"] = loader
    while True:
        yield from loader


def parse_decode_spec(spec: str, cores: int) -> tuple[int, dict]:
    """--decode-sweep entry -> (the rank's CPU threads, loader options): "G:C[:threads[:pipelines]]" (decoder
    groups, of them on CPU threads, the threads of all pipelines together (default --cores; each pipeline gets
    threads // pipelines), DALI pipelines) or "auto[:threads]" (the loader times its candidate strategies at start,
    each with its share of those threads, and keeps the fastest: decode="auto")."""
    fields = spec.split(":")
    if fields[0] == "auto":
        return (int(fields[1]) if len(fields) > 1 else cores), {"decode": "auto"}
    values = [int(v) for v in fields]
    threads = values[2] if len(values) > 2 else cores
    pipelines = values[3] if len(values) > 3 else 1
    return threads, {"decoder_groups": values[0], "cpu_decoder_groups": values[1], "pipelines": pipelines}


# -- measurement ------------------------------------------------------------------------------------------------
def measure(batches, warmup: int, count: int, batch_size: int, repeats: int, t: int, device) -> dict:
    start_wall = time.perf_counter()
    for _ in range(warmup):
        batch = next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        batch = next(batches)
        assert batch["video"].shape[0] == batch_size * repeats
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    clips = batch_size * count
    return {
        "seconds": round(seconds, 3),
        "startup_and_warmup_s": round(start - start_wall, 3),
        "decoded_clips_per_s": round(clips / seconds, 2),
        "clips_per_s": round(clips * repeats / seconds, 2),
        "frames_per_s": round(clips * t / seconds, 1),
    }


def run(
    kind: str, n: int, repeats: int, args, tars, device, decode: dict | None = None, layout: str = "timeline"
) -> dict:
    """One loader at one setting; `decode`: dali's decoding options (parse_decode_spec; default: the args'
    decoder groups); `layout` names the shards' layout (bench.layouts)."""
    decode = decode or {"decoder_groups": args.decoder_groups, "cpu_decoder_groups": args.cpu_decoder_groups}
    built: dict = {}
    if kind == "dali":
        batches = dali_batches(
            tars, args.batch_size, n, repeats, args.num_frames, args.stride, args.input_size, device, decode, built
        )
    else:
        batches = baseline_batches(
            "decord" if kind == "baseline" else kind,
            tars,
            args.batch_size,
            n,
            repeats,
            args.num_frames,
            args.stride,
            args.input_size,
            device,
        )
    # Batches a loader makes ahead (DataLoader: workers x prefetch_factor; DALI: its prefetch queue) are consumed
    # untimed, so the timed window sees steady-state production, not a queue filled during start-up.
    queued = {"baseline": 2 * n, "torchcodec": 1}.get(kind, 2)
    result = measure(batches, args.warmup + queued, args.batches, args.batch_size, repeats, args.num_frames, device)
    result["decoded_frames_per_s_est"] = round(result["decoded_clips_per_s"] * args.decoded_per_clip[layout], 1)
    setting = {"threads": n, **decode} if kind == "dali" else {"workers": n} if kind == "baseline" else {"threads": n}
    result.update(loader=kind, layout=layout, repeats=repeats, **setting)
    strategy = ""
    if kind == "dali":  # the strategy that ran (decode=auto: the one the loader chose, and what it timed)
        cfg = built["loader"].cfg
        result.update(
            decoder_groups=cfg.decoder_groups,
            cpu_decoder_groups=cfg.cpu_decoder_groups,
            pipelines=cfg.pipelines,
            pipeline_threads=built["loader"].pipeline_threads,  # as DALI built them: n split between the pipelines
        )
        if built["loader"].decode_table:
            result["decode_table"] = built["loader"].decode_table
        strategy = (
            f"{' auto ->' if cfg.decode == 'auto' else ''} groups={cfg.decoder_groups} "
            f"cpu_groups={cfg.cpu_decoder_groups} pipelines={cfg.pipelines} "
            f"(threads {'+'.join(map(str, result['pipeline_threads']))})"
        )
    del batches, built
    strategy += f" {layout}"
    print(
        f"  {kind:10s} K={repeats} {'workers' if kind == 'baseline' else 'threads'}={n}{strategy}: "
        f"{result['clips_per_s']:8.2f} clips/s  {result['decoded_clips_per_s']:7.2f} decoded clips/s  "
        f"{result['frames_per_s']:8.1f} frames/s",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shards",
        help="shard directory/pattern, or NAME=DIR,... one per layout (default: synthetic "
        "shards built under bench/out, one set per --layouts entry)",
    )
    p.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help="baselines to run beside dali: decord (DataLoader workers), torchcodec (threads)",
    )
    p.add_argument(
        "--layouts",
        default="timeline",
        help="dali on these layouts of the same videos (bench.layouts: timeline, phases4, cut4, cut1, "
        "optionally :GOP); the baseline reads the first, which must be in timeline order",
    )
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=12, help="timed batches per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds per K; ratios are the median")
    p.add_argument("--repeats", default="1,2,4", help="K values")
    p.add_argument(
        "--shard-repeat",
        type=int,
        default=1,
        help="read the shard list this many times per epoch (small benchmark sets: epochs as long as a real dataset's)",
    )
    p.add_argument(
        "--cores",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="dali decode threads (all pipelines together) and baseline workers in the main comparison "
        "(default: all cores)",
    )
    p.add_argument("--sweep", default="1,2,4", help="threads/workers for the K=1 sweep ('' to skip)")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--decoder-groups", type=int, default=1, help="dali: concurrent decoder instances (GPU)")
    p.add_argument(
        "--cpu-decoder-groups",
        type=int,
        default=0,
        help="dali, GPU backend: how many of the decoder groups decode on CPU threads (hybrid)",
    )
    p.add_argument(
        "--decode-sweep",
        default="",
        help="dali only: decoding strategies G:C[:N[:P]] (decoder groups : of them on the CPU : "
        "CPU threads of all pipelines together, default --cores, each pipeline getting N // P : DALI pipelines, "
        "default 1) or auto[:N] (the loader's decode=auto) to compare at K=--decode-sweep-k, e.g. "
        "'1:0,1:0:32,2:0,1:1,4:3,1:0:16:2,auto'. DALI's mixed decoder decodes as many videos at once as the "
        "pipeline has threads; a pipeline's decoder groups share its pool",
    )
    p.add_argument("--decode-sweep-k", type=int, default=2)
    p.add_argument("--synth-size", default="426x240", help="synthetic videos: WIDTHxHEIGHT before transcoding")
    p.add_argument("--synth-frames", type=int, default=250, help="synthetic videos: frames (10 s at 25 fps)")
    p.add_argument("--synth-per-class", type=int, default=8)
    p.add_argument("--out", help="JSON results")
    args = p.parse_args(argv)

    device = torch.device("cuda", 0) if args.device == "gpu" else torch.device("cpu")
    from bench.layouts import layout_summary
    from pipeline.shardset import ShardSet

    sets = layout_sets(args.shards, args.layouts, args)
    # Repeating the shard list lengthens an epoch without more data: a loader's per-epoch costs (DALI builds a
    # pipeline per epoch; DataLoader reshuffles) then weigh as they would on a real dataset, not every few batches.
    layouts = {name: fmt.resolve_shards(spec) * args.shard_repeat for name, spec in sets.items()}
    summary = {
        name: layout_summary(fmt.resolve_shards(sets[name]), ShardSet(tars).phases, args.num_frames, args.stride)
        for name, tars in layouts.items()
    }
    if len({(s["videos"], s["mean_frames"]) for s in summary.values()}) != 1:
        p.error(f"the shard sets do not hold the same videos: {summary}")
    first = next(iter(layouts))
    baselines_run = args.baselines and (args.repeats or args.sweep)  # a decode sweep alone reads no baseline
    if baselines_run and ShardSet(layouts[first]).phases != 1:
        p.error(f"the first layout ({first}) is read by the baseline too: it must be in timeline order")
    args.decoded_per_clip = {name: s["decoded_frames_per_clip"] for name, s in summary.items()}
    per_clip = ", ".join(
        f"{s['decoded_frames_per_clip']:.1f} ({name}, {s['bytes_per_video'] / 1e3:.0f} kB/video)"
        for name, s in summary.items()
    )
    stats = summary[first]
    print(
        f"bench_pipeline: {stats['videos']} videos, {len(layouts[first])} shards per epoch, mean "
        f"{stats['mean_frames']:.0f} frames; frames DALI decodes per clip: {per_clip}; device {args.device}, "
        f"{args.cores} cores",
        flush=True,
    )

    results: list[dict] = []
    sweep: list[dict] = []
    decode_sweep: list[dict] = []
    ratios: dict = {}

    def save() -> None:  # after every run: a run cut short by a time limit keeps what was measured
        report = {
            "benchmark": "bench.bench_pipeline",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m bench.bench_pipeline " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {
                "platform": platform.platform(),
                "processor": _cpu_name(),
                "cores": args.cores,
                "gpu": torch.cuda.get_device_name(0) if args.device == "gpu" else None,
            },
            "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "dataset": {
                "videos": stats["videos"],
                "shards_per_epoch": len(layouts[first]),
                "mean_frames": stats["mean_frames"],
            },
            "shards": sets,
            "layouts": summary,
            "results": results,
            "ratios": ratios,
            "sweep": sweep,
            "decode_sweep": decode_sweep,
        }
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            fmt.atomic_write(args.out, json.dumps(report, indent=1))

    # Decoding strategies first when asked for: which one feeds a GPU fastest is the question a time-limited GPU
    # run most needs answered. Then the comparison with the baseline.
    for spec in [x for x in args.decode_sweep.split(",") if x]:
        threads, strategy = parse_decode_spec(spec, args.cores)
        for layout, layout_tars in layouts.items():
            decode_sweep.append(
                dict(run("dali", threads, args.decode_sweep_k, args, layout_tars, device, strategy, layout), spec=spec)
            )
            save()
    # the loaders compared, alternated within each round so that drift on a shared machine hits all of them
    baselines = [name for name in args.baselines.split(",") if name]
    if "torchcodec" in baselines and (why := torchcodec_available()):
        print(f"  torchcodec baseline skipped: {why}", flush=True)
        baselines.remove("torchcodec")
    kinds = [{"decord": "baseline"}.get(name, name) for name in baselines]
    loaders = [(kind, first) for kind in kinds] + [("dali", layout) for layout in layouts]
    for round_index in range(args.rounds):
        for repeats in [int(k) for k in args.repeats.split(",") if k]:
            for kind, layout in loaders:
                results.append(
                    dict(
                        run(kind, args.cores, repeats, args, layouts[layout], device, layout=layout), round=round_index
                    )
                )
                save()
    # (loader, baseline) pairs: dali on every layout against the VideoMAE-style baseline, then each layout against
    # the first two (timeline order; the layout before the newest)
    names = list(layouts)
    pairs = [(("dali", layout), (kind, first)) for kind in kinds for layout in layouts]
    pairs += [(("dali", layout), ("dali", base)) for base in names[:2] for layout in names if layout != base]
    for repeats in sorted({r["repeats"] for r in results}):
        per_round = [
            {(r["loader"], r["layout"]): r for r in results if r["repeats"] == repeats and r["round"] == i}
            for i in range(args.rounds)
        ]
        for this, base in pairs:
            name = " ".join([f"K={repeats}", this[1], "vs", base[0]] + ([base[1]] if base[0] == "dali" else []))
            ratios[name] = {
                key: round(float(np.median([p[this][key] / p[base][key] for p in per_round])), 2)
                for key in ("clips_per_s", "decoded_clips_per_s")
            }
            print(
                f"  ratio {' '.join(this)} / {' '.join(base)}, K={repeats}: {ratios[name]['clips_per_s']:.2f}x "
                f"clips/s (median of {args.rounds} round(s))"
            )
    save()
    for n in [int(x) for x in args.sweep.split(",") if x]:
        for kind, layout in loaders:
            sweep.append(run(kind, n, 1, args, layouts[layout], device, layout=layout))
            save()
    if args.out:
        print(f"bench_pipeline: -> {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
