"""The shards as DALI reads them: index files equal to DALI's own wds2idx output, the webdataset reader (with the
index files) returning every sample intact, decoded frame counts, and `shards.verify` passing and failing."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from shards import format as fmt
from shards import ivf
from shards.verify import _check_ivf_decoding, dali_frame_counts, verify
from shards.writer import ShardWriter


def all_tars(directory) -> list[str]:
    return fmt.resolve_shards(directory)


def tar_samples(tars: list[str]) -> list[dict[str, bytes]]:
    """Samples in shard order as Python's tarfile reads them: {ext: bytes}."""
    samples: list[dict[str, bytes]] = []
    for path in tars:
        last = None
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = fmt.split_member_name(member.name)
                if key != last:
                    samples.append({})
                    last = key
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def test_index_files_equal_wds2idx_output(shard_dirs, tmp_path):
    from wds2idx import IndexCreator  # DALI's own tool

    for _split, directory in shard_dirs.items():
        for tar in all_tars(directory):
            reference = tmp_path / "ref.idx"
            with IndexCreator(tar, str(reference), verbose=False) as creator:
                creator.create_index()
            assert open(fmt.index_path_for(tar)).read() == reference.read_text(), tar


def test_dali_webdataset_reader_reads_every_sample(shard_dirs):
    for _split, directory in shard_dirs.items():
        manifest = fmt.read_manifest(directory)
        tars = all_tars(directory)
        expected = tar_samples(tars)
        assert len(expected) == manifest["num_samples"]

        @pipeline_def(batch_size=1, num_threads=2, device_id=None)
        def reader():
            return tuple(
                fn.readers.webdataset(
                    paths=tars,
                    index_paths=[fmt.index_path_for(t) for t in tars],
                    ext=[fmt.IVF_EXT, fmt.CUTS_EXT, fmt.LABEL_EXT, fmt.META_EXT, fmt.INFO_EXT],
                    dtypes=[types.UINT8, types.INT32, types.UINT8, types.UINT8, types.INT32],
                    missing_component_behavior="error",
                    random_shuffle=False,
                    name="wds",
                )
            )

        pipe = reader()
        pipe.build()
        assert pipe.epoch_size("wds") == manifest["num_samples"]
        for sample_id, want in enumerate(expected):
            video, cuts, cls, meta, info = (np.array(out.at(0)) for out in pipe.run())
            assert hashlib.sha256(video.tobytes()).digest() == hashlib.sha256(want["ivf"]).digest()
            assert cuts.dtype == np.int32 and cuts.tobytes() == want["cuts"]
            assert cls.tobytes() == want["cls"] and meta.tobytes() == want["json"]
            assert info.dtype == np.int32 and info.shape == (3,)
            numbers = fmt.unpack_info(want["info"])
            assert info.tolist() == [numbers["num_frames"], numbers["label"], numbers["sample_id"]]
            assert numbers["sample_id"] == sample_id and manifest["keys"][sample_id] == json.loads(want["json"])["key"]


def test_dali_decodes_the_frame_counts_pyav_sees(shard_dirs):
    tars = all_tars(shard_dirs["train"])
    samples = tar_samples(tars)
    counts = dali_frame_counts(tars, len(samples), ext=fmt.IVF_EXT)
    for (frames, height, width), sample in zip(counts, samples):
        with av.open(io.BytesIO(sample["ivf"])) as container:
            decoded = list(container.decode(video=0))
        meta = json.loads(sample["json"])
        assert frames == len(decoded) == fmt.unpack_info(sample["info"])["num_frames"] == meta["num_frames"]
        assert (width, height) == (decoded[0].width, decoded[0].height) == (meta["width"], meta["height"])


def test_verify_cli_passes_on_good_shards(shard_dirs, run_module):
    proc = run_module("shards.verify", shard_dirs["val"])
    assert proc.returncode == 0, proc.stderr
    assert "DALI CPU decoder" in proc.stdout and "OK" in proc.stdout


def test_verify_finds_damage(shard_dirs, tmp_path):
    copy = tmp_path / "train"
    shutil.copytree(shard_dirs["train"], copy)
    assert verify(copy, decode=False) == []
    tar = copy / fmt.read_manifest(copy)["shards"][1]["tar"]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # inside the first video
    tar.write_bytes(bytes(data))
    problems = verify(copy, decode=False)
    assert any("sha256 differs" in p and tar.name in p for p in problems)

    shutil.rmtree(copy)
    shutil.copytree(shard_dirs["train"], copy)
    idx = copy / fmt.read_manifest(copy)["shards"][0]["index"]
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")  # two samples swapped
    assert any("index disagrees with the tar" in p for p in verify(copy, decode=False))


def one_sample_shards(out: Path, source: dict[str, bytes], meta: dict, classes: list[str], **replaced) -> Path:
    """A one-sample IVF shard directory holding `source`'s members, with `meta` as its json/info and members
    replaced by `replaced` (ext -> bytes)."""
    out.mkdir()
    members = {
        **source,
        "json": json.dumps(meta).encode(),
        **replaced,
        "info": fmt.pack_info(meta["num_frames"], meta["label"], 0),
    }
    writer = ShardWriter(out, fmt.shard_name("train", 0), out)
    writer.add_sample(meta["key"], [(ext, members[ext]) for ext in fmt.Layout().member_exts])
    record = writer.close()
    manifest = {
        "format": fmt.FORMAT_VERSION,
        "split": "train",
        "codec": "vp9",
        "num_samples": 1,
        "num_failures": 0,
        "params": {"container": "ivf"},
        "classes": classes,
        "keys": [meta["key"]],
        "shards": [
            {
                "tar": record.tar,
                "index": record.index,
                "num_samples": 1,
                "bytes": record.bytes,
                "sha256": record.sha256,
                "first_sample_id": 0,
            }
        ],
    }
    (out / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    (out / fmt.FAILURES_NAME).write_text("")
    return out


def test_verify_catches_a_wrong_frame_claim(shard_dirs, tmp_path):
    """A shard whose .info/.json claim one frame more than the IVF holds (everything else consistent)."""
    source = tar_samples(all_tars(shard_dirs["train"]))[0]
    meta = json.loads(source["json"])
    meta.update(num_frames=meta["num_frames"] + 1, sample_id=0)
    classes = fmt.read_manifest(shard_dirs["train"])["classes"]
    problems = verify(one_sample_shards(tmp_path / "bad", source, meta, classes))
    assert any(f"IVF holds {meta['num_frames'] - 1} frames, info claims {meta['num_frames']}" in p for p in problems)


def test_verify_checks_every_entry_of_the_cuts_table(shard_dirs, tmp_path):
    """A cuts table that disagrees with its member is found structurally; a key frame row that points at an
    ordinary frame is found by decoding from it (the decode check does not trust our own VP9 header parser)."""
    source = next(s for s in tar_samples(all_tars(shard_dirs["train"])) if len(ivf.read_ivf(s["ivf"]).keyframes) > 1)
    meta = json.loads(source["json"])
    meta["sample_id"] = 0
    classes = fmt.read_manifest(shard_dirs["train"])["classes"]
    assert verify(one_sample_shards(tmp_path / "good", source, meta, classes)) == []

    rows = fmt.unpack_cuts(source["cuts"]).copy()
    second_key = int(np.flatnonzero(rows[:, 3] == fmt.CUT_KEY)[1])
    rows[second_key, 3], rows[second_key + 2, 3] = fmt.CUT_FRAME, fmt.CUT_KEY  # a key frame moved 2 frames on
    lying = rows.astype("<i4").tobytes()
    problems = verify(one_sample_shards(tmp_path / "lying", source, meta, classes, cuts=lying), decode=False)
    assert any("cuts table differs" in p for p in problems), problems

    tar = all_tars(tmp_path / "lying")[0]
    decode_problems = _check_ivf_decoding([tar], fmt.Layout(), lambda sid, ext: meta["num_frames"], lambda *a: "count")
    moved = int(rows[second_key + 2, 1])
    assert any(f"from key frame {moved}" in p or "does not decode" in p for p in decode_problems), decode_problems


@pytest.mark.parametrize("codec", ["h264", "mjpeg"])
def test_other_codec_shards_verify(synth_root, tmp_path, run_module, codec):
    out = tmp_path / codec
    videos = sorted((synth_root / "val").rglob("*.mp4"))[:3]
    listing = tmp_path / "l.list"
    listing.write_text("".join(f"{v}\t{v.parent.name}\n" for v in videos))
    run_module(
        "shards.build",
        "--list",
        listing,
        "--split",
        "val",
        "--out",
        out,
        "--codec",
        codec,
        "--short-side",
        64,
        "--quiet",
        check=True,
    )
    proc = run_module("shards.verify", out)
    assert proc.returncode == 0, proc.stderr
    if codec == "h264":  # DALI's CPU decoder refuses H.264: verify says it used ffmpeg
        assert "counting decoded frames with ffmpeg" in proc.stdout
    else:
        assert "DALI CPU decoder: 3 samples" in proc.stdout


def test_phase_shards_build_and_verify(synth_root, tmp_path, run_module):
    out = tmp_path / "phases"
    videos = sorted((synth_root / "val").rglob("*.mp4"))[:3]
    listing = tmp_path / "l.list"
    listing.write_text("".join(f"{v}\t{v.parent.name}\n" for v in videos))
    run_module(
        "shards.build",
        "--list",
        listing,
        "--split",
        "val",
        "--out",
        out,
        "--phases",
        4,
        "--short-side",
        64,
        "--quiet",
        check=True,
    )
    proc = run_module("shards.verify", out)
    assert proc.returncode == 0, proc.stderr
    assert "DALI CPU decoder: 12 IVF members whole" in proc.stdout
    samples = tar_samples(all_tars(out))
    assert len(samples) == 3
    for sample in samples:
        assert sorted(sample) == sorted(["p0.ivf", "p1.ivf", "p2.ivf", "p3.ivf", "cuts", "cls", "json", "info"])
        assert json.loads(sample["json"])["phases"] == 4
        n = fmt.unpack_info(sample["info"])["num_frames"]
        with av.open(io.BytesIO(sample["p3.ivf"])) as container:  # PyAV's count, independent of the builder's
            assert sum(1 for _ in container.decode(video=0)) == len(range(3, n, 4))
    assert json.loads((out / fmt.MANIFEST_NAME).read_text())["params"]["phases"] == 4
    # verify notices a sample that lacks one of its phase members
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tar = all_tars(broken)[0]
    with tarfile.open(tar) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t]
    dropped = next(name for name, _ in members if name.endswith(".p3.ivf"))
    writer = ShardWriter(broken, Path(tar).name, broken)
    for key in dict.fromkeys(name.partition(".")[0] for name, _ in members):
        writer.add_sample(
            key,
            [
                (name.partition(".")[2], data)
                for name, data in members
                if name.partition(".")[0] == key and name != dropped
            ],
        )
    writer.close()
    problems = verify(broken, check_sha=False, decode=False)
    assert any(dropped.partition(".")[0] in p and "members" in p for p in problems), problems
