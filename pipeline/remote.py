"""Remote shard sets for the loader: `s3://`, `gs://`, `https://` read through the node-local cache (`shards.cache`).

`open_shards(spec, cfg, stats)` is the loader's entry: a local `ShardSet` for paths, a `RemoteShardSet` for URLs.
A remote set downloads its manifest and every index file first (small; into the cache), so that the structural
checks, the layout, the sample counts and each epoch's shard order are exactly those of the same set on disk. Its
`tars` are the paths the tars have (or will have) in the cache; the loader reads them in segments
(`pipeline.segments`), the `Prefetcher` downloading the segments ahead in background threads. A member read outside
the pipelines (codec sniffing, corrupt-sample probes) comes from the cached tar when present, else by a ranged GET.

Cache settings (PipelineConfig; `data.options` in train.py): `cache_dir` (default $VIDEOMAE_CACHE_DIR, else
<tmp>/videomae-shard-cache), `cache_gb` (the node's bound, shared by its ranks), `segment_shards`,
`prefetch_segments`, `fetch_workers`. At start the bound must hold every rank's current and prefetched segments
(checked in one line), so no reader waits on another forever.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.plan import local_ranks
from pipeline.protocol import LoaderStats
from pipeline.shardset import ShardSet
from shards import format as fmt
from shards.cache import GB, ShardCache, fetch_error_line
from shards.fetch import read_range
from shards.remote import is_url, open_remote_set

log = logging.getLogger(__name__)
CACHE_ENV = "VIDEOMAE_CACHE_DIR"


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "videomae-shard-cache")


def open_shards(
    spec: str | os.PathLike | Sequence[str | os.PathLike], cfg: PipelineConfig, stats: LoaderStats
) -> ShardSet:
    """A `ShardSet` over local shards, or a `RemoteShardSet` when `spec` is a URL (or a list of URLs)."""
    if not is_url(spec if isinstance(spec, (list, tuple)) else str(spec)):
        return ShardSet(spec)
    cache = ShardCache(cfg.cache_dir or default_cache_dir(), int(cfg.cache_gb * GB))
    return RemoteShardSet(spec, cache, cfg, stats)


class Prefetcher:
    """Background downloads of a remote set's tars into the cache (`fetch_workers` at a time), held per segment:
    `hold` pins a segment's tars and queues their downloads in order, `wait` returns a tar's cache path or the one
    line saying why it could not be fetched, `release` unpins them once the segment is read."""

    def __init__(self, shards: RemoteShardSet, workers: int):
        self.shards = shards
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="shard-fetch")
        self.futures: dict[int, Future] = {}
        self.holds: dict[int, int] = {}
        self.lock = threading.Lock()

    def hold(self, tars: Sequence[int]) -> None:
        with self.lock:
            for i in tars:
                self.holds[i] = self.holds.get(i, 0) + 1
                if self.holds[i] == 1:
                    self.shards.cache.pin(self.shards.tars[i])
                    self.futures[i] = self.pool.submit(self._fetch, i)

    def _fetch(self, i: int) -> Path:
        return self.shards.cache.ensure(self.shards.remote, os.path.basename(self.shards.tars[i]))

    def wait(self, i: int) -> str | None:
        """None once tar `i` is cached (it must be held), else the reason it could not be fetched."""
        try:
            self.futures[i].result()
            return None
        except Exception as e:  # noqa: BLE001 - any failure skips the shard (one line), never the run
            return fetch_error_line(e)

    def done(self, tars: Sequence[int]) -> bool:
        """Whether the downloads of these held tars have all ended (fetched or failed), without waiting."""
        with self.lock:
            return all(i in self.futures and self.futures[i].done() for i in tars)

    def release(self, tars: Sequence[int]) -> None:
        with self.lock:
            for i in tars:
                self.holds[i] -= 1
                if self.holds[i] == 0:
                    del self.holds[i]
                    future = self.futures.pop(i)
                    if future.done():
                        self.shards.cache.unpin(self.shards.tars[i])
                    else:  # still downloading: unpin when it lands
                        future.add_done_callback(lambda _, t=self.shards.tars[i]: self.shards.cache.unpin(t))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.shards.cache.unpin_all()


class RemoteShardSet(ShardSet):
    """A remote set whose manifest and index files are in the cache and whose tars are fetched on demand (see the
    module docstring). `skipped`: one line per shard that could not be fetched, as logged."""

    remote_set = True

    def __init__(self, spec, cache: ShardCache, cfg: PipelineConfig, stats: LoaderStats):
        self.cache, self.cfg, self.stats = cache, cfg, stats
        self.skipped: list[str] = []
        self._skipped_keys: set[tuple] = set()
        super().__init__(spec)
        self._check_bound()
        self.prefetcher = Prefetcher(self, cfg.fetch_workers)

    def _resolve(self, spec) -> list[str]:
        self.remote = open_remote_set(spec, self.cache.retry)
        directory = self.cache.prepare(self.remote)
        missing = [n for n in self.remote.names if "bytes" not in self.remote.entry(n)]
        if missing:
            raise ValueError(
                f"{self.remote.url(missing[0])}: its manifest lists no size (publish the set with "
                f"`python -m shards.publish`, which records sizes and sums)"
            )
        return [str(directory / name) for name in self.remote.names]

    def url(self, tar: str) -> str:
        return self.remote.url(os.path.basename(tar))

    def _check_sizes(self) -> None:
        """An index pointing past its tar's listed size is refused in one line (DALI would read past the end)."""
        for tar in self.tars:
            size = int(self.remote.entry(os.path.basename(tar))["bytes"])
            samples = self.index(tar)[1]
            end = max((o + n for s in samples for o, n, _ in s.components.values()), default=0)
            if end > size:
                raise ValueError(f"{self.url(tar)}: {size} bytes, but its index points to byte {end}")

    def _check_bound(self) -> None:
        """The bound must hold, for every local rank, its current segment and the prefetched ones (plus a tar that
        a segment boundary cuts), and the index files."""
        largest = max(int(self.remote.entry(os.path.basename(t))["bytes"]) for t in self.tars)
        per_rank = (self.cfg.prefetch_segments + 1) * (self.cfg.segment_shards + 1) * largest
        need = local_ranks() * per_rank + self.cache.usage()
        if need > self.cache.limit:
            raise ValueError(
                f"{self.cache.root}: cache_gb={self.cache.limit / GB:.3g} is below what {local_ranks()} local rank(s) "
                f"hold at once: (prefetch_segments {self.cfg.prefetch_segments} + 1) x (segment_shards "
                f"{self.cfg.segment_shards} + 1) x the largest shard ({largest / GB:.3g} GB) each, plus "
                f"{self.cache.usage() / GB:.3g} GB already cached; raise cache_gb or lower those"
            )

    def read_member(self, tar: str, offset: int, size: int) -> bytes:
        """A member's bytes: from the cached tar when there, else one ranged GET."""
        try:
            with open(tar, "rb") as f:
                f.seek(offset)
                data = f.read(size)
                if len(data) == size:
                    return data
        except FileNotFoundError:
            pass
        return read_range(self.remote.fs, self.url(tar), offset, offset + size, self.cache.retry)

    def codec(self, tar: str) -> str | None:
        from pipeline.shardset import manifest_codec, sniff_codec

        codec = manifest_codec(os.path.dirname(tar))
        if codec:
            return codec
        for sample in self.index(tar)[1]:
            if self.video_exts[0] in sample.components:
                offset, size, _ = sample.components[self.video_exts[0]]
                return sniff_codec(self.read_member(tar, offset, size))
        return None

    def skip(self, epoch: int, segment: int, tar: str, samples: int, reason: str) -> None:
        """Count `samples` of `tar` in `segment` of `epoch` as skipped (substituted by others of their segment) and
        log one line; once per (epoch, segment, tar), however often the segment is rebuilt."""
        if (epoch, segment, tar) in self._skipped_keys:
            return
        self._skipped_keys.add((epoch, segment, tar))
        line = f"{self.url(tar)}: {samples} sample(s) of epoch {epoch} skipped (shard could not be fetched: {reason})"
        log.warning("pipeline: %s", line)
        self.skipped.append(line)
        self.stats.corrupt_samples += samples
        self.stats.corrupt.append(line)

    def close(self) -> None:
        prefetcher = getattr(self, "prefetcher", None)
        if prefetcher is not None:
            prefetcher.close()
            self.prefetcher = None
        super().close()


def index_lines(path: str) -> list[list[fmt.IndexEntry]]:
    return fmt.read_index(path)
