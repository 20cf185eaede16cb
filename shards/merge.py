"""`python -m shards.merge OUT`: finish a partitioned build (`shards.build --part I/N`) once all its parts are done.

    python -m shards.merge shards/k400/train

Checks first, changing nothing when one fails (one line naming the part and the problem, exit 1): every part 0..N-1
of one partition is there (`OUT/.build/p{III}/`), was built with the same settings and inputs (the build identity a
one-machine build records) and the same ffmpeg, has finished (its `finished.json`) with every shard it lists there at
its size, and none is running (the merge takes `OUT/.build.lock` exclusively, which each running part holds shared).

Then it renumbers and writes what a one-machine build writes last. Part I's samples carry provisional ids from its
first plan position on; their final ids are offset_I + rank in the part, offset_I the number of samples of the parts
before it, which is each sample's id in a one-machine build of the same plan (parts are contiguous ranges of it). The
ids live inside the shards (`KEY.info`, `KEY.json`), so the merge rewrites those two small members in place, at the
same length (`shards.format.renumber_meta`), in the shards whose ids change (none of part 0's, none when no video
before them failed), and takes their new sha256. No video byte moves and no shard is copied: the merge costs a read of
the renumbered shards, not a rewrite. Then failures.jsonl (rejected inputs, then each part's failures: plan order) and
manifest.json, last, as `shards.build` writes them (plus "parts": N), and `OUT/.build/` goes.

A merge stopped half-way (killed at any instant, a full disk: exit 75) is re-run as is: each shard's rewrite is
written ahead whole into OUT/.build/NAME.tar.journal before its first byte goes into the tar (`patch_shard_ids`), so a
re-run replays a half-applied rewrite from its journal instead of reading a member whose header was rewritten before
its data; without a journal a rewrite writes the final id whether the member holds the provisional one or already the
final one, and anything else is refused as damage (one line naming the tar and the member).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import struct
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shards import format as fmt
from shards.logs import configure_logging
from shards.plan import part_range
from shards.records import PartRecord, ShardMarker, failure_lines, manifest_record
from shards.resume import (
    FINISHED_NAME,
    PART_DIR,
    STATE_DIR,
    BuildConflict,
    BuildLocked,
    BuildLocks,
    read_state_json,
    remove_stale_part_locks,
    shard_problems,
    state_difference,
)
from shards.stops import EXIT_RETRY, describe_own_failure
from shards.writer import member_header, sha256_file

log = logging.getLogger(__name__)


class MergeRefused(Exception):
    """The parts cannot be merged (yet): one line naming the part and the problem."""


@dataclass
class Part:
    """One part's state folder: its params.json (identity, part, plan range) and, once finished, its finished.json
    as read (checked and made a PartRecord by `check_parts`)."""

    index: int
    count: int
    dir: Path
    params: dict
    finished: dict | None

    @property
    def name(self) -> str:
        return f"part {self.index}/{self.count}"


def _identity(data: dict) -> dict:
    return {"params": data.get("params"), "inputs_sha256": data.get("inputs_sha256")}


def read_parts(out_dir: Path) -> list[Part]:
    """The part states under OUT/.build, each with a readable params.json naming its part (MergeRefused if not)."""
    root = out_dir / STATE_DIR
    if (root / "params.json").is_file():
        raise MergeRefused(
            f"{out_dir} holds an unfinished one-machine build ({root / 'params.json'}), not parts: "
            f"re-run that build to finish it"
        )
    dirs = sorted(p for p in root.iterdir() if PART_DIR.fullmatch(p.name) and p.is_dir()) if root.is_dir() else []
    if not dirs:
        raise MergeRefused(
            f"{out_dir}: no parts to merge (no {root}/p*/): build them first with `python -m "
            f"shards.build ... --out {out_dir} --part I/N`"
        )
    parts = []
    for folder in dirs:
        try:
            params = read_state_json(folder / "params.json")
        except BuildConflict:
            raise MergeRefused(f"{folder / 'params.json'}: missing or unreadable: re-run that part's build") from None
        part = params.get("part")
        if not (
            isinstance(part, list)
            and len(part) == 2
            and all(isinstance(x, int) for x in part)
            and fmt.part_label(*part) == folder.name
        ):
            raise MergeRefused(f"{folder / 'params.json'}: names no part [I, N] matching {folder.name}")
        finished = folder / FINISHED_NAME
        parts.append(Part(part[0], part[1], folder, params, read_state_json(finished) if finished.is_file() else None))
    return sorted(parts, key=lambda p: p.index)


def check_parts(out_dir: Path, parts: list[Part]) -> list[PartRecord]:
    """The records of parts 0..N-1, in order; MergeRefused (one line) unless they are all there and finished, of
    one partition and one build."""
    counts = sorted({p.count for p in parts})
    if len(counts) > 1:
        which = ", ".join(f"{p.dir.name} of {p.count}" for p in parts)
        raise MergeRefused(
            f"{out_dir}: parts of different partitions ({which}); rebuild the odd ones with --overwrite and the same N"
        )
    count, first = counts[0], parts[0]
    for part in parts[1:]:
        if _identity(part.params) != _identity(first.params):
            raise MergeRefused(
                f"{out_dir}: {part.name} was built with other settings or inputs than {first.name} "
                f"({state_difference(first.params, part.params)}); rebuild it with the same command "
                f"and --overwrite"
            )
    present = {p.index for p in parts}
    problems = [
        f"part {i}/{count} is missing (no {out_dir / STATE_DIR / fmt.part_label(i, count)}/)"
        for i in range(count)
        if i not in present
    ]
    problems += [
        f"{p.name} is unfinished ({len(list((p.dir / 'done').glob('*.json')))} shard(s) done, no {FINISHED_NAME})"
        for p in parts
        if p.finished is None
    ]
    if problems:
        listed = "; ".join(problems[1:4]) + ("; ..." if len(problems) > 4 else "")
        more = f" (and {len(problems) - 1} more: {listed})" if len(problems) > 1 else ""
        raise MergeRefused(
            f"{out_dir}: {problems[0]}{more}: run the same `python -m shards.build` command with "
            f"--part I/{count} for each, then merge again"
        )
    records: list[PartRecord] = []
    for part in parts:
        records.append(_check_record(out_dir, part, first, records[0] if records else None))
    return records


def _check_record(out_dir: Path, part: Part, first: Part, first_record: PartRecord | None) -> PartRecord:
    """A finished part's record, checked: it agrees with its params and with part 0's (`first_record`, None when
    this is part 0), and its shards are all there."""
    damaged = MergeRefused(
        f"{part.dir / FINISHED_NAME}: does not match its part's params.json (damaged); rebuild "
        f"{part.name} with --overwrite"
    )
    try:
        record = PartRecord.from_json(part.finished)
        plan_size = record.num_inputs - len(record.rejected)
        expected_range = part_range(plan_size, part.index, part.count)
        if (
            record.identity != _identity(part.params)
            or record.plan_range != part.params.get("plan_range")
            or tuple(record.plan_range) != expected_range
        ):
            raise damaged
    except (ValueError, TypeError):
        raise damaged from None
    first_record = first_record or record
    if record.ffmpeg != first_record.ffmpeg:
        raise MergeRefused(
            f"{out_dir}: {part.name} was transcoded by {record.ffmpeg!r}, {first.name} by "
            f"{first_record.ffmpeg!r} (the bytes differ): rebuild with one ffmpeg"
        )
    problems = shard_problems(out_dir, [m.manifest_entry() for m in record.markers], "its part recorded")
    if problems:
        raise MergeRefused(f"{out_dir}: {part.name}: {problems[0]}: restore it, or rebuild the part with --overwrite")
    return record


KILL_AFTER_ENV = "SHARDS_MERGE_KILL_AFTER"  # fault injection (tests): SIGKILL the merge after its Nth write
_writes = {"done": 0}
_writes_lock = threading.Lock()


def _wrote() -> None:
    """Count one write of the merge; when $SHARDS_MERGE_KILL_AFTER is N and this was the Nth, die by SIGKILL, as a
    merge killed right after that write would (tests kill it after each write in turn and re-run it)."""
    limit = os.environ.get(KILL_AFTER_ENV)
    if not limit:
        return
    with _writes_lock:
        _writes["done"] += 1
        if _writes["done"] == int(limit):
            os.kill(os.getpid(), signal.SIGKILL)


def journal_path(tar_path: Path) -> Path:
    """Where the merge writes ahead the bytes it is about to write into `tar_path`: OUT/.build/NAME.journal."""
    return tar_path.parent / STATE_DIR / f"{tar_path.name}.journal"


def patch_shard_ids(tar_path: Path, old_first: int, new_first: int) -> str:
    """Give the samples of `tar_path` (provisional ids old_first, old_first+1, ...) the ids new_first, ... in their
    `.info` and `.json` members, in place, then rewrite its index (a json member may have shrunk); returns the tar's
    new sha256. Member offsets never change.

    Write-ahead: every byte to be written (member headers, member data, the index's member list) is computed from the
    untouched tar and saved whole (temp then rename) in `journal_path(tar_path)` before the first write into the tar;
    the journal goes once the tar and its index are written. A merge killed at any instant leaves either no journal
    (the tar untouched, or finished with its index) or a whole one, which the re-run replays as is, so a member whose
    header was rewritten before its data is never read back (a journal whose tar was rebuilt since is planned
    again). Idempotent: a member already holding its new id is rewritten to the same bytes. ValueError (naming the
    tar and member) for a member that holds neither id."""
    journal = journal_path(tar_path)
    planned = {"tar": tar_path.name, "old_first": old_first, "new_first": new_first}
    journaled = _journaled(journal, planned, tar_path)
    if journaled is not None:
        writes, members = journaled
    else:
        writes, members = _plan_renumbering(tar_path, old_first, new_first)
        journal.parent.mkdir(parents=True, exist_ok=True)
        with open(tar_path, "rb") as f:  # each region's bytes before: a replay checks the tar is still this one
            before = [os.pread(f.fileno(), len(data), at).hex() for at, data in writes]
        record = {**planned, "writes": [[at, data.hex()] for at, data in writes], "before": before, "members": members}
        fmt.atomic_write(journal, json.dumps(record))
        _wrote()
    fd = os.open(tar_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for at, data in writes:
            os.pwrite(fd, data, at)
            _wrote()
        os.fsync(fd)
    finally:
        os.close(fd)
    fmt.write_dali_index(members, fmt.index_path_for(tar_path))
    _wrote()
    journal.unlink()
    _wrote()
    return sha256_file(tar_path)


def _journaled(journal: Path, planned: dict, tar_path: Path) -> tuple[list, list] | None:
    """The (writes, members) of `journal` when a merge was killed while applying it: every region of the tar then
    holds its bytes from before or after. None when there is no journal, or a stale one (the part was rebuilt since:
    a region holds other bytes), which is then planned again. ValueError for a journal that cannot be read."""
    if not journal.is_file():
        return None
    try:
        entry = json.loads(journal.read_text())
        writes = [(int(at), bytes.fromhex(data)) for at, data in entry["writes"]]
        before = [bytes.fromhex(data) for data in entry["before"]]
        members = [(str(name), int(offset), int(size)) for name, offset, size in entry["members"]]
        if {k: entry[k] for k in planned} != planned or len(before) != len(writes):
            raise ValueError("another merge's")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{journal}: unreadable merge journal ({e}); delete it and re-run the merge") from None
    with open(tar_path, "rb") as f:
        if any(os.pread(f.fileno(), len(data), at) not in (data, old) for (at, data), old in zip(writes, before)):
            log.warning(f"shards.merge: {journal}: {tar_path.name} changed since it was written; planned again")
            return None
    return writes, members


def _plan_renumbering(
    tar_path: Path, old_first: int, new_first: int
) -> tuple[list[tuple[int, bytes]], list[tuple[str, int, int]]]:
    """What renumbering `tar_path` writes, read from the tar and its index, writing nothing: the (tar offset, bytes)
    writes, data before header for each member, and the index's (name, offset, size) members in tar order."""
    writes, members = [], []
    with open(tar_path, "rb") as f:
        fd = f.fileno()
        for k, sample in enumerate(fmt.read_index(fmt.index_path_for(tar_path))):
            for ext, offset, size, name in sample:
                if ext in (fmt.INFO_EXT, fmt.META_EXT):
                    size = _renumber_member(fd, tar_path, name, offset, old_first + k, new_first + k, writes)
                members.append((name, offset, size))
    return writes, members


def _renumber_member(
    fd: int, tar_path: Path, name: str, offset: int, old_id: int, new_id: int, writes: list[tuple[int, bytes]]
) -> int:
    """Plan the rewrite of the `.info` or `.json` member `name` whose data starts at `offset` to hold `new_id`
    (appended to `writes`: its data, then its header when its size changes); returns its new size."""
    header = tarfile.TarInfo.frombuf(os.pread(fd, fmt.TAR_BLOCK, offset - fmt.TAR_BLOCK), "utf-8", "strict")
    if header.name != name:
        raise ValueError(f"{tar_path}: the index puts {name} at offset {offset}, the tar has {header.name} there")
    data = os.pread(fd, header.size, offset)
    try:
        if name.endswith("." + fmt.INFO_EXT):
            info = fmt.unpack_info(data)
            held = info["sample_id"]
            new = fmt.pack_info(info["num_frames"], info["label"], new_id)
        else:
            held = json.loads(data).get("sample_id")
            new = fmt.renumber_meta(data, new_id)
    except (ValueError, AttributeError, struct.error) as e:
        raise ValueError(f"{tar_path}: member {name} is unreadable ({' '.join(str(e).split())})") from None
    if held not in (old_id, new_id):
        raise ValueError(f"{tar_path}: {name} holds sample_id {held}, expected {old_id}")
    if len(new) > header.size:  # ids only ever shrink; more would overwrite the next member
        raise ValueError(f"{tar_path}: {name}: sample_id {new_id} does not fit its member")
    if -(-len(new) // fmt.TAR_BLOCK) != -(-header.size // fmt.TAR_BLOCK):  # would free a block: keep the size
        new += b" " * (header.size - len(new))
    writes.append((offset, new + b"\0" * (-len(new) % fmt.TAR_BLOCK)))
    if len(new) != header.size:
        writes.append((offset - fmt.TAR_BLOCK, member_header(name, len(new))))
    return len(new)


def renumber(out_dir: Path, records: list[PartRecord], threads: int) -> tuple[list[ShardMarker], int]:
    """The markers of every shard, in order, with final ids and sha256, after patching the shards whose ids change
    (`threads` at a time); returns (markers, number of shards patched)."""
    markers, jobs, offset = [], [], 0
    for record in records:
        delta = offset - record.plan_range[0]  # provisional ids start at the part's first plan position
        for marker in record.markers:
            markers.append(dataclasses.replace(marker, first_sample_id=marker.first_sample_id + delta))
            if delta:
                jobs.append((len(markers) - 1, marker.first_sample_id, markers[-1].first_sample_id))
            offset += marker.num_samples
    with ThreadPoolExecutor(max(1, threads)) as pool:  # sha256 and file I/O release the GIL
        futures = [(i, pool.submit(patch_shard_ids, out_dir / markers[i].tar, old, new)) for i, old, new in jobs]
        for i, future in futures:
            markers[i].sha256 = future.result()
    return markers, len(jobs)


def _write_merged(out_dir: Path, records: list[PartRecord], markers: list[ShardMarker]) -> dict:
    """failures.jsonl, then manifest.json (last: its presence means a finished build). Returns the manifest;
    MergeRefused when no part holds a sample (failures.jsonl says why, as a one-machine build's would)."""
    first = records[0]
    failures = list(first.rejected)
    for record in records:
        failures += [f for m in record.markers for f in m.failures] + record.orphan_failures
    fmt.atomic_write(out_dir / fmt.FAILURES_NAME, failure_lines(failures))
    _wrote()
    if not markers:
        first_failure = f"; first: {failures[0]['source']}: {failures[0]['reason']}" if failures else ""
        raise MergeRefused(
            f"nothing succeeded: all {first.num_inputs} inputs of the {len(records)} parts failed "
            f"(see {out_dir / fmt.FAILURES_NAME}){first_failure}"
        )
    manifest = manifest_record(first.identity, first.classes, first.ffmpeg, markers, len(failures), first.num_inputs)
    manifest["parts"] = len(records)
    fmt.write_manifest(out_dir, manifest)
    _wrote()
    return manifest


def _already_merged(out_dir: Path) -> bool:
    """A manifest is there: True when nothing is left to do (the parts' states, if a merge died right after the
    manifest, are removed); MergeRefused when parts of another build wait beside it."""
    manifest_path = out_dir / fmt.MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    root = out_dir / STATE_DIR
    parts = sorted(p for p in root.iterdir() if PART_DIR.fullmatch(p.name)) if root.is_dir() else []
    if parts:
        params = read_state_json(parts[0] / "params.json") if (parts[0] / "params.json").is_file() else {}
        if _identity(params) != _identity(read_state_json(manifest_path)):
            raise MergeRefused(
                f"{out_dir} holds a finished build ({fmt.MANIFEST_NAME}) and parts of another one "
                f"in {root}; rebuild the parts with --overwrite, or use another --out"
            )
        shutil.rmtree(root, ignore_errors=True)
    return True


def merge(out_dir: str | os.PathLike, threads: int = 4) -> int:
    """Merge the parts in `out_dir`; returns the exit code (0 merged or nothing to do, 1 refused, 75 stopped by an
    I/O failure: re-run)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        log.error(f"error: {out_dir}: not a directory (the --out of the part builds)")
        return 1
    lock = BuildLocks(out_dir, what="shards.merge")
    try:
        lock.acquire()
    except (BuildLocked, OSError) as e:
        log.error(f"error: {e if isinstance(e, BuildLocked) else describe_own_failure(e)}")
        return 1
    try:
        if _already_merged(out_dir):
            log.info(f"shards.merge: {out_dir} already holds the merged build ({fmt.MANIFEST_NAME}); nothing to do")
            return 0
        for name in (fmt.MANIFEST_NAME, fmt.FAILURES_NAME):  # left by a merge killed while writing them
            (out_dir / f"{name}.tmp").unlink(missing_ok=True)
        parts = read_parts(out_dir)
        records = check_parts(out_dir, parts)
        markers, patched = renumber(out_dir, records, threads)
        manifest = _write_merged(out_dir, records, markers)
        shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)
        remove_stale_part_locks(out_dir)
    except (MergeRefused, BuildConflict) as e:
        log.error(f"error: {e}")
        return 1
    except ValueError as e:
        log.error(f"error: {e} (damaged; rebuild that part with --overwrite)")
        return 1
    except OSError as e:
        log.error(f"error: {describe_own_failure(e)}; fix this and re-run the merge")
        return EXIT_RETRY
    finally:
        lock.release()
    log.info(
        f"shards.merge: {out_dir}: {len(parts)} parts -> {manifest['num_samples']} samples in "
        f"{len(manifest['shards'])} shards, {manifest['num_failures']} skipped; sample ids renumbered in {patched} "
        f"shard(s) in {time.perf_counter() - started:.1f} s -> {out_dir / fmt.MANIFEST_NAME}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    p = argparse.ArgumentParser(prog="python -m shards.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the --out of the part builds")
    p.add_argument("--threads", type=int, default=4, help="shards renumbered at once (file I/O and sha256; default 4)")
    args = p.parse_args(argv)
    return merge(args.out, max(1, args.threads))


if __name__ == "__main__":
    sys.exit(main())
