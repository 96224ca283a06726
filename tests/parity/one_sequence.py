"""A hybrid model (recurrent layers beside attention) called as the other families are, for the
parity tests' helpers (compare.py): one sequence, its recurrent state kept from call to call."""
from __future__ import annotations

import torch

from textmill.runner.recurrent_state import RecurrentStates, StepStates


class OneSequence:
    """(ids, positions, ctx) -> the model's forward over one sequence, its recurrent state kept
    from call to call and started afresh at position 0."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.states = RecurrentStates(model.config, num_slots=1)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        if int(positions[0]) == 0:
            for pool in (*self.states.conv.values(), *self.states.ssm.values()):
                pool.zero_()
        step = StepStates(((0, len(ids), 0),), self.states.conv, self.states.ssm)
        return self.model(ids, positions, ctx, states=step)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)
