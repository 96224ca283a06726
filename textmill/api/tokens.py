"""vLLM's POST /tokenize and POST /detokenize, with its request and response keys.

Clients written against vLLM count tokens with these before they send a completion.
"""
from __future__ import annotations

from fastapi import APIRouter, Request

from textmill.api.errors import ERROR_RESPONSES, bad_request
from textmill.api.prepare import out_of_vocabulary
from textmill.api.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from textmill.api.serving import check_model, serving_context

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    ctx = serving_context(request)
    check_model(body.model, ctx)
    try:
        ids = ctx.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    except UnicodeError:
        raise bad_request("prompt is not valid Unicode text.", "prompt") from None
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    ctx = serving_context(request)
    check_model(body.model, ctx)
    vocab = ctx.vocab_size or ctx.tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(out_of_vocabulary(bad[0], vocab, "in tokens"), "tokens")
    return {"prompt": ctx.tokenizer.decode(body.tokens)}
