"""Decoding strategies that must never change a batch: several DALI pipelines per rank (`pipelines`), and the
strategy timed and chosen at start (`decode="auto"`). CPU backend here; the GPU versions at the end are skipped
without a CUDA device (bench/gpu.sh checks runs them).

Every comparison is against the single-pipeline loader with the same seed: the same samples, frame indices, crops,
masks and pixels, in the same order, in every output key (debug_outputs=True adds frames, boxes, frame indices and
sources).
"""

import json
import logging

import numpy as np
import pipeline_shards as ps
import pytest
import torch

import pipeline.plan as plan_module
import pipeline.strategy as strategy_module
from pipeline import build_loader
from pipeline.config import PipelineConfig

SMALL = dict(num_frames=4, stride=4, input_size=48)


def records(batches) -> list:
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in batches]


def assert_same_batches(a: list, b: list, keys: tuple[str, ...] | None = None) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in keys or tuple(x):
            if isinstance(x[key], torch.Tensor):
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key].to(x[key].device)), key
            else:
                assert x[key] == y[key], key


def two_epochs(loader) -> list:
    return records(list(loader) + list(loader))


# -- several pipelines --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,batch,strategy",
    [
        ("pretrain", 4, dict(pipelines=2)),
        ("pretrain", 5, dict(pipelines=3)),  # rows 0,3 / 1,4 / 2: uneven shares
        ("pretrain", 4, dict(pipelines=2, decoder_groups=2)),
        ("eval", 3, dict(pipelines=2)),  # last batch trimmed: 5 samples, batch 3
    ],
)
def test_pipelines_yield_the_single_pipeline_batches(mode, batch, strategy):
    shards = ps.train_shards() if mode == "pretrain" else ps.eval_shards()
    options = dict(debug_outputs=True, seed=3, **SMALL, **({"num_repeats": 2} if mode == "pretrain" else {}))
    single = two_epochs(build_loader(shards.directory, mode, batch, **options))
    # a thread per pipeline: the rank's budget (the cores' share by default) never lowers the pipelines asked for
    several = build_loader(shards.directory, mode, batch, num_threads=strategy["pipelines"], **options, **strategy)
    assert len(several._run.pipes) == strategy["pipelines"]
    assert_same_batches(single, two_epochs(several))


def test_pipelines_in_finetuning_keep_samples_frames_and_crops():
    """RandAugment's and the erasing noise's inner draws are made per decoded sub-batch (as with decoder groups and
    on resume), so only they may differ; without them every key is equal."""
    directory = ps.train_shards().directory
    options = dict(debug_outputs=True, seed=4, num_repeats=2, num_threads=2, **SMALL)
    plain = dict(rand_augment=False, erase_prob=0.0)
    assert_same_batches(
        records(build_loader(directory, "finetune", 4, **options, **plain)),
        records(build_loader(directory, "finetune", 4, pipelines=2, **options, **plain)),
    )
    assert_same_batches(
        records(build_loader(directory, "finetune", 4, **options)),
        records(build_loader(directory, "finetune", 4, pipelines=2, **options)),
        keys=("sample_id", "label", "frame_idx", "box", "source"),
    )


def test_many_threads_per_pipeline():
    """Well above 16 threads per pipeline (the GPU suite sweeps 32 and more; NVDEC decodes one video per thread):
    96 threads for the rank, far above its cores (honoured as asked), 48 in each of 2 pipelines."""
    directory = ps.train_shards().directory
    options = dict(num_repeats=2, debug_outputs=True, **SMALL)
    expected = records(build_loader(directory, "pretrain", 4, **options))
    many = build_loader(directory, "pretrain", 4, num_threads=96, pipelines=2, **options)
    assert many.pipeline_threads == [48, 48]
    assert_same_batches(expected, records(many))


@pytest.mark.parametrize("stop_after,never_empty", [(2, False), (5, False), (2, True)])
def test_resume_with_several_pipelines_continues_exactly(stop_after, never_empty, monkeypatch):
    """Mid-epoch, and in the second epoch; never_empty: fast-forward as on the GPU backend, where each pipeline
    decodes its first rows of every skipped batch. The saved state does not depend on the strategy: a run saved
    with 2 pipelines resumes with 1 and the other way round."""
    if never_empty:
        monkeypatch.setattr(plan_module, "NEVER_EMPTY_DEVICES", frozenset({"cpu", "gpu"}))
    directory = ps.train_shards().directory
    options = dict(num_repeats=2, debug_outputs=True, seed=7, num_threads=2, **SMALL)
    expected = two_epochs(build_loader(directory, "pretrain", 3, **options))  # 4 batches per epoch
    for saved_with, resumed_with in ((2, 2), (2, 1), (1, 2)):
        first = build_loader(directory, "pretrain", 3, pipelines=saved_with, **options)
        got = []
        while len(got) < stop_after:
            for batch in first:
                got += records([batch])
                if len(got) == stop_after:
                    break
        state = json.loads(json.dumps(first.state_dict()))
        del first
        resumed = build_loader(directory, "pretrain", 3, state=state, pipelines=resumed_with, **options)
        assert (resumed.epoch, resumed.position) == divmod(stop_after, 4)
        got += records(resumed)
        if resumed.epoch == 1:
            got += records(resumed)
        assert_same_batches(got, expected)
        assert resumed.stats.fast_forwarded == stop_after % 4


def test_corrupt_samples_are_recovered_with_several_pipelines(tmp_path, caplog):
    """The failing pipeline's error triggers the usual recovery (find, block, rebuild every pipeline at the same
    position); the batches are those of one pipeline recovering from the same samples."""
    shards = ps.make_corrupt_shards(tmp_path / "bad", [40] * 6 + [16, 40], garbage_at=1, truncated_at=4, damaged_at=6)
    bad = {v.sample_id for v in shards.videos if not v.valid}
    options = dict(seed=2, debug_outputs=True, num_threads=2, **SMALL)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        single = build_loader(shards.directory, "pretrain", 2, **options)
        expected = two_epochs(single)
        several = build_loader(shards.directory, "pretrain", 2, pipelines=2, **options)
        got = two_epochs(several)
    assert several.stats.corrupt_samples == single.stats.corrupt_samples == 3 and several.stats.rebuilds >= 1
    assert not bad & {i for b in got for i in b["sample_id"].tolist()}
    assert_same_batches(expected, got)
    evaluator = build_loader(
        shards.directory, "eval", 3, pipelines=2, num_threads=2, state=several.state_dict(), **SMALL
    )
    ids = torch.cat([b["sample_id"] for b in evaluator])
    assert sorted(ids.tolist()) == sorted([i for i in range(8) if i not in bad] * 15)


def test_decode_plans_of_several_pipelines_partition_every_batch():
    """Pipeline i of P decodes rows i::P, cycling through its decoder groups; a skipped iteration decodes nothing,
    or (never_empty) exactly `groups` of the pipeline's own rows, one per group."""
    batch, pipelines, groups = 7, 3, 2
    plans = [
        plan_module.DecodePlan(batch, groups, start=1, never_empty=True, share=(i, pipelines)) for i in range(pipelines)
    ]
    skipped, decoded = [p() for p in plans], [p() for p in plans]
    owner = np.full(batch, -1)
    for i, row in enumerate(decoded):
        mine = np.flatnonzero(row >= 0)
        assert mine.tolist() == list(range(i, batch, pipelines))
        assert row[mine].tolist() == [j % groups for j in range(len(mine))]
        assert (owner[mine] == -1).all()
        owner[mine] = i
    assert (owner >= 0).all()
    for i, row in enumerate(skipped):
        kept = np.flatnonzero(row >= 0)
        assert kept.tolist() == list(range(i, batch, pipelines))[:groups] and sorted(row[kept]) == [0, 1]
    lazy = plan_module.DecodePlan(batch, groups, start=1, share=(1, pipelines))
    assert (lazy() < 0).all() and (lazy() >= 0).sum() == 2


def test_strategy_options_are_checked_in_one_line():
    directory = ps.train_shards().directory
    with pytest.raises(ValueError, match="pipelines=3 x decoder_groups=2 exceeds batch_size=5") as error:
        build_loader(directory, "pretrain", 5, pipelines=3, decoder_groups=2, **SMALL)
    assert "\n" not in str(error.value)
    for bad, match in (
        (dict(pipelines=0), "pipelines=0"),
        (dict(decode="fastest"), "decode='fastest'"),
        (dict(auto_batches=0), "auto_batches=0"),
    ):
        with pytest.raises(ValueError, match=match):
            PipelineConfig(**bad).resolved()


# -- decode="auto" ------------------------------------------------------------------------------------------------
def test_auto_decode_times_candidates_logs_them_and_keeps_the_batches(caplog):
    directory = ps.train_shards().directory
    options = dict(num_repeats=2, debug_outputs=True, seed=11, num_threads=2, **SMALL)
    fixed = two_epochs(build_loader(directory, "pretrain", 4, **options))
    with caplog.at_level(logging.INFO, logger="pipeline"):
        auto = build_loader(directory, "pretrain", 4, decode="auto", auto_batches=2, **options)
    table = auto.decode_table
    strategies = [(r["pipelines"], r["decoder_groups"], r["cpu_decoder_groups"]) for r in table]
    assert strategies == [(1, 1, 0), (1, 2, 0), (2, 1, 0), (2, 2, 0)]
    assert all(r["clips_per_s"] > 0 for r in table)
    # each candidate built with its share of the 2 threads, as DALI reports them
    assert [r["threads"] for r in table] == [[2], [2], [1, 1], [1, 1]]
    chosen = (auto.cfg.pipelines, auto.cfg.decoder_groups, auto.cfg.cpu_decoder_groups)
    assert chosen in strategies and len(auto._run.pipes) == auto.cfg.pipelines
    best = max(table, key=lambda r: r["clips_per_s"])
    assert chosen == (best["pipelines"], best["decoder_groups"], best["cpu_decoder_groups"])
    message = next(r.getMessage() for r in caplog.records if "decode=auto" in r.getMessage())
    assert len(message.splitlines()) == 1 + len(table)
    assert sum(line.lstrip().startswith("->") for line in message.splitlines()) == 1
    # nothing the timing decoded was handed out: the run starts at the epoch's first batch, as the fixed one
    assert (auto.epoch, auto.position, auto.stats.batches) == (0, 0, 0)
    assert_same_batches(fixed, two_epochs(auto))


def test_auto_decode_keeps_the_fastest_and_survives_failing_candidates(monkeypatch, caplog):
    """The mechanism, with made-up timings: the fastest candidate that ran wins; one that fails is logged and
    skipped; when none runs, the configured strategy stays. A resumed auto run continues exactly."""
    rates = {(1, 1): 10.0, (1, 2): 30.0, (2, 1): RuntimeError("no decoder here"), (2, 2): 20.0}

    def fake(self, cfg, epoch, row=None):
        rate = rates[(cfg.pipelines, cfg.decoder_groups)]
        if isinstance(rate, Exception):
            raise rate
        return rate

    monkeypatch.setattr(strategy_module, "time_strategy", fake)
    directory = ps.train_shards().directory
    options = dict(num_repeats=2, debug_outputs=True, seed=5, num_threads=2, **SMALL)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        auto = build_loader(directory, "pretrain", 4, decode="auto", **options)
    assert (auto.cfg.pipelines, auto.cfg.decoder_groups) == (1, 2)
    assert "failed (no decoder here)" in caplog.text and "-> pipelines=1 decoder_groups=2" in caplog.text
    first = records([next(iter(auto))])
    resumed = build_loader(directory, "pretrain", 4, decode="auto", state=auto.state_dict(), **options)
    expected = records(build_loader(directory, "pretrain", 4, **options))
    assert_same_batches(expected, first + records(resumed))

    rates.update({key: RuntimeError("broken") for key in rates})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        fallback = build_loader(directory, "pretrain", 4, decode="auto", pipelines=2, **options)
    assert (fallback.cfg.pipelines, fallback.cfg.decoder_groups) == (2, 1)
    assert "none ran, keeping the configured one" in caplog.text


def test_auto_candidates_respect_batch_size_and_start_with_the_configured_strategy():
    directory = ps.train_shards().directory
    loader = build_loader(directory, "pretrain", 3, pipelines=3, num_threads=3, **SMALL)
    candidates = strategy_module.candidates(loader._builder, loader.cfg)
    assert candidates == [(3, 1, 0), (1, 1, 0), (1, 2, 0), (2, 1, 0)]  # 2 x 2 > batch 3
    # one thread for the rank: one pipeline (the configured 3 lowered with a warning), never 2 to time
    single = build_loader(directory, "pretrain", 3, pipelines=3, num_threads=1, **SMALL)
    assert single.cfg.pipelines == 1
    assert strategy_module.candidates(single._builder, single.cfg) == [(1, 1, 0), (1, 2, 0)]


# -- GPU backend (skipped without CUDA) -----------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_train_shards():
    """NVDEC decodes VP9 only from 128x128 up (the clips encoded here, or pre-built: tests/pipeline_shards.py)."""
    return ps.gpu_train_shards()


@gpu
@pytest.mark.parametrize(
    "strategy",
    [
        dict(pipelines=2),
        dict(pipelines=2, decoder_groups=2),
        dict(pipelines=2, decoder_groups=2, cpu_decoder_groups=1),
        dict(decode="auto", auto_batches=1),
    ],
)
def test_gpu_strategies_yield_the_single_pipeline_batches(strategy):
    directory = gpu_train_shards().directory
    options = dict(num_repeats=2, seed=5, debug_outputs=True, device="gpu", num_threads=32, **SMALL)
    single = two_epochs(build_loader(directory, "pretrain", 4, **options))
    assert_same_batches(single, two_epochs(build_loader(directory, "pretrain", 4, **options, **strategy)))


@gpu
def test_gpu_resume_with_two_pipelines():
    directory = gpu_train_shards().directory
    options = dict(num_repeats=2, seed=9, debug_outputs=True, device="gpu", pipelines=2, **SMALL)
    expected = records(build_loader(directory, "pretrain", 4, **options))
    first = build_loader(directory, "pretrain", 4, **options)
    got = records([next(iter(first))])
    resumed = build_loader(directory, "pretrain", 4, state=first.state_dict(), **options)
    assert_same_batches(expected, got + records(resumed))
