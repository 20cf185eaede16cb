"""The VideoMAE-style baselines `bench.bench_pipeline` measures our pipeline against: the same pretraining batches
(16 frames at stride 4 from VideoMAE's sampling, its multi-scale crop to 224, ImageNet normalization, a 90 % tube
mask, K views per decoded clip) from the same tar shards (the `webdataset` package), decoded and augmented per
sample in Python/torch:

  decord      VideoMAE's own loader: decord's VideoReader (one thread) in torch DataLoader worker processes
  torchcodec  PyTorch's decoder (`torchcodec.decoders.VideoDecoder`, seek_mode "approximate", one FFmpeg thread
              per video) in a thread pool of the training process: it releases the GIL, so threads replace worker
              processes (no pickling of clips between processes). Needs FFmpeg's shared libraries 4-8 on the
              machine (e.g. Debian's libavcodec59 ...); reported as unavailable in one line otherwise.

Both read the tars' single video member (timeline order, MP4 or IVF), as VideoMAE reads a video file.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
BASELINES = ("decord", "torchcodec")


def official_indices(n: int, t: int, stride: int, rng: np.random.Generator) -> list[int]:
    """VideoMAE's pretraining sampling (VideoMAE._sample_train_indices / _video_TSN_decord_batch_loader)."""
    skip = t * stride
    offset = int(rng.integers(n - skip + 1)) + 1 if n - skip + 1 > 0 else 1
    out = []
    for _ in range(t):
        out.append(offset - 1)
        if offset + stride < n:
            offset += stride
    return out


def multiscale_crop(h: int, w: int, size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """GroupMultiScaleCrop._sample_crop_size (scales 1, .875, .75, .66, max_distort 1, more_fix_crop)."""
    base = min(w, h)
    sizes = [int(base * s) for s in (1, 0.875, 0.75, 0.66)]
    sizes = [size if abs(s - size) < 3 else s for s in sizes]
    pairs = [(sizes[j], sizes[i]) for i in range(4) for j in range(4) if abs(i - j) <= 1]
    cw, ch = pairs[int(rng.integers(len(pairs)))]
    ws, hs = (w - cw) // 4, (h - ch) // 4
    offsets = [
        (0, 0),
        (4 * ws, 0),
        (0, 4 * hs),
        (4 * ws, 4 * hs),
        (2 * ws, 2 * hs),
        (0, 2 * hs),
        (4 * ws, 2 * hs),
        (2 * ws, 4 * hs),
        (2 * ws, 0),
        (ws, hs),
        (3 * ws, hs),
        (ws, 3 * hs),
        (3 * ws, 3 * hs),
    ]
    ox, oy = offsets[int(rng.integers(len(offsets)))]
    return oy, ox, ch, cw


def tube_mask(t: int, size: int, patch: int, tubelet: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """TubeMaskingGenerator: int(ratio * tokens per slot) masked, the same pattern in every temporal slot."""
    per_slot = (size // patch) ** 2
    masked = int(ratio * per_slot)
    pattern = np.hstack([np.zeros(per_slot - masked), np.ones(masked)])
    rng.shuffle(pattern)
    return np.tile(pattern, (t // tubelet, 1)).flatten().astype(bool)


def augment_views(
    clip: torch.Tensor, repeats: int, size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """K pretraining views of one decoded clip, as VideoMAE makes them: `clip` uint8 or float [C, T, H, W] in
    0..255 -> (float[K, C, T, size, size] normalized, bool[K, N] tube masks)."""
    clip = clip.float()
    t = clip.shape[1]
    views, masks = [], []
    for _ in range(repeats):
        y0, x0, h, w = multiscale_crop(clip.shape[2], clip.shape[3], size, rng)
        crop = clip[:, :, y0 : y0 + h, x0 : x0 + w].transpose(0, 1)  # [T, C, h, w]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True).transpose(
            0, 1
        )
        views.append((crop / 255.0 - MEAN) / STD)
        masks.append(torch.from_numpy(tube_mask(t, size, 16, 2, 0.9, rng)))
    return torch.stack(views), torch.stack(masks)


def _samples(tars: list[str], seed: int, epoch: int, part: int = 0, parts: int = 1) -> Iterator[dict]:
    """The samples of one epoch: the tar list shuffled per epoch (the same order for every reader), then tars
    part::parts of it."""
    import webdataset as wds

    urls = list(tars)
    np.random.default_rng([seed, epoch]).shuffle(urls)
    yield from wds.WebDataset(urls[part::parts], shardshuffle=False, workersplitter=None, empty_check=False)


def _video(sample: dict) -> bytes:
    return sample.get("mp4", sample.get("ivf"))  # timeline order: one video member


class DecordClips(torch.utils.data.IterableDataset):
    """Pretraining samples from tar shards, decoded by decord and augmented per view in torch (CPU workers)."""

    def __init__(self, tars: list[str], t: int, stride: int, size: int, repeats: int, seed: int = 0):
        self.tars, self.t, self.stride, self.size, self.repeats, self.seed = tars, t, stride, size, repeats, seed

    def __iter__(self):
        import decord

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if worker >= len(self.tars):
            return  # fewer shards than workers: this worker has nothing to read
        rng = np.random.default_rng([self.seed, worker])
        epoch = 0
        while True:
            for sample in _samples(self.tars, self.seed, epoch, worker, workers):
                reader = decord.VideoReader(io.BytesIO(_video(sample)), num_threads=1)
                frames = reader.get_batch(official_indices(len(reader), self.t, self.stride, rng)).asnumpy()
                yield augment_views(torch.from_numpy(frames).permute(3, 0, 1, 2), self.repeats, self.size, rng)
            epoch += 1


def decord_batches(tars, batch_size, workers, repeats, t, stride, size, device):
    loader = torch.utils.data.DataLoader(
        DecordClips(tars, t, stride, size, repeats),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=lambda _: torch.set_num_threads(1),
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
    for video, mask in loader:
        yield {
            "video": video.to(device, non_blocking=True).flatten(0, 1),
            "mask": mask.to(device, non_blocking=True).flatten(0, 1),
        }


def torchcodec_available() -> str | None:
    """None when torchcodec decodes here, else why not (one line)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads FFmpeg's libraries)
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError/RuntimeError when FFmpeg's shared libraries are missing
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def torchcodec_batches(tars, batch_size, threads, repeats, t, stride, size, device, seed: int = 0):
    """Batches decoded by torchcodec on `threads` threads of this process, in sample order, at most 2 x threads
    samples in flight. Each sample's random draws come from its own generator (seeded by its position), so the
    result does not depend on which thread ran it."""
    from torchcodec.decoders import VideoDecoder

    torch.set_num_threads(1)  # one intra-op thread per decoding thread, as in a DataLoader worker

    def one(video: bytes, position: int):
        rng = np.random.default_rng([seed, position])
        decoder = VideoDecoder(video, seek_mode="approximate", num_ffmpeg_threads=1)
        indices = official_indices(decoder.metadata.num_frames, t, stride, rng)
        frames = decoder.get_frames_at(indices).data  # uint8[T, C, H, W]
        return augment_views(frames.permute(1, 0, 2, 3), repeats, size, rng)

    def positions():
        epoch, position = 0, 0
        while True:
            for sample in _samples(tars, seed, epoch):
                yield _video(sample), position
                position += 1
            epoch += 1

    with ThreadPoolExecutor(threads) as pool:
        feed, pending = positions(), collections.deque()
        while True:
            done = []
            while len(done) < batch_size:
                while len(pending) < 2 * threads:
                    pending.append(pool.submit(one, *next(feed)))
                done.append(pending.popleft().result())
            video, mask = torch.stack([v for v, _ in done]), torch.stack([m for _, m in done])
            yield {
                "video": video.to(device, non_blocking=True).flatten(0, 1),
                "mask": mask.to(device, non_blocking=True).flatten(0, 1),
            }


def baseline_batches(kind: str, tars, batch_size, n, repeats, t, stride, size, device):
    """Batches of baseline `kind` ("decord": n DataLoader workers, "torchcodec": n threads)."""
    if kind == "decord":
        return decord_batches(tars, batch_size, n, repeats, t, stride, size, device)
    return torchcodec_batches(tars, batch_size, n, repeats, t, stride, size, device)
