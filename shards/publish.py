"""`python -m shards.publish OUT URL`: upload a finished, verified shard directory to object storage.

Builds write to a filesystem (their locks and a merge's in-place renumbering need one); this puts the result under a
bucket prefix (`s3://bucket/k400/train`, `gs://...`), where `pipeline.build_loader` reads it through its node-local
cache (`shards.cache`).

Order and guarantees:
- `shards.verify` first (`--no-decode`: structure and sums only); a set with any problem is not published.
- Every tar, then its index file, then failures.jsonl, then the manifest last: a reader that finds the manifest
  finds every object it lists. The published manifest is the local one plus each index file's size and sha256
  (`index_bytes`, `index_sha256`), so that readers check index downloads too.
- Resumable and never destructive: an object already there with the same bytes (size, then sha256 of its content)
  is kept and not sent again; one with other bytes stops the publish with one line naming it, nothing overwritten.
  An object store makes each upload whole or absent (an interrupted multipart upload is never visible), so a
  publish killed at any point and run again ends with the same objects as one that was never interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from shards import format as fmt
from shards.fetch import CHUNK, DEFAULT_RETRY, Retry, read_range, retrying
from shards.logs import configure_logging
from shards.remote import filesystem, join
from shards.writer import sha256_file

log = logging.getLogger(__name__)


class PublishConflict(RuntimeError):
    """An object of the same name and other bytes is already under the prefix."""


def published_manifest(directory: Path, manifest: dict) -> dict:
    """`manifest` with each shard's index file size and sha256 added (`index_bytes`, `index_sha256`), and the
    tar's (`bytes`, `sha256`) where a manifest written by another tool lacks them."""
    shards = []
    for shard in manifest["shards"]:
        tar, index = directory / shard["tar"], directory / shard["index"]
        sums = {"bytes": tar.stat().st_size, "sha256": sha256_file(tar)} if "sha256" not in shard else {}
        shards.append({**shard, **sums, "index_bytes": index.stat().st_size, "index_sha256": sha256_file(index)})
    return {**manifest, "shards": shards}


def remote_sha256(fs: Any, url: str, size: int, retry: Retry) -> str:
    h = hashlib.sha256()
    for start in range(0, size, CHUNK):
        h.update(read_range(fs, url, start, min(size, start + CHUNK), retry))
    return h.hexdigest()


def put_checked(fs: Any, local: Path | bytes, url: str, retry: Retry) -> bool:
    """Upload `local` (a file, or bytes) to `url` unless an object with the same bytes is there; True if sent.
    PublishConflict when an object with other bytes is there."""
    data = local if isinstance(local, bytes) else None
    size = len(data) if data is not None else local.stat().st_size
    sha = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(local)
    if retrying(url, lambda: fs.exists(url), retry):
        there = int(retrying(url, lambda: fs.info(url), retry)["size"])
        if there != size or remote_sha256(fs, url, size, retry) != sha:
            raise PublishConflict(
                f"{url}: already holds other bytes ({there} bytes) than {local if data is None else 'the manifest'}; "
                f"not overwritten (publish to another prefix, or delete it yourself if it is stale)"
            )
        return False
    if data is not None:
        retrying(url, lambda: fs.pipe_file(url, data), retry)
    else:
        retrying(url, lambda: fs.put_file(str(local), url), retry)
    return True


def publish(directory: str | os.PathLike, url: str, decode: bool = True, retry: Retry = DEFAULT_RETRY) -> list[str]:
    """Verify `directory` and upload it under the prefix `url` (see the module docstring). Returns the problems
    that stopped it (empty: published); each is one line."""
    from shards.verify import verify

    directory = Path(directory)
    problems = verify(directory, decode=decode)
    if problems:
        return problems + [f"{directory}: not published ({len(problems)} problem(s) above)"]
    try:
        upload(directory, url, retry)
    except (PublishConflict, OSError) as e:
        return [str(e)]
    return []


def upload(directory: str | os.PathLike, url: str, retry: Retry = DEFAULT_RETRY) -> int:
    """Upload the shard directory under the prefix `url` without verifying it first (`publish` does): tars and
    indexes, failures.jsonl, the manifest last, each object only when not there yet. Returns the objects sent;
    PublishConflict or OSError (one line) on the first that fails."""
    directory = Path(directory)
    manifest = published_manifest(directory, fmt.read_manifest(directory))
    fs = filesystem(url)
    names = [n for s in manifest["shards"] for n in (s["tar"], s["index"])]
    if (directory / fmt.FAILURES_NAME).is_file():
        names.append(fmt.FAILURES_NAME)
    sent = 0
    for name in names:
        sent += put_checked(fs, directory / name, join(url, name), retry)
    sent += put_checked(fs, (json.dumps(manifest, indent=1) + "\n").encode(), join(url, fmt.MANIFEST_NAME), retry)
    total = len(names) + 1
    log.info(f"publish: {directory} -> {url}: {total} objects, {sent} sent, {total - sent} already there")
    return sent


def staged_argv(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    """`shards.build --out URL --staging DIR ...`: (URL, DIR, the arguments with --out DIR and without --staging);
    other command lines are returned as they are, with (None, None). A URL without --staging, or with --part (a
    part has no manifest: publish after `shards.merge`), exits with status 2 and one line."""
    from shards.remote import is_url

    args = list(argv)

    def value(flag: str) -> str | None:
        i = args.index(flag) if flag in args else len(args)
        return args[i + 1] if i + 1 < len(args) else None

    def usage(message: str) -> SystemExit:
        print(f"python -m shards.build: error: {message}", file=sys.stderr)
        return SystemExit(2)

    url, staging = value("--out"), value("--staging")
    if not is_url(url):
        if staging is not None:
            raise usage("--staging is for an --out URL (s3://, gs://)")
        return None, None, args
    if staging is None or "--part" in args:
        raise usage(f"--out {url}: build into --staging DIR (a filesystem) and publish it, without --part")
    i = args.index("--staging")
    del args[i : i + 2]
    args[args.index("--out") + 1] = staging
    return url, staging, args


def publish_after_build(status: int, staging: str | None, url: str | None) -> int:
    """After a build into `staging`: publish it to `url` (verified, without decoding: the build just wrote it)."""
    if status != 0 or url is None:
        return status
    problems = publish(staging, url, decode=False)
    for problem in problems:
        log.error(f"problem: {problem}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    p = argparse.ArgumentParser(prog="python -m shards.publish", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="a finished shard directory (holding manifest.json)")
    p.add_argument("url", help="the prefix to publish under: s3://bucket/path or gs://bucket/path")
    p.add_argument("--no-decode", action="store_true", help="verify structure and sums only, without decoding")
    args = p.parse_args(argv)
    problems = publish(args.directory, args.url, decode=not args.no_decode)
    for problem in problems:
        log.error(f"problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
