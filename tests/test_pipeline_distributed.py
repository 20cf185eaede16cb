"""Two real ranks (torchrun, gloo on CPU): every sample exactly once per epoch across ranks, reshuffled per epoch.

Run by pytest; the same file is the worker that torchrun starts (`__main__` below).
"""

import json
import os
import socket
import subprocess
import sys

import pipeline_shards as ps

EPOCHS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_cover_every_sample_once_per_epoch(tmp_path):
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        __file__,
        ps.train_shards().directory,
        ps.eval_shards().directory,
        str(out),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())

    train = result["pretrain"]
    assert train["lengths"][0] == train["lengths"][1] == 3  # 12 samples, 2 ranks, batch 2
    rank0_sets = []
    for epoch in range(EPOCHS):
        ids0, ids1 = train["ids"][epoch]
        assert len(ids0) == len(set(ids0)) == 6 and len(ids1) == len(set(ids1)) == 6
        assert set(ids0).isdisjoint(ids1) and set(ids0) | set(ids1) == set(range(12))
        rank0_sets.append(frozenset(ids0))
    assert len(set(rank0_sets)) > 1, "ranks should see other samples in other epochs"

    evaluation = result["eval"]
    for epoch in range(2):
        ids0, ids1 = evaluation["ids"][epoch]
        assert set(ids0).isdisjoint(ids1)
        assert sorted(ids0 + ids1) == sorted(list(range(5)) * 15)  # 5 samples x 15 views, each exactly once


def _worker(train_dir: str, eval_dir: str, out: str) -> None:
    import torch.distributed as dist

    from pipeline import build_loader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for mode, directory, epochs in (("pretrain", train_dir, EPOCHS), ("eval", eval_dir, 2)):
        loader = build_loader(
            directory,
            mode,
            2,
            num_frames=4,
            stride=4,
            input_size=48,
            rank=rank,
            world_size=world,
            seed=11,
            num_threads=1,
        )
        per_epoch = []
        for _ in range(epochs):
            ids = [i for batch in loader for i in batch["sample_id"].tolist()]
            gathered = [None] * world
            dist.all_gather_object(gathered, ids)
            per_epoch.append(gathered)
        lengths = [None] * world
        dist.all_gather_object(lengths, len(loader))
        result[mode] = {"ids": per_epoch, "lengths": lengths}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
