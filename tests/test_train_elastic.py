"""Resuming a run on another shape (training.progress, pipeline.selection), with real torchrun/gloo processes.

A 2-rank pretraining run on 24 synthetic videos (2 videos per rank: 4 per step, 6 steps per epoch) stops after 3
steps, 12 videos into epoch 0. It is resumed on 1 rank with optim.grad_accum=2 (the same 4 videos per step) and on
3 ranks (6 per step); a 1-rank run is resumed on 2. Each rank records what it trained on (`recording_main`, run as
the script under torchrun): the (epoch, sample id) of every batch, the lr of every step, and the weights and
optimizer state it starts from. The references are independent of the code under test: the whole set of ids, the
closed-form schedule at a sample count, the checkpoint the stopped run wrote.
"""

from __future__ import annotations

import json
import math
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from test_train_runs import ROOT, data, free_port, metrics, run, train_cmd  # noqa: F401 (data: a fixture)

import train
from model.checkpoint import latest_checkpoint, load_checkpoint

NUM = 24
ELASTIC = [
    "data.source=synthetic",
    f"data.synthetic_samples={NUM}",
    "optim.lr_batch_base=0",
    "optim.lr=1e-3",
    "optim.min_lr=1e-5",
    "optim.max_steps=8",
    "optim.warmup_steps=2",
    "run.log_interval=1",
    "run.ckpt_interval=0",
]
LR, MIN_LR, TOTAL, WARMUP = 1e-3, 1e-5, 8, 2  # the schedule above, in steps of the first run's 4 videos


def expected_lr(samples: int, videos_per_step: int = 4) -> float:
    """The official VideoMAE schedule (linear warm-up reaching the peak at W - 1, half cosine) at a sample count."""
    x = samples / videos_per_step
    if x < WARMUP:
        return LR * x / (WARMUP - 1)
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * (x - WARMUP) / (TOTAL - WARMUP)))


def torchrun(
    out: Path,
    ranks: int,
    *overrides: str,
    resume: str | None = None,
    timeout: int = 300,
    base: list[str] = ELASTIC,
    mode: str = "pretrain",
):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        __file__,
        *train_cmd(mode, out, *base, *overrides, resume=resume)[2:],
    ]
    return run(cmd, timeout=timeout, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def records(out: Path, ranks: int) -> list[dict]:
    return [torch.load(out / f"rank{r}-record.pt") for r in range(ranks)]


def epoch_ids(recs: list[dict], epoch: int) -> list[int]:
    """The ids every rank trained on in `epoch`, all together (one entry per video and time trained)."""
    return [int(i) for rec in recs for e, i in rec["sample_ids"].tolist() if e == epoch]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """(uninterrupted 2-rank run, the same stopped after 3 steps): their out_dirs."""
    full, part = tmp_path_factory.mktemp("full2"), tmp_path_factory.mktemp("part2")
    torchrun(full, 2, "data.batch_size=2")
    torchrun(part, 2, "data.batch_size=2", "run.stop_after_steps=3")
    return full, part


def check_elastic_resume(stopped: Path, resumed: Path, ranks_before: int, ranks_after: int, videos_per_step: int):
    """The Must-show assertions of a resume of `stopped` (its checkpoint at 12 videos) as `resumed`."""
    ckpt = load_checkpoint(latest_checkpoint(stopped))
    assert ckpt["progress"]["samples"] == 12 and ckpt["progress"]["epoch"] == 0
    before, after = records(stopped, ranks_before), records(resumed, ranks_after)
    # epoch 0: the ids trained on before the stop and after the resume are every id once (the uninterrupted run's
    # consumed set: 24 is a multiple of every global batch here, so it drops nothing)
    ids = epoch_ids(before, 0) + epoch_ids(after, 0)
    assert len(epoch_ids(before, 0)) == 12
    assert sorted(ids) == list(range(NUM)), ids
    # every rank starts from the checkpoint's weights and optimizer state
    for rec in after:
        for name, value in ckpt["model"].items():
            torch.testing.assert_close(rec["start_model"][name], value, rtol=0, atol=0, msg=name)
        for pid, state in ckpt["optimizer"]["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(rec["start_optimizer"]["state"][pid][key], value, rtol=0, atol=0)
    # the schedule continues at the same sample count, in steps of the new global batch
    steps = after[0]["steps"]  # rows (step, samples before the step, lr)
    assert steps[0][1] == 12 and steps[0][0] == 12 // videos_per_step
    for step, samples, lr in steps:
        assert samples == 12 + (step - steps[0][0]) * videos_per_step
        assert lr == pytest.approx(expected_lr(samples), rel=1e-9, abs=1e-12), (step, samples)
    # and ends where the uninterrupted run ends, in samples (8 steps of 4 videos)
    final = load_checkpoint(latest_checkpoint(resumed))
    assert final["progress"]["samples"] == steps[-1][1] + videos_per_step >= TOTAL * 4
    assert steps[-1][1] < TOTAL * 4
    return before, after


def test_two_ranks_resumed_on_one_with_grad_accum(two_ranks, tmp_path):
    full, part = two_ranks
    out = tmp_path / "one"
    proc = torchrun(out, 1, "data.batch_size=2", "optim.grad_accum=2", resume=str(latest_checkpoint(part)), timeout=300)
    assert "resume on another shape" in proc.stdout and "RNG states derived" in proc.stdout
    check_elastic_resume(part, out, 2, 1, 4)
    # the same global batch: the same schedule step for step as the uninterrupted run
    full_lr = {m["step"]: m["lr"] for m in metrics(full)}
    for m in metrics(out):
        assert m["lr"] == pytest.approx(full_lr[m["step"]], rel=1e-12)
    assert load_checkpoint(latest_checkpoint(out))["step"] == 8


def test_two_ranks_resumed_on_three(two_ranks, tmp_path):
    full, part = two_ranks
    out = tmp_path / "three"
    proc = torchrun(out, 3, "data.batch_size=2", resume=str(latest_checkpoint(part)))
    assert "now 6 videos/step: step 2" in proc.stdout, proc.stdout
    _, after = check_elastic_resume(part, out, 2, 3, 6)
    # lr at the first resumed step == the uninterrupted run's at the same sample count (12 videos: its step 3,
    # logged after the step as step 4)
    full_lr = {m["step"]: m["lr"] for m in metrics(full)}
    assert after[0]["steps"][0][2] == pytest.approx(full_lr[4], rel=1e-12)
    # the 3 ranks trained on disjoint ids in epoch 0 after the resume
    per_rank = [set(epoch_ids([rec], 0)) for rec in after]
    assert all(len(s) == 4 for s in per_rank) and not (per_rank[0] & per_rank[1] | per_rank[1] & per_rank[2])
    assert load_checkpoint(latest_checkpoint(out))["step"] == 6  # 2 + ceil((32 - 12) / 6)


def test_one_rank_resumed_on_two(tmp_path):
    part, out = tmp_path / "part1", tmp_path / "two"
    torchrun(part, 1, "data.batch_size=4", "run.stop_after_steps=3")
    torchrun(out, 2, "data.batch_size=2", resume=str(latest_checkpoint(part)))
    check_elastic_resume(part, out, 1, 2, 4)


def test_finetune_with_mixup_and_ema_two_ranks_resumed_on_one(tmp_path):
    """Fine-tuning's own random and stateful parts (mixup/cutmix generator, EMA weights) across a change of shape."""
    extra = ["aug.mixup=0.8", "aug.cutmix=1.0", "aug.smoothing=0.1", "run.ema=true", "run.ema_decay=0.9"]
    part, out = tmp_path / "part", tmp_path / "one"
    torchrun(part, 2, "data.batch_size=2", "run.stop_after_steps=3", *extra, mode="finetune")
    proc = torchrun(
        out, 1, "data.batch_size=2", "optim.grad_accum=2", *extra, mode="finetune", resume=str(latest_checkpoint(part))
    )
    assert "RNG states derived from (seed 0, step 3, rank)" in proc.stdout, proc.stdout
    ids = epoch_ids(records(part, 2), 0) + epoch_ids(records(out, 1), 0)
    assert sorted(ids) == list(range(NUM)), ids
    ckpt, final = load_checkpoint(latest_checkpoint(part)), load_checkpoint(latest_checkpoint(out))
    assert final["step"] == 8 and final["model_ema"] is not None
    assert any(not torch.equal(final["model_ema"][k], v) for k, v in ckpt["model_ema"].items())  # the EMA went on


def test_same_shape_resume_keeps_every_rank_state(two_ranks, tmp_path):
    """Same shape: the per-rank loader states and RNG states continue exactly (the bit-exact path)."""
    full, part = two_ranks
    out = tmp_path / "again"
    torchrun(out, 2, "data.batch_size=2", resume=str(latest_checkpoint(part)))
    a, b = load_checkpoint(latest_checkpoint(full)), load_checkpoint(latest_checkpoint(out))
    assert a["step"] == b["step"] == 8 and a["progress"]["samples"] == b["progress"]["samples"] == 32
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0, msg=name)


def dali_base(data: list[str]) -> list[str]:
    return [*data, "optim.lr_batch_base=0", "optim.max_steps=4", "run.log_interval=1", "run.ckpt_interval=0"]


@pytest.fixture(scope="module")
def dali_stopped(data, tmp_path_factory):
    """2 ranks over the real shards (12 videos: 3 steps of 2 x 2 per epoch), stopped 1 step (4 videos) into epoch 0."""
    part = tmp_path_factory.mktemp("dali2")
    torchrun(part, 2, "data.batch_size=2", "run.stop_after_steps=1", base=dali_base(data))
    return part


def test_dali_two_ranks_resumed_on_one_mid_epoch(data, dali_stopped, tmp_path):
    """The DALI loader, resumed on 1 rank with grad_accum 2: the other 8 of epoch 0 follow, each once."""
    ckpt = load_checkpoint(latest_checkpoint(dali_stopped))
    assert ckpt["progress"]["samples"] == 4 and ckpt["progress"]["num_samples"] == 12
    out = tmp_path / "one"
    proc = torchrun(
        out,
        1,
        "data.batch_size=2",
        "optim.grad_accum=2",
        base=dali_base(data),
        resume=str(latest_checkpoint(dali_stopped)),
    )
    assert "restarting" not in proc.stderr, proc.stderr
    before, after = records(dali_stopped, 2), records(out, 1)
    ids = epoch_ids(before, 0) + epoch_ids(after, 0)
    assert len(epoch_ids(before, 0)) == 4 and sorted(ids) == list(range(12)), ids
    assert [s[:2] for s in after[0]["steps"]] == [(1, 4), (2, 8), (3, 12)]
    assert load_checkpoint(latest_checkpoint(out))["progress"]["samples"] == 16


def test_dali_two_ranks_resumed_on_three_drop_the_new_remainder(data, dali_stopped, tmp_path):
    """On 3 ranks the other 8 videos of epoch 0 are read as any 8-video epoch of 3 ranks is: ceil(8 / 3) = 3 per rank
    (DALI pads the short rank), one full batch of 2 each, the remainder dropped: 6 new ids, none seen before."""
    out = tmp_path / "three"
    torchrun(out, 3, "data.batch_size=2", base=dali_base(data), resume=str(latest_checkpoint(dali_stopped)))
    before, after = epoch_ids(records(dali_stopped, 2), 0), epoch_ids(records(out, 3), 0)
    assert len(after) == len(set(after)) == 6 and not set(after) & set(before), (before, after)
    steps = records(out, 3)[0]["steps"]
    assert [s[:2] for s in steps] == [(0, 4), (1, 10)]  # 4 videos = step 0 of 6; the end stays at 16 videos


def test_dali_dataset_changed_restarts_the_saved_epoch(data, dali_stopped, tmp_path):
    """Resumed on another shape over 2 of the 3 shards: the consumed ids no longer describe the data, so epoch 0
    starts again from its beginning (every one of the 8 videos once), with a warning."""
    train_dir = Path(data[0].split("=", 1)[1])
    subset = [f"data.train={train_dir}/train-00000{{0..1}}.tar"]
    keys = json.loads((train_dir / "manifest.json").read_text())["keys"]
    subset_ids = set()
    for n in (0, 1):  # the subset's ids, read from the tars themselves
        with tarfile.open(train_dir / f"train-00000{n}.tar") as tar:
            subset_ids |= {keys.index(m.name.split("/")[-1].split(".")[0]) for m in tar.getmembers()}
    out = tmp_path / "subset"
    proc = torchrun(
        out,
        1,
        "data.batch_size=2",
        "optim.grad_accum=2",
        base=[*dali_base(data), *subset],
        resume=str(latest_checkpoint(dali_stopped)),
    )
    assert "the saved loader state counted 12 samples, the shards hold 8; restarting epoch 0" in proc.stderr
    (rec,) = records(out, 1)
    assert len(subset_ids) == 8 and sorted(epoch_ids([rec], 0)) == sorted(subset_ids)


def test_dataset_changed_restarts_the_saved_epoch_with_a_warning(two_ranks, tmp_path):
    """24 videos at the checkpoint, 28 now: the ids consumed before mean nothing in the new epoch order, so epoch 0
    starts again from its beginning, never at a wrong position."""
    _, part = two_ranks
    out = tmp_path / "changed"
    proc = torchrun(
        out,
        1,
        "data.batch_size=2",
        "optim.grad_accum=2",
        "data.synthetic_samples=28",
        resume=str(latest_checkpoint(part)),
    )
    (warning,) = [line for line in proc.stderr.splitlines() if "restarting it from its beginning" in line]
    assert "24 samples, now 28" in warning, proc.stderr
    (rec,) = records(out, 1)
    # the run ends at 32 samples (20 after the resume point): the first 20 of the new epoch's order, none twice
    order = torch.randperm(28, generator=torch.Generator().manual_seed(0)).tolist()  # SyntheticLoader, seed 0
    assert epoch_ids([rec], 0) == order[:20]
    assert rec["steps"][0][:2] == (3, 12)  # the schedule's position is kept: it is in samples, not in data


def test_checkpoint_of_the_other_mode_is_refused_in_one_line(tmp_path, capsys):
    small = [*ELASTIC, "data.batch_size=2", "optim.max_steps=1"]
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    assert train.main(train_cmd("pretrain", pre, *small)[2:]) == 0
    assert train.main(train_cmd("finetune", fine, *small)[2:]) == 0
    capsys.readouterr()
    for mode, ckpt, kind in (("finetune", pre, "pretrain"), ("pretrain", fine, "classify")):
        path = latest_checkpoint(ckpt)
        assert train.main(train_cmd(mode, tmp_path / f"resume-{mode}", *small, resume=str(path))[2:]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"config error: {path}: a {kind} checkpoint cannot resume {mode}"
            + (f"; to fine-tune from its weights: model.pretrained={path}, no --resume" if mode == "finetune" else "")
        ], err


def recording_main(argv: list[str]) -> int:
    """train.py's main, each rank also writing `rank{r}-record.pt` into run.out_dir: the (epoch, sample id) rows it
    trained on, (step, samples before it, lr) per step, and the weights and optimizer state it started from."""
    from training.trainer import Trainer

    rows: list = []
    steps: list = []
    start: dict = {}
    next_batch, train_step, run_to_end = Trainer.next_batch, Trainer.train_step, Trainer.run

    def recording_next_batch(self):
        epoch = self.loader.epoch  # the batch's epoch: the loader moves on as it hands out an epoch's last batch
        batch = next_batch(self)
        ids = batch["sample_id"].cpu()
        rows.append(torch.stack([torch.full_like(ids, epoch), ids], 1))
        return batch

    def recording_train_step(self):
        step, samples = self.step, self.samples
        train_step(self)
        steps.append((step, samples, self.lr))

    def recording_run(self):
        start["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        start["optimizer"] = self.optimizer.state_dict()
        start["optimizer"] = {
            "state": {k: {n: t.clone() for n, t in s.items()} for k, s in start["optimizer"]["state"].items()}
        }
        status = run_to_end(self)
        torch.save(
            {
                "sample_ids": torch.cat(rows) if rows else torch.empty((0, 2), dtype=torch.long),
                "steps": steps,
                "start_model": start["model"],
                "start_optimizer": start["optimizer"],
            },
            self.out_dir / f"rank{self.dist.rank}-record.pt",
        )
        return status

    Trainer.next_batch, Trainer.train_step, Trainer.run = recording_next_batch, recording_train_step, recording_run
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(recording_main(sys.argv[1:]))
