"""The "objects" style of `shards.synth`: smooth content whose masked tubes can be predicted from the visible ones.

Every video shows two soft Gaussian blobs over a linear colour gradient. There is no per-pixel noise and no
texture, so every tubelet is a smooth function of a few numbers (gradient direction and colours, blob centre, size
and colour) that the visible tubelets reveal: VideoMAE's normalized-pixel target is predictable, unlike the
"texture" style's random blocks and pixel noise, which per-tubelet normalization turns into unpredictable targets.

The class is the motion, continued over the whole video so that a clip starting at any frame shows it:
translation (wrapping around the frame's edge, so the blob never leaves), a clockwise orbit on a small circle, or
pulsing (the blob grows and shrinks periodically in place). Nuisance variation per video: gradient direction and
colours, blob colour, size and start position, speed, orbit radius and phase, pulse period.

The background gradient spans at least 70 grey levels in every channel across the frame, so even a 16 px patch
of plain background carries a ramp well above codec noise once normalized.
"""

from __future__ import annotations

import math

import numpy as np

# Ordered so that the first two are a mirror pair; the demo uses the first 4.
OBJECT_MOTIONS = ("move right", "move left", "orbit", "pulse", "move down", "move up")
NUM_BLOBS = 2


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


def object_track(
    name: str, rng: np.random.Generator, num_frames: int, height: int, width: int
) -> dict[str, np.ndarray]:
    """Per-frame blob pose: `center` float[T, 2] (x, y pixels, before wrapping), `sigma` float[T] (pixels)."""
    if name not in OBJECT_MOTIONS:
        raise ValueError(f"unknown object motion {name!r}; expected one of {OBJECT_MOTIONS}")
    short = min(height, width)
    t = np.arange(num_frames, dtype=np.float64)
    start = np.array([rng.uniform(0, 1) * width, rng.uniform(0.2, 0.8) * height])
    center = np.repeat(start[None], num_frames, axis=0)
    sigma = np.full(num_frames, rng.uniform(0.10, 0.14) * short)
    speed = rng.uniform(0.018, 0.028) * short  # pixels per frame: 7-11 px between frames 4 apart at 96 px
    if name in ("move right", "move left", "move down", "move up"):
        axis = 0 if name in ("move right", "move left") else 1
        sign = 1.0 if name in ("move right", "move down") else -1.0
        center[:, axis] += sign * speed * t
        center[:, 1 - axis] += rng.uniform(-0.15, 0.15) * speed * t  # a slight slant: not pure axes
    elif name == "orbit":  # clockwise on screen (y down): the angle grows
        radius = rng.uniform(0.12, 0.18) * short
        omega = speed / radius  # about 0.15 rad per frame: a clip of 13 frames turns ~2 rad, a visible curve
        phase = rng.uniform(0, 2 * math.pi)
        center = start + radius * np.stack([np.cos(phase + omega * t), np.sin(phase + omega * t)], axis=1)
    else:  # pulse: the size oscillates in place, between ~0.5x and ~1.5x
        period = rng.uniform(16, 28)
        sigma = sigma * (1 + 0.5 * np.sin(2 * math.pi * t / period + rng.uniform(0, 2 * math.pi)))
    return {"center": center, "sigma": sigma}


def render_objects(
    name: str, seed: int, num_frames: int = 64, height: int = 96, width: int = 128, num_blobs: int = NUM_BLOBS
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8[T, H, W, 3] RGB frames of one "objects" video of motion `name` and the first blob's `object_track`;
    a pure function of the arguments. Translations wrap around the frame (a torus): distances are taken on the
    torus, which keeps every frame smooth across the edge. `num_blobs` < NUM_BLOBS draws the same video with only
    the first blobs (0: the background alone; tests find the objects from pixels this way)."""
    rng = np.random.default_rng(seed)
    background = _gradient(rng, height, width)
    blobs = []
    for _ in range(NUM_BLOBS):  # each with its own colour, size, start and speed; all move as the class says
        colour = _blob_colour(rng, background).astype(np.float32)
        blobs.append((colour, rng.uniform(0.85, 1.0), object_track(name, rng, num_frames, height, width)))
    blobs = blobs[:num_blobs]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        frame = background.copy()
        for colour, strength, track in blobs:
            cx, cy = track["center"][i][0] % width, track["center"][i][1] % height
            s = float(track["sigma"][i])
            dx = np.minimum(np.abs(xx - cx), width - np.abs(xx - cx))  # distance on the torus
            dy = np.minimum(np.abs(yy - cy), height - np.abs(yy - cy))
            alpha = (strength * np.exp(-(dx * dx + dy * dy) / (2 * s * s)))[..., None]
            frame = frame * (1 - alpha) + colour * alpha
        frames[i] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
    return frames, blobs[0][2] if blobs else {}
