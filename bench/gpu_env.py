"""Facts about the machine a GPU benchmark ran on: device, driver, NVDEC, library versions, and two measured
ceilings (a large bf16 matmul and a device-to-device copy) that MFU and bandwidth figures can be read against.

    python -m bench.gpu_env --out env.json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import subprocess
import time


def nvdec_available() -> str:
    """NVDEC is reached through libnvcuvid; in containers it needs NVIDIA_DRIVER_CAPABILITIES to include video."""
    try:
        ctypes.CDLL("libnvcuvid.so.1")
        return "ok"
    except OSError as e:
        return f"missing ({e})"


def _timed(fn, repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def measure_ceilings() -> dict:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_s = _timed(lambda: a @ b, 10)
    src = torch.randint(0, 255, (1 << 31,), device="cuda", dtype=torch.uint8)  # 2 GiB: far past the L2
    dst = torch.empty_like(src)
    copy_s = _timed(lambda: dst.copy_(src), 10)
    return {
        "bf16_matmul_tflops": 2 * n**3 / matmul_s / 1e12,
        "d2d_copy_tb_s_read_plus_write": 2 * src.numel() / copy_s / 1e12,
    }


def collect() -> dict:
    import torch

    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nvdec": nvdec_available(),
    }
    for name in ("triton", "timm", "nvidia.dali", "decord"):
        try:
            facts[name] = __import__(name, fromlist=["__version__"]).__version__
        except Exception as e:  # noqa: BLE001 - a missing library is a fact too
            facts[name] = f"unavailable ({type(e).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, sms=props.multi_processor_count, gpu_mem_gib=props.total_memory / 2**30)
        try:
            facts["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            facts["driver"] = "unknown"
        facts.update(measure_ceilings())
    return facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the facts as JSON here")
    args = p.parse_args()
    facts = collect()
    for k, v in facts.items():
        print(f"{k:32s} {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(facts, f, indent=2)


if __name__ == "__main__":
    main()
