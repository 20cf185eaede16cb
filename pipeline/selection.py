"""An epoch as a set of samples: which ids of an epoch were consumed, in a form that does not depend on the world size.

A training epoch consumes each sample id at most once (the samples of full batches handed out). A checkpoint stores
the ids consumed so far in the current epoch as a bitmap (`pack_ids`: one bit per sample, 30 kB for Kinetics-400's
240k videos, 40 kB as base64 text), merged over all ranks (`merge`). A run resumed on another shape continues that
epoch with the ids not yet consumed, in the epoch's own order (`remaining`), split over its ranks by the rules its
uninterrupted epochs use (`rank_share`): every rank the same number of full batches, the remainder dropped.

    bitmap   str: base64 of uint8[ceil(N / 8)], bit i (numpy.packbits order: big-endian within a byte) = id i consumed
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import numpy as np
import torch

Bitmap = str  # base64 of numpy.packbits(mask): JSON-able (loader states) and read by torch.load(weights_only=True)


def _bytes(bitmap: Bitmap) -> np.ndarray:
    return np.frombuffer(base64.b64decode(bitmap), dtype=np.uint8)


def _text(packed: np.ndarray) -> Bitmap:
    return base64.b64encode(np.ascontiguousarray(packed, dtype=np.uint8).tobytes()).decode("ascii")


def pack_ids(ids: Iterable[int] | np.ndarray | torch.Tensor, num_samples: int) -> Bitmap:
    """The bitmap of `ids` (>= 0), covering max(num_samples, max id + 1) ids (a shard subset may hold ids past its
    own sample count)."""
    ids = np.asarray(torch.as_tensor(ids).cpu() if isinstance(ids, torch.Tensor) else list(ids), dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"sample ids must be >= 0, got {ids.min()}")
    mask = np.zeros(max(num_samples, int(ids.max()) + 1 if ids.size else 0), dtype=bool)
    mask[ids] = True
    return _text(np.packbits(mask))


def unpack(bitmap: Bitmap | None, num_samples: int) -> np.ndarray:
    """bool[max(num_samples, 8 * bytes)]: which ids the bitmap marks (None: none)."""
    if bitmap is None:
        return np.zeros(num_samples, dtype=bool)
    mask = np.unpackbits(_bytes(bitmap)).astype(bool)
    return np.pad(mask, (0, max(0, num_samples - mask.size)))


def merge(bitmaps: Iterable[Bitmap | None]) -> Bitmap | None:
    """The union of bitmaps (the shorter ones padded with zeros); None if all are None."""
    parts = [_bytes(b) for b in bitmaps if b is not None]
    if not parts:
        return None
    out = np.zeros(max(p.size for p in parts), dtype=np.uint8)
    for p in parts:
        out[: p.size] |= p
    return _text(out)


def count(bitmap: Bitmap | None) -> int:
    """Ids marked in a bitmap."""
    return 0 if bitmap is None else int(np.unpackbits(_bytes(bitmap)).sum())


def remaining(order: np.ndarray | torch.Tensor, consumed: np.ndarray) -> np.ndarray:
    """The ids of the epoch's `order` (int[N], a permutation of sample ids) not marked in `consumed` (bool[N]), in
    that order."""
    order = np.asarray(order, dtype=np.int64)
    return order[~consumed[order]]


def rank_share(ids: np.ndarray, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """This rank's ids of an epoch (or the rest of one) of `ids`: interleaved (ids[rank::world_size]) and cut to the
    full batches that every rank has (len(ids) // world_size // batch_size of them), so that all ranks step alike;
    the remainder is dropped, as in every training epoch."""
    per_rank = len(ids) // world_size // batch_size * batch_size
    return np.asarray(ids)[rank::world_size][:per_rank]
