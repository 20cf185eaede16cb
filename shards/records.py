"""The records a build keeps while it runs and leaves behind: a marker per finished shard, a finished part's
record, failures.jsonl's lines and manifest.json (its meaning for readers: `shards.format`).

    OUT/.build[/pIII]/done/NNNNNN.json   ShardMarker.to_json(), written once the shard's tar and index are in place
    OUT/.build/pIII/finished.json        PartRecord.to_json(), written last by a finished part, read by the merge
    OUT/failures.jsonl                   failure_lines()
    OUT/manifest.json                    manifest_record(), written last by a finished build or merge

The JSON of each is what these functions write, byte for byte as before they were dataclasses (state files are
written with sorted keys: `shards.resume`). A failure is the open dict failures.jsonl holds: "source", "reason",
"key" when known, and whatever an input reader adds (`shards.inputs.InputSet.rejected`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from shards import format as fmt

# The fields of a marker that manifest.json lists per shard.
MANIFEST_SHARD_FIELDS = ("tar", "index", "num_samples", "bytes", "sha256", "first_sample_id")


def _fields_of(cls: type, data: Any, what: str) -> dict:
    """The values of `cls`'s fields in the JSON object `data`; ValueError naming the first one missing."""
    if not isinstance(data, dict):
        raise ValueError(f"{what}: not a JSON object")
    missing = [f.name for f in fields(cls) if f.name not in data]
    if missing:
        raise ValueError(f"{what}: no {missing[0]!r}")
    return {f.name: data[f.name] for f in fields(cls)}


@dataclass
class ShardMarker:
    """One finished shard: its files, samples and the plan positions [plan_start, plan_end) it consumed (its
    samples and the failures between them)."""

    shard: int  # its number in this build (or part): NNNNNN of its file name
    tar: str  # file names inside the output directory
    index: str
    num_samples: int
    bytes: int  # of the tar
    sha256: str  # of the tar
    first_sample_id: int  # a part's are provisional until the merge renumbers them
    plan_start: int
    plan_end: int
    keys: list[str]  # its samples' keys, in order
    failures: list[dict]  # the videos of its plan range that failed, in plan order
    num_frames: int  # frames of its videos (all phases)
    duration: float  # seconds of its videos, rounded to 1e-6

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, what: str = "shard marker") -> ShardMarker:
        """ValueError (naming `what`) unless `data` holds every field."""
        return cls(**_fields_of(cls, data, what))

    def manifest_entry(self) -> dict:
        """Its entry in manifest.json's "shards"."""
        return {name: getattr(self, name) for name in MANIFEST_SHARD_FIELDS}


@dataclass
class PartRecord:
    """What a finished part of a partitioned build leaves for `shards.merge` (its finished.json)."""

    params: dict  # the build's identity, as every part and the manifest record it (`shards.plan.build_identity`)
    inputs_sha256: str
    part: list[int]  # [I, N]
    plan_range: list[int]  # [start, end): the plan positions it built
    ffmpeg: str  # the version that transcoded it
    classes: list[str]
    rejected: list[dict]  # the inputs rejected before transcoding (every part reads the same ones)
    num_inputs: int  # planned + rejected
    markers: list[ShardMarker]
    orphan_failures: list[dict]  # failures in no shard (only when the part wrote no shard at all)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, what: str = "part record") -> PartRecord:
        """ValueError (naming `what`) unless `data` holds every field and its markers are markers."""
        values = _fields_of(cls, data, what)
        if not isinstance(values["markers"], list):
            raise ValueError(f"{what}: 'markers' is not a list")
        values["markers"] = [ShardMarker.from_json(m, f"{what}: a marker") for m in values["markers"]]
        return cls(**values)

    @property
    def identity(self) -> dict:
        return {"params": self.params, "inputs_sha256": self.inputs_sha256}


def failure_lines(failures: list[dict]) -> str:
    """failures.jsonl: one JSON object per line, "source", "key", "reason" first, in that order, whether a record
    comes from this run or from a marker read back (markers are stored with sorted keys)."""
    first = ("source", "key", "reason")
    ordered = (
        {**{k: f[k] for k in first if k in f}, **{k: f[k] for k in sorted(f) if k not in first}} for f in failures
    )
    return "".join(json.dumps(f) + "\n" for f in ordered)


def manifest_record(
    identity: dict, classes: list[str], ffmpeg: str, markers: list[ShardMarker], num_failures: int, num_inputs: int
) -> dict:
    """manifest.json of a finished build from its shards' markers, in order (one build's, or a merge's with ids
    renumbered): `shards.format` says what readers rely on."""
    params = identity["params"]
    return {
        "format": fmt.FORMAT_VERSION,
        "split": params["split"],
        "codec": params["codec"],
        "params": params,
        "inputs_sha256": identity["inputs_sha256"],
        "ffmpeg": ffmpeg,
        "classes": classes,
        "num_samples": sum(m.num_samples for m in markers),
        "num_failures": num_failures,
        "num_inputs": num_inputs,
        "num_frames": sum(m.num_frames for m in markers),
        "duration": round(sum(m.duration for m in markers), 3),
        "shards": [m.manifest_entry() for m in markers],
        "keys": [k for m in markers for k in m.keys],
    }
