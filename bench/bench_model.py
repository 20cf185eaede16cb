"""Training-step throughput and MFU of the VideoMAE model: pretraining and fine-tuning, fused vs reference.

One step = forward + backward + AdamW update on synthetic data already on the device (the data pipeline is
benchmarked separately). Variants, each a fresh model with the same weights:

  ref-fp32     reference path (explicit attention, Conv3d over all tubelets, official loss formula), float32
  fused-fp32   SDPA attention, visible-only embedding, fused loss kernel, float32
  ref-bf16     reference path under bf16 autocast
  fused-bf16   fused path under bf16 autocast
  fused-bf16-compile-blocks      as fused-bf16 with each transformer block torch.compile'd (cfg.compile_blocks)
  fused-bf16-compile             as fused-bf16 with the whole model torch.compile'd
  fused-bf16-compile-cudagraphs  the same in mode="reduce-overhead" (CUDA graphs: no per-kernel launch cost)
  fused-bf16-compile-autotune    the same in mode="max-autotune" (Triton autotuning, CUDA graphs; long warm-up)
  fused-bf16-graphstep           fused-bf16 with the whole step (forward, backward, AdamW) replayed as one CUDA
                                 graph (training.step.GraphedStep, run.cuda_graph_step)
  fused-bf16-compile-graphstep   the same with the model torch.compile'd (mode default) inside the graph
  fused-bf16-compile-flash       fused-bf16-compile with SDPA restricted to flash attention (attn_backend)
  fused-bf16-compile-cudnn       ... to cuDNN attention, which torch ranks below flash by default
Not the published recipe (a different objective, reported in a table of its own):
  fused-bf16-decmask             fused-bf16 with VideoMAE V2's decoder masking (decoder_mask_ratio 0.5: the decoder
                                 reconstructs half of the masked tokens, 864 of 1568 tokens for ViT-B 16x224)
  fused-bf16-compile-decmask     the same, compiled
  fused-bf16-compile-graphstep-decmask  the same, compiled, one CUDA graph per step

MFU = achieved model FLOP/s / peak, with model FLOPs from `model.flops.training_flops_per_clip` (all matmuls
incl. attention, training = 3 x forward). Peaks: on CUDA the H100 SXM dense bf16 datasheet peak (989 TFLOP/s)
and a bf16 matmul measured in this run; on CPU a large matmul measured in this run for each dtype.

    python -m bench.bench_model --device cpu --batch 1 --size small --frames 8 --img 112 --steps 2
    python -m bench.bench_model --device cuda --out bench_model_h100.json   # ViT-B 16x224, batch 64 / 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F

from model import VideoMAEConfig, build_model
from model.flops import training_flops_per_clip
from model.layers import num_tube_masked
from shards import format as fmt
from training.step import GraphedStep

H100_DENSE_BF16 = 989e12
DECODER_MASK_RATIO = 0.5  # VideoMAE V2's --decoder_mask_ratio
# fast: SDPA + visible-only embedding + fused loss; compile: None | "blocks" | a torch.compile mode; graph_step: the
# whole step as one CUDA graph (training.step.GraphedStep); attn: VideoMAEConfig.attn_backend; decoder_mask: its ratio
VARIANTS = {
    "ref-fp32": dict(fast=False, bf16=False, compile=None),
    "fused-fp32": dict(fast=True, bf16=False, compile=None),
    "ref-bf16": dict(fast=False, bf16=True, compile=None),
    "fused-bf16": dict(fast=True, bf16=True, compile=None),
    "fused-bf16-compile-blocks": dict(fast=True, bf16=True, compile="blocks"),
    "fused-bf16-compile": dict(fast=True, bf16=True, compile="default"),
    "fused-bf16-compile-cudagraphs": dict(fast=True, bf16=True, compile="reduce-overhead"),
    "fused-bf16-compile-autotune": dict(fast=True, bf16=True, compile="max-autotune"),
    "fused-bf16-graphstep": dict(fast=True, bf16=True, compile=None, graph_step=True),
    "fused-bf16-compile-graphstep": dict(fast=True, bf16=True, compile="default", graph_step=True),
    "fused-bf16-compile-flash": dict(fast=True, bf16=True, compile="default", attn="flash"),
    "fused-bf16-compile-cudnn": dict(fast=True, bf16=True, compile="default", attn="cudnn"),
    "fused-bf16-decmask": dict(fast=True, bf16=True, compile=None, decoder_mask=DECODER_MASK_RATIO),
    "fused-bf16-compile-decmask": dict(fast=True, bf16=True, compile="default", decoder_mask=DECODER_MASK_RATIO),
    "fused-bf16-compile-graphstep-decmask": dict(
        fast=True, bf16=True, compile="default", graph_step=True, decoder_mask=DECODER_MASK_RATIO
    ),
}
DEFAULT_GPU_VARIANTS = [
    "ref-fp32",
    "fused-fp32",
    "ref-bf16",
    "fused-bf16",
    "fused-bf16-compile",
    "fused-bf16-compile-cudagraphs",
    "fused-bf16-graphstep",
    "fused-bf16-compile-graphstep",
    "fused-bf16-compile-flash",
    "fused-bf16-compile-cudnn",
    "fused-bf16-compile-decmask",
    "fused-bf16-compile-graphstep-decmask",
]


def cuda_only(variant: str) -> bool:
    """Variants that need a GPU: CUDA graphs, cuDNN / memory-efficient attention."""
    spec = VARIANTS[variant]
    return (
        spec.get("graph_step", False)
        or spec.get("attn") in ("cudnn", "efficient")
        or spec["compile"] in ("reduce-overhead", "max-autotune")
    )


def recipe(variant: str) -> str:
    """ "videomae" (the published objective) or the decoder-masking objective a variant trains."""
    ratio = VARIANTS[variant].get("decoder_mask", 0.0)
    return f"videomae-v2-decoder-mask-{ratio}" if ratio else "videomae"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (median of `reps` after a warm-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def tube_masks(
    batch: int, cfg: VideoMAEConfig, ratio: float, device: torch.device, count: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """`count` batches of official tube masks (one random spatial pattern per clip, repeated over time)."""
    t, h, w = cfg.grid
    per_frame = int(ratio * h * w)
    out = []
    for _ in range(count):
        scores = torch.rand(batch, h * w, generator=gen)
        spatial = torch.zeros(batch, h * w, dtype=torch.bool)
        spatial.scatter_(1, scores.argsort(dim=1)[:, :per_frame], True)
        out.append(spatial.repeat(1, t).to(device))
    return out


def run_variant(
    kind: str,
    variant: str,
    base_cfg: VideoMAEConfig,
    state: dict[str, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    spec = VARIANTS[variant]
    cfg = base_cfg.replace(
        fused_attn=spec["fast"],
        fused_loss=spec["fast"],
        sparse_embed=spec["fast"],
        compile_blocks=spec["compile"] == "blocks",
        grad_checkpointing=args.grad_checkpointing,
        attn_backend=spec.get("attn", "auto"),
        decoder_mask_ratio=spec.get("decoder_mask", 0.0) if kind == "pretrain" else 0.0,
    )
    model = build_model(kind, cfg)
    model.load_state_dict(state)
    model.to(device).train()
    fwd = model
    if spec["compile"] not in (None, "blocks"):
        fwd = torch.compile(model, mode=None if spec["compile"] == "default" else spec["compile"])
    use_fused_adam = device.type == "cuda"
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.05,
        fused=use_fused_adam,
        foreach=None if use_fused_adam else True,
    )
    gen = torch.Generator().manual_seed(0)
    b = args.batch
    video = torch.randn(b, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=gen).to(device)
    masks = tube_masks(b, cfg, args.mask_ratio, device, 4, gen)
    num_masked = num_tube_masked(cfg.grid, args.mask_ratio)
    labels = torch.randint(0, cfg.num_classes, (b,), generator=gen).to(device)
    graphed = spec.get("graph_step", False)
    # a captured step must not reuse autocast's weight casts across replays (as training.trainer's loss)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"], cache_enabled=not graphed)

    cudagraphs = spec["compile"] in ("reduce-overhead", "max-autotune")  # modes that capture graphs themselves

    def loss_of(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with amp:
            if kind == "pretrain":
                return fwd(inputs["video"], inputs["mask"], num_masked=num_masked)[0]
            return F.cross_entropy(fwd(inputs["video"]).float(), inputs["label"])

    whole_step = GraphedStep(loss_of, opt, list(model.parameters()), None) if graphed else None

    def step(i: int) -> torch.Tensor:
        inputs = {"video": video, **({"mask": masks[i % len(masks)]} if kind == "pretrain" else {"label": labels})}
        if whole_step is not None:  # 3 eager steps, then one capture, then replays
            return whole_step(inputs)[0]
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_of(inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(max(args.warmup, 4) if graphed else args.warmup):  # a graphed step captures at its 4th call
        last = step(i)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        last = step(i)
    sync(device)
    elapsed = time.perf_counter() - t0
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for i in range(3):
                step(i)
            sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"## profile {kind} {variant} (3 steps)")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile))
    flops_clip = training_flops_per_clip(cfg, kind, mask_ratio=args.mask_ratio)  # decoder masking: the FLOPs it runs
    clips_s = b * args.steps / elapsed
    result = dict(
        kind=kind,
        variant=variant,
        recipe=recipe(variant) if kind == "pretrain" else "videomae",
        batch=b,
        steps=args.steps,
        step_ms=1e3 * elapsed / args.steps,
        clips_per_s=clips_s,
        achieved_tflops=flops_clip * clips_s / 1e12,
        train_gflops_per_clip=flops_clip / 1e9,
        warmup_s=warmup_s,
        final_loss=float(last),
    )
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    model = fwd = opt = whole_step = None  # free the variant's memory before empty_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--size", default="base", help="small | base | large | huge")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--img", type=int, default=224)
    p.add_argument(
        "--batch", default=None, help="clips per step, or a comma list to sweep (default: 64 on cuda, 1 on cpu)"
    )
    p.add_argument(
        "--classify-batch",
        default=None,
        help="fine-tuning batch(es) (default: 16 on cuda, where the reference path needs ~41 GiB at 16; else --batch)",
    )
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--kinds", default="pretrain,classify")
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma list of {list(VARIANTS)} (default: all on cuda, all but compile on cpu)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 cuda / 2 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 cuda / 1 cpu)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--profile", type=int, default=0, help="print the top-N kernels of each variant")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in (args.batch or ("64" if on_gpu else "1")).split(",")]
    classify_batches = (
        [int(b) for b in args.classify_batch.split(",")] if args.classify_batch else [16] if on_gpu else batches
    )
    args.steps = args.steps or (20 if on_gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    variants = (
        args.variants.split(",")
        if args.variants
        else DEFAULT_GPU_VARIANTS
        if on_gpu
        else [v for v in VARIANTS if "compile" not in v and not cuda_only(v)]
    )
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 variants measure true fp32
        torch.backends.cudnn.allow_tf32 = False

    # measured matmul peaks, same run
    n = 8192 if on_gpu else 2048
    peaks = {
        "bf16": measure_matmul_peak(device, torch.bfloat16, n, 10 if on_gpu else 3),
        "fp32": measure_matmul_peak(device, torch.float32, n, 10 if on_gpu else 3),
    }
    env = dict(
        device=torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        measured_matmul_tflops={k: v / 1e12 for k, v in peaks.items()},
    )
    print(
        f"# {env['device']}, torch {env['torch']}, {env['threads']} threads; measured matmul peak: "
        f"bf16 {peaks['bf16'] / 1e12:.1f} TFLOP/s, fp32 {peaks['fp32'] / 1e12:.1f} TFLOP/s"
    )

    results: list[dict] = []
    report = dict(env=env, args=dict(vars(args).items()), results=results)

    def save(report: dict) -> None:  # after every variant: a run cut short by a time limit keeps what it measured
        if args.out:
            fmt.atomic_write(args.out, json.dumps(report, indent=2))

    for kind in args.kinds.split(","):
        cfg = VideoMAEConfig.from_name(args.size, num_frames=args.frames, img_size=args.img)
        torch.manual_seed(0)
        state = build_model(kind, cfg).state_dict()
        for batch, variant in [
            (b, v)
            for b in (classify_batches if kind == "classify" else batches)
            for v in variants
            if kind == "pretrain" or recipe(v) == "videomae"
        ]:
            kind_args = argparse.Namespace(**{**vars(args), "batch": batch})
            try:
                r = run_variant(kind, variant, cfg, state, kind_args, device)
            except torch.OutOfMemoryError:
                r = dict(kind=kind, variant=variant, batch=batch, error="out of memory")
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - one variant this machine cannot run (a kernel, a capture) must not end the run
                r = dict(
                    kind=kind,
                    variant=variant,
                    batch=batch,
                    error=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}",
                )
                if on_gpu:
                    torch.cuda.empty_cache()
            if "error" not in r:
                dt = "bf16" if "bf16" in variant else "fp32"
                r["mfu_vs_measured_matmul"] = r["achieved_tflops"] * 1e12 / peaks[dt]
                if on_gpu:
                    r["mfu_vs_h100_989"] = r["achieved_tflops"] * 1e12 / H100_DENSE_BF16
            results.append(r)
            print(json.dumps(r), flush=True)
            save(report)

    # summary tables, with speed-up against the reference path of the same dtype; decoder masking trains another
    # objective, so its lines stand apart from the published recipe's
    published = [r for r in results if r.get("recipe", "videomae") == "videomae"]
    print_table(published, results, "VideoMAE (published recipe)")
    if len(published) < len(results):
        print_table(
            [r for r in results if r not in published],
            results,
            f"VideoMAE V2 decoder masking (ratio {DECODER_MASK_RATIO}): another objective, not the published "
            "recipe; FLOPs are those it runs",
        )
    save(report)
    return report


def print_table(rows: list[dict], results: list[dict], title: str) -> None:
    print(
        f"\n## {title}\n{'kind':9} {'variant':36} {'batch':>5} {'step ms':>9} {'clips/s':>9} {'TFLOP/s':>8} "
        f"{'MFU meas':>8} {'MFU 989':>8} {'vs ref':>7}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:9} {r['variant']:36} {r['batch']:>5} {r['error']}")
            continue
        ref_name = "ref-bf16" if "bf16" in r["variant"] else "ref-fp32"
        ref = next(
            (
                q
                for q in results
                if q["kind"] == r["kind"] and q["variant"] == ref_name and q["batch"] == r["batch"] and "error" not in q
            ),
            None,
        )
        speedup = f"{r['clips_per_s'] / ref['clips_per_s']:.2f}x" if ref else "-"
        mfu989 = f"{100 * r['mfu_vs_h100_989']:.1f}%" if "mfu_vs_h100_989" in r else "-"
        print(
            f"{r['kind']:9} {r['variant']:36} {r['batch']:>5} {r['step_ms']:>9.1f} {r['clips_per_s']:>9.2f} "
            f"{r['achieved_tflops']:>8.2f} {100 * r['mfu_vs_measured_matmul']:>7.1f}% {mfu989:>8} {speedup:>7}"
        )


if __name__ == "__main__":
    main()
