"""The loader alone reading a shard set from a local S3 server at a fixed bandwidth, against the same set on disk.

    python -m bench.bench_remote --out bench/out/cpu/remote.json           # synthetic set, CPU backend
    python -m bench.bench_remote --shards DIR --rates 5,20,80              # your set, fixed rates in MB/s

Side by side, on the CPU backend, with the same shards, threads and batches (pretraining, K = 1):

  local          pipeline.build_loader(DIR): one DALI reader per epoch over the tars on disk
  local-seg      the same set on disk read in segments (`segmented=True`), as a remote set is read
  s3@R           s3://bench/set on moto's S3 server (127.0.0.1), reached through bench.netlab's proxy limited to R
                 MB/s, read through a cold node-local cache (`shards.cache`) with the default prefetch

Each configuration runs in its own process (fresh cache, fresh S3 client) for `--epochs` epochs. Reported per run:
seconds to the first batch (manifest, index files and the first segment fetched), clips/s after the first batch,
and the bytes that crossed the proxy. From `local` it derives the bandwidth the loader needs at its own rate (clips/s
x shard bytes per sample: each sample's bytes are downloaded once per epoch) and, unless --rates is given, runs s3 at
half and twice that bandwidth and unthrottled: below the need the loader runs at the link's pace (rate / bytes per
sample), above it the prefetch hides the transfer and the loader keeps (about) its local rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.netlab import Throttle, local_s3
from shards import format as fmt

OPTIONS = dict(num_frames=16, stride=4, input_size=112, seed=0)


def child(spec: dict) -> dict:
    """One configuration, in this process: build the loader, read `epochs` epochs, time them."""
    from pipeline import build_loader

    started = time.perf_counter()
    loader = build_loader(
        spec["shards"], "pretrain", spec["batch_size"], num_threads=spec["threads"], **OPTIONS, **spec["options"]
    )
    stamps = []
    for _ in range(spec["epochs"]):
        for batch in loader:
            stamps.append((time.perf_counter(), batch["video"].shape[0]))
    loader.close()
    first = stamps[0][0] - started
    clips = sum(n for _, n in stamps[1:])
    return {
        "first_batch_s": round(first, 3),
        "clips_per_s": round(clips / (stamps[-1][0] - stamps[0][0]), 2),
        "batches": len(stamps),
        "skipped": loader.stats.corrupt_samples,
    }


def run_child(spec: dict, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_remote", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic_set(per_class: int, per_shard: int, workers: int) -> Path:
    """Synthetic 320x240 clips of 5 s (4 classes), as 4-phase cut IVF shards at short side 160, built once."""
    from bench.layouts import make_layout_shards, parse_layout, synthetic_videos

    root = Path(f"bench/out/remote_shards/c{per_class}-s{per_shard}")
    videos = synthetic_videos(root, per_class, "320x240", 125, workers)
    return make_layout_shards(root, parse_layout("cut4"), videos, 160, workers, samples_per_shard=per_shard)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_remote", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="a shard directory (default: a synthetic set under bench/out/remote_shards)")
    p.add_argument("--rates", help="MB/s of the throttled runs, comma-separated (default: from local's need)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))))
    p.add_argument("--per-class", type=int, default=12, help="synthetic set: videos per class (4 classes)")
    p.add_argument("--per-shard", type=int, default=8, help="synthetic set: samples per shard")
    p.add_argument("--segment-shards", type=int, default=2)
    p.add_argument("--prefetch-segments", type=int, default=1)
    p.add_argument("--out", default="bench/out/cpu/remote.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    directory = Path(args.shards or synthetic_set(args.per_class, args.per_shard, args.threads))
    manifest = fmt.read_manifest(directory)
    set_bytes = sum((directory / s["tar"]).stat().st_size for s in manifest["shards"])
    per_sample = set_bytes / manifest["num_samples"]
    largest = max((directory / s["tar"]).stat().st_size for s in manifest["shards"])
    base = dict(batch_size=args.batch_size, threads=args.threads, epochs=args.epochs)
    runs: list[dict] = []
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.bench_remote " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))},
        "set": {"dir": str(directory), "shards": len(manifest["shards"]), "samples": manifest["num_samples"]},
        "bytes_per_sample": round(per_sample),
        "options": {**OPTIONS, **base, "segment_shards": args.segment_shards, "prefetch": args.prefetch_segments},
        "runs": runs,
    }
    seg = dict(segment_shards=args.segment_shards, prefetch_segments=args.prefetch_segments)
    for name, options in (("local", {}), ("local-seg", dict(segmented=True, **seg))):
        spec = {"name": name, "shards": str(directory), "options": options, **base}
        runs.append({"name": name, **run_child(spec, os.environ.copy())})
        print(runs[-1], flush=True)
    need = runs[0]["clips_per_s"] * per_sample / 1e6
    report["need_mb_s"] = round(need, 2)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [need / 2, need * 2, None]
    with local_s3() as (endpoint, env):
        os.environ.update(env)
        from shards.publish import upload

        upload(directory, "s3://bench/set")
        port = int(endpoint.rsplit(":", 1)[1])
        for rate in rates:
            name = f"s3@{rate:.1f}MB/s" if rate else "s3@unthrottled"
            with Throttle(port, rate * 1e6 if rate else None) as proxy, tempfile.TemporaryDirectory() as cache:
                env_run = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
                # a bound below the set (so later epochs download again), above what the readers pin at once
                pinned = (args.prefetch_segments + 1) * (args.segment_shards + 1) * largest
                pinned += 2 * (set_bytes // len(manifest["shards"]))  # index files, manifest
                options = dict(cache_dir=cache, cache_gb=max(pinned, 0.75 * set_bytes) / 2**30, **seg)
                spec = {"name": name, "shards": "s3://bench/set", "options": options, **base}
                result = run_child(spec, env_run)
                runs.append({"name": name, "rate_mb_s": rate, "proxy_mb": round(proxy.bytes_down / 1e6, 2), **result})
                print(runs[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fmt.atomic_write(args.out, json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
