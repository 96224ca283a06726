"""Noticing a client that left, whatever the ASGI server, so that its engine work stops.

The one signal every ASGI server gives is an `http.disconnect` message from `receive()`.
Starlette's StreamingResponse listens for it only below ASGI spec 2.4; from 2.4 on it
waits for `send()` to raise instead, which uvicorn never does (it drops writes to a closed
socket), and a stream that waits on the engine (queued behind other requests, or a long
prefill) writes nothing to fail on. So both routes listen for themselves: the stream with
EventStreamResponse, the non-streaming route with `client_gone` beside its task.
"""
from __future__ import annotations

import asyncio
import contextlib

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


async def client_gone(receive: Receive) -> None:
    """Return when the client has disconnected (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that stops at once when the client leaves, on any ASGI server.

    Whatever ends the response (the last event, a disconnect, a failed send, cancellation),
    the body generator is closed before this returns, and closing it aborts the engine
    requests behind it (streaming.py, serving.py).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending = asyncio.ensure_future(self._send_all(send))
        watching = asyncio.ensure_future(client_gone(receive))
        try:
            await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sending, watching):
                task.cancel()
            await asyncio.gather(sending, watching, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if sending.cancelled():  # the client left first
            return
        if sending.exception() is not None:
            raise sending.exception()
        if self.background is not None:
            await self.background()

    async def _send_all(self, send: Send) -> None:
        # A server that reports a closed connection by raising (ASGI 2.4) means the same
        # as http.disconnect: the client is gone, and there is nobody to tell.
        with contextlib.suppress(OSError):
            await self.stream_response(send)
