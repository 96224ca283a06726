"""cli.py's arguments: built from config.py's fields (one source of defaults and help), --request-timeout."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from textmill.cli import build_parser, server_config_from_args
from textmill.config import ServerConfig


def serve(*args: str):
    return build_parser().parse_args(["serve", *args])


def test_request_timeout_defaults_to_no_limit():
    assert ServerConfig().request_timeout is None
    assert serve().request_timeout == ServerConfig().request_timeout


def test_request_timeout_takes_seconds():
    assert serve("--request-timeout", "2.5").request_timeout == 2.5


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "soon"])
def test_request_timeout_must_be_a_positive_number(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        serve("--request-timeout", bad)
    assert exc.value.code == 2
    assert "--request-timeout: must be a positive number of seconds" in capsys.readouterr().err


def test_request_timeout_reaches_the_server_config():
    assert server_config_from_args(serve("--request-timeout", "7"), environ={}).request_timeout == 7.0


# ---------------------------------------------------------------- one source of defaults
def generate(*args: str):
    return build_parser().parse_args(["generate", "Hi", *args])


def test_no_flags_give_the_config_defaults():
    from textmill.cli import engine_config_from_args, from_args
    from textmill.config import EngineConfig, GenerateConfig

    assert engine_config_from_args(serve()) == EngineConfig()
    assert engine_config_from_args(generate()) == EngineConfig()
    assert server_config_from_args(serve(), environ={}) == dataclasses.replace(ServerConfig(), load_in_background=True)
    assert from_args(GenerateConfig, generate(), prompt="Hi") == GenerateConfig("Hi")


def test_every_flag_is_a_config_field_with_its_help():
    """The parser holds no option of its own: each one is a config field, and its help is
    the field's (so a default or a help text is written in config.py only)."""
    from textmill.config import CacheConfig, DeviceConfig, GenerateConfig, ScaleConfig, SchedulerConfig

    fields = {f.name: f for cls in (ServerConfig, ScaleConfig, DeviceConfig, CacheConfig, SchedulerConfig,
                                    GenerateConfig)
              for f in dataclasses.fields(cls) if "option" in f.metadata}
    for command in ("serve", "generate"):
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        for action in sub._actions:
            if action.dest in ("help", "model", "prompt"):
                continue
            f = fields[action.dest]
            assert action.help.startswith(f.metadata["option"].help)
            if not isinstance(f.default, bool) and not f.metadata["option"].repeatable:
                assert action.default == f.default, action.dest


def test_engine_flags_reach_their_groups():
    from textmill.cli import engine_config_from_args

    cfg = engine_config_from_args(serve(
        "m.gguf", "--dtype", "float32", "--device", "cpu", "--quantization", "int8", "--kv-cache-dtype", "float16",
        "--no-kernels", "--threads", "3", "--block-size", "32", "--no-prefix-caching", "--kv-cache-memory", "0.5",
        "--max-num-seqs", "7", "--max-num-batched-tokens", "99", "--max-model-len", "512"))
    assert cfg.model == "m.gguf"
    assert (cfg.device.dtype, cfg.device.device, cfg.device.quantization, cfg.device.kv_cache_dtype,
            cfg.device.kernels, cfg.device.threads) == ("float32", "cpu", "int8", "float16", False, 3)
    assert (cfg.cache.block_size, cfg.cache.enable_prefix_caching, cfg.cache.memory_gib, cfg.cache.num_blocks) == (
        32, False, 0.5, None)
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_model_len) == (
        7, 99, 512)
    assert engine_config_from_args(generate("--model", "x.gguf")).model == "x.gguf"


def test_generate_flags_reach_the_generate_config():
    from textmill.cli import from_args
    from textmill.config import GenerateConfig

    cfg = from_args(GenerateConfig, generate("--max-tokens", "5", "--temperature", "0.5", "--top-p", "0.9",
                                             "--seed", "4"), prompt="Hi")
    assert cfg == GenerateConfig("Hi", max_tokens=5, temperature=0.5, top_p=0.9, seed=4)


def test_served_model_name_is_not_the_bundled_name_by_default():
    """No --served-model-name: the name comes from the model that is served (wiring), never a
    fixed name that would be wrong for any other file."""
    assert ServerConfig().served_model_name is None
    assert server_config_from_args(serve("other.gguf"), environ={}).served_model_name is None
    assert server_config_from_args(serve("--served-model-name", "x"), environ={}).served_model_name == "x"


def test_engine_config_updated_routes_fields_to_their_group():
    from textmill.config import DeviceConfig, EngineConfig

    cfg = EngineConfig().updated(model="m", dtype="float32", memory_gib=0.5, max_model_len=64)
    assert (cfg.model, cfg.device.dtype, cfg.cache.memory_gib, cfg.scheduler.max_model_len) == ("m", "float32", 0.5, 64)
    with pytest.raises(TypeError, match="kv_cache_gib"):
        EngineConfig().updated(kv_cache_gib=1.0)
    # "device" names both a group and the device within it: a string is the --device choice.
    assert EngineConfig().updated(device="cpu", threads=1).device == DeviceConfig(device="cpu", threads=1)
