"""What the trainer may rely on in any loader: the `Loader` protocol and `LoaderStats`, the counters a loader keeps.

Two loaders satisfy it: `pipeline.loader.VideoLoader` (DALI, over shards) and `pipeline.synthetic.SyntheticLoader`
(in memory). Both hand out the same batch layout (see `pipeline.build_loader`), one epoch per `iter()`, and count a
batch as consumed when it is handed out, so `state_dict()` taken after a step resumes after it.

This module imports nothing heavy (no DALI), so that `training` can name the protocol for free.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class LoaderStats:
    batches: int = 0  # batches handed out since construction
    samples: int = 0  # samples (not views) in them
    corrupt_samples: int = 0  # distinct samples skipped because DALI could not decode them (substituted in training)
    corrupt: list[str] = field(default_factory=list)  # "tar:member: reason", one per corrupt sample
    incomplete_samples: int = 0  # samples left out of every epoch: a member the graph reads is missing
    rebuilds: int = 0  # pipelines rebuilt to recover from a failure
    fast_forwarded: int = 0  # batches replayed without decoding (resume, recovery)


@runtime_checkable
class Loader(Protocol):
    """A resumable source of training or eval batches on this rank."""

    stats: LoaderStats  # stats.corrupt_samples: samples skipped so far on this rank (0 where nothing is decoded)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (it moves on as the epoch's last batch is handed out)."""
        ...

    @property
    def position(self) -> int:
        """Batches of `epoch` handed out so far."""
        ...

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        ...

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch (all of it, unless resumed or interrupted); then `epoch` moves on."""
        ...

    def state_dict(self) -> dict:
        """Where the next batch comes from: a JSON-able dict that the loader's `state=` argument resumes from."""
        ...

    def close(self) -> None:
        """Free what the loader holds (pipelines, threads, files); it is not iterated afterwards."""
        ...
