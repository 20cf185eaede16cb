"""The headline run's helpers (`bash bench/gpu.sh headline`): the NVDEC check, the summaries of each step, and the
headline itself (decoded clips/s, end-to-end saturation, MFU) as JSON and as a short text.

    python -m bench.headline nvdec --shards DATA --device gpu --out OUT/nvdec.json
    python -m bench.headline check --junit OUT/check.xml --log OUT/check.log --out OUT/check.json
    python -m bench.headline decode OUT                  # OUT/decode_*.json -> OUT/decode.json (+ utilization)
    python -m bench.headline best OUT/decode.json         # train.py overrides of the fastest cut-layout strategy
    python -m bench.headline summary OUT                  # OUT/headline.json and OUT/headline.md
    python -m bench.headline describe-data DATA           # DATA/dataset.json: videos, frames, bytes per layout

Every command reads what the steps left and writes with a temporary name then a rename, so a run cut short still
leaves a consistent summary of the steps that ended.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from shards import format as fmt

# Lines the loader logs when NVDEC cannot take the cut IVF members (pipeline.loader, _choose_nvdec_input) and the
# GPU test's own message when the loader fell back.
FALLBACK_RE = re.compile(r"(pipeline: NVDEC [^\n]*|NVDEC did not read cut IVF members[^\n]*)")
DECODE_STEPS = "decode_"  # step names of step 3: decode_old, decode_new1, ...
THREE_NUMBERS = ("decoded_clips_per_s", "saturation", "mfu")


def _write(path: Path, data: Any) -> None:
    fmt.atomic_write(path, json.dumps(data, indent=1) + "\n")


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- step 1: NVDEC ------------------------------------------------------------------------------------------------
def libnvcuvid() -> str:
    """ "ok" when NVDEC's user-space library loads (in containers it needs NVIDIA_DRIVER_CAPABILITIES=...video)."""
    try:
        ctypes.CDLL("libnvcuvid.so.1")
        return "ok"
    except OSError as e:
        return f"missing ({e})"


def first_member(shards: str, exts: tuple[str, ...]) -> tuple[str, bytes]:
    """(name, bytes) of the first member of the first shard of `shards` whose name ends with one of `exts`."""
    tar = fmt.resolve_shards(shards)[0]
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            if m.name.endswith(exts):
                return f"{Path(tar).name}:{m.name}", t.extractfile(m).read()
    raise FileNotFoundError(f"{tar}: no member ending with {exts}")


def decode_clip(video: bytes, device: str):
    """uint8[F, H, W, 3] numpy frames of a whole encoded video, decoded by DALI's video decoder on `device`
    ("mixed": NVDEC, "cpu": the CPU decoder)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=0 if device == "mixed" else None)
    def one_clip():
        encoded = fn.external_source(source=lambda: [np.frombuffer(video, dtype=np.uint8)], batch=True)
        return fn.decoders.video(encoded, device=device)

    pipe = one_clip()
    pipe.build()
    (frames,) = pipe.run()
    if device == "mixed":
        frames = frames.as_cpu()
    return frames.as_array()[0]


def nvdec_check(shards: dict[str, str], device: str) -> dict:
    """NVDEC reachable (the library loads) and working (one whole video of each layout decoded by DALI on NVDEC into
    as many frames of the same size as the CPU decoder's, their mean difference recorded); on DEVICE=cpu the CPU
    decodes run alone (rehearsal)."""
    import numpy as np

    facts: dict[str, Any] = {"device": device, "libnvcuvid": libnvcuvid(), "clips": {}}
    ok = facts["libnvcuvid"] == "ok"
    for layout, directory in shards.items():
        name, video = first_member(directory, (".mp4", ".ivf"))
        start = time.perf_counter()
        cpu = decode_clip(video, "cpu")
        clip: dict[str, Any] = {"member": name, "bytes": len(video), "cpu_frames": list(cpu.shape)}
        clip["cpu_s"] = round(time.perf_counter() - start, 3)
        if device == "gpu" and ok:
            start = time.perf_counter()
            try:
                gpu = decode_clip(video, "mixed")
                clip["nvdec_s"] = round(time.perf_counter() - start, 3)
                clip["nvdec_frames"] = list(gpu.shape)
                # NVDEC is usable when it decodes every frame; how close its colours are is step 2's question
                # (the H100 saw differences of under one grey level on average), recorded here as a hint.
                if gpu.shape == cpu.shape:
                    clip["mean_abs_diff"] = round(float(np.abs(gpu.astype(np.int16) - cpu).mean()), 3)
                    clip["nvdec"] = "ok"
                else:
                    clip["nvdec"] = f"decoded {list(gpu.shape)}, the CPU decoder {list(cpu.shape)}"
            except Exception as e:  # noqa: BLE001 - any failure means: no NVDEC for this run, said in one line
                clip["nvdec"] = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        else:
            clip["nvdec"] = "not tried (DEVICE=cpu)" if device != "gpu" else "not tried (libnvcuvid missing)"
        facts["clips"][layout] = clip
    facts["nvdec"] = device == "gpu" and ok and all(c["nvdec"] == "ok" for c in facts["clips"].values())
    return facts


# -- step 2: the GPU check ----------------------------------------------------------------------------------------
def check_summary(junit: Path, log: Path, rc: int | None = None) -> dict:
    """Outcome of each selected test from pytest's JUnit XML, and the loader's fallback lines from its log."""
    tests = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for kind in ("failure", "error", "skipped"):
                node = case.find(kind)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error"}.get(kind, kind)
                    detail = (node.get("message") or node.text or "").strip().splitlines()
                    break
            else:
                detail = []
            tests.append(
                {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "detail": detail[:3]}
            )
    text = log.read_text(errors="replace") if log.is_file() else ""
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {
        "rc": rc,
        "selected": len(tests),
        **counts,
        "tests": tests,
        "fallback": sorted(set(FALLBACK_RE.findall(text))),
    }


# -- step 3: decoding -------------------------------------------------------------------------------------------
def decode_rows(out: Path) -> list[dict]:
    """One row per decoding run of step 3 (OUT/decode_*.json of bench.bench_pipeline), with its step's engine use."""
    rows = []
    for path in sorted(out.glob(f"{DECODE_STEPS}*.json")):
        step = path.stem
        if step == "decode_summary":
            continue
        data = _read(path) or {}
        util = _engines(data.get("gpu_utilization"))
        log = path.with_suffix(".log")
        fallback = sorted(set(FALLBACK_RE.findall(log.read_text(errors="replace")))) if log.is_file() else []
        for run in data.get("decode_sweep", []):
            row = {
                "step": step,
                "layout": run.get("layout"),
                "spec": run.get("spec"),
                "threads": run.get("threads"),  # of all the pipelines together (data.num_threads)
                "pipeline_threads": run.get("pipeline_threads"),
                "pipelines": run.get("pipelines"),
                "decoder_groups": run.get("decoder_groups"),
                "cpu_decoder_groups": run.get("cpu_decoder_groups"),
                "decode": run.get("decode", "fixed"),
                "decoded_clips_per_s": run.get("decoded_clips_per_s"),
                "clips_per_s": run.get("clips_per_s"),
                "repeats": run.get("repeats"),
                **util,
            }
            if run.get("decode_table"):
                row["decode_table"] = run["decode_table"]
            if fallback:  # the loader did not decode the cut members on NVDEC as asked (pipeline.loader)
                row["fallback"] = fallback
            rows.append(row)
    return rows


def _engines(summary: dict | None) -> dict:
    """SM and NVDEC use (mean over the step, mean over its active seconds, max) of GPU 0, from bench.gpu_util."""
    if not summary or "gpus" not in summary:
        return {}
    engines = next(iter(summary["gpus"].values()), {}).get("engines", {})
    return {
        f"{name}_util": {k: engines[name][k] for k in ("mean", "active_mean", "max")}
        for name in ("sm", "dec")
        if name in engines
    }


def decode_summary(out: Path) -> dict:
    """Step 3 in one record: every run, the old configuration, the fastest new one and their ratio."""
    rows = decode_rows(out)
    old = next((r for r in rows if r["step"] == "decode_old"), None)
    new = [r for r in rows if r["step"] != "decode_old" and r["decoded_clips_per_s"]]
    best = max(new, key=lambda r: r["decoded_clips_per_s"]) if new else None
    summary: dict[str, Any] = {"runs": rows, "old": old, "best": best}
    if old and best and old["decoded_clips_per_s"]:
        summary["gain"] = round(best["decoded_clips_per_s"] / old["decoded_clips_per_s"], 2)
    return summary


def best_overrides(decode: dict) -> list[str]:
    """train.py overrides that run step 3's fastest cut-layout strategy as it ran (decode=auto: the one it chose)."""
    best = decode.get("best")
    if not best:
        return []
    return [
        f"data.num_threads={best['threads']}",
        f"data.options.pipelines={best['pipelines']}",
        f"data.options.decoder_groups={best['decoder_groups']}",
        f"data.options.cpu_decoder_groups={best['cpu_decoder_groups']}",
    ]


# -- the headline -------------------------------------------------------------------------------------------------
def headline(out: Path) -> dict:
    """The three numbers and what they rest on, from whatever steps wrote their JSON."""
    env, nvdec, check = _read(out / "env.json"), _read(out / "nvdec.json"), _read(out / "check.json")
    decode, train = _read(out / "decode_summary.json"), _read(out / "train.json")
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {k: env.get(k) for k in ("gpu", "driver", "cpus", "torch", "nvidia.dali")} if env else None,
        "device": nvdec.get("device") if nvdec else None,
        "nvdec": nvdec.get("nvdec") if nvdec else None,
        "check": {k: check.get(k) for k in ("selected", "passed", "failed", "skipped", "fallback")} if check else None,
        "steps_done": sorted(p.stem for p in out.glob("*.json") if p.stem not in ("headline", "gpu_util")),
    }
    if decode:
        best, old = decode.get("best") or {}, decode.get("old") or {}
        result["decoded_clips_per_s"] = best.get("decoded_clips_per_s")
        result["decode"] = {
            "old": _brief(old),
            "best": _brief(best),
            "gain": decode.get("gain"),
            "runs": [_brief(r) for r in decode.get("runs", [])],
        }
    if train:
        real, memory = train["real"][0], train["in_memory"][0]
        result["saturation"] = train.get("ratio")
        result["mfu"] = real.get("mfu")
        result["train"] = {
            "config": train.get("config"),
            "overrides": train.get("overrides"),
            "real": {k: real.get(k) for k in ("clips_per_s", "data_wait", "mfu")},
            "in_memory": {k: memory.get(k) for k in ("clips_per_s", "data_wait", "mfu")},
        }
    return result


def _brief(row: dict) -> dict:
    keys = ("layout", "spec", "threads", "pipeline_threads", "pipelines", "decoder_groups", "cpu_decoder_groups")
    shown = (*keys, "decode", "decoded_clips_per_s", "sm_util", "dec_util", "fallback")
    return {k: row.get(k) for k in shown if row.get(k) is not None}


def _pct(value: float | None) -> str:
    return "not measured" if value is None else f"{100 * value:.1f} %"


def headline_text(h: dict) -> str:
    """headline.md: the three numbers first, then what they rest on; "not measured" for every missing step."""
    machine = h.get("machine") or {}
    nvdec = {True: "working", False: "not reachable (CPU decoding, GPU augmentation)", None: "not checked"}
    lines = [
        f"# Headline run, {h['date']}",
        "",
        (
            f"Machine: {machine.get('gpu') or 'no GPU'}, driver {machine.get('driver')}, {machine.get('cpus')} CPUs, "
            f"torch {machine.get('torch')}, DALI {machine.get('nvidia.dali')}"
            if machine
            else "Machine: not recorded (env step missing)"
        )
        + f"; NVDEC: {nvdec[h.get('nvdec')] if h.get('device') != 'cpu' else 'not tried (DEVICE=cpu, a rehearsal)'}",
        "",
    ]
    decode, train = h.get("decode") or {}, h.get("train")
    best, old = decode.get("best") or {}, decode.get("old") or {}
    if best:
        line = f"1. Decoded clips/s per GPU, K = 2: {best['decoded_clips_per_s']:.1f} ({_describe(best)})"
        if old:
            line += f"; old configuration {old['decoded_clips_per_s']:.1f} ({_describe(old)}): {decode['gain']}x"
        lines.append(line)
    else:
        lines.append("1. Decoded clips/s per GPU, K = 2: not measured")
    if train:
        real, memory = train["real"], train["in_memory"]
        lines.append(
            f"2. End-to-end saturation (real / in-memory clips/s): {h['saturation']:.3f} "
            f"({real['clips_per_s']:.1f} / {memory['clips_per_s']:.1f} clips/s; data wait {_pct(real['data_wait'])} / "
            f"{_pct(memory['data_wait'])})"
        )
        lines.append(
            f"3. MFU: {_pct(real.get('mfu'))} fed by the pipeline, {_pct(memory.get('mfu'))} on in-memory batches"
        )
    else:
        lines += ["2. End-to-end saturation: not measured", "3. MFU: not measured"]
    check = h.get("check")
    if check:
        lines.append(
            f"\nGPU check (cut IVF on NVDEC = CPU backend): {check['passed']} passed, {check['failed']} failed, "
            f"{check['skipped']} skipped of {check['selected']}"
            + (f"; loader fallback: {'; '.join(check['fallback'])}" if check.get("fallback") else "")
        )
    if decode.get("runs"):
        lines.append(
            "\n| spec | layout | strategy | decoded clips/s | SM % (mean/active/max) | NVDEC % (mean/active/max) |"
        )
        lines.append("|---|---|---|---|---|---|")
        for r in decode["runs"]:
            lines.append(
                f"| {r.get('spec')} | {r.get('layout')} | {_describe(r)} | {r.get('decoded_clips_per_s')} | "
                f"{_util(r.get('sm_util'))} | {_util(r.get('dec_util'))} |"
            )
        for r in decode["runs"]:
            for line in r.get("fallback", []):
                lines.append(f"\n{r.get('spec')}: loader fallback: {line}")
    lines.append(f"\nSteps with results: {', '.join(h['steps_done'])}")
    return "\n".join(lines) + "\n"


def _describe(row: dict) -> str:
    per = row.get("pipeline_threads")  # as the loader built them; older runs recorded only the total
    threads = f"x {'/'.join(map(str, sorted(set(per))))} threads" if per else f"sharing {row.get('threads')} threads"
    strategy = (
        f"{row.get('pipelines')} pipeline(s) {threads}, {row.get('decoder_groups')} decoder "
        f"group(s) of which {row.get('cpu_decoder_groups')} on CPU threads"
    )
    return f"{row.get('layout')}, " + ("decode=auto chose " if row.get("decode") == "auto" else "") + strategy


def _util(u: dict | None) -> str:
    return "n/a" if not u else f"{u['mean']:.0f} / {u['active_mean']:.0f} / {u['max']:.0f}"


# -- the data set -------------------------------------------------------------------------------------------------
def describe_data(data: Path, sources: str, num_frames: int = 16, stride: int = 4) -> dict:
    """Per layout: videos, mean frames, bytes per video, frames DALI decodes per training clip, total bytes."""
    from bench.layouts import layout_summary
    from pipeline.shardset import ShardSet

    layouts = {}
    for layout in sorted(p for p in data.iterdir() if (p / fmt.MANIFEST_NAME).is_file()):
        tars = fmt.resolve_shards(str(layout))
        layouts[layout.name] = {
            **layout_summary(tars, ShardSet(tars).phases, num_frames, stride),
            "bytes": sum(f.stat().st_size for f in layout.iterdir()),
        }
    return {
        "sources": [s for s in sources.split(";") if s],
        "clip": {"num_frames": num_frames, "stride": stride},
        "layouts": layouts,
        "bytes": sum(v["bytes"] for v in layouts.values()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.headline", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("nvdec", help="NVDEC reachable and decoding one video of each layout like the CPU decoder")
    s.add_argument("--shards", required=True, help="NAME=DIR,... (one video of each is decoded)")
    s.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    s.add_argument("--out", required=True)
    s = sub.add_parser("check", help="summarize the GPU check's pytest run")
    s.add_argument("--junit", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--rc", type=int)
    s.add_argument("--out", required=True)
    s = sub.add_parser("decode", help="OUT/decode_*.json -> OUT/decode_summary.json")
    s.add_argument("out")
    s = sub.add_parser("best", help="train.py overrides of step 3's fastest strategy")
    s.add_argument("decode_json")
    s = sub.add_parser("summary", help="OUT/headline.json and OUT/headline.md")
    s.add_argument("out")
    s = sub.add_parser("describe-data", help="DATA/dataset.json")
    s.add_argument("data")
    s.add_argument("--sources", default="", help="the sources, ';'-separated (recorded as given)")
    args = p.parse_args(argv)

    if args.command == "nvdec":
        shards = dict(item.split("=", 1) for item in args.shards.split(","))
        facts = nvdec_check(shards, args.device)
        _write(Path(args.out), facts)
        for layout, clip in facts["clips"].items():
            print(
                f"nvdec {layout}: {clip['member']} ({clip['bytes']} bytes): CPU frames {clip['cpu_frames']}, "
                f"NVDEC {clip['nvdec']}"
            )
        print(
            f"NVDEC: libnvcuvid {facts['libnvcuvid']}; "
            + ("working" if facts["nvdec"] else "NOT reachable: step 3 measures CPU decoding with GPU augmentation")
        )
    elif args.command == "check":
        summary = check_summary(Path(args.junit), Path(args.log), args.rc)
        _write(Path(args.out), summary)
        print(
            f"check: {summary['selected']} selected, {summary['passed']} passed, {summary['failed']} failed, "
            f"{summary['skipped']} skipped"
        )
        for line in summary["fallback"]:
            print(f"check: loader fallback: {line}")
    elif args.command == "decode":
        out = Path(args.out)
        summary = decode_summary(out)
        _write(out / "decode_summary.json", summary)
        for r in summary["runs"]:
            print(f"decode {r['step']}: {r['decoded_clips_per_s']} decoded clips/s ({_describe(r)})")
        if summary.get("gain"):
            print(f"decode: best new / old = {summary['gain']}x")
    elif args.command == "best":
        decode = _read(Path(args.decode_json)) or {}
        print(" ".join(best_overrides(decode)))
    elif args.command == "summary":
        out = Path(args.out)
        h = headline(out)
        _write(out / "headline.json", h)
        fmt.atomic_write(out / "headline.md", headline_text(h))
    elif args.command == "describe-data":
        data = Path(args.data)
        facts = describe_data(data, args.sources)
        _write(data / "dataset.json", facts)
        for name, layout in facts["layouts"].items():
            print(
                f"{name}: {layout['videos']} videos, {layout['mean_frames']} frames on average, "
                f"{layout['bytes_per_video'] / 1e3:.0f} kB per video, {layout['decoded_frames_per_clip']} frames "
                f"decoded per clip, {layout['bytes'] / 1e6:.1f} MB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
