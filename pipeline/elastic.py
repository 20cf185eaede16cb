"""The rest of an epoch for a DALI loader resumed on another shape: the epoch's shards with the consumed samples
taken out of their index files.

DALI's webdataset reader reads what the index files list, so an epoch that continues with the samples not yet
consumed is the same epoch's tar order read through filtered copies of the index files: the consumed samples'
lines removed (the order of the rest kept), tars left with none dropped. DALI then shards, shuffles, pads and drops
the remainder of these N' samples over the new ranks exactly as it does for any epoch (pipeline.loader), so the rest
of the epoch follows the new shape's rules. A sample's id is read from its own info member (shards.format), which is
the id the batches carry and the consumed bitmap (pipeline.selection) marks.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from pipeline import selection
from pipeline.shardset import ShardSet, read_index
from shards import format as fmt

log = logging.getLogger("pipeline.loader")


class ResumedEpoch:
    """Epoch `epoch` less the ids marked in `consumed` (a pipeline.selection bitmap)."""

    def __init__(self, shards: ShardSet, epoch: int, consumed: selection.Bitmap):
        self.shards, self.epoch, self.consumed = shards, epoch, consumed
        self._dir: str | None = None
        self._ids: dict[str, np.ndarray] = {}  # tar -> its samples' ids (read once: a small read per sample)
        self.removed = 0  # index entries taken out by the last `filter`

    def sample_ids(self, tar: str) -> np.ndarray:
        """int64[samples of the tar's index]: each sample's id from its info member (-1 where it has none)."""
        if tar in self._ids:
            return self._ids[tar]
        samples = self.shards.index(tar)[1]
        ids = np.full(len(samples), -1, dtype=np.int64)
        with open(tar, "rb") as f:
            for i, sample in enumerate(samples):
                info = sample.components.get(fmt.INFO_EXT)
                if info is None or info[1] != 4 * len(fmt.INFO_FIELDS):
                    continue
                f.seek(info[0])
                ids[i] = fmt.unpack_info(f.read(info[1]))["sample_id"]
        self._ids[tar] = ids
        return ids

    def filter(self, tars: list[str], index_paths: list[str]) -> tuple[list[str], list[str]]:
        """(tars, index paths) of the epoch, in its order, with the consumed samples' lines removed from (copies of)
        the index files (`index_paths`: the ones DALI would read, patched for corrupt samples or not: their lines
        are the tar's samples in order)."""
        if self._dir is None:  # removed with this object (or at exit)
            self._dir = tempfile.mkdtemp(prefix="videomae-resume-idx-")
            weakref.finalize(self, shutil.rmtree, self._dir, True)
        ids_all = [self.sample_ids(tar) for tar in tars]
        mask = selection.unpack(self.consumed, int(max((ids.max(initial=-1) for ids in ids_all), default=-1)) + 1)
        out_tars, out_paths, self.removed = [], [], 0
        for n, (tar, index_path, ids) in enumerate(zip(tars, index_paths, ids_all)):
            drop = (ids >= 0) & mask[np.maximum(ids, 0)]
            if not drop.any():
                out_tars.append(tar)
                out_paths.append(index_path)
                continue
            self.removed += int(drop.sum())
            if drop.all():
                continue
            _, samples = read_index(index_path)
            kept = [
                [(ext, o, s, name) for ext, (o, s, name) in sample.components.items()]
                for sample, d in zip(samples, drop)
                if not d
            ]
            path = os.path.join(self._dir, f"{n:05d}-{Path(tar).stem}.idx")
            fmt.atomic_write(path, fmt.index_text(kept))
            out_tars.append(tar)
            out_paths.append(path)
        return out_tars, out_paths

    def batches(self, num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
        """Batches per rank of the rest of the epoch (of `num_samples` in all, less the `removed`): its N' samples
        padded to ceil(N' / world_size) per rank and cut into batches by the same rules as a whole epoch."""
        per_rank = -(-(num_samples - self.removed) // world_size)
        return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def resumed_epoch(state: dict, shards: ShardSet, seed: int, mode: str, segmented: bool = False) -> ResumedEpoch | None:
    """The rest of the saved epoch to read, from a loader state that records ids consumed before a resume on another
    shape (`consumed_before`) and was made with this seed and mode; else None (a state of another shape without such
    a record restarts the epoch: said in one warning). `segmented`: the set is read in segments (pipeline.segments),
    which restart the epoch too: the rest of an epoch is made by filtering local index files by sample id, while the
    segments of a remote set are planned from sample counts before their tars are fetched."""
    if segmented and state.get("consumed_before") is not None:
        log.warning(
            "pipeline: a set read in segments resumes on another shape from the beginning of epoch %s (the samples "
            "already consumed in it are read again)",
            state["epoch"],
        )
        return None
    if state.get("consumed_before") is not None and (state.get("seed"), state.get("mode")) == (seed, mode):
        return ResumedEpoch(shards, int(state["epoch"]), state["consumed_before"])
    if state.get("elastic"):
        log.warning(
            "pipeline: the checkpoint records no consumed samples of epoch %s (or another seed or mode); restarting it "
            "from its beginning",
            state["epoch"],
        )
    return None


class ConsumedIds:
    """This rank's consumed ids of the current epoch (training): those of the batches handed out (kept as small
    device tensors until a checkpoint asks: no host sync per batch), those its restored state recorded (`prior`),
    and those consumed on all ranks before a resume on another shape (the ResumedEpoch's)."""

    def __init__(self) -> None:
        self.handed: list[torch.Tensor] = []
        self.prior: selection.Bitmap | None = None

    def handed_out(self, sample_ids: torch.Tensor) -> None:
        """int64[B]: one id per sample of a batch (a copy: DALI reuses its buffers)."""
        self.handed.append(sample_ids.clone())

    def state(self, resumed: ResumedEpoch | None, epoch: int, num_samples: int) -> dict:
        """The loader state's entries: `consumed_before` (all ranks, before a resume on another shape) and
        `consumed` (this rank's, those included)."""
        before = resumed.consumed if resumed is not None and resumed.epoch == epoch else None
        mine = selection.pack_ids(torch.cat(self.handed).cpu(), num_samples) if self.handed else None
        return {"consumed_before": before, "consumed": selection.merge([before, self.prior, mine])}
