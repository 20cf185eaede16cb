"""Training-step options of train.py, each off by default: run.compile_mode (whole-model torch.compile),
run.cuda_graph_step (one CUDA graph per step; refused in one line where it cannot run), model.overrides
attn_backend / decoder_mask_ratio, and the pipeline's strategy options passed through data.options.

On the CPU: the default path is unchanged, compiled training equals eager training, the refusals are one line. The
CUDA graph step is checked against eager steps on a GPU (skipped here; bash bench/gpu.sh checks runs it).
"""

from __future__ import annotations

import logging

import pipeline_shards as ps
import pytest
import torch

import train
from model import VideoMAEConfig, flops
from model.checkpoint import latest_checkpoint, load_checkpoint
from training.build import make_model
from training.config import RunConfig, load_config

TINY_MODEL = (
    "model.overrides={patch_size: 8, depth: 1, embed_dim: 16, num_heads: 1, decoder_depth: 1, "
    "decoder_embed_dim: 16, decoder_num_heads: 1}"
)
SYNTHETIC = [
    "data.source=synthetic",
    "data.synthetic_samples=8",
    "data.synthetic_classes=3",
    "data.num_frames=2",
    "data.input_size=16",
    "data.mask_ratio=0.5",
    "data.batch_size=2",
    TINY_MODEL,
    "optim.max_steps=3",
    "optim.lr_batch_base=0",
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
    "run.log_interval=1",
    "run.tensorboard=false",
]


def final_params(out) -> dict[str, torch.Tensor]:
    """The run's final weights: its last checkpoint (run.ckpt_final, on by default)."""
    return load_checkpoint(latest_checkpoint(out))["model"]


def one_line_error(capsys, argv: list[str], message: str) -> None:
    assert train.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("config error:") and message in line, line


def test_defaults_leave_the_step_eager(tmp_path, monkeypatch):
    run = RunConfig()
    assert run.compile_mode is None and run.cuda_graph_step is False
    assert VideoMAEConfig().attn_backend == "auto" and VideoMAEConfig().decoder_mask_ratio == 0.0

    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called without run.compile_mode")

    monkeypatch.setattr(torch, "compile", no_compile)
    assert train.main(["pretrain", *SYNTHETIC, f"run.out_dir={tmp_path}"]) == 0


def test_compiled_training_equals_eager_training(tmp_path, monkeypatch):
    """run.compile_mode=default: the whole model through torch.compile (inductor's CPU kernels), the same weights
    after 3 AdamW steps up to rounding."""
    real_compile, modes = torch.compile, []

    def spy(model, **kwargs):
        modes.append(kwargs.get("mode", "unset"))
        return real_compile(model, **kwargs)

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.main(["pretrain", *SYNTHETIC, f"run.out_dir={eager}"]) == 0
    monkeypatch.setattr(torch, "compile", spy)
    assert train.main(["pretrain", *SYNTHETIC, f"run.out_dir={compiled}", "run.compile_mode=default"]) == 0
    assert modes == [None]  # "default" is torch.compile's mode=None
    a, b = final_params(eager), final_params(compiled)
    torch.manual_seed(0)  # the Trainer seeds run.seed + rank before building the model
    start = make_model(load_config(None, SYNTHETIC), "pretrain", None)[0].state_dict()
    assert a.keys() == b.keys() and any(not torch.allclose(a[k], start[k]) for k in a)  # the weights moved
    for key in a:  # AdamW moves each weight by ~lr (1e-2) per step whatever its gradient's size: 1e-4 is rounding
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            ["run.compile_mode=fastest"],
            "run.compile_mode must be one of default, reduce-overhead, max-autotune, "
            "max-autotune-no-cudagraphs (or null); got 'fastest'",
        ),
        (
            ["run.cuda_graph_step=true", "optim.grad_accum=2"],
            "run.cuda_graph_step cannot capture a step with optim.grad_accum=2",
        ),
        (
            ["run.cuda_graph_step=true", "run.precision=fp16", "run.compile_mode=max-autotune"],
            "run.precision=fp16 (the loss scaler decides on the host); run.compile_mode=max-autotune",
        ),
        (["run.cuda_graph_step=true", "run.skip_nonfinite=true"], "run.skip_nonfinite (a host decision per step)"),
    ],
)
def test_step_options_that_cannot_work_are_one_line_errors(tmp_path, capsys, override, message):
    one_line_error(capsys, ["pretrain", *SYNTHETIC, f"run.out_dir={tmp_path / 'run'}", *override], message)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_graph_step_and_cuda_kernels_are_refused_on_the_cpu(tmp_path, capsys):
    one_line_error(
        capsys,
        ["pretrain", *SYNTHETIC, f"run.out_dir={tmp_path}", "run.cuda_graph_step=true"],
        "run.cuda_graph_step needs a CUDA device; torch sees none",
    )
    cudnn = TINY_MODEL[:-1] + ", attn_backend: cudnn}"
    one_line_error(
        capsys,
        ["pretrain", *[a for a in SYNTHETIC if a != TINY_MODEL], cudnn, f"run.out_dir={tmp_path}"],
        "model.overrides.attn_backend cudnn needs a CUDA device",
    )


def test_decoder_masking_trains_and_is_counted_in_the_flops(tmp_path, capsys):
    """model.overrides.decoder_mask_ratio reaches the model; MFU counts the decoder over N - M + K tokens."""
    overrides = TINY_MODEL[:-1] + ", decoder_mask_ratio: 0.5}"
    argv = ["pretrain", *[a for a in SYNTHETIC if a != TINY_MODEL], overrides, f"run.out_dir={tmp_path / 'a'}"]
    assert train.main(argv) == 0
    one_line_error(
        capsys,
        [*argv[:-2], overrides.replace("0.5", "1.5"), f"run.out_dir={tmp_path / 'b'}"],
        "decoder_mask_ratio 1.5 is not in [0, 1)",
    )

    def block(n: int, d: int) -> int:  # qkv, q k^T, attn v, proj, MLP (4x), 2 FLOPs per multiply-add
        return 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 4 * d

    cfg = VideoMAEConfig.from_name("base")
    n, m, k = 1568, 1408, 704  # ViT-B 16x224, 90 % tube masking, V2 keeps half of the masked
    v = n - m
    expected = 3 * (
        2 * v * 1536 * 768 + 12 * block(v, 768) + 2 * v * 768 * 384 + 4 * block(v + k, 384) + 2 * k * 384 * 1536
    )
    assert flops.training_flops_per_clip(cfg.replace(decoder_mask_ratio=0.5), "pretrain", mask_ratio=0.9) == expected
    plain = flops.training_flops_per_clip(cfg, "pretrain", mask_ratio=0.9)
    assert plain == 3 * (
        2 * v * 1536 * 768 + 12 * block(v, 768) + 2 * v * 768 * 384 + 4 * block(n, 384) + 2 * m * 384 * 1536
    )
    assert 0.5 < expected / plain < 0.7


def test_random_masking_reaches_the_loader_and_the_flops(tmp_path, capsys):
    """data.mask_type=random: the loader hands out int(ratio * N) masks over the whole clip (not tubes), the run
    trains, and MFU counts the encoder over N - int(ratio * N) visible tokens."""
    argv = ["pretrain", *SYNTHETIC, "data.num_frames=4", "data.mask_type=random"]
    cfg = load_config(None, [a for a in argv[1:] if "=" in a])
    from training.build import build_loader
    from training.distributed import Dist

    loader = build_loader(cfg, "pretrain", Dist(0, 1, torch.device("cpu")), make_model(cfg, "pretrain", None)[1])
    mask = next(iter(loader))["mask"]
    assert mask.shape == (2, 8) and (mask.sum(1) == 4).all()  # 2 slots x 4 tokens, int(0.5 * 8) masked
    assert train.main([*argv, f"run.out_dir={tmp_path / 'a'}"]) == 0
    one_line_error(capsys, [*argv, "data.mask_type=tubes", f"run.out_dir={tmp_path / 'b'}"], "data.mask_type")
    cfg_b = VideoMAEConfig.from_name("base")
    tube = flops.training_flops_per_clip(cfg_b, "pretrain", mask_ratio=0.9)  # 1408 masked: 176 of 196 per slot
    rand = flops.training_flops_per_clip(cfg_b, "pretrain", mask_ratio=0.9, mask_type="random")  # 1411 masked
    assert rand == flops.training_flops_per_clip(cfg_b, "pretrain", num_masked=1411) < tube


def test_pipeline_strategy_options_pass_through_data_options(tmp_path, capsys, caplog):
    directory = ps.train_shards().directory
    base = [
        "pretrain",
        "data.num_frames=4",
        "data.stride=4",
        "data.input_size=32",
        "data.num_threads=20",
        "data.batch_size=4",
        "data.mask_ratio=0.75",
        f"data.train={directory}",
        "optim.max_steps=2",
        "run.log_interval=1",
        "run.tensorboard=false",
        TINY_MODEL.replace("patch_size: 8", "patch_size: 16"),
    ]
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert (
            train.main(
                [*base, f"run.out_dir={tmp_path / 'a'}", "data.options={pipelines: 2, decode: auto, auto_batches: 1}"]
            )
            == 0
        )
    assert "decode=auto timed 1 batches of 4 clips" in caplog.text
    capsys.readouterr()  # the run's console lines (the loader's start-up warnings on stderr) are not the refusal's
    one_line_error(
        capsys,
        [*base, f"run.out_dir={tmp_path / 'b'}", "data.options={decode: fastest}"],
        "decode='fastest': expected one of ('fixed', 'auto')",
    )


# -- CUDA graph step (GPU only) ----------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "mode,extra",
    [
        ("pretrain", []),
        ("pretrain", ["optim.clip_grad=0.5"]),
        ("finetune", ["aug.mixup=0.8", "aug.cutmix=1.0", "aug.smoothing=0.1"]),
    ],
)
def test_cuda_graph_step_equals_eager_steps(tmp_path, mode, extra):
    """6 steps (3 eager warm-up, 1 capture + replay, 2 replays) against 6 eager steps: the same weights up to
    rounding (fp32, no autocast: the graph replays the eager kernels). Mixup is drawn on the host per step."""
    common = [
        "pretrain" if mode == "pretrain" else "finetune",
        *SYNTHETIC,
        "optim.max_steps=6",
        "run.precision=fp32",
        "data.device=gpu",
        *extra,
    ]
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert train.main([*common, f"run.out_dir={eager}"]) == 0
    assert train.main([*common, f"run.out_dir={graphed}", "run.cuda_graph_step=true"]) == 0
    a, b = final_params(eager), final_params(graphed)
    for key in a:
        # as above: AdamW moves weights by ~lr whatever the gradient, and flash attention's backward may add in
        # another order from run to run
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_equals_eager_steps_on_the_dali_pipeline(tmp_path):
    """The same with real batches from NVDEC: DALI's threads decode the next batches while the step is captured
    (capture_error_mode thread_local), and the batches are copied into the graph's inputs."""
    pytest.importorskip("imageio_ffmpeg")
    shards = ps.cached(
        "gpu_train_p1_ivf", lambda d: ps.make_test_shards(d, ps.TRAIN_FRAME_COUNTS, height=128, width=160, per_shard=4)
    )
    common = [
        "pretrain",
        "data.num_frames=4",
        "data.stride=4",
        "data.input_size=32",
        "data.batch_size=2",
        "data.mask_ratio=0.75",
        f"data.train={shards.directory}",
        "data.device=gpu",
        "optim.max_steps=6",
        "optim.lr_batch_base=0",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
        "run.precision=fp32",
        "run.log_interval=1",
        "run.tensorboard=false",
        TINY_MODEL.replace("patch_size: 8", "patch_size: 16"),
    ]
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert train.main([*common, f"run.out_dir={eager}"]) == 0
    assert train.main([*common, f"run.out_dir={graphed}", "run.cuda_graph_step=true"]) == 0
    a, b = final_params(eager), final_params(graphed)
    for key in a:
        # as above: AdamW moves weights by ~lr whatever the gradient, and flash attention's backward may add in
        # another order from run to run
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4, msg=key)
