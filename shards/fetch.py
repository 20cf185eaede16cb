"""Downloading one object of a remote shard set: checked against the manifest, written under a temporary name, retried.

`fetch_file` reads the object in ranged chunks (`CHUNK` bytes, one GET each), so that a connection dropped mid-way
costs one chunk, not the whole shard: the chunk is asked for again after a backoff, and the download goes on from
where it stopped. The bytes go to a temporary file (`{dest}.part-{pid}`, or the one the caller reserved), hashed as
they arrive; only a file of the manifest's size and sha256 is renamed to `dest`. A mismatch after the last byte
(the object in the bucket differs from the manifest, or bytes changed in transit) is retried once from the start,
then reported. Every failure that outlives its retries is one `FetchError` line naming the URL and the cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 8 << 20  # bytes per ranged GET


class FetchError(OSError):
    """An object that could not be read after its retries (network, server, or bytes unlike the manifest's)."""


class IntegrityError(ValueError):
    """Downloaded bytes that disagree with the manifest (size or sha256)."""


@dataclasses.dataclass(frozen=True)
class Retry:
    """`attempts` tries per request, sleeping backoff * 2**k (at most `max_backoff` s) between them."""

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2**attempt)


DEFAULT_RETRY = Retry()
# Errors no retry can cure: a missing object, no permission, a programming error.
PERMANENT = (FileNotFoundError, PermissionError, TypeError, AttributeError, NotImplementedError)


def describe(error: BaseException) -> str:
    """One line for an exception: its type and its message's first line."""
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def retrying(what: str, call: Callable[[], T], retry: Retry) -> T:
    """`call()`, tried up to `retry.attempts` times with backoff on any error but a permanent one. FetchError naming
    `what` when every try failed."""
    for attempt in range(retry.attempts):
        try:
            return call()
        except PERMANENT as e:
            raise FetchError(f"{what}: {describe(e)}") from e
        except Exception as e:
            if attempt + 1 == retry.attempts:
                raise FetchError(f"{what}: {describe(e)} (after {retry.attempts} attempts)") from e
            log.debug("%s: %s; retrying in %.1f s", what, describe(e), retry.delay(attempt))
            time.sleep(retry.delay(attempt))
    raise AssertionError("unreachable")


def read_bytes(fs: Any, url: str, retry: Retry = DEFAULT_RETRY) -> bytes:
    """The whole object at `url` (small ones: manifests, index files)."""
    return retrying(url, lambda: fs.cat_file(url), retry)


def read_range(fs: Any, url: str, start: int, end: int, retry: Retry = DEFAULT_RETRY) -> bytes:
    """Bytes [start, end) of the object at `url`; a short or long answer counts as a failed try."""

    def get() -> bytes:
        data = fs.cat_file(url, start=start, end=end)
        if len(data) != end - start:
            raise OSError(f"asked for bytes {start}..{end}, got {len(data)} bytes")
        return data

    return retrying(url, get, retry)


def fetch_file(
    fs: Any,
    url: str,
    dest: str | os.PathLike,
    size: int,
    sha256: str | None,
    retry: Retry = DEFAULT_RETRY,
    part: str | None = None,
    chunk: int = CHUNK,
) -> None:
    """Download `url` to `dest`, which then holds exactly `size` bytes of digest `sha256` (None: size only).

    Written to `part` (default `{dest}.part-{pid}`) and renamed over `dest` once whole and checked; the part file
    goes on failure. FetchError (one line: URL and cause) when the object stays unreadable after the retries or
    differs from the manifest twice."""
    part = part or f"{dest}.part-{os.getpid()}"
    listed = retrying(url, lambda: fs.info(url), retry).get("size")
    if listed is not None and int(listed) != size:
        raise FetchError(f"{url}: {listed} bytes, its manifest lists {size} (the object differs from the manifest)")
    try:
        for whole_try in range(2):
            digest = _download(fs, url, part, size, chunk, retry)
            if sha256 is None or digest == sha256:
                break
            problem = f"sha256 {digest[:12]}.. differs from the manifest's {sha256[:12]}.."
            if whole_try == 1:
                raise FetchError(f"{url}: {problem} (downloaded twice; the object differs from its manifest)")
            log.warning("%s: %s; downloading it again", url, problem)
        os.replace(part, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise


def _download(fs: Any, url: str, part: str, size: int, chunk: int, retry: Retry) -> str:
    """Write the object's `size` bytes into `part` (created, or overwritten from byte 0) chunk by chunk; returns
    their sha256."""
    h = hashlib.sha256()
    mode = "r+b" if os.path.exists(part) else "wb"
    with open(part, mode) as f:
        done = 0
        while done < size:
            end = min(size, done + chunk)
            data = read_range(fs, url, done, end, retry)
            f.write(data)
            h.update(data)
            done = end
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()
