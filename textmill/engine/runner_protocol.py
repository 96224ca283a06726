"""The one door between the torch-free engine and the device-owning runner."""
from __future__ import annotations

from typing import Protocol

from textmill.messages import RunnerOutput, SchedulerOutput


class Runner(Protocol):
    # A position's logits (and so its token) are the same bits in a chunk of several tokens
    # as in a one-token step. Only then does the engine let requests guess tokens
    # (engine/ngram_draft.py); a runner without the attribute counts as False.
    chunks_match_steps: bool

    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        """Run one step: compute the scheduled chunks, sample where asked, return tokens.

        Raises on failure; the engine then fails the requests of this step only.
        """
        ...
