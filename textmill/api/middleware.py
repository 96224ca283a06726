"""Plain ASGI middlewares around every request (outermost first):

OpsMiddleware   request id and trace, in-flight count, 503 while draining, X-Request-Id
                echo, request metrics and the access-log line when the response has ended
AuthMiddleware  (auth.py)
BodyLimit       bodies past --max-request-bytes get a 400 before anything parses them

Plain ASGI (not BaseHTTPMiddleware) so that streams pass through unbuffered and the routes
still hear the client's http.disconnect.
"""
from __future__ import annotations

import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textmill.api.access_log import QUIET_PATHS, RequestTrace, log_access, request_id_from
from textmill.api.admission import Admission
from textmill.api.errors import APIError, bad_request
from textmill.api.lifecycle import Lifecycle, Phase
from textmill.api.metrics import Metrics

# Status recorded for a request whose client left before any response started (nginx's).
CLIENT_CLOSED = 499


class OpsMiddleware:
    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, admission: Admission, metrics: Metrics):
        self.app = app
        self.lifecycle = lifecycle
        self.admission = admission
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        trace = RequestTrace(request_id_from(headers.get("x-request-id")), scope["method"], scope["path"])
        scope.setdefault("state", {})["trace"] = trace
        echo = (b"x-request-id", trace.request_id.encode())

        async def send_traced(message: Message) -> None:
            if message["type"] == "http.response.start":
                trace.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), echo]}
            await send(message)

        counted = scope["path"] not in QUIET_PATHS
        self.lifecycle.in_flight += counted
        try:
            if counted and self.lifecycle.phase is Phase.DRAINING:
                await _shutting_down().response()(scope, receive, send_traced)
            else:
                await self.app(scope, receive, send_traced)
        except BaseException:
            trace.status = trace.status or 500
            raise
        finally:
            self.lifecycle.in_flight -= counted
            self.admission.release(trace.admitted)
            trace.admitted = 0
            trace.duration_s = time.monotonic() - trace.started
            trace.status = trace.status or CLIENT_CLOSED
            self.metrics.observe_request(trace)
            log_access(trace)


def _shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; retry on another instance.", type="server_error",
                    code="server_shutting_down", headers={"Connection": "close", "Retry-After": "1"})


class BodyLimitMiddleware:
    """Reads the whole body (as Starlette would before parsing it), refusing past the limit.

    A declared Content-Length over the limit is refused before a byte of the body is read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large().response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        trace = scope.get("state", {}).get("trace")
        if trace is not None:
            trace.body_bytes = size
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _too_large(self) -> APIError:
        error = bad_request(f"The request body is larger than this server accepts ({self.max_bytes} bytes).", None)
        error.code = "request_too_large"
        return error


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the real channel (so that disconnects still arrive)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
