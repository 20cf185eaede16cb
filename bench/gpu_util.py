"""Engine utilization beside the rates: summarize `nvidia-smi dmon -s u` logs per benchmark step.

bench/gpu.sh runs `nvidia-smi dmon -s u -d 1` in the background during each step, writing OUTDIR/STEP.dmon.log,
then calls

    python3 -m bench.gpu_util summarize OUTDIR/STEP.dmon.log --step STEP --json OUTDIR/STEP.json \
        --summary OUTDIR/gpu_util.json

which prints one line, adds a "gpu_utilization" entry to the step's own JSON (when it wrote one) and merges the
step into a summary file. `dmon -s u` prints, once a second and per GPU, the percentage of the sample period during
which each engine was busy:

    # gpu     sm    mem    enc    dec    jpg    ofa
    # Idx      %      %      %      %      %      %
        0     97     41      0     23      0      0

(`sm`: some kernel running on the SMs; `mem`: memory-controller activity; `dec`: NVDEC, averaged over the GPU's
decoder engines, so one busy engine of an H100's 7 reads about 14 %). Older drivers print fewer columns, `-o DT`
adds date and time columns, and a column the GPU lacks reads "-"; the header names every column, so the parser
follows it. A step's log also holds the idle seconds of its start-up (building pipelines, compiling), so besides
the mean over all samples it reports the mean over the "active" samples, those in which any engine was busy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shards import format as fmt

ENGINES = ("sm", "mem", "enc", "dec", "jpg", "ofa")


def parse_dmon(text: str) -> dict[str, list[dict[str, float | None]]]:
    """{gpu index: [one {column: percent or None} per sample, in order]} from `nvidia-smi dmon` output.

    Header lines ("# gpu sm mem ...") name the columns; unit lines ("# Idx % ..."), blank lines and anything that
    does not fit the header (a warning, a truncated last line) are skipped."""
    columns: list[str] | None = None
    samples: dict[str, list[dict[str, float | None]]] = {}
    for line in text.splitlines():
        tokens = line.lstrip("#").split()
        if line.startswith("#"):
            names = [t.lower() for t in tokens]
            if "gpu" in names and any(e in names for e in ENGINES):
                columns = names
            continue
        if columns is None or len(tokens) != len(columns):
            continue
        row = dict(zip(columns, tokens))
        try:
            values = {name: None if row[name] == "-" else float(row[name]) for name in columns if name in ENGINES}
        except ValueError:
            continue
        samples.setdefault(row["gpu"], []).append(values)
    return samples


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": round(sum(values) / len(values), 1), "max": max(values)}


def summarize(text: str, interval_s: float = 1.0) -> dict[str, Any]:
    """Per GPU and engine: mean and max percent over all samples and over the active ones (any engine > 0)."""
    gpus: dict[str, Any] = {}
    for gpu, rows in parse_dmon(text).items():
        active = [r for r in rows if any(v for v in r.values())]
        engines = {}
        for name in ENGINES:
            every = [r[name] for r in rows if r.get(name) is not None]
            if every:
                busy = [r[name] for r in active if r.get(name) is not None]
                engines[name] = {**_stats(every), "active_mean": (_stats(busy) or {"mean": 0.0})["mean"]}
        gpus[gpu] = {"samples": len(rows), "active_samples": len(active), "engines": engines}
    summary: dict[str, Any] = {"source": "nvidia-smi dmon -s u", "interval_s": interval_s, "gpus": gpus}
    if not gpus:
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        summary["error"] = f"no samples ({first[:120]})" if first else "no samples (empty log)"
    return summary


def describe(step: str, summary: dict[str, Any]) -> str:
    """One line: sm and dec mean / active mean / max per GPU."""
    if "error" in summary:
        return f"gpu_util {step}: {summary['error']}"
    parts = []
    for gpu, info in summary["gpus"].items():
        shown = []
        for name in ("sm", "dec"):
            e = info["engines"].get(name)
            if e:
                shown.append(f"{name} mean {e['mean']:.0f}% (active {e['active_mean']:.0f}%) max {e['max']:.0f}%")
        parts.append(f"gpu {gpu}: " + ", ".join(shown) + f" over {info['samples']} s")
    return f"gpu_util {step}: " + "; ".join(parts)


def _write_json(path: Path, data: Any) -> None:
    fmt.atomic_write(path, json.dumps(data, indent=1))


def record(summary: dict[str, Any], step: str, step_json: Path | None, summary_json: Path | None) -> None:
    """Add `summary` as "gpu_utilization" to the step's JSON (a dict; left alone if absent or not a dict) and under
    `step` in the summary file (created if needed)."""
    if step_json is not None and step_json.is_file():
        try:
            data = json.loads(step_json.read_text())
        except ValueError:
            data = None
        if isinstance(data, dict):
            data["gpu_utilization"] = summary
            _write_json(step_json, data)
    if summary_json is not None:
        merged = json.loads(summary_json.read_text()) if summary_json.is_file() else {}
        merged[step] = summary
        _write_json(summary_json, merged)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_util", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="summarize one `nvidia-smi dmon -s u` log")
    s.add_argument("log")
    s.add_argument("--step", help="the step's name (default: the log's name)")
    s.add_argument("--json", help="the step's benchmark JSON: gets a gpu_utilization entry")
    s.add_argument("--summary", help="JSON file collecting every step's summary")
    s.add_argument("--interval", type=float, default=1.0, help="dmon's -d, seconds")
    args = p.parse_args(argv)
    log = Path(args.log)
    step = args.step or log.name.split(".")[0]
    text = log.read_text(errors="replace") if log.is_file() else ""
    summary = summarize(text, args.interval)
    record(summary, step, Path(args.json) if args.json else None, Path(args.summary) if args.summary else None)
    print(describe(step, summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
