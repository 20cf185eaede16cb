"""Shard sets in object storage: publishing to a real S3 API (moto's server on 127.0.0.1, started here), verifying
by URL, and the node-local cache's downloads (sums, retries, bound, sharing) against moto and a local HTTP server."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pipeline_shards as ps
import pytest
from conftest import module_env
from remote_servers import FaultyHTTPServer, moto_server, s3_env

from bench.netlab import Throttle
from shards import format as fmt
from shards.cache import CacheFull, ShardCache
from shards.fetch import FetchError, Retry
from shards.publish import publish, upload
from shards.remote import download_set, open_remote_set, split_spec
from shards.verify import verify_url

FAST = Retry(attempts=4, backoff=0.01)


@pytest.fixture(scope="module")
def s3(request):
    """The endpoint of a moto S3 server for this module, with the environment pointing s3fs at it."""
    with moto_server() as endpoint:
        saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
        os.environ.update(s3_env(endpoint))
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("s3://bkt")
        yield endpoint
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3fs_now():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


def bucket_objects(prefix: str) -> dict[str, bytes]:
    """name -> bytes of every object under `prefix` (s3://bkt/...), read back independently of shards.remote."""
    fs = s3fs_now()
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in bucket_names(prefix, fs)}


def bucket_names(prefix: str, fs=None) -> list[str]:
    """Keys under `prefix/`, nothing read: safe to poll while an upload is landing (listing then reading raced with
    it: a NoSuchKey for the prefix itself, seen once in a loaded test run)."""
    return (fs or s3fs_now()).find(prefix.rstrip("/") + "/")


def test_split_spec():
    assert split_spec("s3://b/k/train/") == ("s3://b/k/train", None)
    assert split_spec("s3://b/k/train/manifest.json") == ("s3://b/k/train", None)
    assert split_spec("gs://b/t/train-{000001..000002}.tar") == ("gs://b/t", ["train-000001.tar", "train-000002.tar"])
    with pytest.raises(ValueError, match="one prefix"):
        split_spec("s3://b/{x,y}/train-000000.tar")


def test_publish_uploads_verified_set_manifest_last_and_verify_url_passes(s3, shard_dirs, run_module, tmp_path):
    local = shard_dirs["val"]
    proc = run_module("shards.publish", local, "s3://bkt/val", "--no-decode", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    objects = bucket_objects("s3://bkt/val")
    manifest = fmt.read_manifest(local)
    expected = {n for s in manifest["shards"] for n in (s["tar"], s["index"])} | {fmt.MANIFEST_NAME, fmt.FAILURES_NAME}
    assert set(objects) == expected
    for name in expected - {fmt.MANIFEST_NAME}:
        assert objects[name] == (local / name).read_bytes(), name
    import json

    published = json.loads(objects[fmt.MANIFEST_NAME])
    for shard in published["shards"]:
        idx = (local / shard["index"]).read_bytes()
        assert shard["index_bytes"] == len(idx) and shard["index_sha256"] == hashlib.sha256(idx).hexdigest()
    assert {k: v for k, v in published.items() if k != "shards"} == {k: v for k, v in manifest.items() if k != "shards"}
    # verify by URL: downloaded (each object against the manifest) and checked like a directory, decoding included
    assert verify_url("s3://bkt/val", str(tmp_path / "dl")) == []
    # a second publish sends nothing and changes nothing
    assert upload(local, "s3://bkt/val") == 0
    assert bucket_objects("s3://bkt/val") == objects


def test_publish_refuses_to_overwrite_other_bytes(s3, shard_dirs):
    local = shard_dirs["val"]
    first_tar = fmt.read_manifest(local)["shards"][0]["tar"]
    s3fs_now().pipe_file(f"s3://bkt/clash/{first_tar}", b"someone else's shard")
    problems = publish(local, "s3://bkt/clash", decode=False)
    assert len(problems) == 1 and f"s3://bkt/clash/{first_tar}" in problems[0] and "not overwritten" in problems[0]
    assert bucket_objects("s3://bkt/clash") == {first_tar: b"someone else's shard"}  # nothing else, no manifest


def test_publish_refuses_a_set_that_fails_verification(s3, tmp_path):
    shards = ps.train_shards()  # written by the tests' own writer: no sums in its manifest, so verify refuses it
    problems = publish(shards.directory, "s3://bkt/unverified", decode=False)
    assert problems and "not published" in problems[-1]
    assert bucket_objects("s3://bkt/unverified") == {}


def test_publish_killed_midway_and_rerun_ends_identical(s3, shard_dirs):
    """A publish through a slow link is killed (SIGKILL) after its first objects landed; run again, the prefix holds
    exactly what an uninterrupted publish leaves."""
    local = shard_dirs["train"]
    assert upload(local, "s3://bkt/whole") > 0
    whole = bucket_objects("s3://bkt/whole")
    port = int(s3.rsplit(":", 1)[1])
    total = sum(len(v) for v in whole.values())
    with Throttle(port, rate=None, upload_rate=total / 4) as slow:  # the whole upload would take ~4 s
        env = {**module_env(), **s3_env(f"http://127.0.0.1:{slow.port}")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "shards.publish", str(local), "s3://bkt/killed", "--no-decode"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not bucket_names("s3://bkt/killed") and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = bucket_objects("s3://bkt/killed")
    assert partial and fmt.MANIFEST_NAME not in partial and len(partial) < len(whole)
    assert all(whole[name] == data for name, data in partial.items())  # whole objects or none
    assert upload(local, "s3://bkt/killed") == len(whole) - len(partial)
    assert bucket_objects("s3://bkt/killed") == whole


def test_cache_reads_s3_set_checked_and_within_its_bound(s3, shard_dirs, tmp_path):
    local = shard_dirs["train"]
    upload(local, "s3://bkt/cached")
    remote = open_remote_set("s3://bkt/cached/train-{000000..000002}.tar", FAST)
    sizes = {n: remote.entry(n)["bytes"] for n in remote.names}
    indexes = sum(remote.entry(n)["index_bytes"] for n in remote.names) + len(remote.manifest_text)
    limit = indexes + max(sizes.values()) * 2 + 1  # room for two tars at a time
    cache = ShardCache(tmp_path / "cache", limit, FAST, wait_s=0.5)
    directory = cache.prepare(remote)
    for n in remote.names:
        assert (directory / remote.entry(n)["index"]).read_bytes() == (local / remote.entry(n)["index"]).read_bytes()
    a, b, c = remote.names
    for name in (a, b):
        cache.pin(directory / name)
        assert cache.ensure(remote, name).read_bytes() == (local / name).read_bytes()
        assert cache.usage() <= limit
    with pytest.raises(CacheFull, match="bound"):  # both pinned: no room for a third
        cache.ensure(remote, c)
    assert not list(directory.glob("*.part-*")) and cache.usage() <= limit
    cache.unpin(directory / a)
    cache.pin(directory / c)
    assert cache.ensure(remote, c).read_bytes() == (local / c).read_bytes()
    assert not (directory / a).exists() and (directory / b).exists()  # the unpinned one was evicted
    assert cache.usage() <= limit


def _ensure_in_child(url: str, root: str, limit: int, name: str, out: str) -> None:
    cache = ShardCache(root, limit, FAST)
    remote = open_remote_set(url, FAST)
    cache.prepare(remote)
    Path(out).write_text(str(cache.ensure(remote, name)))


def test_http_retries_500s_and_dropped_connections_ranks_share_one_download(tmp_path):
    shards = ps.train_shards()
    served = tmp_path / "served"
    served.mkdir()
    upload_dir = Path(shards.directory)
    # the tests' writer leaves sums out of the manifest: add them as publish does, then serve the directory
    from shards.publish import published_manifest

    manifest = published_manifest(upload_dir, fmt.read_manifest(upload_dir))
    for s in manifest["shards"]:
        for name in (s["tar"], s["index"]):
            (served / name).write_bytes((upload_dir / name).read_bytes())
    fmt.write_manifest(served, manifest)
    a, b, c = (s["tar"] for s in manifest["shards"])
    with FaultyHTTPServer(served) as server:
        server.faults = {a: ["500", "500"], b: ["drop"]}
        remote = open_remote_set(f"{server.url}/manifest.json", FAST)
        cache = ShardCache(tmp_path / "cache", 1 << 30, FAST)
        cache.prepare(remote)
        for name in (a, b):
            assert cache.ensure(remote, name).read_bytes() == (served / name).read_bytes()
        assert server.gets[a] == 3 and server.gets[b] == 2
        # two processes of one node ask for the same tar at once: one GET
        ctx = multiprocessing.get_context("spawn")
        kids = [
            ctx.Process(
                target=_ensure_in_child,
                args=(f"{server.url}/manifest.json", str(tmp_path / "cache"), 1 << 30, c, str(tmp_path / f"o{i}")),
            )
            for i in range(2)
        ]
        for k in kids:
            k.start()
        for k in kids:
            k.join(120)
            assert k.exitcode == 0
        assert server.gets[c] == 1
        assert (tmp_path / "o0").read_text() == (tmp_path / "o1").read_text()


def test_bytes_differing_from_the_manifest_are_refused(tmp_path):
    shards = ps.train_shards()
    from shards.publish import published_manifest

    src = Path(shards.directory)
    served = tmp_path / "served"
    served.mkdir()
    manifest = published_manifest(src, fmt.read_manifest(src))
    for s in manifest["shards"]:
        for name in (s["tar"], s["index"]):
            (served / name).write_bytes((src / name).read_bytes())
    fmt.write_manifest(served, manifest)
    name = manifest["shards"][1]["tar"]
    data = bytearray((served / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    (served / name).write_bytes(bytes(data))
    with FaultyHTTPServer(served) as server:
        remote = open_remote_set(server.url, FAST)
        cache = ShardCache(tmp_path / "cache", 1 << 30, FAST)
        directory = cache.prepare(remote)
        with pytest.raises(FetchError) as err:
            cache.ensure(remote, name)
        assert "\n" not in str(err.value) and name in str(err.value) and "sha256" in str(err.value)
        assert server.gets[name] == 2  # downloaded twice, then refused
        assert not (directory / name).exists() and not list(directory.glob("*.part-*"))
        # download_set (verify by URL) refuses it the same way
        with pytest.raises(FetchError, match="sha256"):
            download_set(remote, tmp_path / "dl", FAST)


def test_build_with_an_out_url_builds_in_staging_and_publishes(s3, shard_build_args, shard_dirs, tmp_path):
    from shards.build import main as build_main

    args = list(shard_build_args["val"])
    args[args.index("--out") + 1] = "s3://bkt/built"
    assert build_main([*args, "--staging", str(tmp_path / "staging")]) == 0
    built = bucket_objects("s3://bkt/built")
    assert fmt.MANIFEST_NAME in built
    staged = tmp_path / "staging"
    for name in set(built) - {fmt.MANIFEST_NAME}:
        assert built[name] == (staged / name).read_bytes()
    # the same videos build the same tars as the fixture's local build
    local = shard_dirs["val"]
    for shard in fmt.read_manifest(local)["shards"]:
        assert built[shard["tar"]] == (local / shard["tar"]).read_bytes()
    with pytest.raises(SystemExit) as stop:
        build_main([*args])  # a URL without --staging: a usage error, nothing built
    assert stop.value.code == 2
