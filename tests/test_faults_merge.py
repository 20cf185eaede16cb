"""A merge killed at any instant resumes (issue 24, item 1).

`shards.merge` is run as a real subprocess on a copy of three real, unmerged parts (`test_shards_parts`' fixtures:
parts 1 and 2 are renumbered, some json members shrink, so member headers are rewritten), and killed by SIGKILL right
after its Nth write (`$SHARDS_MERGE_KILL_AFTER`: journal, member data, member header, index, journal removal,
failures.jsonl, manifest), for every N until a merge makes fewer than N writes. The same merge re-run must finish,
and every file it leaves must be byte-equal to an uninterrupted merge's.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import module_env
from test_shards_build import build_files
from test_shards_parts import base_args, merged, unmerged  # noqa: F401 (fixtures)

from shards.merge import KILL_AFTER_ENV


def _merge(out: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = module_env() | ({KILL_AFTER_ENV: str(kill_after)} if kill_after else {})
    return subprocess.run(
        [sys.executable, "-m", "shards.merge", "--threads", "1", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_merge_killed_after_any_of_its_writes_is_finished_by_a_rerun(unmerged, merged, tmp_path):
    expected = build_files(merged[0])
    kills = 0
    while True:
        out = tmp_path / f"kill{kills + 1}" / "train"
        shutil.copytree(unmerged, out)
        first = _merge(out, kill_after=kills + 1)
        if first.returncode == 0:  # the merge made fewer writes than that: every one has been a kill point
            assert build_files(out) == expected
            break
        assert first.returncode == -signal.SIGKILL, first.stderr
        kills += 1
        again = _merge(out)
        assert again.returncode == 0, f"killed after write {kills}: {again.stderr}"
        assert not (out / ".build").exists(), f"killed after write {kills}: state left"
        assert build_files(out) == expected, f"killed after write {kills}: the merged files differ"
        shutil.rmtree(out.parent)
    # per renumbered shard: journal, each member's data (and header when it shrinks), index, journal removal
    print(f"merge killed after each of its {kills} writes, each re-run byte-equal")
    assert kills >= 20, kills


def test_a_merge_killed_twice_in_a_row_still_finishes(unmerged, merged, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(unmerged, out)
    for kill_after in (3, 2):  # the re-run replays the first shard's journal and dies inside it again
        assert _merge(out, kill_after).returncode == -signal.SIGKILL
    assert _merge(out).returncode == 0
    assert build_files(out) == build_files(merged[0])


def test_a_journal_left_for_a_tar_rebuilt_since_is_planned_again(tmp_path, caplog):
    from test_shards_parts import _fake_shard

    from shards.merge import journal_path, patch_shard_ids

    tar = _fake_shard(tmp_path, [10, 11], ["/videos/a.mp4", "/videos/b.mp4"])
    code = f"import pathlib, shards.merge as m; m.patch_shard_ids(pathlib.Path({str(tar)!r}), 10, 8)"
    env = module_env() | {KILL_AFTER_ENV: "1"}  # killed right after writing its journal
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == -signal.SIGKILL
    assert journal_path(tar).is_file()
    # the part is rebuilt (other sources: other json members) before the merge is re-run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for directory in (tmp_path, fresh):
        _fake_shard(directory, [10, 11], ["/videos/other-a.mp4", "/videos/longer-name-b.mp4"])
    expected = patch_shard_ids(fresh / tar.name, 10, 8)
    assert patch_shard_ids(tar, 10, 8) == expected and not journal_path(tar).exists()
    assert "changed since it was written; planned again" in caplog.text
