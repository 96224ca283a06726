"""The composition root: configs in, a running engine (and the HTTP app) out.

cli.py turns arguments into these calls; tests call build_serving() directly so that they
exercise exactly what `textmill serve` runs.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from textmill import __version__
from textmill.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, ServerConfig
from textmill.loader.bundled import BUNDLED_NAME, bundled_model_path

if TYPE_CHECKING:
    from textmill.runner.plan import ExecutionPlan

log = logging.getLogger("textmill")


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = None  # None: the bundled SmolLM2
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    kv_cache_gib: float = 1.0
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 256
    prefix_caching: bool = True
    threads: int | None = None
    # "int8" / "int4": float weights requantized (runner/quant.py, runner/qlinear.py); "auto":
    # a quantized GGUF's own blocks on the float32 kernel path, else float (runner/plan.py).
    quantization: str = "auto"
    kernels: bool = True  # textmill's C++ CPU kernels for float32 (textmill/kernels); False: eager torch
    kv_cache_dtype: str = "auto"  # runner/plan.py: float16 on the CPU kernels, else the dtype
    max_queued_requests: int = 256


@dataclass(frozen=True)
class BuiltEngine:
    engine: object  # textmill.engine.engine.Engine
    tokenizer: object  # textmill.tokenizer.Tokenizer
    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    cache_config: CacheConfig
    device_config: DeviceConfig
    model_name: str
    fingerprint: str
    plan: "ExecutionPlan"
    grammars: object = None  # textmill.grammar.compiler.LLGuidanceCompiler (structured outputs)


def model_path(model: str | None) -> Path:
    path = bundled_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise StartupError(f"model not found: {path}")
    return path


def build_engine(opts: EngineOptions, wrap_runner: Callable | None = None) -> BuiltEngine:
    """`wrap_runner` (tests) may wrap the ModelRunner, e.g. to make a step fail."""
    from textmill.engine.engine import Engine
    from textmill.engine.scheduler import Scheduler
    from textmill.loader import load_model
    from textmill.runner.model_runner import ModelRunner
    from textmill.runner.plan import PlanError, decide
    from textmill.tokenizer import Tokenizer

    path = model_path(opts.model)
    try:
        plan = decide(path, device=opts.device, dtype=opts.dtype, quantization=opts.quantization,
                      kernels=opts.kernels, kv_dtype=opts.kv_cache_dtype, threads=opts.threads)
    except PlanError as exc:
        raise StartupError(str(exc)) from None
    except Exception as exc:  # the plan reads the file's tensor types: a corrupt file fails here
        raise StartupError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    log.info("plan: %s", plan.describe())
    torch.set_num_threads(plan.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    try:
        loaded = load_model(path, dtype=plan.torch_dtype, device=plan.device, codes=plan.weights == "file-codes")
        tokenizer = Tokenizer.from_path(path)
    except Exception as exc:  # a corrupt or foreign file fails in many ways; say which, in one line
        raise StartupError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    cfg = loaded.config
    max_len = min(opts.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    cache, max_len = _cache_config(cfg, opts, plan, max_len)
    sched = SchedulerConfig(max_num_seqs=opts.max_num_seqs, max_num_batched_tokens=opts.max_num_batched_tokens,
                            max_model_len=max_len)
    from textmill.grammar.compiler import LLGuidanceCompiler
    grammars = LLGuidanceCompiler(tokenizer, cfg.vocab_size)  # shared by the API (compile) and the runner
    try:
        runner = ModelRunner.from_plan(loaded, cache, plan, vocab_limit=tokenizer.vocab_size, grammars=grammars)
    except ValueError as exc:  # e.g. --quantization int4 with float32 and no kernels
        raise StartupError(str(exc)) from exc
    log.info("linear layers: %s", runner.linears)
    if wrap_runner is not None:
        runner = wrap_runner(runner)
    engine = Engine(Scheduler(sched, cache), runner, tokenizer)
    _return_freed_memory()
    # A folder's name is kept whole: "Qwen2.5-0.5B-Instruct" has no file suffix to strip.
    name = BUNDLED_NAME if opts.model is None else path.name if path.is_dir() else path.stem
    log.info("loaded %s (%s) in %.1fs; KV cache %d blocks of %d tokens, context window %d",
             name, cfg.architecture, time.perf_counter() - started, cache.num_blocks, cache.block_size, max_len)
    dev = DeviceConfig(device=plan.device, dtype=plan.dtype, num_threads=plan.threads)
    return BuiltEngine(engine, tokenizer, cfg, sched, cache, dev, name, _fingerprint(path, plan), plan, grammars=grammars)


def _cache_config(cfg: ModelConfig, opts: EngineOptions, plan: "ExecutionPlan", max_len: int
                  ) -> tuple[CacheConfig, int]:
    """The KV pool that --kv-cache-memory buys, and the context window it can serve: the
    model's own, or, when the pool cannot hold one full context and --max-model-len was not
    given, the longest that fits (one log line says so; /v1/models and every 400 for a
    too-long prompt report it). An explicit --max-model-len that does not fit is an error."""
    from textmill.runner.model_runner import ModelRunner

    probe = CacheConfig(block_size=opts.block_size, num_blocks=1, enable_prefix_caching=opts.prefix_caching)
    per_block = ModelRunner.kv_bytes_per_block(cfg, probe, plan.torch_dtype, plan.torch_kv_dtype)
    num_blocks = int(opts.kv_cache_gib * 2**30 // per_block)
    capacity = num_blocks * opts.block_size
    if capacity < max_len:
        if opts.max_model_len is not None or capacity < opts.block_size:
            raise StartupError(
                f"--kv-cache-memory {opts.kv_cache_gib} GiB holds {capacity} tokens, "
                f"less than one full context of {max_len}: raise it or lower --max-model-len")
        log.info("context window %d tokens, not the model's %d: --kv-cache-memory %s GiB holds %d tokens "
                 "(raise it for the full window)", capacity, max_len, opts.kv_cache_gib, capacity)
        max_len = capacity
    cache = CacheConfig(block_size=opts.block_size, num_blocks=num_blocks, enable_prefix_caching=opts.prefix_caching)
    return cache, max_len


def _fingerprint(path: Path, plan: "ExecutionPlan") -> str:
    """Changes when anything that changes outputs does: the file, the version, the plan."""
    stat = path.stat()
    ident = f"{path.name}:{stat.st_size}:{plan.dtype}:{plan.device}:{__version__}"
    if plan.weights != "float":
        ident += f":{plan.weights}"
    if plan.kv_dtype != plan.dtype:
        ident += f":kv-{plan.kv_dtype}"
    return "fp_" + hashlib.sha256(ident.encode()).hexdigest()[:10]


def build_serving(opts: EngineOptions, served_model_name: str | None = None, wrap_runner: Callable | None = None):
    from textmill.api.serving import ServingContext
    from textmill.engine.async_engine import AsyncEngine

    built = build_engine(opts, wrap_runner)
    return ServingContext(
        engine=AsyncEngine(built.engine), tokenizer=built.tokenizer,
        model_name=served_model_name or built.model_name,
        max_model_len=built.scheduler_config.max_model_len, fingerprint=built.fingerprint,
        created=int(time.time()), kv_cache_blocks=built.cache_config.num_blocks,
        vocab_size=min(built.tokenizer.vocab_size, built.model_config.vocab_size), grammars=built.grammars)


def options_from_args(args) -> EngineOptions:
    return EngineOptions(
        model=getattr(args, "model", None), dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_memory, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        prefix_caching=not args.no_prefix_caching, threads=args.threads,
        quantization=getattr(args, "quantization", "auto"), kernels=not getattr(args, "no_kernels", False),
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        max_queued_requests=getattr(args, "max_queued_requests", 256))


def server_config_from_args(args, environ=os.environ) -> ServerConfig:
    keys = tuple(args.api_key or ()) or tuple(k for k in environ.get("TEXTMILL_API_KEY", "").split(",") if k)
    return ServerConfig(
        host=args.host, port=args.port, api_keys=keys, served_model_name=args.served_model_name or BUNDLED_NAME,
        max_request_bytes=args.max_request_bytes, max_prompts_per_request=args.max_prompts_per_request,
        max_prompt_tokens=args.max_prompt_tokens, max_logit_bias_entries=args.max_logit_bias_entries,
        max_n=args.max_n, max_best_of=args.max_best_of, max_queued_requests=args.max_queued_requests,
        shutdown_timeout=args.shutdown_timeout, request_timeout=args.request_timeout,
        log_format=args.log_format, load_in_background=True)


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS once loading is done. Loading dequantizes
    every weight to float32 and packs it again; glibc keeps the freed float32 copies in its
    heap (its mmap threshold has grown past their size by then), ~600 MB for the bundled
    model that the process never uses again: resident memory 2.26 -> 1.66 GB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _frozen_after(built):
    """gc.freeze() once the model is loaded: the ~300,000 objects loading made (modules,
    parameters, tokenizer tables) live as long as the process, and without this every full
    collection walks them all, in the engine thread, in the middle of a step (measured: decode
    steps 5% faster at one stream, ~15% at 16). Only the server and `generate` do it: a
    process that builds engine after engine (the tests) would keep dead ones for good."""
    gc.freeze()
    return built


def run_serve(args) -> int:
    from textmill.api.app import create_app
    from textmill.api.server import make_server

    opts = options_from_args(args)
    server_config = server_config_from_args(args)
    model_path(opts.model)  # fail fast, before the port opens, on a missing file
    app = create_app(server_config, lambda: _frozen_after(build_serving(opts, args.served_model_name)))
    server = make_server(app, args.host, args.port, args.log_level)
    server.run()
    lifecycle = app.state.lifecycle
    if lifecycle.load_error is not None:
        raise StartupError(lifecycle.load_error)
    if not server.started:
        raise StartupError(f"cannot serve on {args.host}:{args.port} (see the log above)")
    return 0


def run_generate(args) -> int:
    from textmill.messages import EngineRequest
    from textmill.sampling_params import FinishReason, InvalidParam, SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
    except InvalidParam as exc:
        raise StartupError(f"--{exc.param.replace('_', '-')}: {exc.message}") from None
    built = _frozen_after(build_engine(options_from_args(args)))
    tok = built.tokenizer
    params = dataclasses.replace(params, stop_token_ids=tuple(sorted(tok.eos_token_ids)))
    start = tok.bos_token_id if tok.bos_token_id is not None else min(tok.eos_token_ids)
    ids = tuple(tok.encode(args.prompt)) or (start,)
    window = built.scheduler_config.max_model_len
    if len(ids) + params.max_tokens > window:
        raise StartupError(f"the prompt ({len(ids)} tokens) plus --max-tokens {params.max_tokens} "
                           f"exceeds the context window of {window} tokens")
    built.engine.add_request(EngineRequest("generate-0", ids, params, time.monotonic()))
    print(args.prompt, end="", flush=True)
    while True:
        for out in built.engine.step():
            print(out.text, end="", flush=True)
            if out.finished:
                print()
                if out.finish_reason is FinishReason.ERROR:  # the engine failed this request
                    raise StartupError(f"generation failed: {out.error}")
                return 0
