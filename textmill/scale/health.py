"""Is this replica's engine alive and moving? The answer Ray's health check acts on.

Dead: the engine loop thread is gone, or the model never loaded. Hung: requests wait on
the engine and no step has ended for `hang_timeout` seconds (a step ends in well under a
second on the bundled model; a long prefill chunk of a big model in seconds). Ray replaces
a replica whose check_health raises, so both end with a fresh replica, not a stuck one.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class EngineWatch:
    def __init__(self, hang_timeout: float, clock: Callable[[], float] = time.monotonic):
        self._hang_timeout = hang_timeout
        self._clock = clock
        self._last_stats: Any = None
        self._moved_at = clock()

    def problem(self, lifecycle: Any, engine: Any) -> str | None:
        """None when healthy, else why not. `engine` is the AsyncEngine (None: not loaded)."""
        if lifecycle.load_error is not None:
            return f"the model did not load: {lifecycle.load_error}"
        if engine is None:
            return "the engine is not loaded"
        if not engine.is_running:
            return "the engine loop has stopped"
        now = self._clock()
        stats = engine.stats()  # a new snapshot after every step
        if stats is not self._last_stats or engine.num_unfinished == 0:
            self._last_stats, self._moved_at = stats, now
            return None
        if now - self._moved_at > self._hang_timeout:
            return (f"the engine has not finished a step in {now - self._moved_at:.0f}s "
                    f"with {engine.num_unfinished} requests waiting on it")
        return None
