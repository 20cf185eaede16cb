"""Where the transcodes of `shards.build` run: its own process pool (`shards.build.ordered_transcodes`, the
default) or Ray tasks (`--executor ray`, here), on one machine or a cluster.

Both hand the writer the same results in the same plan order, so the shards are byte-identical whichever runs
them: each task is the same `shards.transcode.transcode` call (fixed encoder threads and flags), and the writer
consumes results strictly in plan order through a bounded window, here `window` object refs ahead of the one it
waits for, so that a list of a million videos never holds more than `window` finished videos in Ray's object store.

Failures keep their meaning. A video's failure (unreadable, too short, a timeout: `transcode` enforces --timeout
itself) is a result and is recorded in failures.jsonl. A failure of our own side (`transcode` raises OSError or
TranscodeAborted: a full disk, ffmpeg killed from outside) stops the build as it does locally; so does a task that
Ray lost after its own retries (a worker or node that died: Ray re-runs such a task up to 3 times, which is safe,
a transcode writes only into its own temporary folder). Ray itself is imported only here, only for
`--executor ray`, so that it stays an optional extra (`pip install videomae-fast[ray]`).

Sources must be readable at the same path on every Ray node (a shared file system), like the workers of one
machine; a node that does not see the build's work folder transcodes in its own temporary folder.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections import deque
from collections.abc import Iterator

from shards.inputs import VideoInput
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
    from shards.build import BuildStopped  # here: shards.build imports this module lazily

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
    items: list[VideoInput], settings: EncodeSettings, workdir: str, window: int
) -> Iterator[tuple[VideoInput, TranscodeResult]]:
    """Transcode `items` as Ray tasks (one CPU per ffmpeg thread), yielding results in the order of `items`, with
    at most `window` tasks submitted and not yet consumed. Needs a Ray connection (`ray_session`)."""
    from shards.build import _own_failures_stop

    ray = import_ray()
    task = ray.remote(num_cpus=settings.threads)(_transcode_task)
    pending: deque = deque()
    feed = iter(items)
    try:
        for item in itertools.islice(feed, window):
            pending.append((item, task.remote(item.source, settings, workdir)))
        while pending:
            item, ref = pending.popleft()
            result = _own_failures_stop(item, lambda: _ray_result(ray, ref))
            del ref  # the object store frees the video once no ref is left
            nxt = next(feed, None)
            if nxt is not None:
                pending.append((nxt, task.remote(nxt.source, settings, workdir)))
            yield item, result
    finally:
        for _, ref in pending:  # stopped early: do not leave tasks (and their ffmpeg) running on the cluster
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
