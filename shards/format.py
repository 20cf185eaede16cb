"""The on-disk shard format shared by the shard builder (`shards.build`) and the DALI pipeline (`pipeline`).

A build writes one split into one directory::

    OUT/{split}-{NNNNNN}.tar   WebDataset tar shards
    OUT/{split}-{NNNNNN}.idx   DALI index file for each tar (format "v1.2", see `write_dali_index`)
    OUT/manifest.json          written last: build parameters, classes, per-shard counts and sha256, keys
    OUT/failures.jsonl         one line per skipped input: {"source": path, "reason": "..."}
    (a partitioned build names its shards OUT/{split}-p{III}-{NNNNNN}.tar: see "Partitioned builds" below)

Each sample is a group of tar members sharing a key (no dots, unique within the split):

    KEY.ivf    the transcoded video: VP9 in IVF (the default; see "Keyframe cuts"), or KEY.mp4 (H.264, MJPEG, or
               VP9 built with `--container mp4`); in a build with `--phases P`, KEY.p0.ivf ... KEY.p{P-1}.ivf
               (or .mp4) instead (see "Stride phases")
    KEY.cuts   IVF layouts only: the cut table, int32 little-endian rows (member, frame, byte offset, kind), one
               row per frame of every video member in member order (kind 1: key frame, 0: other frame; offset: the
               frame's 12-byte IVF header), then per member one end row (member, frame count, member size, -1)
    KEY.cls    label index as ASCII decimal; -1 when the input had no label
    KEY.json   {"key", "source", "label", "label_name", "fps", "num_frames", "width", "height", "duration",
                "codec", "sample_id"} (+ "phases" when P > 1)
    KEY.info   12 bytes, little-endian int32 [num_frames, label, sample_id]: fixed-size numbers that the DALI
               graph reads directly (dtype INT32) to choose frame indices and emit labels and ids without any
               Python callback.

Stride phases (`--phases P`): VideoMAE reads every stride-th frame (4). A decoder must decode the frames in between,
and DALI's (2.4) decodes every video from the first byte it is handed, so a clip costs the position of its last
frame in the stream: ~150 decoded frames per clip on 10 s videos. A build with P phases stores frames p, p+P, p+2P,
... of the video as member `KEY.p{p}.*`, each encoded on its own: with P dividing the stride a clip is 16
consecutive frames of one member. Frame indices everywhere (`num_frames`, the pipeline's `frame_idx`) stay indices
of the video's timeline; timeline frame i is frame i // P of member `p{i % P}`.

Keyframe cuts (IVF layouts): the graph hands the decoder the member's 32-byte IVF header followed by the bytes from
the last key frame at or before the clip's first frame up to the end of its last frame (both offsets from the
cuts table, written from the encoder's actual key frames), so a clip costs (distance to that key frame) + its own
frames, wherever it lies in the video. `shards.ivf` says why IVF.

Versions: "videomae-shards/2" added the IVF layouts and the cuts table; "videomae-shards/1" directories (MP4
members, no cuts) are still read, decoded from each member's start.

`sample_id` runs 0..num_samples-1 in shard order (shard i holds ids first_sample_id .. first_sample_id+n-1);
`manifest["keys"][sample_id]` is the sample's key. Readers rely on it: eval sizes its per-video tables by
num_samples and indexes them by id, and drops corrupt samples by id.

Partitioned builds (`shards.build --part I/N`, then `shards.merge`): part I builds the contiguous plan positions
[I*P//N, (I+1)*P//N) into `OUT/{split}-p{III}-{NNNNNN}.tar` (+ `.idx`; `part_shard_prefix`), so names never collide
across parts, and no manifest. Until the merge its samples carry provisional ids, start + their rank in the part (start
= the part's first plan position): unique across parts, but with gaps where videos failed. `shards.merge` renumbers
every sample of part I to offset_I + its rank in the part (offset_I = samples of the parts before it) by rewriting
the 12-byte `KEY.info` and the `KEY.json` member in place (a json member whose id has fewer digits shrinks: its tar
header and index entry are rewritten, its data stays in its 512-byte blocks), then writes the manifest. The result
holds the ids, keys, labels and per-sample bytes of a one-machine build (the plan order is the same); only shard
boundaries and names differ. One exception: a json member that would free a 512-byte block by shrinking (its size
one of 512k+1 .. 512k+d, d the digits lost) keeps its size with trailing spaces, which JSON allows.

Every reader and writer of these files uses this module: `read_index` / `write_dali_index` (index files),
`split_member_name` (key and extension of a member), `read_manifest` / `write_manifest`, `read_json_object`,
`DALI_CPU_CODECS`, and `atomic_write`, which writes every file above (and the builder's state, the benchmarks'
reports) whole or not at all.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import braceexpand
import numpy as np

FORMAT_VERSION = "videomae-shards/2"
READABLE_FORMATS = ("videomae-shards/1", FORMAT_VERSION)
CONTAINERS = ("ivf", "mp4")
VIDEO_EXT = "mp4"
IVF_EXT = "ivf"
CUTS_EXT = "cuts"
CUT_COLUMNS = ("member", "frame", "offset", "kind")
CUT_KEY, CUT_FRAME, CUT_END = 1, 0, -1  # the "kind" column
LABEL_EXT = "cls"
META_EXT = "json"
INFO_EXT = "info"
MAX_PHASES = 8
INFO_FIELDS = ("num_frames", "label", "sample_id")
_INFO_STRUCT = struct.Struct("<3i")
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
TAR_BLOCK = 512
INDEX_VERSION = "v1.2"  # DALI's webdataset index format (`read_index`, `write_dali_index`)
# Codecs DALI's CPU video decoder reads; the others need its GPU decoder, NVDEC (bench/RESULTS.md, "Field notes
# (shards)").
DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name: the base name up to its first dot, and what follows that dot
    (`dir/abc.p0.ivf` -> ("abc", "p0.ivf")). WebDataset groups consecutive members with the same key into a sample."""
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext


def pack_meta(meta: dict) -> bytes:
    """The `KEY.json` member: compact JSON with sorted keys, so that the same fields give the same bytes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def renumber_meta(data: bytes, sample_id: int) -> bytes:
    """`KEY.json` bytes with `sample_id` as the id: what `pack_meta` writes for the same fields. ValueError if `data`
    (trailing spaces aside) is not what `pack_meta` writes."""
    meta = json.loads(data)
    if not isinstance(meta, dict) or pack_meta(meta) != data.rstrip(b" "):
        raise ValueError("not a sample's json member as the builder writes it")
    return pack_meta({**meta, "sample_id": int(sample_id)})


def pack_info(num_frames: int, label: int, sample_id: int) -> bytes:
    """The `KEY.info` member: little-endian int32 [num_frames, label, sample_id]."""
    return _INFO_STRUCT.pack(int(num_frames), int(label), int(sample_id))


def unpack_info(data: bytes) -> dict[str, int]:
    return dict(zip(INFO_FIELDS, _INFO_STRUCT.unpack(data)))


@dataclass(frozen=True)
class Layout:
    """How a sample stores its video: `phases` members in `container` ("ivf": with a cuts table, or "mp4")."""

    phases: int = 1
    container: str = IVF_EXT

    @property
    def video_exts(self) -> list[str]:
        """Extensions of the video members: ["ivf"], or ["p0.ivf", ..., "p{P-1}.ivf"] for P > 1 phases."""
        return video_exts(self.phases, self.container)

    @property
    def cuttable(self) -> bool:
        return self.container == IVF_EXT

    @property
    def member_exts(self) -> list[str]:
        """Every member extension of a sample, in the order the builder writes them."""
        return [*self.video_exts, *([CUTS_EXT] if self.cuttable else []), LABEL_EXT, META_EXT, INFO_EXT]


def video_exts(phases: int = 1, container: str = VIDEO_EXT) -> list[str]:
    """Extensions of a sample's video members: [container], or ["p0.<container>", ...] for P > 1 phases."""
    return [container] if phases == 1 else [f"p{p}.{container}" for p in range(phases)]


def layout_of(exts) -> Layout:
    """A sample's layout from its member extensions; ValueError if they name no coherent set of video members."""
    exts = set(exts)
    for container in CONTAINERS:
        if container in exts:
            layout = Layout(1, container)
            break
        phases = sum(1 for ext in exts if ext.startswith("p") and ext.endswith("." + container))
        if phases:
            layout = Layout(phases, container)
            if set(layout.video_exts) - exts:
                raise ValueError(
                    f"video members {sorted(e for e in exts if e.endswith(container))}: expected "
                    f"'p0.{container}' ... 'p{phases - 1}.{container}'"
                )
            break
    else:
        raise ValueError(f"members {sorted(exts)}: no video member ('ivf', 'mp4', 'p0.ivf', ...)")
    if layout.cuttable and CUTS_EXT not in exts:
        raise ValueError(f"IVF video members without their '{CUTS_EXT}' table")
    return layout


def pack_cuts(members: Sequence) -> bytes:
    """The `KEY.cuts` member for a sample's IVF video members (`shards.ivf.IvfStream`s, in member order)."""
    rows = []
    for m, stream in enumerate(members):
        rows += [(m, i, f.offset, CUT_KEY if f.keyframe else CUT_FRAME) for i, f in enumerate(stream.frames)]
        rows.append((m, len(stream.frames), stream.size, CUT_END))
    return np.asarray(rows, dtype="<i4").tobytes()


def unpack_cuts(data: bytes) -> np.ndarray:
    """int32[rows, 4] (member, frame, offset, kind) from a `KEY.cuts` member; ValueError if its size is wrong."""
    if len(data) % (4 * len(CUT_COLUMNS)) or not data:
        raise ValueError(f"cuts table of {len(data)} bytes is not whole rows of {len(CUT_COLUMNS)} int32")
    return np.frombuffer(data, dtype="<i4").reshape(-1, len(CUT_COLUMNS))


def phase_frames(num_frames: int, phases: int, phase: int) -> int:
    """Frames of member `phase` of a video of `num_frames` frames stored in `phases` phases: ceil((n - p) / P)."""
    return len(range(phase, num_frames, phases))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def part_label(index: int, count: int) -> str:
    """The name of part `index` of `count` in file names: p000, p001, ... (wider only past 1000 parts)."""
    return f"p{index:0{max(3, len(str(count - 1)))}d}"


def part_shard_prefix(split: str, index: int, count: int) -> str:
    """What a part's shard names start with, `{split}-p{III}` (`shard_name(prefix, n)` names them)."""
    return f"{split}-{part_label(index, count)}"


def index_path_for(tar_path: str | os.PathLike) -> str:
    """The DALI index file that sits beside a tar shard (`x.tar` -> `x.idx`)."""
    p = str(tar_path)
    return (p[: -len(".tar")] if p.endswith(".tar") else p) + ".idx"


# What every reader of a manifest relies on; a manifest lacking any of it is refused in one line naming the key.
_MANIFEST_KEYS = {"shards": list, "keys": list, "classes": list, "num_samples": int}
_SHARD_KEYS = {"tar": str, "index": str, "num_samples": int}


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a shard directory. FileNotFoundError or ValueError (one line naming the file and the
    problem) when it is missing, not JSON, of another format, or lacks a key its readers need."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (the build did not finish, or this is not a shard directory)")
    try:
        manifest = read_json_object(path)
    except ValueError as e:
        raise ValueError(f"{e}; rebuild it with `python -m shards.build`") from None
    return validate_manifest(manifest, path)


def validate_manifest(manifest: dict, where: str | os.PathLike) -> dict:
    """`manifest` itself when it holds what every reader needs, else a one-line ValueError naming `where` (its file
    or URL) and the problem (another format, a missing key)."""
    if manifest.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{where}: format {manifest.get('format')!r}, expected one of {READABLE_FORMATS} (rebuild "
            f"it with `python -m shards.build`)"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise ValueError(f"{where}: {problem} (damaged or hand-edited; rebuild it with `python -m shards.build`)")
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Write `directory`/manifest.json (indented JSON) whole or not at all (`atomic_write`): a build, a merge and
    `apps.predict` write it last, so that its presence means a finished directory."""
    atomic_write(Path(directory) / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in `path`. ValueError, one line naming the file, when it cannot be read ("unreadable (...)",
    a missing file included) or holds something else than an object ("not a JSON object")."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def _manifest_problem(manifest: dict) -> str | None:
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            return f"no {key!r} ({kind.__name__})" if key not in manifest else f"{key!r} is not a {kind.__name__}"
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            return f"shards[{i}] is not an object"
        for key, kind in _SHARD_KEYS.items():
            if not isinstance(shard.get(key), kind):
                return f"shards[{i}] has no {key!r} ({kind.__name__})"
        if "/" in shard["tar"] or "/" in shard["index"] or shard["tar"].startswith(".."):
            return f"shards[{i}] names a file outside its directory ({shard['tar']!r})"
    return None


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
            raise ValueError(f"{tar}: a URL is read by the loader through its cache (pipeline.remote), not as a path")
        if not os.path.isfile(tar):
            raise FileNotFoundError(f"{tar}: shard not found")
        if not os.path.isfile(index_path_for(tar)):
            raise FileNotFoundError(f"{index_path_for(tar)}: index file missing for {tar} (run `wds2idx` or rebuild)")
    return out


class IndexEntry(NamedTuple):
    """One component of a sample in a DALI index file: `<ext> <offset> <size> <name>`."""

    ext: str
    offset: int  # of the member's data in the tar
    size: int
    name: str  # the tar member's name


def read_index(path: str | os.PathLike) -> list[list[IndexEntry]]:
    """DALI's webdataset index file ("v1.2", as `write_dali_index` and DALI's `wds2idx` write it): its samples, in
    order, each the list of its components. ValueError (one line naming the file) unless the first line is
    `v1.2 <number of samples>`, that number is the number of sample lines, and each sample line is whole
    `<ext> <offset> <size> <name>` groups with integer offsets and sizes."""
    with open(path) as f:
        lines = f.read().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"{path}: first line {lines[0] if lines else ''!r} is not '{INDEX_VERSION} <num_samples>'")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        tokens = line.split()
        if not tokens or len(tokens) % 4:
            raise ValueError(f"{path}: line {number} ({line[:80]!r}) is not groups of '<ext> <offset> <size> <name>'")
        try:
            samples.append(
                [
                    IndexEntry(tokens[i], int(tokens[i + 1]), int(tokens[i + 2]), tokens[i + 3])
                    for i in range(0, len(tokens), 4)
                ]
            )
        except ValueError:
            raise ValueError(
                f"{path}: line {number} ({line[:80]!r}) has an offset or size that is not an integer"
            ) from None
    if int(head[1]) != len(samples):
        raise ValueError(f"{path}: header says {head[1]} samples, the file lists {len(samples)}")
    return samples


def index_text(samples: Sequence[Sequence[tuple[str, int, int, str]]]) -> str:
    """The text of a DALI index file listing `samples`, each a sequence of (ext, offset, size, member name)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in comps) for comps in samples]
    return "\n".join(lines) + "\n"


def write_dali_index(members: Sequence[tuple[str, int, int]], path: str | os.PathLike) -> None:
    """Write DALI's webdataset index ("v1.2") for a tar whose members are known.

    `members`: (member name, offset of the member's data in the tar, size in bytes), in tar order.
    Members that share a key (`split_member_name`) form one sample line: `<ext> <offset> <size> <name>` for each
    component. Written whole or not at all (`atomic_write`); `read_index` reads it back.
    """
    samples: list[list[IndexEntry]] = []
    last_key = None
    for name, offset, size in members:
        key, ext = split_member_name(name)
        if key != last_key:
            samples.append([])
            last_key = key
        samples[-1].append(IndexEntry(ext, offset, size, name))
    atomic_write(path, index_text(samples))


def with_filename(error: OSError, path: str | os.PathLike) -> OSError:
    """`error` naming `path` (a failed `write` or `close` raises OSError without a file name: the one-line message
    of a stopped build must say where the disk is full)."""
    if error.filename is not None:
        return error
    named = OSError(error.errno, error.strerror or str(error), str(path))
    named.__cause__ = error
    return named


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[str], object]) -> None:
    """Write `path` whole or not at all: to `{path}.tmp`, fsync, then rename over `path`. `data` is the content
    (bytes, or str written as UTF-8), or a function that writes the file it is given (a temp name: an encoder's
    output, a plot). On any failure the temp file goes and the error is raised again; an OSError names the file."""
    tmp = f"{path}.tmp"
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise with_filename(e, tmp) from None
        raise
