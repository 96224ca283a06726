"""`--quantization auto` (wiring.resolve_quantization): the file's own width on the float32
kernel path, float weights everywhere else, and an explicit choice always wins."""
from __future__ import annotations

from pathlib import Path

import pytest

from textmill.config import DeviceConfig
from textmill.loader.bundled import bundled_model_path
from textmill.loader.gguf import layer_weight_bits
from textmill.runner import qlinear
from textmill.wiring import EngineOptions, quantized_kernels_apply, resolve_device, resolve_quantization

CPU32 = DeviceConfig(device="cpu", dtype="float32", num_threads=None)


def test_bundled_q4_1_file_is_4_bit():
    assert layer_weight_bits(bundled_model_path()) == 4


def test_auto_runs_a_4_bit_gguf_as_int4_on_the_kernel_path():
    assert qlinear.available(), "the C++ kernels did not build"
    assert resolve_quantization(EngineOptions(), CPU32, bundled_model_path()) == "int4"


@pytest.mark.parametrize("opts,dev,path", [
    (EngineOptions(kernels=False), CPU32, None),  # --no-kernels: the eager reference path
    (EngineOptions(), DeviceConfig(device="cpu", dtype="bfloat16", num_threads=None), None),
    (EngineOptions(), CPU32, Path("/models/some-hf-folder")),  # float checkpoints stay float
])
def test_auto_is_none_off_the_kernel_path(opts, dev, path):
    assert resolve_quantization(opts, dev, path or bundled_model_path()) == "none"


@pytest.mark.parametrize("explicit", ["none", "int8", "int4"])
def test_an_explicit_choice_is_kept(explicit):
    opts = EngineOptions(quantization=explicit, kernels=False)
    assert resolve_quantization(opts, CPU32, bundled_model_path()) == explicit


def test_auto_dtype_is_float32_for_the_quantized_kernels_even_where_bf16_is_native():
    # On an AVX-512 BF16/AMX CPU, bf16 dense ran the bundled model 4x slower at one stream
    # than float32 activations on the int4 kernels, so `auto` must not pick bf16 there.
    assert quantized_kernels_apply(EngineOptions(), bundled_model_path())
    assert resolve_device("cpu", "auto", None, quantized_kernels=True).dtype == "float32"


@pytest.mark.parametrize("opts,path", [
    (EngineOptions(kernels=False), None),
    (EngineOptions(quantization="none"), None),
    (EngineOptions(device="cuda"), None),
    (EngineOptions(), Path("/models/some-hf-folder")),
])
def test_the_quantized_kernel_path_applies_only_to_a_quantized_gguf_on_the_cpu_kernels(opts, path):
    assert not quantized_kernels_apply(opts, path or bundled_model_path())


def test_an_explicit_dtype_is_kept():
    assert resolve_device("cpu", "bfloat16", None, quantized_kernels=True).dtype == "bfloat16"
