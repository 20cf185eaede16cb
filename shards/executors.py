"""Where the transcodes of a build run (`executor_transcodes`): the process pool of this machine (`shards.pool`,
the default) or Ray tasks (`--executor ray`, here), on one machine or a cluster.

Both hand the writer the same results in the same plan order, so the shards are byte-identical whichever runs
them: each task is the same `shards.transcode.transcode` call (fixed encoder threads and flags), and the writer
consumes results strictly in plan order through a bounded window (`shards.ordered.ordered_window`), here `window`
object refs ahead of the one it waits for, so that a list of a million videos never holds more than `window`
finished videos in Ray's object store.

Failures keep their meaning (`shards.stops`). A video's failure (unreadable, too short, a timeout: `transcode`
enforces --timeout itself) is a result and is recorded in failures.jsonl. A failure of our own side (`transcode`
raises OSError or TranscodeAborted: a full disk, ffmpeg killed from outside) stops the build as it does locally; so
does a task that Ray lost after its own retries (a worker or node that died: Ray re-runs such a task up to 3 times,
which is safe, a transcode writes only into its own temporary folder). Ray itself is imported only here, only for
`--executor ray`, so that it stays an optional extra (`pip install videomae-fast[ray]`).

Sources must be readable at the same path on every Ray node (a shared file system), like the workers of one
machine; a node that does not see the build's work folder transcodes in its own temporary folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

from shards.inputs import VideoInput
from shards.options import BuildOptions
from shards.ordered import ordered_window
from shards.pool import local_ordered_transcodes
from shards.stops import BuildStopped, result_or_stop
from shards.transcode import EncodeSettings, TranscodeAborted, TranscodeResult, transcode

RAY_INSTALL_HINT = "pip install 'videomae-fast[ray]' (or: pip install ray)"


class ExecutorUnavailable(RuntimeError):
    """The executor asked for cannot run: Ray missing or unreachable (one-line message)."""


def import_ray():
    """The `ray` module, or ExecutorUnavailable saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ExecutorUnavailable(f"--executor ray: Ray is not installed ({e}); {RAY_INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[int]:
    """Connected to Ray for the block: to the instance this process already started, else to `address` (or
    RAY_ADDRESS), else to a local instance started here and shut down at the end. Yields the cluster's CPUs."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as e:  # noqa: BLE001 - ConnectionError, a timeout, a version mismatch: all one line for the user
            where = f" at {address}" if address else ""
            raise ExecutorUnavailable(
                f"--executor ray: cannot connect to Ray{where}: {' '.join(str(e).split())[:300]}"
            ) from None
        started = True
    try:
        yield max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if started:
            ray.shutdown()


def _transcode_task(source: str, settings: EncodeSettings, workdir: str) -> TranscodeResult:
    """One transcode on a Ray worker, in the build's work folder when this node sees it (one machine, or --out on
    a shared file system), else in the node's temporary folder (ffmpeg's files are only ever temporary)."""
    return transcode(source, settings, workdir if os.path.isdir(workdir) else None)


def _ray_result(ray, ref) -> TranscodeResult:
    """`ray.get(ref)`, with the task's own OSError / TranscodeAborted raised as such (the build stops on them and
    names the video) and anything Ray lost a BuildStopped."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (OSError, TranscodeAborted)):
            raise cause from None
        what = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
        raise BuildStopped(f"a Ray transcode task failed ({' '.join(what.split())[:300]})") from None
    except ray.exceptions.RayError as e:  # a worker or node died and Ray gave up, the object was lost, ...
        first = next(iter(str(e).strip().splitlines()), "")
        raise BuildStopped(f"Ray lost a transcode task ({type(e).__name__}: {first[:200]})") from None


def ray_ordered_transcodes(
    items: Iterable[VideoInput], settings: EncodeSettings, workdir: str, window: int
) -> Iterator[tuple[VideoInput, TranscodeResult]]:
    """Transcode `items` as Ray tasks (one CPU per ffmpeg thread), yielding results in the order of `items`, with
    at most `window` tasks submitted and not yet consumed; closed early, it cancels the tasks still in flight (and
    their ffmpeg). Needs a Ray connection (`ray_session`)."""
    ray = import_ray()
    task = ray.remote(num_cpus=settings.threads)(_transcode_task)

    def cancel(refs: list) -> None:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)

    yield from ordered_window(
        items,
        lambda item: task.remote(item.source, settings, workdir),
        lambda item, ref: result_or_stop(item, lambda: _ray_result(ray, ref)),
        window,
        abandon=cancel,
    )


@contextlib.contextmanager
def executor_transcodes(
    options: BuildOptions, items: list[VideoInput], settings: EncodeSettings, workdir: str
) -> Iterator[tuple[int | None, Iterator[tuple[VideoInput, TranscodeResult]]]]:
    """(workers, the results of transcoding `items` in plan order) from the executor `options.executor` names: the
    process pool with `options.workers`, or Ray tasks, `options.workers` or the cluster's CPUs / threads of them
    (2 x that many in flight). The results' generator is closed on leaving the block."""
    if options.executor != "ray" or not items:  # nothing to do needs no Ray
        ordered = local_ordered_transcodes(items, settings, options.workers or 1, workdir)
        with contextlib.closing(ordered):
            yield options.workers, ordered
        return
    with ray_session(options.ray_address) as cpus:
        workers = options.workers or max(1, cpus // settings.threads)
        with contextlib.closing(ray_ordered_transcodes(items, settings, workdir, 2 * workers)) as ordered:
            yield workers, ordered
