"""The build's own executor: transcodes on a process pool of this machine, results in plan order.

Workers are spawned (not forked: the pool may start from a process that already runs threads, DALI's or torch's,
and forking such a process can deadlock), ignore Ctrl-C (the main process stops the build), and die with the build
however it dies, even by SIGKILL (`shards.transcode.die_with_parent`): a worker outliving its build would go on
writing into its directory. A build that stops early kills its workers and their ffmpeg instead of waiting for the
transcodes in flight, which can take minutes; a re-run redoes them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from shards.inputs import VideoInput
from shards.ordered import ordered_window
from shards.stops import result_or_stop
from shards.transcode import EncodeSettings, TranscodeResult, die_with_parent, transcode


def init_worker(parent_pid: int) -> None:
    """A worker's first act: leave Ctrl-C to the main process and die with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if os.getppid() != parent_pid:  # the build died before the line above took effect
        os._exit(1)


def kill_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's workers now, with their ffmpeg (which dies with its worker)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.kill()


def local_ordered_transcodes(
    items: Iterable[VideoInput], settings: EncodeSettings, workers: int, workdir: str, window: int | None = None
) -> Iterator[tuple[VideoInput, TranscodeResult]]:
    """Transcode `items` on `workers` processes (in this process when 1), yielding results in the order of `items`,
    at most `window` (default 2 x workers) transcodes ahead of the one the writer waits for. A failure of our own
    side raises BuildStopped (`shards.stops.result_or_stop`)."""
    if workers <= 1:
        for item in items:
            yield item, result_or_stop(item, lambda: transcode(item.source, settings, workdir))
        return
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker, initargs=(os.getpid(),)
    )

    def submit(item: VideoInput) -> Future:
        return pool.submit(transcode, item.source, settings, workdir)

    def wait(item: VideoInput, future: Future) -> TranscodeResult:
        return result_or_stop(item, future.result)

    ordered = ordered_window(items, submit, wait, window or 2 * workers, abandon=lambda _: kill_workers(pool))
    try:
        yield from ordered
    finally:
        ordered.close()  # stopped early (an error, Ctrl-C, SIGTERM, the consumer gone): kills the workers first
        pool.shutdown(wait=True, cancel_futures=True)
