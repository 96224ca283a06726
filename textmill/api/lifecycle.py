"""The server's life: loading -> ready -> draining -> exit, or loading -> failed -> exit.

The app records its phase and the requests in flight here; the HTTP server (api/server.py)
asks `exit_due()` every tick and calls `begin_drain()` on SIGTERM. So the app never
touches uvicorn, and the drain logic can be tested without sending signals.
"""
from __future__ import annotations

import enum
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from textmill.api.serving import EngineClient

log = logging.getLogger("textmill.api")

# After the drain deadline the engine ends what is left with an error; handlers then get
# this long to send those errors before the server closes the connections.
_FLUSH_GRACE_S = 2.0


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ok"
    DRAINING = "draining"
    FAILED = "failed"


class Lifecycle:
    def __init__(self, shutdown_timeout: float, clock=time.monotonic):
        self.phase = Phase.LOADING
        self.load_error: str | None = None
        self.in_flight = 0  # HTTP requests whose response has not ended (probes excluded)
        self._shutdown_timeout = shutdown_timeout
        self._clock = clock
        self._deadline: float | None = None
        self._engine: EngineClient | None = None  # once loaded
        self._engine_stopped_at: float | None = None

    # ------------------------------------------------------------ transitions
    def ready(self, engine: EngineClient) -> None:
        self._engine = engine
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY

    def fail(self, message: str) -> None:
        self.load_error = message
        self.phase = Phase.FAILED

    def begin_drain(self) -> bool:
        """Stop accepting; False when already draining (or failed)."""
        if self.phase in (Phase.DRAINING, Phase.FAILED):
            return False
        self.phase = Phase.DRAINING
        self._deadline = self._clock() + self._shutdown_timeout
        log.info("draining: %d requests in flight, up to %.0fs to finish", self.in_flight,
                 self._shutdown_timeout)
        return True

    @property
    def accepting(self) -> bool:
        return self.phase is Phase.READY

    # ------------------------------------------------------------ the server's question
    async def exit_due(self) -> bool:
        """True once the server may close: load failed, or drained (or out of time)."""
        if self.phase is Phase.FAILED:
            return True
        if self.phase is not Phase.DRAINING:
            return False
        if self.in_flight == 0:
            return True
        now = self._clock()
        if now < self._deadline:
            return False
        if self._engine_stopped_at is None:
            log.warning("shutdown timeout: ending %d requests still in flight", self.in_flight)
            self._engine_stopped_at = now
            if self._engine is not None:
                # Every stream left ends with an error output, which handlers send on.
                await self._engine.shutdown(drain_timeout=0.0)
        return now - self._engine_stopped_at >= _FLUSH_GRACE_S
