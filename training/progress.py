"""A run's progress in samples, and resuming it on another shape (world size, per-rank batch, grad_accum).

Progress is counted in samples (videos trained on), not steps: the learning-rate schedule is a function of
`samples / schedule_batch` (`schedule_batch`: the videos per step the schedule was laid out for; for a run that was
never resumed on another shape that is its own, so the position is exactly the step). A checkpoint records

    progress  {"samples": videos trained on, "videos_per_step", "schedule_batch", "world_size", "batch_size",
               "epoch": the loader's epoch, "num_samples": samples per epoch (None: unknown),
               "consumed": bitmap (pipeline.selection) of the ids of `epoch` consumed on all ranks | None}

A resume whose videos per step differ keeps the checkpoint's schedule (base lr, warm-up and end, positions in
samples), lands at the same point of it, and remaps the step counter (one log line says how). A resume whose world
size or per-rank batch differs continues the saved epoch with the ids not yet consumed (`elastic_loader_state`), and
derives the RNG states of the new ranks from the seed, step and rank (one line says so).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline import selection
from training.checkpointing import restore_rng_state
from training.distributed import Dist
from training.schedule import CosineSchedule

if TYPE_CHECKING:
    from pipeline.mixup import VideoMixup

log = logging.getLogger("training")


@dataclasses.dataclass
class Resumed:
    """Where a resumed run stands in its own units."""

    step: int  # optimizer steps of this shape that `samples` make (rounded down)
    samples: int  # videos trained on so far
    schedule: CosineSchedule  # the schedule the run follows (in steps of `schedule_batch` videos)
    schedule_batch: int
    total_steps: int  # the end of training in steps of this shape


def saved_shape(ckpt: dict) -> tuple[int, int, int]:
    """(world size, per-rank batch, videos per step) of the run that wrote `ckpt`."""
    progress = ckpt.get("progress")
    if progress:
        return int(progress["world_size"]), int(progress["batch_size"]), int(progress["videos_per_step"])
    data, optim = ckpt["train_config"]["data"], ckpt["train_config"]["optim"]
    world = len(ckpt["rng"])
    return world, int(data["batch_size"]), int(data["batch_size"]) * int(optim["grad_accum"]) * world


def same_loader_shape(ckpt: dict, world_size: int, batch_size: int) -> bool:
    """Whether every rank's loader can continue from its own saved state (the bit-exact path)."""
    world, batch, _ = saved_shape(ckpt)
    return (world, batch) == (world_size, batch_size)


def resume_position(ckpt: dict, schedule: CosineSchedule, videos_per_step: int, total_steps: int) -> Resumed:
    """Where the resumed run of `videos_per_step` stands. Same videos per step (and a schedule laid out for them):
    the checkpoint's step, this run's `schedule` and `total_steps` (as before). Otherwise the checkpoint's schedule at
    the same sample count, the step counter remapped, the end of training kept in samples (logged in one line)."""
    progress = ckpt.get("progress") or {}
    step = int(ckpt["step"])
    _, _, saved_vps = saved_shape(ckpt)
    samples = int(progress.get("samples", step * saved_vps))
    schedule_batch = int(progress.get("schedule_batch", saved_vps))
    if saved_vps == videos_per_step and schedule_batch == videos_per_step:
        return Resumed(step, samples, schedule, videos_per_step, total_steps)
    saved = CosineSchedule(**ckpt["scheduler"])
    end = saved.total_steps * schedule_batch
    new_step = samples // videos_per_step
    new_total = new_step + max(0, -(-(end - samples) // videos_per_step))
    log.info(
        "resume on another shape: %d samples seen = step %d at %d videos/step, now %d videos/step: step %d; the "
        "schedule stays in samples (peak lr %.3g, warm-up to %d, end at %d samples = step %d)",
        samples,
        step,
        saved_vps,
        videos_per_step,
        new_step,
        saved.base,
        saved.warmup_steps * schedule_batch,
        end,
        new_total,
    )
    return Resumed(new_step, samples, saved, schedule_batch, new_total)


def progress_state(
    samples: int,
    videos_per_step: int,
    schedule_batch: int,
    world_size: int,
    batch_size: int,
    loader_states: list[dict],
) -> dict:
    """The checkpoint's `progress` entry: `consumed` merges the ranks' `consumed` bitmaps (each rank's stays in its
    loader state, for a resume of the same shape)."""
    consumed = selection.merge([s.get("consumed") for s in loader_states])
    first = loader_states[0]
    return {
        "samples": samples,
        "videos_per_step": videos_per_step,
        "schedule_batch": schedule_batch,
        "world_size": world_size,
        "batch_size": batch_size,
        "epoch": int(first.get("epoch", 0)),
        "num_samples": first.get("num_samples"),
        "consumed": consumed,
    }


def loader_state_for(ckpt: dict, rank: int, world_size: int, batch_size: int) -> dict:
    """The loader state this rank resumes from: its own saved one on the same shape (exact), else
    `elastic_loader_state`."""
    if same_loader_shape(ckpt, world_size, batch_size):
        return ckpt["loader"][rank]
    return elastic_loader_state(ckpt)


def resume_rng(ckpt: dict, dist: Dist, batch_size: int, seed: int, step: int, mixup: VideoMixup | None) -> None:
    """This rank's RNG states (torch, numpy, python, mixup's generator): the saved ones on the same shape, else
    derived from (seed, step, rank) with one line saying so."""
    if same_loader_shape(ckpt, dist.world_size, batch_size):
        restore_rng_state(ckpt["rng"][dist.rank])
        if mixup is not None:
            mixup.rng.bit_generator.state = ckpt["rng"][dist.rank]["mixup"]
        return
    generator = derive_rng(seed, step, dist.rank)
    if mixup is not None:
        mixup.rng = generator
    log.info(
        "resume on another shape: %d ranks x %d videos from a checkpoint of %d x %d; the epoch goes on with the "
        "samples not yet consumed; RNG states derived from (seed %d, step %d, rank)",
        dist.world_size,
        batch_size,
        *saved_shape(ckpt)[:2],
        seed,
        step,
    )


def elastic_loader_state(ckpt: dict) -> dict:
    """A loader state for a rank of another shape: the saved epoch, continued with the ids not consumed on any rank
    (`consumed_before`); without a bitmap (older checkpoints) the loader restarts the epoch with a warning."""
    progress = ckpt.get("progress") or {}
    saved = dict(ckpt["loader"][0])
    saved.pop("consumed", None)
    return {
        **saved,
        "elastic": True,
        "position": 0,
        "consumed_before": progress.get("consumed"),
        "epoch": int(progress.get("epoch", saved.get("epoch", 0))),
    }


def derive_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    """Seed this process's torch, numpy and python RNGs from (seed, step, rank) (a rank of another shape has no
    saved state); returns a numpy Generator from the same triple for components with their own (mixup)."""
    seq = np.random.SeedSequence([seed, step, rank])
    torch_seed, np_seed, py_seed = (int(x) for x in seq.generate_state(3))
    torch.manual_seed(torch_seed)
    np.random.seed(np_seed)
    random.seed(py_seed)
    return np.random.default_rng(seq.spawn(1)[0])
