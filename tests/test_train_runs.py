"""train.py as users run it: real processes on the synthetic-motion shards (tests/conftest.py `shard_dirs`).

Covers: pretraining loss goes down; fine-tuning from that checkpoint, then 5x3 evaluation above chance with the
per-video averages re-derived by hand from the saved view scores; interrupted + resumed == uninterrupted (pretraining,
and fine-tuning with mixup, EMA, accumulation, clipping); SIGTERM writes a usable checkpoint; two torchrun ranks stay
identical while reading disjoint samples; a non-finite loss stops the run naming its step, or is skipped.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from model.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# A tiny ViT: 4 frames (16 apart: the whole 64-frame video) of 32 px in 2x16x16 tubelets = 8 tokens per clip.
TINY = [
    "data.num_frames=4",
    "data.stride=16",
    "data.input_size=32",
    "data.num_threads=1",
    "model.name=small",
    "model.overrides={depth: 2, embed_dim: 64, num_heads: 2, decoder_embed_dim: 32, decoder_depth: 1, "
    "decoder_num_heads: 2}",
    "data.mask_ratio=0.75",
    "run.tensorboard=false",
]


def train_cmd(mode, out, *overrides, resume=None):
    cmd = [sys.executable, str(ROOT / "train.py"), mode, *TINY, f"run.out_dir={out}", *overrides]
    return cmd + (["--resume", resume] if resume else [])


def run(cmd, timeout=300, env=None):
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(shard_dirs):
    # Fine-tuning options for 3 motion classes: a horizontal flip would turn "move left" into "move right".
    return [
        f"data.train={shard_dirs['train']}",
        f"data.val={shard_dirs['val']}",
        "data.flip=false",
        "data.options={rand_augment: false, erase_prob: 0.0, rrc_scale: [0.4, 1.0]}",
    ]


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    proc = run(
        train_cmd(
            "pretrain",
            out,
            *data,
            "data.batch_size=4",
            "optim.lr_batch_base=0",
            "optim.lr=2e-3",
            "optim.max_steps=40",
            "optim.warmup_steps=4",
            "optim.min_lr=1e-4",
            "run.log_interval=10",
            "run.ckpt_interval=20",
            "run.ckpt_keep=1",
        )
    )
    return out, proc


def test_pretraining_loss_goes_down(pretrained):
    out, proc = pretrained
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 4 and all(np.isfinite(losses))
    # The normalized-pixel target of masked tubes over random textures is mostly unpredictable (a model that
    # predicts nothing scores 1.0), so 40 steps move the loss by about 2%: ask for 1% and no window above the first.
    assert losses[-1] < 0.99 * losses[0] and max(losses[1:]) < losses[0], losses
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-00000040.pt"]  # keep_last=1
    ckpt = load_checkpoint(out / "checkpoint-00000040.pt")
    assert ckpt["kind"] == "pretrain" and ckpt["step"] == 40 and ckpt["optimizer"]["state"]
    assert {"clips_per_s", "data_wait", "lr", "grad_norm"} <= set(metrics(out)[-1])


def test_finetune_then_5x3_eval_above_chance(pretrained, data, tmp_path):
    ft, ev = tmp_path / "finetune", tmp_path / "eval"
    run(
        train_cmd(
            "finetune",
            ft,
            *data,
            f"model.pretrained={pretrained[0]}",
            "data.batch_size=4",
            "optim.lr_batch_base=0",
            "optim.lr=2e-3",
            "optim.max_steps=60",
            "optim.warmup_steps=5",
            "optim.layer_decay=0.75",
            "run.log_interval=20",
            "run.ckpt_interval=0",
        )
    )
    # 12 training videos cannot teach motion that carries over to 6 new ones; what this checks is that fine-tuning
    # fits its data and that checkpoint, loading, 5x3 views and label bookkeeping carry that fit through to the
    # evaluation: it is evaluated on the fine-tuning videos (a broken link anywhere gives chance, 1/3).
    train_split = data[0].split("=", 1)[1]
    proc = run(
        train_cmd(
            "eval",
            ev,
            *data,
            f"data.val={train_split}",
            f"model.pretrained={ft}",
            "eval.save_view_scores=true",
            "eval.batch_size=2",
        )
    )
    result = json.loads((ev / "eval.json").read_text())
    with open(ev / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    views = torch.load(ev / "views-rank0.pt")
    assert result["videos"] == len(rows) > 0 and result["videos_missing"] == 0
    assert result["top1"] >= 0.75, (result, proc.stdout)

    # Re-derive every video's averaged softmax from the raw view logits, by hand.
    per_video: dict[int, dict[int, np.ndarray]] = {}
    for logit, sid, view in zip(views["logits"].double().numpy(), views["sample_id"].tolist(), views["view"].tolist()):
        p = np.exp(logit - logit.max())
        per_video.setdefault(sid, {}).setdefault(view, p / p.sum())
    correct = 0
    for row in rows:
        by_view = per_video[int(row["sample_id"])]
        assert len(by_view) == int(row["views"]) == 15
        mean = np.mean(list(by_view.values()), axis=0)
        top = np.argsort(-mean, kind="stable")[: len(row["top5"].split())]
        assert [int(i) for i in row["top5"].split()] == top.tolist()
        np.testing.assert_allclose([float(s) for s in row["top5_scores"].split()], mean[top], atol=2e-6)
        correct += int(top[0] == int(row["label"]))
    assert result["top1"] == pytest.approx(correct / len(rows))


RESUME = [
    "data.batch_size=4",
    "optim.lr_batch_base=0",
    "optim.lr=1e-3",
    "optim.max_steps=10",
    "optim.warmup_steps=2",
    "model.drop_path_rate=0.2",
    "run.log_interval=1",
    "run.ckpt_interval=0",
]
# Fine-tuning adds the other random and stateful parts: mixup/cutmix draws, EMA weights, gradient accumulation
# (2 batches per step: 20 batches = several epochs of the 12 videos), gradient clipping.
RESUME_FINETUNE = [
    "aug.mixup=0.8",
    "aug.cutmix=1.0",
    "aug.smoothing=0.1",
    "run.ema=true",
    "run.ema_decay=0.9",
    "optim.grad_accum=2",
    "optim.clip_grad=1.0",
]


@pytest.mark.parametrize("mode,extra", [("pretrain", []), ("finetune", RESUME_FINETUNE)])
def test_interrupted_and_resumed_matches_uninterrupted(data, tmp_path, mode, extra):
    full, part = tmp_path / "full", tmp_path / "part"
    run(train_cmd(mode, full, *data, *RESUME, *extra))
    run(train_cmd(mode, part, *data, *RESUME, *extra, "run.stop_after_steps=5"))
    assert load_checkpoint(latest_checkpoint(part))["step"] == 5
    run(train_cmd(mode, part, *data, *RESUME, *extra, resume="auto"))
    a, b = load_checkpoint(latest_checkpoint(full)), load_checkpoint(latest_checkpoint(part))
    assert a["step"] == b["step"] == 10 and a["epoch"] == b["epoch"]
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, msg=name)
    for pid, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][pid]["exp_avg_sq"], state["exp_avg_sq"])
    for name, value in (a["model_ema"] or {}).items():
        torch.testing.assert_close(b["model_ema"][name], value, msg=name)
    # and the logged losses after the resume point are the ones the uninterrupted run saw
    full_loss = {m["step"]: m["loss"] for m in metrics(full)}
    for m in metrics(part):
        assert m["loss"] == pytest.approx(full_loss[m["step"]], rel=1e-5, abs=1e-7), m["step"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(
            "pretrain",
            out,
            *data,
            "data.batch_size=2",
            "optim.max_steps=100000",
            "run.log_interval=1",
            "run.ckpt_interval=0",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):  # 3 steps done: it is training
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no training progress within 120 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    assert "stopped by SIGTERM" in stdout
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert 3 <= ckpt["step"] < 100000 and ckpt["step"] == metrics(out)[-1]["step"]
    assert ckpt["optimizer"]["state"] and ckpt["loader"][0] is not None
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_stay_identical_on_disjoint_data(data, tmp_path):
    out = tmp_path / "ddp"
    # this file as the script: train.py's main with each rank recording what it trained on (`recording_main`)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        __file__,
        *train_cmd(
            "finetune",
            out,
            *data,
            "data.batch_size=2",
            "optim.max_steps=6",
            "model.drop_path_rate=0.1",
            "run.log_interval=3",
        )[2:],
    ]
    run(cmd, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    r0, r1 = (torch.load(out / f"rank{r}-record.pt") for r in (0, 1))
    for name, value in r0["params"].items():
        torch.testing.assert_close(r1["params"][name], value, rtol=0, atol=0, msg=name)
    # rows are (epoch, sample_id): 6 steps x 2 videos per rank = two whole epochs of the 12 training videos, each
    # read exactly once per epoch, by one rank or the other
    rows0, rows1 = r0["sample_ids"], r1["sample_ids"]
    assert len(rows0) == len(rows1) == 6 * 2
    num_videos = len(json.loads((Path(data[0].split("=", 1)[1]) / "manifest.json").read_text())["keys"])
    for epoch in (0, 1):
        ids0 = rows0[rows0[:, 0] == epoch, 1].tolist()
        ids1 = rows1[rows1[:, 0] == epoch, 1].tolist()
        assert not set(ids0) & set(ids1), (epoch, ids0, ids1)
        assert sorted(ids0 + ids1) == list(range(num_videos)), (epoch, ids0, ids1)


SYNTHETIC = [
    "data.source=synthetic",
    "data.synthetic_samples=16",
    "data.batch_size=4",
    "optim.max_steps=8",
    "run.log_interval=4",
    "run.ckpt_interval=0",
]


@pytest.fixture
def nan_batch_2(monkeypatch):
    """The synthetic loader hands out NaN videos in its batch 2 (fault injection; train.py runs in this process)."""
    import pipeline.synthetic

    monkeypatch.setattr(
        pipeline.synthetic, "SyntheticLoader", functools.partial(pipeline.synthetic.SyntheticLoader, nan_batches=(2,))
    )


def test_non_finite_loss_stops_naming_the_step(tmp_path, nan_batch_2, capsys):
    returncode = train.main(train_cmd("pretrain", tmp_path / "run", *SYNTHETIC)[2:])
    stderr = capsys.readouterr().err  # logged as an error: stderr
    assert returncode == 3, stderr
    assert "the loss is not finite at step 2" in stderr
    assert latest_checkpoint(tmp_path / "run") is None  # the spoiled weights are not saved


def test_non_finite_step_is_skipped_when_asked(tmp_path, nan_batch_2):
    assert train.main(train_cmd("pretrain", tmp_path / "run", *SYNTHETIC, "run.skip_nonfinite=true")[2:]) == 0
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt["step"] == 8 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [m.get("skipped_steps") for m in metrics(tmp_path / "run")] == [1, 1]
    assert all(np.isfinite(m["loss"]) for m in metrics(tmp_path / "run"))


def worker_pid(agent_pid: int, rank: int, timeout: float = 60.0) -> int:
    """The pid of torchrun's worker process with RANK=rank (Linux /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in Path(f"/proc/{agent_pid}/task").glob("*/children"):
            for pid in child.read_text().split():
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in env:
                    return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under {agent_pid}")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *train_cmd(
            "pretrain",
            out,
            *data,
            "data.batch_size=2",
            "optim.max_steps=100000",
            "run.log_interval=2",
            "run.ckpt_interval=0",
        )[1:],
    ]
    agent = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 2):
        assert agent.poll() is None, agent.communicate()
        assert time.time() < deadline, "no training progress within 120 s"
        time.sleep(0.2)
    os.kill(worker_pid(agent.pid, rank=1), signal.SIGTERM)  # only rank 1 is told; rank 0 must follow it
    stdout, stderr = agent.communicate(timeout=120)
    assert agent.returncode == 0, stdout + stderr
    assert "stopped by another rank's signal" in stdout  # rank 0's summary line
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert ckpt["step"] == metrics(out)[-1]["step"] and ckpt["step"] % 2 == 0
    assert len(ckpt["rng"]) == len(ckpt["loader"]) == 2  # both ranks' states


def recording_main(argv: list[str]) -> int:
    """train.py's main, with each rank also writing `rank{r}-record.pt` into run.out_dir: the (epoch, sample_id) rows
    it trained on and its final weights (run as a script under torchrun by the two-rank test above)."""
    from training.trainer import Trainer

    rows: list = []
    next_batch, run_to_end = Trainer.next_batch, Trainer.run

    def recording_next_batch(self):
        epoch = self.loader.epoch  # the batch's epoch: the loader moves on as it hands out an epoch's last batch
        batch = next_batch(self)
        ids = batch["sample_id"].cpu()
        rows.append(torch.stack([torch.full_like(ids, epoch), ids], 1))
        return batch

    def recording_run(self):
        status = run_to_end(self)
        torch.save(
            {
                "sample_ids": torch.cat(rows) if rows else torch.empty((0, 2), dtype=torch.long),
                "params": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            },
            self.out_dir / f"rank{self.dist.rank}-record.pt",
        )
        return status

    Trainer.next_batch, Trainer.run = recording_next_batch, recording_run
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(recording_main(sys.argv[1:]))
