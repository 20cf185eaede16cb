"""One process per GPU (or CPU worker) under torchrun: env:// rendezvous, this process's device, and collectives that
are no-ops in a single process. (Console lines are logging's: `shards.logs.configure_logging` in train.py shows rank
0's INFO lines and every rank's warnings.)"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from model.runtime import resolve_device


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    """env:// rendezvous from torchrun's variables (NCCL on GPUs, gloo on CPUs); the GPU of LOCAL_RANK if torch sees
    one, else the CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device("auto", index=int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left outside bf16 autocast
        torch.backends.cudnn.benchmark = True  # fixed clip shapes: pick the fastest Conv3d (tubelet embedding)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world,
            device_id=device if device.type == "cuda" else None,
        )
    return Dist(rank, world, device)


def teardown() -> None:
    """Destroy the process group once nothing holds it. DistributedDataParallel keeps a reference to the group, and a
    trainer left in a reference cycle keeps DDP: collect it first, or gloo's worker threads outlive
    `destroy_process_group` and now and then abort the process as the interpreter shuts down ("terminate called
    without an active exception", exit -6 after a run that finished), which leaves the other torchrun agents waiting
    at their exit barrier."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across ranks (sum, max or min); returns `tensor`."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(
            tensor,
            op={"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}[op],
        )
    return tensor


def gather(obj: Any) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not torch_dist.is_initialized():
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (picklable: a checkpoint's tensors travel on the CPU) on every rank; `obj` elsewhere is
    ignored."""
    if not torch_dist.is_initialized():
        return obj
    box = [obj if torch_dist.get_rank() == src else None]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]
