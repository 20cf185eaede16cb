"""The options of one shard build (`python -m shards.build`): made once from the command line, then frozen.

`BuildOptions.resolve` fills the defaults that depend on other options before anything runs: the shard size (1000 MB
unless a sample count bounds the shards), the container (IVF for VP9, else MP4), the keyframe interval (per container
and phases: `shards.transcode.default_gop`) and, for this machine's pool, the workers (the CPUs available).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from shards.transcode import EncodeSettings, default_gop

DEFAULT_SHARD_SIZE_MB = 1000.0


@dataclass(frozen=True)
class BuildOptions:
    # inputs: exactly one of csv, list_file, folders (`shards.inputs.collect_inputs`)
    csv: str | None
    list_file: str | None
    folders: str | None
    root: str | None
    classes: str | None
    all_rows: bool
    # output
    out: str
    split: str
    seed: int
    shard_size_mb: float | None  # None only when samples_per_shard bounds the shards
    samples_per_shard: int | None
    overwrite: bool
    # transcoding: what decides the bytes of each video (`encode_settings`)
    codec: str
    short_side: int
    fps: float | None
    container: str
    gop: int
    quality: int | None
    threads: int
    phases: int
    min_frames: int
    tolerate_decode_errors: bool
    timeout: float
    # running
    workers: int | None  # None only with executor "ray": the cluster's CPUs / threads
    part: str | None  # "I/N", "none", or None: a Slurm array task's part, else the whole build
    executor: str  # "local" or "ray"
    ray_address: str | None
    quiet: bool

    @classmethod
    def resolve(cls, **given: Any) -> BuildOptions:
        """The options from the values given (every field, None for "not given"), with the defaults that depend on
        other options filled in. `given` is not changed."""
        given = dict(given)
        if given["shard_size_mb"] is None and given["samples_per_shard"] is None:
            given["shard_size_mb"] = DEFAULT_SHARD_SIZE_MB
        if given["container"] is None:
            given["container"] = EncodeSettings(codec=given["codec"]).effective_container
        if given["gop"] is None:
            given["gop"] = default_gop(given["container"], given["phases"])
        if given["workers"] is None and given["executor"] == "local":
            given["workers"] = len(os.sched_getaffinity(0))
        return cls(**given)

    @property
    def max_shard_bytes(self) -> int | None:
        return int(self.shard_size_mb * 1e6) if self.shard_size_mb else None

    def encode_settings(self) -> EncodeSettings:
        """The encoder settings (ValueError, one line, for a combination they refuse: IVF with H.264, ...)."""
        return EncodeSettings(
            codec=self.codec,
            short_side=self.short_side,
            fps=self.fps,
            gop=self.gop,
            quality=self.quality,
            threads=self.threads,
            min_frames=self.min_frames,
            timeout=self.timeout,
            tolerate_decode_errors=self.tolerate_decode_errors,
            phases=self.phases,
            container=self.container,
        )

    @property
    def layout(self) -> str:
        """How the videos are stored, for the summary line: 'vp9 in ivf, 4 phases'."""
        return f"{self.codec} in {self.container}" + (f", {self.phases} phases" if self.phases > 1 else "")
