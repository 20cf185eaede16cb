"""`python -m shards.build`: transcode a labelled video collection into WebDataset tar shards for DALI.

    python -m shards.build --csv kinetics400/train.csv --root kinetics400/videos --split train --out shards/k400/train
    python -m shards.build --csv kinetics400/val.csv --root kinetics400/videos --split val --out shards/k400/val \
        --classes shards/k400/train/manifest.json

Flow: read the inputs (shards.inputs) -> plan: sort by key, shuffle with --seed -> a process pool (or Ray tasks,
`--executor ray`: shards.executors) transcodes (shards.transcode) while a single writer consumes the results in plan
order through a bounded window (so the output is the same for any --workers and at most ~2 x workers videos are held
in memory) -> tar shards + DALI indexes (shards.writer), a resume marker per finished shard (shards.resume) ->
failures.jsonl, then manifest.json last. Format: shards/format.py.

Partitioned builds, for a cluster (`--part I/N`, or a Slurm array task's SLURM_ARRAY_TASK_ID/COUNT/MIN):

    python -m shards.build ... --out OUT --part 0/3      # any number of these at once, on any machines
    python -m shards.build ... --out OUT --part 1/3      # sharing OUT (a shared file system)
    python -m shards.build ... --out OUT --part 2/3
    python -m shards.merge OUT                           # once all are done: manifest.json and failures.jsonl

Part I builds the contiguous plan positions [I*P//N, (I+1)*P//N) (`part_range`): contiguous, not strided, so that
the parts concatenated in order are the plan order of a one-machine build, and the merge only has to shift each
part's sample ids by the samples before it (no sample moves between files; see shards.format and shards.merge).
The plan is shuffled, so a contiguous range is as balanced a share of the work as a strided one. Each part writes
`{split}-p{III}-NNNNNN.tar`, keeps its own resume state (`OUT/.build/p{III}/`) and lock, and writes no manifest.

What is a failure of a video, and what is ours. A video that cannot be read, decoded or is too short is recorded in
failures.jsonl and the build goes on. A failure of the machine (a full disk or another I/O error writing the work
files or shards, a worker process killed, ffmpeg killed by a signal from outside) says nothing about the video:
the build stops at once with a one-line error and exit status 75, deleting only the partial shard, so that the
re-run of the same command resumes after the last finished shard and retries those videos. One build at a time
writes a directory, or one build per part of a partitioned build (`shards.resume.BuildLocks`); workers and ffmpeg
die with the build, even when it is SIGKILLed (`shards.transcode.die_with_parent`), and SIGTERM stops it like
Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from tqdm import tqdm

from shards import format as fmt

# Ray itself is imported only for --executor ray (shards.executors.import_ray)
from shards.executors import ExecutorUnavailable, import_ray, ray_ordered_transcodes, ray_session
from shards.inputs import InputError, InputSet, VideoInput, collect_inputs
from shards.resume import BuildConflict, BuildLocked, BuildLocks, BuildState, inputs_digest
from shards.transcode import (
    CODECS,
    EncodeSettings,
    TranscodeAborted,
    TranscodeResult,
    default_gop,
    die_with_parent,
    ffmpeg_version,
    transcode,
)
from shards.writer import ShardWriter, member_bytes

MAX_PRINTED_FAILURES = 20
EXIT_RETRY = 75  # sysexits' EX_TEMPFAIL: stopped by a failure of our own side; re-run the same command to resume
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class BuildStopped(Exception):
    """The build cannot go on for a reason that is not a video's (one-line message); a re-run resumes."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the build stops as on Ctrl-C. A BaseException, so that no
    `except Exception` (transcode's, for one) takes it for a problem of a video."""


def split_name_problem(split: str) -> str | None:
    """Why `split` cannot name shard files inside --out (`{split}-NNNNNN.tar`), or None."""
    if not split:
        return "it is empty"
    if "/" in split or "\\" in split or os.sep in split:
        return "it contains a path separator"
    if ".." in split:
        return "it contains '..'"
    if not _SPLIT_NAME.fullmatch(split):
        return "use letters, digits, '_', '-' and '.' (not first)"
    return None


def describe_own_failure(error: BaseException) -> str:
    """One line for a failure of our own side: the file or folder and the errno text, or what died."""
    if isinstance(error, OSError):
        code = errno.errorcode.get(error.errno, str(error.errno)) if error.errno is not None else "?"
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error} ({code})"
    if isinstance(error, BrokenProcessPool):
        return "a transcoding worker process died (killed by a signal, or out of memory)"
    return " ".join(str(error).split())


def _own_failures_stop(item: VideoInput, get: Callable[[], TranscodeResult]) -> TranscodeResult:
    """`get()`, with a failure of our own side (disk full, a killed worker or ffmpeg) turned into BuildStopped
    naming the video it happened on: that video is retried by the next run, never recorded as bad."""
    try:
        return get()
    except BrokenProcessPool as e:
        raise BuildStopped(describe_own_failure(e)) from e
    except (OSError, TranscodeAborted) as e:
        raise BuildStopped(f"{describe_own_failure(e)} while transcoding {item.source}") from e


def plan_order(videos: list[VideoInput], seed: int) -> list[VideoInput]:
    """The order samples are written in: sorted by key (independent of listing order), then shuffled by seed."""
    order = sorted(videos, key=lambda v: v.key)
    random.Random(seed).shuffle(order)
    return order


def part_range(plan_size: int, index: int, count: int) -> tuple[int, int]:
    """The plan positions [start, end) that part `index` of `count` builds: contiguous, sizes differing by at
    most one, together every position exactly once (see the module docstring for why contiguous)."""
    return index * plan_size // count, (index + 1) * plan_size // count


def parse_part(spec: str) -> tuple[int, int] | None:
    """`--part I/N` as (I, N); None for 'none'. ValueError (one line) when it is neither."""
    if spec.strip().lower() == "none":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m:
        raise ValueError(f"--part {spec!r}: expected I/N, e.g. 0/4 (part I of N, I from 0), or 'none'")
    index, count = int(m[1]), int(m[2])
    if count < 1 or index >= count:
        raise ValueError(f"--part {spec}: I must be 0..N-1 and N at least 1")
    return index, count


def slurm_part(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(I, N) of a Slurm array task, or None outside one: I = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
    SLURM_ARRAY_TASK_STEP, N = SLURM_ARRAY_TASK_COUNT, so `--array=1-8` and `--array=0-14:2` work as `0-7`.
    ValueError (one line) for an array that is not one evenly spaced range (`--array=1,4,5`)."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        last = int(env.get("SLURM_ARRAY_TASK_MAX", first + (count - 1) * step))
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"Slurm array task: SLURM_ARRAY_TASK_ID/COUNT/MIN/MAX/STEP unreadable ({e}); pass --part I/N"
        ) from None
    index, off_step = divmod(task - first, step) if step > 0 else (-1, 0)
    if off_step or not 0 <= index < count or last != first + (count - 1) * step:
        raise ValueError(
            f"Slurm array task {task}: the array (min {first}, max {last}, step {step}, {count} tasks) is "
            f"not one evenly spaced range; pass --part I/N (or --part none)"
        )
    return index, count


def resolve_part(spec: str | None, env: Mapping[str, str]) -> tuple[int, int] | None:
    """The part this build makes: --part when given, else the Slurm array task's, else None (the whole plan)."""
    return parse_part(spec) if spec is not None else slurm_part(env)


def _init_worker(parent_pid: int) -> None:
    """Workers leave Ctrl-C to the main process, which stops the build (ffmpeg children still stop at once), and die
    with it, however it dies: a worker outliving a SIGKILLed build would go on writing into its directory."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if os.getppid() != parent_pid:  # the build died before the line above took effect
        os._exit(1)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's workers now, with their ffmpeg (which dies with its worker), instead of waiting for the
    transcodes in flight, which can take minutes; a re-run redoes them."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.kill()


def ordered_transcodes(
    items: list[VideoInput], settings: EncodeSettings, workers: int, workdir: str, window: int | None = None
) -> Iterator[tuple[VideoInput, TranscodeResult]]:
    """Transcode `items` on `workers` processes, yielding results in the order of `items`.

    At most `window` transcodes are submitted ahead of the one the writer waits for, which bounds memory (each
    finished result holds its video bytes) and still lets fast videos run past a slow one.
    """
    if workers <= 1:
        for item in items:
            yield item, _own_failures_stop(item, lambda: transcode(item.source, settings, workdir))
        return
    window = window or 2 * workers
    # spawn: the pool may be started from a process that already runs threads (DALI, torch, pytest); forking
    # such a process can deadlock. Workers need little more than shards.transcode.
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(os.getpid(),)
    )
    pending: deque = deque()
    try:
        feed = iter(items)
        for item in itertools.islice(feed, window):
            pending.append((item, pool.submit(transcode, item.source, settings, workdir)))
        while pending:
            item, future = pending.popleft()
            result = _own_failures_stop(item, future.result)
            nxt = next(feed, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(transcode, nxt.source, settings, workdir)))
            yield item, result
    finally:
        if pending:  # stopped early (an error, Ctrl-C, SIGTERM, the consumer gone): do not wait for the rest
            _kill_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def executor_transcodes(
    args: argparse.Namespace, items: list[VideoInput], settings: EncodeSettings, workdir: str
) -> Iterator[Iterator[tuple[VideoInput, TranscodeResult]]]:
    """The results of transcoding `items` in plan order, from the executor --executor names (the process pool, or
    Ray tasks: shards.executors); sets args.workers when Ray chooses it. The generator is closed on leaving."""
    if args.executor != "ray" or not items:  # nothing to do needs no Ray
        with contextlib.closing(ordered_transcodes(items, settings, args.workers or 1, workdir)) as ordered:
            yield ordered
        return
    with ray_session(args.ray_address) as cpus:
        args.workers = args.workers or max(1, cpus // settings.threads)
        with contextlib.closing(ray_ordered_transcodes(items, settings, workdir, 2 * args.workers)) as ordered:
            yield ordered


def sample_members(
    item: VideoInput, result: TranscodeResult, label: int, sample_id: int, codec: str
) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in the order format.py lists them."""
    info = result.info
    meta = {
        "key": item.key,
        "source": item.source,
        "label": label,
        "label_name": item.label_name,
        "fps": round(info.fps, 6),
        "num_frames": info.num_frames,
        "width": info.width,
        "height": info.height,
        "duration": round(info.duration, 6),
        "codec": codec,
        "sample_id": sample_id,
    }
    videos = result.videos
    if len(videos) > 1:
        meta["phases"] = len(videos)
    container = fmt.IVF_EXT if result.cuts is not None else fmt.VIDEO_EXT
    return [
        *zip(fmt.video_exts(len(videos), container), videos),
        *([(fmt.CUTS_EXT, result.cuts)] if result.cuts is not None else []),
        (fmt.LABEL_EXT, str(label).encode()),
        (fmt.META_EXT, fmt.pack_meta(meta)),
        (fmt.INFO_EXT, fmt.pack_info(info.num_frames, label, sample_id)),
    ]


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class ShardSink:
    """Groups transcoded samples into shards in plan order and records a resume marker per finished shard."""

    def __init__(
        self,
        state: BuildState,
        codec: str,
        classes_index,
        kept: list[dict],
        max_bytes: int | None,
        max_samples: int | None,
    ) -> None:
        self.state, self.prefix, self.codec, self.label_of = state, state.prefix, codec, classes_index
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.markers = list(kept)
        # a part numbers its samples from its first plan position on (provisional ids; shards.merge renumbers)
        self.next_sample_id = state.id_base + sum(m["num_samples"] for m in kept)
        self.position = kept[-1]["plan_end"] if kept else 0  # plan position the next open shard starts at
        self.writer: ShardWriter | None = None
        self.pending_failures: list[dict] = []
        self.shard_frames = 0
        self.shard_duration = 0.0

    def add_failure(self, item: VideoInput, reason: str) -> None:
        self.pending_failures.append({"source": item.source, "key": item.key, "reason": reason})

    def add_sample(self, position: int, item: VideoInput, result: TranscodeResult) -> None:
        label = self.label_of(item.label_name)
        members = sample_members(item, result, label, self.next_sample_id, self.codec)
        size = sum(member_bytes(len(data)) for _, data in members)
        if self.writer is not None and (
            (self.max_samples and len(self.writer.keys) >= self.max_samples)
            or (self.max_bytes and self.writer.bytes_written + size > self.max_bytes)
        ):
            self.close_shard(position)
        if self.writer is None:
            self.writer = ShardWriter(
                self.state.out_dir, fmt.shard_name(self.prefix, len(self.markers)), self.state.work_dir
            )
            self.first_sample_id = self.next_sample_id
        self.writer.add_sample(item.key, members)
        self.next_sample_id += 1
        self.shard_frames += result.info.num_frames
        self.shard_duration += result.info.duration

    def close_shard(self, plan_end: int) -> None:
        """Finish the open shard; it owns plan positions [self.position, plan_end) and their failures."""
        record = self.writer.close()
        marker = {
            "shard": len(self.markers),
            "tar": record.tar,
            "index": record.index,
            "num_samples": record.num_samples,
            "bytes": record.bytes,
            "sha256": record.sha256,
            "first_sample_id": self.first_sample_id,
            "plan_start": self.position,
            "plan_end": plan_end,
            "keys": record.keys,
            "failures": self.pending_failures,
            "num_frames": self.shard_frames,
            "duration": round(self.shard_duration, 6),
        }
        self.state.record_shard(marker)
        self.markers.append(marker)
        self.writer, self.pending_failures = None, []
        self.position, self.shard_frames, self.shard_duration = plan_end, 0, 0.0

    def finish(self, plan_end: int) -> list[dict]:
        """Close the last shard; returns the failures that belong to no shard (only when no shard was written)."""
        if self.writer is not None:
            self.close_shard(plan_end)
            return []
        if self.markers and self.pending_failures:
            # Failures after the last written shard of an earlier run cannot happen (the last shard is closed
            # at the end of the plan), but stay safe: attach them to the last shard's record.
            self.markers[-1]["failures"].extend(self.pending_failures)
            self.pending_failures = []
        return self.pending_failures

    def abort(self) -> None:
        """Drop the open shard (its videos are redone by the next run, its failures recorded again then)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m shards.build",
        description="Transcode a labelled video collection into WebDataset tar shards + DALI index files.",
    )
    src = p.add_argument_group("inputs (exactly one of --csv, --list, --folders)")
    src.add_argument("--csv", help="Kinetics annotation CSV (label,youtube_id,time_start,time_end,split[,is_cc])")
    src.add_argument("--list", help="list file: one 'relative/path LABEL' per line (LABEL an index or a name)")
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
        help="start a new shard before one would exceed this size (default 1000 unless --samples-per-shard is given)",
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
    if args.shard_size_mb is None and args.samples_per_shard is None:
        args.shard_size_mb = 1000.0
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        p.error("--samples-per-shard must be >= 1")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be >= 1")
    if args.workers is None and args.executor == "local":
        args.workers = len(os.sched_getaffinity(0))
    return args


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


def _read_inputs(args: argparse.Namespace) -> tuple[InputSet, EncodeSettings]:
    """The inputs and the encoder settings (InputError or ValueError: a one-line message)."""
    inputs = collect_inputs(
        csv_path=args.csv,
        list_path=args.list,
        folders=args.folders,
        root=args.root,
        split=args.split,
        classes_file=args.classes,
        all_rows=args.all_rows,
    )
    if args.container is None:
        args.container = EncodeSettings(codec=args.codec).effective_container
    if args.gop is None:
        args.gop = default_gop(args.container, args.phases)
    settings = EncodeSettings(
        codec=args.codec,
        short_side=args.short_side,
        fps=args.fps,
        gop=args.gop,
        quality=args.quality,
        threads=args.threads,
        min_frames=args.min_frames,
        timeout=args.timeout,
        tolerate_decode_errors=args.tolerate_decode_errors,
        phases=args.phases,
        container=args.container,
    )
    return inputs, settings


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated in the main thread, so a stopped build deletes its partial shard
    and stops its workers (signals can only be handled in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build(args: argparse.Namespace) -> int:
    """Run one build (or one part of one); returns the process exit code (0 done; 1 an error in the inputs or the
    output directory, nothing to do or nothing succeeded; 75 stopped by a failure of our own side, re-run to
    resume; 130/143 interrupted by SIGINT/SIGTERM)."""
    started = time.perf_counter()
    problem = split_name_problem(args.split)
    if problem:
        print(
            f"error: --split {args.split!r}: {problem} (the split name prefixes the shard files inside --out)",
            file=sys.stderr,
        )
        return 1
    try:
        part = resolve_part(args.part, os.environ)
        if args.executor == "ray":
            import_ray()  # before anything is read or written: a missing Ray is a one-line error
        inputs, settings = _read_inputs(args)
    except (InputError, ValueError, ExecutorUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for warning in inputs.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    plan = plan_order(inputs.videos, args.seed)
    if not plan:
        extra = f" ({len(inputs.rejected)} rejected: {inputs.rejected[0]['reason']})" if inputs.rejected else ""
        print(
            f"error: no inputs: {args.csv or args.list or args.folders} lists no videos for split "
            f"{args.split!r}{extra}",
            file=sys.stderr,
        )
        return 1
    lock = BuildLocks(args.out, part)
    with _sigterm_raises():
        try:
            lock.acquire()
        except BuildLocked as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"error: --out {args.out}: not a writable directory: {describe_own_failure(e)}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, Terminated) as e:
            return EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else EXIT_TERMINATED
        try:
            return _build_locked(args, inputs, settings, plan, part, started)
        finally:
            lock.release()


def build_identity(
    args: argparse.Namespace, settings: EncodeSettings, plan: list[VideoInput], inputs: InputSet
) -> dict:
    """What makes two builds the same build (resume, re-runs and the parts of one merge compare it): every
    setting that affects the output, and a hash of the planned inputs and the classes."""
    params = {
        "split": args.split,
        **settings.output_params(),
        "seed": args.seed,
        "shard_size_mb": args.shard_size_mb,
        "samples_per_shard": args.samples_per_shard,
        "input": {
            "csv": args.csv,
            "list": args.list,
            "folders": args.folders,
            "root": args.root,
            "classes": args.classes,
            "all_rows": args.all_rows,
        },
    }
    return {"params": params, "inputs_sha256": inputs_digest(plan, inputs.classes)}


def _build_locked(
    args: argparse.Namespace,
    inputs: InputSet,
    settings: EncodeSettings,
    plan: list[VideoInput],
    part: tuple[int, int] | None,
    started: float,
) -> int:
    """The build, with the output directory locked: resume point, transcoding, shards, failures and manifest (or,
    for a part, its finished record)."""
    out_dir = Path(args.out)
    identity = build_identity(args, settings, plan, inputs)
    start, end = part_range(len(plan), *part) if part else (0, len(plan))
    state = BuildState(out_dir, args.split, part, (start, end))
    sink = None
    try:
        resume = state.prepare(identity, overwrite=args.overwrite)
        if resume.complete:
            _say_complete(out_dir, part, resume.part_finished)
            return 0
        sink = ShardSink(
            state,
            args.codec,
            inputs.label_index,
            resume.markers,
            int(args.shard_size_mb * 1e6) if args.shard_size_mb else None,
            args.samples_per_shard,
        )
        stats = _transcode_plan(args, settings, plan[start:end], inputs, state, sink)
        if part is not None:
            return _write_part_outputs(args, state, sink, inputs, plan, identity, stats, started)
        return _write_outputs(args, state, sink, inputs, plan, identity, stats, started)
    except (BuildConflict, ExecutorUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:
        if sink is not None:
            sink.abort()
        kept = f"{len(sink.markers) if sink else 0} finished shard(s) kept in {out_dir}"
        if isinstance(e, (KeyboardInterrupt, Terminated)):
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
            print(f"\nshards: {what}; {kept}; re-run the same command to resume", file=sys.stderr)
            return EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else EXIT_TERMINATED
        if isinstance(e, (OSError, BuildStopped)):
            reason = describe_own_failure(e) if isinstance(e, OSError) else str(e)
            print(
                f"error: {reason}; {kept}: fix this and re-run the same command to resume (the videos after "
                f"them are retried)",
                file=sys.stderr,
            )
            return EXIT_RETRY
        raise


def _say_complete(out_dir: Path, part: tuple[int, int] | None, part_finished: bool) -> None:
    if part_finished:
        print(
            f"shards: part {part[0]}/{part[1]} of this build is already finished in {out_dir}; nothing to do "
            f"(`python -m shards.merge {out_dir}` once every part is; --overwrite rebuilds this part)",
            file=sys.stderr,
        )
        return
    print(
        f"shards: {out_dir} already holds this build ({fmt.MANIFEST_NAME} present, every shard it lists "
        f"there with its size); nothing to do (use --overwrite to rebuild)",
        file=sys.stderr,
    )


def _transcode_plan(
    args: argparse.Namespace,
    settings: EncodeSettings,
    plan: list[VideoInput],
    inputs: InputSet,
    state: BuildState,
    sink: ShardSink,
) -> dict:
    """Transcode the plan (a part's: its range of the plan) from the resume point into the sink; returns this
    run's counts."""
    start = sink.position
    if sink.markers:
        print(
            f"shards: resuming: keeping {len(sink.markers)} finished shard(s) "
            f"({sum(m['num_samples'] for m in sink.markers)} samples), {len(plan) - start} of {len(plan)} videos "
            f"to go",
            file=sys.stderr,
        )
    stats = {"ok": 0, "failed": 0, "source_seconds": 0.0}
    printed = 0

    def skipped(source: str, reason: str) -> None:
        nonlocal printed
        if printed < MAX_PRINTED_FAILURES:
            tqdm.write(f"skipped {source}: {reason}", file=sys.stderr)
            printed += 1
            if printed == MAX_PRINTED_FAILURES:
                tqdm.write("(further failures only in failures.jsonl)", file=sys.stderr)

    if state.part is None or state.part[0] == 0:  # every part reads the same inputs: part 0 speaks for them
        for rejected in inputs.rejected:
            skipped(rejected["source"], rejected["reason"])
    bar = tqdm(
        total=len(plan),
        initial=start,
        unit="video",
        desc=f"shards {state.prefix}",
        disable=args.quiet,
        dynamic_ncols=True,
        smoothing=0.05,
    )
    try:
        with executor_transcodes(args, plan[start:], settings, str(state.work_dir)) as ordered:
            for position, (item, result) in enumerate(ordered, start=start):
                if result.ok:
                    sink.add_sample(position, item, result)
                    stats["ok"] += 1
                    stats["source_seconds"] += result.info.duration
                else:
                    sink.add_failure(item, result.reason)
                    stats["failed"] += 1
                    skipped(item.source, result.reason)
                bar.update(1)
                bar.set_postfix(ok=stats["ok"], failed=stats["failed"], shards=len(sink.markers), refresh=False)
        stats["orphan_failures"] = sink.finish(len(plan))
    finally:
        bar.close()
    return stats


def _write_outputs(
    args: argparse.Namespace,
    state: BuildState,
    sink: ShardSink,
    inputs: InputSet,
    plan: list[VideoInput],
    identity: dict,
    stats: dict,
    started: float,
) -> int:
    """failures.jsonl, then manifest.json (last: its presence means a finished build); the summary line."""
    out_dir = state.out_dir
    failures = list(inputs.rejected) + [f for m in sink.markers for f in m["failures"]] + stats["orphan_failures"]
    fmt.atomic_write(out_dir / fmt.FAILURES_NAME, failure_lines(failures))
    num_samples = sum(m["num_samples"] for m in sink.markers)
    if num_samples == 0:
        state.finish()
        first = f"; first: {failures[0]['source']}: {failures[0]['reason']}" if failures else ""
        print(
            f"error: nothing succeeded: all {len(plan)} videos failed (see {out_dir / fmt.FAILURES_NAME}){first}",
            file=sys.stderr,
        )
        return 1

    removed = state.remove_stale_shards(len(sink.markers))
    manifest = manifest_record(
        identity, inputs.classes, ffmpeg_version(), sink.markers, len(failures), len(plan) + len(inputs.rejected)
    )
    fmt.write_manifest(out_dir, manifest)
    state.finish()
    print(
        f"shards: {args.split}: {num_samples} samples in {len(sink.markers)} shards "
        f"({_format_bytes(sum(m['bytes'] for m in sink.markers))}, {_layout(args)}), {len(failures)} skipped "
        f"(see {fmt.FAILURES_NAME}); {_this_run(args, stats, started)} -> {out_dir / fmt.MANIFEST_NAME}"
        + (f" (removed stale {', '.join(removed)})" if removed else ""),
        file=sys.stderr,
    )
    return 0


def failure_lines(failures: list[dict]) -> str:
    """failures.jsonl: one JSON object per line, "source", "key", "reason" first, in that order, whether a record
    comes from this run or from a marker read back (markers are stored with sorted keys)."""
    first = ("source", "key", "reason")
    ordered = (
        {**{k: f[k] for k in first if k in f}, **{k: f[k] for k in sorted(f) if k not in first}} for f in failures
    )
    return "".join(json.dumps(f) + "\n" for f in ordered)


def manifest_record(
    identity: dict, classes: list[str], ffmpeg: str, markers: list[dict], num_failures: int, num_inputs: int
) -> dict:
    """manifest.json of a finished build from its shards' markers, in order (one build's, or a merge's with ids
    renumbered): `shards.format` says what readers rely on."""
    params = identity["params"]
    return {
        "format": fmt.FORMAT_VERSION,
        "split": params["split"],
        "codec": params["codec"],
        "params": params,
        "inputs_sha256": identity["inputs_sha256"],
        "ffmpeg": ffmpeg,
        "classes": classes,
        "num_samples": sum(m["num_samples"] for m in markers),
        "num_failures": num_failures,
        "num_inputs": num_inputs,
        "num_frames": sum(m["num_frames"] for m in markers),
        "duration": round(sum(m["duration"] for m in markers), 3),
        "shards": [
            {k: m[k] for k in ("tar", "index", "num_samples", "bytes", "sha256", "first_sample_id")} for m in markers
        ],
        "keys": [k for m in markers for k in m["keys"]],
    }


def _write_part_outputs(
    args: argparse.Namespace,
    state: BuildState,
    sink: ShardSink,
    inputs: InputSet,
    plan: list[VideoInput],
    identity: dict,
    stats: dict,
    started: float,
) -> int:
    """A finished part: its record (all `shards.merge` needs: shards, failures, the inputs' rejects, classes,
    ffmpeg) is written last into its state folder; no manifest, no failures.jsonl (the merge writes them)."""
    index, count = state.part
    removed = state.remove_stale_shards(len(sink.markers))
    record = {
        **identity,
        "part": [index, count],
        "plan_range": list(state.plan_range),
        "ffmpeg": ffmpeg_version(),
        "classes": inputs.classes,
        "rejected": inputs.rejected,
        "num_inputs": len(plan) + len(inputs.rejected),
        "markers": sink.markers,
        "orphan_failures": stats["orphan_failures"],
    }
    state.finish_part(record)
    start, end = state.plan_range
    num_samples = sum(m["num_samples"] for m in sink.markers)
    failed = sum(len(m["failures"]) for m in sink.markers) + len(stats["orphan_failures"])
    positions = (
        f"plan positions {start}..{end - 1} of {len(plan)}"
        if end > start
        else f"none of the {len(plan)} planned videos: more parts than videos"
    )
    print(
        f"shards: {args.split} part {index}/{count} ({positions}): "
        f"{num_samples} samples in {len(sink.markers)} shards ({_format_bytes(sum(m['bytes'] for m in sink.markers))}"
        f", {_layout(args)}), {failed} skipped; {_this_run(args, stats, started)}; when all {count} parts are "
        f"finished: python -m shards.merge {state.out_dir}"
        + (f" (removed stale {', '.join(removed)})" if removed else ""),
        file=sys.stderr,
    )
    return 0


def _layout(args: argparse.Namespace) -> str:
    return f"{args.codec} in {args.container}" + (f", {args.phases} phases" if args.phases > 1 else "")


def _this_run(args: argparse.Namespace, stats: dict, started: float) -> str:
    """The throughput of this run, for the summary line."""
    elapsed = time.perf_counter() - started
    done_now = stats["ok"] + stats["failed"]
    how = f"{args.workers} workers" + (" on Ray" if args.executor == "ray" else "") if args.workers else "no workers"
    return (
        f"this run: {done_now} videos in {elapsed:.1f} s = {done_now / elapsed:.2f} videos/s, "
        f"{stats['source_seconds'] / elapsed:.1f} source-s/s with {how}"
    )


def main(argv: list[str] | None = None) -> int:
    return build(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
