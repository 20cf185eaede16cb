"""The one logging set-up of every command line: `train.py`, `python -m shards.*`, `python -m apps.*`,
`python -m model.export_hf`, `python -m pipeline.preview`.

    from shards.logs import configure_logging
    configure_logging()            # in main(), before anything logs

One format for all of them: the message alone (lines are for people and already name their subject, e.g.
"pipeline: ..."), INFO and DEBUG on stdout, WARNING and above on stderr; rank 0 (or a process outside torchrun) logs
from INFO up, the other ranks warnings and errors only, each prefixed with its rank. Progress bars stay tqdm's (on
stderr). Libraries only call `logging.getLogger(name)`; they never configure logging themselves.

It lives in `shards`, the package with no dependency on the others, so that every layer may import it for free.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(message)s"


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class ConsoleHandler(logging.StreamHandler):
    """The handlers `configure_logging` installs on the root logger, one on stdout and one on stderr. Each writes to
    sys.stdout or sys.stderr as they are when a record is emitted, not as they were when logging was configured: a
    command line called in-process (tests, `contextlib.redirect_stdout`) that swaps them gets its lines, and no
    handler is left holding a closed stream."""

    def __init__(self, name: str) -> None:
        self._stream_name = name  # not `_name`: logging.Handler has one
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the stream is always the current one
        pass


def configure_logging(rank: int | None = None, verbose: bool = False) -> None:
    """Route the root logger as the module docstring says. `rank`: this process's rank (default: $RANK, else 0);
    `verbose`: DEBUG on rank 0. Calling it again replaces the earlier set-up. Handlers that someone else put on the
    root logger stay (a command line's `main()` run inside a test keeps pytest's log capture working)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    fmt = FORMAT if rank == 0 else f"[rank {rank}] {FORMAT}"
    out = ConsoleHandler("stdout")
    out.addFilter(_BelowWarning())
    err = ConsoleHandler("stderr")
    err.setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    root.setLevel((logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING)
