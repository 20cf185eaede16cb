"""A corrupt IVF member fails its batch instead of decoding to black frames.

Random bytes over an IVF member's frame headers do not always make the decoder fail: libavformat reads whatever sizes
the damaged headers state, libvpx drops what it cannot parse, and DALI's decoder hands out all-zero frames without an
error, so a silent black clip would reach the model. Pixels cannot tell (a genuinely black video is valid), the
container can: the sample's cuts table (`KEY.cuts`, written by the builder from the intact member, see
`shards.format.pack_cuts`) gives the offset of every frame header, so every header of the member a clip decodes must
state the size offset[i + 1] - offset[i] - 12, the member must be as long as the table's end row says, and it must
start with the IVF signature.

The check is a few CPU operators on the encoded bytes before the decoder (a gather of 4 bytes per frame, reductions):
no per-sample Python, and nothing that waits on the GPU on the GPU path. A member that fails gets the start of its
IVF header sliced out of bounds, which raises; the loader's recovery (`pipeline.recovery`: its probe decodes the
clip through the same check) then names the sample, skips it and counts it like any corrupt one.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types

from shards import format as fmt

IVF_HEADER = 32  # bytes of an IVF file header (shards.ivf)
FRAME_HEADER = 12  # bytes of an IVF frame header: uint32 size, uint64 pts (shards.ivf)
REASON = "IVF frame headers disagree with the sample's cuts table"  # the skip reason logged (pipeline.recovery)
_SIGNATURE = np.frombuffer(b"DKIF", dtype=np.uint8)  # an IVF file starts with it


def _all(condition):
    """int32 1 when every element of the boolean `condition` holds, else 0."""
    return fn.reductions.min(fn.cast(condition, dtype=types.INT32))


def member_is_consistent(member, rows, phase):
    """int32 (0 or 1) per sample: whether IVF `member` (uint8[bytes]) is the member `phase` that the cuts table
    `rows` (int32[R, 4]: member, frame, offset, kind) describes: its signature, its length, and the size stated by
    each of its frame headers."""
    member_no, offset, kind = rows[:, 0], rows[:, 2], rows[:, 3]
    mine = member_no == phase
    # a frame row of this member is always followed by its next frame's row or the member's end row
    frame_row = fn.cast(mine[:-1] & (kind[:-1] != fmt.CUT_END), dtype=types.INT64)
    at = frame_row * fn.cast(offset[:-1], dtype=types.INT64)  # rows of other members read bytes 0..3: masked out
    expected = frame_row * fn.cast(offset[1:] - offset[:-1] - FRAME_HEADER, dtype=types.INT64)
    positions = fn.cast(fn.reshape(fn.stack(at, at + 1, at + 2, at + 3, axis=1), shape=[-1]), dtype=types.INT32)
    raw = fn.sequence_rearrange(fn.reshape(member, shape=[-1, 1], layout="FC"), new_order=positions)
    b = fn.cast(fn.reshape(raw, shape=[-1, 4]), dtype=types.INT64)
    stated = b[:, 0] + b[:, 1] * 256 + b[:, 2] * 65536 + b[:, 3] * 16777216  # little-endian uint32
    end = fn.reductions.max(fn.cast(mine & (kind == fmt.CUT_END), dtype=types.INT64) * offset)
    length = fn.cast(member.shape()[0], dtype=types.INT64)
    return (
        _all(frame_row * stated == expected)
        * _all(member[0:4] == types.Constant(_SIGNATURE))
        * fn.cast(length == end, dtype=types.INT32)
    )


def checked_header(member, rows, phase):
    """uint8[32]: the IVF header of `member`, raising (an out-of-bounds slice) when the member disagrees with its cuts
    table (`member_is_consistent`), so that the sample is found and skipped before a decoder sees it."""
    bad = 1 - member_is_consistent(member, rows, phase)
    start = bad * (fn.cast(member.shape()[0], dtype=types.INT32) + 1)
    return fn.slice(
        member, fn.stack(start), types.Constant(np.int32([IVF_HEADER])), axes=[0], out_of_bounds_policy="error"
    )  # IVF frame headers disagree with the sample's cuts table


def checked_member(member, rows, phase):
    """The whole IVF `member`, raising as `checked_header` does (for a decoder handed whole members)."""
    return fn.cat(checked_header(member, rows, phase), member[IVF_HEADER:])
