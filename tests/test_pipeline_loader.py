"""Epochs, last-batch policies, exact resume, corrupt samples, codec check and shard specifications."""

import json
import logging
import os

import numpy as np
import pipeline_shards as ps
import pytest
import torch

import pipeline.plan as plan_module
from pipeline import build_loader
from shards import format as fmt
from shards import ivf

SMALL = dict(num_frames=4, stride=4, input_size=48)


def records(batches) -> list:
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batches]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_training_epoch_drops_last_partial_batch_and_reshuffles():
    shards = ps.train_shards()
    loader = build_loader(shards.directory, "pretrain", 5, **SMALL)
    assert len(loader) == 2 and loader.num_samples == 12
    orders = []
    for epoch in range(3):
        assert loader.epoch == epoch
        ids = [i for b in loader for i in b["sample_id"].tolist()]
        assert len(ids) == 10 and len(set(ids)) == 10
        orders.append(ids)
    assert loader.epoch == 3 and loader.state_dict()["position"] == 0
    assert orders[0] != orders[1] != orders[2]


def test_training_epoch_with_padding_covers_every_sample():
    loader = build_loader(ps.train_shards().directory, "finetune", 5, drop_last=False, rand_augment=False, **SMALL)
    assert len(loader) == 3
    batches = list(loader)
    assert [b["video"].shape[0] for b in batches] == [5, 5, 5]  # DALI pads the last batch with repeats
    assert {i for b in batches for i in b["sample_id"].tolist()} == set(range(12))


def test_eval_yields_every_sample_exactly_once():
    shards = ps.eval_shards()
    loader = build_loader(shards.directory, "eval", 2, **SMALL)
    assert len(loader) == 3
    batches = list(loader)
    assert [b["video"].shape[0] for b in batches] == [30, 30, 15]  # 5 samples x 15 views, last batch trimmed
    ids = torch.cat([b["sample_id"] for b in batches])
    assert sorted(ids.tolist()) == sorted(list(range(5)) * 15)
    clip, crop = torch.cat([b["clip"] for b in batches]), torch.cat([b["crop"] for b in batches])
    for sid in range(5):
        views = sorted(zip(clip[ids == sid].tolist(), crop[ids == sid].tolist()))
        assert views == [(c, k) for c in range(5) for k in range(3)]
    labels = torch.cat([b["label"] for b in batches])
    assert all(labels[ids == v.sample_id].eq(v.label).all() for v in shards.videos)


@pytest.mark.parametrize("stop_after,never_empty,groups", [(2, False, 1), (4, False, 1), (2, True, 1), (2, True, 2)])
def test_resume_continues_exactly(stop_after, never_empty, groups, monkeypatch):
    """stop_after: mid-epoch, and exactly at the end of epoch 0 (4 batches). never_empty: fast-forward as on the
    GPU backend, decoding the first sample (per decoder group) of each skipped batch."""
    if never_empty:
        monkeypatch.setattr(plan_module, "NEVER_EMPTY_DEVICES", frozenset({"cpu", "gpu"}))
    directory = ps.train_shards().directory
    options = dict(num_repeats=2, debug_outputs=True, seed=7, decoder_groups=groups, **SMALL)
    uninterrupted = build_loader(directory, "pretrain", 3, **options)
    expected = records(list(uninterrupted) + list(uninterrupted))  # two epochs

    first = build_loader(directory, "pretrain", 3, **options)
    got = []
    for batch in first:
        got += records([batch])
        if len(got) == stop_after:
            break
    state = json.loads(json.dumps(first.state_dict()))  # what a trainer would save
    del first
    resumed = build_loader(directory, "pretrain", 3, state=state, **options)
    assert resumed.epoch == stop_after // 4 and resumed.position == stop_after % 4
    got += records(resumed)
    if stop_after < 4:
        got += records(resumed)
    assert_same_batches(got, expected)
    assert resumed.stats.fast_forwarded == stop_after % 4


def test_resume_with_other_settings_restarts_the_epoch(caplog):
    directory = ps.train_shards().directory
    loader = build_loader(directory, "pretrain", 3, **SMALL)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        resumed = build_loader(directory, "pretrain", 4, state=state, **SMALL)
    assert resumed.position == 0 and resumed.epoch == 0
    assert "restarting epoch 0" in caplog.text


def test_corrupt_samples_are_skipped_counted_and_reported(tmp_path, caplog):
    # sample 6 has 16 frames: its clip (start 0) decodes through the damaged bytes, which DALI reports without
    # naming the sample, so the loader must find it by decoding the batch's videos one by one
    shards = ps.make_corrupt_shards(tmp_path / "bad", [40] * 6 + [16, 40], garbage_at=1, truncated_at=4, damaged_at=6)
    bad = {v.sample_id for v in shards.videos if not v.valid}
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        loader = build_loader(shards.directory, "pretrain", 2, **SMALL)
        for _ in range(2):
            ids = [i for b in loader for i in b["sample_id"].tolist()]
            assert len(ids) == 8 and not bad & set(ids)  # substitutes are healthy neighbours
    assert loader.stats.corrupt_samples == 3
    lines = [r.getMessage() for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    for v in shards.videos:
        if not v.valid:
            assert any(f"{v.key}.mp4" in line and "train-00000" in line for line in lines)

    evaluator = build_loader(shards.directory, "eval", 3, state=loader.state_dict(), **SMALL)
    ids = torch.cat([b["sample_id"] for b in evaluator])
    assert sorted(ids.tolist()) == sorted([i for i in range(8) if i not in bad] * 15)


@pytest.mark.parametrize("container", ["ivf", "mp4"])
def test_corrupt_phase_members_are_skipped(tmp_path, caplog, container):
    # videos stored in 4 phases: sample 1's phase-0 member is random bytes (every eval view decodes phase 0),
    # sample 5's every member is (their cuts tables stay those of the intact members);
    videos = ps.make_test_shards(tmp_path / "good", [40] * 8, phases=4, container=container).videos
    rng = np.random.default_rng(0)
    garbage = lambda data: rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes()
    videos[1].phase_mp4s[0] = videos[1].mp4 = garbage(videos[1].mp4)
    videos[5].phase_mp4s = [garbage(m) for m in videos[5].phase_mp4s]
    videos[5].mp4 = videos[5].phase_mp4s[0]
    # sample 3's phase-0 member opens (index first) but its frame data is damaged: DALI's error names no sample,
    # so the loader decodes the batch's clips one by one, each from the member its phase picks
    if container == "mp4":
        damaged = ps.encode(ps.synthetic_frames(40, 64, 96, 3)[0::4], faststart=True)
        at, length = len(damaged) // 2, 1000
    else:  # the data of one frame (its size field intact: the stream still parses)
        frame = ivf.read_ivf(videos[3].mp4).frames[5]
        damaged, at, length = videos[3].mp4, frame.offset + ivf.FRAME_HEADER_SIZE, frame.size
    damaged = damaged[:at] + garbage(damaged[at : at + length]) + damaged[at + length :]
    videos[3].phase_mp4s[0] = videos[3].mp4 = damaged
    shards = ps.write_shards(tmp_path / "bad", videos, per_shard=4)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        evaluator = build_loader(shards.directory, "eval", 3, **SMALL)
        ids = torch.cat([b["sample_id"] for b in evaluator]).tolist()
    assert sorted(set(ids)) == [0, 2, 4, 6, 7] and len(ids) == 5 * 15
    lines = [r.getMessage() for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert len(lines) == 3 and all(any(f"vid000{i}.p0.{container}" in line for line in lines) for i in (1, 3, 5))
    trainer = build_loader(shards.directory, "pretrain", 2, **SMALL)
    for _ in range(2):  # sample 5 fails whichever phase a clip picks; sample 1 only when it picks phase 0
        ids = [i for b in trainer for i in b["sample_id"].tolist()]
        assert len(ids) == 8 and 5 not in ids


def test_cpu_backend_rejects_h264_shards_in_one_line(tmp_path):
    frames = ps.synthetic_frames(8, 64, 96, 0)
    videos = [ps.TestVideo(f"h{i}", ps.encode(frames, codec="h264"), 8, 0) for i in range(2)]
    shards = ps.write_shards(tmp_path / "h264", videos, per_shard=2, codec="h264")
    with pytest.raises(ValueError) as error:
        build_loader(shards.directory, "pretrain", 2, **SMALL)
    message = str(error.value)
    assert "\n" not in message and shards.tars[0] in message and "h264" in message
    # without a codec in the manifest, the codec is read from the first video
    manifest_path = os.path.join(shards.directory, fmt.MANIFEST_NAME)
    manifest = json.load(open(manifest_path))
    del manifest["codec"]
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(ValueError, match="codec h264"):
        build_loader(shards.tars, "pretrain", 2, **SMALL)


def test_shard_specifications_brace_glob_and_list():
    shards = ps.train_shards()
    brace = os.path.join(shards.directory, "train-{000000..000002}.tar")
    glob_spec = os.path.join(shards.directory, "train-*.tar")
    for spec in (brace, glob_spec, shards.tars, [shards.tars[0], shards.tars[1:]][0:1] + shards.tars[1:]):
        assert build_loader(spec, "pretrain", 2, **SMALL).num_samples == 12
    with pytest.raises(FileNotFoundError):
        build_loader(os.path.join(shards.directory, "train-{000000..000009}.tar"), "pretrain", 2, **SMALL)


def test_decoder_groups_split_the_batch_without_changing_it():
    directory = ps.train_shards().directory
    options = dict(num_repeats=2, debug_outputs=True, **SMALL)
    plain = records(build_loader(directory, "pretrain", 4, **options))
    grouped = records(build_loader(directory, "pretrain", 4, decoder_groups=3, **options))
    assert_same_batches(plain, grouped)


def test_decode_plan_never_leaves_a_decoder_group_empty():
    """Every decoder instance gets a sample in every iteration, skipped ones included, when it must never see an
    empty batch (NVDEC); without that need a skipped iteration decodes nothing."""
    plan = plan_module.DecodePlan(batch_size=5, groups=3, start=2, stop=4, never_empty=True)
    rows = [plan() for _ in range(5)]
    for i, row in enumerate(rows):
        assert row.dtype == np.int32 and row.shape == (5,)
        assert set(row[row >= 0].tolist()) == {0, 1, 2}, i
        assert (row < 0).any() == (i < 2 or i >= 4), i
    assert rows[2].tolist() == [0, 1, 2, 0, 1]
    lazy = plan_module.DecodePlan(batch_size=5, groups=3, start=1)
    assert (lazy() < 0).all() and (lazy() >= 0).all()
    with pytest.raises(ValueError, match="decoder_groups=3 exceeds batch_size=2"):
        build_loader(ps.train_shards().directory, "pretrain", 2, decoder_groups=3, **SMALL)


def test_hybrid_decoding_needs_cpu_decodable_shards(tmp_path):
    """The GPU backend's CPU decoder groups read only what DALI's CPU decoder reads: H.264 shards are refused in one
    line before any pipeline is built (no GPU needed to get there)."""
    from pipeline.config import PipelineConfig

    cfg = PipelineConfig(decoder_groups=4, cpu_decoder_groups=1).resolved()
    assert cfg.decodes_on("gpu") == {"cpu", "mixed"} and cfg.decodes_on("cpu") == {"cpu"}
    assert PipelineConfig(cpu_decoder_groups=1).resolved().decodes_on("gpu") == {"cpu"}
    assert PipelineConfig().resolved().decodes_on("gpu") == {"mixed"}
    with pytest.raises(ValueError, match="cpu_decoder_groups=3"):
        PipelineConfig(decoder_groups=2, cpu_decoder_groups=3).resolved()
    shards = ps.make_test_shards(tmp_path / "h264", [24, 30], height=48, width=64, per_shard=2, codec="h264")
    with pytest.raises(ValueError, match="h264 cannot be decoded by DALI's CPU video decoder") as error:
        build_loader(shards.directory, "pretrain", 2, device="gpu", decoder_groups=2, cpu_decoder_groups=1, **SMALL)
    assert "\n" not in str(error.value)


def test_gpu_backend_refuses_vp9_below_nvdec_minimum(shard_dirs, tmp_path):
    from pipeline.shardset import NVDEC_VP9_MIN_SIDE, ShardSet

    with pytest.raises(ValueError, match="below NVDEC") as error:
        ShardSet(str(shard_dirs["train"])).check_gpu_decodable()  # built at short side 96
    assert "\n" not in str(error.value) and str(shard_dirs["train"]) in str(error.value)
    manifest = json.loads((shard_dirs["train"] / fmt.MANIFEST_NAME).read_text())
    assert manifest["params"]["short_side"] < NVDEC_VP9_MIN_SIDE
    ShardSet(ps.train_shards().directory).check_gpu_decodable()  # no build settings: nothing to refuse


@pytest.mark.parametrize("cut_at", ["last_member", "half"])
def test_truncated_tars_are_refused_before_dali_reads_them(shard_dirs, tmp_path, cut_at):
    """A tar that ends inside its last member (DALI would segfault) or was cut in half (DALI would fail mid-epoch)
    is refused at construction, in one line naming the shard; with a manifest, any size change is."""
    import shutil

    copy = tmp_path / "train"
    shutil.copytree(shard_dirs["train"], copy)
    tar = fmt.resolve_shards(str(copy))[-1]
    data = open(tar, "rb").read()
    last_end = max(entry.offset + entry.size for sample in fmt.read_index(fmt.index_path_for(tar)) for entry in sample)
    keep = last_end - 100 if cut_at == "last_member" else len(data) // 2
    open(tar, "wb").write(data[:keep])
    with pytest.raises(ValueError) as error:
        build_loader(str(copy), "pretrain", 2, **SMALL)
    message = str(error.value)
    assert "\n" not in message and tar in message and "manifest lists" in message
    # without a manifest beside the tars, the index still tells
    os.remove(copy / fmt.MANIFEST_NAME)
    with pytest.raises(ValueError, match="points to byte") as error:
        build_loader(tar, "pretrain", 2, **SMALL)
    assert tar in str(error.value)
