"""VideoMAE pretraining, fine-tuning and 5 clips x 3 crops evaluation, from one CPU to many GPU nodes.

    python train.py pretrain --config configs/pretrain_vitb_k400.yaml data.train=/data/k400/train
    torchrun --nnodes 8 --nproc-per-node 8 ... train.py finetune --config configs/finetune_vitb_k400.yaml
    python train.py eval --config configs/eval_vitb_k400.yaml model.pretrained=runs/finetune_vitb_k400

A run is configured by a YAML file checked against the dataclasses of `training.config` plus `section.key=value`
overrides. Unknown keys, wrong types, missing shards and class counts that disagree with a checkpoint fail at start
with one line (exit status 2), before anything is built. Under torchrun each process reads its own part of the data
(rank and world size from env://), the model is wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPUs), and
rank 0 writes checkpoints, metrics (console, `metrics.jsonl`, TensorBoard) and evaluation results into
`run.out_dir`. Console lines go through `logging` (`shards.logs.configure_logging`): rank 0's INFO lines on stdout,
warnings and errors on stderr, other ranks' warnings with their rank in front. The work is done by `training` (see
its package docstring): this file parses, checks, builds, runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.checkpoint import CheckpointWriteError
from pipeline.config import MODES
from shards.logs import configure_logging
from training.checkpointing import load_resume
from training.config import ConfigError, check_config, check_resume_arg, load_config
from training.distributed import setup, teardown
from training.evaluate import evaluate
from training.trainer import StopRequest, Trainer

EXIT_WRITE_FAILED = 75  # sysexits' EX_TEMPFAIL, as shards.build: fix the cause, re-run the same command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="VideoMAE pretraining, fine-tuning and evaluation.")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--config", help="YAML file (configs/*.yaml)")
    parser.add_argument("--resume", help="checkpoint file, or 'auto' for the latest one in run.out_dir")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-3")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (or stopped by a signal, with a checkpoint), 2 configuration error, 3 non-finite loss,
    75 a checkpoint the disk refused (the earlier ones intact: re-run with --resume auto)."""
    args = parse_args(argv)
    configure_logging()  # rank 0 (from $RANK) logs from INFO up on stdout, the other ranks warnings only
    try:
        cfg = load_config(args.config, args.overrides)
        check_resume_arg(args.mode, args.resume)
        data_facts = check_config(cfg, args.mode)
        if args.mode == "eval":
            return evaluate(cfg, data_facts, setup())
        stop = StopRequest()  # before the set-up: a SIGTERM while it runs is a stop request too
        dist = setup()
        ckpt = load_resume(args.resume, Path(cfg.run.out_dir), args.mode, dist)
        return Trainer(cfg, args.mode, data_facts, dist, ckpt, stop).run()
    except ConfigError as e:  # every rank fails alike; the CLI's one line on stderr, whatever the logging set-up
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except CheckpointWriteError as e:  # a full disk: the checkpoints already written are intact
        print(f"error: {e}; free space and re-run with --resume auto", file=sys.stderr, flush=True)
        return EXIT_WRITE_FAILED
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
