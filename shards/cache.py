"""The node-local shard cache: remote shards downloaded once per node into `cache_dir`, never above `limit` bytes.

Layout: `cache_dir/<set>/` per remote set (`<set>` = the prefix's last name + a hash of the whole URL) holds its
manifest, every index file (small, fetched first, kept), and whichever tars are cached now, each complete and
checked (`shards.fetch`). `cache_dir/.locks/` and `cache_dir/.pins/` coordinate the processes of one node.

Sharing: every rank of a node may ask for the same tar; a per-file lock (`flock`) lets one download it while the
others wait and then find it there. Bound: before a download, under one node-wide lock, the file's full size is
reserved (its part file is created at that size), after evicting unpinned tars oldest-first if needed; so the bytes
under `cache_dir` (every file's size, part files at their final size) never exceed `limit`. When nothing can be
evicted the download waits for a pin to go, up to `wait_s`, then fails in one line naming the bound. Pins: a reader
pins the tars of the segments it reads or prefetches (a file per process and tar under `.pins/`) and unpins them once
consumed; a pin of a process that no longer runs does not count. A consumed tar stays until space is needed, so a
cache as large as the set downloads it once for every epoch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from shards import format as fmt
from shards.fetch import DEFAULT_RETRY, FetchError, Retry, fetch_file, read_bytes
from shards.remote import RemoteSet

log = logging.getLogger(__name__)
GB = 1 << 30


class CacheFull(RuntimeError):
    """A download that found no room under the cache's bound within the wait."""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` (created if missing), held for the block; released when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardCache:
    """A cache directory bounded by `limit` bytes, shared by the processes of a node (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, limit: int, retry: Retry = DEFAULT_RETRY, wait_s: float = 600.0):
        self.root, self.limit, self.retry, self.wait_s = Path(root), int(limit), retry, wait_s
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks, self._pins = self.root / ".locks", self.root / ".pins"
        self._pinned: dict[str, int] = {}  # this process's pins: path -> count
        self._mutex = threading.Lock()

    # -- paths -------------------------------------------------------------------------------------------------
    def set_dir(self, remote: RemoteSet) -> Path:
        """Where `remote`'s files live in this cache."""
        slug = re.sub(r"[^A-Za-z0-9_-]", "_", remote.base.rsplit("/", 1)[-1])[:40] or "set"
        return self.root / f"{slug}-{hashlib.sha1(remote.base.encode()).hexdigest()[:12]}"

    def _key(self, path: Path) -> str:
        return str(path.relative_to(self.root)).replace("/", "__")

    # -- set-up: manifest and index files ---------------------------------------------------------------------
    def prepare(self, remote: RemoteSet) -> Path:
        """`remote`'s manifest and the index files of its tars in this cache (downloaded unless there, each index
        checked against the manifest's `index_bytes` / `index_sha256` when it lists them); returns the set's
        directory. FetchError (one line) for an index that cannot be fetched."""
        directory = self.set_dir(remote)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / fmt.MANIFEST_NAME
        with file_lock(self._locks / f"{directory.name}.manifest"):
            if not manifest.is_file() or manifest.read_text() != remote.manifest_text:
                # another manifest under the same URL: the set was republished; cached tars are re-checked by size
                fmt.atomic_write(manifest, remote.manifest_text)
        for name in remote.names:
            entry = remote.entry(name)
            path = directory / entry["index"]
            if path.is_file():
                continue
            with file_lock(self._locks / f"{self._key(path)}.lock"):
                if path.is_file():
                    continue
                url = remote.url(entry["index"])
                if "index_bytes" in entry:
                    self._reserve_and_fetch(remote, url, path, int(entry["index_bytes"]), entry.get("index_sha256"))
                else:  # a manifest without index sums (not published by shards.publish): parsed, not checked
                    data = read_bytes(remote.fs, url, self.retry)
                    with self._space(len(data)):
                        fmt.atomic_write(path, data)
        return directory

    # -- tars --------------------------------------------------------------------------------------------------
    def ensure(self, remote: RemoteSet, name: str) -> Path:
        """The local path of tar `name` of `remote`, downloaded and checked unless already cached. Pin it first
        (`pin`) so that no other process evicts it before it is read. FetchError or CacheFull (one line each)."""
        entry = remote.entry(name)
        path = self.set_dir(remote) / name
        if self._complete(path, entry):
            return path
        with file_lock(self._locks / f"{self._key(path)}.lock"):
            if self._complete(path, entry):
                return path
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # another size than the manifest's: a republished set
            self._reserve_and_fetch(remote, remote.url(name), path, int(entry["bytes"]), entry.get("sha256"))
        return path

    @staticmethod
    def _complete(path: Path, entry: dict) -> bool:
        try:
            return path.stat().st_size == int(entry["bytes"])
        except FileNotFoundError:
            return False

    def _reserve_and_fetch(self, remote: RemoteSet, url: str, path: Path, size: int, sha256: str | None) -> None:
        part = f"{path}.part-{os.getpid()}-{threading.get_ident()}"
        with self._space(size, part):
            pass
        fetch_file(remote.fs, url, path, size, sha256, self.retry, part=part)

    @contextlib.contextmanager
    def _space(self, size: int, part: str | None = None) -> Iterator[None]:
        """Hold the node-wide lock with `size` bytes free under the bound (evicting unpinned tars oldest-first, or
        waiting for pins to go); with `part`, reserve them by creating that file at `size` bytes."""
        deadline = time.monotonic() + self.wait_s
        while True:
            with file_lock(self._locks / "space.lock"):
                free = self.limit - self.usage()
                if free < size:
                    free += self._evict(size - free)
                if free >= size:
                    if part is not None:
                        with open(part, "wb") as f:
                            f.truncate(size)
                    yield
                    return
            if time.monotonic() > deadline:
                raise CacheFull(
                    f"{self.root}: {size} bytes do not fit under the cache's bound of {self.limit / GB:.2f} GB "
                    f"({self.usage() / GB:.2f} GB held by pinned shards of running readers); raise data.cache_gb "
                    f"or lower data.segment_shards"
                )
            time.sleep(0.05)

    def usage(self) -> int:
        """Bytes under the cache directory: every file's size (a part file counts its reserved final size)."""
        total = 0
        for directory, _, files in os.walk(self.root):
            if directory.startswith((str(self._locks), str(self._pins))):
                continue
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(directory, name)).st_size
        return total

    def _evict(self, needed: int) -> int:
        """Delete unpinned cached tars, least recently released first, until `needed` bytes are freed or none is
        left; returns the bytes freed. Called under the node-wide lock."""
        pinned = self._live_pins()
        candidates = []
        for tar in self.root.glob("*/*.tar"):
            if self._key(tar) not in pinned:
                with contextlib.suppress(FileNotFoundError):
                    st = tar.stat()
                    candidates.append((st.st_mtime, st.st_size, tar))
        freed = 0
        for _, size, tar in sorted(candidates):
            if freed >= needed:
                break
            with contextlib.suppress(FileNotFoundError):
                tar.unlink()
                freed += size
                log.debug("cache: evicted %s (%d bytes)", tar, size)
        return freed

    # -- pins --------------------------------------------------------------------------------------------------
    def _pin_file(self, path: Path) -> Path:
        return self._pins / f"{self._key(path)}@{os.getpid()}"

    def pin(self, path: str | os.PathLike) -> None:
        """Keep `path` (a tar of this cache, present or not yet) from eviction until `unpin`; counted per process."""
        path = Path(path)
        with self._mutex:
            self._pinned[str(path)] = self._pinned.get(str(path), 0) + 1
            if self._pinned[str(path)] == 1:
                self._pins.mkdir(parents=True, exist_ok=True)
                self._pin_file(path).touch()

    def unpin(self, path: str | os.PathLike) -> None:
        """Release one `pin`; the last one of this process marks the tar as just used (eviction goes oldest first)."""
        path = Path(path)
        with self._mutex:
            count = self._pinned.get(str(path), 0) - 1
            if count > 0:
                self._pinned[str(path)] = count
                return
            self._pinned.pop(str(path), None)
            with contextlib.suppress(FileNotFoundError):
                self._pin_file(path).unlink()
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)

    def unpin_all(self) -> None:
        for path in list(self._pinned):
            self._pinned[path] = 1
            self.unpin(path)

    def _live_pins(self) -> set[str]:
        """Keys of the tars pinned by a running process (pins of dead ones are removed)."""
        live = set()
        for pin in self._pins.glob("*@*") if self._pins.is_dir() else []:
            key, _, pid = pin.name.rpartition("@")
            if pid.isdigit() and _alive(int(pid)):
                live.add(key)
            else:
                with contextlib.suppress(FileNotFoundError):
                    pin.unlink()
        return live


def fetch_error_line(error: BaseException) -> str:
    """The one line a reader logs for a shard it skips."""
    return str(error) if isinstance(error, (FetchError, CacheFull)) else f"{type(error).__name__}: {error}"
