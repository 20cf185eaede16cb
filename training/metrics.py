"""What a run reports: rank 0's metrics log (console, `metrics.jsonl`, TensorBoard), the host-side counters of one
logging window, and the device peaks that MFU divides by."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.protocol import Loader

log = logging.getLogger("training")

# Dense bf16 tensor-core peaks from the vendors' data sheets, FLOP/s per device, for MFU (run.peak_tflops overrides).
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_flops(peak_tflops: float | None, device: torch.device) -> float | None:
    """FLOP/s of one device for MFU: `peak_tflops` if given, else the data-sheet figure of a known GPU, else None."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def skipped_samples(loader: Loader) -> int:
    """Corrupt samples the loader has skipped so far on this rank."""
    return loader.stats.corrupt_samples


@dataclass
class Window:
    """Host-side counters of one logging window: optimizer steps whose loss counts, seconds blocked on the loader,
    clips handed out, and when the window started."""

    loss_steps: int = 0
    wait: float = 0.0
    clips: int = 0
    t0: float = field(default_factory=time.perf_counter)


class MetricsLog:
    """Rank 0's metrics: a console line (logged at INFO), a JSON line in `metrics.jsonl` and TensorBoard scalars per
    record."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.file = open(out_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))

    def log(self, step: int, record: dict) -> None:
        if self.file is None:
            return
        record = {"step": step, **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if self.tb is not None and k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, step)
        log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    def close(self) -> None:
        for handle in (self.file, self.tb):
            if handle is not None:
                handle.close()
