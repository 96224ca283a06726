"""The one door between the torch-free engine and the device-owning runner."""
from __future__ import annotations

from typing import Protocol

from textmill.messages import RunnerOutput, SchedulerOutput


class Runner(Protocol):
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        """Run one step: compute the scheduled chunks, sample where asked, return tokens.

        Raises on failure; the engine then fails the requests of this step only.
        """
        ...
