"""Shard sets in object storage: `s3://`, `gs://` and `https://` URLs read through fsspec (the `[cloud]` extra).

A remote set is a shard directory as `shards.build` writes it, under a URL prefix: `PREFIX/manifest.json` beside
`PREFIX/{split}-NNNNNN.tar` and `.idx`. Three spellings name it:

    s3://bucket/k400/train                                 the prefix (a trailing slash is fine)
    s3://bucket/k400/train/manifest.json                   the manifest's URL
    s3://bucket/k400/train/train-{000000..000099}.tar      a brace range of its tars (a subset, in the given order)

The manifest is required: it lists the shards, and its sizes and sha256 sums are what every download is checked
against (`shards.fetch`). Plain HTTPS servers cannot list a prefix, which is one reason the manifest is the list.
Credentials and endpoints come from each filesystem's usual environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_PROFILE / AWS_ENDPOINT_URL (s3fs via botocore), GOOGLE_APPLICATION_CREDENTIALS (gcsfs); nothing is passed here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import braceexpand

from shards import format as fmt
from shards.fetch import DEFAULT_RETRY, Retry, fetch_file, read_bytes, retrying

SCHEMES = ("s3", "gs", "gcs", "http", "https")
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(spec: Any) -> bool:
    """Whether `spec` (or, for a list, its first item) is a URL rather than a local path."""
    if isinstance(spec, (list, tuple)):
        return bool(spec) and is_url(spec[0])
    return isinstance(spec, str) and _URL.match(spec) is not None


def filesystem(url: str) -> Any:
    """The fsspec filesystem serving `url`. ImportError naming the extra when fsspec (or the scheme's package: s3fs,
    gcsfs, aiohttp) is missing; ValueError for a scheme other than s3, gs, http(s)."""
    scheme = _URL.match(url).group(1).lower() if _URL.match(url) else ""
    if scheme not in SCHEMES:
        raise ValueError(f"{url}: {scheme or 'no'}:// scheme; remote shards are read from s3://, gs:// or https://")
    try:
        import fsspec

        # a new instance, not fsspec's cached one: endpoints and credentials are read from the environment when it
        # is made, and the environment may have changed since (another endpoint: a stale client)
        return fsspec.filesystem(scheme, skip_instance_cache=True)
    except ImportError as e:
        raise ImportError(
            f"{url}: reading {scheme}:// needs the cloud extra (pip install 'videomae-fast[cloud]': fsspec, s3fs, "
            f"gcsfs, aiohttp): {e}"
        ) from None


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


@dataclasses.dataclass
class RemoteSet:
    """A shard directory under a URL prefix: its manifest (validated, as JSON text too) and the tars a loader reads
    (the manifest's, or a brace range's subset in its order)."""

    base: str  # the prefix, without a trailing slash
    manifest: dict
    manifest_text: str
    names: list[str]  # tar names, in reading order
    fs: Any

    def url(self, name: str) -> str:
        return join(self.base, name)

    def entry(self, name: str) -> dict:
        """The manifest's record of tar `name` ({"tar", "index", "num_samples", "bytes", "sha256", ...})."""
        return self._by_tar[name]

    def __post_init__(self) -> None:
        self._by_tar = {s["tar"]: s for s in self.manifest["shards"]}
        unknown = [n for n in self.names if n not in self._by_tar]
        if unknown:
            raise ValueError(f"{self.url(unknown[0])}: not listed in {join(self.base, fmt.MANIFEST_NAME)}")


def split_spec(spec: str) -> tuple[str, list[str] | None]:
    """(prefix URL, tar names or None for all of the manifest's) of one remote specification."""
    if spec.endswith("/" + fmt.MANIFEST_NAME):
        return spec[: -len(fmt.MANIFEST_NAME) - 1], None
    expanded = list(braceexpand.braceexpand(spec))
    if len(expanded) > 1 or spec.endswith(".tar"):
        bases = {u.rsplit("/", 1)[0] for u in expanded}
        if len(bases) > 1 or not all(u.endswith(".tar") for u in expanded):
            raise ValueError(f"{spec}: a brace range must name .tar files of one prefix")
        return bases.pop(), [u.rsplit("/", 1)[1] for u in expanded]
    return spec.rstrip("/"), None


def open_remote_set(spec: str | Sequence[str], retry: Retry = DEFAULT_RETRY) -> RemoteSet:
    """The remote set that `spec` names (one URL or a list of URLs of one prefix), its manifest downloaded and
    checked. FetchError when the manifest cannot be read, ValueError when it is not a shard manifest or `spec` names
    tars it does not list."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    base, names = None, []
    for item in specs:
        item_base, item_names = split_spec(str(item))
        if base is not None and item_base != base:
            raise ValueError(f"{item}: one loader reads one remote prefix, not {base} and {item_base}")
        base = item_base
        names = None if item_names is None or names is None else names + item_names
    fs = filesystem(base)
    url = join(base, fmt.MANIFEST_NAME)
    text = read_bytes(fs, url, retry).decode()
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{url}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{url}: not a JSON object")
    fmt.validate_manifest(manifest, url)
    if names is None:
        names = [s["tar"] for s in manifest["shards"]]
    return RemoteSet(base=base, manifest=manifest, manifest_text=text, names=names, fs=fs)


def download_set(remote: RemoteSet, dest: str | os.PathLike, retry: Retry = DEFAULT_RETRY) -> Path:
    """Copy `remote` into the local directory `dest`: its manifest, failures.jsonl (when there), and each tar and
    index file checked against the manifest's sizes and sums (`shards.fetch.fetch_file`). FetchError (one line)
    for an object that cannot be fetched or differs from the manifest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    failures = join(remote.base, fmt.FAILURES_NAME)
    if retrying(failures, lambda: remote.fs.exists(failures), retry):
        fmt.atomic_write(dest / fmt.FAILURES_NAME, read_bytes(remote.fs, failures, retry))
    for name in remote.names:
        entry = remote.entry(name)
        fetch_file(remote.fs, remote.url(name), dest / name, int(entry["bytes"]), entry.get("sha256"), retry)
        index = remote.url(entry["index"])
        if "index_bytes" in entry:
            size, sha = int(entry["index_bytes"]), entry.get("index_sha256")
            fetch_file(remote.fs, index, dest / entry["index"], size, sha, retry)
        else:
            fmt.atomic_write(dest / entry["index"], read_bytes(remote.fs, index, retry))
    fmt.atomic_write(dest / fmt.MANIFEST_NAME, remote.manifest_text)
    return dest
