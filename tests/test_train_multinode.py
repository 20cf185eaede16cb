"""Two nodes, each with its own run.out_dir: two `torchrun` agents on this machine (`--nnodes 2 --nproc-per-node 1`,
c10d rendezvous on 127.0.0.1), as a Slurm job on two nodes runs them (README). They pretrain to a checkpoint, stop,
resume with `--resume auto` and finish; the loss curve is the one a single agent of 2 processes draws.

Each agent's out_dir stands for a node-local disk: rank 0 alone writes (so the rank-1 agent's directory stays
empty), and on resume rank 0 finds and reads the checkpoint and sends it to rank 1 (training.checkpointing), which
would otherwise start afresh. The c10d rendezvous numbers the agents by (host, pid): the agent started first gets
rank 0, here as on a cluster whose first node hosts the rendezvous.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_train_runs import ROOT, free_port, metrics, run, train_cmd

from model.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

RUN = [
    "data.source=synthetic",
    "data.synthetic_samples=16",
    "data.batch_size=2",
    "optim.lr_batch_base=0",
    "optim.lr=1e-3",
    "optim.max_steps=8",
    "optim.warmup_steps=2",
    "model.drop_path_rate=0.1",
    "run.log_interval=1",
    "run.ckpt_interval=0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def two_agents(out_dirs: tuple[Path, Path], *overrides: str, resume: str | None = None) -> list[str]:
    """Run the two agents (the first started first) to the end; returns their outputs (stdout and stderr). One that
    fails ends the wait: the other would sit at torchrun's exit barrier for 300 s."""
    port = free_port()
    agents, logs = [], []
    for out in out_dirs:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "two-nodes",
            *train_cmd("pretrain", out, *RUN, *overrides, resume=resume)[1:],
        ]
        logs.append(tempfile.TemporaryFile("w+"))  # files, not pipes: nothing blocks while the agents are polled
        agents.append(
            subprocess.Popen(
                cmd,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                text=True,
                cwd=ROOT,
                env=ENV,
                start_new_session=True,
            )
        )
        time.sleep(0.5)  # the first agent is the older process: rank 0
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any(agent.poll() for agent in agents):  # a non-zero exit ends it
            if all(agent.poll() == 0 for agent in agents):
                break
            time.sleep(0.2)
    finally:
        for agent in agents:
            if agent.poll() is None:  # its workers too: they would wait on each other forever
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    outputs = []
    for i, (agent, log) in enumerate(zip(agents, logs)):
        with log:
            log.seek(0)
            outputs.append(log.read())
        assert agent.returncode == 0, f"agent {i} exit {agent.returncode}:\n{outputs[-1]}"
    return outputs


def test_two_agents_with_their_own_out_dirs_stop_resume_and_match_one_agent(tmp_path):
    single = tmp_path / "single"
    run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
        + ["--master-port", str(free_port()), *train_cmd("pretrain", single, *RUN)[1:]],
        env=ENV,
    )
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    two_agents((node0, node1), "run.stop_after_steps=4")
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(node0)] == [4]
    assert list(node1.iterdir()) == [], "rank 1 wrote into its out_dir"  # rank 0 alone writes
    out0, _ = two_agents((node0, node1), resume="auto")
    assert "resuming from" in out0 and "at step 4" in out0, out0
    assert list(node1.iterdir()) == []
    final = load_checkpoint(latest_checkpoint(node0))
    assert final["step"] == 8 and len(final["rng"]) == 2
    # the loss curve: steps 1-4 before the stop, 5-8 after it, each the single agent's
    expected = {m["step"]: m["loss"] for m in metrics(single)}
    got = {m["step"]: m["loss"] for m in metrics(node0)}
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-9), step


def test_no_gloo_thread_outlives_a_finished_run(tmp_path):
    """The cause of an agent that hung at torchrun's exit barrier (CI of 2026-12-04): the trainer's DDP kept the
    process group, so gloo's threads outlived destroy_process_group and aborted one rank's exit 1 time in ~5."""
    out = tmp_path / "run"
    cmd = train_cmd("pretrain", out, *RUN, "optim.max_steps=2")
    run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
        + ["--master-port", str(free_port()), str(ROOT / "tests" / "train_exit_threads.py"), *cmd[2:]],
        env={**ENV, "THREADS_OUT": str(tmp_path)},
    )
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["status"] == 0
        assert not [name for name in report["threads"] if "gloo" in name], (rank, report["threads"])
