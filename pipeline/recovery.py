"""Corrupt samples: finding the sample behind a DALI failure, and blocking it so that the epoch goes on without it.

When DALI fails on a batch, the loader finds the responsible sample (DALI names it in decoder-creation errors;
otherwise the failing batch is re-read without decoding and each of its videos is decoded alone, `DecodeProbe`),
logs one line, counts it in `stats`, substitutes it (see `pipeline.shardset`) and rebuilds the pipeline at the same
position. The failing batch is then produced again, with the substitute. Never a crash, unless no sample of the
batch fails on its own (then the original error is raised). Eval drops substituted samples from its batches
(`CorruptSamples.sample_ids`), so that every other sample is yielded exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import numpy as np

from pipeline import graph
from pipeline.ivfcheck import REASON as ivfcheck_reason
from pipeline.ivfcheck import checked_header
from pipeline.protocol import LoaderStats
from pipeline.shardset import ShardSet, split_source
from shards import format as fmt

log = logging.getLogger(__name__)
_SOURCE_RE = re.compile(r'"([^"\n]+?\.tar:\d+:[^"\n]+)"')


def error_reason(error: Exception) -> str:
    """The most specific line of a DALI error message (for `pipeline.ivfcheck`'s deliberate failure: its reason)."""
    if f"in {checked_header.__name__}" in str(error):  # DALI quotes the graph-building frames of the failing operator
        return ivfcheck_reason
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Assert on", "Error", "[/")) and "failed:" in line:
            return line.split("failed:", 1)[1].strip()[:200]
    for line in reversed(lines):
        if "pipeline object is no longer valid" not in line and not line.startswith("C++ context"):
            return line[:200]
    return "DALI error"


@dataclasses.dataclass(frozen=True)
class DecodeProbe:
    """Decodes one clip alone, the way the training graph decodes it (member frames[0] % P, keyframe cut in IVF
    layouts unless `cut` is off), on a one-sample pipeline of `device`."""

    shards: ShardSet
    stride: int
    device: str
    device_id: int | None
    cut: bool

    def __call__(self, tar: str, member: str, frames: np.ndarray) -> bool:
        """Whether the clip of timeline `frames` (int32[T]) of the sample whose first video member is `member`
        decodes."""
        shards = self.shards
        sample = next(
            (s for s in shards.index(tar)[1] if s.components.get(shards.video_exts[0], (0, 0, None))[2] == member), None
        )
        video = sample and sample.components.get(shards.video_exts[int(frames[0]) % shards.phases])
        cuts = sample and sample.components.get(fmt.CUTS_EXT)
        if video is None or video[1] == 0 or (shards.layout.cuttable and cuts is None):
            return False
        inputs = {
            "video": [np.frombuffer(shards.read_member(tar, video[0], video[1]), dtype=np.uint8)],
            "frame_idx": [frames],
        }
        if shards.layout.cuttable:
            table = shards.read_member(tar, cuts[0], cuts[1])
            if not table or len(table) % 4:
                return False
            inputs["cuts"] = [np.frombuffer(table, dtype="<i4")]
        pipe = graph.build_probe(shards.layout, self.stride, self.device, self.device_id, cut=self.cut)
        try:
            pipe.build()
            pipe.run(**inputs)
            return True
        except RuntimeError:
            return False
        finally:
            del pipe


class CorruptSamples:
    """A loader's corrupt samples: blocked in its ShardSet (which substitutes them), counted in its `stats`, one
    WARNING line each; and the search for the samples behind a DALI error."""

    def __init__(self, shards: ShardSet, stats: LoaderStats, probe: DecodeProbe):
        self.shards, self.stats, self.probe = shards, stats, probe
        self._ids: set[int] | None = None
        self._ids_blocked = -1  # len(shards.blocked) when _ids was computed

    def is_blocked(self, source: str) -> bool:
        tar, member = split_source(source)
        return f"{tar}:{member}" in self.shards.blocked

    def block(self, source: str, reason: str) -> None:
        """Skip the sample of `source` ("tar:offset:member" or "tar:member") from now on, unless it already is."""
        if self.is_blocked(source):
            return
        tar, member = split_source(source)
        self.shards.block(source, reason)
        self.stats.corrupt_samples += 1
        self.stats.corrupt.append(f"{tar}:{member}: {reason}")
        log.warning(
            "pipeline: skipping corrupt sample %s in %s (%s); %d skipped so far",
            member,
            tar,
            reason,
            self.stats.corrupt_samples,
        )

    def sample_ids(self) -> set[int]:
        """Dataset ids of the blocked samples (eval drops them from its batches)."""
        if not self.shards.blocked:
            return set()
        if self._ids is None or self._ids_blocked != len(self.shards.blocked):
            self._ids, self._ids_blocked = self.shards.blocked_sample_ids(), len(self.shards.blocked)
        return self._ids

    def culprits(self, error: RuntimeError, reread: Callable[[], dict]) -> list[str]:
        """The sources of the not yet blocked samples behind `error`: those DALI names, else those of the failing
        batch that do not decode alone. `reread()`: the failing batch's outputs by name, read without decoding
        ("source" and "frame_idx" are used)."""
        sources = sorted(set(_SOURCE_RE.findall(str(error))))
        if not sources:
            sources = self._failing_samples(reread())
        return [s for s in sources if not self.is_blocked(s)]

    def _failing_samples(self, outputs: dict) -> list[str]:
        failing = []
        for i in range(len(outputs["source"])):
            source = bytes(np.array(outputs["source"][i])).decode()
            frames = np.array(outputs["frame_idx"][i]).astype(np.int32)
            tar, member = split_source(source)
            if not self.probe(tar, member, frames):
                failing.append(source)
        return failing


def report_incomplete(shards: ShardSet, mode: str, stats: LoaderStats, rank: int) -> None:
    """Count the samples that lack a member the graph reads (DALI's reader leaves them out without a word) in
    `stats.incomplete_samples`, and say so in one warning line (rank 0: every rank sees the same shards)."""
    incomplete = shards.incomplete_samples(shards.video_exts[:1] if mode == "eval" else shards.video_exts)
    stats.incomplete_samples = len(incomplete)
    if incomplete and rank == 0:
        first, what = next(iter(incomplete.items()))
        log.warning(
            "pipeline: %d sample(s) lack a member and are left out (first: %s: %s)", len(incomplete), first, what
        )
