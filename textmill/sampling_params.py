"""SamplingParams: what one engine request asks of the sampler and the output processor.

Validation happens here as well as at the HTTP edge, so the engine can be used directly
(tests, the `generate` command) and still never sees an impossible value.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from textmill.structured import StructuredOutput


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # the client went away; never shown to a client
    ERROR = "error"  # the engine failed this request


class InvalidParam(ValueError):
    """A value that cannot be honoured; `param` names the OpenAI field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


MAX_LOGPROBS = 5
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs, sorted by id; a tuple keeps the dataclass hashable and frozen.
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    # Token ids that end generation (the model's EOS unless the client asked ignore_eos, plus
    # the client's own stop_token_ids); the token that ends a request is never text.
    stop_token_ids: tuple[int, ...] = ()
    # Top alternatives per generated token (0..5); None means no logprobs at all.
    logprobs: int | None = None
    # Top alternatives per prompt token (echo with logprobs); None means none are computed.
    prompt_logprobs: int | None = None
    # Resolved seed for this request's own torch.Generator (the API draws one when absent).
    seed: int = 0
    # vLLM's extras, off by default.
    top_k: int | None = None  # keep the k most likely tokens; None keeps all
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top probability
    repetition_penalty: float = 1.0  # HF/vLLM: over prompt and generated tokens; 1 is off
    min_tokens: int = 0  # stop_token_ids (EOS included) are banned until this many are generated
    # A grammar the generated text must follow (JSON schema, regex, choice, GBNF/Lark); the
    # runner masks every token it does not allow, and allows EOS exactly when it can end.
    structured: StructuredOutput | None = None
    # vLLM's allowed_token_ids: every other token is -inf (EOS too, unless listed). None: off.
    allowed_token_ids: tuple[int, ...] | None = None
    # vLLM's bad_words as token sequences: a one-token word is always banned; a longer one's
    # last token is banned right after the request has generated the others.
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # best_of > n: the API ranks the candidates by their mean token logprob, so each chosen
    # token's logprob is computed even without `logprobs`. Otherwise a step computes the
    # vocabulary-wide log_softmax only for the rows that asked for logprobs.
    rank_by_logprob: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise InvalidParam("max_tokens", "max_tokens must be at least 0")
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise InvalidParam("logit_bias", f"logit_bias key {token_id} is not a token id")
            _check_range("logit_bias", bias, -100.0, 100.0)
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidParam("stop_token_ids", "stop_token_ids must be token ids (0 or more)")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidParam("top_k", "top_k must be at least 1 (or -1/0/null to disable)")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise InvalidParam("repetition_penalty", "repetition_penalty must be greater than 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidParam("min_tokens", "min_tokens must be between 0 and max_tokens")
        if self.structured is not None and self.min_tokens > 0:
            # Once the grammar is complete only EOS is allowed, and min_tokens would ban it:
            # no token would be left to sample.
            raise InvalidParam("min_tokens", "min_tokens cannot be combined with a structured output constraint")
        if self.allowed_token_ids is not None and (not self.allowed_token_ids or min(self.allowed_token_ids) < 0):
            raise InvalidParam("allowed_token_ids", "allowed_token_ids must list token ids (at least one)")
        if any(not word or min(word) < 0 for word in self.bad_words_token_ids):
            raise InvalidParam("bad_words", "bad_words must be non-empty token sequences")
        if self.structured is not None and (self.allowed_token_ids is not None or self.bad_words_token_ids):
            # Both remove tokens the grammar may need next: a step could be left with none.
            param = "allowed_token_ids" if self.allowed_token_ids is not None else "bad_words"
            raise InvalidParam(param, f"{param} cannot be combined with a structured output constraint")
        if any(s == "" for s in self.stop):
            raise InvalidParam("stop", "stop strings must not be empty")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise InvalidParam("logprobs", f"logprobs must be between 0 and {MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows float32 and softmax turns to NaN;
        # such temperatures mean greedy anyway (vLLM draws the line at the same place).
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def draftable(self) -> bool:
        """The next token is a function of its position's logits and the request's next draw
        alone (nothing that counts or constrains by the tokens before it), so guessed tokens
        can be checked in one step (engine/ngram_draft.py) and give what plain decoding gives."""
        return (not self.has_penalties and self.repetition_penalty == 1.0
                and self.min_tokens == 0 and self.structured is None and not self.bad_words_token_ids)


def _check_range(param: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidParam(param, f"{param} must be between {low:g} and {high:g}, got {value!r}")
