"""IVF, the container of the VP9 members DALI cuts at a keyframe inside its graph.

Why IVF: DALI 2.4's `fn.decoders.video` never seeks; it decodes from the first byte it is handed. An IVF file is a
32-byte header followed by frames, each a 12-byte header (size, pts) and the frame's bytes, with no index and no
state between frames other than the codec's own. So the header followed by the bytes from any keyframe on is again
a valid IVF stream that starts at that keyframe, and the graph can build it with `fn.slice` and `fn.cat` from byte
offsets recorded at build time (`shards.format.pack_cuts`). MP4 and WebM cannot be cut that way: their sample
tables (MP4) or cluster/cue structure (WebM) would have to be rewritten. IVF carries VP8/VP9/AV1 only, so H.264
stays in MP4 (for NVDEC); DALI reads IVF through libavformat on both backends (the demuxer needs no parameters).

Frame counts: the header's frame count is what DALI reports as the stream's length (`nb_frames`); a cut stream
keeps the whole member's header, so DALI believes it longer than it is. The pipeline only ever asks for frames
inside the cut, so the surplus is never read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shards.mp4info import VideoInfo

HEADER_SIZE = 32
FRAME_HEADER_SIZE = 12
_HEADER = struct.Struct("<4sHH4sHHIII")  # signature, version, header size, fourcc, w, h, rate, scale, frames
_FRAME = struct.Struct("<IQ")  # frame size, pts
FOURCC_CODECS = {b"VP90": "vp9", b"VP80": "vp8", b"AV01": "av1"}


@dataclass(frozen=True)
class IvfFrame:
    offset: int  # byte offset of the frame's 12-byte header in the file
    size: int  # bytes of frame data after that header
    pts: int
    keyframe: bool


@dataclass(frozen=True)
class IvfStream:
    codec: str  # "vp9", "vp8"
    width: int
    height: int
    rate: int  # frames per second = rate / scale; pts count 1/rate * scale seconds
    scale: int
    header_frames: int  # the frame count the header states
    frames: tuple[IvfFrame, ...]
    size: int  # bytes of the whole file

    @property
    def keyframes(self) -> list[int]:
        return [i for i, f in enumerate(self.frames) if f.keyframe]

    def info(self) -> VideoInfo:
        """The facts a shard records (frames, size, duration in 1/rate units)."""
        n = len(self.frames)
        ticks = 0
        if n:
            step = self.frames[1].pts - self.frames[0].pts if n > 1 else 1
            ticks = (self.frames[-1].pts - self.frames[0].pts + step) * self.scale
        return VideoInfo(self.codec, self.width, self.height, n, self.rate, ticks, len(self.keyframes))


def vp9_is_keyframe(frame: bytes) -> bool:
    """Whether a VP9 frame (or superframe: its first frame decides) is a key frame, from the first bits of its
    uncompressed header: frame_marker (2), profile (2, plus a reserved bit in profile 3), show_existing_frame,
    frame_type (0 = KEY_FRAME). Raises ValueError when the frame marker is wrong."""
    if not frame:
        raise ValueError("empty frame")
    bits = frame[0]
    if bits >> 6 != 0b10:
        raise ValueError(f"not a VP9 frame (frame marker {bits >> 6:02b})")
    profile = ((bits >> 5) & 1) | (((bits >> 4) & 1) << 1)
    position = 3 if profile < 3 else 2  # bit index (from the least significant) of show_existing_frame
    if (bits >> position) & 1:
        return False  # shows an earlier frame again: no data, never a key frame
    return (bits >> (position - 1)) & 1 == 0


def vp8_is_keyframe(frame: bytes) -> bool:
    """VP8's frame tag: bit 0 of the first byte is 0 for a key frame."""
    if len(frame) < 3:
        raise ValueError("truncated VP8 frame")
    return frame[0] & 1 == 0


_KEYFRAME_TESTS = {"vp9": vp9_is_keyframe, "vp8": vp8_is_keyframe}


def read_ivf(data: bytes) -> IvfStream:
    """Parse an IVF file held in memory: header and every frame's offset, size, pts and key-frame flag.
    Raises ValueError naming the problem (not IVF, truncated frame, unknown codec)."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"{len(data)} bytes: shorter than an IVF header")
    signature, _, header_size, fourcc, width, height, rate, scale, count = _HEADER.unpack_from(data)
    if signature != b"DKIF":
        raise ValueError("not an IVF file (no DKIF signature)")
    if header_size != HEADER_SIZE:
        raise ValueError(f"IVF header of {header_size} bytes, expected {HEADER_SIZE}")
    codec = FOURCC_CODECS.get(fourcc)
    if codec not in _KEYFRAME_TESTS:
        raise ValueError(f"IVF codec {fourcc!r} is not VP8 or VP9")
    is_key = _KEYFRAME_TESTS[codec]
    frames = []
    position = HEADER_SIZE
    while position < len(data):
        if position + FRAME_HEADER_SIZE > len(data):
            raise ValueError(f"truncated frame header at byte {position}")
        size, pts = _FRAME.unpack_from(data, position)
        start = position + FRAME_HEADER_SIZE
        if start + size > len(data):
            raise ValueError(f"frame {len(frames)} at byte {position} runs past the end ({size} bytes)")
        frames.append(IvfFrame(position, size, pts, is_key(data[start : start + min(size, 16)])))
        position = start + size
    return IvfStream(codec, width, height, rate, scale, count, tuple(frames), len(data))


def cut(data: bytes, start: int, end: int | None = None) -> bytes:
    """The IVF stream of frames [start, end) of `data` (start a key frame): the header, then those frames' bytes.
    What the DALI graph builds from the cuts table, here for checks and tests."""
    stream = read_ivf(data)
    if not stream.frames[start].keyframe:
        raise ValueError(f"frame {start} is not a key frame")
    stop = stream.size if end is None or end >= len(stream.frames) else stream.frames[end].offset
    return data[:HEADER_SIZE] + data[stream.frames[start].offset : stop]
