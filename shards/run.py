"""One run of a shard build (`python -m shards.build` is its command line): inputs, plan, transcodes, shards, and
what a finished build or part writes last.

Flow: read the inputs (shards.inputs) -> plan (shards.plan) -> lock the output directory and find the resume point
(shards.resume) -> the executor (shards.executors: the local pool or Ray) transcodes (shards.transcode) while one
writer consumes the results in plan order (shards.ordered) -> tar shards + DALI indexes with a marker per finished
shard (shards.sink, shards.writer) -> failures.jsonl, then manifest.json last (shards.records); a part writes its
finished.json instead, for shards.merge. A failure of our own side stops the run (shards.stops).

Messages are log records (logger `shards.run`): the outcome (done, nothing to do) at INFO, a skipped video or a
dubious input at WARNING, a build that stops at ERROR (one line; the exit code says which); progress is tqdm's.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from shards import format as fmt
from shards.executors import ExecutorUnavailable, executor_transcodes, import_ray
from shards.inputs import InputError, InputSet, VideoInput, collect_inputs
from shards.options import BuildOptions
from shards.plan import build_identity, part_range, plan_order, resolve_part, split_name_problem
from shards.records import PartRecord, failure_lines, manifest_record
from shards.resume import BuildConflict, BuildLocked, BuildLocks, BuildState
from shards.sink import ShardSink
from shards.stops import (
    EXIT_INTERRUPTED,
    EXIT_RETRY,
    EXIT_TERMINATED,
    BuildStopped,
    Terminated,
    describe_own_failure,
    sigterm_raises,
)
from shards.transcode import EncodeSettings, ffmpeg_version

log = logging.getLogger(__name__)

MAX_LOGGED_SKIPS = 20  # skipped videos named on the console; failures.jsonl lists every one


@dataclass
class RunStats:
    """What this run (not earlier runs of a resumed build) did."""

    ok: int = 0  # videos transcoded into a shard
    failed: int = 0  # videos skipped
    source_seconds: float = 0.0  # of the videos transcoded
    workers: int | None = None  # transcodes at once (None: none were needed)
    orphan_failures: list[dict] = field(default_factory=list)  # failures in no shard (`ShardSink.finish`)


class SkipLog:
    """Logs a skipped video as a WARNING line, the first MAX_LOGGED_SKIPS of them, without tearing a progress bar."""

    def __init__(self) -> None:
        self.logged = 0

    def __call__(self, source: str, reason: str) -> None:
        if self.logged >= MAX_LOGGED_SKIPS:
            return
        with tqdm.external_write_mode(file=sys.stderr):
            log.warning(f"skipped {source}: {reason}")
            self.logged += 1
            if self.logged == MAX_LOGGED_SKIPS:
                log.warning("(further failures only in failures.jsonl)")


def run_build(options: BuildOptions) -> int:
    """Run one build (or one part of one); returns the process exit code (0 done; 1 an error in the inputs or the
    output directory, nothing to do or nothing succeeded; 75 stopped by a failure of our own side, re-run to
    resume; 130/143 interrupted by SIGINT/SIGTERM)."""
    started = time.perf_counter()
    problem = split_name_problem(options.split)
    if problem:
        log.error(f"error: --split {options.split!r}: {problem} (the split name prefixes the shard files inside --out)")
        return 1
    try:
        part = resolve_part(options.part, os.environ)
        if options.executor == "ray":
            import_ray()  # before anything is read or written: a missing Ray is a one-line error
        inputs = _read_inputs(options)
        settings = options.encode_settings()
    except (InputError, ValueError, ExecutorUnavailable) as e:
        log.error(f"error: {e}")
        return 1
    for warning in inputs.warnings:
        log.warning(f"warning: {warning}")
    plan = plan_order(inputs.videos, options.seed)
    if not plan:
        extra = f" ({len(inputs.rejected)} rejected: {inputs.rejected[0]['reason']})" if inputs.rejected else ""
        log.error(
            f"error: no inputs: {options.csv or options.list_file or options.folders} lists no videos for split "
            f"{options.split!r}{extra}"
        )
        return 1
    lock = BuildLocks(options.out, part)
    with sigterm_raises():
        try:
            lock.acquire()
        except BuildLocked as e:
            log.error(f"error: {e}")
            return 1
        except OSError as e:
            log.error(f"error: --out {options.out}: not a writable directory: {describe_own_failure(e)}")
            return 1
        except (KeyboardInterrupt, Terminated) as e:
            return EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else EXIT_TERMINATED
        try:
            return _build_locked(options, inputs, settings, plan, part, started)
        finally:
            lock.release()


def _read_inputs(options: BuildOptions) -> InputSet:
    """The inputs (InputError: a one-line message)."""
    return collect_inputs(
        csv_path=options.csv,
        list_path=options.list_file,
        folders=options.folders,
        root=options.root,
        split=options.split,
        classes_file=options.classes,
        all_rows=options.all_rows,
    )


def _build_locked(
    options: BuildOptions,
    inputs: InputSet,
    settings: EncodeSettings,
    plan: list[VideoInput],
    part: tuple[int, int] | None,
    started: float,
) -> int:
    """The build, with the output directory locked: resume point, transcoding, shards, failures and manifest (or,
    for a part, its finished record)."""
    out_dir = Path(options.out)
    identity = build_identity(options, settings, plan, inputs)
    start, end = part_range(len(plan), *part) if part else (0, len(plan))
    state = BuildState(out_dir, options.split, part, (start, end))
    sink = None
    try:
        resume = state.prepare(identity, overwrite=options.overwrite)
        if resume.complete:
            _log_nothing_to_do(out_dir, part, resume.part_finished)
            return 0
        sink = ShardSink(
            state,
            options.codec,
            inputs.label_index,
            resume.markers,
            options.max_shard_bytes,
            options.samples_per_shard,
        )
        stats = _transcode_plan(options, settings, plan[start:end], inputs, state, sink)
        if part is not None:
            return _write_part_outputs(options, state, sink, inputs, plan, identity, stats, started)
        return _write_outputs(options, state, sink, inputs, plan, identity, stats, started)
    except (BuildConflict, ExecutorUnavailable) as e:
        log.error(f"error: {e}")
        return 1
    except BaseException as e:
        if sink is not None:
            sink.abort()
        kept = f"{len(sink.markers) if sink else 0} finished shard(s) kept in {out_dir}"
        if isinstance(e, (KeyboardInterrupt, Terminated)):
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
            log.warning(f"\nshards: {what}; {kept}; re-run the same command to resume")
            return EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else EXIT_TERMINATED
        if isinstance(e, (OSError, BuildStopped)):
            reason = describe_own_failure(e) if isinstance(e, OSError) else str(e)
            log.error(
                f"error: {reason}; {kept}: fix this and re-run the same command to resume (the videos after "
                f"them are retried)"
            )
            return EXIT_RETRY
        raise


def _log_nothing_to_do(out_dir: Path, part: tuple[int, int] | None, part_finished: bool) -> None:
    if part_finished:
        log.info(
            f"shards: part {part[0]}/{part[1]} of this build is already finished in {out_dir}; nothing to do "
            f"(`python -m shards.merge {out_dir}` once every part is; --overwrite rebuilds this part)"
        )
        return
    log.info(
        f"shards: {out_dir} already holds this build ({fmt.MANIFEST_NAME} present, every shard it lists "
        f"there with its size); nothing to do (use --overwrite to rebuild)"
    )


def _transcode_plan(
    options: BuildOptions,
    settings: EncodeSettings,
    plan: list[VideoInput],
    inputs: InputSet,
    state: BuildState,
    sink: ShardSink,
) -> RunStats:
    """Transcode the plan (a part's: its range of the plan) from the resume point into the sink; returns this
    run's counts."""
    start = sink.position
    if sink.markers:
        log.info(
            f"shards: resuming: keeping {len(sink.markers)} finished shard(s) ({sink.num_samples} samples), "
            f"{len(plan) - start} of {len(plan)} videos to go"
        )
    stats = RunStats()
    skipped = SkipLog()
    if state.part is None or state.part[0] == 0:  # every part reads the same inputs: part 0 speaks for them
        for rejected in inputs.rejected:
            skipped(rejected["source"], rejected["reason"])
    bar = tqdm(
        total=len(plan),
        initial=start,
        unit="video",
        desc=f"shards {state.prefix}",
        disable=options.quiet,
        dynamic_ncols=True,
        smoothing=0.05,
    )
    try:
        with executor_transcodes(options, plan[start:], settings, str(state.work_dir)) as (workers, ordered):
            stats.workers = workers
            for position, (item, result) in enumerate(ordered, start=start):
                if result.ok:
                    sink.add_sample(position, item, result)
                    stats.ok += 1
                    stats.source_seconds += result.info.duration
                else:
                    sink.add_failure(item, result.reason)
                    stats.failed += 1
                    skipped(item.source, result.reason)
                bar.update(1)
                bar.set_postfix(ok=stats.ok, failed=stats.failed, shards=len(sink.markers), refresh=False)
        stats.orphan_failures = sink.finish(len(plan))
    finally:
        bar.close()
    return stats


def _write_outputs(
    options: BuildOptions,
    state: BuildState,
    sink: ShardSink,
    inputs: InputSet,
    plan: list[VideoInput],
    identity: dict,
    stats: RunStats,
    started: float,
) -> int:
    """failures.jsonl, then manifest.json (last: its presence means a finished build); the summary line."""
    out_dir = state.out_dir
    failures = list(inputs.rejected) + [f for m in sink.markers for f in m.failures] + stats.orphan_failures
    fmt.atomic_write(out_dir / fmt.FAILURES_NAME, failure_lines(failures))
    if sink.num_samples == 0:
        state.finish()
        first = f"; first: {failures[0]['source']}: {failures[0]['reason']}" if failures else ""
        log.error(f"error: nothing succeeded: all {len(plan)} videos failed (see {out_dir / fmt.FAILURES_NAME}){first}")
        return 1

    removed = state.remove_stale_shards(len(sink.markers))
    manifest = manifest_record(
        identity, inputs.classes, ffmpeg_version(), sink.markers, len(failures), len(plan) + len(inputs.rejected)
    )
    fmt.write_manifest(out_dir, manifest)
    state.finish()
    log.info(
        f"shards: {options.split}: {sink.num_samples} samples in {len(sink.markers)} shards "
        f"({format_bytes(sink.num_bytes)}, {options.layout}), {len(failures)} skipped "
        f"(see {fmt.FAILURES_NAME}); {_run_throughput(options, stats, started)} -> {out_dir / fmt.MANIFEST_NAME}"
        + (f" (removed stale {', '.join(removed)})" if removed else "")
    )
    return 0


def _write_part_outputs(
    options: BuildOptions,
    state: BuildState,
    sink: ShardSink,
    inputs: InputSet,
    plan: list[VideoInput],
    identity: dict,
    stats: RunStats,
    started: float,
) -> int:
    """A finished part: its record (all `shards.merge` needs: shards, failures, the inputs' rejects, classes,
    ffmpeg) is written last into its state folder; no manifest, no failures.jsonl (the merge writes them)."""
    index, count = state.part
    removed = state.remove_stale_shards(len(sink.markers))
    record = PartRecord(
        params=identity["params"],
        inputs_sha256=identity["inputs_sha256"],
        part=[index, count],
        plan_range=list(state.plan_range),
        ffmpeg=ffmpeg_version(),
        classes=inputs.classes,
        rejected=inputs.rejected,
        num_inputs=len(plan) + len(inputs.rejected),
        markers=sink.markers,
        orphan_failures=stats.orphan_failures,
    )
    state.finish_part(record)
    start, end = state.plan_range
    failed = sum(len(m.failures) for m in sink.markers) + len(stats.orphan_failures)
    positions = (
        f"plan positions {start}..{end - 1} of {len(plan)}"
        if end > start
        else f"none of the {len(plan)} planned videos: more parts than videos"
    )
    log.info(
        f"shards: {options.split} part {index}/{count} ({positions}): "
        f"{sink.num_samples} samples in {len(sink.markers)} shards ({format_bytes(sink.num_bytes)}"
        f", {options.layout}), {failed} skipped; {_run_throughput(options, stats, started)}; when all {count} parts "
        f"are finished: python -m shards.merge {state.out_dir}"
        + (f" (removed stale {', '.join(removed)})" if removed else "")
    )
    return 0


def format_bytes(n: float) -> str:
    """'307.2 KB': decimal units, as the shard sizes are given (--shard-size-mb)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _run_throughput(options: BuildOptions, stats: RunStats, started: float) -> str:
    """The throughput of this run, for the summary line."""
    elapsed = time.perf_counter() - started
    done_now = stats.ok + stats.failed
    workers = stats.workers
    how = f"{workers} workers" + (" on Ray" if options.executor == "ray" else "") if workers else "no workers"
    return (
        f"this run: {done_now} videos in {elapsed:.1f} s = {done_now / elapsed:.2f} videos/s, "
        f"{stats.source_seconds / elapsed:.1f} source-s/s with {how}"
    )
