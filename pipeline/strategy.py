"""Choosing how a rank decodes, before its first pipeline is built: what NVDEC gets from IVF shards, and (with
`decode="auto"`) the fastest decoding strategy. Neither changes a batch.

What NVDEC reads (`choose_nvdec_input`). On the GPU backend with IVF shards, decided once per process and device by
decoding one real clip on both backends: cut members (the design), else whole members (each clip decoded from its
member's start), else nothing (CPU threads decode, the GPU augments). Each fallback costs speed and is said in one
WARNING line.

Choosing the strategy (`decode="auto"`, `choose_strategy`). The loader times candidate strategies (pipelines 1/2 x
decoder groups 1/2, the configured one first; on the GPU backend also hybrids with CPU decoder groups where the shards
are CPU-decodable) on pipelines built for the timing only, each with the threads it would run with (the rank's thread
budget split between its pipelines, `pipeline.plan.EpochBuilder`; more pipelines than the budget has threads are not
tried), over `auto_batches` batches after one untimed batch, keeps the fastest for the rest of the run and logs the
table (INFO), with the threads each candidate's pipelines were built with. The batches handed out come from fresh
pipelines, so they are exactly those of any fixed strategy.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from typing import Any

import numpy as np
import torch

from pipeline import graph
from pipeline.config import PipelineConfig
from pipeline.plan import EpochBuilder
from pipeline.recovery import error_reason
from pipeline.shardset import ShardSet
from shards import format as fmt

log = logging.getLogger(__name__)
# (device id, first tar) -> how IVF members reach NVDEC ("cut", "whole" or "cpu") and why, probed once per process
_NVDEC_INPUT: dict[tuple, tuple[str, str]] = {}


# -- what NVDEC gets from IVF shards ----------------------------------------------------------------------------------
def choose_nvdec_input(shards: ShardSet, cfg: PipelineConfig, device_id: int | None) -> tuple[PipelineConfig, bool]:
    """(cfg, cut): `cfg` with every decoder group on CPU threads if NVDEC cannot read these IVF shards, and whether
    IVF members are cut at a key frame before NVDEC gets them. Probed once per process and device (`probe_nvdec`)."""
    key = (device_id, shards.tars[0])
    if key not in _NVDEC_INPUT:
        _NVDEC_INPUT[key] = probe_nvdec(shards, cfg.stride, device_id)
    choice, why = _NVDEC_INPUT[key]
    if choice == "whole":
        log.warning(
            "pipeline: NVDEC does not read IVF members cut at a key frame (%s); handing them to it whole "
            "(each clip decoded from its member's start)",
            why,
        )
        return cfg, False
    if choice == "cpu":
        log.warning(
            "pipeline: NVDEC cannot read these IVF shards (%s); decoding them on CPU threads and "
            "augmenting on the GPU (rebuild with --container mp4 to decode on NVDEC)",
            why,
        )
        return dataclasses.replace(cfg, cpu_decoder_groups=cfg.decoder_groups), True
    return cfg, True


def probe_nvdec(shards: ShardSet, stride: int, device_id: int | None) -> tuple[str, str]:
    """("cut" | "whole" | "cpu", the reason for a fallback): one clip of the first sample, from its second key
    frame on where it has one, decoded by NVDEC and by the CPU decoder, must agree."""
    tar = next(t for t in shards.tars if shards.index(t)[1])
    sample = shards.index(tar)[1][0]
    video = shards.read_member(tar, *sample.components[shards.video_exts[0]][:2])
    cuts = shards.read_member(tar, *sample.components[fmt.CUTS_EXT][:2])
    rows = fmt.unpack_cuts(cuts)
    member0 = rows[rows[:, 0] == 0]
    keys = member0[member0[:, 3] == fmt.CUT_KEY, 1]
    length = int(member0[member0[:, 3] == fmt.CUT_END, 1][0])
    first = int(keys[1]) if len(keys) > 1 else 0
    step = stride // shards.phases
    frames = np.array([shards.phases * min(first + j * step, length - 1) for j in range(4)], dtype=np.int32)
    inputs = {
        "video": [np.frombuffer(video, dtype=np.uint8)],
        "frame_idx": [frames],
        "cuts": [np.frombuffer(cuts, dtype="<i4")],
    }

    def decoded(device: str, cut: bool) -> np.ndarray:
        pipe = graph.build_probe(shards.layout, stride, device, device_id, cut=cut)
        try:
            pipe.build()
            _, clip = pipe.run(**inputs)
            return np.array(clip.as_cpu()[0]).astype(np.int16)
        finally:
            del pipe

    reference = decoded("cpu", True)
    why = "?"
    for choice, cut in (("cut", True), ("whole", False)):
        try:
            frames_gpu = decoded("gpu", cut)
        except RuntimeError as e:
            why = error_reason(e)
            continue
        if frames_gpu.shape == reference.shape and np.abs(frames_gpu - reference).mean() < 2.0:
            return choice, why
        why = f"its frames differ from the CPU decoder's (shape {frames_gpu.shape} vs {reference.shape})"
    return "cpu", why


# -- decode="auto" --------------------------------------------------------------------------------------------------
def candidates(builder: EpochBuilder, cfg: PipelineConfig) -> list[tuple[int, int, int]]:
    """(pipelines, decoder_groups, cpu_decoder_groups) to time, the configured one first: 1 or 2 pipelines x 1
    or 2 decoder groups; on the GPU backend also hybrids (CPU groups beside NVDEC) where the shards are CPU-
    decodable, and only CPU groups where NVDEC cannot read them (see choose_nvdec_input). Never more pipelines
    than the thread budget has threads, nor more decoder instances than the batch has rows."""
    grid = [(p, g) for p in (1, 2) for g in (1, 2)]
    if builder.device == "cpu":
        found = [(p, g, 0) for p, g in grid]
    elif cfg.cpu_decoder_groups == cfg.decoder_groups:  # CPU decoding, GPU augmentation (chosen or forced)
        found = [(p, g, g) for p, g in grid]
    else:
        found = [(p, g, 0) for p, g in grid]
        try:
            builder.shards.check_cpu_decodable()
            found += [(1, 2, 1), (1, 3, 2), (2, 2, 1)]
        except ValueError:  # H.264 and other codecs DALI's CPU decoder refuses: NVDEC only
            pass
    configured = (cfg.pipelines, cfg.decoder_groups, cfg.cpu_decoder_groups)
    unique = dict.fromkeys([configured] + found)
    budget = builder.thread_budget()
    return [s for s in unique if s[0] * s[1] <= builder.batch_size and s[0] <= budget]


def time_strategy(builder: EpochBuilder, cfg: PipelineConfig, epoch: int, row: dict | None = None) -> float:
    """Decoded clips/s of `cfg`'s strategy over cfg.auto_batches batches of `epoch`, after one untimed batch
    (start-up and the first decodes), on pipelines built for this only and dropped after. `row["threads"]`: the
    CPU threads of each of those pipelines, as DALI built them, set before the timing (so a failed run has it)."""
    run = builder.build(cfg, epoch, 0)
    if row is not None:
        row["threads"] = [pipe.num_threads for pipe in run.pipes]
    try:
        run.begin(0, stop=None)
        run.outputs()
        start = time.perf_counter()
        for _ in range(cfg.auto_batches):
            run.outputs()
        if builder.device == "gpu":
            torch.cuda.synchronize(torch.device("cuda", builder.device_id))
        return builder.batch_size * cfg.auto_batches / (time.perf_counter() - start)
    finally:
        del run
        gc.collect()


def choose_strategy(builder: EpochBuilder, cfg: PipelineConfig, epoch: int) -> tuple[PipelineConfig, list[dict]]:
    """(cfg with the fastest strategy, the table of what was timed: strategy and clips/s or error) for
    decode="auto": every candidate timed on `epoch` (each row also holds "threads", the CPU threads of each of its
    pipelines, when they were built); the table logged at INFO. When none runs, `cfg` is kept."""
    table = []
    for pipelines, groups, cpu_groups in candidates(builder, cfg):
        trial = dataclasses.replace(cfg, pipelines=pipelines, decoder_groups=groups, cpu_decoder_groups=cpu_groups)
        row: dict[str, Any] = {"pipelines": pipelines, "decoder_groups": groups, "cpu_decoder_groups": cpu_groups}
        try:
            row["clips_per_s"] = round(time_strategy(builder, trial, epoch, row), 2)
        except RuntimeError as error:  # a strategy this machine cannot run, or a corrupt first batch
            row["error"] = error_reason(error)
        table.append(row)
    timed = [r for r in table if "clips_per_s" in r]
    best = max(timed, key=lambda r: r["clips_per_s"]) if timed else None
    lines = [
        f"  {'->' if r is best else '  '} pipelines={r['pipelines']} decoder_groups={r['decoder_groups']} "
        f"cpu_decoder_groups={r['cpu_decoder_groups']} threads={'+'.join(map(str, r.get('threads', ['?'])))}: "
        + (f"{r['clips_per_s']:.1f} clips/s" if "clips_per_s" in r else f"failed ({r['error']})")
        for r in table
    ]
    log.info(
        "pipeline: decode=auto timed %d batches of %d clips per strategy (%s backend, a budget of %d CPU threads "
        "split between each strategy's pipelines: threads=per pipeline); %s:\n%s",
        cfg.auto_batches,
        builder.batch_size,
        builder.device,
        builder.thread_budget(),
        "keeping the fastest (->)" if best else "none ran, keeping the configured one",
        "\n".join(lines),
    )
    if best is None:
        return cfg, table
    chosen = dataclasses.replace(
        cfg,
        pipelines=best["pipelines"],
        decoder_groups=best["decoder_groups"],
        cpu_decoder_groups=best["cpu_decoder_groups"],
    )
    return chosen, table
