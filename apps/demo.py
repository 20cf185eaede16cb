"""`make demo`: the whole system on a small embedded dataset, on CPU cores, in a few minutes.

    python -m apps.demo [--out demo]

1. `shards.synth --style objects` makes 4 motion classes (96 train + 24 val videos each, 64 frames of soft blobs over
   a colour gradient, all moving right, left, down or up), in the Kinetics layout;
2. `shards.build` transcodes them to VP9 WebDataset shards (crf 24: the default 36's artifacts on these smooth
   frames are noise the normalized-pixel loss cannot predict), each video stored in 4 stride phases (train, then val
   with train's classes); `shards.verify`;
3. `train.py pretrain` (configs/demo_pretrain.yaml): VideoMAE pretraining of a tiny ViT, 75% random masking;
4. `apps.probe`: held-out pretraining loss (val split, fixed masks) and a linear probe on frozen mean-pooled
   features, for the pretrained encoder and the same encoder at its random initialisation;
5. `train.py finetune` (configs/demo_finetune.yaml) from that checkpoint;
6. `train.py eval` (configs/demo_eval.yaml): 5 clips x 3 crops per held-out video;
7. the control: the same fine-tuning and evaluation from a randomly initialised encoder (`model.pretrained=null`);
8. `apps.reconstruct`: original / masked / reconstructed frames of two held-out clips (PNG);
then a table (stage, time, loss, probe, top-1), also written as OUT/summary.json. Each step is the command a user
would type (printed before it runs); re-running continues where a step stopped (builds and training resume) and
redoes nothing that finished.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from shards.format import atomic_write

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

    def finetune_and_eval(suffix: str, pretrained: Path | None, run: Path, ev: Path) -> list[tuple[str, list[str]]]:
        """Fine-tuning from `pretrained` (None: a random encoder) into `run`, then its 5 x 3 eval into `ev`."""
        weights = f"model.pretrained={pretrained if pretrained else 'null'}"
        train = ["train.py", "finetune", "--config", CONFIGS["finetune"], "--resume", "auto", *data, weights]
        evaluate = ["train.py", "eval", "--config", CONFIGS["eval"], f"data.val={shards / 'val'}"]
        return [
            (f"finetune{suffix}", [py, *train, f"run.out_dir={run}"]),
            (f"eval{suffix}", [py, *evaluate, f"model.pretrained={run}", f"run.out_dir={ev}"]),
        ]

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
                "--style",
                "objects",
                "--size",
                "128x96",
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
                "--quality",
                "24",
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
                "--quality",
                "24",
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
            "probe",
            [
                py,
                "-m",
                "apps.probe",
                "--checkpoint",
                str(runs / "pretrain"),
                "--train",
                str(shards / "train"),
                "--val",
                str(shards / "val"),
                "--stride",
                "4",
                "--mask-ratio",
                "0.75",
                "--mask-type",
                "random",
                "--seed",
                "0",
                "--json",
                str(out / "probe.json"),
                "--torch-threads",
                "1",
            ],
        ),  # stride, mask ratio and type, and seed as demo_pretrain; a 1M-parameter model runs best on one torch thread
        *finetune_and_eval("", runs / "pretrain", runs / "finetune", runs / "eval"),
        # the control: the same fine-tuning and evaluation from a randomly initialised encoder
        *finetune_and_eval(", no pretraining", None, runs / "finetune_scratch", runs / "eval_scratch"),
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
                "--mask-type",
                "random",
                "--stride",
                "4",
            ],
        ),  # as demo_pretrain
    ]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def results(out: Path, timings: dict[str, float]) -> dict:
    """What OUT/summary.json holds: the issue's five numbers (accuracies as fractions; None where a step did not
    run), plus each stage's seconds and training losses."""
    runs = out / "runs"
    probe, ev = _json(out / "probe.json"), _json(runs / "eval" / "eval.json")
    control = _json(runs / "eval_scratch" / "eval.json")
    get = lambda d, *keys: None if not d else d[keys[0]][keys[1]]
    result = {
        "pretrain_heldout_loss_init": get(probe, "random", "heldout_loss"),
        "pretrain_heldout_loss_final": get(probe, "pretrained", "heldout_loss"),
        "probe_top1_pretrained": get(probe, "pretrained", "probe_top1"),
        "probe_top1_random": get(probe, "random", "probe_top1"),
        "finetune_top1": ev.get("top1"),
        "finetune_top1_no_pretraining": control.get("top1"),
        "eval_videos": ev.get("videos"),
        "seconds": {name: round(sec, 1) for name, sec in timings.items()},
    }
    for stage, run in (
        ("pretrain", "pretrain"),
        ("finetune", "finetune"),
        ("finetune_no_pretraining", "finetune_scratch"),
    ):
        records = _metrics(runs / run)
        if records:
            result[f"{stage}_train_loss"] = [records[0]["loss"], records[-1]["loss"]]
            result[f"{stage}_steps"] = records[-1]["step"]
    return result


def table(res: dict) -> str:
    """The summary a person reads at a glance: stage, time, loss, probe, top-1."""
    sec = res["seconds"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    data = sum(v for k, v in sec.items() if k.startswith(("synthetic", "train shards", "val shards", "verify")))
    rows = [("data", data, "", "", "")]
    if "pretrain_train_loss" in res or "pretrain" in sec:
        init, final = res["pretrain_heldout_loss_init"], res["pretrain_heldout_loss_final"]
        loss = "" if init is None else f"held-out {init:.3f} -> {final:.3f} ({final / init:.2f}x)"
        rows.append(("pretrain", sec.get("pretrain", 0.0), loss, "", ""))
    if res["probe_top1_pretrained"] is not None:
        probe = f"random {pct(res['probe_top1_random'])} -> pretrained {pct(res['probe_top1_pretrained'])}"
        rows.append(("linear probe", sec.get("probe", 0.0), "", probe, ""))
    if "finetune_train_loss" in res:
        first, last = res["finetune_train_loss"]
        rows.append(("finetune", sec.get("finetune", 0.0), f"train {first:.3f} -> {last:.3f}", "", ""))
    if res["finetune_top1"] is not None:
        rows.append(("eval 5x3", sec.get("eval", 0.0), "", "", pct(res["finetune_top1"])))
    if "finetune_no_pretraining_train_loss" in res:  # the control: the same fine-tuning from a random encoder
        first, last = res["finetune_no_pretraining_train_loss"]
        loss = f"train {first:.3f} -> {last:.3f}"
        rows.append(("finetune, no PT", sec.get("finetune, no pretraining", 0.0), loss, "", ""))
    if res.get("finetune_top1_no_pretraining") is not None:
        top1 = pct(res["finetune_top1_no_pretraining"])
        rows.append(("eval, no PT", sec.get("eval, no pretraining", 0.0), "", "", top1))
    rows.append(("reconstruction", sec.get("reconstruction", 0.0), "", "", ""))
    lines = ["", "demo summary", f"  {'stage':15s} {'time':>7s}  {'loss':34s} {'probe top-1':34s} {'top-1':>6s}"]
    for stage, seconds, loss, probe, top1 in rows:
        lines.append(f"  {stage:15s} {seconds:6.0f}s  {loss:34s} {probe:34s} {top1:>6s}".rstrip())
    cpu = res.get("cpu_seconds")
    lines.append(
        f"  {'total':15s} {sum(sec.values()):6.0f}s" + (f"  (CPU user+sys {sum(cpu.values()):.0f} s)" if cpu else "")
    )
    if res.get("eval_videos"):
        lines.append(f"  top-1: {res['eval_videos']} held-out videos, 5 clips x 3 crops, 4 classes (chance 25%)")
    return "\n".join(lines)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summary(out: Path, timings: dict[str, float], cpu_times: dict[str, float] | None = None) -> str:
    """Writes OUT/summary.json; returns the table and where the files are."""
    res = results(out, timings)
    if cpu_times:
        res["cpu_seconds"] = {name: round(sec, 1) for name, sec in cpu_times.items()}
    atomic_write(out / "summary.json", json.dumps(res, indent=2) + "\n")
    lines = [table(res), f"  numbers: {out / 'summary.json'}"]
    for name in ("reconstruction.png",):
        if (out / name).is_file():
            lines.append(f"  reconstruction picture: {out / name}")
    if (out / "runs" / "eval" / "predictions.csv").is_file():
        lines.append(f"  per-video predictions: {out / 'runs' / 'eval' / 'predictions.csv'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo", help="working folder (data, shards, runs, picture)")
    args = p.parse_args(argv)
    out = Path(args.out)
    timings: dict[str, float] = {}
    cpu_times: dict[str, float] = {}  # user + sys of each step's processes: wall time on a shared machine misleads
    for name, cmd in steps(out):
        if name == "synthetic videos" and (out / "raw" / "val.csv").is_file():
            print(f"== {name}: {out / 'raw'} exists, kept", flush=True)
            continue
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        start, cpu = time.perf_counter(), _children_cpu()
        proc = subprocess.run(cmd, cwd=ROOT)
        timings[name] = time.perf_counter() - start
        cpu_times[name] = _children_cpu() - cpu
        if proc.returncode != 0:
            print(f"demo: step '{name}' failed with exit status {proc.returncode}", file=sys.stderr)
            return proc.returncode
    print(summary(out, timings, cpu_times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
