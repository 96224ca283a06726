"""Run one HttpCall through an ASGI app in this process and yield what it sends.

The engine replica's side of the ingress hop: textmill's app gets the scope and body as
uvicorn would give them, every message it sends is handed on as it comes (a stream is never
collected), and a caller that stops listening (the client left, so Ray cancelled the call)
becomes an `http.disconnect` on the app's receive channel, which aborts its engine work.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Message

from textmill.scale.calls import HttpCall

_DONE = None  # the app returned
# After the caller has gone, the app gets this long to hear the disconnect and finish
# (abort its engine requests) before it is cancelled.
_CANCEL_GRACE_S = 5.0


async def run_call(app: ASGIApp, call: HttpCall) -> AsyncIterator[Message]:
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set():
            raise OSError("the client has gone")  # ASGI 2.4: a write to a closed connection raises
        sent.put_nowait(message)

    task = asyncio.create_task(app(call.asgi_scope(), receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(_DONE))
    try:
        while (message := await sent.get()) is not _DONE:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                break
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # the app failed before it answered: Ray hands this to the ingress
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), _CANCEL_GRACE_S)
            task.cancel()
