"""Running one completion against the engine: fan out the candidates, merge their outputs.

A completion with P prompts and best_of B is P*B engine requests. Each is consumed by
its own task that feeds one queue, so the route sees a single ordered stream of
(prompt, candidate, output). Closing the stream cancels the tasks, and cancelling a
task aborts its engine request (AsyncEngine.generate's contract).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from textmill.api.errors import APIError
from textmill.messages import EngineRequest, RequestOutput
from textmill.tokenizer import Tokenizer


class EngineClient(Protocol):
    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]: ...

    @property
    def num_unfinished(self) -> int: ...


@dataclass(frozen=True)
class ServingContext:
    """What the HTTP layer needs from the loaded model; built by cli.py."""

    engine: Any  # AsyncEngine: start(), shutdown(), generate(), num_unfinished
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    fingerprint: str
    created: int = 0
    kv_cache_blocks: int = 0  # blocks in the KV pool (for the blocks-in-use gauge)
    # Token ids a client may send: those both the model's embedding and the tokenizer know
    # (an HF tokenizer may list added tokens past the embedding rows, a GGUF the reverse).
    vocab_size: int = 0


def check_model(model: str | None, ctx: ServingContext) -> None:
    """404 model_not_found for a name this server does not serve (None: not asked)."""
    if model is not None and model != ctx.model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{ctx.model_name}'.",
                       param="model", code="model_not_found")


_DONE = object()


async def merged_outputs(
    engine: EngineClient, requests: list[tuple[int, int, EngineRequest]]
) -> AsyncIterator[tuple[int, int, RequestOutput]]:
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
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
                continue
            if isinstance(item[2], Exception):
                raise item[2]
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
