"""Request: the one mutable object per request inside the engine.

The scheduler's whole job is to make num_computed_tokens catch up with num_tokens.
Prefill, chunked prefill, prefix-cache hits, recompute after preemption and decode are
all that one motion.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from textmill.messages import EngineRequest, TokenLogprob
from textmill.sampling_params import FinishReason, SamplingParams

if TYPE_CHECKING:
    from textmill.engine.output_processor import TextState


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # never scheduled, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens that the prefix cache served at first admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_preemptions: int = 0
    cumulative_logprob: float = 0.0
    # The raw logprob of each generated token, cumulative_logprob their sum in order: kept so
    # that truncate_output can cut the output back to what one-token steps would have made.
    output_token_logprobs: list[float] = field(default_factory=list)
    # Logprobs of generated tokens, aligned with output_token_ids (when params.logprobs set).
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Prompt scoring, filled chunk by chunk; entry i is the logprob of prompt token i + 1.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Per-request state of the output processor (incremental detokenizer, stop matcher).
    output_state: "TextState | None" = None

    @classmethod
    def from_engine_request(cls, req: EngineRequest) -> "Request":
        return cls(req.request_id, tuple(req.prompt_token_ids), req.params, req.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, sampled: TokenLogprob, keep_logprobs: bool) -> None:
        self.output_token_ids.append(sampled.token_id)
        self.output_token_logprobs.append(sampled.logprob)
        self.cumulative_logprob += sampled.logprob
        if keep_logprobs:
            self.output_logprobs.append(sampled)

    def truncate_output(self, num_tokens: int) -> None:
        """Keep the first num_tokens generated tokens: a stop string ended the text at the
        last of them, and the guessed tokens a step confirmed after it were never generated
        as far as the client can tell (usage, cumulative_logprob, best_of's ranking)."""
        del self.output_token_ids[num_tokens:]
        del self.output_logprobs[num_tokens:]
        del self.output_token_logprobs[num_tokens:]
        total = 0.0
        for logprob in self.output_token_logprobs:  # the sum append_output made, in its order
            total += logprob
        self.cumulative_logprob = total

    def token_id_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def token_ids_between(self, start: int, end: int) -> tuple[int, ...]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return tuple(self.prompt_token_ids[start:n]) + tuple(
            self.output_token_ids[max(start - n, 0) : end - n]
        ) if start < n else tuple(self.output_token_ids[start - n : end - n])
