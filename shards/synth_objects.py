"""The "objects" style of `shards.synth`: smooth content whose masked tubes can be predicted from the visible ones.

Every video shows three soft Gaussian blobs over a linear colour gradient. There is no per-pixel noise and no
texture, so every tubelet is a smooth function of a few numbers (gradient direction and colours, blob centres,
sizes and colours) that the visible tubelets reveal: VideoMAE's normalized-pixel target is predictable, unlike the
"texture" style's random blocks and pixel noise, which per-tubelet normalization turns into unpredictable targets.

The class is the motion of the blob layer, continued over the whole video so that a clip starting at any frame
shows it: translation (wrapping around the frame's edge: blobs leave on one side and come back on the other), a
clockwise turn about the frame's centre ("orbit"), or pulsing (every blob grows and shrinks in step, in place).
All blobs of a video move by the same law and speed, so every part of the frame shows the class. Nuisance
variation per video: gradient direction and colours, blob colours, sizes and positions, speed, slant, pulse period
and phase.

The background gradient spans at least 70 grey levels in every channel across the frame, so even a 16 px patch
of plain background carries a ramp well above codec noise once normalized.
"""

from __future__ import annotations

import math

import numpy as np

# The demo uses the first 4: the four directions of translation, told apart by the direction of motion alone (the
# first two are a mirror pair: no horizontal flip in training; the next two a vertical one).
OBJECT_MOTIONS = ("move right", "move left", "move down", "move up", "orbit", "pulse")
NUM_BLOBS = 3


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32[H, W, 3]: a linear ramp between two colours, in a random direction; every channel spans >= 70."""
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx - width / 2) * math.cos(angle) + (yy - height / 2) * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)  # 0 .. 1 across the frame
    low = rng.uniform(15, 110, size=3)
    high = low + rng.uniform(70, 130, size=3)
    return (low + ramp[..., None] * (high - low)).astype(np.float32)


def _blob_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """float[3]: a colour at least 90 levels (Euclidean) away from the background's mean."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(100):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - mean) >= 90:
            return colour
    return 255.0 - mean  # unreachable in practice: the opposite colour


def object_tracks(
    name: str, rng: np.random.Generator, num_blobs: int, num_frames: int, height: int, width: int
) -> dict[str, np.ndarray]:
    """Per-frame blob poses: `center` float[T, K, 2] (x, y pixels, before wrapping), `sigma` float[T, K] (pixels).

    All K blobs move by one law (the class) with one set of parameters per video, as a layer over the background:
    every part of the frame shows the class's motion, and its speed is shared."""
    if name not in OBJECT_MOTIONS:
        raise ValueError(f"unknown object motion {name!r}; expected one of {OBJECT_MOTIONS}")
    short = min(height, width)
    t = np.arange(num_frames, dtype=np.float64)[:, None]  # [T, 1]
    hub = np.array([width, height]) / 2
    # start positions: anywhere for translations (they wrap), else on a ring around the centre that stays inside
    radius = rng.uniform(0.15, 0.42, size=num_blobs) * short
    angle0 = rng.uniform(0, 2 * math.pi, size=num_blobs)
    ring = hub + radius[:, None] * np.stack([np.cos(angle0), np.sin(angle0)], axis=1)  # [K, 2]
    sigma = np.repeat(rng.uniform(0.072, 0.108, size=num_blobs)[None] * short, num_frames, axis=0)
    # pixels per frame: 14-22 px between frames 4 apart at 96 px. The demo with blobs half as fast and 1/0.9 as large
    # (tube masks, 1200 steps) gained only 4 probe points over a random encoder (README Quickstart, 2026-12-06)
    speed = rng.uniform(0.036, 0.056) * short
    if name.startswith("move "):
        start = rng.uniform(0, 1, size=(num_blobs, 2)) * np.array([width, height])
        axis = 0 if name in ("move right", "move left") else 1
        sign = 1.0 if name in ("move right", "move down") else -1.0
        velocity = np.zeros(2)
        velocity[axis] = sign * speed
        velocity[1 - axis] = rng.uniform(-0.15, 0.15) * speed  # a slight slant: directions are not pure axes
        center = start[None] + t[..., None] * velocity
    elif name == "orbit":  # the layer turns clockwise on screen (y down: the angle grows) about the frame's centre
        omega = speed / (0.3 * short)  # ~0.12-0.19 rad per frame
        angle = angle0[None] + omega * t  # [T, K]
        center = hub + radius[None, :, None] * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    else:  # pulse: in place, every blob's size oscillates in step, between 0.5x and 1.5x
        period = rng.uniform(16, 28)
        sigma = sigma * (1 + 0.5 * np.sin(2 * math.pi * t / period + rng.uniform(0, 2 * math.pi)))
        center = np.repeat(ring[None], num_frames, axis=0)
    return {"center": center, "sigma": sigma}


def render_objects(
    name: str, seed: int, num_frames: int = 64, height: int = 96, width: int = 128, num_blobs: int = NUM_BLOBS
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8[T, H, W, 3] RGB frames of one "objects" video of motion `name` and its `object_tracks` (all blobs);
    a pure function of the arguments. Translations wrap around the frame (a torus): distances are taken on the
    torus, which keeps every frame smooth across the edge. `num_blobs` < NUM_BLOBS draws the same video with only
    the first blobs (0: the background alone; tests find the objects from pixels this way)."""
    rng = np.random.default_rng(seed)
    background = _gradient(rng, height, width)
    colours = [_blob_colour(rng, background).astype(np.float32) for _ in range(NUM_BLOBS)]
    strengths = rng.uniform(0.85, 1.0, size=NUM_BLOBS)
    tracks = object_tracks(name, rng, NUM_BLOBS, num_frames, height, width)
    ys, xs = np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        frame = background.copy()
        for k in range(num_blobs):
            cx, cy = tracks["center"][i, k, 0] % width, tracks["center"][i, k, 1] % height
            s2 = np.float32(2 * tracks["sigma"][i, k] ** 2)
            dx = np.minimum(np.abs(xs - cx), width - np.abs(xs - cx))  # distances on the torus
            dy = np.minimum(np.abs(ys - cy), height - np.abs(ys - cy))
            # the Gaussian is separable: an outer product of two 1-D profiles
            alpha = (np.float32(strengths[k]) * np.outer(np.exp(-dy * dy / s2), np.exp(-dx * dx / s2)))[..., None]
            frame = frame * (1 - alpha) + colours[k] * alpha
        frames[i] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
    return frames, tracks
