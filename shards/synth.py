"""`python -m shards.synth`: a small labelled video dataset in the Kinetics layout, whose classes differ by motion.

    python -m shards.synth --out data/synth --classes 4 --per-class 8 --seed 0

writes

    OUT/train/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4   (H.264 like the Kinetics downloads)
    OUT/val/<label>/...
    OUT/train.csv, OUT/val.csv   official Kinetics columns: label,youtube_id,time_start,time_end,split
    OUT/classes.txt              the class names, one per line, in index order (sorted)

Every video shows one textured rectangle over a textured background, both drawn at random per video (texture,
colours, size, orientation, position). Its class is only the motion: direction of travel, sense of rotation, zoom
in or out, and speed. Each class has a mirror class (left/right, clockwise/anticlockwise, in/out) whose single
frames follow the same distribution, so one frame cannot tell them apart; a model has to compare frames over time.
Frames are made with numpy (`render_video`) and piped into ffmpeg as raw RGB.

`--style objects` (`shards.synth_objects`) draws smooth content instead: soft blobs over a colour gradient, no
texture and no pixel noise, so that masked tubes can be predicted from visible ones (the demo's data); its classes
are `OBJECT_MOTIONS` (move right / left / down / up, orbit, pulse). The default "texture" style is the benchmarks'
data.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.format import atomic_write
from shards.inputs import kinetics_stem
from shards.synth_objects import OBJECT_MOTIONS, render_objects
from shards.transcode import ffmpeg_exe


@dataclass(frozen=True)
class Motion:
    name: str
    kind: str  # "translate", "rotate", "zoom"
    sign: float = 1.0  # direction: +x/+y for translate (image axes: y down), clockwise on screen, zoom in
    axis: int = 0  # translate: 0 horizontal, 1 vertical
    fast: bool = False


# Ordered so that the first K classes come in mirror pairs (same single-frame statistics).
MOTIONS = (
    Motion("move right", "translate", +1, 0),
    Motion("move left", "translate", -1, 0),
    Motion("rotate clockwise", "rotate", +1),
    Motion("rotate counterclockwise", "rotate", -1),
    Motion("zoom in", "zoom", +1),
    Motion("zoom out", "zoom", -1),
    Motion("move down", "translate", +1, 1),
    Motion("move up", "translate", -1, 1),
    Motion("move right fast", "translate", +1, 0, fast=True),
    Motion("move left fast", "translate", -1, 0, fast=True),
    Motion("rotate clockwise fast", "rotate", +1, fast=True),
    Motion("rotate counterclockwise fast", "rotate", -1, fast=True),
)
STYLES = ("texture", "objects")
_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32[h, w, 3] in 0..255: random blocks, stripes or checks in a few random colours."""
    palette = rng.uniform(0, 255, size=(4, 3))
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:
        cell = int(rng.integers(3, 7))
        idx = rng.integers(0, 4, size=(h // cell + 1, w // cell + 1))[yy // cell, xx // cell]
    elif kind == 1:
        period = rng.uniform(4, 9)
        angle = rng.uniform(0, np.pi)
        idx = ((xx * np.cos(angle) + yy * np.sin(angle)) // period).astype(int) % 4
    else:
        cell = int(rng.integers(3, 6))
        idx = ((yy // cell + xx // cell) % 2) * 2 + (rng.random((h, w)) < 0.15)
    return palette[idx].astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32[h, w, 3]: a smooth random colour field plus fine noise, different for every video."""
    coarse = rng.uniform(20, 235, size=(4, 5, 3)).astype(np.float32)
    ys = np.linspace(0, 3, h)
    xs = np.linspace(0, 4, w)
    y0, x0 = np.minimum(ys.astype(int), 2), np.minimum(xs.astype(int), 3)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    field = (
        (1 - fy) * (1 - fx) * coarse[y0][:, x0]
        + (1 - fy) * fx * coarse[y0][:, x0 + 1]
        + fy * (1 - fx) * coarse[y0 + 1][:, x0]
        + fy * fx * coarse[y0 + 1][:, x0 + 1]
    )
    return field + rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)


def motion_track(
    motion: Motion, rng: np.random.Generator, num_frames: int, height: int, width: int
) -> dict[str, np.ndarray]:
    """Per-frame object pose: `center` float[T, 2] (x, y pixels), `angle` float[T] (radians, clockwise on screen),
    `scale` float[T] (object height in pixels)."""
    t = np.arange(num_frames, dtype=np.float64) / max(num_frames - 1, 1) - 0.5  # -0.5 .. 0.5
    short = min(height, width)
    center0 = np.array([width, height]) / 2 + rng.uniform(-0.12, 0.12, size=2) * np.array([width, height])
    center = np.repeat(center0[None], num_frames, axis=0)
    angle = np.full(num_frames, rng.uniform(0, 2 * np.pi))
    scale = np.full(num_frames, rng.uniform(0.32, 0.45) * short)
    if motion.kind == "translate":
        span = (width, height)[motion.axis]
        travel = rng.uniform(0.75, 0.95) if motion.fast else rng.uniform(0.3, 0.5)
        center[:, motion.axis] += motion.sign * travel * span * t
    elif motion.kind == "rotate":
        turn = math.radians(rng.uniform(330, 420) if motion.fast else rng.uniform(100, 170))
        angle = angle + motion.sign * turn * t
    else:
        factor = math.log(rng.uniform(2.5, 3.2) if motion.fast else rng.uniform(1.6, 2.1))
        scale = scale * np.exp(motion.sign * factor * t)
    return {"center": center, "angle": angle, "scale": scale}


def render_video(
    motion: Motion, seed: int, num_frames: int = 64, height: int = 120, width: int = 160, black_background: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8[T, H, W, 3] RGB frames of one video and its `motion_track`; a pure function of the arguments.

    `black_background` draws the same video over black (tests use it to find the object from pixels)."""
    rng = np.random.default_rng(seed)
    background = _background(rng, height, width)
    if black_background:
        background = np.zeros_like(background)
    tex_h, tex_w = 32, 48  # the object is a 1.5:1 rectangle, so its orientation is visible
    texture = _texture(rng, tex_h, tex_w)
    track = motion_track(motion, rng, num_frames, height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        cx, cy = track["center"][i]
        a, s = track["angle"][i], track["scale"][i]
        dx, dy = xx - cx, yy - cy
        # Inverse rotation maps a screen pixel into the object's frame (u along its long side).
        u = (np.cos(a) * dx + np.sin(a) * dy) / s
        v = (-np.sin(a) * dx + np.cos(a) * dy) / s
        inside = (np.abs(u) < 0.75) & (np.abs(v) < 0.5)
        tu = np.clip(((u / 1.5 + 0.5) * tex_w).astype(np.int32), 0, tex_w - 1)
        tv = np.clip(((v + 0.5) * tex_h).astype(np.int32), 0, tex_h - 1)
        frame = np.where(inside[..., None], texture[tv, tu], background)
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames, track


def encode_h264(frames: np.ndarray, path: Path, fps: float) -> None:
    """Encode uint8[T, H, W, 3] as an H.264 MP4 at `path` (temp name, then rename)."""
    t, h, w, _ = frames.shape

    def encode(tmp: str) -> None:
        cmd = [
            ffmpeg_exe(),
            "-nostdin",
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
            f"{fps:g}",
            "-i",
            "-",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "18",
            "-pix_fmt",
            "yuv420p",
            "-threads",
            "1",
            "-f",
            "mp4",
            tmp,
        ]
        proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace').strip()}")

    atomic_write(path, encode)


def _youtube_ids(rng: np.random.Generator, n: int) -> list[str]:
    ids: list[str] = []
    seen = set()
    while len(ids) < n:
        candidate = "".join(rng.choice(_ID_ALPHABET, size=11))
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def make_dataset(
    out: str | os.PathLike,
    num_classes: int = 4,
    per_class: int = 8,
    val_per_class: int | None = None,
    seed: int = 0,
    width: int = 160,
    height: int = 120,
    num_frames: int = 64,
    fps: float = 25.0,
    workers: int | None = None,
    style: str = "texture",
) -> dict:
    """Write the dataset (see module docstring); returns a summary {classes, train, val, seconds}.
    style: "texture" (textured rectangles, the default) or "objects" (smooth blobs, `shards.synth_objects`)."""
    if style not in STYLES:
        raise ValueError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")
    names = [m.name for m in MOTIONS] if style == "texture" else list(OBJECT_MOTIONS)
    if not 1 <= num_classes <= len(names):
        raise ValueError(f"--classes must be 1..{len(names)} for style {style}, got {num_classes}")
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even, got {width}x{height}")
    started = time.perf_counter()
    val_per_class = max(1, per_class // 4) if val_per_class is None else val_per_class
    out = Path(out)
    motions = names[:num_classes]
    rng = np.random.default_rng(seed)
    jobs = []  # (split, motion, video seed, youtube_id, start)
    counts = {"train": per_class, "val": val_per_class}
    ids = iter(_youtube_ids(rng, num_classes * (per_class + val_per_class)))
    for split, n in counts.items():
        for motion in motions:
            for _ in range(n):
                jobs.append((split, motion, int(rng.integers(2**31)), next(ids), int(rng.integers(0, 290))))

    def make(job) -> dict:
        split, motion, video_seed, youtube_id, start = job
        folder = out / split / motion
        folder.mkdir(parents=True, exist_ok=True)
        if style == "objects":
            frames, _ = render_objects(motion, video_seed, num_frames, height, width)
        else:
            frames, _ = render_video(MOTIONS[names.index(motion)], video_seed, num_frames, height, width)
        encode_h264(frames, folder / f"{kinetics_stem(youtube_id, start, start + 10)}.mp4", fps)
        return {
            "label": motion,
            "youtube_id": youtube_id,
            "time_start": start,
            "time_end": start + 10,
            "split": split,
        }

    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(make, jobs))
    for split in counts:
        split_rows = sorted((r for r in rows if r["split"] == split), key=lambda r: (r["label"], r["youtube_id"]))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
        writer.writeheader()
        writer.writerows(split_rows)
        atomic_write(out / f"{split}.csv", text.getvalue())
    classes = sorted(motions)
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return {
        "classes": classes,
        "train": num_classes * per_class,
        "val": num_classes * val_per_class,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--classes", type=int, default=4, help=f"number of motion classes, 1..{len(MOTIONS)} (objects: 1..6; default 4)"
    )
    p.add_argument(
        "--style",
        choices=STYLES,
        default="texture",
        help="texture: textured rectangles, pixel noise (default; the benchmarks' data); objects: smooth blobs "
        "over a gradient, predictable masked tubes (meant for the demo)",
    )
    p.add_argument("--per-class", type=int, default=8, help="train videos per class (default 8)")
    p.add_argument("--val-per-class", type=int, default=None, help="val videos per class (default per-class/4)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--size", default="160x120", help="WIDTHxHEIGHT, even numbers (default 160x120)")
    p.add_argument("--frames", type=int, default=64, help="frames per video (default 64)")
    p.add_argument("--fps", type=float, default=25.0, help="(default 25)")
    p.add_argument("--workers", type=int, default=None, help="parallel encoders (default min(4, cpus))")
    args = p.parse_args(argv)
    try:
        width, height = (int(x) for x in args.size.lower().split("x"))
        summary = make_dataset(
            args.out,
            args.classes,
            args.per_class,
            args.val_per_class,
            args.seed,
            width,
            height,
            args.frames,
            args.fps,
            args.workers,
            args.style,
        )
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"synth: {summary['train']} train + {summary['val']} val videos, {len(summary['classes'])} classes "
        f"({', '.join(summary['classes'])}) in {summary['seconds']:.1f} s -> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
