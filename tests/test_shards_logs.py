"""`shards.logs.configure_logging`: the one set-up of every command line (streams, levels, rank prefix)."""

import contextlib
import io
import logging
import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = """
import logging, sys
from shards.logs import configure_logging
configure_logging(rank=int(sys.argv[1]))
log = logging.getLogger("pipeline")
log.debug("a debug line")
log.info("an info line")
log.warning("a warning line")
configure_logging(rank=int(sys.argv[1]))  # again: replaces, never doubles
log.error("an error line")
"""


def _run(rank: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(rank)], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )


def test_rank_zero_logs_info_to_stdout_and_warnings_to_stderr():
    proc = _run(0)
    assert proc.stdout.splitlines() == ["an info line"]
    assert proc.stderr.splitlines() == ["a warning line", "an error line"]


def test_other_ranks_log_warnings_only_with_their_rank():
    proc = _run(3)
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["[rank 3] a warning line", "[rank 3] an error line"]


def test_lines_go_to_the_streams_of_the_moment_not_those_of_the_set_up():
    # a command line called in-process (as tests call `main`) after sys.stdout / sys.stderr were swapped
    from shards.logs import configure_logging

    configure_logging(rank=0)  # undone after the test (conftest)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        logging.getLogger("shards.test").info("an info line")
        logging.getLogger("shards.test").warning("a warning line")
    assert out.getvalue().splitlines() == ["an info line"]
    assert err.getvalue().splitlines() == ["a warning line"]
