"""5x3 evaluation: per-video softmax averages across ranks, checked against averages computed by hand."""

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.evaluate import aggregate_views

NUM_SAMPLES, NUM_VIEWS, NUM_CLASSES = 5, 3, 4


def views_for_rank(rank):
    """Rank 0 holds videos 0-2, rank 1 videos 2-4: video 2 is split across ranks, and each rank also holds one
    duplicated view (as a padded last batch would), and rank 1 repeats a view that rank 0 already has."""
    g = torch.Generator().manual_seed(rank)
    if rank == 0:
        pairs = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (1, 2)]
    else:
        pairs = [(2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1), (4, 2), (4, 2)]
    sid = torch.tensor([p[0] for p in pairs])
    view = torch.tensor([p[1] for p in pairs])
    logits = torch.randn(len(pairs), NUM_CLASSES, generator=g) * 3
    return logits, sid, view


def hand_average():
    """Softmax of every distinct (video, view) once, then the plain mean per video, in numpy."""
    seen, per_video = set(), {}
    for rank in (0, 1):
        logits, sid, view = views_for_rank(rank)
        for row in range(len(sid)):
            key = (int(sid[row]), int(view[row]))
            if key in seen:
                continue
            seen.add(key)
            x = logits[row].double().numpy()
            p = np.exp(x - x.max())
            per_video.setdefault(key[0], []).append(p / p.sum())
    return np.stack([np.mean(per_video[i], axis=0) for i in range(NUM_SAMPLES)]), np.array(
        [len(per_video[i]) for i in range(NUM_SAMPLES)]
    )


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    logits, sid, view = views_for_rank(rank)
    mean, counts = aggregate_views(logits.softmax(-1), sid, view, NUM_SAMPLES, NUM_VIEWS, rank)
    torch.save({"mean": mean, "counts": counts}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_average_matches_hand_computation(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    expected, expected_counts = hand_average()
    assert list(expected_counts) == [3, 3, 3, 3, 3]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        np.testing.assert_allclose(got["mean"].numpy(), expected, rtol=1e-6, atol=1e-9)
        assert got["counts"].tolist() == expected_counts.tolist()


def test_single_process_without_duplicates_is_the_plain_mean():
    logits, sid, view = views_for_rank(0)
    keep = torch.arange(8)  # drop the duplicated last row
    mean, counts = aggregate_views(logits[keep].softmax(-1), sid[keep], view[keep], 3, NUM_VIEWS, 0)
    for v in range(3):
        torch.testing.assert_close(mean[v].float(), logits[keep][sid[keep] == v].softmax(-1).mean(0))
    assert counts.tolist() == [3, 3, 2]
