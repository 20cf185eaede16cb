"""What stops a build that is not a video's doing, and the exit codes that say so.

A video that cannot be read, decoded or is too short is a result (`TranscodeResult.ok` False): it is recorded in
failures.jsonl and the build goes on. A failure of our own side says nothing about the video: a full disk or another
I/O error writing the work files or shards, a worker process killed, ffmpeg killed by a signal from outside
(`shards.transcode` raises OSError or TranscodeAborted for these), or a Ray task that Ray lost. The build then stops
at once with a one-line error and `EXIT_RETRY`, deleting only its partial shard, so that a re-run of the same
command resumes after the last finished shard and retries those videos. SIGTERM stops a build as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool

from shards.inputs import VideoInput
from shards.transcode import TranscodeAborted, TranscodeResult

EXIT_RETRY = 75  # sysexits' EX_TEMPFAIL: stopped by a failure of our own side; re-run the same command to resume
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # SIGINT, SIGTERM


class BuildStopped(Exception):
    """The build cannot go on for a reason that is not a video's (one-line message); a re-run resumes."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the build stops as on Ctrl-C. A BaseException, so that no
    `except Exception` (transcode's, for one) takes it for a problem of a video."""


def describe_own_failure(error: BaseException) -> str:
    """One line for a failure of our own side: the file or folder and the errno text, or what died."""
    if isinstance(error, OSError):
        code = errno.errorcode.get(error.errno, str(error.errno)) if error.errno is not None else "?"
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error} ({code})"
    if isinstance(error, BrokenProcessPool):
        return "a transcoding worker process died (killed by a signal, or out of memory)"
    return " ".join(str(error).split())


def result_or_stop(item: VideoInput, get: Callable[[], TranscodeResult]) -> TranscodeResult:
    """`get()`, the result of transcoding `item`; a failure of our own side (disk full, a killed worker or ffmpeg)
    raises BuildStopped naming the video it happened on: that video is retried by the next run, never recorded as
    bad."""
    try:
        return get()
    except BrokenProcessPool as e:
        raise BuildStopped(describe_own_failure(e)) from e
    except (OSError, TranscodeAborted) as e:
        raise BuildStopped(f"{describe_own_failure(e)} while transcoding {item.source}") from e


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
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
