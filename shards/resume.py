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
- a re-run with different settings or inputs refuses to touch the directory (it names what differs);
- a re-run of a finished build checks that every shard its manifest lists is there, with its size, before it
  says there is nothing to do (a deleted or truncated shard is an error naming it; `shards.verify` checks sha256);
- a build that stops for a failure of our own (disk full, I/O error: see `shards.build`) leaves exactly the state
  of a killed one: the re-run retries every video after the last finished shard.

    OUT/.build.lock                held (flock) by the build writing OUT; a second build refuses to start

The lock lives beside `.build/`, not in it: `.build/` is deleted and re-made while the lock is held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from shards.format import FAILURES_NAME, MANIFEST_NAME, index_path_for
from shards.writer import write_file_atomically

STATE_DIR = ".build"
LOCK_NAME = ".build.lock"


class BuildConflict(RuntimeError):
    """The output directory holds a different build (one-line message)."""


class BuildLocked(RuntimeError):
    """Another build holds the output directory (one-line message naming it)."""


class OutputLock:
    """An exclusive lock on an output directory for the length of a build: `OUT/.build.lock`, flock'ed, holding
    the holder's pid, host and start time (for the refusal message of a second build).

    The kernel drops the lock when its holder dies, whatever kills it, so a stale file never blocks a re-run. The
    holder deletes the file before it lets go; a build that opened the file just before that checks, once it holds
    the lock, that the file it locked is still the one at the path, and starts over if not (else two builds could
    each hold a lock on a different file).
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, creating OUT if needed. Raises BuildLocked, or OSError when OUT is not writable."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(self.out_dir))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise BuildLocked(f"{self.out_dir}: another build is writing here ({holder}); wait for it to finish "
                                  f"or stop it (lock file {self.path})") from None
            if self._is_current(fd):
                self._fd = fd
            else:
                os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        with contextlib.suppress(OSError):  # only for the message of a refused build: a full disk must not stop us
            os.ftruncate(self._fd, 0)
            os.write(self._fd, (json.dumps(holder) + "\n").encode())

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "it has not written its pid yet"

    def release(self) -> None:
        """Delete the lock file, then let go of the lock (see the class docstring for the order)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def inputs_digest(items: list, classes: list[str]) -> str:
    """sha256 of the planned inputs (key, source, label name, in plan order) and the class list."""
    h = hashlib.sha256()
    h.update(json.dumps(classes).encode())
    for v in items:
        h.update(json.dumps([v.key, v.source, v.label_name]).encode())
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    write_file_atomically(path, json.dumps(data, indent=1, sort_keys=True))


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; BuildConflict naming the file when it is unreadable or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise BuildConflict(f"{path}: unreadable ({' '.join(str(e).split())}); use --overwrite to start "
                            f"over") from None
    if not isinstance(data, dict):
        raise BuildConflict(f"{path}: not a JSON object; use --overwrite to start over")
    return data


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
            manifest = _read_json(manifest_path)
            old = {"params": manifest.get("params"), "inputs_sha256": manifest.get("inputs_sha256")}
            if old == identity:
                self._check_finished(manifest)
                shutil.rmtree(self.dir, ignore_errors=True)  # left if a build died right after its manifest
                return ResumePoint(complete=True)
            what = _describe_difference(old["params"] or {}, identity["params"]) or "the inputs differ"
            raise BuildConflict(f"{self.out_dir} already holds a finished build with other settings or inputs "
                                f"({what}); use --overwrite or another --out")
        params_path = self.dir / "params.json"
        markers: list[dict] = []
        if params_path.is_file():
            old = _read_json(params_path)
            if old != identity:
                what = _describe_difference(old.get("params", {}), identity["params"]) or "the inputs differ"
                raise BuildConflict(f"{self.out_dir} holds an unfinished build with other settings or inputs "
                                    f"({what}); re-run the original command to finish it, or use --overwrite")
            markers = self._valid_prefix()
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._remove_temp_files()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        _write_json(params_path, identity)
        return ResumePoint(markers=markers)

    def _remove_temp_files(self) -> None:
        """Temp files a killed build may have left beside the shards (index, failures, manifest; see
        `write_file_atomically`): they would otherwise stay in OUT for good."""
        pattern = re.compile(rf"^({re.escape(self.split)}-\d{{6}}\.idx|{re.escape(MANIFEST_NAME)}|"
                             rf"{re.escape(FAILURES_NAME)})\.tmp$")
        for p in self.out_dir.iterdir():
            if pattern.match(p.name):
                p.unlink(missing_ok=True)

    def _check_finished(self, manifest: dict) -> None:
        """BuildConflict naming the first shard of a finished build that is missing or has another size than its
        manifest lists (deleted, truncated or replaced since): "nothing to do" would be a lie."""
        problems = []
        for shard in manifest.get("shards") or []:
            tar, index = self.out_dir / str(shard.get("tar")), self.out_dir / str(shard.get("index"))
            if not tar.is_file():
                problems.append(f"{tar.name} is missing")
            elif tar.stat().st_size != shard.get("bytes"):
                problems.append(f"{tar.name} has {tar.stat().st_size} bytes, the manifest lists {shard.get('bytes')}")
            elif not index.is_file():
                problems.append(f"its index {index.name} is missing")
        if not manifest.get("shards"):
            problems.append("the manifest lists no shards")
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise BuildConflict(f"{self.out_dir} holds this build's {MANIFEST_NAME}, but {problems[0]}{more}: "
                                f"restore the file(s), or re-run with --overwrite to rebuild "
                                f"(`python -m shards.verify {self.out_dir}` checks every shard)")

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
