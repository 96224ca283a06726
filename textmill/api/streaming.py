"""Server-sent events for stream=true: one chunk per candidate delta, then usage, then [DONE].

Every chunk carries the completion's id and created time. Errors after the first byte
cannot change the HTTP status any more, so they travel as a data event of their own.
A client that leaves closes this generator (disconnect.EventStreamResponse), which cancels
the engine requests (serving.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator

from textmill.api.access_log import RequestTrace
from textmill.api.assemble import choice_states, usage_dict
from textmill.api.errors import APIError, server_error
from textmill.api.metrics import TokenTimer
from textmill.api.prepare import PreparedCompletion
from textmill.api.serving import Deadline, ServingContext, merged_outputs

log = logging.getLogger("textmill.api")


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def stream_completion(ctx: ServingContext, prepared: PreparedCompletion, requests, head: dict,
                            trace: RequestTrace, timer: TokenTimer,
                            deadline: Deadline | None = None) -> AsyncIterator[str]:
    states = choice_states(prepared, requests, ctx.tokenizer)
    sent_prompt_ids: set[tuple[int, int]] = set()
    try:
        # aclosing: leaving early (an error, the deadline) cancels the sibling candidates at once.
        async with contextlib.aclosing(merged_outputs(ctx.engine, requests, deadline)) as outputs:
            async for p, c, out in outputs:
                state = states[(p, c)]
                text, lp = state.apply(out)
                timer.observe((p, c), out.num_output_tokens)
                if state.error is not None:
                    # The engine's message is for the log; the client gets OpenAI's generic one.
                    log.error("stream %s: engine error: %s", head["id"], state.error)
                    raise server_error()
                if not text and not out.finished and not (lp and lp.tokens):
                    continue
                choice = {"text": text, "index": p * prepared.n + c,
                          "logprobs": lp.as_dict() if lp is not None else None,
                          "finish_reason": state.finish_reason}
                if prepared.return_token_ids:  # vLLM: the prompt's ids once, then each delta's
                    if (p, c) not in sent_prompt_ids:
                        sent_prompt_ids.add((p, c))
                        choice["prompt_token_ids"] = list(state.prompt.token_ids)
                    choice["token_ids"] = list(out.token_ids)
                chunk = {**head, "choices": [choice]}
                if prepared.include_usage:
                    # vLLM's continuous_usage_stats: this choice's usage so far, in every chunk.
                    chunk["usage"] = _choice_usage(state) if prepared.continuous_usage else None
                yield _event(chunk)
        if prepared.include_usage:
            yield _event({**head, "choices": [], "usage": usage_dict(prepared, states)})
    except APIError as exc:
        log.error("stream %s failed: %s", head["id"], exc.message)
        yield _event(exc.body())
    except Exception:
        log.exception("stream %s failed", head["id"])
        yield _event(server_error().body())
    finally:
        trace.set_usage(usage_dict(prepared, states))
    yield "data: [DONE]\n\n"


def _choice_usage(state) -> dict:
    prompt = len(state.prompt.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": state.num_output_tokens,
            "total_tokens": prompt + state.num_output_tokens}
