"""Bearer-key auth for /v1/* and /metrics; /health (and the API docs, the playground page) stay open.

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, which would buffer
streams and hide client disconnects from the routes.
"""
from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from textmill.api.errors import APIError
from textmill.api.playground import PAGE_PATHS

# The playground page (not its API calls) is open too: it is where a user types the key.
OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"}) | PAGE_PATHS


def key_matches(header: str | None, keys: tuple[bytes, ...]) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = token.strip().encode()
    # Compare against every key, always, in constant time per key: neither the position
    # of the matching key nor a matching prefix shows in the timing.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


def invalid_key() -> APIError:
    return APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]):
        self.app = app
        self._keys = tuple(k.encode() for k in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS
                or key_matches(Headers(scope=scope).get("authorization"), self._keys)):
            await self.app(scope, receive, send)
            return
        await invalid_key().response()(scope, receive, send)
