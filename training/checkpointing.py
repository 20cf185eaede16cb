"""A run's state in our checkpoints, and where `--resume` finds it.

`model.checkpoint` writes and reads the files (format, kind, model config, weights, class names: what
`model.load_pretrained` reads); a training checkpoint adds the run state that `Trainer.state_dict()` collects:

    step, epoch   optimizer steps taken; loader epoch in progress
    optimizer     optimizer.state_dict()
    scheduler     CosineSchedule.state_dict()
    scaler        GradScaler.state_dict() (fp16 only) | None
    model_ema     EMA weights (fine-tuning with EMA) | None
    rng           [per rank] {"torch", "cuda", "numpy", "python"} (+ "mixup": its generator's state)
    loader        [per rank] loader.state_dict()
    progress      samples trained on, videos per step, the shape, the epoch's consumed-id bitmap (training.progress)
    train_config  the resolved training configuration (plain dict)

Every value is a tensor or a plain Python container of str/int/float/bool/None, so `torch.load(...,
weights_only=True)` reads it (numpy's RNG state is stored as a tensor for that reason).

A file can be damaged after it was written (a full disk elsewhere, a bad copy): `newest_intact_checkpoint` skips such
files, and `set_aside` renames them out of the `checkpoint-*.pt` namespace so that keep-last-N never keeps a damaged
file in place of a good one.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import list_checkpoints, load_checkpoint
from training.config import ConfigError, model_kind_for
from training.distributed import Dist, broadcast_object

log = logging.getLogger("training")

# what `train.py --resume` reads; a checkpoint without any of these cannot continue a run
RESUME_KEYS = ("kind", "model_config", "model", "step", "optimizer", "scheduler", "rng", "loader")
DAMAGED_SUFFIX = ".damaged"


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, every CUDA device, numpy global, python `random`)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _to_lists(random.getstate()),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def newest_intact_checkpoint(
    run_dir: str | os.PathLike, required: tuple[str, ...] = RESUME_KEYS, map_location: str | torch.device = "cpu"
) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The newest checkpoint of `run_dir` that loads fully (`load_checkpoint` with `required`).

    Returns (path, checkpoint, skipped): path and checkpoint are None when none loads; `skipped` holds (file, one-line
    reason) for each newer file that did not load. Files are tried newest first until one loads, so a damaged newest
    checkpoint costs the steps since the previous one, not the run."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location, required), skipped
        except (OSError, ValueError) as e:  # OSError: gone meanwhile (another rank set it aside), an I/O error
            skipped.append((path, (str(e).splitlines() or [f"{path}: {type(e).__name__}"])[0]))
    return None, None, skipped


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged checkpoint to `*.pt.damaged`: kept for inspection, but no longer a `checkpoint-*.pt`, so that
    neither resuming nor keep-last-N counts it."""
    path = Path(path)
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    os.replace(path, target)
    return target


def load_resume(resume: str | None, out_dir: Path, mode: str, dist: Dist) -> dict | None:
    """The checkpoint `--resume` names (auto: the newest intact one in `out_dir`), read fully before anything is
    written, so that a damaged file fails here and not mid-run; None for a fresh start. Rank 0 alone finds and reads
    it and sends it to every rank (`broadcast_object`), so ranks whose `out_dir` is node-local (or not yet in sync)
    resume from the same file. A checkpoint of another kind (pretrain <-> finetune), or one that does not load, is a
    ConfigError on every rank. Any world size and batch size may resume it (training.progress)."""
    if dist.world_size == 1:
        return _load_resume(resume, out_dir, mode, dist)
    outcome: tuple[str, Any] = ("ok", None)
    if dist.is_main:
        try:
            outcome = ("ok", _load_resume(resume, out_dir, mode, dist))
        except ConfigError as e:
            outcome = ("error", str(e))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise ConfigError(outcome[1])
    return outcome[1]


def _load_resume(resume: str | None, out_dir: Path, mode: str, dist: Dist) -> dict | None:
    ckpt = None
    if resume == "auto":
        path, ckpt, skipped = newest_intact_checkpoint(out_dir, RESUME_KEYS)
        if ckpt is None and skipped:  # a fresh start would overwrite the run's history: a person should look
            raise ConfigError(
                f"--resume auto: none of the {len(skipped)} checkpoints in {out_dir} loads (newest: "
                f"{skipped[0][1]}); move them away to start afresh"
            )
        for bad, why in skipped:
            if dist.is_main:  # set aside (renamed, kept): keep-last-N must not keep it in place of good ones to come
                log.warning("--resume auto: skipped %s; renamed to %s", why, set_aside(bad).name)
        if path is None:
            log.info("--resume auto: no checkpoint in %s yet, starting from scratch", out_dir)
    elif resume:
        path = Path(resume)
        try:
            ckpt = load_checkpoint(path, required=RESUME_KEYS)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e).splitlines()[0]) from e
    if ckpt is not None:
        if ckpt["kind"] != model_kind_for(mode):
            hint = (
                f"; to fine-tune from its weights: model.pretrained={path}, no --resume" if mode == "finetune" else ""
            )
            raise ConfigError(f"{path}: a {ckpt['kind']} checkpoint cannot resume {mode}{hint}")
        log.info("resuming from %s at step %s (written by %d ranks)", path, ckpt["step"], len(ckpt["rng"]))
    return ckpt
