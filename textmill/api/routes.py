"""The HTTP routes: /v1/completions, /v1/models, /health."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from textmill.api.assemble import ChoiceState, choice_dict, rank, usage_dict
from textmill.api.errors import APIError, server_error
from textmill.api.prepare import Limits, PreparedCompletion, prepare
from textmill.api.protocol import CompletionRequest, CompletionResponse, ErrorResponse, ModelList
from textmill.api.serving import ServingContext, merged_outputs
from textmill.api.streaming import stream_completion

log = logging.getLogger("textmill.api")
router = APIRouter()

_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
           429: {"model": ErrorResponse}, 500: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def _serving(request: Request) -> ServingContext:
    ctx = getattr(request.app.state, "serving", None)
    if ctx is None:
        raise APIError(503, "The model is still loading.", type="server_error", code="model_loading")
    return ctx


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    if getattr(request.app.state, "serving", None) is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> dict:
    ctx = _serving(request)
    card = {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "textmill",
            "max_model_len": ctx.max_model_len}
    return {"object": "list", "data": [card]}


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def create_completion(body: CompletionRequest, request: Request):
    ctx = _serving(request)
    if body.model != ctx.model_name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{ctx.model_name}'.",
                       param="model", code="model_not_found")
    _log_request(body, request)
    cfg = request.app.state.server_config
    limits = Limits(ctx.max_model_len, ctx.tokenizer.vocab_size, cfg.max_prompts_per_request,
                    cfg.max_logit_bias_entries)
    prepared = prepare(body, ctx.tokenizer, limits)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    requests = prepared.engine_requests(request_id, time.monotonic())
    if prepared.stream:
        return StreamingResponse(
            stream_completion(ctx, prepared, requests, request_id, created),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    task = asyncio.ensure_future(_complete(ctx, prepared, requests))
    return await _until_done_or_gone(task, request, request_id, created, ctx, prepared)


async def _complete(ctx: ServingContext, prepared: PreparedCompletion, requests) -> dict:
    states = {(p, c): ChoiceState(prepared.prompts[p], prepared.echo, prepared.logprobs, ctx.tokenizer)
              for p, c, _ in requests}
    async for p, c, out in merged_outputs(ctx.engine, requests):
        states[(p, c)].apply(out)
    failed = [s.error for s in states.values() if s.error is not None]
    if failed:
        log.error("completion failed in the engine: %s", failed[0])
        raise server_error()
    choices = []
    for p in range(len(prepared.prompts)):
        best = rank([states[(p, c)] for c in range(prepared.best_of)], prepared.n)
        choices += [choice_dict(p * prepared.n + i, s) for i, s in enumerate(best)]
    return {"choices": choices, "usage": usage_dict(prepared, states)}


async def _until_done_or_gone(task, request: Request, request_id, created, ctx, prepared) -> JSONResponse:
    """Wait for the completion, but abort it if the client hangs up first."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            break
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.info("client went away; aborted %s", request_id)
            return JSONResponse({"error": {"message": "client disconnected", "type": "aborted",
                                           "param": None, "code": None}}, status_code=499)
    result = task.result()
    body = {"id": request_id, "object": "text_completion", "created": created, "model": ctx.model_name,
            "system_fingerprint": ctx.fingerprint, "choices": result["choices"], "usage": result["usage"]}
    return JSONResponse(body)


def _log_request(body: CompletionRequest, request: Request) -> None:
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        log.debug("ignoring unknown fields: %s", ", ".join(extra))
    if body.user is not None:
        log.info("completion request from user %s", json.dumps(body.user))
