"""The runner's side of structured outputs: one llguidance matcher per constrained sequence,
and the step's allowed-token masks as one batched bitmask applied to the logits at once.

Lifetime of a matcher (the sampler drives it):
  * made when the runner first hears of the request (a copy of the compiled template);
  * advanced by every token the sampler chooses for the request: the runner samples exactly
    the tokens the scheduler appends, so the matcher's state is the request's output;
  * kept across a preemption: recompute rebuilds the KV cache from the prompt and the tokens
    already generated, which stay, so the matcher is still at the right place (nothing to
    roll back or rebuild);
  * released when the request leaves (finished, aborted, failed).

The bitmask is llguidance's (R, ceil(V / 32)) int32 layout, filled row by row for the
constrained rows of a step, then unpacked to (R, V) bools by one index_select into a
256-entry byte table and applied with one masked_fill.

Why row by row and not llguidance's LLExecutor (a thread pool): measured on a shared 2-core
machine, 16 JSON rows at V = 49,152 took 0.13 ms in turn against 0.25 ms through the pool on
an idle core and 12 ms when the cores were busy (its threads wake up and contend with
torch's). Why index_select: an advanced-indexing gather of the same table took 1.2 ms (57 ms
with two busy torch threads) against 0.29 ms.
"""
from __future__ import annotations

import logging
from typing import Sequence

import llguidance
import torch

from textmill.grammar.compiler import LLGuidanceCompiler
from textmill.structured import StructuredOutput


log = logging.getLogger("textmill.grammar")


class GrammarMasks:
    def __init__(self, compiler: LLGuidanceCompiler, vocab_size: int, device: torch.device):
        self._compiler = compiler
        self.vocab_size = vocab_size
        self.device = device
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._words = (compiler.mask_width + 31) // 32
        self._bitmask = torch.empty((0, self._words), dtype=torch.int32)  # CPU: llguidance writes it
        # byte value -> 8 bytes, 1 where its bit is clear (token 8k + j is bit j of byte k, least
        # significant first): the banned tokens, with no separate negation pass.
        bits = torch.arange(8, dtype=torch.int32)
        self._byte_bans = (1 - ((torch.arange(256, dtype=torch.int32)[:, None] >> bits) & 1)).to(torch.uint8).to(device)
        # Reused from step to step: on a CPU, fresh (R, V) tensors each step cost more in page
        # faults than the work done in them. int32 indices: half the bytes of int64.
        self._byte_index = torch.empty(0, dtype=torch.int32, device=device)
        self._bits = torch.empty((0, 8), dtype=torch.uint8, device=device)

    def __len__(self) -> int:
        return len(self._matchers)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def add(self, request_id: str, structured: StructuredOutput) -> None:
        self._matchers[request_id] = self._compiler.new_matcher(structured)

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def apply(self, logits: torch.Tensor, request_ids: Sequence[str]) -> None:
        """Set to -inf, in place, every logit a constrained row's grammar does not allow next."""
        rows = [(i, m) for i, r in enumerate(request_ids) if (m := self._matchers.get(r)) is not None]
        if not rows:
            return
        bitmask = self._rows(len(rows))
        # A matcher that failed (a llguidance limit hit at some state: rare, as compiling
        # tried the first mask) may only end its sequence: EOS alone, never a failed step
        # for the other streams.
        for j, (_, m) in enumerate(rows):
            if m.is_error():
                bitmask[j] = self._eos_only()
            else:
                m.unsafe_compute_mask_ptr(bitmask[j].data_ptr(), self._words * 4)
        banned = self.banned(bitmask.to(self.device, non_blocking=True))
        if len(rows) == logits.shape[0]:  # every row constrained (usual when any is): in place
            logits.masked_fill_(banned, float("-inf"))
        else:
            index = torch.tensor([i for i, _ in rows], dtype=torch.int64, device=logits.device)
            logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(banned, float("-inf")))

    def unpack(self, bitmask: torch.Tensor) -> torch.Tensor:
        """(R, W) int32 bitmask -> (R, vocab_size) bool, True where the token is allowed."""
        return self.banned(bitmask).logical_not()

    def banned(self, bitmask: torch.Tensor) -> torch.Tensor:
        """(R, W) int32 bitmask -> (R, vocab_size) bool, True where the token is not allowed
        (a view of a reused buffer: valid until the next call)."""
        as_bytes = bitmask.view(torch.uint8).reshape(-1)  # little-endian: bit t % 8 of byte t // 8
        n = as_bytes.shape[0]
        if self._byte_index.shape[0] < n:
            self._byte_index = torch.empty(n, dtype=torch.int32, device=self.device)
            self._bits = torch.empty((n, 8), dtype=torch.uint8, device=self.device)
        index = self._byte_index[:n].copy_(as_bytes)
        bits = torch.index_select(self._byte_bans, 0, index, out=self._bits[:n])
        return bits.view(bitmask.shape[0], -1)[:, : self.vocab_size].view(torch.bool)  # 0/1 bytes are bools

    def accept(self, request_ids: Sequence[str], tokens: Sequence[int]) -> None:
        """Advance each constrained row's matcher by the token chosen for it."""
        for request_id, token in zip(request_ids, tokens):
            m = self._matchers.get(request_id)
            if m is not None and not m.consume_token(token) and m.is_error():
                log.warning("request %s: the grammar matcher failed after token %d; the sequence ends: %s",
                            request_id, token, m.get_error()[:300])

    def _eos_only(self) -> torch.Tensor:
        row = torch.zeros(self._words, dtype=torch.int32)
        bits = row.view(torch.uint8)
        for t in self._compiler.ll_tokenizer.eos_tokens:
            bits[t // 8] |= 1 << (t % 8)
        return row

    def _rows(self, n: int) -> torch.Tensor:
        if self._bitmask.shape[0] < n:
            self._bitmask = torch.empty((max(n, 2 * self._bitmask.shape[0]), self._words), dtype=torch.int32)
        return self._bitmask[:n]
