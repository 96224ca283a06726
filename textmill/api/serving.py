"""Running one completion against the engine: fan out the candidates, merge their outputs.

A completion with P prompts and best_of B is P*B engine requests. Each is consumed by
its own task that feeds one queue, so the route sees a single ordered stream of
(prompt, candidate, output). Closing the stream cancels the tasks, and cancelling a
task aborts its engine request (AsyncEngine.generate's contract).

A completion fails as a whole: the first candidate that fails (an exception, or an output
that finished with an error) ends the stream, and so does the server's deadline
(--request-timeout); either way every candidate's engine request is aborted at once,
not when the last sibling finishes or when the generator is garbage-collected.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from textmill.api.errors import APIError
from textmill.engine.engine import EngineStats
from textmill.messages import EngineRequest, RequestOutput
from textmill.structured import GrammarCompiler


class EngineClient(Protocol):
    """What the HTTP layer asks of the engine (engine/async_engine.AsyncEngine)."""

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]: ...

    @property
    def num_unfinished(self) -> int: ...

    def stats(self) -> EngineStats | None: ...

    async def start(self) -> None: ...

    async def shutdown(self, drain_timeout: float = 0.0) -> None: ...


class FimIds(Protocol):
    prefix: int
    suffix: int
    middle: int


class TextTokenizer(Protocol):
    """What the HTTP layer asks of the tokenizer (textmill/tokenizer): text <-> ids, and
    the special ids a prompt is built with. api/ never imports the tokenizer itself."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    add_bos: bool
    fim: FimIds | None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_with_offsets(self, ids: Sequence[int]) -> tuple[str, list[int]]: ...

    def token_text(self, token_id: int) -> str: ...


@dataclass(frozen=True)
class ServingContext:
    """What the HTTP layer needs from the loaded model; built by cli.py."""

    engine: EngineClient
    tokenizer: TextTokenizer
    model_name: str
    max_model_len: int
    fingerprint: str
    created: int = 0
    kv_cache_blocks: int = 0  # blocks in the KV pool (for the blocks-in-use gauge)
    # Token ids a client may send: those both the model's embedding and the tokenizer know
    # (an HF tokenizer may list added tokens past the embedding rows, a GGUF the reverse).
    vocab_size: int = 0
    # Compiles structured-output constraints (None: no structured outputs on this server;
    # a constrained request is then a 400).
    grammars: GrammarCompiler | None = None


def serving_context(request: Request) -> ServingContext:
    """The loaded model's context; 503 model_loading while the model is still loading."""
    ctx = getattr(request.app.state, "serving", None)
    if ctx is None:
        raise APIError(503, "The model is still loading.", type="server_error", code="model_loading")
    return ctx


def check_model(model: str | None, ctx: ServingContext) -> None:
    """404 model_not_found for a name this server does not serve (None: not asked)."""
    if model is not None and model != ctx.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{ctx.model_name}'.",
                       param="model", code="model_not_found")


def request_timeout_error(timeout_s: float) -> APIError:
    """The completion ran past --request-timeout. 504: the server gave up waiting on its
    own engine (408 would blame the client for being slow to send its request)."""
    return APIError(504, f"The request took longer than this server allows ({timeout_s:g} s, its "
                         "--request-timeout) and was stopped. Ask for fewer tokens, or retry.",
                    type="timeout_error", code="request_timeout")


@dataclass(frozen=True)
class Deadline:
    """When a completion must be over, on the event loop's clock (loop.time())."""

    at: float
    timeout_s: float

    @classmethod
    def after(cls, timeout_s: float | None) -> "Deadline | None":
        if timeout_s is None:
            return None
        return cls(asyncio.get_running_loop().time() + timeout_s, timeout_s)


_DONE = object()


async def merged_outputs(
    engine: EngineClient, requests: list[tuple[int, int, EngineRequest]], deadline: Deadline | None = None
) -> AsyncIterator[tuple[int, int, RequestOutput]]:
    """Every candidate's outputs, in arrival order, until all have finished.

    An output that finished with an error is yielded, then the stream ends (the siblings are
    aborted). Past `deadline`, raises the 504 APIError of request_timeout_error.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, c: int, req: EngineRequest) -> None:
        try:
            async for out in engine.generate(req):
                queue.put_nowait((p, c, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine refused or failed this request
            queue.put_nowait((p, c, exc))
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(p, c, r)) for p, c, r in requests]
    try:
        remaining = len(tasks)
        while remaining:
            item = await _next(queue, deadline)
            if item is _DONE:
                remaining -= 1
                continue
            if isinstance(item[2], Exception):
                raise item[2]
            yield item
            if item[2].finished and item[2].error is not None:
                return  # the completion has failed: its siblings' work is wasted
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _next(queue: asyncio.Queue, deadline: Deadline | None):
    if deadline is None:
        return await queue.get()
    try:
        async with asyncio.timeout_at(deadline.at):
            return await queue.get()
    except TimeoutError:
        raise request_timeout_error(deadline.timeout_s) from None
