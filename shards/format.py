"""The on-disk shard format shared by the shard builder (`shards.build`) and the DALI pipeline (`pipeline`).

A build writes one split into one directory::

    OUT/{split}-{NNNNNN}.tar   WebDataset tar shards
    OUT/{split}-{NNNNNN}.idx   DALI index file for each tar (format "v1.2", see `write_dali_index`)
    OUT/manifest.json          written last: build parameters, classes, per-shard counts and sha256, keys
    OUT/failures.jsonl         one line per skipped input: {"source": path, "reason": "..."}

Each sample is a group of tar members sharing a key (no dots, unique within the split):

    KEY.mp4    the transcoded video (codec named in the manifest; VP9 by default); or, in a build with
               `--phases P`, KEY.p0.mp4 ... KEY.p{P-1}.mp4 instead (see below)
    KEY.cls    label index as ASCII decimal; -1 when the input had no label
    KEY.json   {"key", "source", "label", "label_name", "fps", "num_frames", "width", "height", "duration",
                "codec", "sample_id"}
    KEY.info   12 bytes, little-endian int32 [num_frames, label, sample_id]: fixed-size numbers that the DALI
               graph reads directly (dtype INT32) to choose frame indices and emit labels and ids without any
               Python callback.

Stride phases (`--phases P`): VideoMAE reads every stride-th frame (4). A decoder must decode the frames in between,
and DALI's (2.4) decodes every video from its first frame, so a clip costs the position of its last frame in the
stream: ~150 decoded frames per clip on 10 s videos. A build with P phases stores frames p, p+P, p+2P, ... of the
video as member `KEY.p{p}.mp4`, each encoded on its own: with P dividing the stride a clip is 16 consecutive frames
of one member, starting at most n/P frames into it. Frame indices everywhere (`num_frames`, the pipeline's
`frame_idx`) stay indices of the video's timeline; timeline frame i is frame i // P of member `p{i % P}`.

`sample_id` runs 0..num_samples-1 in shard order (shard i holds ids first_sample_id .. first_sample_id+n-1);
`manifest["keys"][sample_id]` is the sample's key.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import braceexpand

FORMAT_VERSION = "videomae-shards/1"
VIDEO_EXT = "mp4"
LABEL_EXT = "cls"
META_EXT = "json"
INFO_EXT = "info"
MAX_PHASES = 8
INFO_FIELDS = ("num_frames", "label", "sample_id")
_INFO_STRUCT = struct.Struct("<3i")
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
TAR_BLOCK = 512


def pack_info(num_frames: int, label: int, sample_id: int) -> bytes:
    """The `KEY.info` member: little-endian int32 [num_frames, label, sample_id]."""
    return _INFO_STRUCT.pack(int(num_frames), int(label), int(sample_id))


def unpack_info(data: bytes) -> dict[str, int]:
    return dict(zip(INFO_FIELDS, _INFO_STRUCT.unpack(data)))


def video_exts(phases: int = 1) -> list[str]:
    """Extensions of a sample's video members: ["mp4"], or ["p0.mp4", ..., "p{P-1}.mp4"] for P > 1 phases."""
    return [VIDEO_EXT] if phases == 1 else [f"p{p}.{VIDEO_EXT}" for p in range(phases)]


def phases_of(exts) -> int:
    """The phase count of a sample from its member extensions (1 for a plain `mp4`); ValueError if incoherent."""
    exts = set(exts)
    if VIDEO_EXT in exts:
        return 1
    phases = sum(1 for ext in exts if ext.startswith("p") and ext.endswith("." + VIDEO_EXT))
    if phases == 0 or set(video_exts(phases)) - exts:
        raise ValueError(f"video members {sorted(e for e in exts if e.endswith(VIDEO_EXT))}: expected "
                         f"'{VIDEO_EXT}' or 'p0.{VIDEO_EXT}' ... 'p{{P-1}}.{VIDEO_EXT}'")
    return phases


def phase_frames(num_frames: int, phases: int, phase: int) -> int:
    """Frames of member `phase` of a video of `num_frames` frames stored in `phases` phases: ceil((n - p) / P)."""
    return len(range(phase, num_frames, phases))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_path_for(tar_path: str | os.PathLike) -> str:
    """The DALI index file that sits beside a tar shard (`x.tar` -> `x.idx`)."""
    p = str(tar_path)
    return (p[: -len(".tar")] if p.endswith(".tar") else p) + ".idx"


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (the build did not finish, or this is not a shard directory)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION!r}")
    return manifest


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard specification into a sorted-as-given list of local tar paths.

    `spec` may be a shard directory (its manifest lists the shards), a brace pattern
    (`/data/train-{000000..000099}.tar`), a glob, a single tar, or a list of any of these.
    Raises FileNotFoundError naming the first missing tar or index file.
    """
    specs: Iterable = [spec] if isinstance(spec, (str, os.PathLike)) else spec
    out: list[str] = []
    for item in specs:
        item = str(item)
        if os.path.isdir(item):
            manifest = read_manifest(item)
            out.extend(os.path.join(item, s["tar"]) for s in manifest["shards"])
            continue
        for expanded in braceexpand.braceexpand(item):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            if not matches:
                raise FileNotFoundError(f"{expanded}: no shard matches this pattern")
            out.extend(matches)
    if not out:
        raise FileNotFoundError(f"{spec}: no shards")
    for tar in out:
        if "://" in tar:
            raise ValueError(f"{tar}: remote URLs are not read directly; copy or mount the shards locally (see README)")
        if not os.path.isfile(tar):
            raise FileNotFoundError(f"{tar}: shard not found")
        if not os.path.isfile(index_path_for(tar)):
            raise FileNotFoundError(f"{index_path_for(tar)}: index file missing for {tar} (run `wds2idx` or rebuild)")
    return out


def write_dali_index(members: Sequence[tuple[str, int, int]], path: str | os.PathLike) -> None:
    """Write DALI's webdataset index ("v1.2") for a tar whose members are known.

    `members`: (member name, offset of the member's data in the tar, size in bytes), in tar order.
    Members that share a key (the name up to its first dot, after the last '/') form one sample line:
    `<ext> <offset> <size> <name>` for each component. Written to a temp name, then renamed.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last_key = None
    for name, offset, size in members:
        base = name.rsplit("/", 1)[-1]
        key, _, ext = base.partition(".")
        if key != last_key:
            samples.append([])
            last_key = key
        samples[-1].append((ext, offset, size, name))
    lines = [f"v1.2 {len(samples)}"]
    for comps in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in comps))
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
