"""`build_loader`: epochs of DALI batches as torch tensors, with exact resume and corrupt-sample recovery.

Epochs. Each epoch is read by a fresh DALI pipeline: the tar list in an order permuted per epoch (same permutation on
every rank), DALI's sharding by rank (`shard_id=rank`, `num_shards=world_size`, contiguous ranges of that order),
the reader's shuffle buffer seeded per epoch and rank, `pad_last_batch` so that every rank reads ceil(N / world)
samples (a rank with one sample fewer repeats its last one). Every sample is read exactly once per epoch across
ranks, and every rank yields the same number of training batches.

Last batch. Training (pretrain/finetune) drops the last partial batch (`drop_last`; its samples are still read);
with `drop_last=False` it is filled with DALI's padding (repeats of the rank's last sample). Eval trims the
padding: every sample is yielded exactly once; ranks may yield one batch more or fewer than each other.

Resume. DALI's own checkpointing cannot be used: `fn.decoders.video` does not implement it (a pipeline with
`enable_checkpointing=True` fails to build). `state_dict()` = (epoch, batches handed out in the epoch, the corrupt-
sample list). A restarted loader rebuilds the epoch's pipeline and runs the handed-out batches again with the
graph's `plan` input set to skip, which reads the samples and draws every random number (order, frame starts, crops,
flips, masks, erasing boxes) without decoding (a few milliseconds per batch), so it continues exactly where it
stopped: no sample repeated, none skipped. (RandAugment's internal draws and the erasing noise are not replayed.) The
state also records the ids consumed in the epoch; on another world size or batch size the epoch goes on with the
samples no rank consumed (`pipeline.elastic`: index files without them, split by the new shape's rules). If seed,
mode or dataset changed, the saved epoch restarts from its beginning (repeats at most one epoch) with a warning.

The rooms around it: `pipeline.plan` (the decode plan, the pipelines of an epoch, several pipelines per rank),
`pipeline.recovery` (corrupt samples), `pipeline.strategy` (what NVDEC reads, decode="auto"), `pipeline.handoff`
(DALI outputs to torch without copies, GPU buffer lifetime), `pipeline.protocol` (what the trainer relies on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipeline import graph
from pipeline.config import PipelineConfig
from pipeline.elastic import ConsumedIds, resumed_epoch
from pipeline.handoff import GpuKeepAlive, eval_view_ids, select_samples, to_batch
from pipeline.plan import EpochRun, merge_outputs
from pipeline.protocol import LoaderStats
from pipeline.recovery import CorruptSamples, DecodeProbe, error_reason, report_incomplete
from pipeline.remote import open_shards
from pipeline.segments import SegmentedEpochBuilder, epoch_builder_class
from pipeline.shardset import split_source
from pipeline.strategy import choose_nvdec_input, choose_strategy

log = logging.getLogger(__name__)
STATE_FORMAT = "videomae-pipeline/1"


class VideoLoader:
    """Iterates one epoch per `iter()`; see the module docstring and `build_loader`. A `pipeline.protocol.Loader`."""

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str | os.PathLike],
        cfg: PipelineConfig,
        batch_size: int,
        *,
        device: str = "cpu",
        device_id: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_threads: int | None = None,
        prefetch_depth: int = 2,
        state: dict | None = None,
    ):
        _check_arguments(cfg, batch_size, device, rank, world_size)
        self.cfg = cfg.resolved()
        self.batch_size, self.device, self.rank, self.world_size, self.seed = batch_size, device, rank, world_size, seed
        if device == "gpu":
            self.device_id = device_id if device_id is not None else int(os.environ.get("LOCAL_RANK", 0))
            self.torch_device = torch.device("cuda", self.device_id)
        else:
            self.device_id, self.torch_device = None, torch.device("cpu")
        self.stats = LoaderStats()
        self._names = graph.output_names(self.cfg)
        self._keepalive = GpuKeepAlive() if device == "gpu" else None
        self._view_ids: tuple | None = None  # eval's (clip, crop) constants, made on first use
        self._expected_samples: int | None = None
        self._consumed = ConsumedIds()  # training: this rank's consumed ids of the epoch (pipeline.selection)

        self.shards = open_shards(shards, self.cfg, self.stats)  # a URL: through the node's cache (pipeline.remote)
        self.shards.check_stride(self.cfg.stride)
        decoders = self.cfg.decodes_on(device)
        if "cpu" in decoders:
            self.shards.check_cpu_decodable()
        if "mixed" in decoders:
            self.shards.check_gpu_decodable()
        self.cut = True  # IVF members are cut at a key frame before decoding (see pipeline.strategy)
        if "mixed" in decoders and self.shards.layout.cuttable:
            self.cfg, self.cut = choose_nvdec_input(self.shards, self.cfg, self.device_id)
        self._builder = epoch_builder_class(self.shards, self.cfg)(  # remote sets: in segments (pipeline.segments)
            shards=self.shards,
            batch_size=batch_size,
            device=device,
            device_id=self.device_id,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_threads=num_threads,
            prefetch_depth=prefetch_depth,
            cut=self.cut,
        )
        self.cfg = self._builder.fit(self.cfg)  # no more pipelines than the rank's thread budget (pipeline.plan)
        probe = DecodeProbe(self.shards, self.cfg.stride, device, self.device_id, self.cut)
        self._corrupt = CorruptSamples(self.shards, self.stats, probe)
        self.epoch, position = 0, 0
        if state is not None:
            self.epoch, position = self._restore(state)
        for key, reason in self.shards.structural_problems().items():
            self._corrupt.block(key, reason)
        report_incomplete(self.shards, self.cfg.mode, self.stats, rank)
        self.num_samples = -1
        self.decode_table: list[dict] = []  # decode="auto": what was timed (strategy, clips/s or error)
        if self.cfg.decode == "auto":
            self.cfg, self.decode_table = choose_strategy(self._builder, self.cfg, self.epoch)
        self._run = self._open(self.epoch, position)
        log.info(self._builder.describe_threads(self._run))

    @property
    def pipeline_threads(self) -> list[int]:
        """CPU threads of each DALI pipeline of the current epoch, as DALI built them (pipe.num_threads)."""
        return [pipe.num_threads for pipe in self._run.pipes]

    # -- sizes ---------------------------------------------------------------------------------------------------
    @property
    def samples_per_rank(self) -> int:
        """Samples each rank reads per epoch, padding included: ceil(N / world_size)."""
        return -(-self.num_samples // self.world_size)

    @property
    def rank_samples(self) -> int:
        """Distinct samples of this rank's part of an epoch (DALI's contiguous partition of the epoch's order)."""
        n, w, r = self.num_samples, self.world_size, self.rank
        return n * (r + 1) // w - n * r // w

    def __len__(self) -> int:
        if self.cfg.mode == "eval":
            return -(-self.rank_samples // self.batch_size)
        if self.cfg.drop_last:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    @property
    def position(self) -> int:
        """Batches of the current epoch handed out so far."""
        return self._run.position

    # -- iteration -----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields the rest of the current epoch (all of it, unless resumed or interrupted), then moves to the next."""
        if len(self) == 0:
            log.warning(
                "pipeline: rank %d has no complete batch in an epoch (%d samples, batch size %d)",
                self.rank,
                self.samples_per_rank,
                self.batch_size,
            )
        epoch = self.epoch
        while self.epoch == epoch and self._run.position < self._run.stop:
            index = self._run.position
            outputs = self._fetch()
            self._run.position += 1
            batch = self._to_torch(outputs, index)
            if self._run.position == self._run.stop:
                self._advance_epoch()  # the next epoch decodes while this batch trains
            if batch is not None:
                yield batch
        if len(self) == 0:
            self._advance_epoch()

    def _advance_epoch(self) -> None:
        self._consumed = ConsumedIds()
        self._drop_pipeline()
        self._run = self._open(self.epoch + 1, 0)
        self.epoch += 1

    def _drop_pipeline(self) -> None:
        """Free the current pipeline now: DALI pipeline objects sit in reference cycles, and their threads and
        buffers would otherwise wait for the garbage collector."""
        self._run = None
        gc.collect()

    def _fetch(self) -> list:
        """The next iteration of every pipeline of the epoch (a list of output tuples), recovering from failures."""
        if self._keepalive is not None:
            self._keepalive.next_requested(torch.cuda.current_stream(self.torch_device))
        while True:
            try:
                stream = torch.cuda.current_stream(self.torch_device) if self.device == "gpu" else None
                return self._run.outputs(cuda_stream=stream)
            except RuntimeError as error:
                self._recover(self._run, error)

    def _to_torch(self, outputs: list, index: int) -> dict[str, Any] | None:
        """Batch `index` of the epoch as torch tensors (views of DALI's buffers with one pipeline), trimmed in eval.
        `outputs`: one tuple of DALI outputs per pipeline."""
        out = merge_outputs(outputs, self._names)
        if self._keepalive is not None:
            self._keepalive.handed_out(outputs)
        if self.cfg.mode == "eval" and self._view_ids is None:
            self._view_ids = eval_view_ids(self.cfg, self.batch_size, self.torch_device)
        batch = to_batch(out, self.cfg, self.batch_size, self._view_ids)
        views = self.cfg.views_per_sample
        if self.cfg.mode != "eval":
            self._consumed.handed_out(batch["sample_id"][::views])
        keep = self._kept_samples(index, batch["sample_id"])
        if keep is not None:
            if not keep.any():
                return None
            batch = select_samples(batch, keep, views)
        self.stats.batches += 1
        self.stats.samples += batch["video"].shape[0] // views
        return batch

    def _kept_samples(self, index: int, sample_id: torch.Tensor) -> np.ndarray | None:
        """Eval only: which samples of batch `index` to keep (not DALI's padding past this rank's samples, not a
        substituted corrupt sample). None: all of them."""
        if self.cfg.mode != "eval":
            return None
        b, views = self.batch_size, self.cfg.views_per_sample
        keep = np.arange(b) < self.rank_samples - index * b
        bad = self._corrupt.sample_ids()
        if bad:
            ids = sample_id.view(b, views)[:, 0].cpu().numpy()
            keep &= ~np.isin(ids, list(bad))
        return None if keep.all() else keep

    # -- pipelines -----------------------------------------------------------------------------------------------
    def _open(self, epoch: int, position: int, inspect_batch: int | None = None) -> EpochRun:
        """Build the pipelines of `epoch` and fast-forward them to `position` (without decoding, or decoding a few
        samples per pipeline per batch on backends in pipeline.plan.NEVER_EMPTY_DEVICES). `inspect_batch`: one
        pipeline on the CPU backend that decodes nothing, for reading that batch's samples (recovery)."""
        inspecting = inspect_batch is not None
        start = inspect_batch + 1 if inspecting else position
        # Inspection decodes nothing, so it runs on the CPU backend whatever the loader's, in one pipeline: the draws
        # that choose samples and frames are CPU operators in both, and an all-skipped batch is fine there.
        device = "cpu" if inspecting else self.device
        cfg = dataclasses.replace(self.cfg, pipelines=1) if inspecting else self.cfg
        run = self._builder.build(cfg, epoch, start, device)
        filtered = (resumed := self._builder.resumed) is not None and epoch == resumed.epoch
        n = run.epoch_size() + (resumed.removed if filtered else 0)  # the whole epoch's samples
        if self.num_samples < 0:
            self.num_samples = n
            if n < self.world_size:
                raise ValueError(f"{n} samples cannot be split over {self.world_size} ranks")
            if self._expected_samples is not None and self._expected_samples != n and (position or filtered):
                log.warning(
                    "pipeline: the saved loader state counted %d samples, the shards hold %d; restarting "
                    "epoch %d from its beginning",
                    self._expected_samples,
                    n,
                    epoch,
                )
                position = 0
                for plan in run.plans:
                    plan.start = 0
                if filtered:  # the consumed ids name other samples now: the whole epoch again
                    self._builder = dataclasses.replace(self._builder, resumed=None)
                    del run
                    run = self._builder.build(cfg, epoch, 0, device)
                    self.num_samples = n = run.epoch_size()
        elif n != self.num_samples:
            raise RuntimeError(f"the shards now hold {n} samples, {self.num_samples} before")
        rest = self._builder.resumed if filtered else None  # None: dropped above, or not this epoch
        batches = rest.batches(n, self.world_size, self.batch_size, self.cfg.drop_last) if rest else len(self)
        run.begin(position, stop=batches if inspect_batch is None else inspect_batch + 1)
        self.stats.fast_forwarded += position
        return run

    # -- corrupt samples (pipeline.recovery) ---------------------------------------------------------------------
    def _recover(self, run: EpochRun, error: RuntimeError) -> None:
        """Block the samples behind `error` and rebuild the epoch's pipelines at the same position; re-raise
        `error` when no sample of the batch fails on its own."""
        reason = error_reason(error)
        epoch, position = run.epoch, run.position
        culprits = self._corrupt.culprits(error, lambda: self._reread(epoch, position))
        if not culprits:
            raise error
        for source in culprits:
            self._corrupt.block(source, reason)
        del run
        self._drop_pipeline()
        self.stats.rebuilds += 1
        self._run = self._open(epoch, position)

    def _reread(self, epoch: int, position: int) -> dict:
        """The outputs by name of batch `position` of `epoch`, read again without decoding."""
        inspect = self._open(epoch, position, inspect_batch=position)
        outputs = dict(zip(self._names, inspect.pipes[0].outputs()))
        del inspect
        gc.collect()
        return outputs

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the next batch comes from. Batches handed out count as consumed (pipeline.elastic.ConsumedIds)."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "position": self._run.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "mode": self.cfg.mode,
            "blocked": dict(self.shards.blocked),
            **self._consumed.state(self._builder.resumed, self.epoch, self.num_samples),
        }

    def _restore(self, state: dict) -> tuple[int, int]:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state of format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for key, reason in state.get("blocked", {}).items():
            tar, _ = split_source(key)
            if tar in self.shards.tars:
                self._corrupt.block(key, reason)
        epoch, position = int(state["epoch"]), int(state["position"])
        segmented = isinstance(self._builder, SegmentedEpochBuilder)
        resumed = resumed_epoch(state, self.shards, self.seed, self.cfg.mode, segmented)  # None, or the epoch's rest
        if resumed is not None:
            self._builder = dataclasses.replace(self._builder, resumed=resumed)
            self._expected_samples = state.get("num_samples")
        if state.get("elastic"):  # another shape: the rest of the epoch (or all of it) from its start
            return epoch, 0
        shape = {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size, "mode": self.cfg.mode}
        if {k: state.get(k) for k in shape} != shape:
            log.warning(
                "pipeline: the saved loader state was made with other settings (seed, world size, batch "
                "size or mode); restarting epoch %d from its beginning",
                epoch,
            )
            return epoch, 0
        self._expected_samples = state.get("num_samples")
        self._consumed.prior = state.get("consumed")
        return epoch, position

    def close(self) -> None:
        """Stop decoding and delete the patched index files. The loader cannot be iterated afterwards."""
        self._drop_pipeline()
        self.shards.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone
            self.shards.close()


def _check_arguments(cfg: PipelineConfig, batch_size: int, device: str, rank: int, world_size: int) -> None:
    """One-line ValueErrors for arguments no pipeline can honour (the config's own fields: `cfg.resolved()`)."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device {device!r}: expected 'cpu' or 'gpu'")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if cfg.pipelines * cfg.decoder_groups > batch_size:
        raise ValueError(
            f"pipelines={cfg.pipelines} x decoder_groups={cfg.decoder_groups} exceeds batch_size="
            f"{batch_size}: some decoder instances would never get a sample"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")


def build_loader(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    mode: str,
    batch_size: int,
    *,
    device: str = "cpu",
    num_frames: int = 16,
    stride: int = 4,
    input_size: int = 224,
    num_repeats: int = 1,
    mask_ratio: float = 0.9,
    mask_type: str = "tube",
    patch_size: int = 16,
    tubelet_size: int = 2,
    flip: bool | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_threads: int | None = None,
    state: dict | None = None,
    device_id: int | None = None,
    prefetch_depth: int = 2,
    config: PipelineConfig | None = None,
    **options: Any,
) -> VideoLoader:
    """A loader over `shards` (directory, brace pattern, glob, tar, or a list of these).

    `batch_size` counts clips per rank per step before repeats: each batch holds batch_size * K rows, K =
    `num_repeats` (train) or eval_clips * eval_crops (eval). Extra keyword options are `PipelineConfig` fields
    (e.g. `rand_augment=False`, `erase_prob=0.0`, `eval_clips=1`, `short_side=256`, `debug_outputs=True`);
    `config` replaces all of them.

    Yields dicts of torch tensors on the training device (cuda:device_id for "gpu", cpu for "cpu"):
        video      float32[B*K, 3, T, S, S]  normalized with ImageNet mean/std
        mask       bool[B*K, N]              pretrain: N = T/tubelet * (S/patch)^2, (t, h, w) order, True = masked
        label      int64[B*K]                finetune, eval
        sample_id  int64[B*K]                the sample's id in the dataset (manifest["keys"][sample_id])
        clip, crop int64[B*V]                eval: view v of a sample is clip v // crops, crop v % crops
    The K (or V) views of one sample are consecutive rows.
    """
    if config is None:
        config = PipelineConfig(
            mode=mode,
            num_frames=num_frames,
            stride=stride,
            input_size=input_size,
            num_repeats=num_repeats,
            mask_ratio=mask_ratio,
            mask_type=mask_type,
            patch_size=patch_size,
            tubelet_size=tubelet_size,
            flip=flip,
            **options,
        )
    elif options:
        raise TypeError("pass options either through `config` or as keywords, not both")
    return VideoLoader(
        shards,
        config,
        batch_size,
        device=device,
        device_id=device_id,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_threads=num_threads,
        prefetch_depth=prefetch_depth,
        state=state,
    )
