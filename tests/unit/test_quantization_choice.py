"""`--quantization auto` (wiring.resolve_quantization): the file's own width on the float32
kernel path, float weights everywhere else, and an explicit choice always wins."""
from __future__ import annotations

from pathlib import Path

import pytest

from textmill.config import DeviceConfig
from textmill.loader.bundled import bundled_model_path
from textmill.loader.gguf import layer_weight_bits
from textmill.runner import qlinear
from textmill.wiring import EngineOptions, resolve_quantization

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
