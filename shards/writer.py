"""Writing one tar shard and its DALI index, never leaving a half-written file under a final name.

The tar is written by hand (USTAR headers from `tarfile.TarInfo`, data, zero padding) so that the offset of every
member's data is known without reading the file back, the sha256 is computed while writing, and the bytes are
reproducible: fixed mtime, owner and mode. Member names stay under 100 bytes, so each header is exactly one
512-byte block, the layout DALI's `wds2idx` assumes too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shards.format import TAR_BLOCK, index_path_for, with_filename, write_dali_index

RECORD_SIZE = 20 * TAR_BLOCK  # tar files end on a 10 KiB record boundary, as GNU tar and Python's tarfile write them
_MTIME = 0


def member_header(name: str, size: int) -> bytes:
    """The one-block USTAR header of a member: fixed mtime, mode and owner, so that equal members give equal bytes
    (`shards.merge` rewrites headers of renumbered members with it)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    assert len(header) == TAR_BLOCK, "member names must fit one USTAR header"
    return header


def member_bytes(size: int) -> int:
    """Bytes a member of `size` data bytes takes in the tar: one header block plus the data padded to blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


@dataclass
class ShardRecord:
    """A finished shard, as the manifest lists it."""

    tar: str  # file name inside the output directory
    index: str
    num_samples: int
    bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)


class ShardWriter:
    """Append samples to `{temp_dir}/{name}.partial`; `close()` renames the tar and its index into `out_dir`.

    A crash leaves only the `.partial` file, which the next build deletes: a file under a final shard name is
    always complete (its index is renamed in after it, and the resume marker after both).
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, temp_dir: str | os.PathLike) -> None:
        self.final_path = Path(out_dir) / name
        self.temp_path = Path(temp_dir) / f"{name}.partial"
        self._file = open(self.temp_path, "wb")
        self._sha = hashlib.sha256()
        self._offset = 0
        self._members: list[tuple[str, int, int]] = []
        self.keys: list[str] = []

    @property
    def bytes_written(self) -> int:
        return self._offset

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as e:
            raise with_filename(e, self.temp_path) from None
        self._sha.update(data)
        self._offset += len(data)

    def add_sample(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        """Append one sample: `members` are (extension, data), written as `KEY.ext` in the order given."""
        for ext, data in members:
            name = f"{key}.{ext}"
            self._write(member_header(name, len(data)))
            self._members.append((name, self._offset, len(data)))
            self._write(data)
            pad = -len(data) % TAR_BLOCK
            if pad:
                self._write(b"\0" * pad)
        self.keys.append(key)

    def close(self) -> ShardRecord:
        """Finish the tar (end-of-archive blocks), fsync, write the index, rename both into place."""
        end = 2 * TAR_BLOCK
        end += -(self._offset + end) % RECORD_SIZE
        self._write(b"\0" * end)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as e:
            raise with_filename(e, self.temp_path) from None
        index_path = index_path_for(self.final_path)
        write_dali_index(self._members, index_path)  # whole or not at all; an OSError names its temp file
        os.replace(self.temp_path, self.final_path)
        return ShardRecord(
            self.final_path.name,
            Path(index_path).name,
            len(self.keys),
            self._offset,
            self._sha.hexdigest(),
            list(self.keys),
        )

    def abort(self) -> None:
        """Drop the partial tar (the build stopped; a re-run writes this shard again)."""
        with contextlib.suppress(OSError):  # closing flushes, and may fail again on a full disk
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
