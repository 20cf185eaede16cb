"""Small, real VP9 shards for the pipeline tests (independent of `shards.build`).

Each test video is made from numpy frames piped into the ffmpeg binary (libvpx-vp9, lossless) and written into
WebDataset tar shards in the format of `shards/format.py` (`KEY.ivf` + `KEY.cuts` by default, or `KEY.mp4`;
`KEY.cls`, `KEY.json`, `KEY.info`, a DALI index beside each tar, a manifest). IVF videos get short GOPs (8 frames
per member, 4 with phases), so that clips start at many distances from a key frame.
The frames are gray (neutral chroma, so colour conversion and chroma subsampling leave them intact) and made of
16x16 blocks (aligned to the codec's macroblocks):

    frame[t, y, x] = level(t) + pattern(y, x)

`level(t)` differs by `LEVEL_STEP` grey levels between consecutive frames and `pattern` is a fixed block texture
(the same in every frame, different per video), so any frame of any crop is matched to its index without ambiguity
by its nearest neighbour among the PyAV-decoded frames (cropped and resized the same way), and crops stay visible.

Pre-built sets, for a machine without ffmpeg (the GPU machine): `python tests/pipeline_shards.py OUT SET...` (run
from the repository root, e.g. `SET` = `gpu_train_shards:4:ivf`: a shard-set function of this module and its
positional arguments) writes each set to OUT/<its cache name>; with $PIPELINE_TEST_SHARDS=OUT, `cached` copies a set
found there instead of encoding it (`load_test_shards` reads its videos back from the tars).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards import format as fmt
from shards import ivf

LEVEL_STEP = 3
LEVEL_BASE = 16
PATTERN_AMPLITUDE = 24
MAX_FRAMES = (255 - 2 * PATTERN_AMPLITUDE - LEVEL_BASE) // LEVEL_STEP  # levels stay inside 0..255


PREBUILT_ENV = "PIPELINE_TEST_SHARDS"  # a folder of pre-built sets, one sub-folder per cache name


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise RuntimeError(
            f"no ffmpeg (imageio-ffmpeg) to encode test clips; pre-build the sets on a machine that has it "
            f"(python tests/pipeline_shards.py OUT SET...) and point ${PREBUILT_ENV} at OUT"
        ) from e
    return imageio_ffmpeg.get_ffmpeg_exe()


def synthetic_frames(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8[T, H, W, 3] grey frames: per-frame level + a fixed 16x16-block texture chosen by `seed`."""
    if num_frames > MAX_FRAMES:
        raise ValueError(f"at most {MAX_FRAMES} frames keep distinct grey levels")
    rng = np.random.default_rng(seed)
    blocks = rng.integers(-PATTERN_AMPLITUDE, PATTERN_AMPLITUDE + 1, size=(-(-height // 16), -(-width // 16)))
    pattern = np.kron(blocks, np.ones((16, 16), dtype=np.int64))[:height, :width]
    levels = LEVEL_BASE + PATTERN_AMPLITUDE + LEVEL_STEP * np.arange(num_frames)
    frames = levels[:, None, None] + pattern[None]
    return np.repeat(frames[..., None], 3, axis=-1).astype(np.uint8)


def encode(
    frames: np.ndarray,
    codec: str = "vp9",
    fps: int = 25,
    gop: int = 16,
    faststart: bool = False,
    container: str = "mp4",
) -> bytes:
    """Encode uint8[T, H, W, 3] frames into an mp4 (or IVF: vp9 only) with the ffmpeg binary (vp9 lossless, or
    h264); `faststart` puts the mp4 index (moov) before the frame data."""
    t, h, w, _ = frames.shape
    if codec == "vp9":
        vargs = ["-c:v", "libvpx-vp9", "-lossless", "1", "-deadline", "realtime", "-cpu-used", "8"]
    elif codec == "h264":
        vargs = ["-c:v", "libx264", "-crf", "4", "-preset", "ultrafast"]
    else:
        raise ValueError(f"unknown codec {codec}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"v.{container}")
        cmd = [
            ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{w}x{h}",
            "-r",
            str(fps),
            "-i",
            "-",
            *vargs,
            "-g",
            str(gop),
            "-keyint_min",
            str(gop),
            "-pix_fmt",
            "yuv420p",
            "-an",
            *(["-movflags", "+faststart"] if faststart else []),
            "-f",
            container,
            out,
        ]
        subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True)
        return Path(out).read_bytes()


def decode_pyav(mp4: bytes) -> np.ndarray:
    """All frames of an mp4 or IVF file as uint8[T, H, W, 3] RGB, decoded with PyAV (the independent reference)."""
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


_DECODED: dict[bytes, np.ndarray] = {}


def decode_cached(video: TestVideo) -> np.ndarray:
    """`decode_pyav(video.mp4)`, decoded once per process; for a video stored in P phases, its members decoded and
    interleaved back into timeline order (frame i = frame i // P of member i % P)."""
    key = video.mp4[:64] + len(video.mp4).to_bytes(8, "little") + video.key.encode()
    if key not in _DECODED:
        if video.phase_mp4s:
            phases = [decode_pyav(mp4) for mp4 in video.phase_mp4s]
            timeline = np.empty((sum(len(p) for p in phases), *phases[0].shape[1:]), dtype=phases[0].dtype)
            for p, frames in enumerate(phases):
                timeline[p :: len(phases)] = frames
            _DECODED[key] = timeline
        else:
            _DECODED[key] = decode_pyav(video.mp4)
    return _DECODED[key]


@dataclass
class TestVideo:
    key: str
    mp4: bytes
    num_frames: int
    label: int
    sample_id: int = -1
    valid: bool = True  # False for deliberately corrupt members
    phase_mp4s: list[bytes] | None = None  # stored in len(phase_mp4s) stride phases: member p = frames p::P
    container: str = "mp4"  # of mp4 and phase_mp4s ("ivf": the sample also holds a cuts table)
    cuts: bytes | None = None  # ivf: the cuts table (made from the members when not given: a test that damages
    # members afterwards keeps the table of the intact ones, as on a damaged disk)

    @property
    def members(self) -> list[bytes]:
        return self.phase_mp4s or [self.mp4]


@dataclass
class TestShards:
    directory: str
    tars: list[str]
    videos: list[TestVideo]
    by_id: dict[int, TestVideo] = field(default_factory=dict)


def write_shards(
    directory: str | os.PathLike,
    videos: list[TestVideo],
    per_shard: int,
    split: str = "train",
    codec: str = "vp9",
    classes: list[str] | None = None,
) -> TestShards:
    """Write `videos` (in order, sample ids 0..n-1) into tar shards + DALI indexes + manifest under `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tars, shard_entries = [], []
    for shard_index, first in enumerate(range(0, len(videos), per_shard)):
        group = videos[first : first + per_shard]
        tar_path = directory / fmt.shard_name(split, shard_index)
        members = []
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, video in enumerate(group):
                video.sample_id = first + i
                meta = {
                    "key": video.key,
                    "source": f"synthetic/{video.key}",
                    "label": video.label,
                    "label_name": f"class{video.label}",
                    "fps": 25.0,
                    "num_frames": video.num_frames,
                    "codec": codec,
                    "sample_id": video.sample_id,
                }
                members_of_video = video.members
                if video.phase_mp4s:
                    meta["phases"] = len(members_of_video)
                if video.container == fmt.IVF_EXT and video.cuts is None:
                    video.cuts = fmt.pack_cuts([ivf.read_ivf(m) for m in members_of_video])
                cuts = [(fmt.CUTS_EXT, video.cuts)] if video.container == fmt.IVF_EXT else []
                parts = [
                    *zip(fmt.video_exts(len(members_of_video), video.container), members_of_video),
                    *cuts,
                    (fmt.LABEL_EXT, str(video.label).encode()),
                    (fmt.META_EXT, json.dumps(meta).encode()),
                    (fmt.INFO_EXT, fmt.pack_info(video.num_frames, video.label, video.sample_id)),
                ]
                for ext, data in parts:
                    info = tarfile.TarInfo(f"{video.key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    header_start = tar.offset  # a USTAR header with a short name is one 512-byte block
                    tar.addfile(info, io.BytesIO(data))
                    members.append((info.name, header_start + fmt.TAR_BLOCK, info.size))
        fmt.write_dali_index(members, fmt.index_path_for(tar_path))
        tars.append(str(tar_path))
        shard_entries.append(
            {
                "tar": tar_path.name,
                "index": Path(fmt.index_path_for(tar_path)).name,
                "num_samples": len(group),
                "first_sample_id": first,
            }
        )
    manifest = {
        "format": fmt.FORMAT_VERSION,
        "split": split,
        "codec": codec,
        "num_samples": len(videos),
        "classes": classes or sorted({f"class{v.label}" for v in videos}),
        "shards": shard_entries,
        "keys": [v.key for v in videos],
    }
    fmt.write_manifest(directory, manifest)
    result = TestShards(str(directory), tars, videos)
    result.by_id = {v.sample_id: v for v in videos}
    return result


def make_test_shards(
    directory: str | os.PathLike,
    frame_counts: list[int],
    height: int = 64,
    width: int = 96,
    per_shard: int = 4,
    num_classes: int = 3,
    split: str = "train",
    codec: str = "vp9",
    seed: int = 0,
    phases: int = 1,
    container: str | None = None,
) -> TestShards:
    """One synthetic video per entry of `frame_counts` (video i: seed + i texture, label i % num_classes); with
    `phases` > 1 stored as that many members, member p encoding frames p, p + phases, ... `container`: "ivf"
    (default for vp9; GOP 8 // phases, at least 2) or "mp4" (GOP 16)."""
    container = container or ("ivf" if codec == "vp9" else "mp4")
    gop = max(2, 8 // phases) if container == "ivf" else 16
    videos = []
    for i, n in enumerate(frame_counts):
        frames = synthetic_frames(n, height, width, seed + i)
        members = [encode(frames[p::phases], codec=codec, gop=gop, container=container) for p in range(phases)]
        cuts = fmt.pack_cuts([ivf.read_ivf(m) for m in members]) if container == fmt.IVF_EXT else None
        videos.append(
            TestVideo(
                f"vid{i:04d}",
                members[0],
                n,
                i % num_classes,
                phase_mp4s=members if phases > 1 else None,
                container=container,
                cuts=cuts,
            )
        )
    return write_shards(directory, videos, per_shard, split=split, codec=codec)


def make_corrupt_shards(
    directory: str | os.PathLike,
    frame_counts: list[int],
    height: int = 64,
    width: int = 96,
    per_shard: int = 4,
    garbage_at: int = 1,
    truncated_at: int = 4,
    damaged_at: int | None = None,
    seed: int = 0,
) -> TestShards:
    """Like `make_test_shards`, but the mp4 of sample `garbage_at` is random bytes, the mp4 of sample
    `truncated_at` is the first third of a valid file (its index lost), and 2000 bytes of the frame data of sample
    `damaged_at` (index first, so the file still opens) are overwritten with random bytes a third of the way in."""
    rng = np.random.default_rng(seed)
    videos = []
    for i, n in enumerate(frame_counts):
        mp4 = encode(synthetic_frames(n, height, width, seed + i), faststart=i == damaged_at)
        valid = True
        if i == garbage_at:
            mp4, valid = rng.integers(0, 256, size=len(mp4), dtype=np.uint8).tobytes(), False
        elif i == truncated_at:
            mp4, valid = mp4[: len(mp4) // 3], False
        elif i == damaged_at:
            at = len(mp4) // 3
            mp4 = mp4[:at] + rng.integers(0, 256, size=2000, dtype=np.uint8).tobytes() + mp4[at + 2000 :]
            valid = False
        videos.append(TestVideo(f"vid{i:04d}", mp4, n, i % 3, valid=valid))
    return write_shards(directory, videos, per_shard)


# -- shared, lazily built shard sets (one temporary directory per test process) ---------------------------------
_ROOT: str | None = None
_CACHE: dict[str, TestShards] = {}
TRAIN_FRAME_COUNTS = [40, 60, 20, 33, 50, 9, 63, 45, 30, 55, 12, 27]  # 3 shorter than 4 x 4 frames


def _root() -> str:
    global _ROOT
    if _ROOT is None:
        import atexit
        import shutil

        _ROOT = tempfile.mkdtemp(prefix="pipeline-test-shards-")
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    return _ROOT


def cached(name: str, build) -> TestShards:
    """Build a shard set once per process under a private temporary directory; a pre-built copy of it in
    $PIPELINE_TEST_SHARDS (OUT/name/manifest.json) is copied there instead (nothing encoded)."""
    if name not in _CACHE:
        directory = os.path.join(_root(), name)
        prebuilt = os.path.join(os.environ.get(PREBUILT_ENV) or "", name)
        if os.environ.get(PREBUILT_ENV) and os.path.isfile(os.path.join(prebuilt, fmt.MANIFEST_NAME)):
            import shutil

            # a fresh directory each time: the cache may have been emptied (tests do) after a build of `name`
            directory = os.path.join(tempfile.mkdtemp(prefix="prebuilt-", dir=_root()), name)
            shutil.copytree(prebuilt, directory)
            _CACHE[name] = load_test_shards(directory)
        else:
            _CACHE[name] = build(directory)
    return _CACHE[name]


def load_test_shards(directory: str | os.PathLike) -> TestShards:
    """A shard set written by `write_shards`, read back: every sample's members, cuts table, label and frame count
    from its tars (the manifest's order of shards and samples)."""
    directory = Path(directory)
    manifest = json.loads((directory / fmt.MANIFEST_NAME).read_text())
    tars, videos = [], []
    for entry in manifest["shards"]:
        tar_path = directory / entry["tar"]
        tars.append(str(tar_path))
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, parts in samples.items():
            meta = json.loads(parts[fmt.META_EXT])
            container = fmt.IVF_EXT if any(ext.endswith(fmt.IVF_EXT) for ext in parts) else "mp4"
            members = [parts[ext] for ext in fmt.video_exts(meta.get("phases", 1), container)]
            videos.append(
                TestVideo(
                    key,
                    members[0],
                    meta["num_frames"],
                    meta["label"],
                    sample_id=meta["sample_id"],
                    phase_mp4s=members if len(members) > 1 else None,
                    container=container,
                    cuts=parts.get(fmt.CUTS_EXT),
                )
            )
    return TestShards(str(directory), tars, videos, {v.sample_id: v for v in videos})


def prebuild(out: str | os.PathLike, specs: list[str]) -> list[TestShards]:
    """Each set of `specs` ("function:arg:...", e.g. "gpu_train_shards:4:ivf"; integer arguments as digits) made by
    that function of this module, then copied to OUT/<its cache name> (temporary name, then renamed)."""
    import shutil

    made = []
    for spec in specs:
        name, *args = spec.split(":")
        shards = globals()[name](*(int(a) if a.isdigit() else a for a in args))
        target = Path(out) / Path(shards.directory).name
        partial = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(shards.directory, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        made.append(shards)
    return made


def train_shards(phases: int = 1, container: str = "ivf") -> TestShards:
    """12 VP9 videos of 64x96, 9..63 frames, 4 per shard (3 shards), in `phases` stride phases of `container`."""
    return cached(
        f"train-p{phases}-{container}",
        lambda d: make_test_shards(
            d, TRAIN_FRAME_COUNTS, height=64, width=96, per_shard=4, phases=phases, container=container
        ),
    )


def eval_shards(phases: int = 1, container: str = "ivf") -> TestShards:
    """5 VP9 videos of 48x80 (short side 48: eval views at input_size 48 need no resampling), 2 per shard."""
    return cached(
        f"eval-p{phases}-{container}",
        lambda d: make_test_shards(
            d,
            [40, 25, 63, 17, 33],
            height=48,
            width=80,
            per_shard=2,
            split="val",
            seed=100,
            phases=phases,
            container=container,
        ),
    )


def gpu_train_shards(phases: int = 1, container: str = "ivf") -> TestShards:
    """The GPU tests' training set: NVDEC decodes VP9 only from 128x128 up (H100: "Video is too small ...
    supported: 128x128"), so 128x160, else as `train_shards`."""
    return cached(
        f"gpu_train_p{phases}_{container}",
        lambda d: make_test_shards(
            d, TRAIN_FRAME_COUNTS, height=128, width=160, per_shard=4, phases=phases, container=container
        ),
    )


def gpu_eval_shards(container: str = "ivf") -> TestShards:
    """The GPU tests' eval set: 5 videos of 128x176, 2 per shard."""
    return cached(
        f"gpu_eval_{container}",
        lambda d: make_test_shards(
            d, [40, 25, 63, 17, 33], height=128, width=176, per_shard=2, split="val", seed=100, container=container
        ),
    )


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python tests/pipeline_shards.py OUT SET... (SET: e.g. gpu_train_shards:4:ivf)")
    for made in prebuild(sys.argv[1], sys.argv[2:]):
        print(f"{made.directory} -> {sys.argv[1]}: {len(made.videos)} videos")
