"""`train.py eval`: VideoMAE's 5 clips x 3 crops test, each view's softmax averaged per video across all ranks.

Rank 0 prints top-1 / top-5 and writes `eval.json` and `predictions.csv` (key, sample id, label, views, top-5 with
scores) into run.out_dir; `eval.save_view_scores` also keeps each rank's per-view logits (`views-rank{r}.pt`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.runtime import autocast
from training.build import build_loader, make_model
from training.config import Config, DataFacts
from training.distributed import Dist, all_reduce
from training.metrics import skipped_samples

log = logging.getLogger("training")


def aggregate_views(probs, sample_id, view, num_samples: int, num_views: int, rank: int):
    """Average softmax scores per video over all views on all ranks, each (video, view) counted once.

    probs: float[R, C] this rank's view scores; sample_id, view: int64[R]. A view may come twice (a padded last
    batch, or a sample handed to two ranks); the lowest rank holding it owns it, and within a rank its first row.
    Returns (mean: float64[num_samples, C], views counted: int64[num_samples]), the same on every rank.
    """
    device, rows = probs.device, torch.arange(len(sample_id), device=probs.device)
    slot = sample_id * num_views + view
    owner = torch.full((num_samples * num_views,), 2**30, dtype=torch.int64, device=device)
    owner.scatter_reduce_(0, slot, torch.full_like(slot, rank), reduce="amin")
    all_reduce(owner, "min")
    first_row = torch.full((num_samples * num_views,), len(slot), dtype=torch.int64, device=device)
    first_row.scatter_reduce_(0, slot, rows, reduce="amin")
    keep = (owner[slot] == rank) & (first_row[slot] == rows)
    sums = torch.zeros((num_samples, probs.shape[1]), dtype=torch.float64, device=device)
    sums.index_add_(0, sample_id[keep], probs[keep].double())
    counts = torch.zeros(num_samples, dtype=torch.int64, device=device)
    counts.index_add_(0, sample_id[keep], torch.ones_like(sample_id[keep]))
    all_reduce(sums)
    all_reduce(counts)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


def evaluate(cfg: Config, data_facts: DataFacts, dist: Dist) -> int:
    """One pass over data.val on every rank; the results on rank 0. Exit status 0."""
    out_dir = Path(cfg.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, model_cfg = make_model(cfg, "eval", data_facts.num_classes)
    model.to(dist.device).eval()
    loader = build_loader(cfg, "eval", dist, model_cfg)
    t0 = time.perf_counter()
    views = _view_logits(cfg, model, loader, dist)
    logits = views["logits"].reshape(-1, data_facts.num_classes).float()
    num_samples = data_facts.num_samples or int(all_reduce(views["sample_id"].max() + 1, "max").item())
    if cfg.eval.save_view_scores:
        torch.save({k: v.cpu() for k, v in views.items()}, out_dir / f"views-rank{dist.rank}.pt")
    num_views = cfg.data.test_clips * cfg.data.test_crops
    mean, counts = aggregate_views(
        logits.softmax(-1), views["sample_id"], views["view"], num_samples, num_views, dist.rank
    )
    labels = torch.full((num_samples,), -1, dtype=torch.int64, device=dist.device)
    labels.scatter_reduce_(0, views["sample_id"], views["label"], reduce="amax")
    all_reduce(labels, "max")
    skipped = int(all_reduce(torch.tensor(skipped_samples(loader), device=dist.device)).item())
    if dist.is_main:
        _report(cfg, data_facts, mean, counts, labels, skipped, time.perf_counter() - t0)
    return 0


@torch.no_grad()
def _view_logits(cfg: Config, model, loader, dist: Dist) -> dict[str, torch.Tensor]:
    """This rank's views of one epoch: logits float[R, C] and sample_id, view, label int64[R]."""
    parts: dict[str, list] = {"logits": [], "sample_id": [], "view": [], "label": []}
    for batch in tqdm(loader, desc="eval", total=len(loader), disable=not (dist.is_main and sys.stderr.isatty())):
        with autocast(dist.device, cfg.run.precision):
            parts["logits"].append(model(batch["video"]).float())
        parts["sample_id"].append(batch["sample_id"].long())
        parts["view"].append(batch["clip"].long() * cfg.data.test_crops + batch["crop"].long())
        parts["label"].append(batch["label"].long())
    return {k: torch.cat(v) if v else torch.empty(0, dtype=torch.int64, device=dist.device) for k, v in parts.items()}


def _report(cfg: Config, data_facts: DataFacts, mean, counts, labels, skipped: int, seconds: float) -> None:
    """Top-1 / top-5 over the videos with a label; eval.json, predictions.csv and the console line."""
    out_dir, num_views = Path(cfg.run.out_dir), cfg.data.test_clips * cfg.data.test_crops
    seen, top5 = counts > 0, mean.topk(min(5, mean.shape[1]), dim=1)
    scored = seen & (labels >= 0)
    n = int(scored.sum())
    result = {
        "top1": float(((top5.indices[:, 0] == labels) & scored).sum()) / max(n, 1),
        "top5": float(((top5.indices == labels[:, None]).any(1) & scored).sum()) / max(n, 1),
        "videos": n,
        "videos_missing": int((~seen).sum()),
        "videos_with_fewer_views": int((seen & (counts < num_views)).sum()),
        "skipped_samples": skipped,
        "seconds": seconds,
    }
    keys = (data_facts.manifest or {}).get("keys") or [f"sample{i}" for i in range(len(counts))]
    names = data_facts.class_names or [str(i) for i in range(mean.shape[1])]
    pred_path = out_dir / cfg.eval.predictions
    tmp = pred_path.with_name(pred_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "sample_id", "label", "label_name", "views", "top5", "top5_names", "top5_scores"])
        for i in torch.nonzero(seen).flatten().tolist():
            idx, label = top5.indices[i].tolist(), int(labels[i])
            writer.writerow(
                [
                    keys[i],
                    i,
                    label,
                    names[label] if 0 <= label < len(names) else "",
                    int(counts[i]),
                    " ".join(map(str, idx)),
                    "|".join(names[j] for j in idx),
                    " ".join(f"{v:.6f}" for v in top5.values[i].tolist()),
                ]
            )
    os.replace(tmp, pred_path)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info(
        f"eval: top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  over {n} videos x {num_views} "
        f"views ({result['videos_missing']} missing, {result['videos_with_fewer_views']} with fewer views, {skipped} "
        f"corrupt samples skipped); predictions: {pred_path}"
    )
