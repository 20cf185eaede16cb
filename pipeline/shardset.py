"""The shards a loader reads: resolution, codec check, per-epoch order and corrupt-sample substitution.

DALI's webdataset reader identifies a sample by its position in the index files. Skipping a corrupt sample by
removing it would shift every later position (and so the shuffle and the shard partition of every rank), so a
blocked sample is instead *substituted*: a patched copy of its shard's index file points the sample's members at a
healthy neighbour in the same tar. Positions, counts, shuffles and rank partitions stay exactly as before; the loader
then either emits the neighbour in the sample's place (training: one duplicate per corrupt sample) or drops the
sample's rows (eval, where the neighbour's video is read under the corrupt sample's own id).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards import format as fmt
from shards import ivf

log = logging.getLogger(__name__)

_FOURCC_CODECS = {
    b"avc1": "h264",
    b"avc3": "h264",
    b"hvc1": "hevc",
    b"hev1": "hevc",
    b"vp09": "vp9",
    b"vp08": "vp8",
    b"av01": "av1",
    b"mp4v": "mpeg4",
    b"jpeg": "mjpeg",
    b"mjpa": "mjpeg",
    b"mjpb": "mjpeg",
    b"MJPG": "mjpeg",
}


@dataclass
class IndexedSample:
    line: int  # 1-based line in the index file (0 is the header)
    components: dict[str, tuple[int, int, str]]  # ext -> (offset, size, member name)

    @property
    def key(self) -> str:
        return fmt.split_member_name(next(iter(self.components.values()))[2])[0]


def read_index(index_path: str) -> tuple[str, list[IndexedSample]]:
    """A DALI index file (`shards.format.read_index`, ValueError if malformed): (its header line, its samples in
    order)."""
    samples = [
        IndexedSample(line, {e.ext: (e.offset, e.size, e.name) for e in entries})
        for line, entries in enumerate(fmt.read_index(index_path), start=1)
    ]
    return f"{fmt.INDEX_VERSION} {len(samples)}", samples


def sniff_codec(mp4: bytes) -> str | None:
    """The codec of an IVF file (its header's fourcc) or of the first video track of an mp4 (its sample
    description, 'stsd' box)."""
    if mp4[:4] == b"DKIF":
        return ivf.FOURCC_CODECS.get(mp4[8:12])
    pos = mp4.find(b"stsd")  # then version+flags, entry count, and the first entry's size and fourcc
    if pos < 0 or pos + 20 > len(mp4):
        return None
    fourcc = mp4[pos + 16 : pos + 20]
    return _FOURCC_CODECS.get(fourcc, fourcc.decode("latin-1").strip() or None)


NVDEC_VP9_MIN_SIDE = 128


def _manifest_if_there(directory: str) -> dict | None:
    """The JSON object in the directory's manifest, unchecked (shards from other tools may carry a partial one), or
    None when it is missing or unreadable."""
    try:
        return fmt.read_json_object(Path(directory) / fmt.MANIFEST_NAME)
    except ValueError:
        return None


def manifest_codec(directory: str) -> str | None:
    manifest = _manifest_if_there(directory)
    if manifest is None:
        return None
    for holder in (manifest, manifest.get("build", {}), manifest.get("params", {}), manifest.get("args", {})):
        if isinstance(holder, dict) and isinstance(holder.get("codec"), str):
            return holder["codec"].lower().replace("libvpx-vp9", "vp9").replace("libx264", "h264")
    return None


class ShardSet:
    """Local tar shards with their index files, plus the loader's substitutions for corrupt samples."""

    def __init__(self, spec: str | os.PathLike | Sequence[str | os.PathLike]):
        self._index_cache: dict[str, tuple[str, list[IndexedSample]]] = {}
        self.tars: list[str] = self._without_empty(self._resolve(spec))
        self.index_paths: list[str] = [fmt.index_path_for(t) for t in self.tars]
        self.blocked: dict[str, str] = {}  # "tar:member" -> reason
        self._patch_dir: str | None = None
        self._check_sizes()
        self.layout = self._layout()
        self.phases = self.layout.phases
        self.video_exts = self.layout.video_exts  # the first names the sample (source, codec, blocking)
        # the members a decode reads: the videos and, in IVF layouts, their cuts table
        self.decode_exts = self.video_exts + ([fmt.CUTS_EXT] if self.layout.cuttable else [])

    def _resolve(self, spec) -> list[str]:
        """The local tar paths of `spec` (pipeline.remote.RemoteShardSet: where a remote set's tars are cached)."""
        return fmt.resolve_shards(spec)

    def _without_empty(self, tars: list[str]) -> list[str]:
        """`tars` less those whose index lists no sample (DALI cannot even map an empty tar: a long traceback), with
        one warning line; ValueError (one line) when that leaves none."""
        empty = [tar for tar in tars if not self.index(tar)[1]]
        if empty and len(empty) == len(tars):
            others = f" (and so do the {len(empty) - 1} other shards)" if len(empty) > 1 else ""
            raise ValueError(f"{empty[0]}: its index {fmt.index_path_for(empty[0])} lists no samples{others}")
        if empty:
            log.warning("pipeline: skipping %d shard(s) whose index lists no samples: %s", len(empty), ", ".join(empty))
        return [tar for tar in tars if tar not in empty]

    def _check_sizes(self) -> None:
        """Refuse, in one line naming the shard, a tar shorter than its index says (DALI would read past its end:
        a crash, not an error) or of another size than its manifest lists (a truncated or replaced shard)."""
        listed: dict[str, int] = {}
        for directory in sorted({os.path.dirname(os.path.abspath(tar)) for tar in self.tars}):
            try:
                manifest = _manifest_if_there(directory)
                listed.update(
                    {os.path.join(directory, s["tar"]): int(s["bytes"]) for s in manifest["shards"] if "bytes" in s}
                )
            except (ValueError, KeyError, TypeError):
                continue  # shards without a (readable) manifest: the index check below still holds
        for tar in self.tars:
            size = os.path.getsize(tar)
            expected = listed.get(os.path.abspath(tar))
            if expected is not None and size != expected:
                raise ValueError(
                    f"{tar}: {size} bytes, its manifest lists {expected} (truncated or replaced; run "
                    f"`python -m shards.verify` on its directory and rebuild the shard)"
                )
            samples = self.index(tar)[1]
            end = max(
                (offset + length for sample in samples for offset, length, _ in sample.components.values()), default=0
            )
            if end > size:
                raise ValueError(
                    f"{tar}: {size} bytes, but its index {fmt.index_path_for(tar)} points to byte {end} "
                    f"(a truncated shard; rebuild it, or its index with wds2idx)"
                )

    def _layout(self) -> fmt.Layout:
        """How the videos are stored (shards.format), the same in every tar: read from each tar's first sample."""
        found: dict[fmt.Layout, str] = {}
        for tar in self.tars:
            samples = self.index(tar)[1]
            if samples:
                try:
                    found.setdefault(fmt.layout_of(samples[0].components), tar)
                except ValueError as e:
                    raise ValueError(f"{tar}: {e}") from None
        if len(found) > 1:
            (l1, t1), (l2, t2) = sorted(found.items(), key=lambda item: (item[0].phases, item[0].container))[:2]
            raise ValueError(
                f"{t1} stores videos in {l1.phases} phase(s) of {l1.container}, {t2} in {l2.phases} of "
                f"{l2.container}: one loader reads one layout (rebuild one set with the other's "
                f"--phases and --container)"
            )
        return next(iter(found), fmt.Layout())

    def check_stride(self, stride: int) -> None:
        """Raise a one-line error when the clips' stride is not a multiple of the videos' stride phases."""
        if stride % self.phases:
            raise ValueError(
                f"{self.tars[0]}: shards stored in {self.phases} stride phases need a stride that "
                f"{self.phases} divides, got stride={stride} (rebuild with --phases dividing it, or 1)"
            )

    # -- inspection --------------------------------------------------------------------------------------------
    def index(self, tar: str) -> tuple[str, list[IndexedSample]]:
        if tar not in self._index_cache:
            self._index_cache[tar] = read_index(fmt.index_path_for(tar))
        return self._index_cache[tar]

    def codec(self, tar: str) -> str | None:
        """The manifest's codec for the tar's directory, else the codec of the tar's first video."""
        codec = manifest_codec(os.path.dirname(os.path.abspath(tar)))
        if codec:
            return codec
        for sample in self.index(tar)[1]:
            if self.video_exts[0] in sample.components:
                offset, size, _ = sample.components[self.video_exts[0]]
                with open(tar, "rb") as f:
                    f.seek(offset)
                    return sniff_codec(f.read(size))
        return None

    def check_cpu_decodable(self) -> None:
        """Raise a one-line error naming the first shard whose codec DALI's CPU decoder cannot read."""
        seen: dict[str, str | None] = {}
        for tar in self.tars:
            directory = os.path.dirname(os.path.abspath(tar))
            if directory not in seen or manifest_codec(directory) is None:
                seen[directory] = self.codec(tar)
            codec = seen[directory]
            if codec is not None and codec not in fmt.DALI_CPU_CODECS:
                raise ValueError(
                    f"{tar}: codec {codec} cannot be decoded by DALI's CPU video decoder (VP8, VP9 and "
                    f"MJPEG only); use device='gpu' or rebuild the shards as VP9"
                )

    def check_gpu_decodable(self) -> None:
        """Raise a one-line error for VP8/VP9 shards built below NVDEC's smallest frame, which DALI's mixed decoder
        refuses for every sample (bench/RESULTS.md, H100 field notes). Only the manifest's build settings are
        consulted; shards without a manifest pass."""
        for directory in sorted({os.path.dirname(os.path.abspath(tar)) for tar in self.tars}):
            manifest = _manifest_if_there(directory)
            if manifest is None:
                continue
            short_side = manifest.get("params", {}).get("short_side")
            codec = manifest_codec(directory)
            if codec in ("vp8", "vp9") and isinstance(short_side, int) and short_side < NVDEC_VP9_MIN_SIDE:
                raise ValueError(
                    f"{directory}: {codec} shards with short side {short_side} px are below NVDEC's "
                    f"{NVDEC_VP9_MIN_SIDE} px minimum; use device='cpu' or rebuild with --short-side "
                    f">= {NVDEC_VP9_MIN_SIDE}"
                )

    def read_member(self, tar: str, offset: int, size: int) -> bytes:
        with open(tar, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def structural_problems(self) -> dict[str, str]:
        """Samples whose index entry cannot be valid (empty video, info or cuts table of the wrong size):
        "tar:member" -> reason."""
        problems = {}
        info_size = 4 * len(fmt.INFO_FIELDS)
        row_size = 4 * len(fmt.CUT_COLUMNS)
        for tar in self.tars:
            for sample in self.index(tar)[1]:
                videos = [sample.components.get(ext) for ext in self.video_exts]
                info = sample.components.get(fmt.INFO_EXT)
                cuts = sample.components.get(fmt.CUTS_EXT) if self.layout.cuttable else (0, row_size, "")
                if None in videos or info is None or cuts is None:
                    continue  # DALI skips samples with a missing component (missing_component_behavior="skip")
                video = videos[0]
                if any(v[1] == 0 for v in videos):
                    problems[f"{tar}:{video[2]}"] = "empty video member"
                elif info[1] != info_size:
                    problems[f"{tar}:{video[2]}"] = f"info member of {info[1]} bytes, expected {info_size}"
                elif cuts[1] == 0 or cuts[1] % row_size:
                    problems[f"{tar}:{video[2]}"] = f"cuts table of {cuts[1]} bytes, not whole rows"
        return problems

    def incomplete_samples(self, video_exts: list[str]) -> dict[str, str]:
        """Samples lacking a member the graph reads (`video_exts`, the cuts table in IVF layouts, the info member),
        which DALI's reader leaves out of every epoch (missing_component_behavior="skip"): "tar:key" -> what is
        missing."""
        needed = [*video_exts, *([fmt.CUTS_EXT] if self.layout.cuttable else []), fmt.INFO_EXT]
        found = {}
        for tar in self.tars:
            for sample in self.index(tar)[1]:
                missing = [ext for ext in needed if ext not in sample.components]
                if missing:
                    key = sample.key
                    found[f"{tar}:{key}"] = "no " + ", ".join(f"{key}.{ext}" for ext in missing)
        return found

    # -- epoch order -------------------------------------------------------------------------------------------
    def epoch_order(self, seed: int, epoch: int, shuffle: bool) -> list[int]:
        """Tar order for an epoch: a permutation shared by every rank (same seed), or the given order."""
        if not shuffle:
            return list(range(len(self.tars)))
        rng = np.random.default_rng([seed, epoch, 0x5A4D])
        return [int(i) for i in rng.permutation(len(self.tars))]

    # -- substitutions -----------------------------------------------------------------------------------------
    def block(self, source: str, reason: str) -> str:
        """Block a sample named "tar:member" (or "tar:offset:member" as DALI reports it). Returns "tar:member"."""
        tar, member = split_source(source)
        key = f"{tar}:{member}"
        self.blocked[key] = reason
        return key

    def blocked_sample_ids(self) -> set[int]:
        """Sample ids (from their own info members) of the blocked samples whose info is readable."""
        ids = set()
        for key in self.blocked:
            tar, member = split_source(key)
            sample = self._find(tar, member)
            if sample is None or fmt.INFO_EXT not in sample.components:
                continue
            offset, size, _ = sample.components[fmt.INFO_EXT]
            data = self.read_member(tar, offset, size)
            if len(data) == 4 * len(fmt.INFO_FIELDS):
                ids.add(fmt.unpack_info(data)["sample_id"])
        return ids

    def _find(self, tar: str, member: str) -> IndexedSample | None:
        if tar not in self.tars:
            return None
        for sample in self.index(tar)[1]:
            if any(c[2] == member for c in sample.components.values()):
                return sample
        return None

    def patched_index_paths(self, keep_own_info: bool) -> list[str]:
        """Index paths for DALI, with patched copies for tars that hold blocked samples.

        A blocked sample's members are redirected to the nearest healthy sample of the same tar; with
        `keep_own_info` its info member stays its own (so its rows keep its id and can be dropped), otherwise the
        whole sample becomes a duplicate of the neighbour.
        """
        if not self.blocked:
            return list(self.index_paths)
        by_tar: dict[str, set[str]] = {}
        for key in self.blocked:
            tar, member = split_source(key)
            by_tar.setdefault(tar, set()).add(member)
        if self._patch_dir is None:
            self._patch_dir = tempfile.mkdtemp(prefix="videomae-pipeline-idx-")
        out = []
        for tar, index_path in zip(self.tars, self.index_paths):
            if tar not in by_tar:
                out.append(index_path)
                continue
            samples = self.index(tar)[1]
            bad = [any(c[2] in by_tar[tar] for c in s.components.values()) for s in samples]
            if all(bad):
                raise RuntimeError(f"{tar}: every sample is corrupt; remove the shard")
            patched = []
            for i, sample in enumerate(samples):
                comps = dict(sample.components)
                if bad[i]:
                    donor = _nearest_good(i, bad)
                    if keep_own_info and fmt.INFO_EXT in comps:
                        for ext in self.decode_exts:
                            comps[ext] = samples[donor].components[ext]
                    else:
                        comps = dict(samples[donor].components)
                patched.append([(ext, o, s, n) for ext, (o, s, n) in comps.items()])
            text = fmt.index_text(patched)
            digest = hashlib.sha1((text + str(keep_own_info)).encode()).hexdigest()[:12]
            path = os.path.join(self._patch_dir, f"{Path(tar).stem}.{digest}.idx")
            if not os.path.exists(path):
                fmt.atomic_write(path, text)
            out.append(path)
        return out

    def close(self) -> None:
        if self._patch_dir is not None:
            shutil.rmtree(self._patch_dir, ignore_errors=True)
            self._patch_dir = None


def _nearest_good(i: int, bad: list[bool]) -> int:
    for distance in range(1, len(bad)):
        for j in (i - distance, i + distance):
            if 0 <= j < len(bad) and not bad[j]:
                return j
    raise RuntimeError("no healthy sample to substitute")


def split_source(source: str) -> tuple[str, str]:
    """Split DALI's "tar:offset:member" (or our "tar:member") into (tar, member)."""
    tar, sep, rest = source.rpartition(".tar:")
    if not sep:
        raise ValueError(f"{source!r} does not name a tar member")
    tar = tar + ".tar"
    offset, sep2, member = rest.partition(":")
    return (tar, member) if sep2 and offset.isdigit() else (tar, rest)
