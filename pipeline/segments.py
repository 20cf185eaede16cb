"""Reading an epoch in segments, for shard sets behind a bounded cache (`pipeline.remote`).

A local epoch is one DALI reader over all of the epoch's tars (`pipeline.plan`), which needs every tar on disk at
once. A remote set is read instead as follows, for epoch e on rank r of W:

- The epoch's tar order is the local one (`ShardSet.epoch_order`), and rank r reads the same samples as there: the
  contiguous range [N r / W, N (r + 1) / W) of that order's samples (DALI's own partition; N = all samples).
- That range is cut into segments of `segment_samples` samples: about `segment_shards` shards' worth, rounded down
  to whole batches (at least one), so every segment but the last yields whole batches and batch b of the epoch is
  batch b - first_batch of the segment holding it. A segment is a list of pieces (tar, first and last sample): a tar
  that a boundary cuts is read by both segments, each through an index file listing its own samples.
- Each segment is one DALI reader (P pipelines, as locally) over its pieces' cached tars, shuffled within the
  segment (`shuffle_buffer`), seeded by (seed, epoch, rank, segment); its last batch is padded as locally.
- While a segment is read, the next `prefetch_segments` segments (crossing into the next epoch) are downloaded.

What stays the same as reading the same set locally: the samples of each rank and epoch (the same set of sample ids,
each once, as a multiset the same rows per epoch), the number of batches per epoch, the per-sample decoding, and
everything else about a batch given its samples and draws. What differs: the order of samples inside an epoch and the
random draws, which come per segment. The batches of a remote set are, by construction, those of the same set read
from disk in the same segments (`segmented=True` for a local set): tests/test_pipeline_remote.py checks both claims.

Resume: a loader state (epoch, batches handed out) is resumed by rebuilding the segment that holds the next batch
and fast-forwarding within that segment only: no earlier segment is downloaded again.
Shards that cannot be fetched: their pieces are replaced by the same number of samples drawn, in order, from the
segment's other pieces (duplicates), so every rank keeps its batch count; each is logged once, counted as skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import types
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline import graph
from pipeline.config import PipelineConfig
from pipeline.plan import NEVER_EMPTY_DEVICES, DecodePlan, EpochBuilder
from shards import format as fmt

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Piece:
    tar: int  # index into ShardSet.tars
    first: int  # samples [first, stop) of the tar, in its index order
    stop: int


@dataclasses.dataclass(frozen=True)
class Segment:
    index: int
    first_batch: int
    batches: int
    pieces: tuple[Piece, ...]

    @property
    def tars(self) -> list[int]:
        return sorted({p.tar for p in self.pieces})

    @property
    def samples(self) -> int:
        return sum(p.stop - p.first for p in self.pieces)


def plan_segments(
    counts: list[int], order: list[int], rank: int, world: int, batch_size: int, segment_samples: int
) -> list[Segment]:
    """The segments of one rank's part of an epoch (see the module docstring). `counts[i]`: samples of tar i;
    `order`: the epoch's tar order; `segment_samples`: a multiple of `batch_size`."""
    total = sum(counts)
    lo, hi = total * rank // world, total * (rank + 1) // world
    pieces: list[Piece] = []  # the rank's range as pieces of tars, in order
    start = 0
    for t in order:
        a, b = max(lo, start), min(hi, start + counts[t])
        if a < b:
            pieces.append(Piece(t, a - start, b - start))
        start += counts[t]
    segments, current, filled, first_batch = [], [], 0, 0
    for piece in pieces:
        first = piece.first
        while first < piece.stop:
            take = min(piece.stop - first, segment_samples - filled)
            current.append(Piece(piece.tar, first, first + take))
            first, filled = first + take, filled + take
            if filled == segment_samples:
                segments.append(Segment(len(segments), first_batch, filled // batch_size, tuple(current)))
                first_batch += filled // batch_size
                current, filled = [], 0
    if current:
        segments.append(Segment(len(segments), first_batch, -(-filled // batch_size), tuple(current)))
    return segments


@dataclasses.dataclass(frozen=True)
class SegmentedEpochBuilder(EpochBuilder):
    """An `EpochBuilder` whose epochs are `SegmentedRun`s (for a `pipeline.remote.RemoteShardSet`, or a local set
    read the same way for comparison)."""

    def segment_samples(self, cfg: PipelineConfig) -> int:
        per_shard = sum(len(self.shards.index(t)[1]) for t in self.shards.tars) / len(self.shards.tars)
        return max(1, int(cfg.segment_shards * per_shard) // self.batch_size) * self.batch_size

    def segments(self, cfg: PipelineConfig, epoch: int) -> list[Segment]:
        counts = [len(self.shards.index(t)[1]) for t in self.shards.tars]
        order = self.shards.epoch_order(self.seed, epoch, cfg.shuffle)
        return plan_segments(counts, order, self.rank, self.world_size, self.batch_size, self.segment_samples(cfg))

    def segment_seed(self, epoch: int, segment: int) -> int:
        state = np.random.SeedSequence([self.seed, epoch, self.rank, 1 + segment]).generate_state(1)[0]
        return int(state & 0x3FFFFFFF)

    def build(self, cfg: PipelineConfig, epoch: int, start: int, device: str | None = None) -> SegmentedRun:
        return SegmentedRun(self, cfg, epoch, start, device or self.device)


def epoch_builder_class(shards, cfg: PipelineConfig) -> type[EpochBuilder]:
    """`SegmentedEpochBuilder` for a remote set (or `cfg.segmented`), else the one-reader `EpochBuilder`."""
    return SegmentedEpochBuilder if cfg.segmented or getattr(shards, "remote_set", False) else EpochBuilder


class SegmentedRun:
    """One epoch read segment by segment; the interface of `pipeline.plan.EpochRun` (pipes, plans, epoch,
    position, epoch_size, begin, outputs). `pipes`: the pipelines of the segment being read."""

    def __init__(self, builder: SegmentedEpochBuilder, cfg: PipelineConfig, epoch: int, start: int, device: str):
        self.builder, self.cfg, self.epoch, self.device = builder, cfg, epoch, device
        self.shards = builder.shards
        self.position = 0
        self.stop: int | None = None  # set by `begin`
        self.plans = [types.SimpleNamespace(start=start, stop=None)]  # the loader may reset start (a new data set)
        self.segments = builder.segments(cfg, epoch)
        self._segment: Segment | None = None
        self._pipes: list = []
        self._next = 0  # the batch the next `outputs` returns
        self._skips: list[tuple] = []  # (epoch, segment, tar, samples, reason) of the open segment, not yet counted
        self._ready: tuple | None = None  # (segment, Future of (pipes, skips)): the next segment, built ahead
        self._held: dict[tuple[int, int], list[int]] = {}  # (epoch, segment) -> its tars, held in the prefetcher
        self._index_dir = tempfile.mkdtemp(prefix="videomae-segment-idx-")
        self._finalizer = weakref.finalize(self, _release, self.shards, self._held, self._index_dir)

    def epoch_size(self) -> int:
        """Samples in the epoch, all ranks (as DALI's reader over all the tars counts them)."""
        return sum(len(self.shards.index(t)[1]) for t in self.shards.tars)

    @property
    def pipes(self) -> list:
        if self._segment is None:  # built (and scheduled) before `begin`: begin keeps them if it starts there
            self._open(self._segment_of(self.plans[0].start))
        return self._pipes

    def _segment_of(self, batch: int) -> Segment:
        for segment in self.segments:
            if batch < segment.first_batch + segment.batches:
                return segment
        return self.segments[-1]

    def begin(self, position: int, stop: int | None) -> None:
        """Open the segment holding batch `position` and fast-forward within it (decoding from `plans[0].start`,
        nothing from `stop` on; the loader ends the epoch's iteration at `stop`, as with `EpochRun`)."""
        self.stop = self.plans[0].stop = stop
        segment = self._segment_of(position)
        if self._segment is not segment:
            self._open(segment)
        self._next = segment.first_batch
        while self._next < position:
            self._step()
        self.position = position

    def outputs(self, cuda_stream=None) -> list:
        """The next batch: one tuple of outputs per pipeline of its segment. The next segment's pipelines are built
        and started as soon as its tars are cached (at the latest once this segment's last batches are queued), so
        that their first batches decode while this segment's are handed out: two segments' pipelines live at once
        for a while (twice the pipeline buffers)."""
        if self._next >= self._end(self._segment) and self._following() is not None:
            self._open(self._following())
        out = self._step(cuda_stream)
        following = self._following()
        if following is not None and self._ready is None:
            last = self._end(self._segment) - self._next <= max(1, self.builder.prefetch_depth)
            if last or self._fetched(following):
                self._hold(self.epoch, following.index)
                self._ready = (following, _builder_thread().submit(self._build, following))
        return out

    def _following(self) -> Segment | None:
        index = self._segment.index + 1
        return self.segments[index] if index < len(self.segments) else None

    @staticmethod
    def _end(segment: Segment) -> int:
        return segment.first_batch + segment.batches

    def _fetched(self, segment: Segment) -> bool:
        """Whether every tar of `segment` is in the cache already (or a local set): its pipelines can be built now
        without waiting, and decode their first batches while this segment's are handed out."""
        prefetcher = getattr(self.shards, "prefetcher", None)
        return prefetcher is None or prefetcher.done(segment.tars)

    def _step(self, cuda_stream=None) -> list:
        out = [p.outputs(cuda_stream=cuda_stream) if cuda_stream is not None else p.outputs() for p in self._pipes]
        for skip in self._skips:
            self.shards.skip(*skip)
        self._skips.clear()
        for p in self._pipes:
            p.schedule_run()
        self._next += 1
        return out

    # -- segments ----------------------------------------------------------------------------------------------
    def _open(self, segment: Segment) -> None:
        """Make `segment` the one read: its pipelines (built ahead, or now: waiting for its tars), scheduled; the
        previous segment released, the downloads of the ones after it queued."""
        for pipe in self._pipes:  # stop their threads now (they sit in reference cycles, freed by a later gc;
            pipe._shutdown()  # handed-out batches keep their own buffers, as when the loader drops an epoch's)
        self._pipes = []
        ready, self._ready = self._ready, None
        previous = self._segment
        self._segment = segment
        self._hold(self.epoch, segment.index)
        for key in self._ahead(segment):
            self._hold(*key)
        if previous is not None:
            self._release_one((self.epoch, previous.index))
        if ready is not None and ready[0] is segment:
            self._pipes, self._skips = ready[1].result()
            return
        if ready is not None:  # built for nothing (the loader jumped elsewhere): stopped
            for pipe in ready[1].result()[0]:
                pipe._shutdown()
        self._hold(self.epoch, segment.index)
        self._pipes, self._skips = self._build(segment)

    def _build(self, segment: Segment) -> tuple[list, list]:
        """`segment`'s pipelines, built over its cached tars and scheduled, and its skips (shards that could not be
        fetched), counted when its first batch is read. Held by the caller; runs on the segment-build thread for
        the next segment (DALI's graph is built in Python: off the training thread, it overlaps decoding)."""
        skips: list[tuple] = []
        paths, indexes = self._inputs(segment, skips)
        b = self.builder
        start, stop = self.plans[0].start - segment.first_batch, self.plans[0].stop
        pipes = []
        for i in range(self.cfg.pipelines):
            plan = DecodePlan(
                b.batch_size,
                self.cfg.decoder_groups,
                max(0, start),
                stop=None if stop is None else stop - segment.first_batch,
                never_empty=self.device in NEVER_EMPTY_DEVICES,
                share=(i, self.cfg.pipelines),
            )
            pipe = graph.build_pipeline(
                self.cfg,
                paths,
                indexes,
                batch_size=b.batch_size,
                device=self.device,
                device_id=b.device_id if self.device == "gpu" else None,
                shard_id=0,
                num_shards=1,
                seed=b.segment_seed(self.epoch, segment.index),
                num_threads=b.threads_per_pipeline(self.cfg.pipelines),
                prefetch_depth=b.prefetch_depth,
                plan_source=plan,
                layout=self.shards.layout,
                cut=b.cut,
            )
            pipe.build()
            pipes.append(pipe)
        for pipe in pipes:
            pipe.schedule_run()
        return pipes, skips

    def _ahead(self, segment: Segment) -> list[tuple[int, int]]:
        """(epoch, segment) keys of the `prefetch_segments` segments after `segment`, into the next epoch."""
        keys, epoch, index = [], self.epoch, segment.index
        count = len(self.segments)
        for _ in range(self.cfg.prefetch_segments):
            index += 1
            if index >= count:
                epoch, index = epoch + 1, 0
                count = len(self.builder.segments(self.cfg, epoch))
            keys.append((epoch, index))
        return keys

    def _hold(self, epoch: int, index: int) -> None:
        prefetcher = getattr(self.shards, "prefetcher", None)
        if (epoch, index) in self._held or prefetcher is None:
            return
        segments = self.segments if epoch == self.epoch else self.builder.segments(self.cfg, epoch)
        tars = segments[index].tars
        prefetcher.hold(tars)
        self._held[(epoch, index)] = tars

    def _release_one(self, key: tuple[int, int]) -> None:
        tars = self._held.pop(key, None)
        if tars is not None:
            self.shards.prefetcher.release(tars)

    def _inputs(self, segment: Segment, skips: list) -> tuple[list[str], list[str]]:
        """The tar paths and index files of `segment`'s pieces; pieces of tars that could not be fetched replaced
        by as many samples of the segment's other pieces (logged and counted once per tar and segment)."""
        prefetcher = getattr(self.shards, "prefetcher", None)
        failed = {t: prefetcher.wait(t) for t in segment.tars} if prefetcher is not None else {}
        failed = {t: why for t, why in failed.items() if why}
        full = self.shards.patched_index_paths(keep_own_info=self.cfg.mode == "eval")
        good = [p for p in segment.pieces if p.tar not in failed]
        if failed and not good:
            good = [self._donor(segment, failed)]
        donors = [(p.tar, line) for p in good for line in range(p.first, p.stop)]
        paths, indexes, used = [], [], 0
        for piece in segment.pieces:
            n = piece.stop - piece.first
            if piece.tar in failed:  # counted when the segment's first batch is read (`_step`)
                skips.append((self.epoch, segment.index, self.shards.tars[piece.tar], n, failed[piece.tar]))
                for tar, lines in _group([donors[(used + k) % len(donors)] for k in range(n)]):
                    paths.append(self.shards.tars[tar])
                    indexes.append(self._index_file(full[tar], lines))
                used += n
                continue
            paths.append(self.shards.tars[piece.tar])
            indexes.append(self._index_file(full[piece.tar], list(range(piece.first, piece.stop))))
        return paths, indexes

    def _donor(self, segment: Segment, failed: dict[int, str]) -> Piece:
        """A whole tar from outside `segment` (the next fetchable one in tar order), held with the segment, whose
        samples stand in for a segment none of whose shards could be fetched."""
        prefetcher = self.shards.prefetcher
        count = len(self.shards.tars)
        for step in range(1, count):
            t = (segment.tars[-1] + step) % count
            if t in failed:
                continue
            prefetcher.hold([t])
            if prefetcher.wait(t) is None:
                self._held[(self.epoch, -1 - t)] = [t]  # released with the run
                return Piece(t, 0, len(self.shards.index(self.shards.tars[t])[1]))
            prefetcher.release([t])
            failed[t] = "unfetchable"
        raise RuntimeError(
            f"{self.shards.remote.base}: no shard of the set could be fetched ({failed[segment.tars[0]]})"
        )

    def _index_file(self, source: str, lines: list[int]) -> str:
        """An index file listing samples `lines` of the index `source` (DALI reads just those samples)."""
        samples = fmt.read_index(source)
        text = fmt.index_text([[tuple(e) for e in samples[i]] for i in lines])
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        path = os.path.join(self._index_dir, f"{os.path.basename(source)}.{digest}.idx")
        if not os.path.exists(path):
            fmt.atomic_write(path, text)
        return path


_BUILD_THREAD: list[ThreadPoolExecutor] = []


def _builder_thread() -> ThreadPoolExecutor:
    """The one thread of this process that builds next segments' pipelines ahead."""
    if not _BUILD_THREAD:
        _BUILD_THREAD.append(ThreadPoolExecutor(1, thread_name_prefix="segment-build"))
    return _BUILD_THREAD[0]


def _group(entries: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """Consecutive (tar, line) entries of the same tar, grouped: [(tar, [lines])]."""
    groups: list[tuple[int, list[int]]] = []
    for tar, line in entries:
        if groups and groups[-1][0] == tar:
            groups[-1][1].append(line)
        else:
            groups.append((tar, [line]))
    return groups


def _release(shards, held: dict, index_dir: str) -> None:
    """At a run's end (or when it is garbage): release the segments it still holds, delete its index files."""
    import shutil

    shutil.rmtree(index_dir, ignore_errors=True)
    prefetcher = getattr(shards, "prefetcher", None)
    if prefetcher is not None:
        for tars in held.values():
            prefetcher.release(tars)
    held.clear()
