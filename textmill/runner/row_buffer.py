"""RowBuffer: one (rows, width) float32 tensor, grown to the most rows asked for and reused.

Whole-vocabulary rows are the large per-step tensors on a CPU: 16 rows of a 262k
vocabulary are 16 MiB, 64 rows 64 MiB. Past glibc's mmap threshold (at most 32 MiB; the
engine's own thread draws on heaps of at most 64 MiB) each fresh one is a new mapping,
unmapped again on free, so every step paid a first-touch page fault per 4 KiB, more than
the arithmetic that filled it. Two owners keep one instead:

* the sampler's whole-row scratch (softmax, log_softmax, tempered probabilities);
* the runner's quantized LM head (runner/qlinear.py reuse_output), whose logits the kernel
  writes in place. Gemma 3's q8 head at 64 rows took 16,417 faults a call from a thread
  other than the main one; in `textmill serve` at 64 streams (Zen 4 VM, 2 vCPUs) its median
  went from 54.8-55.7 ms a decode step to 45.3-46.2, Qwen3's 152k-row Q6_K head from
  45.7-46.0 to 38.0-40.0. At 16 rows glibc came to reuse the memory: level.

A result is a view of the buffer, valid until its owner's next call.
"""
from __future__ import annotations

import torch


class RowBuffer:
    def __init__(self, width: int, device: str | torch.device = "cpu", max_bytes: int | None = None):
        """`max_bytes`: the most the buffer may hold; a request past it gets None (the caller
        allocates as before), so a rare long step (prompt logprobs) leaves nothing resident."""
        self.max_bytes = max_bytes
        self.buffer = torch.empty((0, width), dtype=torch.float32, device=device)

    def rows(self, n: int) -> torch.Tensor | None:
        if self.max_bytes is not None and n * self.buffer.shape[1] * 4 > self.max_bytes:
            return None
        if self.buffer.shape[0] < n:
            self.buffer = self.buffer.new_empty((n, self.buffer.shape[1]))
        return self.buffer[:n]
