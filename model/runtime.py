"""Where a model runs and in which precision: one rule for training, evaluation and the apps.

    device = resolve_device("auto")                  # the GPU when torch sees one, else the CPU
    with autocast(device, "auto"):                   # bf16 on a GPU, float32 (no autocast) on the CPU
        logits = model(video)

Precisions: "auto" (bf16 on a GPU, float32 on the CPU), "bf16", "fp16" (as asked, on any device; training adds a
loss scaler for fp16) and "fp32" (no autocast).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "gpu")


def resolve_device(requested: str | None = "auto", index: int | None = None) -> torch.device:
    """ "auto" / None: the GPU when torch sees one, else the CPU; "gpu" (or "cuda"): the GPU, a ValueError of one line
    without one; "cpu". `index` picks the GPU (a process's LOCAL_RANK); torch's current device otherwise."""
    if requested not in (None, "cuda", *DEVICES):
        raise ValueError(f"device {requested!r}: expected 'cpu', 'gpu' or 'auto'")
    if requested in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} asked for, but torch sees no CUDA device")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def pipeline_device(device: torch.device) -> str:
    """The name `pipeline.build_loader` takes for where it decodes: "gpu" for a CUDA device, else "cpu"."""
    return "gpu" if device.type == "cuda" else "cpu"


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`; None: float32, no autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, precision: str = "auto", **kwargs) -> contextlib.AbstractContextManager:
    """`torch.autocast` for `precision` on `device` (disabled for float32); kwargs go to torch.autocast."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, **kwargs)
