"""`python -m shards.build`: transcode a labelled video collection into WebDataset tar shards for DALI.

    python -m shards.build --csv kinetics400/train.csv --root kinetics400/videos --split train --out shards/k400/train
    python -m shards.build --csv kinetics400/val.csv --root kinetics400/videos --split val --out shards/k400/val \
        --classes shards/k400/train/manifest.json
    python -m shards.build ... --out s3://bucket/k400/train --staging /scratch/k400/train   # build, then publish

An `--out` URL (s3://, gs://) builds into `--staging DIR` (a filesystem: the builder's locks and resume need one)
and, once the build succeeded, publishes it there (`shards.publish`: verified, manifest last, resumable).

Flow: read the inputs (shards.inputs) -> plan: sort by key, shuffle with --seed (shards.plan) -> a process pool
(shards.pool, or Ray tasks, `--executor ray`: shards.executors) transcodes (shards.transcode) while a single writer
consumes the results in plan order through a bounded window (shards.ordered: so the output is the same for any
--workers and at most ~2 x workers videos are held in memory) -> tar shards + DALI indexes (shards.sink,
shards.writer), a resume marker per finished shard (shards.records, shards.resume) -> failures.jsonl, then
manifest.json last. Format: shards/format.py. This module is the command line: the options (shards.options) go to
`shards.run.run_build`.

Partitioned builds, for a cluster (`--part I/N`, or a Slurm array task's SLURM_ARRAY_TASK_ID/COUNT/MIN):

    python -m shards.build ... --out OUT --part 0/3      # any number of these at once, on any machines
    python -m shards.build ... --out OUT --part 1/3      # sharing OUT (a shared file system)
    python -m shards.build ... --out OUT --part 2/3
    python -m shards.merge OUT                           # once all are done: manifest.json and failures.jsonl

Part I builds the contiguous plan positions [I*P//N, (I+1)*P//N) (`shards.plan.part_range`; shards.plan says why
contiguous). Each part writes `{split}-p{III}-NNNNNN.tar`, keeps its own resume state (`OUT/.build/p{III}/`) and
lock, and writes no manifest.

What is a failure of a video, and what is ours. A video that cannot be read, decoded or is too short is recorded in
failures.jsonl and the build goes on. A failure of the machine (a full disk or another I/O error writing the work
files or shards, a worker process killed, ffmpeg killed by a signal from outside) says nothing about the video:
the build stops at once with a one-line error and exit status 75, deleting only the partial shard, so that the
re-run of the same command resumes after the last finished shard and retries those videos (shards.stops). One build
at a time writes a directory, or one build per part of a partitioned build (`shards.resume.BuildLocks`); workers and
ffmpeg die with the build, even when it is SIGKILLed (`shards.transcode.die_with_parent`), and SIGTERM stops it like
Ctrl-C.

Messages: the outcome on stdout, skipped videos and errors on stderr (`shards.logs`), progress on stderr (tqdm).
"""

from __future__ import annotations

import argparse
import math
import sys

from shards import format as fmt
from shards.logs import configure_logging
from shards.options import DEFAULT_SHARD_SIZE_MB, BuildOptions
from shards.run import run_build
from shards.transcode import CODECS


def parse_args(argv: list[str] | None = None) -> BuildOptions:
    """The command line's options, checked and resolved (a usage error exits with status 2)."""
    p = argparse.ArgumentParser(
        prog="python -m shards.build",
        description="Transcode a labelled video collection into WebDataset tar shards + DALI index files.",
    )
    src = p.add_argument_group("inputs (exactly one of --csv, --list, --folders)")
    src.add_argument("--csv", help="Kinetics annotation CSV (label,youtube_id,time_start,time_end,split[,is_cc])")
    src.add_argument(
        "--list",
        dest="list_file",
        metavar="LIST",
        help="list file: one 'relative/path LABEL' per line (LABEL an index or a name)",
    )
    src.add_argument("--folders", help="a folder per class: DIR/<class name>/**/<video>")
    src.add_argument(
        "--root", help="video root for --csv (flat or a folder per label) and --list (default: the list's folder)"
    )
    src.add_argument(
        "--classes",
        help="class names in index order: a text file (one per line), a JSON list, "
        "or a manifest.json to reuse (so val agrees with train)",
    )
    src.add_argument("--all-rows", action="store_true", help="--csv: use every row, ignoring the split column")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="output directory (one split per directory)")
    out.add_argument("--split", required=True, help="split name: shard prefix, and the CSV rows selected")
    out.add_argument(
        "--seed", type=int, default=0, help="shuffle seed for the order of samples across shards (default 0)"
    )
    out.add_argument(
        "--shard-size-mb",
        type=float,
        default=None,
        help=f"start a new shard before one would exceed this size (default {DEFAULT_SHARD_SIZE_MB:.0f} unless "
        "--samples-per-shard is given)",
    )
    out.add_argument("--samples-per-shard", type=int, default=None, help="at most this many samples per shard")
    out.add_argument("--overwrite", action="store_true", help="discard an earlier build in --out and start over")
    _add_transcoding_args(p)
    run = p.add_argument_group("running")
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel transcoding processes (default: the CPUs available); with --executor ray, "
        "half the window of tasks in flight (default: the cluster's CPUs / --threads)",
    )
    run.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per video before ffmpeg is killed (default 600)"
    )
    run.add_argument(
        "--part",
        default=None,
        metavar="I/N",
        help="build only part I of N (I from 0) of the planned videos, beside the other parts in "
        "--out, then `python -m shards.merge OUT` once all are done. Default: a Slurm array "
        "task's (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT) when set, "
        "else the whole build; 'none' ignores Slurm",
    )
    run.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: a process pool on this machine (default); ray: Ray tasks (pip install "
        "videomae-fast[ray]); the output is identical",
    )
    run.add_argument(
        "--ray-address",
        default=None,
        help="--executor ray: the cluster to join (default: RAY_ADDRESS, else a local Ray instance "
        "started and stopped by the build)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        p.error("--samples-per-shard must be >= 1")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be >= 1")
    if args.shard_size_mb is not None and not (math.isfinite(args.shard_size_mb) and args.shard_size_mb > 0):
        p.error(f"--shard-size-mb must be a finite number > 0, got {args.shard_size_mb}")
    return BuildOptions.resolve(**vars(args))


def _add_transcoding_args(p: argparse.ArgumentParser) -> None:
    """The options that decide the bytes of each transcoded video (`EncodeSettings`, and part of the identity)."""
    enc = p.add_argument_group("transcoding")
    enc.add_argument(
        "--codec",
        choices=CODECS,
        default="vp9",
        help="vp9: DALI decodes it on CPU and GPU; h264: GPU (NVDEC) only; mjpeg: intra-only, "
        "cheapest to decode, ~7x larger (default vp9)",
    )
    enc.add_argument(
        "--short-side", type=int, default=320, help="scale so the short side has this many pixels (default 320)"
    )
    enc.add_argument("--fps", type=float, default=None, help="output frame rate (default: the source's)")
    enc.add_argument(
        "--container",
        choices=fmt.CONTAINERS,
        default=None,
        help="ivf: VP9 members the pipeline cuts at the key frame before each clip, so a clip decodes "
        "~gop/2 frames more than its own (default for vp9); mp4: decoded from each member's "
        "start (h264, mjpeg; vp9 for comparison or older readers)",
    )
    enc.add_argument(
        "--gop",
        type=int,
        default=None,
        help="keyframe interval in frames (of each member with --phases). Default: ivf 32, or 16 with "
        "--phases (a clip decodes ~gop/2 extra frames); mp4 16, or 64 with --phases (DALI 2.4 "
        "decodes mp4 members from their start, so fewer key frames only save bytes)",
    )
    enc.add_argument(
        "--quality",
        type=int,
        default=None,
        help="crf for vp9 (default 36) and h264 (default 23); q:v 2-31 for mjpeg (default 3)",
    )
    enc.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ffmpeg threads per video; part of the output's identity (encoders' bytes depend on "
        "it). Parallelism comes from --workers (default 1)",
    )
    enc.add_argument(
        "--phases",
        type=int,
        default=1,
        help="store each video as P members, member p holding frames p, p+P, p+2P, ...: a clip "
        "sampled at a stride that P divides is then consecutive frames near the start of one "
        "member (--phases 4 for VideoMAE's stride 4: ~4x fewer decoded frames per clip with "
        "DALI's decoder; default 1: one member in timeline order; at most 8)",
    )
    enc.add_argument(
        "--min-frames", type=int, default=16, help="skip videos with fewer frames after transcoding (default 16)"
    )
    enc.add_argument(
        "--tolerate-decode-errors",
        action="store_true",
        help="keep videos whose source has decoding errors (ffmpeg conceals them) instead of skipping them",
    )


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    from shards.publish import publish_after_build, staged_argv

    url, staging, argv = staged_argv(sys.argv[1:] if argv is None else list(argv))  # --out URL --staging DIR
    status = run_build(parse_args(argv))
    return publish_after_build(status, staging, url)


if __name__ == "__main__":
    sys.exit(main())
