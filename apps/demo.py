"""`make demo`: the whole system on a small embedded dataset, on CPU cores, in a few minutes.

    python -m apps.demo [--out demo]

1. `shards.synth` makes 4 motion classes (96 train + 24 val videos each: move left/right, rotate clockwise/
   counterclockwise), in the Kinetics layout;
2. `shards.build` transcodes them to VP9 WebDataset shards, each video stored in 4 stride phases (train, then val
   with train's classes); `shards.verify`;
3. `train.py pretrain` (configs/demo_pretrain.yaml): VideoMAE tube-masked pretraining of a tiny ViT;
4. `train.py finetune` (configs/demo_finetune.yaml) from that checkpoint;
5. `train.py eval` (configs/demo_eval.yaml): 5 clips x 3 crops per held-out video;
6. `apps.reconstruct`: original / masked / reconstructed frames of two held-out clips (PNG);
then a summary of accuracy and throughput. Each step is the command a user would type (printed before it runs);
re-running continues where a step stopped (builds and training resume) and redoes nothing that finished.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "pretrain": "configs/demo_pretrain.yaml",
    "finetune": "configs/demo_finetune.yaml",
    "eval": "configs/demo_eval.yaml",
}


def steps(out: Path) -> list[tuple[str, list[str]]]:
    py = sys.executable
    raw, shards, runs = out / "raw", out / "shards", out / "runs"
    data = [f"data.train={shards / 'train'}"]
    return [
        (
            "synthetic videos",
            [
                py,
                "-m",
                "shards.synth",
                "--out",
                str(raw),
                "--classes",
                "4",
                "--per-class",
                "96",
                "--val-per-class",
                "24",
                "--seed",
                "0",
            ],
        ),
        (
            "train shards",
            [
                py,
                "-m",
                "shards.build",
                "--csv",
                str(raw / "train.csv"),
                "--root",
                str(raw),
                "--split",
                "train",
                "--out",
                str(shards / "train"),
                "--short-side",
                "96",
                "--phases",
                "4",
            ],
        ),
        (
            "val shards",
            [
                py,
                "-m",
                "shards.build",
                "--csv",
                str(raw / "val.csv"),
                "--root",
                str(raw),
                "--split",
                "val",
                "--out",
                str(shards / "val"),
                "--short-side",
                "96",
                "--phases",
                "4",
                "--classes",
                str(shards / "train" / "manifest.json"),
            ],
        ),
        ("verify train", [py, "-m", "shards.verify", str(shards / "train")]),
        ("verify val", [py, "-m", "shards.verify", str(shards / "val")]),
        (
            "pretrain",
            [
                py,
                "train.py",
                "pretrain",
                "--config",
                CONFIGS["pretrain"],
                "--resume",
                "auto",
                *data,
                f"run.out_dir={runs / 'pretrain'}",
            ],
        ),
        (
            "finetune",
            [
                py,
                "train.py",
                "finetune",
                "--config",
                CONFIGS["finetune"],
                "--resume",
                "auto",
                *data,
                f"model.pretrained={runs / 'pretrain'}",
                f"run.out_dir={runs / 'finetune'}",
            ],
        ),
        (
            "eval",
            [
                py,
                "train.py",
                "eval",
                "--config",
                CONFIGS["eval"],
                f"data.val={shards / 'val'}",
                f"model.pretrained={runs / 'finetune'}",
                f"run.out_dir={runs / 'eval'}",
            ],
        ),
        (
            "reconstruction",
            [
                py,
                "-m",
                "apps.reconstruct",
                "--checkpoint",
                str(runs / "pretrain"),
                "--shards",
                str(shards / "val"),
                "--out",
                str(out / "reconstruction.png"),
                "--num",
                "2",
                "--mask-ratio",
                "0.75",
                "--stride",
                "16",
            ],
        ),  # as demo_pretrain
    ]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def summary(out: Path, timings: dict[str, float]) -> str:
    runs = out / "runs"
    lines = ["", "demo summary", "-" * 64]
    for name, seconds in timings.items():
        lines.append(f"  {name:18s} {seconds:7.1f} s")
    lines.append(f"  {'total':18s} {sum(timings.values()):7.1f} s")
    for stage in ("pretrain", "finetune"):
        records = _metrics(runs / stage)
        if records:
            first, last = records[0], records[-1]
            clips = sum(r["clips_per_s"] for r in records) / len(records)
            wait = sum(r["data_wait"] for r in records) / len(records)
            lines.append(
                f"  {stage:9s} loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} "
                f"(step {last['step']}); {clips:.0f} clips/s, data wait {100 * wait:.0f}%"
            )
    result = runs / "eval" / "eval.json"
    if result.is_file():
        ev = json.loads(result.read_text())
        classes = len(json.loads((out / "shards" / "val" / "manifest.json").read_text())["classes"])
        lines.append(
            f"  eval      top-1 {100 * ev['top1']:.1f}%  top-5 {100 * ev['top5']:.1f}% on {ev['videos']} "
            f"held-out videos, 5 clips x 3 crops (chance {100 / classes:.0f}%)"
        )
        lines.append(f"            per-video predictions: {runs / 'eval' / 'predictions.csv'}")
    picture = out / "reconstruction.png"
    if picture.is_file():
        lines.append(f"  reconstruction picture: {picture}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo", help="working folder (data, shards, runs, picture)")
    args = p.parse_args(argv)
    out = Path(args.out)
    timings: dict[str, float] = {}
    for name, cmd in steps(out):
        if name == "synthetic videos" and (out / "raw" / "val.csv").is_file():
            print(f"== {name}: {out / 'raw'} exists, kept", flush=True)
            continue
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        timings[name] = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"demo: step '{name}' failed with exit status {proc.returncode}", file=sys.stderr)
            return proc.returncode
    print(summary(out, timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
