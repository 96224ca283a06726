"""uvicorn, taught to drain: the first SIGTERM (or Ctrl-C) stops new work, not the server.

uvicorn's own handling closes the listening socket at once, so a load balancer's retry
meets "connection refused" instead of a 503, and it re-raises the signal after shutdown,
so the process dies by SIGTERM rather than exiting 0. Here the first signal starts the
app's drain (Lifecycle); each tick asks whether it is over; a second signal forces exit.
"""
from __future__ import annotations

import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from textmill.api.lifecycle import Lifecycle

_DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in _DRAIN_SIGNALS and self.lifecycle.begin_drain():
            return
        super().handle_exit(sig, frame)  # a second signal: uvicorn's own (fast) exit

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return await self.lifecycle.exit_due()


def make_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> GracefulServer:
    # Our access log replaces uvicorn's; logging itself is configured by the CLI (or left as is).
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), access_log=False,
                            log_config=None, timeout_graceful_shutdown=5)
    return GracefulServer(config, app.state.lifecycle)
