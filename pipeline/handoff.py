"""Handing DALI's outputs to torch without copies: DLPack views, the batch dict the loader yields, and the lifetime of
GPU buffers.

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
completed (`GpuKeepAlive`; polled with `Event.query()`, never waited on). Consumers that use a batch on another
stream, or keep it after asking for the next one, must synchronize themselves. The only copies left are inside the
graph: stacking the K uint8 views (1/4 of the output size) and DALI's own operator outputs; and, with several
pipelines, gathering their decoded rows (`pipeline.plan.merge_outputs`).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import torch

from pipeline.config import PipelineConfig


def as_torch(tensor_list) -> torch.Tensor:
    """A DALI TensorList (uniform shape) as one torch tensor on the same memory."""
    return torch.from_dlpack(tensor_list.as_tensor())


class GpuKeepAlive:
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


def eval_view_ids(cfg: PipelineConfig, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip, crop): int64[B*V] each, view v of a sample being clip v // crops, crop v % crops."""
    clip = torch.arange(cfg.eval_clips).repeat_interleave(cfg.eval_crops).repeat(batch_size)
    crop = torch.arange(cfg.eval_crops).repeat(cfg.eval_clips).repeat(batch_size)
    return clip.to(device), crop.to(device)


def to_batch(out: dict[str, Any], cfg: PipelineConfig, batch_size: int, view_ids: tuple | None) -> dict[str, Any]:
    """The batch the loader yields, from one iteration's outputs by name (torch tensors; "source" a TensorList):
    [B, K, ...] outputs flattened to [B*K, ...] (views, no copy); `view_ids`: eval's (clip, crop) constants. With
    `debug_outputs`, also frame_idx int64[B*K, T], box int32[B*K, 5], frames uint8[B*K, T, S, S, C] and the B
    sources ("tar:offset:member")."""
    b, views = batch_size, cfg.views_per_sample
    batch: dict[str, Any] = {"video": out["video"].flatten(0, 1), "sample_id": out["sample_id"].reshape(-1)}
    if "label" in out:
        batch["label"] = out["label"].reshape(-1)
    if "mask" in out:
        batch["mask"] = out["mask"].flatten(0, 1)
    if cfg.mode == "eval":
        batch["clip"], batch["crop"] = view_ids
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
    return batch


def select_samples(batch: dict, keep: np.ndarray, views: int) -> dict:
    """Keep the rows of the kept samples (`keep`: bool[B]): a view when they are a prefix, an indexed copy
    otherwise (rare)."""
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
