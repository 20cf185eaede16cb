"""GPU-saturation benchmark: the same training run fed by the real shard pipeline and by in-memory tensors.

    python -m bench.bench_train --config configs/demo_pretrain.yaml --out bench/out/train_cpu.json
    python -m bench.bench_train --config configs/pretrain_vitb_k400.yaml --steps 120 --nproc 1 \
        --out bench/out/train_h100.json data.train=/data/k400/train

Both sides are `train.py` itself, run one after the other with identical settings (model, batch, repeats,
precision, compile), so the training step is exactly the one users run:
  real:       data.source=shards (DALI decoding, sampling, augmentation and masks from the config's shards);
  in-memory:  data.source=synthetic with synthetic_in_memory=true (one ready batch of the same shape on the
              training device, handed out again and again: a step never waits for data).
Throughput is measured from train.py's own metrics (clips/s per logging window), after `--warmup` windows that
include start-up, compilation and the first epoch's pipeline build. The ratio real / in-memory is the share of
the accelerator's attainable training throughput that the input pipeline sustains (the goal for ViT-B pretraining
with repeated augmentation on an H100 is >= 0.97). `--repeats` alternates the two sides to expose drift on shared
machines; the figure reported is the median ratio over the repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import check_config, load_config  # noqa: E402


def run_side(name: str, args, overrides: list[str], out_dir: Path) -> dict:
    """Run train.py once; return its steady-state throughput from metrics.jsonl."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        args.mode,
        "--config",
        args.config,
        *overrides,
        f"run.out_dir={out_dir}",
        f"optim.max_steps={args.steps}",
        f"run.log_interval={args.log_interval}",
        "run.ckpt_interval=0",
        "run.ckpt_final=false",
        "run.tensorboard=false",
    ]
    if args.nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(args.nproc),
            *cmd[1:],
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(
            f"{name} run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steady = records[args.warmup :]
    if not steady:
        raise SystemExit(f"{name}: only {len(records)} logging windows; raise --steps or lower --warmup")
    # Windows hold equal step counts: clips/s over them all is total clips / total time.
    seconds = sum(1.0 / r["clips_per_s"] for r in steady)
    result = {
        "clips_per_s": len(steady) / seconds,
        "data_wait": statistics.mean(r["data_wait"] for r in steady),
        "windows": len(steady),
        "steps_timed": len(steady) * args.log_interval,
        "loss_last": steady[-1]["loss"],
        "skipped_samples": steady[-1].get("skipped_samples", 0),
    }
    for key in ("mfu", "mem_gib"):
        if key in steady[-1]:
            result[key] = statistics.mean(r[key] for r in steady) if key == "mfu" else steady[-1][key]
    print(
        f"  {name:9s} {result['clips_per_s']:9.1f} clips/s  data wait {100 * result['data_wait']:5.1f}%"
        + (f"  MFU {100 * result['mfu']:.1f}%" if "mfu" in result else ""),
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--mode", default="pretrain", choices=("pretrain", "finetune"))
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--log-interval", type=int, default=10, help="steps per timing window")
    p.add_argument("--warmup", type=int, default=2, help="timing windows discarded at the start of each run")
    p.add_argument("--repeats", type=int, default=1, help="real/in-memory pairs, alternated")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, via torchrun")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("overrides", nargs="*", help="section.key=value for both runs")
    args = p.parse_intermixed_args(argv)

    cfg = load_config(args.config, args.overrides)
    data_facts = check_config(cfg, args.mode)  # the real side's shards must exist
    # Same sizes as the real side: samples (so epochs and the lr schedule match) and classes (head width).
    in_memory = [
        *args.overrides,
        "data.source=synthetic",
        "data.synthetic_in_memory=true",
        f"data.synthetic_samples={data_facts.num_samples or 1024}",
        f"data.synthetic_classes={data_facts.num_classes or 2}",
    ]
    if args.mode == "finetune":
        in_memory.append(f"model.num_classes={data_facts.num_classes}")
    sides = {"real": list(args.overrides), "in_memory": in_memory}
    print(
        f"bench_train: {args.config} {args.mode}, {args.steps} steps x {args.repeats} repeats, "
        f"{args.nproc} process(es)",
        flush=True,
    )
    results: dict[str, list] = {"real": [], "in_memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, overrides in sides.items():
                results[name].append(run_side(name, args, overrides, Path(tmp) / f"{name}{i}"))
    ratios = [r["clips_per_s"] / m["clips_per_s"] for r, m in zip(results["real"], results["in_memory"])]
    summary = {
        "benchmark": "train_saturation",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([sys.executable, "-m", "bench.bench_train", *(argv or sys.argv[1:])]),
        "machine": machine_description(),
        "config": args.config,
        "mode": args.mode,
        "overrides": args.overrides,
        "nproc": args.nproc,
        "steps": args.steps,
        "log_interval": args.log_interval,
        "warmup_windows": args.warmup,
        "real": results["real"],
        "in_memory": results["in_memory"],
        "ratios": ratios,
        "ratio": statistics.median(ratios),
    }
    print(
        f"saturation (real / in-memory clips/s): {summary['ratio']:.3f}  "
        f"(per repeat: {', '.join(f'{r:.3f}' for r in ratios)})",
        flush=True,
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def machine_description() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return (
                f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}, {os.cpu_count()} CPUs, "
                f"torch {torch.__version__}"
            )
        return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    except Exception:  # noqa: BLE001 - a description of the machine, never fatal
        return platform.platform()


if __name__ == "__main__":
    sys.exit(main())
