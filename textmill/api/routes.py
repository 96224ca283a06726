"""The routes: /v1/completions, /v1/models (and /v1/models/{id}), /health, /metrics."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from textmill.api.access_log import RequestTrace
from textmill.api.assemble import choice_states, choice_dict, rank, usage_dict
from textmill.api.disconnect import EventStreamResponse, client_gone
from textmill.api.errors import ERROR_RESPONSES, APIError, server_error
from textmill.api.lifecycle import Phase
from textmill.api.metrics import TokenTimer
from textmill.api.prepare import Limits, PreparedCompletion, has_constraint, prepare
from textmill.api.protocol import CompletionRequest, CompletionResponse, ModelCard, ModelList
from textmill.api.serving import Deadline, ServingContext, check_model, merged_outputs, serving_context
from textmill.api.streaming import stream_completion
from textmill.config import ServerConfig
from textmill.engine.async_engine import EngineNotRunning

log = logging.getLogger("textmill.api")
router = APIRouter()

# stream=true answers with server-sent events. Before OpenAPI 3.2 a stream's `schema`
# describes one event: `data` is a JSON chunk (CompletionResponse-shaped), an error
# object, or the final "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}
_COMPLETION_RESPONSES = {**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}}}
# Prompts in bodies larger than this are tokenized in a worker thread, off the event loop.
_TOKENIZE_INLINE_BYTES = 64 * 1024


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    phase = request.app.state.lifecycle.phase
    return JSONResponse({"status": phase.value}, status_code=200 if phase is Phase.READY else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


def _model_card(ctx: ServingContext) -> dict:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "textmill",
            "max_model_len": ctx.max_model_len, "supports_suffix": ctx.tokenizer.fim is not None}


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(serving_context(request))]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model_id: str, request: Request) -> dict:
    ctx = serving_context(request)
    check_model(model_id, ctx)
    return _model_card(ctx)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_COMPLETION_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request):
    ctx = serving_context(request)
    check_model(body.model, ctx)
    state = request.app.state
    # The clock starts before tokenizing: --request-timeout bounds the whole request.
    deadline = Deadline.after(state.server_config.request_timeout)
    trace: RequestTrace = request.state.trace
    trace.user = None if body.user is None else body.user.encode("utf-8", "backslashreplace").decode("utf-8")
    _log_unknown_fields(body)
    prepared = await _prepare(body, ctx, state.server_config, trace.body_bytes)
    stats = ctx.engine.stats()
    trace.admitted = state.admission.admit(len(prepared.prompts) * prepared.best_of,
                                           stats.num_running if stats is not None else 0, _count_param(body, prepared))
    completion_id = f"cmpl-{trace.request_id}"
    # Engine ids stay unique even when clients reuse an X-Request-Id.
    requests = prepared.engine_requests(f"{completion_id}-{secrets.token_hex(4)}", time.monotonic())
    timer = TokenTimer(state.metrics, trace, ctx.model_name)
    head = {"id": completion_id, "object": "text_completion", "created": int(time.time()),
            "model": ctx.model_name, "system_fingerprint": ctx.fingerprint}
    if prepared.stream:
        return EventStreamResponse(
            stream_completion(ctx, prepared, requests, head, trace, timer, deadline),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    task = asyncio.ensure_future(_complete(ctx, prepared, requests, trace, timer, deadline))
    result = await _until_done_or_gone(task, request, completion_id)
    if result is None:
        return JSONResponse({"error": {"message": "client disconnected", "type": "aborted",
                                       "param": None, "code": None}}, status_code=499)
    return JSONResponse({**head, **result})


async def _prepare(body: CompletionRequest, ctx: ServingContext, cfg: ServerConfig,
                   body_bytes: int) -> PreparedCompletion:
    limits = Limits(ctx.max_model_len, ctx.vocab_size or ctx.tokenizer.vocab_size, cfg.max_prompts_per_request,
                    cfg.max_logit_bias_entries, cfg.max_prompt_tokens, cfg.max_n, cfg.max_best_of)
    # A constraint compiles in prepare (ms, up to llguidance's limits): off the event loop too.
    if body_bytes > _TOKENIZE_INLINE_BYTES or has_constraint(body):
        return await asyncio.to_thread(prepare, body, ctx.tokenizer, limits, ctx.grammars)
    return prepare(body, ctx.tokenizer, limits, ctx.grammars)


def _count_param(body: CompletionRequest, prepared: PreparedCompletion) -> str:
    """The field to blame when a request holds more sequences than the server queues."""
    if len(prepared.prompts) > 1:
        return "prompt"
    return "best_of" if body.best_of is not None else "n"


async def _complete(ctx: ServingContext, prepared: PreparedCompletion, requests, trace: RequestTrace,
                    timer: TokenTimer, deadline: Deadline | None = None) -> dict:
    states = choice_states(prepared, requests, ctx.tokenizer)
    try:
        # aclosing: whatever ends this loop early (an error here, a failed candidate, a
        # timeout, cancellation) aborts every candidate's engine request before it returns.
        async with contextlib.aclosing(merged_outputs(ctx.engine, requests, deadline)) as outputs:
            async for p, c, out in outputs:
                states[(p, c)].apply(out)
                timer.observe((p, c), out.num_output_tokens)
    except EngineNotRunning as exc:
        raise APIError(503, "The engine is not running (the server is shutting down).", type="server_error",
                       code="engine_unavailable") from exc
    finally:
        trace.set_usage(usage_dict(prepared, states))
    failed = [s.error for s in states.values() if s.error is not None]
    if failed:
        log.error("completion %s failed in the engine: %s", trace.request_id, failed[0])
        raise server_error()
    choices = []
    for p in range(len(prepared.prompts)):
        best = rank([states[(p, c)] for c in range(prepared.best_of)], prepared.n)
        choices += [choice_dict(p * prepared.n + i, s) for i, s in enumerate(best)]
    return {"choices": choices, "usage": usage_dict(prepared, states)}


async def _until_done_or_gone(task: asyncio.Future, request: Request, completion_id: str) -> dict | None:
    """Wait for the completion, but abort it (None) if the client hangs up first."""
    watching = asyncio.ensure_future(client_gone(request.receive))
    try:
        await asyncio.wait({task, watching}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        log.info("client went away; aborting %s", completion_id)
        return None
    finally:  # also when this handler itself is cancelled (server shutdown)
        for pending in (task, watching):
            pending.cancel()
        await asyncio.gather(task, watching, return_exceptions=True)


def _log_unknown_fields(body: CompletionRequest) -> None:
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        log.debug("ignoring unknown fields: %s", ", ".join(extra))
