"""The loader over remote shard sets (a real S3 API: moto's server on 127.0.0.1; a local HTTP server for faults).

"The same batches" means, for every batch of every epoch: equal `sample_id`, `label`, `frames` (the decoded uint8
frames before normalization), `video` and every other output tensor, bit for bit. A remote set is read in segments
(pipeline.segments); its batches are compared with the same shards on local disk read in the same segments
(`segmented=True`), and each rank's samples per epoch with those of the one-reader local loader (same multiset)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter
from pathlib import Path

import pipeline_shards as ps
import pytest
import torch
from remote_servers import FaultyHTTPServer, moto_server, s3_env

from pipeline import build_loader
from shards import format as fmt
from shards.cache import GB
from shards.publish import published_manifest, upload

SMALL = dict(num_frames=4, stride=4, input_size=48, seed=5, debug_outputs=True)
KEYS = ("sample_id", "label", "frames", "video")


@pytest.fixture(scope="module")
def s3_set():
    """ps.train_shards() (12 samples, 3 shards of 4) published under s3://bkt/train on a moto server."""
    shards = ps.train_shards()
    with moto_server() as endpoint:
        saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
        os.environ.update(s3_env(endpoint))
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("s3://bkt")
        upload(shards.directory, "s3://bkt/train")
        yield shards
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def epochs(loader, count: int) -> list[list[dict]]:
    out = []
    for _ in range(count):
        out.append([{k: b[k].clone() for k in KEYS if k in b} for b in loader])
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        for key in KEYS:
            if key in x:
                assert torch.equal(x[key], y[key]), key


def ids(batches: list[dict]) -> Counter:
    return Counter(i for b in batches for i in b["sample_id"].tolist())


def cache_bytes(root: Path) -> int:
    """Bytes of every file under the cache (measured here, independently of shards.cache)."""
    total = 0
    for directory, _, files in os.walk(root):
        if "/.locks" in directory or "/.pins" in directory:
            continue
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(directory, name)).st_size
    return total


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_s3_batches_equal_local_segments_and_ranks_read_the_local_samples(s3_set, tmp_path, mode):
    opts = dict(segment_shards=1, cache_dir=str(tmp_path / "cache"), **SMALL)
    local = build_loader(s3_set.directory, mode, 2, segmented=True, **opts)
    remote = build_loader("s3://bkt/train", mode, 2, **opts)
    assert len(remote) == len(local) == 6
    got, want = epochs(remote, 2), epochs(local, 2)
    for e in range(2):
        assert_same(got[e], want[e])
    remote.close()
    if mode != "pretrain":
        return  # the samples each rank reads do not depend on the mode: checked once
    # two ranks, each through the same node cache: per epoch, each reads the one-reader loader's samples
    for rank in range(2):
        kw = dict(rank=rank, world_size=2, segment_shards=1, cache_dir=str(tmp_path / "cache"), **SMALL)
        one_piece = epochs(
            build_loader(s3_set.directory, mode, 2, drop_last=False, **SMALL, rank=rank, world_size=2), 2
        )
        segmented = epochs(build_loader("s3://bkt/train", mode, 2, drop_last=False, **kw), 2)
        for e in range(2):
            assert ids(segmented[e]) == ids(one_piece[e])


def test_cache_bound_never_exceeded_and_set_larger_than_it(s3_set, tmp_path):
    root = tmp_path / "cache"
    manifest = fmt.read_manifest(s3_set.directory)
    set_bytes = sum(os.path.getsize(os.path.join(s3_set.directory, s["tar"])) for s in manifest["shards"])
    largest = max(os.path.getsize(t) for t in s3_set.tars)
    small = sum(os.path.getsize(fmt.index_path_for(t)) for t in s3_set.tars) + (8 << 10)  # indexes, manifest
    bound = 2 * largest + small  # a segment of one shard (+ one a boundary cuts), nothing prefetched, small files
    assert bound < set_bytes
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], cache_bytes(root))
            stop.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    opts = dict(segment_shards=1, prefetch_segments=0, cache_dir=str(root), cache_gb=bound / GB, **SMALL)
    loader = build_loader("s3://bkt/train", "finetune", 2, **opts)
    got = epochs(loader, 2)
    stop.set()
    watcher.join()
    loader.close()
    assert 0 < peak[0] <= bound
    assert_same(got[1], epochs(build_loader(s3_set.directory, "finetune", 2, segmented=True, **opts), 2)[1])
    with pytest.raises(ValueError, match="cache_gb"):  # a bound below one segment per rank is refused at start
        build_loader(
            "s3://bkt/train", "finetune", 2, **{**opts, "cache_gb": largest / GB, "cache_dir": str(root / "x")}
        )


@pytest.mark.parametrize("stop_after", [3, 4])
def test_resume_mid_segment_is_exact_and_downloads_nothing_already_read(s3_set, tmp_path, stop_after):
    """Segments of 2 batches: stop after 3 batches (inside segment 1) or 4 (at its end); the resumed loader, on a
    fresh cache, continues with exactly the uninterrupted loader's batches, and never fetches segment 0's shard."""
    opts = dict(segment_shards=1, prefetch_segments=0, **SMALL)
    whole = build_loader("s3://bkt/train", "pretrain", 2, cache_dir=str(tmp_path / "a"), **opts)
    expected = epochs(whole, 2)
    first = build_loader("s3://bkt/train", "pretrain", 2, cache_dir=str(tmp_path / "b"), **opts)
    it = iter(first)
    for _ in range(stop_after):
        next(it)
    state = first.state_dict()
    first.close()
    fresh = tmp_path / "c"
    resumed = build_loader("s3://bkt/train", "pretrain", 2, cache_dir=str(fresh), state=state, **opts)
    segments = resumed._builder.segments(resumed.cfg, 0)
    read = {p.tar for s in segments if s.first_batch + s.batches <= stop_after for p in s.pieces}
    rest = []
    for batch in resumed:
        if not rest:  # the segments already read were not fetched again
            assert read and not any(Path(resumed.shards.tars[t]).exists() for t in read)
        rest.append({k: batch[k].clone() for k in KEYS if k in batch})
    assert_same(rest, expected[0][stop_after:])
    assert_same(epochs(resumed, 1)[0], expected[1])


@pytest.mark.parametrize("broken", ["missing", "differs"])
def test_http_faults_retried_and_an_unfetchable_shard_skipped_ranks_in_step(tmp_path, caplog, broken):
    """Over HTTPS-style URLs: a shard answered 500 twice and one whose connection drops mid-body are read anyway; a
    shard that cannot be fetched (gone from the server, or bytes that differ from the manifest) is skipped in one
    line, its samples counted, replaced by others of its segment, and both ranks yield the same number of batches."""
    shards = ps.train_shards()
    src, served = Path(shards.directory), tmp_path / "served"
    served.mkdir()
    manifest = published_manifest(src, fmt.read_manifest(src))
    for s in manifest["shards"]:
        for name in (s["tar"], s["index"]):
            (served / name).write_bytes((src / name).read_bytes())
    fmt.write_manifest(served, manifest)
    a, b, c = (s["tar"] for s in manifest["shards"])
    if broken == "missing":
        (served / c).unlink()
    else:
        data = bytearray((served / c).read_bytes())
        data[len(data) // 3] ^= 0x55  # the same size, one byte changed
        (served / c).write_bytes(bytes(data))
    missing_ids = set(range(manifest["shards"][2]["first_sample_id"], 12))
    with FaultyHTTPServer(served) as server:
        server.faults = {a: ["500", "500"], b: ["drop"]}
        lengths, seen, skipped = [], Counter(), 0
        opts = dict(segment_shards=2, cache_dir=str(tmp_path / "cache"), **SMALL)  # each rank: one segment, 2 tars
        for rank in range(2):
            loader = build_loader(server.url, "finetune", 2, rank=rank, world_size=2, **opts)
            with caplog.at_level(logging.WARNING, logger="pipeline.remote"):
                batches = epochs(loader, 1)[0]
            lengths.append(len(batches))
            seen += ids(batches)
            skipped += loader.stats.corrupt_samples
            loader.close()
        assert lengths[0] == lengths[1] == 3
        assert not set(seen) & missing_ids and set(seen) == set(range(12)) - missing_ids
        assert skipped == len(missing_ids)
        lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.remote" and c in r.getMessage()]
        assert lines and all("\n" not in line and "skipped" in line for line in lines)
        assert server.gets[a] >= 3 and server.gets[b] >= 2


def test_train_py_pretrains_from_an_s3_url(s3_set, shard_dirs, tmp_path):
    """`data.train=s3://...` end to end: the config check reads the manifest by URL, the loader reads through the
    cache set in `data.options`."""
    from test_train_runs import metrics, run, train_cmd

    upload(shard_dirs["train"], "s3://bkt/built")
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    run(
        train_cmd(
            "pretrain",
            out,
            "data.train=s3://bkt/built",
            f"data.options={{cache_dir: {cache}, segment_shards: 1}}",
            "data.batch_size=4",
            "optim.max_steps=4",
            "optim.warmup_steps=1",
            "run.log_interval=2",
            "run.ckpt_interval=0",
        )
    )
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 2 and all(x == x for x in losses)
    assert list(cache.glob("*/*.tar")) and list(cache.glob("*/manifest.json"))


def test_torchrun_two_ranks_share_one_cache_and_read_disjoint_samples(s3_set, shard_dirs, tmp_path):
    """Two torchrun ranks of one node fine-tune from s3:// through one cache directory: identical weights, and per
    epoch the two ranks' samples are disjoint and cover the set once (tests/test_train_runs.recording_main)."""
    import json
    import sys

    import test_train_runs as ttr

    upload(shard_dirs["train"], "s3://bkt/ddp")
    out, cache = tmp_path / "ddp", tmp_path / "cache"
    args = ttr.train_cmd(
        "finetune",
        out,
        "data.train=s3://bkt/ddp",
        "data.flip=false",
        f"data.options={{rand_augment: false, erase_prob: 0.0, cache_dir: {cache}, segment_shards: 1}}",
        "data.batch_size=2",
        "optim.max_steps=6",
        "run.log_interval=3",
    )[2:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(ttr.free_port()), ttr.__file__, *args]
    ttr.run(cmd, timeout=600, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ttr.ROOT)})
    r0, r1 = (torch.load(out / f"rank{r}-record.pt") for r in (0, 1))
    for name, value in r0["params"].items():
        torch.testing.assert_close(r1["params"][name], value, rtol=0, atol=0, msg=name)
    num_videos = len(json.loads((shard_dirs["train"] / "manifest.json").read_text())["keys"])
    for epoch in (0, 1):
        ids0 = r0["sample_ids"][r0["sample_ids"][:, 0] == epoch, 1].tolist()
        ids1 = r1["sample_ids"][r1["sample_ids"][:, 0] == epoch, 1].tolist()
        assert sorted(ids0 + ids1) == list(range(num_videos))
    assert len([d for d in cache.iterdir() if not d.name.startswith(".")]) == 1  # one shared set directory
    assert not list(cache.glob("*/*.part-*"))


def test_a_segmented_set_resumed_on_another_shape_restarts_the_epoch_with_a_warning(s3_set, tmp_path, caplog):
    """2 ranks stopped after one batch, resumed on 1 (the state training.progress hands a rank of another shape):
    a set read in segments cannot filter the consumed samples out, so the saved epoch restarts, said in one warning,
    and the resumed rank reads every sample of it once."""
    from training.progress import elastic_loader_state

    opts = dict(segment_shards=1, prefetch_segments=0, segmented=True, **SMALL)
    first = build_loader(s3_set.directory, "pretrain", 2, rank=0, world_size=2, **opts)
    next(iter(first))
    state = first.state_dict()
    first.close()
    ckpt = {"loader": [state], "progress": {"consumed": state["consumed"], "epoch": state["epoch"]}}
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        resumed = build_loader(s3_set.directory, "pretrain", 2, state=elastic_loader_state(ckpt), **opts)
        rest = epochs(resumed, 1)[0]
    assert any("resumes on another shape from the beginning of epoch 0" in r.message for r in caplog.records)
    assert ids(rest) == Counter(range(len(s3_set.videos)))
