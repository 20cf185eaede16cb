"""The decode plan: which of a rank's DALI pipelines, and which decoder instance in it, decodes each row of a batch;
the pipelines of one epoch (`EpochBuilder`, `EpochRun`); and merging their rows into one batch.

The graph's `plan` input (see `pipeline.graph`) takes one int32 per sample per iteration: -1 skips the sample's
decode branch (reading and every random draw still happen), g >= 0 decodes it on decoder instance g. The loader uses
it three ways: to fast-forward to a saved position (every row skipped: milliseconds per batch), to make the batches
prefetched past the end of an epoch free, and to share each batch between several pipelines.

Several pipelines (`pipelines=P`). P DALI pipelines per rank, each with its own threads and decoder instances, read
the same epoch: the same tar order, seed and reader, so every random draw (made outside the graph's
decode branch) is the same in all of them. Pipeline i decodes the rows i, i + P, ... of every batch and skips the
others through the same `plan` input that fast-forwards (-1: no decode); the loader takes each decoded output row
(video, frames, mask, box) from the pipeline that decoded it and everything else from pipeline 0. A batch is
therefore the one a single pipeline makes, whatever P (every output key; tested in pretraining and eval), except,
as on resume, RandAugment's and the erasing noise's inner draws, which DALI makes per decoded sub-batch. Resume,
fast-forward and corrupt-sample recovery work on all P at once. Reading and the draws are repeated P times (cheap
next to decoding); merging costs one copy of the decoded outputs per batch (P = 1 stays copy-free). Each pipeline
decodes at least `decoder_groups` rows per batch, so on NVDEC no decoder instance ever sees an empty batch.

Threads (`EpochBuilder.thread_budget`). A rank's pipelines share one budget of CPU threads: `num_threads` (train.py's
`data.num_threads`) is the total for all of them, by default the cores this process may use shared by the local ranks
(`cores_per_local_rank`). Each of P pipelines gets budget // P threads, and a rank runs at most `budget` pipelines (a
pipeline needs a thread of its own). CPU decoder groups add no threads: DALI runs every CPU operator of a pipeline,
each group's decoder included, on that pipeline's one pool (measured on the CPU backend: a pipeline of T threads adds
2T + 1 OS threads to the process, with 1 decoder group or several; tests/test_pipeline_threads.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import graph
from pipeline.config import PipelineConfig
from pipeline.handoff import as_torch
from pipeline.shardset import ShardSet

if TYPE_CHECKING:
    from pipeline.elastic import ResumedEpoch

log = logging.getLogger(__name__)
# Backends whose decoders must never see an empty batch: after NVDEC's, the next operator fails (bench/RESULTS.md,
# H100 field notes). A skipped iteration there still decodes one sample per decoder instance (DecodePlan).
NEVER_EMPTY_DEVICES = frozenset({"gpu"})
# Outputs made inside the graph's decode branch: a pipeline emits placeholders for the rows it does not decode, so
# with several pipelines these are gathered row by row; every other output is the same in all of them.
DECODED_OUTPUTS = frozenset({"video", "box", "frames", "mask"})


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (what taskset, cgroups' cpusets or a launcher's binding
    leave it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform
        return os.cpu_count() or 1


def local_ranks() -> int:
    """Processes sharing this machine's cores: $LOCAL_WORLD_SIZE (torchrun sets it), else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def cores_per_local_rank() -> int:
    """This rank's share of the cores: usable_cores() // local_ranks(), at least 1."""
    return max(1, usable_cores() // local_ranks())


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
        self.stop = stop
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
    num_threads: int | None  # the rank's thread budget as asked for (None: its share of the cores); thread_budget
    prefetch_depth: int
    cut: bool = True
    resumed: ResumedEpoch | None = None  # an epoch resumed on another shape: read less its consumed samples

    def epoch_shards(self, epoch: int, cfg: PipelineConfig) -> tuple[list[str], list[str]]:
        """(tars, index paths) DALI reads in `epoch`, in the epoch's order (less the consumed samples of a resumed
        epoch: pipeline.elastic)."""
        order = self.shards.epoch_order(self.seed, epoch, cfg.shuffle)
        index_paths = self.shards.patched_index_paths(keep_own_info=cfg.mode == "eval")
        tars, paths = [self.shards.tars[i] for i in order], [index_paths[i] for i in order]
        if self.resumed is not None and epoch == self.resumed.epoch:
            return self.resumed.filter(tars, paths)
        return tars, paths

    def thread_budget(self) -> int:
        """CPU threads of all this rank's pipelines together: `num_threads` (a per-rank total, honoured as given:
        NVDEC decodes one video per thread, so more threads than cores can pay there), else this process's share of
        the cores (`cores_per_local_rank`). The one place that decides it."""
        return self.num_threads or cores_per_local_rank()

    def pipelines_within_budget(self, pipelines: int) -> int:
        """How many of `pipelines` this rank runs: at most one per thread of its budget."""
        return max(1, min(pipelines, self.thread_budget()))

    def threads_per_pipeline(self, pipelines: int) -> int:
        """CPU threads of each of this rank's `pipelines` DALI pipelines: an equal share of the budget, >= 1."""
        return max(1, self.thread_budget() // pipelines)

    def fit(self, cfg: PipelineConfig) -> PipelineConfig:
        """`cfg` with no more pipelines than the thread budget allows (said in one WARNING line when lowered;
        batches do not depend on the number of pipelines)."""
        pipelines = self.pipelines_within_budget(cfg.pipelines)
        if pipelines == cfg.pipelines:
            return cfg
        log.warning(
            "pipeline: pipelines=%d exceeds this rank's budget of %d CPU threads (%s); running %d",
            cfg.pipelines,
            self.thread_budget(),
            self.budget_source(),
            pipelines,
        )
        return dataclasses.replace(cfg, pipelines=pipelines)

    def budget_source(self) -> str:
        """Where the thread budget comes from, for log lines."""
        share = f"{usable_cores()} core(s) / {local_ranks()} local rank(s)"
        if self.num_threads:
            return f"num_threads={self.num_threads} as asked; the cores' share is {cores_per_local_rank()}: {share}"
        return share

    def describe_threads(self, run: EpochRun) -> str:
        """One line: the threads of `run`'s pipelines as DALI built them, against the budget."""
        threads = [pipe.num_threads for pipe in run.pipes]
        return (
            f"pipeline: rank {self.rank}: {len(threads)} pipeline(s) x {'/'.join(map(str, sorted(set(threads))))} "
            f"CPU threads = {sum(threads)} of a budget of {self.thread_budget()} ({self.budget_source()})"
        )

    def epoch_seed(self, epoch: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0] & 0x3FFFFFFF)

    def build(self, cfg: PipelineConfig, epoch: int, start: int, device: str | None = None) -> EpochRun:
        """cfg.pipelines built (not yet scheduled) pipelines of `epoch` on `device` (default: the loader's), their
        plans decoding from iteration `start`; `EpochRun.begin` starts them."""
        device = device or self.device
        tars, index_paths = self.epoch_shards(epoch, cfg)
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
                tars,
                index_paths,
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
