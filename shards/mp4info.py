"""Read the facts a shard needs (frame count, size, frame rate, keyframes) from an MP4 file's boxes.

No ffprobe ships with imageio-ffmpeg, and parsing the container is both cheaper and more exact than asking a
decoder: every sample of the video track's `stsz` table is one packet, and for the streams the builder writes
(constant frame rate, one shown frame per packet; VP9 hidden frames travel inside superframes) one packet is one
frame for every decoder, DALI's included. `shards.verify` checks this claim by decoding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


@dataclass(frozen=True)
class VideoInfo:
    codec: str  # MP4: the sample entry fourcc ("vp09", "avc1", "mp4v" for MJPEG, ...); IVF: "vp9"
    width: int
    height: int
    num_frames: int
    timescale: int
    duration_ticks: int  # sum of the sample (frame) durations in 1/timescale s (the track's media time)
    num_keyframes: int  # entries of `stss`; every frame when the table is absent

    @property
    def duration(self) -> float:
        return self.duration_ticks / self.timescale if self.timescale else 0.0

    @property
    def fps(self) -> float:
        return self.num_frames / self.duration if self.duration > 0 else 0.0


def _boxes(data: bytes, start: int, end: int):
    """Yield (type, payload start, payload end) of the boxes laid out in data[start:end]."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                raise ValueError("truncated 64-bit box header")
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"box {kind!r} at {pos} runs past its parent ({size} bytes)")
        yield kind, pos + header, pos + size
        pos += size


def _find_tracks(data: bytes) -> list[dict[bytes, tuple[int, int]]]:
    """For each `trak`, a map of the box types found under it (first occurrence) to their payload ranges."""
    tracks: list[dict[bytes, tuple[int, int]]] = []

    def walk(start: int, end: int, into: dict | None) -> None:
        for kind, s, e in _boxes(data, start, end):
            if kind == b"trak":
                tracks.append({})
                walk(s, e, tracks[-1])
            elif kind in _CONTAINERS:
                walk(s, e, into)
            elif into is not None:
                into.setdefault(kind, (s, e))

    walk(0, len(data), None)
    return tracks


def read_mp4_video_info(data: bytes) -> VideoInfo:
    """Facts about the first video track of an MP4 held in memory. Raises ValueError when there is none."""
    for boxes in _find_tracks(data):
        if b"hdlr" not in boxes or data[boxes[b"hdlr"][0] + 8 : boxes[b"hdlr"][0] + 12] != b"vide":
            continue
        for needed in (b"mdhd", b"stsd", b"stsz", b"stts"):
            if needed not in boxes:
                raise ValueError(f"video track without a {needed.decode()} box")
        s, _ = boxes[b"mdhd"]
        version = data[s]
        timescale = struct.unpack_from(">I", data, s + (20 if version == 1 else 12))[0]
        s, _ = boxes[b"stsd"]
        # stsd: version/flags(4) count(4), then the first sample entry: size(4) fourcc(4) 6 reserved, 2 data ref
        # index, 16 pre-defined/reserved, then width(2) height(2).
        codec = data[s + 12 : s + 16].decode("latin-1")
        width, height = struct.unpack_from(">HH", data, s + 8 + 32)
        s, _ = boxes[b"stsz"]
        num_frames = struct.unpack_from(">I", data, s + 8)[0]
        s, _ = boxes[b"stts"]
        (entries,) = struct.unpack_from(">I", data, s + 4)
        ticks = 0
        for i in range(entries):
            count, delta = struct.unpack_from(">II", data, s + 8 + 8 * i)
            ticks += count * delta
        if b"stss" in boxes:
            (keyframes,) = struct.unpack_from(">I", data, boxes[b"stss"][0] + 4)
        else:
            keyframes = num_frames
        return VideoInfo(codec, width, height, num_frames, timescale, ticks, keyframes)
    raise ValueError("no video track in the MP4")
