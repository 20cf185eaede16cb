"""model.runtime: the one device and precision rule of training, evaluation and the apps."""

import pytest
import torch

from model.runtime import autocast, autocast_dtype, pipeline_device, resolve_device

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_precision_is_bf16_on_a_gpu_and_float32_on_the_cpu():
    assert autocast_dtype(GPU, "auto") is torch.bfloat16
    assert autocast_dtype(CPU, "auto") is None
    assert autocast_dtype(CPU) is None


@pytest.mark.parametrize("device", [CPU, GPU])
def test_explicit_precisions_hold_on_every_device(device):
    assert autocast_dtype(device, "bf16") is torch.bfloat16
    assert autocast_dtype(device, "fp16") is torch.float16
    assert autocast_dtype(device, "fp32") is None


def test_unknown_precision_is_one_line():
    with pytest.raises(ValueError, match=r"precision 'fp8': expected one of auto, bf16, fp16, fp32"):
        autocast_dtype(CPU, "fp8")


def test_autocast_context_follows_the_dtype():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast(CPU, "bf16"):
        assert layer(x).dtype is torch.bfloat16
    with autocast(CPU, "auto"):
        assert layer(x).dtype is torch.float32
    with autocast(CPU, "fp32"):
        assert layer(x).dtype is torch.float32


def test_resolve_device():
    cuda = torch.cuda.is_available()
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == resolve_device(None) == (torch.device("cuda") if cuda else CPU)
    assert pipeline_device(resolve_device("auto")) == ("gpu" if cuda else "cpu")
    assert pipeline_device(CPU) == "cpu" and pipeline_device(GPU) == "gpu"
    with pytest.raises(ValueError, match=r"device 'tpu': expected 'cpu', 'gpu' or 'auto'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_without_cuda_is_refused_in_one_line():
    for name in ("gpu", "cuda"):
        with pytest.raises(ValueError, match=rf"device '{name}' asked for, but torch sees no CUDA device"):
            resolve_device(name)
    assert resolve_device("auto", index=3) == CPU  # a rank's LOCAL_RANK means nothing without GPUs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_index():
    assert resolve_device("gpu", index=0) == torch.device("cuda", 0)
    assert resolve_device("auto", index=0) == torch.device("cuda", 0)
