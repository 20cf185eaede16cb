"""train.py's `main` under torchrun, then the names of this process's threads once it has returned (its process
group destroyed), written to $THREADS_OUT/rank$RANK.json. Gloo's threads still alive at that point abort the
interpreter's shutdown now and then (training.distributed.teardown)."""

import json
import os
import sys
from pathlib import Path

import train

status = train.main(sys.argv[1:])
threads = sorted(Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in os.listdir("/proc/self/task"))
Path(os.environ["THREADS_OUT"], f"rank{os.environ['RANK']}.json").write_text(
    json.dumps({"status": status, "threads": threads})
)
