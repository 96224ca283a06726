"""runner/plan.py: the one place that decides how a model runs. A quantized GGUF on the CPU
kernels runs its own blocks in float32; float checkpoints, --no-kernels, bf16 and CUDA take
float weights; an explicit choice always wins."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from textmill.config import DeviceConfig
from textmill.loader.bundled import bundled_model_path
from textmill.loader.gguf import layer_weight_bits
from textmill.runner import qlinear
from textmill.runner.plan import PlanError, decide

FOLDER = Path("/models/some-hf-folder")  # a float checkpoint: decide() only reads its name


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    assert qlinear.available(), "the C++ kernels did not build"


def test_bundled_q4_1_file_is_4_bit():
    assert layer_weight_bits(bundled_model_path()) == 4


def test_a_quantized_gguf_runs_its_own_blocks_in_float32_on_the_kernels():
    plan = decide(bundled_model_path(), DeviceConfig(device="cpu"))
    assert (plan.weights, plan.dtype, plan.kernels) == ("file-codes", "float32", True)
    # On an AVX-512 BF16/AMX CPU, bf16 dense ran the bundled model 3-4x slower at one stream
    # than float32 activations on the int kernels, so `auto` must not pick bf16 there.
    assert plan.quantization == "none" and plan.kv_dtype == "float16"
    assert "C++ kernels" in plan.describe()


@pytest.mark.parametrize("kw,path", [
    (dict(kernels=False), None),  # --no-kernels: the eager reference path
    (dict(dtype="bfloat16"), None),
    (dict(quantization="none"), None),
    ({}, FOLDER),  # float checkpoints stay float
])
def test_float_weights_off_the_quantized_kernel_path(kw, path):
    plan = decide(path or bundled_model_path(), DeviceConfig(device="cpu", **kw))
    assert plan.weights == "float" and plan.quantization == "none"
    assert plan.kv_dtype == plan.dtype or plan.kernels  # float16 KV only where the kernels convert it


def test_no_kernels_or_bf16_is_the_eager_path():
    assert not decide(bundled_model_path(), DeviceConfig(device="cpu", kernels=False)).kernels
    assert not decide(bundled_model_path(), DeviceConfig(device="cpu", dtype="bfloat16")).kernels


@pytest.mark.parametrize("explicit", ["int8", "int4"])
def test_an_explicit_quantization_is_kept(explicit):
    plan = decide(bundled_model_path(), DeviceConfig(device="cpu", quantization=explicit))
    assert plan.weights == explicit and plan.quantization == explicit and plan.dtype == "float32"


def test_explicit_dtype_and_kv_dtype_are_kept():
    plan = decide(bundled_model_path(), DeviceConfig(device="cpu", dtype="bfloat16", kv_cache_dtype="float32"))
    assert (plan.dtype, plan.kv_dtype) == ("bfloat16", "float32")
    assert plan.torch_kv_dtype is torch.float32


def test_impossible_requests_say_why():
    if not torch.cuda.is_available():
        with pytest.raises(PlanError, match="CUDA"):
            decide(bundled_model_path(), DeviceConfig(device="cuda"))
    with pytest.raises(PlanError, match="quantization"):
        decide(bundled_model_path(), DeviceConfig(quantization="int3"))
    with pytest.raises(PlanError, match="kv-cache-dtype"):
        decide(bundled_model_path(), DeviceConfig(kv_cache_dtype="fp4"))


def test_an_int8_kv_cache_runs_on_the_kernels_only():
    plan = decide(bundled_model_path(), DeviceConfig(device="cpu", kv_cache_dtype="int8"))
    assert plan.kernels and plan.kv_dtype == "int8" and plan.torch_kv_dtype is torch.int8
    assert "KV cache int8" in plan.describe()
    for off in (dict(kernels=False), dict(dtype="bfloat16")):
        with pytest.raises(PlanError, match="int8 KV cache needs textmill's CPU kernels"):
            decide(bundled_model_path(), DeviceConfig(device="cpu", kv_cache_dtype="int8", **off))
