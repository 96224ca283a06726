"""The ingress: the ASGI app Ray's HTTP proxy calls, in front of the engine replicas.

It reads the request body (at most --max-request-bytes + 1: the replica's own limit then
answers past it, with the single server's 400), takes the routing key from it (calls.py),
and hands the whole request to one engine replica through a DeploymentHandle, whose
request router (routing.py) picks the replica. The replica's ASGI messages are sent on as
they come, so a stream is never buffered here.

When the replica dies:
- before its response started, the request is sent once more, to a live replica (Ray drops
  the dead one from the router at once): a request that arrives after a kill is not lost;
- after it started, a stream ends with an `error` event and `[DONE]`, as the single
  server ends a stream that fails (one whose `[DONE]` had gone out is only closed); any
  other response ends where it is.
GET /metrics is the exception to one-replica-per-request: every replica is scraped and the
texts merged, each sample labelled with its replica (metrics_merge.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re

from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.types import Message, Receive, Scope, Send

from textmill.api.errors import APIError, server_error
from textmill.scale.calls import HttpCall, routing_text
from textmill.scale.metrics_merge import merge_scrapes

log = logging.getLogger("textmill.scale")

# One more attempt on a live replica when the chosen one died before answering. Not more:
# a request that itself kills replicas must not take them all down.
RESEND_ON_LOST_REPLICA = 1
_SCRAPE_TIMEOUT_S = 10.0
_RAY_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


class Ingress:
    def __init__(self, engine: DeploymentHandle, max_request_bytes: int):
        self._engine = engine
        self._max_body = max_request_bytes

    def __serve_build_asgi_app__(self):
        return _AsgiApp(self)

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] != "http":
            return  # websockets: textmill has none
        elif scope["method"] == "GET" and scope["path"] == "/metrics":
            await self._scrape_all(scope, send)
        else:
            body = await self._read_body(receive)
            if body is not None:
                await self._forward(_call(scope, body), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while size <= self._max_body:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left mid-body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _forward(self, call: HttpCall, send: Send) -> None:
        for attempt in range(RESEND_ON_LOST_REPLICA + 1):
            relay = _Relay(send)
            stream = self._engine.options(stream=True).handle.remote(call)
            try:
                async for message in stream:
                    await relay.send(message)
                return
            except asyncio.CancelledError:
                stream.cancel()  # the client left: the replica aborts the engine work
                raise
            except RayActorError as exc:
                if not relay.started and attempt < RESEND_ON_LOST_REPLICA:
                    log.warning("replica lost before answering %s %s (%s); sending it to another",
                                call.method, call.path, type(exc).__name__)
                    continue
                log.error("replica lost while answering %s %s: %s", call.method, call.path, exc)
                await relay.fail(APIError(500, "The replica serving this request stopped; retry it.",
                                          type="server_error", code="replica_lost"))
                return
            except Exception:
                log.exception("forwarding %s %s failed", call.method, call.path)
                await relay.fail(server_error())
                return

    async def _scrape_all(self, scope: Scope, send: Send) -> None:
        headers = tuple((bytes(k), bytes(v)) for k, v in scope["headers"])
        results = await self._engine.broadcast("scrape", headers).results_async(
            timeout_s=_SCRAPE_TIMEOUT_S, return_exceptions=True)
        scrapes = [r for r in results if not isinstance(r, BaseException)]
        refused = next((r for r in scrapes if r[1] != 200), None)
        if refused is not None:  # e.g. a 401: every replica answers it alike, send one on
            _, status, response_headers, body = refused
            await _respond(send, status, list(response_headers), body)
            return
        merged = merge_scrapes((label, body.decode()) for label, _, _, body in scrapes)
        # The replicas' own content type (the exposition format version is prometheus_client's).
        content_type = next((bytes(v) for _, _, headers, _ in scrapes for k, v in headers
                             if bytes(k).lower() == b"content-type"), CONTENT_TYPE_LATEST.encode())
        await _respond(send, 200, [(b"content-type", content_type)], merged)


class _AsgiApp:
    """An object with an async __call__: what uvicorn's lifespan runner takes for ASGI 3
    (a bound method would be taken for ASGI 2)."""

    def __init__(self, ingress: Ingress):
        self._ingress = ingress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._ingress.asgi(scope, receive, send)


_DONE_EVENT = b"data: [DONE]\n\n"


class _Relay:
    """Sends a replica's messages on; remembers how far the response got."""

    def __init__(self, send: Send):
        self._send = send
        self.started = False
        self.event_stream = False
        self.ended = False
        self._tail = b""  # the body's last bytes: has a stream's [DONE] gone out?

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            # Ray's proxy adds X-Request-ID itself (the client's, or the one it made): one
            # header, not two.
            headers = [(k, v) for k, v in message.get("headers", []) if bytes(k).lower() != b"x-request-id"]
            message = {**message, "headers": headers}
            self.started = True
            self.event_stream = any(bytes(k).lower() == b"content-type" and bytes(v).startswith(b"text/event-stream")
                                    for k, v in headers)
        elif message["type"] == "http.response.body":
            if body := message.get("body", b""):
                self._tail = (self._tail + bytes(body))[-len(_DONE_EVENT):]
            self.ended = not message.get("more_body", False)
        await self._send(message)

    async def fail(self, error: APIError) -> None:
        if not self.started:
            await _respond(self._send, error.status, [(b"content-type", b"application/json")],
                           json.dumps(error.body()).encode())
        elif not self.ended:
            tail = b""
            # A stream whose [DONE] went out before its closing message is whole: it is only
            # closed (an error event after [DONE], and a second [DONE], would break its shape).
            if self.event_stream and self._tail != _DONE_EVENT:
                tail = f"data: {json.dumps(error.body(), separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()
            await self._send({"type": "http.response.body", "body": tail, "more_body": False})


def _call(scope: Scope, body: bytes) -> HttpCall:
    client = scope.get("client")
    headers = tuple((bytes(k), _request_id(v) if bytes(k).lower() == b"x-request-id" else bytes(v))
                    for k, v in scope["headers"])
    return HttpCall(
        method=scope["method"], path=scope["path"], raw_path=scope.get("raw_path") or scope["path"].encode(),
        query_string=scope.get("query_string", b""), headers=headers,
        body=body, client=tuple(client) if client else None, scheme=scope.get("scheme", "http"),
        http_version=scope.get("http_version", "1.1"), prompt=routing_text(scope["method"], scope["path"], body))


def _request_id(value: bytes) -> bytes:
    """Ray's proxy gives every request an X-Request-Id, a dashed UUID when the client sent
    none; textmill's own ids are the same UUID's 32 hex digits (cmpl-<hex>). Spelled so,
    a completion id looks as the single server's do, and still names Ray's request."""
    if _RAY_UUID.fullmatch(value):
        return value.replace(b"-", b"")
    return bytes(value)


async def _respond(send: Send, status: int, headers: list, body: bytes) -> None:
    if not any(bytes(k).lower() == b"content-length" for k, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


IngressDeployment = serve.ingress()(Ingress)
