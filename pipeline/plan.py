"""The decode plan: which of a rank's DALI pipelines, and which decoder instance in it, decodes each row of a batch;
the pipelines of one epoch (`EpochBuilder`, `EpochRun`); and merging their rows into one batch.

The graph's `plan` input (see `pipeline.graph`) takes one int32 per sample per iteration: -1 skips the sample's
decode branch (reading and every random draw still happen), g >= 0 decodes it on decoder instance g. The loader uses
it three ways: to fast-forward to a saved position (every row skipped: milliseconds per batch), to make the batches
prefetched past the end of an epoch free, and to share each batch between several pipelines.

Several pipelines (`pipelines=P`). P DALI pipelines per rank, each with its own `num_threads` threads and decoder
instances, read the same epoch: the same tar order, seed and reader, so every random draw (made outside the graph's
decode branch) is the same in all of them. Pipeline i decodes the rows i, i + P, ... of every batch and skips the
others through the same `plan` input that fast-forwards (-1: no decode); the loader takes each decoded output row
(video, frames, mask, box) from the pipeline that decoded it and everything else from pipeline 0. A batch is
therefore the one a single pipeline makes, whatever P (every output key; tested in pretraining and eval), except,
as on resume, RandAugment's and the erasing noise's inner draws, which DALI makes per decoded sub-batch. Resume,
fast-forward and corrupt-sample recovery work on all P at once. Reading and the draws are repeated P times (cheap
next to decoding); merging costs one copy of the decoded outputs per batch (P = 1 stays copy-free). Each pipeline
decodes at least `decoder_groups` rows per batch, so on NVDEC no decoder instance ever sees an empty batch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from pipeline import graph
from pipeline.config import PipelineConfig
from pipeline.handoff import as_torch
from pipeline.shardset import ShardSet

# Backends whose decoders must never see an empty batch: after NVDEC's, the next operator fails (bench/RESULTS.md,
# H100 field notes). A skipped iteration there still decodes one sample per decoder instance (DecodePlan).
NEVER_EMPTY_DEVICES = frozenset({"gpu"})
# Outputs made inside the graph's decode branch: a pipeline emits placeholders for the rows it does not decode, so
# with several pipelines these are gathered row by row; every other output is the same in all of them.
DECODED_OUTPUTS = frozenset({"video", "box", "frames", "mask"})


class DecodePlan:
    """Feeds the graph's `plan` input, one call per pipeline iteration: int32[batch_size], -1 for a sample to skip,
    else the decoder instance (group) that decodes it. `share=(i, P)`: this is pipeline i of P, which decodes rows
    i, i + P, ... and skips the others. Iterations before `start` (fast-forward) and from `stop` on (the prefetch
    past the end of the epoch costs nothing) are skipped. The pipeline's rows cycle through the groups, so every
    instance gets a sample whenever it owns >= groups rows; with `never_empty`, the first `groups` of its rows in a
    skipped iteration are decoded anyway (and their output discarded), so no decoder sees an empty batch. The
    random draws are made outside the decode branch, so every later batch is the same whatever was skipped."""

    def __init__(
        self,
        batch_size: int,
        groups: int,
        start: int,
        stop: int | None = None,
        never_empty: bool = False,
        share: tuple[int, int] = (0, 1),
    ):
        self.start, self.stop, self.calls, self.never_empty = start, stop, 0, never_empty
        index, count = share
        rows = np.arange(batch_size)
        mine = rows % count == index
        self.groups = np.where(mine, (rows // count) % groups, -1).astype(np.int32)
        owned = np.flatnonzero(mine)
        self.kept = owned[: min(groups, len(owned))] if never_empty else owned[:0]

    def __call__(self) -> np.ndarray:
        i = self.calls
        self.calls += 1
        if not (i < self.start or (self.stop is not None and i >= self.stop)):
            return self.groups.copy()
        plan = np.full(len(self.groups), -1, dtype=np.int32)
        plan[self.kept] = self.groups[self.kept]
        return plan


class EpochRun:
    """The P pipelines of one epoch (one per `pipelines`), their decode plans, and the batches handed out so far."""

    def __init__(self, pipes: list, plans: list[DecodePlan], epoch: int, position: int = 0):
        self.pipes, self.plans, self.epoch, self.position = pipes, plans, epoch, position

    def epoch_size(self) -> int:
        """Samples in the epoch (all ranks), as DALI's reader counts them."""
        return self.pipes[0].reader_meta("reader")["epoch_size"]

    def begin(self, position: int, stop: int | None) -> None:
        """Decode nothing from iteration `stop` on, schedule the first iterations and fast-forward to `position`
        (iterations before each plan's `start` are skipped, so this costs milliseconds per batch)."""
        for plan in self.plans:
            plan.stop = stop
        for pipe in self.pipes:
            pipe.schedule_run()
        for _ in range(position):
            self.outputs()
        self.position = position

    def outputs(self, cuda_stream=None) -> list:
        """The next iteration of every pipeline (each scheduled again after): one tuple of outputs per pipeline."""
        out = [p.outputs(cuda_stream=cuda_stream) if cuda_stream is not None else p.outputs() for p in self.pipes]
        for p in self.pipes:
            p.schedule_run()
        return out


@dataclasses.dataclass(frozen=True)
class EpochBuilder:
    """Builds the DALI pipelines that read one epoch on this rank; everything but the strategy (`cfg.pipelines`,
    decoder groups) and the epoch is fixed for the loader's life. `cut`: IVF members are cut at a key frame before
    decoding (see `pipeline.strategy.choose_nvdec_input`)."""

    shards: ShardSet
    batch_size: int
    device: str  # the loader's backend: "cpu" or "gpu"
    device_id: int | None
    rank: int
    world_size: int
    seed: int
    num_threads: int | None  # as asked for; see threads_per_pipeline
    prefetch_depth: int
    cut: bool = True

    def threads_per_pipeline(self, pipelines: int) -> int:
        """CPU threads of each of this rank's `pipelines` DALI pipelines: `num_threads`, else this machine's cores
        shared by its local ranks ($LOCAL_WORLD_SIZE); every pipeline gets them all. The one place that decides
        it, so that a per-rank thread budget split between pipelines changes only this."""
        if self.num_threads:
            return self.num_threads
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        return max(1, (os.cpu_count() or 2) // max(local, 1))

    def epoch_seed(self, epoch: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0] & 0x3FFFFFFF)

    def build(self, cfg: PipelineConfig, epoch: int, start: int, device: str | None = None) -> EpochRun:
        """cfg.pipelines built (not yet scheduled) pipelines of `epoch` on `device` (default: the loader's), their
        plans decoding from iteration `start`; `EpochRun.begin` starts them."""
        device = device or self.device
        order = self.shards.epoch_order(self.seed, epoch, cfg.shuffle)
        index_paths = self.shards.patched_index_paths(keep_own_info=cfg.mode == "eval")
        pipes, plans = [], []
        for i in range(cfg.pipelines):
            plan = DecodePlan(
                self.batch_size,
                cfg.decoder_groups,
                start,
                never_empty=device in NEVER_EMPTY_DEVICES,
                share=(i, cfg.pipelines),
            )
            pipe = graph.build_pipeline(
                cfg,
                [self.shards.tars[i] for i in order],
                [index_paths[i] for i in order],
                batch_size=self.batch_size,
                device=device,
                device_id=self.device_id if device == "gpu" else None,
                shard_id=self.rank,
                num_shards=self.world_size,
                seed=self.epoch_seed(epoch),
                num_threads=self.threads_per_pipeline(cfg.pipelines),
                prefetch_depth=self.prefetch_depth,
                plan_source=plan,
                layout=self.shards.layout,
                cut=self.cut,
            )
            pipe.build()
            pipes.append(pipe)
            plans.append(plan)
        return EpochRun(pipes, plans, epoch)


def merge_outputs(outputs: list, names: list[str]) -> dict[str, Any]:
    """name -> the batch's output as a torch tensor (the TensorList itself for "source"), from one tuple of outputs
    per pipeline. One pipeline: views of DALI's buffers. Several: decoded outputs gathered row by row, row r from
    pipeline r % P, the one whose plan decoded it (one copy)."""
    named = [dict(zip(names, o)) for o in outputs]
    count = len(named)
    out: dict[str, Any] = {}
    for name, value in named[0].items():
        if name == "source":
            out[name] = value
        elif count == 1 or name not in DECODED_OUTPUTS:
            out[name] = as_torch(value)
        else:
            out[name] = torch.stack([torch.from_dlpack(named[r % count][name][r]) for r in range(len(value))])
    return out
