"""`shards.synth --style objects`: deterministic per seed, smooth (no per-pixel noise, unlike the texture style), and
its classes are motions, found from the pixels."""

from __future__ import annotations

import csv

import av
import numpy as np
import pytest

from shards.synth import MOTIONS, main, render_video
from shards.synth_objects import OBJECT_MOTIONS, render_objects

SIZE = dict(num_frames=24, height=48, width=64)


def test_deterministic_per_seed():
    a, _ = render_objects("orbit", 7, **SIZE)
    b, _ = render_objects("orbit", 7, **SIZE)
    c, _ = render_objects("orbit", 8, **SIZE)
    assert a.dtype == np.uint8 and a.shape == (24, 48, 64, 3)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5  # another seed: another video


def _roughness(frames: np.ndarray) -> float:
    """Mean |discrete Laplacian| over pixels and channels, in grey levels: ~0 for smooth images, large for noise."""
    f = frames.astype(np.float64)
    lap = 4 * f[:, 1:-1, 1:-1] - f[:, :-2, 1:-1] - f[:, 2:, 1:-1] - f[:, 1:-1, :-2] - f[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def test_smooth_no_pixel_noise():
    """Every objects video is smooth in space (blob curvature and rounding only); the texture style is not."""
    for seed in range(3):
        for name in OBJECT_MOTIONS:
            frames, _ = render_objects(name, seed, **SIZE)
            assert _roughness(frames) < 2.5, (name, seed, _roughness(frames))  # blob curvature + rounding
    textured, _ = render_video(MOTIONS[0], 0, **SIZE)
    assert _roughness(textured) > 10  # the reference: this measure does see pixel noise and textures


def _object(name: str, seed: int) -> np.ndarray:
    """float[T, H, W]: where the first blob is, from pixels: |video with it - background alone| summed over RGB."""
    one, _ = render_objects(name, seed, num_blobs=1, **SIZE)
    background, _ = render_objects(name, seed, num_blobs=0, **SIZE)
    return np.abs(one.astype(np.float64) - background.astype(np.float64)).sum(-1)


def _shift(a: np.ndarray, b: np.ndarray, reach: int = 20) -> tuple[int, int]:
    """(dx, dy) on the torus that best moves image a onto image b (np.roll, the frame wraps as the synth does)."""
    best = max(
        ((dx, dy) for dx in range(-reach, reach + 1) for dy in range(-reach, reach + 1)),
        key=lambda s: float((np.roll(a, s, axis=(1, 0)) * b).sum()),
    )
    return best


def _centroid(m: np.ndarray) -> np.ndarray:
    """(x, y) centre of mass on the torus (circular means: the blob may straddle the frame's edge)."""
    out = []
    for axis, size in ((1, m.shape[1]), (0, m.shape[0])):
        angle = 2 * np.pi * np.arange(size) / size
        weight = m.sum(axis=1 - axis)
        out.append(np.arctan2((weight * np.sin(angle)).sum(), (weight * np.cos(angle)).sum()) * size / (2 * np.pi))
    return np.array(out)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", OBJECT_MOTIONS)
def test_classes_differ_in_motion(name, seed):
    obj = _object(name, seed)
    dx, dy = _shift(obj[0], obj[4])  # 4 frames apart, as the demo's stride
    if name.startswith("move"):
        axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[name.split()[1]]
        along, across = (dx, dy) if axis == 0 else (dy, dx)
        assert sign * along >= 3 and abs(across) <= 0.5 * abs(along), (dx, dy)
    elif name == "orbit":
        # the blob stays near its hub; successive steps turn clockwise on screen (y down: positive cross product)
        path = np.array([_centroid(obj[t]) for t in range(0, 24, 2)])
        steps = np.diff(path, axis=0)
        steps = (steps + np.array([SIZE["width"], SIZE["height"]]) / 2) % np.array([SIZE["width"], SIZE["height"]])
        steps -= np.array([SIZE["width"], SIZE["height"]]) / 2  # unwrapped across the edge
        cross = steps[:-1, 0] * steps[1:, 1] - steps[:-1, 1] * steps[1:, 0]
        assert (cross > 0).mean() > 0.8, cross
        assert np.linalg.norm(steps, axis=1).mean() > 1  # it moves (2 px per 2 frames at 48 px)
    else:  # pulse: in place, its size changing by more than 2x
        mass = obj.sum(axis=(1, 2))
        assert mass.max() > 2 * mass.min()
        assert abs(dx) <= 1 and abs(dy) <= 1


def test_cli_writes_the_objects_dataset(tmp_path):
    argv = ["--out", str(tmp_path), "--style", "objects", "--classes", "4", "--per-class", "1", "--val-per-class", "1"]
    assert main([*argv, "--size", "64x48", "--frames", "24", "--seed", "3"]) == 0
    assert (tmp_path / "classes.txt").read_text().splitlines() == sorted(OBJECT_MOTIONS[:4])
    with open(tmp_path / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["label"] for r in rows) == sorted(OBJECT_MOTIONS[:4])
    r = rows[0]
    stem = f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}"
    path = tmp_path / "train" / r["label"] / f"{stem}.mp4"
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 24 and frames[0].shape == (48, 64, 3)
    assert main(["--out", str(tmp_path / "x"), "--style", "objects", "--classes", "7"]) == 1  # only 6 motions
