"""The state that lets an interrupted build continue: `OUT/.build/` while a build runs, gone once it finishes.

    OUT/.build/params.json         the build's identity: output-affecting settings + a hash of the planned inputs
    OUT/.build/done/NNNNNN.json    one marker per finished shard, written after its tar and index are renamed in
    OUT/.build/work/               ffmpeg's temporary outputs and the `.partial` shard being written

How resume works. The planned order is a pure function of the inputs and the seed, and the builder writes shards
strictly in that order, so finished shards are always a prefix. Each marker records the plan positions the shard
consumed ([plan_start, plan_end): its samples and the failures between them), its sample ids, size and sha256.
A re-run with the same arguments keeps the longest prefix of shards whose marker, tar (size as recorded) and index
are present, deletes partial files, and continues at the plan position where the last kept shard ended, with the
next sample id after it. Consequences:
- sample ids stay contiguous, and a resumed build is byte-identical to an uninterrupted one whenever each video's
  outcome is deterministic (transcoding is: fixed encoder threads and flags);
- a video that failed inside a kept shard's range (e.g. a timeout on an overloaded machine) stays a failure: its
  failure line is carried over from the marker. Videos in the unfinished part are retried. To retry everything,
  use --overwrite;
- a re-run with different settings or inputs refuses to touch the directory (it names what differs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from shards.format import FAILURES_NAME, MANIFEST_NAME, index_path_for

STATE_DIR = ".build"


class BuildConflict(RuntimeError):
    """The output directory holds a different build (one-line message)."""


def inputs_digest(items: list, classes: list[str]) -> str:
    """sha256 of the planned inputs (key, source, label name, in plan order) and the class list."""
    h = hashlib.sha256()
    h.update(json.dumps(classes).encode())
    for v in items:
        h.update(json.dumps([v.key, v.source, v.label_name]).encode())
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _describe_difference(old: dict, new: dict) -> str:
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


@dataclass
class ResumePoint:
    complete: bool = False  # a finished build with these exact settings is already there
    markers: list[dict] = field(default_factory=list)  # kept shards, in order


class BuildState:
    def __init__(self, out_dir: str | os.PathLike, split: str) -> None:
        self.out_dir = Path(out_dir)
        self.split = split
        self.dir = self.out_dir / STATE_DIR
        self.done_dir = self.dir / "done"
        self.work_dir = self.dir / "work"

    def _our_shard_files(self) -> list[Path]:
        import re

        pattern = re.compile(rf"^{re.escape(self.split)}-\d{{6}}\.(tar|idx)$")
        return sorted(p for p in self.out_dir.iterdir() if pattern.match(p.name)) if self.out_dir.is_dir() else []

    def clear(self) -> None:
        """Remove everything a build of this split writes (for --overwrite)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        for p in self._our_shard_files() + [self.out_dir / MANIFEST_NAME, self.out_dir / FAILURES_NAME]:
            p.unlink(missing_ok=True)

    def prepare(self, identity: dict, overwrite: bool) -> ResumePoint:
        """Decide what of an earlier build to keep; leave `work_dir` empty and `params.json` written."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.clear()
        manifest_path = self.out_dir / MANIFEST_NAME
        if manifest_path.is_file():
            with open(manifest_path) as f:
                manifest = json.load(f)
            old = {"params": manifest.get("params"), "inputs_sha256": manifest.get("inputs_sha256")}
            if old == identity:
                return ResumePoint(complete=True)
            what = _describe_difference(old["params"] or {}, identity["params"]) or "the inputs differ"
            raise BuildConflict(f"{self.out_dir} already holds a finished build with other settings or inputs "
                                f"({what}); use --overwrite or another --out")
        params_path = self.dir / "params.json"
        markers: list[dict] = []
        if params_path.is_file():
            with open(params_path) as f:
                old = json.load(f)
            if old != identity:
                what = _describe_difference(old.get("params", {}), identity["params"]) or "the inputs differ"
                raise BuildConflict(f"{self.out_dir} holds an unfinished build with other settings or inputs "
                                    f"({what}); re-run the original command to finish it, or use --overwrite")
            markers = self._valid_prefix()
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        _write_json(params_path, identity)
        return ResumePoint(markers=markers)

    def _valid_prefix(self) -> list[dict]:
        kept: list[dict] = []
        for path in sorted(self.done_dir.glob("*.json")) if self.done_dir.is_dir() else []:
            try:
                with open(path) as f:
                    marker = json.load(f)
            except (OSError, ValueError):
                break
            tar = self.out_dir / marker["tar"]
            expected_first = kept[-1]["first_sample_id"] + kept[-1]["num_samples"] if kept else 0
            if (marker.get("shard") != len(kept) or marker.get("first_sample_id") != expected_first
                    or not tar.is_file() or tar.stat().st_size != marker["bytes"]
                    or not os.path.isfile(index_path_for(tar))):
                break
            kept.append(marker)
        # Markers after the first bad one describe shards that will be rebuilt.
        for path in sorted(self.done_dir.glob("*.json"))[len(kept):] if self.done_dir.is_dir() else []:
            path.unlink()
        return kept

    def record_shard(self, marker: dict) -> None:
        _write_json(self.done_dir / f"{marker['shard']:06d}.json", marker)

    def remove_stale_shards(self, num_shards: int) -> list[str]:
        """Delete this split's shard files numbered >= num_shards (left by an earlier, larger build)."""
        removed = []
        for p in self._our_shard_files():
            if int(p.stem.rsplit("-", 1)[1]) >= num_shards:
                p.unlink()
                removed.append(p.name)
        return removed

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
