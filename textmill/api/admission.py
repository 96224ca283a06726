"""Backpressure: a bounded number of candidate sequences may wait for the engine.

A completion is admitted whole or not at all, before any of it reaches the engine, so a
request that got a 200 is never dropped later for lack of room. The count is the API's
own (incremented here, synchronously, and released when the HTTP exchange ends), so two
requests arriving together cannot both slip past the bound.
"""
from __future__ import annotations

from textmill.api.errors import APIError, bad_request

# What a refused client is told to wait, in seconds (the Retry-After header). A step of
# the batch takes tens of milliseconds, so a second usually frees room.
RETRY_AFTER_S = 1


class Admission:
    def __init__(self, max_queued: int):
        self.max_queued = max_queued
        self.admitted = 0  # candidate sequences of requests in flight

    def admit(self, num_candidates: int, num_running: int, param: str) -> int:
        """Reserve room for `num_candidates` sequences or raise (400 if never, 429 if not now).

        Waiting sequences are estimated as admitted minus running (the engine's last step);
        returns the number reserved, to give back with `release`.
        """
        if num_candidates > self.max_queued:
            raise bad_request(
                f"This request needs {num_candidates} sequences (prompts x best_of); this server "
                f"queues at most {self.max_queued}.", param)
        waiting = self.admitted - min(num_running, self.admitted)
        if waiting + num_candidates > self.max_queued:
            raise APIError(
                429, f"The server is busy: {waiting} sequences are waiting (at most {self.max_queued}). "
                f"Retry after {RETRY_AFTER_S}s.", type="requests", code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)})
        self.admitted += num_candidates
        return num_candidates

    def release(self, num_candidates: int) -> None:
        self.admitted -= num_candidates
        assert self.admitted >= 0, "released more sequences than were admitted"
