"""Plot input-pipeline throughput from `bench.bench_pipeline` results: emitted clips/s against repeated views K,
and decoded clips/s against decode threads (DALI) / DataLoader workers (baseline), one column per results file.

    python -m bench.plot bench/results/pipeline_cpu.json bench/results/pipeline_h100_vp9.json \
        --out bench/pipeline_scaling.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {
    "dali": dict(color="tab:green", marker="o", label="this pipeline (DALI)"),
    "baseline": dict(color="tab:gray", marker="s", label="decord + DataLoader baseline"),
    "torchcodec": dict(color="tab:brown", marker="D", label="torchcodec + threads baseline"),
}
LAYOUT_COLORS = ["tab:green", "tab:blue", "tab:red", "tab:purple", "tab:orange"]
LAYOUT_WORDS = {
    "timeline": "timeline order",
    "phases4": "4 phases, MP4",
    "cut4": "4 phases, IVF cut at key frames",
    "cut1": "timeline order, IVF cut",
}


def _line(name: str, layouts: list[str]) -> dict:
    """Plot style of a "baseline" or "dali LAYOUT" line: one colour per layout, in the order the run lists them."""
    if name in ("baseline", "torchcodec"):
        return STYLE[name]
    layout = name.split(" ", 1)[1] if " " in name else "timeline"
    colour = LAYOUT_COLORS[layouts.index(layout) % len(LAYOUT_COLORS)] if layout in layouts else "tab:green"
    return dict(
        color=colour,
        marker="o" if layout == layouts[0] else "^",
        label=f"this pipeline, {LAYOUT_WORDS.get(layout.split(':')[0], layout)}"
        + (f" (GOP {layout.split(':')[1]})" if ":" in layout else ""),
    )


def _median_by(rows: list[dict], x_key: str, y_key: str) -> dict[str, tuple[list, list]]:
    """{"baseline" or "dali LAYOUT": (xs, median ys)} over rounds."""
    groups: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        x = row.get(x_key, row.get("workers"))
        name = row["loader"] if row["loader"] != "dali" else f"dali {row.get('layout', 'timeline')}"
        groups[name][x].append(row[y_key])
    return {loader: (sorted(v), [statistics.median(v[x]) for x in sorted(v)]) for loader, v in groups.items()}


def _title(result: dict) -> str:
    machine = result["machine"]
    where = machine.get("gpu") or f"{machine.get('processor', 'CPU')}"
    cores = machine.get("cores", result["settings"].get("cores"))
    return f"{result['settings']['device']} backend, {where}, {cores} cores"


def plot(results: list[dict], out: str) -> None:
    fig, axes = plt.subplots(2, len(results), figsize=(5.2 * len(results), 7.5), squeeze=False)
    for col, result in enumerate(results):
        top, bottom = axes[0][col], axes[1][col]
        layouts = list(dict.fromkeys(r.get("layout", "timeline") for r in result["results"] if r["loader"] == "dali"))
        for loader, (xs, ys) in _median_by(result["results"], "repeats", "clips_per_s").items():
            top.plot(xs, ys, **_line(loader, layouts))
        top.set(
            xlabel="views per decoded clip K (repeated augmentation)",
            ylabel="clips/s emitted",
            title=_title(result),
            xticks=sorted({r["repeats"] for r in result["results"]}),
        )
        top.set_ylim(bottom=0)
        top.grid(alpha=0.3)
        top.legend(fontsize=8)
        sweep = result.get("sweep") or []
        for kind in ("dali", "baseline", "torchcodec"):
            rows = [r for r in sweep if r["loader"] == kind]
            for loader, (xs, ys) in _median_by(
                rows, "workers" if kind == "baseline" else "threads", "decoded_clips_per_s"
            ).items():
                bottom.plot(xs, ys, **_line(loader, layouts))
                bottom.set_xticks(xs)
        bottom.set(
            xlabel="decode threads (DALI, torchcodec) / DataLoader workers (decord)", ylabel="clips/s decoded (K=1)"
        )
        bottom.set_ylim(bottom=0)
        bottom.grid(alpha=0.3)
        if not sweep:
            bottom.text(0.5, 0.5, "no sweep in this run", ha="center", va="center", transform=bottom.transAxes)
    fig.suptitle("Pretraining input: 16 frames at stride 4,\nmulti-scale crop to 224, tube mask", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="bench_pipeline JSON files")
    p.add_argument("--out", default="bench/pipeline_scaling.png")
    args = p.parse_args()
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    plot(results, args.out)


if __name__ == "__main__":
    main()
