"""Bearer-key auth for /v1/* (and /metrics): /health stays open for probes."""
from __future__ import annotations

import hmac

from fastapi import FastAPI, Request

from textmill.api.errors import APIError

OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json", "/redoc"})


def key_matches(header: str | None, keys: tuple[bytes, ...]) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer "):].strip().encode()
    # Compare against every key, always, in constant time per key.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


def install_auth(app: FastAPI, api_keys: tuple[str, ...]) -> None:
    if not api_keys:
        return
    keys = tuple(k.encode() for k in api_keys)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path in OPEN_PATHS or key_matches(request.headers.get("authorization"), keys):
            return await call_next(request)
        return APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                        code="invalid_api_key").response()
