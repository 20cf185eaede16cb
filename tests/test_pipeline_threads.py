"""CPU threads per rank: two real local ranks (torchrun --nproc-per-node 2, so $LOCAL_WORLD_SIZE = 2) build loaders
with and without `num_threads`, with 1, 2 and 4 pipelines, decoder groups and decode="auto", and report the threads
of every DALI pipeline as DALI built it (`pipe.num_threads`) and the OS threads the process gained.

The budget: without `num_threads` a rank's pipelines together get its share of the cores (the process's CPU
affinity // local ranks, computed here from os.sched_getaffinity, not by the code under test), each of P pipelines
share // P, at most `share` pipelines; `num_threads` is the rank's total, split the same way; CPU decoder groups add
no threads (they run on their pipeline's pool).

Run by pytest; the same file is the worker that torchrun starts (`__main__` below).
"""

import json
import os
import re
import socket
import subprocess
import sys

import pipeline_shards as ps

SMALL = dict(num_frames=4, stride=4, input_size=48)
CASES = {  # name -> build_loader options
    "default": {},
    "default_p2": dict(pipelines=2),
    "default_p4": dict(pipelines=4),
    "total5_p2": dict(num_threads=5, pipelines=2),
    "total3_p4": dict(num_threads=3, pipelines=4),
    "auto": dict(decode="auto", auto_batches=1),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_local_ranks_split_their_share_of_the_cores(tmp_path):
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
        str(tmp_path),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["local_world_size"] == 2
        cores, share = result["cores"], max(1, result["cores"] // 2)
        built = result["threads"]

        # no num_threads: the rank's share of the cores, split evenly, never more in all
        for name, asked in (("default", 1), ("default_p2", 2), ("default_p4", 4)):
            threads = built[name]
            assert len(threads) == min(asked, share), (name, threads)
            assert threads == [share // len(threads)] * len(threads) and sum(threads) <= share, (name, threads)
        # num_threads: the rank's total, split the same way (and honoured above the share)
        assert built["total5_p2"] == [2, 2]
        assert built["total3_p4"] == [1, 1, 1]

        # decode="auto": every candidate was built with its share of the budget, and says so
        table = result["decode_table"]
        assert table and all("clips_per_s" in row for row in table), table
        for row in table:
            assert row["pipelines"] <= share, row
            assert row["threads"] == [share // row["pipelines"]] * row["pipelines"], row
        assert len(built["auto"]) <= share and sum(built["auto"]) <= share

        # CPU decoder groups run on their pipeline's pool: the process gains as many OS threads with 2 as with 1
        assert result["os_threads"]["groups2"] == result["os_threads"]["groups1"] > 0, result["os_threads"]

        # the start-up line says the split, against the budget and where it comes from
        line = f"pipeline: rank {rank}: 1 pipeline(s) x {share} CPU threads = {share} of a budget of {share} "
        assert line + f"({cores} core(s) / 2 local rank(s))" in done.stderr, done.stderr[-3000:]
    if len(os.sched_getaffinity(0)) // 2 < 4:  # the 4 pipelines asked for were more than the share has threads
        assert re.search(r"pipeline: pipelines=4 exceeds this rank's budget of \d+ CPU threads", done.stderr)


def _os_threads() -> int:
    """The process's OS threads at rest: the fewest of 30 looks 10 ms apart (a thread that DALI starts and ends
    around an iteration is not counted)."""
    import time

    counts = []
    for _ in range(30):
        counts.append(len(os.listdir("/proc/self/task")))
        time.sleep(0.01)
    return min(counts)


def _worker(train_dir: str, out_dir: str) -> None:
    import gc
    import logging

    from pipeline import build_loader

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    rank = int(os.environ["LOCAL_RANK"])
    common = dict(rank=rank, world_size=2, **SMALL)
    result = {
        "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
        "cores": len(os.sched_getaffinity(0)),
        "threads": {},
    }
    for name, options in CASES.items():
        loader = build_loader(train_dir, "pretrain", 4, **common, **options)
        result["threads"][name] = [pipe.num_threads for pipe in loader._run.pipes]
        if name == "auto":
            result["decode_table"] = loader.decode_table
        loader.close()
        del loader
        gc.collect()
    result["os_threads"] = {}
    for groups in (1, 2):
        before = _os_threads()
        loader = build_loader(train_dir, "pretrain", 2, decoder_groups=groups, num_threads=2, **common)
        batches = iter(loader)
        next(batches), next(batches)
        result["os_threads"][f"groups{groups}"] = _os_threads() - before
        loader.close()
        del loader
        gc.collect()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
