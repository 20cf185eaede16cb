"""Our checkpoint format ("videomae-fast/1"): written atomically, last N kept, loadable with `weights_only=True`.

A checkpoint is one `torch.save`d dict. Its model part (`model_payload`) is what `model.load_pretrained` reads:

    format        "videomae-fast/1"
    kind          "pretrain" | "classify"
    model_config  VideoMAEConfig.to_dict()
    model         state_dict of the bare model (unwrapped from DDP and torch.compile)
    class_names   list[str] | None

Training adds the run's state to the same dict (step, optimizer, schedule, RNG and loader states: see
`training.checkpointing`). Every value is a tensor or a plain Python container, so `torch.load(...,
weights_only=True)` reads the whole file.

Files are `checkpoint-{step:08d}.pt` in the run directory. A save writes `*.pt.tmp-{pid}` first, then renames it
(`os.replace` is atomic on POSIX filesystems), so a crash never leaves a half-written file under a real name; the
temp file of a killed save is removed by the next save in that directory once its PID is gone. A save the disk
refuses (full, quota) is a one-line `CheckpointWriteError`, and the previous checkpoints stay as they were.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "videomae-fast/1"
_NAME = re.compile(r"^checkpoint-(\d{8,})\.pt$")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_payload(kind: str, model_config: Any, model: nn.Module, class_names: list[str] | None = None) -> dict:
    """The part of a checkpoint that `model.load_pretrained` reads: format, kind, config, bare weights, labels.
    `model_config` is a VideoMAEConfig; `model` may be wrapped (DDP, torch.compile). Training adds its state."""
    return {
        "format": FORMAT,
        "kind": kind,
        "model_config": model_config.to_dict(),
        "model": unwrap_model(model).state_dict(),
        "class_names": class_names,
    }


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest step first (temp files are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota, a file-size limit): its message is one line naming
    the file and the cause. Nothing under a checkpoint's real name was touched: the previous ones are intact."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] " prefix
        return str(self.strerror)


class _RecordingWriter:
    """The file torch.save writes through, remembering the OSError of a failed write (torch.save reports it as a
    RuntimeError without the cause: "unexpected pos 704 vs 598")."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_atomic(payload: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temp name in the same directory, flush to disk, then rename over `path`.
    CheckpointWriteError (one line) when the disk refuses it; the temp file goes."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(payload, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"{path}: cannot be written ({e.strerror or e})") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_TEMP = re.compile(r"^checkpoint-\d{8,}\.pt\.tmp-(\d+)$")


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the `checkpoint-*.pt.tmp-PID` files that a killed save left in `run_dir` (PID no longer running on
    this machine; a live process's file is kept). Returns the files removed."""
    removed = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = _TEMP.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_checkpoint(payload: dict, run_dir: str | os.PathLike, step: int, keep_last: int = 0) -> Path:
    """Write `checkpoint-{step}.pt` atomically, then delete all but the newest `keep_last` (0 keeps all)."""
    if payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint payload must have format={FORMAT!r}")
    remove_stale_temps(run_dir)  # left by a save that was killed (SIGKILL, a lost node)
    path = save_atomic(payload, Path(run_dir) / checkpoint_name(step))
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A run directory resolves to its latest checkpoint; any other path is returned as it is."""
    p = Path(path)
    if p.is_dir() and (latest := latest_checkpoint(p)) is not None:
        return latest
    return p


# how a caller says it trusts a file that the weights-only loader refuses (model.loading, predict, train.py)
TRUST_FLAG = "trust_pickle=True (--trust-pickle; train.py: model.trust_pickle=true)"


def torch_load_refusal(path: str | os.PathLike, exc: BaseException) -> str:
    """The one-line error for a file that torch.load(weights_only=True) did not read: an unpickling refusal names
    the opt-in (full unpickling can run code), anything else is an unreadable file."""
    if isinstance(exc, pickle.UnpicklingError):
        return (
            f"{path}: refused: it needs full unpickling, which can run code ({load_error_reason(exc)}); if you "
            f"trust this file, pass {TRUST_FLAG}"
        )
    return f"{path}: not a readable checkpoint ({load_error_reason(exc)})"


def load_error_reason(exc: BaseException) -> str:
    """Why torch.load failed, in one short line: torch's weights-only refusals run over many lines, of which the
    "WeightsUnpickler error" one says what was refused; an empty message (EOFError: a 0-byte file) says that."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    for i, line in enumerate(lines):
        if marker in line:
            detail = line.partition(marker)[2].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return f"{type(exc).__name__}: {detail.partition('. Please use')[0][:200]}"
    if not lines:
        return f"{type(exc).__name__}: empty or cut-off file"
    return f"{type(exc).__name__}: {lines[0].partition('. ')[0][:200]}"


def stored_num_classes(path: str | os.PathLike, trust_pickle: bool = False) -> int | None:
    """Class count of a classifier checkpoint without building a model: ours (model_config), a Hugging Face
    directory (config.json) or an official .pth (head.weight rows). None for pretraining checkpoints.

    Files are read as the loader reads them (`model.load_pretrained`): weights only. A file that this refuses is a
    ValueError of one line (`torch_load_refusal`), so that it fails before anything is built; with `trust_pickle`
    the check is left to the loader (None), since peeking is no reason to unpickle code."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            return None
        hf = json.loads(config.read_text())
        if not any("Classification" in a for a in hf.get("architectures") or []):
            return None
        return len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # as the loader: official files pickle args
            obj = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as e:
        if trust_pickle:
            return None
        raise ValueError(torch_load_refusal(path, e)) from e
    if not isinstance(obj, dict):
        return None
    if obj.get("format") == FORMAT:
        return int(obj["model_config"]["num_classes"]) if obj.get("kind") == "classify" else None
    state = obj.get("model", obj.get("module", obj))
    head = state.get("head.weight") if isinstance(state, dict) else None
    return int(head.shape[0]) if isinstance(head, torch.Tensor) else None


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", required: tuple[str, ...] = ()
) -> dict:
    """Read one of our checkpoints, fully, with weights_only=True; it must hold every key of `required` (e.g.
    training.checkpointing.RESUME_KEYS). Anything else (missing, empty, truncated, foreign, lacking keys) is a
    ValueError of one line naming the file and the problem (FileNotFoundError for a missing file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, foreign pickles
        raise ValueError(f"{path}: not a readable checkpoint ({load_error_reason(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: format {got!r}, expected {FORMAT!r}")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: incomplete checkpoint, no {', '.join(missing)}")
    return ckpt
