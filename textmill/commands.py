"""What `textmill serve` and `textmill generate` do with their configs (cli.py builds them)."""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import TypeVar

from textmill import collector
from textmill.config import EngineConfig, GenerateConfig, ServerConfig
from textmill.wiring import StartupError, build_engine, build_serving, model_path


def serve(engine: EngineConfig, server: ServerConfig) -> int:
    with collector.paused():  # FastAPI's and pydantic's imports, as torch's in cli.py
        from textmill.api.app import create_app
        from textmill.api.server import make_server

    model_path(engine.model)  # fail fast, before the port opens, on a missing file
    app = create_app(server, lambda: _frozen_after(build_serving(engine, server.served_model_name)))
    uv = make_server(app, server.host, server.port, server.log_level)
    uv.run()
    lifecycle = app.state.lifecycle
    if lifecycle.load_error is not None:
        raise StartupError(lifecycle.load_error)
    if not uv.started:
        raise StartupError(f"cannot serve on {server.host}:{server.port} (see the log above)")
    return 0


def generate(engine: EngineConfig, gen: GenerateConfig) -> int:
    """Print the prompt and its completion; StartupError when the engine fails the request."""
    from textmill.messages import EngineRequest
    from textmill.sampling_params import FinishReason, InvalidParam, SamplingParams

    try:
        params = SamplingParams(max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                seed=gen.seed)
    except InvalidParam as exc:
        raise StartupError(f"--{exc.param.replace('_', '-')}: {exc.message}") from None
    built = _frozen_after(build_engine(engine))
    tok = built.tokenizer
    params = dataclasses.replace(params, stop_token_ids=tuple(sorted(tok.eos_token_ids)))
    start = tok.bos_token_id if tok.bos_token_id is not None else min(tok.eos_token_ids)
    ids = tuple(tok.encode(gen.prompt)) or (start,)
    window = built.scheduler_config.max_model_len
    if len(ids) + params.max_tokens > window:
        raise StartupError(f"the prompt ({len(ids)} tokens) plus --max-tokens {params.max_tokens} "
                           f"exceeds the context window of {window} tokens")
    built.engine.add_request(EngineRequest("generate-0", ids, params, time.monotonic()))
    print(gen.prompt, end="", flush=True)
    while True:
        for out in built.engine.step():
            print(out.text, end="", flush=True)
            if out.finished:
                print()
                if out.finish_reason is FinishReason.ERROR:  # the engine failed this request
                    raise StartupError(f"generation failed: {out.error}")
                return 0


T = TypeVar("T")


def _frozen_after(built: T) -> T:
    """gc.freeze() once the model is loaded: the objects loading made (modules, parameters,
    tokenizer tables) live as long as the process, and without this every full collection
    walks them all, in the engine thread, in the middle of a step (docs/performance.md).
    Only the server and `generate` do it: a process that builds engine after engine (the
    tests) would keep dead ones for good."""
    gc.freeze()
    return built
