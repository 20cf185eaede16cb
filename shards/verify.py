"""`python -m shards.verify DIR`: check a shard directory against its manifest, down to decoded frame counts.

Checks, each problem printed as one line naming the shard and sample:
- the manifest: format, totals (num_samples, keys, failures.jsonl lines), per-shard first_sample_id continuity;
- each shard: size and sha256 as the manifest says; its DALI index file equal, entry by entry, to the tar's
  members as Python's tarfile reads them (name, data offset, size);
- each sample: exactly the members of its layout (KEY.ivf + KEY.cuts, or KEY.mp4; KEY.p0.ivf ... in a build with
  --phases; then .cls/.json/.info); key = manifest keys[sample_id]; cls, json and info agree (label, label name
  against the class list, sample id, frame count, phases); the videos' own tables (IVF frame headers, MP4 stsz)
  agree with the claimed frame count (each phase member with its share), width and height; the cuts table equals
  the one the IVF members describe (every frame's offset, key frames from the VP9 headers, end rows);
- decoding (unless --no-decode): each video member must decode to exactly the number of frames its `.info`
  claims (each phase member its share; the number the training pipeline uses to pick frames in the graph). IVF
  members are decoded by DALI's CPU decoder whole and once from every key frame of the cuts table, cut as the
  training graph cuts them: each cut must decode to the very frames (bit for bit) of the whole member up to the
  next key frame. Other VP9 and MJPEG shards are read by a real DALI CPU pipeline (`fn.readers.webdataset` with
  the index files -> `fn.decoders.video`). DALI's CPU decoder refuses H.264, so H.264 shards are decoded with
  ffmpeg instead (every frame, no rate conversion), and the report says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from shards import format as fmt
from shards import ivf
from shards.logs import configure_logging
from shards.mp4info import read_mp4_video_info
from shards.transcode import count_decoded_frames
from shards.writer import sha256_file

log = logging.getLogger(__name__)

OTHER_EXTS = (fmt.LABEL_EXT, fmt.META_EXT, fmt.INFO_EXT)


def manifest_layout(manifest: dict) -> fmt.Layout:
    params = manifest.get("params", {})
    return fmt.Layout(int(params.get("phases", 1)), params.get("container", fmt.VIDEO_EXT))


class MemberPastEnd(tarfile.TarError):
    """A tar header declares more data than the tar holds."""


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, tar_size: int) -> bytes:
    """A member's bytes, once the tar is known to hold them: a header may declare any size (a terabyte), and
    reading that much would exhaust memory long before the read came up short."""
    if member.offset_data + member.size > tar_size:
        raise MemberPastEnd(
            f"member {member.name!r} declares {member.size} bytes at offset {member.offset_data}, "
            f"past the end of the tar ({tar_size} bytes)"
        )
    return tar.extractfile(member).read()


def check_shard_members(tar_path: Path, idx_path: Path, on_sample) -> tuple[list[str], int]:
    """Structural checks of one tar and its index. Each sample, as soon as its members are read, goes to
    `on_sample({"key", "members": {ext: bytes}})` (so a 1 GB shard is never held in memory).
    Returns (problems, number of samples)."""
    problems: list[str] = []
    index_components = []
    current: dict | None = None
    num_samples = 0
    tar_size = os.path.getsize(tar_path)
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                problems.append(f"{tar_path.name}: unexpected non-file member {member.name!r}")
                continue
            key, ext = fmt.split_member_name(member.name)
            data = read_member(tar, member, tar_size)
            if current is None or current["key"] != key:
                if current is not None:
                    on_sample(current)
                current = {"key": key, "members": {}}
                num_samples += 1
            if ext in current["members"]:
                problems.append(f"{tar_path.name}: {member.name} appears twice")
            current["members"][ext] = data
            index_components.append((key, ext, member.offset_data, member.size, member.name))
    if current is not None:
        on_sample(current)
    try:
        index = fmt.read_index(idx_path)
    except (OSError, ValueError) as e:  # each names the file
        return problems + [f"unreadable index: {e}"], num_samples
    flat = [(fmt.split_member_name(name)[0], ext, off, size, name) for comps in index for ext, off, size, name in comps]
    if len(index) != num_samples:
        problems.append(f"{idx_path.name}: index lists {len(index)} samples, tar holds {num_samples}")
    if flat != index_components:
        first = next(
            (i for i, (a, b) in enumerate(zip(flat, index_components)) if a != b), min(len(flat), len(index_components))
        )
        problems.append(
            f"{idx_path.name}: index disagrees with the tar at component {first} "
            f"(index {flat[first] if first < len(flat) else None}, "
            f"tar {index_components[first] if first < len(index_components) else None})"
        )
    return problems, num_samples


def check_sample(sample: dict, expected_id: int, manifest: dict, where: str) -> tuple[list[str], int | None]:
    """Consistency of one sample's members; returns (problems, claimed frame count)."""
    key, members = sample["key"], sample["members"]
    name = f"{where}: sample {key}"
    layout = manifest_layout(manifest)
    phases = layout.phases
    expected_exts = layout.member_exts
    if set(members) != set(expected_exts):
        return [f"{name}: members {sorted(members)}, expected {sorted(expected_exts)}"], None
    problems = []
    try:
        info = fmt.unpack_info(members[fmt.INFO_EXT])
        meta = json.loads(members[fmt.META_EXT])
        label = int(members[fmt.LABEL_EXT].decode())
    except Exception as e:  # noqa: BLE001 - any damage to these members is one line about the sample
        return [f"{name}: unreadable .info/.json/.cls ({e})"], None
    keys, classes = manifest["keys"], manifest["classes"]
    listed = keys[expected_id] if expected_id < len(keys) else None
    if listed != key:
        problems.append(f"{name}: manifest keys[{expected_id}] is {listed!r}")
    if info["sample_id"] != expected_id or meta.get("sample_id") != expected_id:
        problems.append(
            f"{name}: sample_id info={info['sample_id']} json={meta.get('sample_id')}, "
            f"expected {expected_id} (position in shard order)"
        )
    if not (info["label"] == label == meta.get("label")):
        problems.append(f"{name}: labels disagree: info={info['label']} cls={label} json={meta.get('label')}")
    expected_name = classes[label] if 0 <= label < len(classes) else None
    if label != -1 and meta.get("label_name") != expected_name:
        problems.append(
            f"{name}: label {label} is {expected_name!r} in the class list, json says {meta.get('label_name')!r}"
        )
    if meta.get("key") != key:
        problems.append(f"{name}: json key {meta.get('key')!r}")
    if info["num_frames"] != meta.get("num_frames"):
        problems.append(f"{name}: frame count info={info['num_frames']} json={meta.get('num_frames')}")
    if meta.get("phases", 1) != phases:
        problems.append(f"{name}: json says {meta.get('phases', 1)} phases, the manifest {phases}")
    kind = layout.container.upper()
    try:
        if layout.cuttable:
            streams = [ivf.read_ivf(members[ext]) for ext in layout.video_exts]
            videos = [stream.info() for stream in streams]
            if members[fmt.CUTS_EXT] != fmt.pack_cuts(streams):
                problems.append(f"{name}: cuts table differs from the frames and key frames of its IVF members")
            problems += [
                f"{name}: {ext} header says {s.header_frames} frames, it holds {len(s.frames)}"
                for ext, s in zip(layout.video_exts, streams)
                if s.header_frames != len(s.frames)
            ]
        else:
            videos = [read_mp4_video_info(members[ext]) for ext in layout.video_exts]
        counts = [m.num_frames for m in videos]
        if sum(counts) != info["num_frames"]:
            problems.append(
                f"{name}: {kind} holds {'+'.join(map(str, counts))} frames, info claims {info['num_frames']}"
            )
        elif counts != [fmt.phase_frames(info["num_frames"], phases, p) for p in range(phases)]:
            problems.append(f"{name}: phases hold {counts} frames, not every {phases}th frame each")
        sizes = {(m.width, m.height) for m in videos}
        if sizes != {(meta.get("width"), meta.get("height"))}:
            problems.append(
                f"{name}: {kind} is {' / '.join(f'{w}x{h}' for w, h in sorted(sizes))}, json says "
                f"{meta.get('width')}x{meta.get('height')}"
            )
    except ValueError as e:
        problems.append(f"{name}: unreadable {kind} ({e})")
    return problems, info["num_frames"]


def dali_frame_counts(
    tars: list[str], num_samples: int, batch_size: int = 4, num_threads: int | None = None, ext: str = fmt.VIDEO_EXT
) -> list[tuple[int, int, int]]:
    """Decode the video member `ext` of every sample of `tars` with a DALI CPU pipeline (index files beside the
    tars), in shard order.

    Returns per sample (decoded frames, height, width) of the decoded uint8[F, H, W, 3] video, plus nothing
    else: the frame count is what matters. Raises RuntimeError naming the sample position if DALI fails.
    """
    from nvidia.dali import fn, pipeline_def, types

    num_threads = num_threads or min(4, len(os.sched_getaffinity(0)))
    batch_size = max(1, min(batch_size, num_samples))

    @pipeline_def(
        batch_size=batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=1, exec_dynamic=True
    )
    def counting_pipeline():
        video, info = fn.readers.webdataset(
            paths=tars,
            index_paths=[fmt.index_path_for(t) for t in tars],
            ext=[ext, fmt.INFO_EXT],
            dtypes=[types.UINT8, types.INT32],
            missing_component_behavior="error",
            random_shuffle=False,
            pad_last_batch=True,
            name="reader",
        )
        frames = fn.decoders.video(video, device="cpu")
        return frames.shape(), info

    pipe = counting_pipeline()
    pipe.build()
    counts: list[tuple[int, int, int]] = []
    while len(counts) < num_samples:
        try:
            shapes, infos = pipe.run()
        except RuntimeError as e:  # DALI's errors
            raise RuntimeError(
                f"DALI failed in the batch starting at sample {len(counts)}: {' '.join(str(e).split())[:300]}"
            ) from None
        for i in range(len(shapes)):
            if len(counts) < num_samples:
                f, h, w, _ = (int(x) for x in shapes.at(i))
                counts.append((f, h, w))
    return counts


def verify(directory: str | os.PathLike, decode: bool = True, check_sha: bool = True) -> list[str]:
    """Run every check on a shard directory; returns the list of problems (empty: the shards are sound). What was
    checked is logged at INFO."""
    directory = Path(directory)
    started = time.perf_counter()
    try:
        manifest = fmt.read_manifest(directory)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    missing = _missing_build_keys(manifest)
    if missing:
        return [
            f"{directory / fmt.MANIFEST_NAME}: {missing} (not written by `python -m shards.build`, or "
            f"damaged; rebuild it)"
        ]
    problems: list[str] = []
    shards = manifest["shards"]
    keys = manifest["keys"]
    if len(keys) != manifest["num_samples"] or sum(s["num_samples"] for s in shards) != manifest["num_samples"]:
        problems.append(
            f"manifest: num_samples {manifest['num_samples']}, {len(keys)} keys, shards sum to "
            f"{sum(s['num_samples'] for s in shards)}"
        )
    if len(set(keys)) != len(keys):
        problems.append("manifest: keys are not unique")
    failures_path = directory / fmt.FAILURES_NAME
    if failures_path.is_file():
        with open(failures_path) as f:
            lines = [ln for ln in f if ln.strip()]
        if len(lines) != manifest.get("num_failures", len(lines)):
            problems.append(f"{fmt.FAILURES_NAME}: {len(lines)} lines, manifest says {manifest['num_failures']}")
    else:
        problems.append(f"{fmt.FAILURES_NAME}: missing")

    claimed: list[int | None] = []  # per sample id: the frame count its .info claims (None: unreadable)

    def on_sample(sample: dict, where: str) -> None:
        sample_problems, frames = check_sample(sample, len(claimed), manifest, where)
        problems.extend(sample_problems)
        claimed.append(frames)

    for shard in shards:
        tar_path = directory / shard["tar"]
        idx_path = directory / shard["index"]
        if shard["first_sample_id"] != len(claimed):
            problems.append(f"{shard['tar']}: first_sample_id {shard['first_sample_id']}, expected {len(claimed)}")
        if not tar_path.is_file() or not idx_path.is_file() or fmt.index_path_for(tar_path) != str(idx_path):
            problems.append(f"{shard['tar']}: tar or its index file {shard['index']} missing")
            claimed.extend([None] * shard["num_samples"])
            continue
        if tar_path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['tar']}: {tar_path.stat().st_size} bytes, manifest says {shard['bytes']}")
        elif check_sha and sha256_file(tar_path) != shard["sha256"]:
            problems.append(f"{shard['tar']}: sha256 differs from the manifest (file changed or damaged)")
        first = len(claimed)
        try:
            shard_problems, num_samples = check_shard_members(
                tar_path, idx_path, lambda sample: on_sample(sample, shard["tar"])
            )
            problems += shard_problems
        except tarfile.TarError as e:
            problems.append(f"{shard['tar']}: unreadable tar ({e})")
            num_samples = len(claimed) - first
        if num_samples != shard["num_samples"]:
            problems.append(f"{shard['tar']}: {num_samples} samples, manifest says {shard['num_samples']}")
            claimed.extend([None] * max(0, shard["num_samples"] - num_samples))
    log.info(
        f"verify: {directory}: {len(shards)} shards, {manifest['num_samples']} samples checked against the manifest"
        f"{' (with sha256)' if check_sha else ''}"
    )

    if decode and not problems:
        problems += _check_decoding(directory, manifest, claimed)
    elif decode:
        log.warning("verify: skipping the decode check until the problems above are fixed")
    log.info(
        f"verify: {'OK' if not problems else f'{len(problems)} problem(s)'} in {time.perf_counter() - started:.1f} s"
    )
    return problems


def _missing_build_keys(manifest: dict) -> str | None:
    """What of the builder's own manifest keys (beyond those every reader needs) verify lacks, or None."""
    if not isinstance(manifest.get("codec"), str):
        return "no 'codec'"
    for i, shard in enumerate(manifest["shards"]):
        for key, kind in (("bytes", int), ("sha256", str), ("first_sample_id", int)):
            if not isinstance(shard.get(key), kind):
                return f"shards[{i}] has no {key!r}"
    return None


def _check_decoding(directory: Path, manifest: dict, claimed: list[int | None]) -> list[str]:
    """Decode every video member; each must give the frames its sample's .info claims (its phase's share of them)."""
    tars = [str(directory / s["tar"]) for s in manifest["shards"]]
    keys = manifest["keys"]
    layout = manifest_layout(manifest)
    phases = layout.phases
    exts = layout.video_exts

    def expected(sample_id: int, ext: str) -> int | None:
        claim = claimed[sample_id]
        return None if claim is None else fmt.phase_frames(claim, phases, exts.index(ext))

    def mismatch(sample_id: int, ext: str, decoder: str, frames: int) -> str:
        member = "" if phases == 1 else f" member {ext}"
        return (
            f"sample {keys[sample_id]} (id {sample_id}){member}: {decoder} decoded {frames} frames, expected "
            f"{expected(sample_id, ext)} from the .info claim {claimed[sample_id]}"
        )

    problems = []
    codec = manifest["codec"]
    if layout.cuttable:
        return _check_ivf_decoding(tars, layout, expected, mismatch)
    if codec in fmt.DALI_CPU_CODECS:
        total = 0
        for ext in exts:
            try:
                decoded = dali_frame_counts(tars, len(keys), ext=ext)
            except RuntimeError as e:
                return [str(e)]
            total += sum(d[0] for d in decoded)
            problems += [
                mismatch(sid, ext, "DALI", frames)
                for sid, (frames, _, _) in enumerate(decoded)
                if frames != expected(sid, ext)
            ]
        log.info(
            f"verify: DALI CPU decoder: {len(keys)} samples, {total} frames, every count as claimed"
            if not problems
            else f"verify: DALI decode: {len(problems)} mismatches"
        )
        return problems
    # H.264 (and anything else DALI's CPU decoder cannot read): ffmpeg decodes every frame.
    log.info(f"verify: DALI's CPU decoder cannot read {codec}; counting decoded frames with ffmpeg instead")
    sample_id, last_key, members = -1, None, 0
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        for tar_path in tars:
            jobs = []
            with tarfile.open(tar_path, "r:") as tar:
                for member in tar:
                    key, ext = fmt.split_member_name(member.name)
                    if key != last_key:
                        sample_id, last_key = sample_id + 1, key
                    if ext in exts:
                        path = os.path.join(tmp, f"{sample_id}.{ext}")
                        with open(path, "wb") as f:
                            f.write(read_member(tar, member, os.path.getsize(tar_path)))
                        jobs.append((sample_id, ext, path, pool.submit(count_decoded_frames, path)))
                        members += 1
            for sid, ext, path, future in jobs:
                try:
                    frames = future.result()
                except RuntimeError as e:
                    problems.append(f"sample {keys[sid]} (id {sid}): ffmpeg cannot decode {ext} ({e})")
                    continue
                finally:
                    os.unlink(path)
                if frames != expected(sid, ext):
                    problems.append(mismatch(sid, ext, "ffmpeg", frames))
    log.info(
        f"verify: ffmpeg decoded all {sample_id + 1} samples ({members} video members)"
        + ("" if problems else ", every count as claimed")
    )
    return problems


def _tar_samples(tar_path: str):
    """(sample number in the tar, key, {ext: bytes}) for each sample of a tar, in order."""
    number, current = -1, None
    tar_size = os.path.getsize(tar_path)
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            key, ext = fmt.split_member_name(member.name)
            if current is None or current[1] != key:
                if current is not None:
                    yield current
                number += 1
                current = (number, key, {})
            current[2][ext] = read_member(tar, member, tar_size)
    if current is not None:
        yield current


def _check_ivf_decoding(tars: list[str], layout: fmt.Layout, expected, mismatch) -> list[str]:
    """Decode every IVF member whole (its frame count) and once from each key frame of its cuts table, cut as the
    training graph cuts it (header + the bytes from the key frame's offset to the next key frame's): every cut
    must decode to the whole member's frames from that key frame on, bit for bit."""
    from nvidia.dali import fn, pipeline_def, types

    batch = 16

    @pipeline_def(
        batch_size=batch,
        num_threads=min(4, len(os.sched_getaffinity(0))),
        device_id=None,
        prefetch_queue_depth=1,
        exec_dynamic=True,
    )
    def stream_decoder():
        video = fn.external_source(name="video", dtype=types.UINT8, ndim=1)
        length = fn.external_source(name="length", dtype=types.INT32, ndim=0)
        return fn.decoders.video(video, device="cpu", sequence_length=length)

    pipe = stream_decoder()
    pipe.build()

    def decode(streams: list[tuple[bytes, int]]) -> list[np.ndarray]:
        out = []
        for first in range(0, len(streams), batch):
            part = streams[first : first + batch]
            (frames,) = pipe.run(
                video=[np.frombuffer(d, dtype=np.uint8) for d, _ in part], length=[np.int32(n) for _, n in part]
            )
            out += [np.array(frames[i]) for i in range(len(part))]
        return out

    problems: list[str] = []
    sample_id, members, cuts = -1, 0, 0
    for tar in tars:
        for _, key, parts in _tar_samples(tar):
            sample_id += 1
            rows = fmt.unpack_cuts(parts[fmt.CUTS_EXT])
            for p, ext in enumerate(layout.video_exts):
                data, mine = parts[ext], rows[rows[:, 0] == p]
                length = int(mine[-1, 1])
                try:
                    (whole,) = decode([(data, length)])
                except RuntimeError as e:
                    problems.append(
                        f"sample {key} (id {sample_id}) {ext}: DALI cannot decode it ({' '.join(str(e).split())[:200]})"
                    )
                    continue
                members += 1
                if len(whole) != expected(sample_id, ext):
                    problems.append(mismatch(sample_id, ext, "DALI", len(whole)))
                starts = [int(f) for f in mine[mine[:, 3] == fmt.CUT_KEY, 1]]
                ends = starts[1:] + [length]
                offset = {int(f): int(o) for f, o in mine[:, 1:3]}
                streams = [(data[: ivf.HEADER_SIZE] + data[offset[a] : offset[b]], b - a) for a, b in zip(starts, ends)]
                try:
                    decoded = decode(streams)
                except RuntimeError as e:
                    problems.append(
                        f"sample {key} (id {sample_id}) {ext}: a cut at a key frame of its cuts table "
                        f"does not decode ({' '.join(str(e).split())[:200]})"
                    )
                    continue
                cuts += len(streams)
                for a, b, frames in zip(starts, ends, decoded):
                    if not np.array_equal(frames, whole[a:b]):
                        problems.append(
                            f"sample {key} (id {sample_id}) {ext}: decoding from key frame {a} gives "
                            f"other frames than decoding the whole member"
                        )
    pipe = None  # the decoder's buffers go before the summary
    log.info(
        f"verify: DALI CPU decoder: {members} IVF members whole and {cuts} cuts at their key frames"
        + (", every frame as claimed" if not problems else f": {len(problems)} problem(s)")
    )
    return problems


def verify_url(url: str, download_dir: str | None = None, decode: bool = True) -> list[str]:
    """`verify` on the shard set at `url` (see `shards.remote`), downloaded into `download_dir` (default: a temporary
    directory, removed after). A download that fails or differs from the manifest is one problem line."""
    from shards.fetch import FetchError
    from shards.remote import download_set, open_remote_set

    with tempfile.TemporaryDirectory(prefix="videomae-verify-") as tmp:
        try:
            directory = download_set(open_remote_set(url), download_dir or tmp)
        except (FetchError, ValueError) as e:
            return [str(e)]
        log.info(f"verify: {url} downloaded into {directory}")
        return verify(directory, decode=decode)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    p = argparse.ArgumentParser(prog="python -m shards.verify", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "directory",
        help="a shard directory (holding manifest.json), or its URL (s3://, gs://, https://: downloaded first, each "
        "object checked against the manifest)",
    )
    p.add_argument("--download-dir", help="with a URL: download into this directory (default: a temporary one)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding (structure and checksums only)")
    p.add_argument("--no-sha", action="store_true", help="skip the sha256 of each shard (sizes still checked)")
    args = p.parse_args(argv)
    from shards.remote import is_url

    if is_url(args.directory):
        problems = verify_url(args.directory, args.download_dir, decode=not args.no_decode)
    else:
        problems = verify(args.directory, decode=not args.no_decode, check_sha=not args.no_sha)
    for problem in problems:
        log.error(f"problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
