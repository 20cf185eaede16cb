"""The labelled video collections a build accepts, turned into one list of inputs and a class list.

Three layouts:
- Kinetics (`read_kinetics_csv`): the official annotation CSV (`label,youtube_id,time_start,time_end,split[,is_cc]`)
  and a video root holding `{youtube_id}_{time_start:06d}_{time_end:06d}.mp4` (flat, or one folder per label as the
  public downloads lay them out; found by file name anywhere under the root, any common video extension).
- A VideoMAE-style list file (`read_list_file`): one `relative/path LABEL` per line; LABEL an integer index or a
  class name; a tab separates path and label when either contains spaces.
- A folder per class (`read_class_folders`): `ROOT/<class name>/**/<video>`.

The class list is the sorted label names unless `--classes FILE` fixes it (one name per line, or a JSON list, or a
shard manifest whose `classes` to reuse), so that a val build agrees with its train build.

Nothing is dropped without a word (`collect_inputs`): a row or line that cannot be read (a short or long CSV row, an
unbalanced quote that swallows the lines after it, a bad time, a list line without a label), a video file that is
missing or empty, and a label outside the class list each become a rejected input (a line in failures.jsonl) and a
counted one-line warning. The same video listed twice (same file) is kept once, with a counted warning; listed
with two different labels it is rejected altogether (failures.jsonl names both labels), since neither can be
trusted. Only accepted inputs contribute labels to the class list.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_SUFFIXES = (
    *(".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp"),
    *(".ts", ".mts", ".m2ts"),  # MPEG transport streams (camcorders, broadcast): ffmpeg reads them like the rest
)
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
# The Kinetics CSVs name the validation split "val" (400) or "validate" (600/700); users say either.
_SPLIT_ALIASES = {"val": "val", "validate": "val", "validation": "val", "valid": "val"}
_MAX_KEY_LEN = 80  # keeps every member name ("KEY.json") inside one USTAR header: DALI's wds2idx assumes that


class InputError(ValueError):
    """An input collection that cannot be read at all (the message is one line naming the file and the problem)."""


@dataclass(frozen=True)
class VideoInput:
    """One video to transcode: `key` names its tar members (no dots, no slashes, unique within a build)."""

    key: str
    source: str
    label_name: str | None  # None: unlabelled (e.g. a Kinetics test split), stored as label -1
    origin: str | None = field(default=None, compare=False)  # "FILE:LINE" that listed it, for messages


def _reject(source: str, reason: str, key: str | None = None) -> dict:
    """A failures.jsonl line for an input rejected before transcoding."""
    return {"source": source, **({"key": key} if key else {}), "reason": reason}


def _rejected_or_raise(rejected: list[dict] | None) -> Callable[[str, str], None]:
    """How a reader reports a bad row: appended to `rejected`, or (no list given) an InputError at once."""

    def report(where: str, reason: str) -> None:
        if rejected is None:
            raise InputError(f"{where}: {reason}")
        rejected.append(_reject(where, reason))

    return report


@dataclass
class InputSet:
    """What a build reads: the videos, the class list, and the inputs rejected before transcoding."""

    videos: list[VideoInput]
    classes: list[str]
    rejected: list[dict] = field(default_factory=list)  # {"source", "reason"[, "key"]}
    warnings: list[str] = field(default_factory=list)  # counted one-line warnings for the console

    def label_index(self, label_name: str | None) -> int:
        return -1 if label_name is None else self._index[label_name]

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.classes)}


def sanitize_key(text: str) -> str:
    """A tar-member-safe key: runs of characters other than [A-Za-z0-9_-] become '_' (so never a dot or slash)."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "video"
    if len(key) > _MAX_KEY_LEN:
        import hashlib

        key = key[: _MAX_KEY_LEN - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return key


def _normalize_split(name: str) -> str:
    name = name.strip().lower()
    return _SPLIT_ALIASES.get(name, name)


def _index_videos(root: Path) -> dict[str, list[Path]]:
    """Every video file under `root`, by stem (file name without extension)."""
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in VIDEO_SUFFIXES:
                found.setdefault(stem, []).append(Path(dirpath) / name)
    return found


def kinetics_stem(youtube_id: str, time_start: int, time_end: int) -> str:
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}"


def _csv_rows(csv_path: Path, report) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and the well-formed rows of a CSV as (line number, {column: value}); a row with another number
    of fields than the header, or one an unbalanced quote ran into the following lines, goes to `report`."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel) is not text
            reader = csv.reader(f)
            header = [c.strip() for c in next(reader, [])]
            rows, last_line = [], reader.line_num
            for fields in reader:
                first, last_line = last_line + 1, reader.line_num
                if not fields:
                    continue  # a blank line
                if last_line > first and any("\n" in v or "\r" in v for v in fields):
                    report(f"{csv_path}:{first}", f"unbalanced quote: lines {first}-{last_line} read as one row")
                elif len(fields) != len(header):
                    report(f"{csv_path}:{first}", f"{len(fields)} fields, the header has {len(header)}")
                else:
                    rows.append((first, dict(zip(header, fields))))
    except csv.Error as e:
        raise InputError(f"{csv_path}: unreadable CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{csv_path}: not a text file ({e.reason} at byte {e.start})") from None
    return header, rows


def read_kinetics_csv(
    csv_path: str | os.PathLike,
    root: str | os.PathLike,
    split: str | None,
    all_rows: bool = False,
    rejected: list[dict] | None = None,
) -> list[VideoInput]:
    """Rows of a Kinetics annotation CSV as inputs; the split column selects rows matching `split`.

    A missing video is not an error here: its input points at the path it should have (`ROOT/{stem}.mp4`), and
    the build records it as a failure ("file not found"), like any other bad input. A row that cannot be read
    is appended to `rejected` (or, when that is None, raises InputError naming its line); a malformed row is
    rejected whatever its split, since its split column cannot be trusted.
    """
    csv_path, root = Path(csv_path), Path(root)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: annotation CSV not found")
    if not root.is_dir():
        raise InputError(f"{root}: video root is not a directory")
    report = _rejected_or_raise(rejected)
    header, rows = _csv_rows(csv_path, report)
    missing = [c for c in KINETICS_COLUMNS if c not in header]
    if missing:
        raise InputError(
            f"{csv_path}: not a Kinetics annotation CSV (columns {header}, "
            f"missing {missing}; expected label,youtube_id,time_start,time_end,split)"
        )
    if split is not None and not all_rows and rows and "split" in header:
        wanted = _normalize_split(split)
        selected = [(n, r) for n, r in rows if _normalize_split(r["split"]) == wanted]
        if not selected:
            present = sorted({r["split"] for _, r in rows})
            raise InputError(
                f"{csv_path}: no rows with split {split!r} (splits present: {present}); "
                f"pass --all-rows to use every row"
            )
        rows = selected
    videos_by_stem = _index_videos(root)
    inputs = []
    for line_no, row in rows:
        where = f"{csv_path}:{line_no}"
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except ValueError:
            report(where, f"bad time_start/time_end {row['time_start']!r}, {row['time_end']!r}")
            continue
        youtube_id = row["youtube_id"].strip()
        if not youtube_id:
            report(where, "empty youtube_id")
            continue
        stem = kinetics_stem(youtube_id, start, end)
        label = row["label"].strip() or None
        inputs.append(
            VideoInput(sanitize_key(stem), str(_find_video(videos_by_stem, root, stem, label)), label, origin=where)
        )
    return inputs


def _find_video(videos_by_stem: dict[str, list[Path]], root: Path, stem: str, label: str | None) -> Path:
    """The file of a Kinetics row: found by stem anywhere under the root, else the path it should have."""
    candidates = videos_by_stem.get(stem, [])
    if len(candidates) > 1 and label is not None:
        # Per-label folders: prefer the copy inside the row's own label folder.
        own = [p for p in candidates if p.parent.name in (label, label.replace(" ", "_"))]
        candidates = own or candidates
    return candidates[0] if candidates else root / f"{stem}.mp4"


def read_list_file(
    list_path: str | os.PathLike, root: str | os.PathLike | None = None, rejected: list[dict] | None = None
) -> list[VideoInput]:
    """A VideoMAE-style list: `relative/path LABEL` per line (path relative to `root`, default the list's folder).

    LABEL is kept as written (an integer index or a name); `collect_inputs` resolves it against the classes.
    A line that is not `path LABEL` is appended to `rejected` (or, when that is None, raises InputError).
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise InputError(f"{list_path}: list file not found")
    root = Path(root) if root is not None else list_path.parent
    report = _rejected_or_raise(rejected)
    try:
        with open(list_path, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise InputError(f"{list_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    inputs = []
    for line_no, line in enumerate(lines, start=1):
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            report(f"{list_path}:{line_no}", f"expected 'path LABEL', got {line[:100]!r}")
            continue
        rel, label = parts[0].strip(), parts[1].strip()
        source = rel if os.path.isabs(rel) else str(root / rel)
        inputs.append(
            VideoInput(sanitize_key(os.path.splitext(rel)[0]), source, label, origin=f"{list_path}:{line_no}")
        )
    return inputs


def read_class_folders(root: str | os.PathLike) -> list[VideoInput]:
    """`ROOT/<class>/**/<video>`: every video file under a class folder, labelled by the folder's name."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: class-folder root is not a directory")
    inputs = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for _stem, paths in sorted(_index_videos(class_dir).items()):
            for path in paths:
                rel = path.relative_to(root).with_suffix("")
                inputs.append(VideoInput(sanitize_key(str(rel)), str(path), class_dir.name))
    return inputs


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """Class names in index order from a text file (one per line), a JSON list, or a shard manifest."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: classes file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
        data = json.loads(text) if path.suffix == ".json" else None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if path.suffix == ".json":
        names = data.get("classes") if isinstance(data, dict) else data
        if not isinstance(names, list):
            raise InputError(f"{path}: expected a JSON list of class names or a manifest with 'classes'")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    names = [str(n) for n in names]
    if not names:
        raise InputError(f"{path}: no class names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{path}: duplicate class names {duplicates[:5]}")
    return names


def _uniquify_keys(videos: list[VideoInput]) -> list[VideoInput]:
    """Keys made unique in input order: a repeated key gets `-2`, `-3`, ..."""
    seen: dict[str, int] = {}
    taken = {v.key for v in videos}
    out = []
    for v in videos:
        if v.key in seen:
            n = seen[v.key]
            while True:
                n += 1
                candidate = f"{v.key}-{n}"
                if candidate not in taken:
                    break
            seen[v.key] = n
            taken.add(candidate)
            v = VideoInput(candidate, v.source, v.label_name)
        else:
            seen[v.key] = 1
        out.append(v)
    return out


def drop_duplicates(videos: list[VideoInput]) -> tuple[list[VideoInput], list[dict], list[str]]:
    """One input per video file (by path), in listing order: a repeat with the same label is dropped (counted in
    a warning); a file listed with different labels is rejected altogether, since neither label can be trusted.

    Returns (kept, rejected, warnings)."""
    groups: dict[str, list[VideoInput]] = {}
    for v in videos:
        groups.setdefault(os.path.normpath(v.source), []).append(v)
    kept, rejected, repeats, conflicts = [], [], [], []
    for v in videos:
        group = groups[os.path.normpath(v.source)]
        if group[0] is not v:
            continue
        other = next((g for g in group if g.label_name != v.label_name), None)
        if other is not None:
            reason = (
                f"listed with conflicting labels {v.label_name!r} ({v.origin or 'first'}) and "
                f"{other.label_name!r} ({other.origin or 'later'})"
            )
            rejected.append(_reject(v.source, reason, v.key))
            conflicts.append(reason)
            continue
        kept.append(v)
        repeats += [(g, v) for g in group[1:]]
    warnings = []
    if repeats:
        again, first = repeats[0]
        warnings.append(
            f"{len(repeats)} duplicate entries dropped (the same video listed again with the same "
            f"label; first: {again.origin or again.source} repeats {first.origin or first.source})"
        )
    if conflicts:
        warnings.append(
            f"{len(conflicts)} videos rejected for conflicting labels (first: {rejected[0]['source']} "
            f"{conflicts[0]}); see failures.jsonl"
        )
    return kept, rejected, warnings


def reject_unreadable(videos: list[VideoInput]) -> tuple[list[VideoInput], list[dict]]:
    """Inputs whose file is missing, empty or a directory are rejected before transcoding, so that their labels do
    not enter the class list (the transcoder checks again: files can change while a build runs)."""
    from shards.transcode import check_source

    kept, rejected = [], []
    for v in videos:
        reason = check_source(v.source)
        if reason:
            rejected.append(_reject(v.source, reason, v.key))
        else:
            kept.append(v)
    return kept, rejected


def resolve_labels(videos: list[VideoInput], classes: list[str] | None) -> InputSet:
    """Map label names (or integer indices, for list files) onto a class list; reject labels it lacks.

    Without `classes`: the sorted label names; if every label is an integer, the indices are kept and the
    classes are their decimal names ("0", "1", ...). Only `videos` contribute labels: callers pass accepted
    inputs only.
    """
    labels = [v.label_name for v in videos if v.label_name is not None]
    all_int = bool(labels) and all(re.fullmatch(r"-?\d+", s) for s in labels)
    rejected: list[dict] = []
    if classes is None:
        if all_int:
            classes = [str(i) for i in range(max(int(s) for s in labels) + 1)]
        else:
            classes = sorted(set(labels))
    known = set(classes)
    resolved = []
    for v in videos:
        name = v.label_name
        if name is not None and name not in known and re.fullmatch(r"-?\d+", name) and all_int:
            index = int(name)
            name = classes[index] if 0 <= index < len(classes) else None
            if name is None:
                rejected.append(
                    {"source": v.source, "reason": f"label index {v.label_name} outside the {len(classes)} classes"}
                )
                continue
        if name is not None and name not in known:
            rejected.append({"source": v.source, "reason": f"label {v.label_name!r} is not in the class list"})
            continue
        resolved.append(VideoInput(v.key, v.source, name, origin=v.origin))
    return InputSet(_uniquify_keys(resolved), list(classes), rejected)


def _count_warning(what: str, rejected: list[dict]) -> list[str]:
    """One counted warning line for a group of rejected inputs (none if the group is empty)."""
    if not rejected:
        return []
    first = rejected[0]
    return [f"{len(rejected)} {what} rejected (first: {first['source']}: {first['reason']}); see failures.jsonl"]


def collect_inputs(
    *,
    csv_path: str | None = None,
    list_path: str | None = None,
    folders: str | None = None,
    root: str | None = None,
    split: str | None = None,
    classes_file: str | None = None,
    all_rows: bool = False,
) -> InputSet:
    """Read exactly one of the three layouts, reject what cannot be built, and resolve the labels of the rest
    against the class list. Every rejected input is in `rejected`; `warnings` counts each kind of problem."""
    chosen = [x for x in (csv_path, list_path, folders) if x is not None]
    if len(chosen) != 1:
        raise InputError("give exactly one of --csv, --list, --folders")
    unreadable_rows: list[dict] = []
    if csv_path is not None:
        if root is None:
            raise InputError("--csv needs --root (the folder holding the videos)")
        videos = read_kinetics_csv(csv_path, root, split, all_rows=all_rows, rejected=unreadable_rows)
    elif list_path is not None:
        videos = read_list_file(list_path, root, rejected=unreadable_rows)
    else:
        videos = read_class_folders(folders)
    classes = read_classes_file(classes_file) if classes_file else None
    videos, duplicates, warnings = drop_duplicates(videos)
    videos, missing = reject_unreadable(videos)
    inputs = resolve_labels(videos, classes)
    # Missing files and unknown labels need no warning of their own: the build prints a `skipped` line for each.
    inputs.warnings = _count_warning(f"unreadable rows of {chosen[0]}", unreadable_rows) + warnings
    inputs.rejected = unreadable_rows + duplicates + missing + inputs.rejected
    return inputs
