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

Partitioned builds (`--part I/N`, see `shards.build` and `shards.merge`): each part is a build of its own range of
the plan, with the same files one level down and its own lock:

    OUT/.build/p{III}/params.json  the build's identity (the same for every part) + the part and its plan range
    OUT/.build/p{III}/done/, work/ as above, for this part's shards `{split}-p{III}-NNNNNN.tar`
    OUT/.build/p{III}/finished.json  written last by a finished part: what the merge needs (shards, failures, ...)
    OUT/.build.p{III}.lock         held by the build of part III: a second build of the same part refuses

A part holds `OUT/.build.lock` shared, so N parts build side by side while a one-machine build or `shards.merge`
(which take it exclusively) can run only alone. Part states stay after the part finishes; `shards.merge` deletes
`.build/` once it has written the manifest. A part's samples carry provisional ids from its first plan position
on (`id_base`); the merge renumbers them (see `shards.format`).
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

from shards.format import (
    FAILURES_NAME,
    MANIFEST_NAME,
    atomic_write,
    index_path_for,
    part_label,
    part_shard_prefix,
    read_json_object,
)
from shards.records import PartRecord, ShardMarker

STATE_DIR = ".build"
LOCK_NAME = ".build.lock"
FINISHED_NAME = "finished.json"  # in a part's state folder: the part is done
PART_DIR = re.compile(r"p\d{3,}")
PART_LOCK = re.compile(r"\.build\.(p\d{3,})\.lock")


class BuildConflict(RuntimeError):
    """The output directory holds a different build (one-line message)."""


class BuildLocked(RuntimeError):
    """Another build holds the output directory (one-line message naming it)."""


class OutputLock:
    """A lock on an output directory for the length of a build: `OUT/.build.lock` (or `name`), flock'ed. An
    exclusive holder writes its pid, host, start time and what it is (`what`, for the refusal message of a second
    build); shared holders (the parts of a partitioned build) write nothing, and a refused exclusive build names
    them from their own part locks.

    The kernel drops the lock when its holder dies, whatever kills it, so a stale file never blocks a re-run. An
    exclusive holder deletes the file before it lets go; a build that opened the file just before that checks, once
    it holds the lock, that the file it locked is still the one at the path, and starts over if not (else two builds
    could each hold a lock on a different file). Shared holders leave the file: others may still hold it.
    """

    def __init__(
        self, out_dir: str | os.PathLike, name: str = LOCK_NAME, shared: bool = False, what: str = "another build"
    ) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / name
        self.shared, self.what = shared, what
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, creating OUT if needed. Raises BuildLocked, or OSError when OUT is not writable."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(self.out_dir))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise BuildLocked(
                    f"{self.out_dir}: {holder}; wait for it to finish or stop it (lock file {self.path})"
                ) from None
            if self._is_current(fd):
                self._fd = fd
            else:
                os.close(fd)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "what": self.what,
        }
        with contextlib.suppress(OSError):  # only for the message of a refused build: a full disk must not stop us
            os.ftruncate(self._fd, 0)  # shared: clears what a killed exclusive holder left
            if not self.shared:
                os.write(self._fd, (json.dumps(holder) + "\n").encode())

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _holder(self, fd: int) -> str:
        """Who holds the lock, as '<what> is writing here (pid, host, start)'."""
        described = describe_holder(fd)
        if described:
            return described
        parts = running_parts(self.out_dir)
        if parts:
            return f"part builds are writing here ({'; '.join(parts)})"
        return "another build is writing here (it has not written its pid yet)"

    def release(self) -> None:
        """Exclusive: delete the lock file, then let go of the lock (see the class docstring for the order)."""
        if self._fd is None:
            return
        if not self.shared:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def describe_holder(fd: int) -> str | None:
    """'<what> is writing here (pid P on H, started S)' from a lock file's contents, or None when it holds none."""
    info = _holder_info(fd)
    return f"{info['what']} is writing here ({_pid_text(info)})" if info else None


def _holder_info(fd: int) -> dict | None:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        _pid_text(info)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"what": "another build", **info}


def _pid_text(info: dict) -> str:
    return f"pid {info['pid']} on {info['host']}, started {info['started']}"


def part_lock_name(index: int, count: int) -> str:
    return f"{LOCK_NAME[: -len('.lock')]}.{part_label(index, count)}.lock"


def running_parts(out_dir: str | os.PathLike) -> list[str]:
    """One line per part build that holds its lock in `out_dir` now (the others' lock files are stale)."""
    held = (_held_by(path) for path in sorted(Path(out_dir).glob(".build.p*.lock")) if PART_LOCK.fullmatch(path.name))
    return [holder for holder in held if holder]


def _held_by(path: Path) -> str | None:
    """Who holds the lock file `path` now ('<what>: pid P on H, started S'), or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # got it: nobody holds it (ours goes with the close)
        return None
    except BlockingIOError:
        info = _holder_info(fd)
        return f"{info['what']}: {_pid_text(info)}" if info else f"{path.name} is held"
    finally:
        os.close(fd)


class BuildLocks:
    """The locks of one build: OUT exclusively (a one-machine build, `shards.merge`), or, for part I of N, OUT
    shared and the part's own lock exclusively (parts side by side, never two builds of one part)."""

    def __init__(
        self, out_dir: str | os.PathLike, part: tuple[int, int] | None = None, what: str = "another build"
    ) -> None:
        if part is None:
            self.locks = [OutputLock(out_dir, what=what)]
        else:
            index, count = part
            self.locks = [
                OutputLock(out_dir, shared=True),
                OutputLock(out_dir, part_lock_name(index, count), what=f"a build of part {index}/{count}"),
            ]

    def acquire(self) -> None:
        """Take every lock, or none (BuildLocked, OSError as OutputLock.acquire)."""
        taken = []
        try:
            for lock in self.locks:
                lock.acquire()
                taken.append(lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()


def remove_stale_part_locks(out_dir: str | os.PathLike) -> None:
    """Delete the part lock files that no part holds (left by killed parts). Call with OUT held exclusively: no
    part can then be starting."""
    for path in Path(out_dir).glob(".build.p*.lock"):
        if PART_LOCK.fullmatch(path.name) and _held_by(path) is None:
            path.unlink(missing_ok=True)


def inputs_digest(items: list, classes: list[str]) -> str:
    """sha256 of the planned inputs (key, source, label name, in plan order) and the class list."""
    h = hashlib.sha256()
    h.update(json.dumps(classes).encode())
    for v in items:
        h.update(json.dumps([v.key, v.source, v.label_name]).encode())
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


def read_state_json(path: Path) -> dict:
    """A JSON object from `path` (`shards.format.read_json_object`); BuildConflict naming the file when it is
    unreadable or not an object."""
    try:
        return read_json_object(path)
    except ValueError as e:
        raise BuildConflict(f"{e}; use --overwrite to start over") from None


def _describe_difference(old: dict, new: dict) -> str:
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


@dataclass
class ResumePoint:
    complete: bool = False  # a finished build with these exact settings is already there
    markers: list[ShardMarker] = field(default_factory=list)  # kept shards, in order
    part_finished: bool = False  # complete: this part is finished (its merge may still be due)


class BuildState:
    """The resume state of one build of `split` into `out_dir`: a one-machine build, or part `part` = (I, N) of a
    partitioned one, which builds the plan positions `plan_range` = [start, end) and numbers its samples from
    start on (provisional ids, see shards.format)."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        split: str,
        part: tuple[int, int] | None = None,
        plan_range: tuple[int, int] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.split = split
        self.part, self.plan_range = part, plan_range
        self.id_base = plan_range[0] if part is not None and plan_range else 0
        self.root = self.out_dir / STATE_DIR
        self.dir = self.root if part is None else self.root / part_label(*part)
        self.prefix = split if part is None else part_shard_prefix(split, *part)
        self.done_dir = self.dir / "done"
        self.work_dir = self.dir / "work"

    def _shard_files(self, prefix_pattern: str) -> list[Path]:
        pattern = re.compile(rf"^{prefix_pattern}-\d{{6}}\.(tar|idx)$")
        return sorted(p for p in self.out_dir.iterdir() if pattern.match(p.name)) if self.out_dir.is_dir() else []

    def _our_shard_files(self) -> list[Path]:
        return self._shard_files(re.escape(self.prefix))

    def part_dirs(self) -> list[Path]:
        """The state folders of parts of a partitioned build in this directory."""
        return (
            sorted(p for p in self.root.iterdir() if PART_DIR.fullmatch(p.name) and p.is_dir())
            if self.root.is_dir()
            else []
        )

    def clear(self) -> None:
        """Remove everything this build writes (for --overwrite): a one-machine build, every build of the split;
        a part, its own state and shards, the merged outputs and a one-machine build's leftovers (the other
        parts, which may be running, stay)."""
        split = re.escape(self.split)
        if self.part is None:
            shutil.rmtree(self.root, ignore_errors=True)
            doomed = self._shard_files(rf"{split}(-p\d{{3,}})?")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            for leftover in ("params.json", "done", "work"):
                path = self.root / leftover
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            doomed = self._our_shard_files() + self._shard_files(split)
        for p in doomed + [self.out_dir / MANIFEST_NAME, self.out_dir / FAILURES_NAME]:
            p.unlink(missing_ok=True)

    def _state_identity(self, identity: dict) -> dict:
        """What params.json holds: the build's identity, and for a part which part and plan range it builds."""
        if self.part is None:
            return identity
        return {**identity, "part": list(self.part), "plan_range": list(self.plan_range or ())}

    def prepare(self, identity: dict, overwrite: bool) -> ResumePoint:
        """Decide what of an earlier build to keep; leave `work_dir` empty and `params.json` written."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.clear()
        manifest_path = self.out_dir / MANIFEST_NAME
        if manifest_path.is_file():
            manifest = read_state_json(manifest_path)
            old = {"params": manifest.get("params"), "inputs_sha256": manifest.get("inputs_sha256")}
            if old == identity:
                self._check_finished(manifest)
                shutil.rmtree(self.dir, ignore_errors=True)  # left if a build died right after its manifest
                return ResumePoint(complete=True)
            what = _describe_difference(old["params"] or {}, identity["params"]) or "the inputs differ"
            raise BuildConflict(
                f"{self.out_dir} already holds a finished build with other settings or inputs "
                f"({what}); use --overwrite or another --out"
            )
        self._refuse_other_builds(identity)
        params_path = self.dir / "params.json"
        mine = self._state_identity(identity)
        markers: list[ShardMarker] = []
        if params_path.is_file():
            old = read_state_json(params_path)
            if old != mine:
                raise BuildConflict(
                    f"{self.out_dir} holds an unfinished build{self._part_suffix()} with other settings "
                    f"or inputs ({state_difference(old, mine)}); re-run the original command to "
                    f"finish it, or use --overwrite"
                )
            if self.part is not None and (self.dir / FINISHED_NAME).is_file():
                self._check_part_finished()
                return ResumePoint(complete=True, part_finished=True)
            markers = self._valid_prefix()
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._remove_temp_files()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        self.done_dir.mkdir(parents=True, exist_ok=True)
        _write_json(params_path, mine)
        return ResumePoint(markers=markers)

    def _of_part(self) -> str:
        return "" if self.part is None else f" of part {self.part[0]}/{self.part[1]}"

    def _refuse_other_builds(self, identity: dict) -> None:
        """BuildConflict when OUT holds another kind of build: parts under a one-machine build, a one-machine
        build's state under a part, or parts of another partition or other settings under a part."""
        if self.part is None:
            parts = ", ".join(p.name for p in self.part_dirs())
            if parts:
                raise BuildConflict(
                    f"{self.out_dir} holds parts of a partitioned build ({parts} in {self.root}); "
                    f"finish them with --part I/N and run `python -m shards.merge {self.out_dir}`, "
                    f"or use --overwrite"
                )
            return
        if (self.root / "params.json").is_file():
            raise BuildConflict(
                f"{self.out_dir} holds an unfinished one-machine build ({self.root / 'params.json'}); "
                f"re-run it without --part, or use --overwrite"
            )
        for other in self.part_dirs():
            theirs = _read_json_if_there(other / "params.json")
            if other == self.dir or theirs is None:
                continue
            if theirs.get("part", [None, None])[1] != self.part[1]:
                raise BuildConflict(
                    f"{self.out_dir} holds part {other.name} of a build in {theirs.get('part')[1]} "
                    f"parts, not {self.part[1]}; use the same N for every part, or --overwrite "
                    f"each of them"
                )
            if {k: theirs.get(k) for k in identity} != identity:
                raise BuildConflict(
                    f"{self.out_dir} holds part {other.name} of a build with other settings or "
                    f"inputs ({state_difference(theirs, identity)}); use the same command for "
                    f"every part"
                )

    def _remove_temp_files(self) -> None:
        """Temp files a killed build may have left beside the shards (index, failures, manifest; see
        `atomic_write`): they would otherwise stay in OUT for good."""
        outputs = "" if self.part is not None else rf"|{re.escape(MANIFEST_NAME)}|{re.escape(FAILURES_NAME)}"
        pattern = re.compile(rf"^({re.escape(self.prefix)}-\d{{6}}\.idx{outputs})\.tmp$")
        for p in self.out_dir.iterdir():
            if pattern.match(p.name):
                p.unlink(missing_ok=True)

    def _check_finished(self, manifest: dict) -> None:
        """BuildConflict naming the first shard of a finished build that is missing or has another size than its
        manifest lists (deleted, truncated or replaced since): "nothing to do" would be a lie."""
        problems = shard_problems(self.out_dir, manifest.get("shards") or [])
        if not manifest.get("shards"):
            problems.append("the manifest lists no shards")
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise BuildConflict(
                f"{self.out_dir} holds this build's {MANIFEST_NAME}, but {problems[0]}{more}: "
                f"restore the file(s), or re-run with --overwrite to rebuild "
                f"(`python -m shards.verify {self.out_dir}` checks every shard)"
            )

    def _check_part_finished(self) -> None:
        """As `_check_finished`, for a finished part (its record lists its shards)."""
        record = read_state_json(self.dir / FINISHED_NAME)
        problems = shard_problems(self.out_dir, record.get("markers") or [], "its part recorded")
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise BuildConflict(
                f"{self.out_dir}: part {self.part[0]}/{self.part[1]} is finished, but {problems[0]}"
                f"{more}: restore the file(s), or re-run this part with --overwrite"
            )

    def _valid_prefix(self) -> list[ShardMarker]:
        kept: list[ShardMarker] = []
        for path in sorted(self.done_dir.glob("*.json")) if self.done_dir.is_dir() else []:
            marker = _read_marker_if_there(path)
            if marker is None:
                break
            tar = self.out_dir / str(marker.tar)
            expected_first = kept[-1].first_sample_id + kept[-1].num_samples if kept else self.id_base
            if (
                marker.shard != len(kept)
                or marker.first_sample_id != expected_first
                or not tar.is_file()
                or tar.stat().st_size != marker.bytes
                or not os.path.isfile(index_path_for(tar))
            ):
                break
            kept.append(marker)
        # Markers after the first bad one describe shards that will be rebuilt.
        for path in sorted(self.done_dir.glob("*.json"))[len(kept) :] if self.done_dir.is_dir() else []:
            path.unlink()
        return kept

    def record_shard(self, marker: ShardMarker) -> None:
        _write_json(self.done_dir / f"{marker.shard:06d}.json", marker.to_json())

    def remove_stale_shards(self, num_shards: int) -> list[str]:
        """Delete this split's shard files numbered >= num_shards (left by an earlier, larger build)."""
        removed = []
        for p in self._our_shard_files():
            if int(p.stem.rsplit("-", 1)[1]) >= num_shards:
                p.unlink()
                removed.append(p.name)
        return removed

    def finish(self) -> None:
        """A one-machine build wrote its manifest: its state goes."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def finish_part(self, record: PartRecord) -> None:
        """A part is done: `finished.json` (what `shards.merge` needs) is written last; the state stays for the
        merge. The work folder goes."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
        _write_json(self.dir / FINISHED_NAME, record.to_json())


def shard_problems(out_dir: Path, shards: list[dict], listed_by: str = "the manifest lists") -> list[str]:
    """What is wrong with the finished shards `shards` (manifest or marker records) in `out_dir`: a missing tar or
    index, or a tar of another size than recorded."""
    problems = []
    for shard in shards:
        tar, index = out_dir / str(shard.get("tar")), out_dir / str(shard.get("index"))
        if not tar.is_file():
            problems.append(f"{tar.name} is missing")
        elif tar.stat().st_size != shard.get("bytes"):
            problems.append(f"{tar.name} has {tar.stat().st_size} bytes, {listed_by} {shard.get('bytes')}")
        elif not index.is_file():
            problems.append(f"its index {index.name} is missing")
    return problems


def state_difference(old: dict, new: dict) -> str:
    """What differs between two build identities (params first, then the part), for a refusal message."""
    what = _describe_difference(old.get("params") or {}, new.get("params") or {})
    if not what and old.get("inputs_sha256") != new.get("inputs_sha256"):
        what = "the inputs differ"
    extra = {k: v for k, v in new.items() if k not in ("params", "inputs_sha256")}
    return what or _describe_difference({k: old.get(k) for k in extra}, extra) or "the state differs"


def _read_json_if_there(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is gone or unreadable (another part may be rewriting it)."""
    try:
        return read_json_object(path)
    except ValueError:
        return None


def _read_marker_if_there(path: Path) -> ShardMarker | None:
    """The shard marker in `path`, or None when it is gone, unreadable or not a marker (a damaged one)."""
    try:
        return ShardMarker.from_json(read_json_object(path), str(path))
    except ValueError:
        return None
