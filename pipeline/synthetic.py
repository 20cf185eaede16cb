"""An in-memory stand-in for `pipeline.build_loader`: the same batch layout, length, epoch and resume semantics.

Two uses:
- tests and demos of the trainer that should not depend on video decoding;
- the in-memory side of the GPU-saturation benchmark (`in_memory=True`: one batch made once on the training device
  and handed out again and again, so a training step never waits for data).

`nan_batches` injects faults for tests: the batches handed out at those positions (counted from 0) hold NaN
videos. `stats.corrupt_samples` stays 0 (nothing is decoded). A `pipeline.protocol.Loader`, like the DALI loader.

Content: each class has a fixed random template video; a sample is its class template plus fresh Gaussian noise, so
a classifier can learn it and pretraining has structure to reconstruct. Everything is a pure function of
(seed, epoch, sample_id, repeat), so a resumed loader yields exactly the batches an uninterrupted one would.

Batches (dicts of tensors on `device`), with B = batch_size samples and K = num_repeats (train) or
V = num_clips * num_crops (eval) views per sample, views of one sample in consecutive rows:
    video:     float32[B*K, C, T, H, W]  (zero-mean, unit-scale, like normalized frames)
    mask:      bool[B*K, N]              pretrain only; N = T/tubelet * (H/patch) * (W/patch), (t, h, w) order,
                                         True = masked; a tube mask (one spatial pattern for all time slots)
    label:     int64[B*K]
    sample_id: int64[B*K]
    clip, crop: int64[B*V]               eval only
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from pipeline import selection
from pipeline.config import MASK_TYPES, MODES
from pipeline.protocol import LoaderStats

log = logging.getLogger(__name__)


class SyntheticLoader:
    def __init__(
        self,
        mode: str,
        batch_size: int,
        *,
        num_samples: int = 256,
        num_classes: int = 4,
        num_frames: int = 16,
        input_size: int = 224,
        num_repeats: int = 1,
        mask_ratio: float = 0.9,
        mask_type: str = "tube",
        patch_size: int = 16,
        tubelet_size: int = 2,
        num_clips: int = 5,
        num_crops: int = 3,
        channels: int = 3,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        state: dict | None = None,
        in_memory: bool = False,
        nan_batches: tuple[int, ...] = (),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_frames % tubelet_size or input_size % patch_size:
            raise ValueError(
                f"num_frames={num_frames} / input_size={input_size} must be multiples of "
                f"tubelet_size={tubelet_size} / patch_size={patch_size}"
            )
        self.mode, self.batch_size = mode, batch_size
        self.num_samples, self.num_classes = num_samples, num_classes
        self.shape = (channels, num_frames, input_size, input_size)
        self.views = num_clips * num_crops if mode == "eval" else num_repeats
        self.num_clips, self.num_crops = num_clips, num_crops
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        self.mask_ratio, self.mask_type = mask_ratio, mask_type
        self.grid = (num_frames // tubelet_size, input_size // patch_size, input_size // patch_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if str(device) in ("gpu", "cuda")
            else torch.device(device)
        )
        self.in_memory = in_memory
        self.nan_batches = set(nan_batches)  # fault injection: these batches (counted from 0) hold NaN videos
        self.epoch, self.position = 0, 0
        # an elastic resume: the ids of epoch `_resumed_epoch` consumed before it (pipeline.selection bitmap)
        self._resumed_epoch, self._consumed_before = -1, None
        self.stats = LoaderStats()  # corrupt_samples stays 0: nothing is decoded
        if state is not None:
            self.load_state_dict(state)
        # The class templates are fixed for a seed; they do not depend on rank, epoch or resume.
        g = torch.Generator().manual_seed(seed * 1000003 + 17)
        self.templates = torch.randn((num_classes, *self.shape), generator=g)
        self._cached: dict[str, torch.Tensor] | None = None

    # -- the loader interface ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per (whole) epoch on this rank (train: full batches only, the same on every rank; eval: every
        sample, last batch may be short)."""
        if self.mode == "eval":
            return -(-len(self._rank_ids(0)) // self.batch_size)
        return self.num_samples // self.world_size // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ids = self._rank_ids(self.epoch)
        batches = -(-len(ids) // self.batch_size) if self.mode == "eval" else len(ids) // self.batch_size
        for b in range(self.position, batches):
            batch_ids = ids[b * self.batch_size : (b + 1) * self.batch_size]
            batch = self._cached_batch(batch_ids) if self.in_memory else self._make_batch(batch_ids)
            # Counted when handed out, so state_dict() taken after a step resumes after it; the epoch moves on with
            # its last batch (as pipeline.build_loader does), so `epoch` already names the next batch's epoch.
            self.position = b + 1
            if self.position == batches:
                self.epoch, self.position = self.epoch + 1, 0
            if self.stats.batches in self.nan_batches:
                batch = {**batch, "video": torch.full_like(batch["video"], float("nan"))}
            self.stats.batches += 1
            self.stats.samples += len(batch_ids)
            yield batch
        if len(self) == 0:
            self.epoch += 1

    def state_dict(self) -> dict:
        """Where the next batch comes from; `consumed`: the bitmap (pipeline.selection) of the ids of the current
        epoch consumed so far on this rank, those consumed before an elastic resume included."""
        before = self._consumed_before if self.epoch == self._resumed_epoch else None
        if self.mode == "eval":
            mine = None
        else:
            mine = selection.pack_ids(self._rank_ids(self.epoch)[: self.position * self.batch_size], self.num_samples)
        return {
            "kind": "synthetic",
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "consumed_before": before,
            "consumed": selection.merge([before, mine]),
        }

    def close(self) -> None:
        """Drop the cached batch; there is nothing else to free."""
        self._cached = None

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: a state_dict() of this shape (exactly where it stopped), or an elastic state
        (training.progress: {"elastic": True, "epoch", "num_samples", "consumed_before": the merged bitmap of every
        rank}) whose epoch goes on with the ids not yet consumed. A dataset of another size restarts the epoch."""
        if state.get("kind") != "synthetic":
            raise ValueError(f"loader state of kind {state.get('kind')!r} cannot resume a synthetic loader")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        same_shape = (state["world_size"], state.get("batch_size", self.batch_size)) == (
            self.world_size,
            self.batch_size,
        )
        if not (same_shape or state.get("elastic")):
            raise ValueError(f"loader state was saved with world_size={state['world_size']}, now {self.world_size}")
        before = state.get("consumed_before")
        if state.get("num_samples", self.num_samples) != self.num_samples:
            log.warning(
                "synthetic: the checkpoint's epoch %d had %d samples, now %d; restarting it from its beginning",
                self.epoch,
                state["num_samples"],
                self.num_samples,
            )
            self.position, before = 0, None
        if before is not None:
            self._resumed_epoch, self._consumed_before = self.epoch, before

    # -- content -------------------------------------------------------------------------------------------------
    def labels_of(self, sample_ids: torch.Tensor) -> torch.Tensor:
        return (sample_ids * 7 + self.seed) % self.num_classes

    def _rank_ids(self, epoch: int) -> torch.Tensor:
        """This rank's ids of `epoch` in the order it trains on them: eval, every id once (ranks interleaved);
        training, the epoch's seeded permutation (less the ids consumed before an elastic resume) split by
        `selection.rank_share` (the same number of full batches on every rank)."""
        if self.mode == "eval":
            return torch.arange(self.num_samples)[self.rank :: self.world_size]
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + 7919 * epoch))
        ids = order.numpy()
        if epoch == self._resumed_epoch:
            ids = selection.remaining(ids, selection.unpack(self._consumed_before, self.num_samples))
        return torch.from_numpy(selection.rank_share(ids, self.rank, self.world_size, self.batch_size).copy())

    def _make_batch(self, sample_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = sample_ids.repeat_interleave(self.views)
        view = torch.arange(self.views).repeat(len(sample_ids))
        labels = self.labels_of(ids)
        videos = torch.empty((len(ids), *self.shape))
        for row, (sid, v) in enumerate(zip(ids.tolist(), view.tolist())):
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, sid, v))
            videos[row] = self.templates[labels[row]] + torch.randn(self.shape, generator=g)
        batch = {"video": videos, "label": labels, "sample_id": ids}
        if self.mode == "pretrain":
            batch["mask"] = self._masks(ids, view)
        if self.mode == "eval":
            batch["clip"], batch["crop"] = view // self.num_crops, view % self.num_crops
        return {k: t.to(self.device, non_blocking=True) for k, t in batch.items()}

    def _masks(self, ids: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """bool[rows, N]: tube masks (one spatial pattern repeated over the T' slots) or random masks (int(ratio * N)
        of all N tokens), with the official generators' counts."""
        t, h, w = self.grid
        tokens = h * w if self.mask_type == "tube" else t * h * w
        num_masked = int(self.mask_ratio * tokens)
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, *ids.tolist(), *view.tolist(), 1))
        scores = torch.rand((len(ids), tokens), generator=g)
        masked = scores.argsort(dim=1).argsort(dim=1) < num_masked  # exactly num_masked True per row
        return masked.repeat(1, t) if self.mask_type == "tube" else masked

    def _cached_batch(self, sample_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._cached is None or len(self._cached["sample_id"]) != len(sample_ids) * self.views:
            self._cached = self._make_batch(sample_ids)
        return self._cached


def _mix(*values: int) -> int:
    """A seed from integers, identical in every process (unlike `hash` of anything holding a str)."""
    s = 0x9E3779B97F4A7C15
    for v in values:
        s = ((s ^ (v & 0xFFFF_FFFF_FFFF_FFFF)) * 0x100000001B3) & 0xFFFF_FFFF_FFFF_FFFF
    return s >> 1
