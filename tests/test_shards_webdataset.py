"""Interop: the plain `webdataset` library (no DALI) reads the shards `shards.build` writes, sample by sample.

The shards are the session's real builds (`shard_dirs` in conftest: the default layout) and one `--phases 2` build
of the val split. What a sample should hold is taken from the build itself (the manifest's keys and build
parameters, the DALI index beside each tar), and compared with the member set that `shards/format.py` documents
for those parameters. Labels are checked against the build's input CSV, video bytes against the tar members read
with `tarfile`, and frame counts by decoding with PyAV (an FFmpeg binding independent of DALI).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest

from shards import format as fmt

wds = pytest.importorskip("webdataset")
av = pytest.importorskip("av")

# what webdataset adds to each sample besides the members
WDS_FIELDS = {"__key__", "__url__", "__local_path__"}


def documented_exts(params: dict) -> set[str]:
    """The member extensions of one sample as shards/format.py documents them, for a build with these manifest
    `params`: the video member(s) (KEY.mp4 / KEY.ivf, or KEY.p0.* ... KEY.p{P-1}.* with `phases` P), the cuts
    table of IVF layouts, and KEY.cls, KEY.json, KEY.info. A build records `phases` and `container` only when they
    differ from 1 and mp4."""
    phases, container = params.get("phases", 1), params.get("container", "mp4")
    video = {container} if phases == 1 else {f"p{p}.{container}" for p in range(phases)}
    return video | ({"cuts"} if container == "ivf" else set()) | {"cls", "json", "info"}


def indexed_samples(directory: Path, manifest: dict) -> dict[str, tuple[str, list[str]]]:
    """key -> (tar path, member extensions in tar order), from the DALI index file of every shard in the manifest
    (lines `ext offset size name` per member, one line per sample)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for shard in manifest["shards"]:
        samples = fmt.read_index(directory / shard["index"])
        assert len(samples) == shard["num_samples"], shard
        for sample in samples:
            keys = {fmt.split_member_name(entry.name)[0] for entry in sample}
            key = fmt.split_member_name(sample[0].name)[0]
            assert key not in out and keys == {key}, sample
            out[key] = (str(directory / shard["tar"]), [entry.ext for entry in sample])
    return out


def csv_label_names(path: str) -> dict[str, str]:
    """Video file stem -> label name, from the official-style Kinetics CSV the build read."""
    with open(path, newline="") as f:
        return {
            f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}": r["label"]
            for r in csv.DictReader(f)
        }


@pytest.fixture(scope="module")
def phase_shards(shard_dirs, shard_build_args, tmp_path_factory) -> Path:
    """The val split again with `--phases 2` (its class list from the train build, like the val fixture)."""
    from shards.build import main as build_main

    args = list(shard_build_args["val"])
    out = tmp_path_factory.mktemp("wds") / "val-p2"
    args[args.index("--out") + 1] = str(out)
    assert build_main([*args, "--phases", "2"]) == 0
    return out


@pytest.fixture(params=["train", "val", "val-phases2"])
def built(request, shard_dirs, shard_build_args) -> tuple[Path, dict, dict[str, str]]:
    """(shard directory, its manifest, label names of its input CSV)."""
    split = request.param.split("-")[0]
    directory = request.getfixturevalue("phase_shards") if request.param.endswith("phases2") else shard_dirs[split]
    args = shard_build_args[split]
    return directory, fmt.read_manifest(directory), csv_label_names(args[args.index("--csv") + 1])


def read_all(directory: Path, manifest: dict) -> list[dict]:
    """Every sample as the plain webdataset pipeline yields it (raw bytes per member), shards in manifest order."""
    urls = [str(directory / s["tar"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=True))


def test_every_sample_read_once_with_documented_members(built):
    directory, manifest, csv_labels = built
    params = manifest["params"]
    expected_exts = documented_exts(params)
    index = indexed_samples(directory, manifest)
    assert sorted(index) == sorted(manifest["keys"])

    samples = read_all(directory, manifest)
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == manifest["num_samples"]
    assert keys == manifest["keys"]  # shard order = sample-id order
    per_tar = {str(directory / s["tar"]): s["num_samples"] for s in manifest["shards"]}
    assert {u: sum(s["__url__"] == u for s in samples) for u in per_tar} == per_tar

    tars = {u: tarfile.open(u) for u in per_tar}
    try:
        for s in samples:
            key, members = s["__key__"], set(s) - WDS_FIELDS
            tar, indexed_exts = index[key]
            assert s["__url__"] == tar
            assert members == set(indexed_exts) == expected_exts, key
            for ext in members:  # every member's bytes, the video(s) included, are the tar member's
                assert s[ext] == tars[tar].extractfile(f"{key}.{ext}").read(), f"{key}.{ext}"

            meta, info = json.loads(s["json"]), fmt.unpack_info(s["info"])
            label_name = csv_labels[Path(meta["source"]).stem]
            label = manifest["classes"].index(label_name)
            assert int(s["cls"]) == meta["label"] == info["label"] == label, key
            assert meta["label_name"] == label_name and meta["key"] == key
            assert info["sample_id"] == meta["sample_id"] == manifest["keys"].index(key)
            assert info["num_frames"] == meta["num_frames"] > 0
            assert meta.get("phases", 1) == params.get("phases", 1)
    finally:
        for t in tars.values():
            t.close()


def test_pyav_decodes_every_video_member_to_the_json_frame_count(built):
    directory, manifest, _ = built
    phases = manifest["params"].get("phases", 1)
    for s in read_all(directory, manifest):
        meta = json.loads(s["json"])
        video_exts = sorted(e for e in s if e not in WDS_FIELDS and e.split(".")[-1] in ("mp4", "ivf"))
        assert len(video_exts) == phases
        counts = []
        for ext in video_exts:
            with av.open(io.BytesIO(s[ext])) as container:
                counts.append(sum(1 for _ in container.decode(video=0)))
                shape = container.streams.video[0].codec_context
                assert (shape.width, shape.height) == (meta["width"], meta["height"]), ext
        # member p holds frames p, p + P, ...: ceil((n - p) / P) of them; all members together hold n
        assert counts == [fmt.phase_frames(meta["num_frames"], phases, p) for p in range(phases)], s["__key__"]
        assert sum(counts) == meta["num_frames"]


def test_dataloader_workers_split_the_shards_without_repeats(shard_dirs):
    """With a torch DataLoader, webdataset gives each worker its own shards: together they read each sample once."""
    import torch

    directory = shard_dirs["train"]
    manifest = fmt.read_manifest(directory)
    urls = [str(directory / s["tar"]) for s in manifest["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).map(lambda s: (s["__key__"], int(s["cls"])))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    got = list(loader)
    assert sorted(k for k, _ in got) == sorted(manifest["keys"])
    assert len(got) == manifest["num_samples"]
