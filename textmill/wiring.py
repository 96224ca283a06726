"""The composition root: configs in, the parts built and joined.

commands.py calls these for `textmill serve` and `generate`; tests call build_serving()
directly so that they exercise exactly what `textmill serve` runs.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from textmill import __version__, collector
from textmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from textmill.loader.bundled import BUNDLED_NAME, resolve_model_path

if TYPE_CHECKING:
    from textmill.api.serving import ServingContext
    from textmill.engine.engine import Engine
    from textmill.engine.runner_protocol import Runner
    from textmill.runner.plan import ExecutionPlan
    from textmill.structured import GrammarCompiler
    from textmill.tokenizer import Tokenizer

log = logging.getLogger("textmill")


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


@dataclass(frozen=True)
class BuiltEngine:
    engine: "Engine"
    tokenizer: "Tokenizer"
    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    cache_config: CacheConfig
    model_name: str
    fingerprint: str
    plan: "ExecutionPlan"
    grammars: "GrammarCompiler | None" = None  # structured outputs (grammar/compiler.py)


def model_path(model: str | None) -> Path:
    path = resolve_model_path(model)
    if not path.exists():
        raise StartupError(f"model not found: {path}")
    return path


def build_engine(config: EngineConfig, wrap_runner: "Callable[[Runner], Runner] | None" = None) -> BuiltEngine:
    """`wrap_runner` (tests) may wrap the ModelRunner, e.g. to make a step fail."""
    with collector.paused():
        built = _build_engine(config, wrap_runner)
    # No collection here: loading leaves ~235 objects in cycles (a few KB, the same count on
    # SmolLM2, Gemma 3 and the 1B), and one gc.collect() walked every object loading made to
    # find them, 55-70 ms of each start. A server freezes them with the model (commands.py);
    # elsewhere the collector finds them when it next runs. The heap's free pages go back to
    # the OS.
    _return_freed_memory()
    return built


def _build_engine(config: EngineConfig, wrap_runner: "Callable[[Runner], Runner] | None") -> BuiltEngine:
    from textmill.engine.engine import Engine
    from textmill.engine.scheduler import Scheduler
    from textmill.engine.step_costs import PRIOR_FIXED, PRIOR_FIXED_EXPERTS, StepCosts
    from textmill.loader import load_model
    from textmill.loader.load import read_model_config
    from textmill.runner.file_weights import file_decoder
    from textmill.runner.model_runner import ModelRunner
    from textmill.runner.plan import PlanError, decide
    from textmill.tokenizer import load_tokenizer

    path = model_path(config.model)
    try:
        plan = decide(path, config.device)
    except PlanError as exc:
        raise StartupError(str(exc)) from None
    except Exception as exc:  # the plan reads the file's tensor types: a corrupt file fails here
        raise StartupError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    log.info("plan: %s", plan.describe())
    torch.set_num_threads(plan.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    try:
        # The window is sized from the config before the weights load: LongRoPE models
        # (Phi-3.5) take the RoPE factors of the window they serve.
        cfg = read_model_config(path)
    except Exception as exc:
        raise StartupError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    asked = config.scheduler.max_model_len
    max_len = min(asked or cfg.max_position_embeddings, cfg.max_position_embeddings)
    if asked and asked > max_len:  # (Ministral 3's is its original context: loader/rope_scaling.py)
        log.info("context window %d tokens, not --max-model-len %d: the model has %d positions", max_len, asked,
                 max_len)
    cache, max_len = _cache_config(cfg, config, plan, max_len)
    seqs = config.scheduler.max_num_seqs
    if cfg.recurrent_layers:
        cache, seqs = _recurrent_states(cfg, cache, seqs, path, lazy=plan.device == "cpu")
    try:
        codes = plan.weights == "file-codes"
        # A GGUF's float weights (--no-kernels, CUDA, int4/int8) decode the file's blocks in C++
        # where the kernels build, whatever the plan runs on: numpy took 8-14x as long
        # (bench/float_load.py). Folders have no blocks: no build for them.
        float_gguf = not codes and path.suffix.lower() == ".gguf"
        loaded = load_model(path, dtype=plan.torch_dtype, device=plan.device, codes=codes,
                            decode=file_decoder() if float_gguf else None, context_window=max_len)
        tokenizer = load_tokenizer(path)
    except Exception as exc:  # a corrupt or foreign file fails in many ways; say which, in one line
        raise StartupError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    cfg = loaded.config
    sched = dataclasses.replace(config.scheduler, max_model_len=max_len, max_num_seqs=seqs)
    from textmill.grammar.compiler import LLGuidanceCompiler
    grammars = LLGuidanceCompiler(tokenizer, cfg.vocab_size)  # shared by the API (compile) and the runner
    try:
        runner = ModelRunner.from_plan(loaded, cache, plan, vocab_limit=tokenizer.vocab_size, grammars=grammars,
                                       state_slots=sched.max_num_seqs)
    except ValueError as exc:  # e.g. --quantization int4 with float32 and no kernels
        raise StartupError(str(exc)) from exc
    log.info("linear layers: %s", runner.linears)
    if wrap_runner is not None:
        runner = wrap_runner(runner)
    # A mixture of experts' guessed rows read experts of their own: priced dearer until timed.
    costs = StepCosts(PRIOR_FIXED_EXPERTS if cfg.num_experts else PRIOR_FIXED)
    engine = Engine(Scheduler(sched, cache, costs), runner, tokenizer)
    # A folder's name is kept whole: "Qwen2.5-0.5B-Instruct" has no file suffix to strip.
    name = BUNDLED_NAME if config.model is None else path.name if path.is_dir() else path.stem
    log.info("loaded %s (%s) in %.1fs; KV cache %d blocks of %d tokens, context window %d",
             name, cfg.architecture, time.perf_counter() - started, cache.num_blocks, cache.block_size, max_len)
    return BuiltEngine(engine, tokenizer, cfg, sched, cache, name, _fingerprint(path, plan, cfg), plan,
                       grammars=grammars)


def _cache_config(cfg: ModelConfig, config: EngineConfig, plan: "ExecutionPlan", max_len: int
                  ) -> tuple[CacheConfig, int]:
    """The KV pool that --kv-cache-memory buys, and the context window it can serve: the
    model's own, or, when the pool cannot hold one full context and --max-model-len was not
    given, the longest that fits (one log line says so; /v1/models and every 400 for a
    too-long prompt report it). An explicit --max-model-len that does not fit is an error."""
    from textmill.runner.model_runner import ModelRunner

    asked = config.cache
    per_block = ModelRunner.kv_bytes_per_block(cfg, asked, plan.torch_dtype, plan.torch_kv_dtype)
    num_blocks = int(asked.memory_gib * 2**30 // per_block)
    capacity = num_blocks * asked.block_size
    if capacity < max_len:
        if config.scheduler.max_model_len is not None or capacity < asked.block_size:
            raise StartupError(
                f"--kv-cache-memory {asked.memory_gib} GiB holds {capacity} tokens, "
                f"less than one full context of {max_len}: raise it or lower --max-model-len")
        log.info("context window %d tokens, not the model's %d: --kv-cache-memory %s GiB holds %d tokens "
                 "(raise it for the full window)", capacity, max_len, asked.memory_gib, capacity)
        max_len = capacity
    return dataclasses.replace(asked, num_blocks=num_blocks), max_len


def _recurrent_states(cfg: ModelConfig, cache: CacheConfig, seqs: int, path: Path, lazy: bool = True
                      ) -> tuple[CacheConfig, int]:
    """A hybrid keeps a state per running request (runner/recurrent_state.py): as many requests as
    fit the memory left beside the weights, the KV pool and the prefix cache's state snapshots
    (recurrent_state.snapshot_count; engine/kv_cache/state_snapshots.py), each said in one line."""
    from textmill.loader.prefetch import available_bytes
    from textmill.runner.recurrent_state import bytes_per_sequence, fitting_slots, snapshot_count

    per_seq, avail = bytes_per_sequence(cfg), available_bytes()
    room = None if avail is None else avail - path.stat().st_size - int(cache.memory_gib * 2**30)
    snapshots = snapshot_count(per_seq, room, lazy) if cache.enable_prefix_caching else 0
    if room is not None:
        room -= snapshots * per_seq
    fit = fitting_slots(per_seq, seqs, room)
    if fit < seqs:
        log.info("max_num_seqs %d, not %d: the recurrent states of more running requests would take over half "
                 "the memory left beside the weights and the KV cache", fit, seqs)
    log.info("recurrent state: %.1f MiB a running request (up to %d: %.2f GiB, resident as used)",
             per_seq / 2**20, fit, per_seq * fit / 2**30)
    if snapshots:
        log.info("prefix caching: hits resume where the recurrent state was kept, up to %d kept (%.2f GiB%s)",
                 snapshots, per_seq * snapshots / 2**30, ", resident as used" if lazy else "")
        cache = dataclasses.replace(cache, state_snapshots=snapshots)
    elif cache.enable_prefix_caching:  # KV hits without a state to resume from would be wrong
        log.info("prefix caching: off (no memory for %s's recurrent states after a prefix)", cfg.architecture)
        cache = dataclasses.replace(cache, enable_prefix_caching=False)
    return cache, fit


def _fingerprint(path: Path, plan: "ExecutionPlan", cfg: ModelConfig) -> str:
    """Changes when anything that changes outputs does: the file, the version, the plan, and
    the RoPE factors a LongRoPE model took for its window."""
    stat = path.stat()
    ident = f"{path.name}:{stat.st_size}:{plan.dtype}:{plan.device}:{__version__}"
    if cfg.rope_attention_factor != 1.0:
        ident += f":rope-{cfg.rope_freq_factors}"
    if plan.weights != "float":
        ident += f":{plan.weights}"
    if plan.kv_dtype != plan.dtype:
        ident += f":kv-{plan.kv_dtype}"
    return "fp_" + hashlib.sha256(ident.encode()).hexdigest()[:10]


def build_serving(config: EngineConfig, served_model_name: str | None = None,
                  wrap_runner: "Callable[[Runner], Runner] | None" = None) -> "ServingContext":
    """`served_model_name` None: the model's own name (BuiltEngine.model_name)."""
    from textmill.api.serving import ServingContext
    from textmill.engine.async_engine import AsyncEngine

    built = build_engine(config, wrap_runner)
    return ServingContext(
        engine=AsyncEngine(built.engine), tokenizer=built.tokenizer,
        model_name=served_model_name or built.model_name,
        max_model_len=built.scheduler_config.max_model_len, fingerprint=built.fingerprint,
        created=int(time.time()), kv_cache_blocks=built.cache_config.num_blocks,
        vocab_size=min(built.tokenizer.vocab_size, built.model_config.vocab_size), grammars=built.grammars)


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS once loading is done: glibc keeps the
    temporary copies loading made in its heap (its mmap threshold has grown past their size
    by then), memory the process never uses again (docs/performance.md, resident memory)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
