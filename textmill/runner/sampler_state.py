"""The sampler's state per request and its dense penalty counts (runner/sampler.py uses them)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from textmill.sampling_params import SamplingParams


@dataclass
class RequestSampling:
    """One request's sampler state; lives from its first step until it leaves."""

    params: SamplingParams
    generator: torch.Generator  # CPU, so the draws are the same on every device
    bias_ids: torch.Tensor | None  # (K,) int64 on the device
    bias_values: torch.Tensor | None  # (K,) float32
    count_row: int | None  # row in PenaltyCounts, only when the request uses penalties
    seen_row: int | None = None  # row in the seen-token buffer, only with repetition_penalty
    num_generated: int = 0  # tokens sampled so far (min_tokens)
    stop_ids: torch.Tensor | None = None  # (K,) banned while num_generated < min_tokens
    allowed_ids: torch.Tensor | None = None  # (K,) allowed_token_ids: the only tokens left
    generated: list[int] | None = None  # the tokens sampled so far, kept only for bad_words


class PenaltyCounts:
    """Generated-token counts (rows, V) on the device, one row per penalized request.

    Dense so that applying and updating penalties is a gather and an index_put, with no
    host round trip; rows are recycled, and the buffer doubles when it runs out.
    """

    def __init__(self, vocab_size: int, device: str | torch.device):
        self.counts = torch.zeros((0, vocab_size), dtype=torch.float32, device=device)
        self._free: list[int] = []

    def acquire(self) -> int:
        if not self._free:
            old = self.counts.shape[0]
            new = max(4, 2 * old)
            grown = self.counts.new_zeros((new, self.counts.shape[1]))
            grown[:old] = self.counts
            self.counts = grown
            self._free.extend(range(new - 1, old - 1, -1))
        row = self._free.pop()
        self.counts[row].zero_()
        return row

    def release(self, row: int) -> None:
        self._free.append(row)
