"""The typed messages that cross layers: api -> engine -> runner -> engine -> api.

Each is a frozen dataclass. Token ids are tuples so a message can never be changed by
the side that received it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from textmill.sampling_params import FinishReason, SamplingParams


# ---------------------------------------------------------------- api -> engine
@dataclass(frozen=True)
class EngineRequest:
    """One sequence to generate: one prompt, one choice (the API fans out n and best_of)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = 0.0


# ---------------------------------------------------------------- logprobs
@dataclass(frozen=True)
class TokenLogprob:
    """The model's own log-softmax at one position (before bias, penalties, temperature)."""

    token_id: int
    logprob: float
    # The k most likely tokens at this position, best first, as (token id, logprob).
    top: tuple[tuple[int, float], ...] = ()
    # 1 + how many tokens the model found more likely (vLLM's rank); set for prompt tokens.
    rank: int | None = None


# ---------------------------------------------------------------- engine -> runner
@dataclass(frozen=True)
class NewRequestData:
    """Sent once, the first time a request is scheduled: what the runner keeps per request."""

    request_id: str
    params: SamplingParams
    # Only what the sampler needs from the prompt (repetition_penalty counts prompt tokens).
    prompt_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScheduledChunk:
    """The tokens of one request that this step computes: positions [start, start + len)."""

    request_id: str
    token_ids: tuple[int, ...]
    start: int  # position of token_ids[0] == the request's num_computed_tokens
    # The blocks added to the request's table since it was last scheduled (all of them the
    # first time, and the first time after a preemption): the runner keeps each table
    # (runner/block_tables.py), so a step sends what changed, not the context's length.
    # With them the table covers start + len(token_ids) tokens.
    new_block_ids: tuple[int, ...]
    # True when this chunk reaches the end of the request's tokens: sample the next one.
    sample: bool
    # For prompt scoring (echo + logprobs): the token that follows each position of this
    # chunk, as far as it is known. len == len(token_ids), or one less when the chunk ends
    # the prompt (that last position is sampled instead). None when not scoring.
    prompt_logprob_targets: tuple[int, ...] | None = None
    # Where new_block_ids start in the request's table: how many of its blocks the runner
    # was sent before (0 the first time and after a preemption, when the table starts over).
    block_offset: int = 0
    # Guessed tokens (engine/ngram_draft.py): the last len(draft) of token_ids. The runner
    # samples after every one of the last len(draft) + 1 positions and keeps the guesses up
    # to the first that the sampled token contradicts.
    draft: tuple[int, ...] = ()
    # A hybrid's recurrent state (engine/kv_cache/state_snapshots.py): the snapshot a request that
    # starts at a prefix hit resumes from, and the one to keep its state in after this chunk.
    restore_state: int | None = None
    save_state: int | None = None


@dataclass(frozen=True)
class SchedulerOutput:
    new_requests: tuple[NewRequestData, ...]
    chunks: tuple[ScheduledChunk, ...]
    # Requests that left (finished, aborted) since the last step: the runner drops their state.
    finished_request_ids: tuple[str, ...] = ()
    # Requests preempted since the last step: their state stays (they resume later), but the
    # runner must not assume their earlier KV blocks still hold anything.
    preempted_request_ids: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


# ---------------------------------------------------------------- runner -> engine
@dataclass(frozen=True)
class RunnerOutput:
    # request id -> the token sampled after its chunk (only for chunks with sample=True).
    # `top` is filled only when the request asked for logprobs.
    sampled: dict[str, TokenLogprob] = field(default_factory=dict)
    # request id -> logprobs of prompt_logprob_targets for this chunk, in order.
    prompt_logprobs: dict[str, tuple[TokenLogprob, ...]] = field(default_factory=dict)
    # request id -> the chunk's guessed tokens that sampling confirmed, in order, each with
    # its position's logprobs; `sampled` is the token after the last of them.
    accepted: dict[str, tuple[TokenLogprob, ...]] = field(default_factory=dict)


# ---------------------------------------------------------------- engine -> api
@dataclass(frozen=True)
class RequestOutput:
    """What one step released for one request. Text and tokens are deltas.

    Tokens and text are released together: a token whose text is held back (a possible
    stop-string start, an incomplete UTF-8 character) is released with that text later.
    When a stop string ends the request, tokens whose text begins at or after the stop are
    dropped, and the last kept token's text may be cut.
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    # Character offset of each released token in the request's whole generated text.
    text_offsets: tuple[int, ...]
    # Aligned with token_ids when params.logprobs is not None, else None.
    logprobs: tuple[TokenLogprob, ...] | None
    finished: bool
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_output_tokens: int = 0  # all generated tokens so far, released or not (usage)
    cumulative_logprob: float = 0.0  # sum of the model logprobs of generated tokens (best_of)
    # Sent once, on the first output, when params.prompt_logprobs is set: one entry per
    # prompt token, the first None (nothing precedes it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    error: str | None = None  # set with finish_reason ERROR
