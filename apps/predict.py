"""`python -m apps.predict`: top-k labels for video files from a VideoMAE classifier, decoded by the pipeline.

    python -m apps.predict --checkpoint videomae-base-finetuned-kinetics/ a.mp4 b.webm      # 5 clips x 3 crops
    python -m apps.predict --checkpoint runs/ft/checkpoint-00004000.pt --single-view --json clips/*.mp4

`--checkpoint` is anything `model.load_pretrained` reads (a Hugging Face directory, an official `.pth`, one of our
checkpoints or a run directory: its latest checkpoint) holding a classifier. Files are read weights-only; one that
needs full unpickling (which can run code) is refused unless `--trust-pickle` says it comes from a trusted source.

How a video is read, so that prediction sees exactly what evaluation sees:
  1. the shard builder's own code transcodes each video (`shards.transcode.transcode`: the same ffmpeg command,
     short side 320 as the training shards, constant frame rate) and writes the results as one WebDataset shard
     with its DALI index and manifest (`shards.sink.sample_members`, `shards.writer.ShardWriter`; label -1) in a
     temporary directory. VP9 on the CPU (DALI's CPU decoder reads only VP8/VP9/MJPEG, so any codec ffmpeg reads
     works, H.264 included); H.264 on the GPU, which NVDEC reads and x264 encodes faster;
  2. `pipeline.build_loader(mode="eval")` decodes them with the model's num_frames / img_size: 5 clips x 3 crops
     (VideoMAE's test protocol), or 1 clip x 1 crop, the centre ones, with `--single-view`;
  3. the views go through the model in chunks (bf16 autocast on the GPU); the softmax is averaged per video
     (rows are matched to videos by `sample_id`, through the manifest's keys).

A bad input (missing, not a video, nothing decodable) gets one warning line on stderr naming it; the other videos
are still predicted, and the exit status is 1. The results alone go to stdout (text or `--json`), all else to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.runtime import autocast, pipeline_device, resolve_device
from shards.logs import configure_logging
from shards.ordered import ordered_window

DEFAULT_SHORT_SIDE = 320  # as the training shards (`shards.build --short-side`)
DEFAULT_STRIDE = 4  # VideoMAE's Kinetics sampling rate (SSv2 models use 2)
# CLI limits: far beyond any real setting, they stop absurd values (overflowing frame indices, out-of-memory
# batches) with a usage error instead of black frames or a crash deep in the pipeline
MAX_STRIDE = 64
MAX_SHORT_SIDE = 4096
SHARD_SPLIT = "predict"

log = logging.getLogger(__name__)


def load_classifier(checkpoint_or_model: str | os.PathLike | nn.Module, trust_pickle: bool = False) -> nn.Module:
    """A `VideoMAEClassifier` from a model or anything `load_pretrained` reads (`trust_pickle` as there); a clear
    error otherwise."""
    from model.loading import load_model_of_class
    from model.videomae import VideoMAEClassifier

    return load_model_of_class(
        checkpoint_or_model,
        VideoMAEClassifier,
        "classifier",
        "a pretraining checkpoint has no classification head; fine-tune it first",
        trust_pickle,
    )


# ---------------------------------------------------------------------------------------------------- shards
def _transcodes(videos: Sequence[str], settings, workers: int, workdir: str) -> Iterator[tuple[int, Any]]:
    """(input index, TranscodeResult) in input order. Threads suffice: ffmpeg runs in its own process, and
    threads (unlike the builder's spawned worker processes) do not re-import torch. At most 2 x workers results
    are held at once."""
    from shards.transcode import transcode

    with ThreadPoolExecutor(max(1, workers)) as pool:
        ordered = ordered_window(
            enumerate(videos),
            lambda indexed: pool.submit(transcode, str(indexed[1]), settings, workdir),
            lambda indexed, future: future.result(),
            2 * max(1, workers),
        )
        for (i, _), result in ordered:
            yield i, result


def write_prediction_shards(
    videos: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    codec: str = "vp9",
    short_side: int = DEFAULT_SHORT_SIDE,
    workers: int | None = None,
    timeout: float = 600.0,
    progress: bool = False,
) -> tuple[dict[str, int], dict[int, str]]:
    """Transcode `videos` into one shard (+ DALI index + manifest) in `out_dir` with the shard builder's code.

    Every video is a sample with label -1; its key is `{input index:06d}_{file stem}` and its sample_id its
    position among the videos that transcoded. Returns (key -> input index, input index -> failure reason).
    """
    from tqdm import tqdm

    from shards import format as fmt
    from shards.inputs import VideoInput, sanitize_key
    from shards.sink import sample_members
    from shards.transcode import EncodeSettings
    from shards.writer import ShardWriter

    out_dir = Path(out_dir)
    work = out_dir / ".work"
    work.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers or cpus, len(videos)))
    # one frame is enough: the eval sampler repeats the last frame of a short video, as the official loader does
    settings = EncodeSettings(
        codec=codec, short_side=short_side, min_frames=1, timeout=timeout, threads=max(1, cpus // workers)
    )
    keys: dict[str, int] = {}
    failures: dict[int, str] = {}
    writer = ShardWriter(out_dir, fmt.shard_name(SHARD_SPLIT, 0), work)
    try:
        bar = tqdm(total=len(videos), unit="video", desc="transcode", disable=not progress, leave=False)
        for i, result in _transcodes([str(v) for v in videos], settings, workers, str(work)):
            bar.update(1)
            if not result.ok:
                failures[i] = result.reason
                continue
            key = f"{i:06d}_{sanitize_key(Path(videos[i]).stem)}"
            item = VideoInput(key, str(videos[i]), None)
            writer.add_sample(key, sample_members(item, result, -1, len(keys), codec))
            keys[key] = i
        bar.close()
    except BaseException:
        writer.abort()
        raise
    if not keys:
        writer.abort()
        shutil.rmtree(work, ignore_errors=True)
        return keys, failures
    record = writer.close()
    shutil.rmtree(work, ignore_errors=True)
    manifest = {
        "format": fmt.FORMAT_VERSION,
        "split": SHARD_SPLIT,
        "codec": codec,
        "params": {"split": SHARD_SPLIT, **settings.output_params()},
        "classes": [],
        "num_samples": record.num_samples,
        "num_failures": len(failures),
        "num_inputs": len(videos),
        "shards": [
            {
                "tar": record.tar,
                "index": record.index,
                "num_samples": record.num_samples,
                "bytes": record.bytes,
                "sha256": record.sha256,
                "first_sample_id": 0,
            }
        ],
        "keys": record.keys,
    }
    fmt.write_manifest(out_dir, manifest)
    return keys, failures


# ---------------------------------------------------------------------------------------------------- predict
@torch.no_grad()
def predict(
    checkpoint_or_model: str | os.PathLike | nn.Module,
    videos: Sequence[str | os.PathLike],
    *,
    single_view: bool = False,
    device: str | None = None,
    topk: int = 5,
    stride: int = DEFAULT_STRIDE,
    short_side: int = DEFAULT_SHORT_SIDE,
    codec: str | None = None,
    batch_size: int = 2,
    view_batch: int = 16,
    workers: int | None = None,
    num_threads: int | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
) -> list[dict]:
    """Predict every video of `videos`; one dict per input, in input order:

        video   str               the path as given
        ok      bool              False: `error` says why (the other videos are unaffected)
        error   str | None        one line
        views   int               views averaged (15, or 1 with single_view)
        top     list[dict]        the `topk` best classes: {"index": int, "label": str, "prob": float},
                                  label = the checkpoint's class name, or the index as text without names
        probs   list[float]       the averaged softmax over every class (sums to 1)

    device: "cpu" | "gpu" | None (GPU when available). codec: the transcode target, default VP9 on the CPU and
    H.264 on the GPU. batch_size: videos per pipeline batch; view_batch: views per model forward.
    trust_pickle: see `model.load_pretrained` (full unpickling of the checkpoint: only for a trusted file).
    The model is put in eval mode on the device.
    """
    from shards import format as fmt

    torch_device = resolve_device(device)
    device = pipeline_device(torch_device)
    model = load_classifier(checkpoint_or_model, trust_pickle)
    model = model.to(torch_device).eval()
    cfg, class_names = model.cfg, getattr(model, "class_names", None)
    clips, crops = (1, 1) if single_view else (5, 3)
    codec = codec or ("h264" if device == "gpu" else "vp9")
    results: list[dict] = [
        {"video": str(v), "ok": False, "error": None, "views": 0, "top": [], "probs": []} for v in videos
    ]
    if not videos:
        return results
    with tempfile.TemporaryDirectory(prefix="videomae-predict-") as tmp:
        keys, failures = write_prediction_shards(
            videos, tmp, codec=codec, short_side=short_side, workers=workers, progress=progress
        )
        for i, reason in failures.items():
            results[i]["error"] = reason
        if keys:
            try:
                sums, counts, corrupt = _run_views(
                    model,
                    tmp,
                    device,
                    torch_device,
                    cfg,
                    clips,
                    crops,
                    stride,
                    batch_size,
                    view_batch,
                    num_threads,
                    progress,
                )
            except RuntimeError as e:  # e.g. DALI cannot decode any of the transcoded videos
                reason = (
                    f"the pipeline failed: {str(e).strip().splitlines()[0][:300]}"
                    if str(e).strip()
                    else "the pipeline failed"
                )
                for i in keys.values():
                    results[i]["error"] = reason
                return results
            for sample_id, key in enumerate(fmt.read_manifest(tmp)["keys"]):
                r = results[keys[key]]
                n = int(counts[sample_id])
                if n == 0:
                    r["error"] = "the pipeline could not decode the transcoded video" + (
                        f" ({'; '.join(corrupt)})" if corrupt else ""
                    )
                    continue
                probs = sums[sample_id] / n
                top = probs.topk(min(topk, probs.numel()))
                r.update(
                    ok=True,
                    views=n,
                    probs=probs.tolist(),
                    top=[
                        {"index": int(j), "label": class_names[j] if class_names else str(int(j)), "prob": float(p)}
                        for p, j in zip(top.values.tolist(), top.indices.tolist())
                    ],
                )
    return results


def _run_views(
    model: nn.Module,
    shard_dir: str,
    device: str,
    torch_device: torch.device,
    cfg,
    clips: int,
    crops: int,
    stride: int,
    batch_size: int,
    view_batch: int,
    num_threads: int | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Softmax sums float64[S, classes] and view counts int64[S] per sample_id over one eval epoch."""
    from tqdm import tqdm

    from pipeline import build_loader

    # the eval graph resizes the short side to the crop size, then takes 3 crops along the long side (VideoMAE's test)
    loader = build_loader(
        shard_dir,
        "eval",
        batch_size,
        device=device,
        num_frames=cfg.num_frames,
        stride=stride,
        input_size=cfg.img_size,
        patch_size=cfg.patch_size,
        tubelet_size=cfg.tubelet_size,
        eval_clips=clips,
        eval_crops=crops,
        num_threads=num_threads,
    )
    try:
        num_samples = loader.num_samples
        sums = torch.zeros(num_samples, cfg.num_classes, dtype=torch.float64)
        counts = torch.zeros(num_samples, dtype=torch.int64)
        for batch in tqdm(loader, total=len(loader), desc="predict", unit="batch", disable=not progress, leave=False):
            video, sample_id = batch["video"], batch["sample_id"].long().cpu()
            for start in range(0, video.shape[0], view_batch):
                chunk = video[start : start + view_batch].to(torch_device, non_blocking=True)
                with autocast(torch_device, "auto"):
                    logits = model(chunk)
                probs = logits.float().softmax(dim=-1).double().cpu()
                ids = sample_id[start : start + view_batch]
                sums.index_add_(0, ids, probs)
                counts.index_add_(0, ids, torch.ones_like(ids))
        return sums, counts, list(loader.stats.corrupt)
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------------------- CLI
def format_result(r: dict) -> str:
    lines = [f"{r['video']}  ({r['views']} view{'s' if r['views'] != 1 else ''})"]
    for rank, t in enumerate(r["top"], start=1):
        lines.append(f"  {rank}. {t['prob']:.4f}  {t['label']}")
    return "\n".join(lines)


def int_in(low: int, high: int):
    """An argparse type: an integer in [low, high]; anything else is a usage error naming the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}]")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m apps.predict",
        description="Top-k labels for videos from a VideoMAE classifier (decoded by the "
        "DALI pipeline, 5 clips x 3 crops averaged).",
    )
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (any format ffmpeg reads)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="classifier checkpoint: Hugging Face directory, official .pth, ours, or a run directory",
    )
    p.add_argument("--single-view", action="store_true", help="1 clip x 1 crop (the centre ones) instead of 5 x 3")
    p.add_argument(
        "--device",
        choices=["cpu", "gpu", "auto"],
        default="auto",
        help="decode and run on the CPU or the GPU (default: the GPU when available)",
    )
    p.add_argument("--topk", type=int_in(1, 100_000), default=5, help="labels shown per video (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list of results instead of text")
    p.add_argument(
        "--stride",
        type=int_in(1, MAX_STRIDE),
        default=DEFAULT_STRIDE,
        help=f"frame sampling rate the model was trained with, 1..{MAX_STRIDE} (default {DEFAULT_STRIDE}, Kinetics)",
    )
    p.add_argument(
        "--short-side",
        type=int_in(2, MAX_SHORT_SIDE),
        default=DEFAULT_SHORT_SIDE,
        help=f"transcode to this short side (even), as the training shards (default {DEFAULT_SHORT_SIDE})",
    )
    p.add_argument(
        "--codec",
        choices=["vp9", "h264", "mjpeg"],
        default=None,
        help="transcode target (default: vp9 on the CPU, h264 on the GPU)",
    )
    p.add_argument("--batch-size", type=int_in(1, 256), default=2, help="videos per pipeline batch (default 2)")
    p.add_argument("--view-batch", type=int_in(1, 4096), default=16, help="views per model forward (default 16)")
    p.add_argument("--workers", type=int_in(1, 1024), default=None, help="parallel transcodes (default: the CPUs)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a checkpoint that needs full unpickling (it can run code): only a file you trust",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from shards.transcode import TranscodeAborted

    configure_logging()
    # stdout carries the results alone (`--json` is parsed): the libraries' INFO lines stay off, as before
    logging.getLogger().setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        results = predict(
            args.checkpoint,
            args.videos,
            single_view=args.single_view,
            device=args.device,
            topk=args.topk,
            stride=args.stride,
            short_side=args.short_side,
            codec=args.codec,
            batch_size=args.batch_size,
            view_batch=args.view_batch,
            workers=args.workers,
            progress=not args.quiet and sys.stderr.isatty(),
            trust_pickle=args.trust_pickle,
        )
    except (OSError, ValueError, TranscodeAborted) as e:  # CheckpointError is a ValueError; a full disk an OSError
        log.error(f"error: {str(e).splitlines()[0]}")
        return 2
    for r in results:
        if not r["ok"]:
            log.warning(f"error: {r['video']}: {r['error']}")
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "probs"} for r in results], indent=1))
    else:
        print("\n".join(format_result(r) for r in results if r["ok"]))
    failed = sum(not r["ok"] for r in results)
    if failed:  # a warning, not an INFO summary: stdout holds the results alone (`--json` is parsed)
        log.warning(f"predict: {len(results) - failed} of {len(results)} videos predicted, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
