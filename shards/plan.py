"""Planning a build: the order samples are written in, the share of it each part builds, and the identity that
makes two builds the same build.

The plan is the inputs sorted by key (independent of listing order), then shuffled by --seed: a pure function of
the inputs and the seed, which is what lets an interrupted build resume (`shards.resume`) and several machines
build parts of one plan. Part I of N builds the contiguous plan positions [I*P//N, (I+1)*P//N) (`part_range`):
contiguous, not strided, so that the parts concatenated in order are the plan order of a one-machine build, and
the merge only has to shift each part's sample ids by the samples before it (no sample moves between files; see
shards.format and shards.merge). The plan is shuffled, so a contiguous range is as balanced a share of the work as
a strided one.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping

from shards.inputs import InputSet, VideoInput
from shards.options import BuildOptions
from shards.resume import inputs_digest
from shards.transcode import EncodeSettings

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def split_name_problem(split: str) -> str | None:
    """Why `split` cannot name shard files inside --out (`{split}-NNNNNN.tar`), or None."""
    if not split:
        return "it is empty"
    if "/" in split or "\\" in split or os.sep in split:
        return "it contains a path separator"
    if ".." in split:
        return "it contains '..'"
    if not _SPLIT_NAME.fullmatch(split):
        return "use letters, digits, '_', '-' and '.' (not first)"
    return None


def plan_order(videos: list[VideoInput], seed: int) -> list[VideoInput]:
    """The order samples are written in: sorted by key (independent of listing order), then shuffled by seed."""
    order = sorted(videos, key=lambda v: v.key)
    random.Random(seed).shuffle(order)
    return order


def part_range(plan_size: int, index: int, count: int) -> tuple[int, int]:
    """The plan positions [start, end) that part `index` of `count` builds: contiguous, sizes differing by at
    most one, together every position exactly once (see the module docstring for why contiguous)."""
    return index * plan_size // count, (index + 1) * plan_size // count


def parse_part(spec: str) -> tuple[int, int] | None:
    """`--part I/N` as (I, N); None for 'none'. ValueError (one line) when it is neither."""
    if spec.strip().lower() == "none":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m:
        raise ValueError(f"--part {spec!r}: expected I/N, e.g. 0/4 (part I of N, I from 0), or 'none'")
    index, count = int(m[1]), int(m[2])
    if count < 1 or index >= count:
        raise ValueError(f"--part {spec}: I must be 0..N-1 and N at least 1")
    return index, count


def slurm_part(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(I, N) of a Slurm array task, or None outside one: I = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
    SLURM_ARRAY_TASK_STEP, N = SLURM_ARRAY_TASK_COUNT, so `--array=1-8` and `--array=0-14:2` work as `0-7`.
    ValueError (one line) for an array that is not one evenly spaced range (`--array=1,4,5`)."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    try:
        task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
        first, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        last = int(env.get("SLURM_ARRAY_TASK_MAX", first + (count - 1) * step))
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"Slurm array task: SLURM_ARRAY_TASK_ID/COUNT/MIN/MAX/STEP unreadable ({e}); pass --part I/N"
        ) from None
    index, off_step = divmod(task - first, step) if step > 0 else (-1, 0)
    if off_step or not 0 <= index < count or last != first + (count - 1) * step:
        raise ValueError(
            f"Slurm array task {task}: the array (min {first}, max {last}, step {step}, {count} tasks) is "
            f"not one evenly spaced range; pass --part I/N (or --part none)"
        )
    return index, count


def resolve_part(spec: str | None, env: Mapping[str, str]) -> tuple[int, int] | None:
    """The part this build makes: --part when given, else the Slurm array task's, else None (the whole plan)."""
    return parse_part(spec) if spec is not None else slurm_part(env)


def build_identity(options: BuildOptions, settings: EncodeSettings, plan: list[VideoInput], inputs: InputSet) -> dict:
    """What makes two builds the same build (resume, re-runs and the parts of one merge compare it): every
    setting that affects the output, and a hash of the planned inputs and the classes. As stored in params.json
    and the manifest: {"params": {...}, "inputs_sha256": str}."""
    params = {
        "split": options.split,
        **settings.output_params(),
        "seed": options.seed,
        "shard_size_mb": options.shard_size_mb,
        "samples_per_shard": options.samples_per_shard,
        "input": {
            "csv": options.csv,
            "list": options.list_file,
            "folders": options.folders,
            "root": options.root,
            "classes": options.classes,
            "all_rows": options.all_rows,
        },
    }
    return {"params": params, "inputs_sha256": inputs_digest(plan, inputs.classes)}
