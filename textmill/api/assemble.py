"""Engine outputs -> OpenAI choices: echo, the legacy logprobs object, best_of ranking, usage.

One ChoiceState per candidate turns each RequestOutput into a delta (text plus logprobs
entries); the non-streaming route concatenates the deltas, the streaming route sends them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from textmill.api.prepare import PreparedCompletion, PromptInput
from textmill.api.serving import TextTokenizer
from textmill.messages import RequestOutput, TokenLogprob


@dataclass
class LogprobsDelta:
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def extend(self, other: "LogprobsDelta") -> None:
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


@dataclass
class ChoiceState:
    """Everything one candidate has produced so far."""

    prompt: PromptInput
    echo: bool
    logprobs: int | None
    tokenizer: TextTokenizer
    # The choice's text as the deltas came: joined once, when read (`text`), because adding
    # each delta to one string copies the whole text so far, per token.
    pieces: list[str] = field(default_factory=list)
    lp: LogprobsDelta | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    cumulative_logprob: float = 0.0
    started: bool = False
    error: str | None = None
    # vLLM's return_token_ids: the released token ids, for the choice's token_ids.
    return_token_ids: bool = False
    token_ids: list[int] = field(default_factory=list)
    # vLLM's prompt_logprobs (k alternatives): the entries, made from the first output.
    prompt_logprobs_k: int | None = None
    prompt_lp: list[dict | None] | None = None

    def apply(self, out: RequestOutput) -> tuple[str, LogprobsDelta | None]:
        """Fold one output in; return the text and logprobs it adds to the choice."""
        text, lp = "", (LogprobsDelta() if self.logprobs is not None else None)
        if not self.started:
            self.started = True
            if self.prompt_logprobs_k is not None:
                self.prompt_lp = vllm_prompt_logprobs(out.prompt_logprobs, self.prompt_logprobs_k, self.tokenizer)
            if self.echo:
                text = self.prompt.text
                if lp is not None:
                    lp.extend(self._prompt_logprobs(out.prompt_logprobs))
        base = len(self.prompt.text)  # generated text starts after the prompt, echoed or not
        text += out.text
        if lp is not None and out.logprobs is not None:
            for token_id, offset, entry in zip(out.token_ids, out.text_offsets, out.logprobs):
                self._add_entry(lp, token_id, base + offset, entry)
        if text:
            self.pieces.append(text)
        if lp is not None:
            self.lp = lp if self.lp is None else (self.lp.extend(lp) or self.lp)
        if self.return_token_ids:
            self.token_ids += out.token_ids
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.cumulative_logprob = out.cumulative_logprob
        if out.finished:
            self.finish_reason = _finish_reason(out)
            self.error = out.error
        return text, lp

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    @property
    def mean_logprob(self) -> float:
        return self.cumulative_logprob / max(self.num_output_tokens, 1)

    def _prompt_logprobs(self, entries: tuple[TokenLogprob | None, ...] | None) -> LogprobsDelta:
        ids = self.prompt.token_ids
        offsets = prompt_offsets(self.prompt, self.tokenizer)
        lp = LogprobsDelta()
        for i, token_id in enumerate(ids):
            entry = entries[i] if entries is not None and i < len(entries) else None
            if entry is None:
                lp.tokens.append(self.tokenizer.token_text(token_id))
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                lp.text_offset.append(offsets[i])
            else:
                self._add_entry(lp, token_id, offsets[i], entry)
        return lp

    def _add_entry(self, lp: LogprobsDelta, token_id: int, offset: int, entry: TokenLogprob) -> None:
        lp.tokens.append(self.tokenizer.token_text(token_id))
        lp.token_logprobs.append(entry.logprob)
        lp.top_logprobs.append(top_dict(entry, self.logprobs or 0, self.tokenizer))
        lp.text_offset.append(offset)


def top_dict(entry: TokenLogprob, k: int, tok: TextTokenizer) -> dict[str, float]:
    """Up to k alternatives plus the chosen token, keyed by text; equal texts keep the higher."""
    out: dict[str, float] = {}
    for token_id, logprob in (*entry.top[:k], (entry.token_id, entry.logprob)):
        key = tok.token_text(token_id)
        if key not in out or logprob > out[key]:
            out[key] = logprob
    return out


def prompt_offsets(prompt: PromptInput, tok: TextTokenizer) -> list[int]:
    """Character offset of each prompt token within prompt.text."""
    ids = list(prompt.token_ids)
    lead = 0
    # A BOS that encode() added stands before the text: it takes no characters.
    if prompt.from_text and ids and tok.add_bos and ids[0] == tok.bos_token_id:
        lead = 1
    _, offsets = tok.decode_with_offsets(ids[lead:])
    limit = len(prompt.text)
    return [0] * lead + [min(o, limit) for o in offsets]


def _finish_reason(out: RequestOutput) -> str | None:
    reason = out.finish_reason.value if out.finish_reason is not None else None
    return reason if reason in ("stop", "length") else None


def choice_states(prepared: PreparedCompletion, requests, tokenizer: TextTokenizer) -> dict[tuple[int, int], ChoiceState]:
    """One state per (prompt, candidate) of the fanned-out requests."""
    return {(p, c): ChoiceState(prepared.prompts[p], prepared.echo, prepared.logprobs, tokenizer,
                                return_token_ids=prepared.return_token_ids,
                                prompt_logprobs_k=prepared.prompt_logprobs)
            for p, c, _ in requests}


def choice_dict(index: int, state: ChoiceState) -> dict:
    out = {
        "text": state.text,
        "index": index,
        "logprobs": state.lp.as_dict() if state.lp is not None else None,
        "finish_reason": state.finish_reason,
    }
    if state.return_token_ids:  # vLLM's names and places
        out["prompt_token_ids"] = list(state.prompt.token_ids)
        out["token_ids"] = list(state.token_ids)
    if state.prompt_logprobs_k is not None:
        out["prompt_logprobs"] = state.prompt_lp
    return out


def vllm_prompt_logprobs(entries, k: int, tok: TextTokenizer) -> list[dict | None] | None:
    """vLLM's shape: per prompt position None (the first) or {token id: {logprob, rank,
    decoded_token}} for the prompt's token and the k most likely ones."""
    if entries is None:
        return None
    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        position = {str(t): {"logprob": lp, "rank": j + 1, "decoded_token": tok.token_text(t)}
                    for j, (t, lp) in enumerate(entry.top[:k])}
        position.setdefault(str(entry.token_id), {"logprob": entry.logprob, "rank": entry.rank,
                                                  "decoded_token": tok.token_text(entry.token_id)})
        out.append(position)
    return out


def rank(states: list[ChoiceState], n: int) -> list[ChoiceState]:
    """best_of: the n candidates with the highest mean token logprob, best first."""
    if len(states) == n:
        return states
    return sorted(states, key=lambda s: s.mean_logprob, reverse=True)[:n]


def usage_dict(prepared: PreparedCompletion, states: dict[tuple[int, int], ChoiceState]) -> dict:
    prompt_tokens = sum(len(p.token_ids) for p in prepared.prompts)
    completion = sum(s.num_output_tokens for s in states.values())
    cached = sum(states[(p, 0)].num_cached_tokens for p in range(len(prepared.prompts)) if (p, 0) in states)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
