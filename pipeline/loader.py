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
stopped: no sample repeated, none skipped. (RandAugment's internal draws and the erasing noise are not replayed.) If
world size, batch size, seed, mode or dataset changed, the saved epoch restarts from its beginning (repeats at most
one epoch) with a warning.

Corrupt samples. When DALI fails on a batch, the loader finds the responsible sample (DALI names it in
decoder-creation errors; otherwise the failing batch is re-read without decoding and each of its videos is
decoded alone), logs one line, counts it in `stats`, substitutes it (see `pipeline.shardset`) and rebuilds the
pipeline at the same position. The failing batch is then produced again, with the substitute. Never a crash, unless
no sample of the batch fails on its own (then the original error is raised).

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

Choosing the strategy (`decode="auto"`). Before the first pipeline of the run is built, the loader times candidate
strategies (pipelines 1/2 x decoder groups 1/2 at the configured thread count, the configured one first; on the GPU
backend also hybrids with CPU decoder groups where the shards are CPU-decodable) on pipelines built for the timing
only, over `auto_batches` batches after one untimed batch, keeps the fastest for the rest of the run and logs the
table. The batches handed out come from fresh pipelines, so they are exactly those of any fixed strategy.

Handoff without copies. DALI's dynamic executor (the default in 2.4) allocates new output buffers per iteration and
never writes into a buffer it has returned, so pipeline outputs are handed to torch through DLPack
(`torch.from_dlpack(TensorList.as_tensor())`: same memory, no copy; views of one clip are already consecutive, so
[B, K, ...] -> [B*K, ...] is a view). On the GPU, `pipe.outputs(cuda_stream=torch's current stream)` makes that
stream wait on DALI's completion event: no host synchronization. The remaining hazard is the other end of the
buffer's life: DALI frees an output in the order of its own stream when the last reference dies, which can happen
(in Python) while kernels that read it are still queued on torch's stream; DALI could then hand the memory to a
later batch and overwrite it under those kernels (DALI 2.4 keeps the output's deallocation order on its own stream:
`Executor2::Outputs` pops outputs with set_output_order=false). The loader therefore keeps a reference to every
batch it handed out until a CUDA event, recorded on torch's current stream when the *next* batch is requested, has
completed (polled with `Event.query()`, never waited on). Consumers that use a batch on another stream, or keep it
after asking for the next one, must synchronize themselves. The only copies left are inside the graph: stacking the
K uint8 views (1/4 of the output size) and DALI's own operator outputs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import graph
from pipeline.config import PipelineConfig
from pipeline.shardset import ShardSet, split_source
from shards import format as fmt

log = logging.getLogger("pipeline")
STATE_FORMAT = "videomae-pipeline/1"
_SOURCE_RE = re.compile(r'"([^"\n]+?\.tar:\d+:[^"\n]+)"')


@dataclass
class LoaderStats:
    batches: int = 0  # batches handed out since construction
    samples: int = 0  # samples (not views) in them
    corrupt_samples: int = 0  # distinct samples substituted because DALI could not decode them
    corrupt: list[str] = field(default_factory=list)  # "tar:member: reason", one per corrupt sample
    rebuilds: int = 0  # pipelines rebuilt to recover from a failure
    fast_forwarded: int = 0  # batches replayed without decoding (resume, recovery)


# Backends whose decoders must never see an empty batch. DALI 2.4's mixed (NVDEC) video decoder hands an empty
# batch on with no dimensions, which the resize after it rejects ("The number of dimensions 0 does not match any of
# the allowed layouts"; seen on an H100, 2026-11-25), so a skipped iteration there still decodes one sample per
# decoder instance.
NEVER_EMPTY_DEVICES = frozenset({"gpu"})
# Outputs made inside the graph's decode branch: a pipeline emits placeholders for the rows it does not decode, so
# with several pipelines these are gathered row by row; every other output is the same in all of them.
DECODED_OUTPUTS = frozenset({"video", "box", "frames", "mask"})
# (device id, first tar) -> how IVF members reach NVDEC ("cut", "whole" or "cpu") and why, probed once per process
_NVDEC_INPUT: dict[tuple, tuple[str, str]] = {}


class _DecodePlan:
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


class _GpuKeepAlive:
    """Holds DALI output buffers until torch's stream has passed the point where the consumer finished with them."""

    def __init__(self):
        self._pending: collections.deque = collections.deque()
        self._last: Any = None

    def handed_out(self, outputs) -> None:
        self._last = outputs

    def next_requested(self, stream: torch.cuda.Stream) -> None:
        if self._last is not None:
            event = torch.cuda.Event()
            event.record(stream)
            self._pending.append((event, self._last))
            self._last = None
        while self._pending and self._pending[0][0].query():
            self._pending.popleft()

    def __len__(self) -> int:
        return len(self._pending)


class _EpochRun:
    """The P pipelines of one epoch (one per `pipelines`), their plans, and the batches handed out so far."""

    def __init__(self, pipes: list, schedules: list[_DecodePlan], epoch: int, position: int):
        self.pipes, self.schedules, self.epoch, self.position = pipes, schedules, epoch, position

    def outputs(self, cuda_stream=None) -> list:
        """The next iteration of every pipeline (each scheduled again after): one tuple of outputs per pipeline."""
        out = [p.outputs(cuda_stream=cuda_stream) if cuda_stream is not None else p.outputs() for p in self.pipes]
        for p in self.pipes:
            p.schedule_run()
        return out


class VideoLoader:
    """Iterates one epoch per `iter()`; see the module docstring and `build_loader`."""

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
        self.cfg = cfg.resolved()
        self.batch_size, self.device, self.rank, self.world_size, self.seed = batch_size, device, rank, world_size, seed
        self.prefetch_depth = prefetch_depth
        if device == "gpu":
            self.device_id = device_id if device_id is not None else int(os.environ.get("LOCAL_RANK", 0))
            self.torch_device = torch.device("cuda", self.device_id)
        else:
            self.device_id, self.torch_device = None, torch.device("cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.num_threads = num_threads or max(1, (os.cpu_count() or 2) // max(local, 1))
        self.stats = LoaderStats()
        self._names = graph.output_names(self.cfg)
        self._keepalive = _GpuKeepAlive() if device == "gpu" else None
        self._view_consts: dict = {}
        self._expected_samples: int | None = None

        self.shards = ShardSet(shards)
        self.shards.check_stride(self.cfg.stride)
        decoders = self.cfg.decodes_on(device)
        if "cpu" in decoders:
            self.shards.check_cpu_decodable()
        if "mixed" in decoders:
            self.shards.check_gpu_decodable()
        self.cut = True  # IVF members are cut at a key frame before decoding (see _choose_nvdec_input)
        if "mixed" in decoders and self.shards.layout.cuttable:
            self._choose_nvdec_input()
        self.epoch, position = 0, 0
        if state is not None:
            self.epoch, position = self._restore(state)
        for key, reason in self.shards.structural_problems().items():
            self._block(key, reason)
        self.num_samples = -1
        self.decode_table: list[dict] = []  # decode="auto": what was timed (strategy, clips/s or error)
        if self.cfg.decode == "auto":
            self._choose_strategy(self.epoch)
        self._run = self._open(self.epoch, position)

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
        while self.epoch == epoch and self._run.position < len(self):
            index = self._run.position
            outputs = self._fetch()
            self._run.position += 1
            batch = self._to_torch(outputs, index)
            if self._run.position == len(self):
                self._advance_epoch()  # the next epoch decodes while this batch trains
            if batch is not None:
                yield batch
        if len(self) == 0:
            self._advance_epoch()

    def _advance_epoch(self) -> None:
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

    def _merged(self, outputs: list) -> dict[str, Any]:
        """name -> the batch's output as a torch tensor (the TensorList itself for "source"). One pipeline: views of
        DALI's buffers. Several: decoded outputs gathered row by row, row r from pipeline r % P (one copy)."""
        named = [dict(zip(self._names, o)) for o in outputs]
        count = len(named)
        out: dict[str, Any] = {}
        for name, value in named[0].items():
            if name == "source":
                out[name] = value
            elif count == 1 or name not in DECODED_OUTPUTS:
                out[name] = _as_torch(value)
            else:
                out[name] = torch.stack([torch.from_dlpack(named[r % count][name][r]) for r in range(len(value))])
        return out

    def _to_torch(self, outputs: list, index: int) -> dict[str, Any] | None:
        """Batch `index` of the epoch as torch tensors (views of DALI's buffers with one pipeline), trimmed in eval.
        `outputs`: one tuple of DALI outputs per pipeline."""
        cfg, views, b = self.cfg, self.cfg.views_per_sample, self.batch_size
        out = self._merged(outputs)
        if self._keepalive is not None:
            self._keepalive.handed_out(outputs)
        batch: dict[str, Any] = {"video": out["video"].flatten(0, 1), "sample_id": out["sample_id"].reshape(-1)}
        if "label" in out:
            batch["label"] = out["label"].reshape(-1)
        if "mask" in out:
            batch["mask"] = out["mask"].flatten(0, 1)
        if cfg.mode == "eval":
            batch["clip"], batch["crop"] = self._eval_view_ids(b)
        if cfg.debug_outputs:
            frame_idx = out["frame_idx"].to(torch.int64)  # [B, T] or [B, clips*T]
            if cfg.mode == "eval":
                frame_idx = (
                    frame_idx.view(b, cfg.eval_clips, 1, cfg.num_frames)
                    .expand(b, cfg.eval_clips, cfg.eval_crops, cfg.num_frames)
                    .reshape(b * views, cfg.num_frames)
                )
            else:
                frame_idx = frame_idx.repeat_interleave(views, dim=0)
            batch["frame_idx"] = frame_idx
            batch["box"] = out["box"].reshape(b * views, 5)
            batch["frames"] = out["frames"].flatten(0, 1)
            batch["source"] = [bytes(np.array(out["source"][i])).decode() for i in range(b)]
        keep = self._kept_samples(index, batch["sample_id"])
        if keep is not None:
            if not keep.any():
                return None
            batch = _select_samples(batch, keep, views)
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
        bad = self._bad_ids
        if bad:
            ids = sample_id.view(b, views)[:, 0].cpu().numpy()
            keep &= ~np.isin(ids, list(bad))
        return None if keep.all() else keep

    def _eval_view_ids(self, b: int):
        key = b
        if key not in self._view_consts:
            cfg = self.cfg
            clip = torch.arange(cfg.eval_clips).repeat_interleave(cfg.eval_crops).repeat(b)
            crop = torch.arange(cfg.eval_crops).repeat(cfg.eval_clips).repeat(b)
            self._view_consts[key] = (clip.to(self.torch_device), crop.to(self.torch_device))
        return self._view_consts[key]

    # -- pipelines -----------------------------------------------------------------------------------------------
    def _epoch_seed(self, epoch: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0] & 0x3FFFFFFF)

    def _build_pipes(self, cfg: PipelineConfig, epoch: int, start: int, device: str) -> tuple[list, list]:
        """cfg.pipelines built pipelines of `epoch` on `device` and their plans (decoding from iteration `start`)."""
        order = self.shards.epoch_order(self.seed, epoch, cfg.shuffle)
        index_paths = self.shards.patched_index_paths(keep_own_info=cfg.mode == "eval")
        pipes, schedules = [], []
        for i in range(cfg.pipelines):
            schedule = _DecodePlan(
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
                seed=self._epoch_seed(epoch),
                num_threads=self.num_threads,
                prefetch_depth=self.prefetch_depth,
                plan_source=schedule,
                layout=self.shards.layout,
                cut=self.cut,
            )
            pipe.build()
            pipes.append(pipe)
            schedules.append(schedule)
        return pipes, schedules

    def _open(self, epoch: int, position: int, inspect_batch: int | None = None) -> _EpochRun:
        """Build the pipelines of `epoch` and fast-forward them to `position` (without decoding, or decoding a few
        samples per pipeline per batch on backends in NEVER_EMPTY_DEVICES)."""
        inspecting = inspect_batch is not None
        start = inspect_batch + 1 if inspecting else position
        # Inspection decodes nothing, so it runs on the CPU backend whatever the loader's, in one pipeline: the draws
        # that choose samples and frames are CPU operators in both, and an all-skipped batch is fine there.
        device = "cpu" if inspecting else self.device
        cfg = dataclasses.replace(self.cfg, pipelines=1) if inspecting else self.cfg
        pipes, schedules = self._build_pipes(cfg, epoch, start, device)
        n = pipes[0].reader_meta("reader")["epoch_size"]
        if self.num_samples < 0:
            self.num_samples = n
            if n < self.world_size:
                raise ValueError(f"{n} samples cannot be split over {self.world_size} ranks")
            if self._expected_samples is not None and self._expected_samples != n and position:
                log.warning(
                    "pipeline: the saved loader state counted %d samples, the shards hold %d; restarting "
                    "epoch %d from its beginning",
                    self._expected_samples,
                    n,
                    epoch,
                )
                position = 0
                for schedule in schedules:
                    schedule.start = 0
        elif n != self.num_samples:
            raise RuntimeError(f"the shards now hold {n} samples, {self.num_samples} before")
        for schedule in schedules:
            schedule.stop = len(self) if inspect_batch is None else inspect_batch + 1
        run = _EpochRun(pipes, schedules, epoch, position)
        for pipe in pipes:
            pipe.schedule_run()
        for _ in range(position):
            run.outputs()
        self.stats.fast_forwarded += position
        return run

    # -- decoding strategy (decode="auto") --------------------------------------------------------------------------
    def _strategies(self) -> list[tuple[int, int, int]]:
        """(pipelines, decoder_groups, cpu_decoder_groups) to time, the configured one first: 1 or 2 pipelines x 1
        or 2 decoder groups; on the GPU backend also hybrids (CPU groups beside NVDEC) where the shards are CPU-
        decodable, and only CPU groups where NVDEC cannot read them (see _choose_nvdec_input)."""
        cfg = self.cfg
        grid = [(p, g) for p in (1, 2) for g in (1, 2)]
        if self.device == "cpu":
            found = [(p, g, 0) for p, g in grid]
        elif cfg.cpu_decoder_groups == cfg.decoder_groups:  # CPU decoding, GPU augmentation (chosen or forced)
            found = [(p, g, g) for p, g in grid]
        else:
            found = [(p, g, 0) for p, g in grid]
            try:
                self.shards.check_cpu_decodable()
                found += [(1, 2, 1), (1, 3, 2), (2, 2, 1)]
            except ValueError:  # H.264 and other codecs DALI's CPU decoder refuses: NVDEC only
                pass
        configured = (cfg.pipelines, cfg.decoder_groups, cfg.cpu_decoder_groups)
        unique = dict.fromkeys([configured] + found)
        return [s for s in unique if s[0] * s[1] <= self.batch_size]

    def _time_strategy(self, cfg: PipelineConfig, epoch: int) -> float:
        """Decoded clips/s of `cfg`'s strategy over cfg.auto_batches batches of `epoch`, after one untimed batch
        (start-up and the first decodes), on pipelines built for this only and dropped after."""
        pipes, _ = self._build_pipes(cfg, epoch, 0, self.device)
        run = _EpochRun(pipes, [], epoch, 0)
        try:
            for pipe in pipes:
                pipe.schedule_run()
            run.outputs()
            start = time.perf_counter()
            for _ in range(cfg.auto_batches):
                run.outputs()
            if self.device == "gpu":
                torch.cuda.synchronize(self.torch_device)
            return self.batch_size * cfg.auto_batches / (time.perf_counter() - start)
        finally:
            del run, pipes
            gc.collect()

    def _choose_strategy(self, epoch: int) -> None:
        """decode="auto": time every candidate of _strategies() and keep the fastest in self.cfg; log the table."""
        table = []
        for pipelines, groups, cpu_groups in self._strategies():
            cfg = dataclasses.replace(
                self.cfg, pipelines=pipelines, decoder_groups=groups, cpu_decoder_groups=cpu_groups
            )
            row: dict[str, Any] = {"pipelines": pipelines, "decoder_groups": groups, "cpu_decoder_groups": cpu_groups}
            try:
                row["clips_per_s"] = round(self._time_strategy(cfg, epoch), 2)
            except RuntimeError as error:  # a strategy this machine cannot run, or a corrupt first batch
                row["error"] = _error_reason(error)
            table.append(row)
        self.decode_table = table
        timed = [r for r in table if "clips_per_s" in r]
        best = max(timed, key=lambda r: r["clips_per_s"]) if timed else None
        lines = [
            f"  {'->' if r is best else '  '} pipelines={r['pipelines']} decoder_groups={r['decoder_groups']} "
            f"cpu_decoder_groups={r['cpu_decoder_groups']}: "
            + (f"{r['clips_per_s']:.1f} clips/s" if "clips_per_s" in r else f"failed ({r['error']})")
            for r in table
        ]
        # a warning, like the loader's other start-up lines, so that train.py's console shows it
        log.warning(
            "pipeline: decode=auto timed %d batches of %d clips per strategy (%s backend, %d threads per "
            "pipeline); %s:\n%s",
            self.cfg.auto_batches,
            self.batch_size,
            self.device,
            self.num_threads,
            "keeping the fastest (->)" if best else "none ran, keeping the configured one",
            "\n".join(lines),
        )
        if best is not None:
            self.cfg = dataclasses.replace(
                self.cfg,
                pipelines=best["pipelines"],
                decoder_groups=best["decoder_groups"],
                cpu_decoder_groups=best["cpu_decoder_groups"],
            )

    # -- corrupt samples -----------------------------------------------------------------------------------------
    @property
    def _bad_ids(self) -> set[int]:
        if self.cfg.mode != "eval" or not self.shards.blocked:
            return set()
        if getattr(self, "_bad_ids_cache", None) is None or self._bad_ids_key != len(self.shards.blocked):
            self._bad_ids_cache, self._bad_ids_key = self.shards.blocked_sample_ids(), len(self.shards.blocked)
        return self._bad_ids_cache

    def _block(self, key: str, reason: str) -> None:
        tar, member = split_source(key)
        if f"{tar}:{member}" in self.shards.blocked:
            return
        self.shards.block(key, reason)
        self.stats.corrupt_samples += 1
        self.stats.corrupt.append(f"{tar}:{member}: {reason}")
        log.warning(
            "pipeline: skipping corrupt sample %s in %s (%s); %d skipped so far",
            member,
            tar,
            reason,
            self.stats.corrupt_samples,
        )

    def _recover(self, run: _EpochRun, error: RuntimeError) -> None:
        reason = _error_reason(error)
        sources = sorted(set(_SOURCE_RE.findall(str(error))))
        if not sources:
            sources = self._find_failing_samples(run)
        sources = [s for s in sources if f"{split_source(s)[0]}:{split_source(s)[1]}" not in self.shards.blocked]
        if not sources:
            raise error
        for source in sources:
            self._block(source, reason)
        epoch, position = run.epoch, run.position
        del run
        self._drop_pipeline()
        self.stats.rebuilds += 1
        self._run = self._open(epoch, position)

    def _find_failing_samples(self, run: _EpochRun) -> list[str]:
        """Re-read the failing batch without decoding, then decode each of its clips alone."""
        inspect = self._open(run.epoch, run.position, inspect_batch=run.position)
        outputs = dict(zip(self._names, inspect.pipes[0].outputs()))
        del inspect
        gc.collect()
        failing = []
        for i in range(self.batch_size):
            source = bytes(np.array(outputs["source"][i])).decode()
            frames = np.array(outputs["frame_idx"][i]).astype(np.int32)
            tar, member = split_source(source)
            if not self._decodes(tar, member, frames):
                failing.append(source)
        return failing

    def _decodes(self, tar: str, member: str, frames: np.ndarray) -> bool:
        """Whether the clip of timeline `frames` of the sample whose first video member is `member` decodes, the
        way the graph decodes it (member frames[0] % P, keyframe cut in IVF layouts)."""
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
        pipe = graph.build_probe(shards.layout, self.cfg.stride, self.device, self.device_id, cut=self.cut)
        try:
            pipe.build()
            pipe.run(**inputs)
            return True
        except RuntimeError:
            return False
        finally:
            del pipe

    def _choose_nvdec_input(self) -> None:
        """What NVDEC gets from IVF shards, decided once per process and device by decoding one real clip on both
        backends: cut members (the design), else whole members (decoded from their start), else nothing (CPU
        threads decode, the GPU augments). Each fallback is said in one log line."""
        key = (self.device_id, self.shards.tars[0])
        if key not in _NVDEC_INPUT:
            _NVDEC_INPUT[key] = self._probe_nvdec()
        choice, why = _NVDEC_INPUT[key]
        if choice == "whole":
            self.cut = False
            log.warning(
                "pipeline: NVDEC does not read IVF members cut at a key frame (%s); handing them to it whole "
                "(each clip decoded from its member's start)",
                why,
            )
        elif choice == "cpu":
            self.cfg = dataclasses.replace(self.cfg, cpu_decoder_groups=self.cfg.decoder_groups)
            log.warning(
                "pipeline: NVDEC cannot read these IVF shards (%s); decoding them on CPU threads and "
                "augmenting on the GPU (rebuild with --container mp4 to decode on NVDEC)",
                why,
            )

    def _probe_nvdec(self) -> tuple[str, str]:
        """("cut" | "whole" | "cpu", the reason for a fallback): one clip of the first sample, from its second key
        frame on where it has one, decoded by NVDEC and by the CPU decoder, must agree."""
        shards, stride = self.shards, self.cfg.stride
        tar = next(t for t in shards.tars if shards.index(t)[1])
        sample = shards.index(tar)[1][0]
        video = shards.read_member(tar, *sample.components[shards.video_exts[0]][:2])
        cuts = shards.read_member(tar, *sample.components[fmt.CUTS_EXT][:2])
        rows = fmt.unpack_cuts(cuts)
        member0 = rows[rows[:, 0] == 0]
        keys = member0[member0[:, 3] == fmt.CUT_KEY, 1]
        length = int(member0[member0[:, 3] == fmt.CUT_END, 1][0])
        first = int(keys[1]) if len(keys) > 1 else 0
        step = stride // shards.phases
        frames = np.array([shards.phases * min(first + j * step, length - 1) for j in range(4)], dtype=np.int32)
        inputs = {
            "video": [np.frombuffer(video, dtype=np.uint8)],
            "frame_idx": [frames],
            "cuts": [np.frombuffer(cuts, dtype="<i4")],
        }

        def decoded(device: str, cut: bool) -> np.ndarray:
            pipe = graph.build_probe(shards.layout, stride, device, self.device_id, cut=cut)
            try:
                pipe.build()
                _, clip = pipe.run(**inputs)
                return np.array(clip.as_cpu()[0]).astype(np.int16)
            finally:
                del pipe

        reference = decoded("cpu", True)
        why = "?"
        for choice, cut in (("cut", True), ("whole", False)):
            try:
                frames_gpu = decoded("gpu", cut)
            except RuntimeError as e:
                why = _error_reason(e)
                continue
            if frames_gpu.shape == reference.shape and np.abs(frames_gpu - reference).mean() < 2.0:
                return choice, why
            why = f"its frames differ from the CPU decoder's (shape {frames_gpu.shape} vs {reference.shape})"
        return "cpu", why

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the next batch comes from. Batches already handed out count as consumed."""
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
        }

    def _restore(self, state: dict) -> tuple[int, int]:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state of format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for key, reason in state.get("blocked", {}).items():
            tar, _ = split_source(key)
            if tar in self.shards.tars:
                self._block(key, reason)
        epoch, position = int(state["epoch"]), int(state["position"])
        same = {k: state.get(k) for k in ("seed", "world_size", "batch_size", "mode")} == {
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "mode": self.cfg.mode,
        }
        if not same:
            log.warning(
                "pipeline: the saved loader state was made with other settings (seed, world size, batch "
                "size or mode); restarting epoch %d from its beginning",
                epoch,
            )
            return epoch, 0
        self._expected_samples = state.get("num_samples")
        return epoch, position

    def close(self) -> None:
        """Stop decoding and delete the patched index files. The loader cannot be iterated afterwards."""
        self._drop_pipeline()
        self.shards.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone
            self.shards.close()


def _select_samples(batch: dict, keep: np.ndarray, views: int) -> dict:
    """Keep the rows of the kept samples: a view when they are a prefix, an indexed copy otherwise (rare)."""
    count = int(keep.sum())
    prefix = bool(keep[:count].all())
    rows = torch.from_numpy(np.repeat(keep, views)).nonzero().flatten()
    out = {}
    for key, value in batch.items():
        if isinstance(value, list):
            out[key] = [v for v, k in zip(value, keep) if k]
        elif prefix:
            out[key] = value[: count * views]
        else:
            out[key] = value[rows.to(value.device)]
    return out


def _as_torch(tensor_list) -> torch.Tensor:
    return torch.from_dlpack(tensor_list.as_tensor())


def _error_reason(error: Exception) -> str:
    """The most specific line of a DALI error message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Assert on", "Error", "[/")) and "failed:" in line:
            return line.split("failed:", 1)[1].strip()[:200]
    for line in reversed(lines):
        if "pipeline object is no longer valid" not in line and not line.startswith("C++ context"):
            return line[:200]
    return "DALI error"


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
