"""OutputProcessor: new token ids -> text deltas, stop strings, released RequestOutputs.

Per request it keeps a `TextState` in `request.output_state`: the incremental decoder,
the tail of the generated text that is still needed, and for each text-bearing token where
its text starts and ends (offsets into the whole text). Only the tail is kept because
appending to, searching or slicing the whole text would make each token cost as much as
the text so far (quadratic in the output length); what stop matching and release need is
the unreleased text plus the last `max(len(stop)) - 1` characters before it.
Release follows the RequestOutput docstring:

- A token is released together with its text, never before it. A token whose bytes do
  not yet make a whole character (push returned "") has no end yet; it gets the end of the
  text that the next characters complete, and waits until then.
- While running, text is released up to `safe_end` (stop_matcher: everything but the
  longest tail that could still start a stop), snapped back to the end of the last token
  that fits, so that each output's text is exactly the text of its tokens.
- At a stop string the text is cut before it, tokens whose text starts at or after the
  cut are dropped, and the request finishes with STOP (the scheduler is told to free it).
- On any finish the decoder is flushed and everything left is released.

The token that ended a request as EOS (or a stop token id) never becomes text, token id or
logprob; it is still counted in num_output_tokens, as all generated tokens are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from textmill.engine.request import Request, RequestStatus
from textmill.engine.stop_matcher import find_stop, safe_end
from textmill.messages import RequestOutput, TokenLogprob
from textmill.sampling_params import FinishReason


class IncrementalDecoder(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class DecodingTokenizer(Protocol):
    eos_token_ids: frozenset[int]

    def decoder(self) -> IncrementalDecoder: ...


@dataclass(eq=False)
class TextState:
    decoder: IncrementalDecoder
    # Characters of already searched text that a stop string may still straddle.
    overlap: int
    # The generated text from offset `dropped` on; text[:dropped] is released and can no
    # longer be part of a stop (see trim). Offsets everywhere else are into the whole text.
    tail: str = ""
    dropped: int = 0
    # Text-bearing tokens (the ending EOS excluded), in order.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # char offset where each token's text starts
    ends: list[int] = field(default_factory=list)  # known ends; len(ends) <= len(token_ids)
    num_seen: int = 0  # how many of request.output_token_ids were consumed
    released_chars: int = 0
    released_tokens: int = 0
    prompt_logprobs_sent: bool = False
    prompt_counted: bool = False
    done: bool = False  # the final output was produced

    @property
    def length(self) -> int:
        """Characters of generated text so far."""
        return self.dropped + len(self.tail)

    def text(self, start: int, end: int) -> str:
        assert start >= self.dropped, "text before the tail was dropped"
        return self.tail[start - self.dropped : end - self.dropped]

    def push(self, token_id: int, logprob: TokenLogprob | None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        self.starts.append(self.length)
        self._append(self.decoder.push(token_id))

    def flush(self) -> None:
        self._append(self.decoder.flush())
        # Whatever still has no end (tokens decoding to nothing) ends where the text does.
        self.ends.extend([self.length] * (len(self.token_ids) - len(self.ends)))

    def trim(self) -> None:
        """Drop the text that neither release (it is released) nor the next stop search
        (it lies more than `overlap` characters before the end) can need again."""
        keep_from = min(self.released_chars, self.length - self.overlap)
        if keep_from > self.dropped:
            self.tail = self.tail[keep_from - self.dropped :]
            self.dropped = keep_from

    def _append(self, piece: str) -> None:
        if piece:
            self.tail += piece  # the tail is short: released text was trimmed off
            # This piece completes every token still waiting for its end.
            self.ends.extend([self.length] * (len(self.token_ids) - len(self.ends)))


@dataclass(frozen=True)
class _Release:
    text_end: int
    token_end: int


class OutputProcessor:
    """Turns the requests that a step updated into RequestOutput deltas."""

    def __init__(self, tokenizer: DecodingTokenizer):
        self._tokenizer = tokenizer
        self.total_prompt_tokens = 0  # prompts fully computed (for metrics)
        self.total_generated_tokens = 0

    def process(
        self, requests: list[Request], finish_request: Callable[[str], None]
    ) -> list[RequestOutput]:
        """One output per request that has something new. `finish_request(request_id)` is
        called for each request that a stop string ended (the scheduler then frees it)."""
        outputs = []
        for request in requests:
            output = self._process_one(request, finish_request)
            if output is not None:
                outputs.append(output)
        return outputs

    def finish(self, request: Request) -> RequestOutput:
        """The final output of a request that ended outside a step (abort, engine error).
        The caller has set request.status FINISHED and its finish_reason (and error)."""
        assert request.is_finished and request.finish_reason is not None
        output = self._process_one(request, lambda _: None)
        if output is None:  # the final output was already sent
            return self._make_output(request, self._state(request), "", 0, None)
        return output

    # ------------------------------------------------------------ one request
    def _process_one(
        self, request: Request, finish_request: Callable[[str], None]
    ) -> RequestOutput | None:
        st = self._state(request)
        if st.done:
            return None
        stop_at = self._push_until_stop(request, st)
        if stop_at is not None:
            assert stop_at >= st.released_chars, "released text past a stop"
            if not request.is_finished:
                finish_request(request.request_id)
                request.status = RequestStatus.FINISHED
            # A stop string explains the end of the text, whatever else ended the request.
            request.finish_reason = FinishReason.STOP
        release = self._release_point(request, st, stop_at)
        prompt_logprobs = self._take_prompt_logprobs(request, st)
        text = st.text(st.released_chars, release.text_end)
        if not (text or release.token_end > st.released_tokens or prompt_logprobs or request.is_finished):
            return None
        output = self._make_output(request, st, text, release.token_end, prompt_logprobs)
        st.released_chars = release.text_end
        st.released_tokens = release.token_end
        st.done = request.is_finished
        st.trim()
        return output

    def _state(self, request: Request) -> TextState:
        if request.output_state is None:
            overlap = max((len(s) for s in request.params.stop), default=1) - 1
            request.output_state = TextState(self._tokenizer.decoder(), overlap)
        return request.output_state

    @staticmethod
    def _find_stop(request: Request, st: TextState, new_start: int) -> int | None:
        """Where the first stop string in the new text begins (an offset into the whole text)."""
        if not request.params.stop:
            return None
        match = find_stop(st.tail, request.params.stop, new_start - st.dropped)
        return None if match is None else match.start + st.dropped

    def _push_new_tokens(self, request: Request, st: TextState, end: int) -> None:
        """Push the generated tokens before `end` not pushed yet."""
        want_logprobs = request.params.logprobs is not None
        for i in range(st.num_seen, end):
            if not self._is_ending_token(request, i):
                st.push(request.output_token_ids[i], request.output_logprobs[i] if want_logprobs else None)
        self.total_generated_tokens += end - st.num_seen
        st.num_seen = end

    def _push_until_stop(self, request: Request, st: TextState) -> int | None:
        """Push the new tokens; where the first stop string in the new text begins, if any.
        Several new tokens (a step's confirmed guesses, engine/ngram_draft.py) with stop
        strings go one by one, as one-token steps would have, so the stop found is the one
        that ends first, and the tokens after it are cut from the request: one-token steps
        would never have generated them."""
        total = len(request.output_token_ids)
        one_by_one = request.params.stop and total - st.num_seen > 1
        for end in range(st.num_seen + 1, total + 1) if one_by_one else (total,):
            new_start = st.length
            self._push_new_tokens(request, st, end)
            if end == total and request.is_finished:
                st.flush()
            stop_at = self._find_stop(request, st, new_start)
            if stop_at is not None:
                if end < total:
                    request.truncate_output(end)
                return stop_at
        return None

    def _is_ending_token(self, request: Request, index: int) -> bool:
        """True for the EOS or stop token id that ended the request: it is not text."""
        if not (request.is_finished and request.finish_reason is FinishReason.STOP):
            return False
        if index != len(request.output_token_ids) - 1:
            return False
        # stop_token_ids is the one list of ending ids (the API leaves EOS out for ignore_eos).
        return request.output_token_ids[index] in request.params.stop_token_ids

    def _release_point(self, request: Request, st: TextState, stop_at: int | None) -> _Release:
        if stop_at is not None:
            # Keep the tokens whose text starts before the stop; cut the text at it.
            kept = st.released_tokens
            while kept < len(st.token_ids) and st.starts[kept] < stop_at:
                kept += 1
            return _Release(stop_at, kept)
        if request.is_finished:
            return _Release(st.length, len(st.token_ids))
        limit = st.dropped + safe_end(st.tail, request.params.stop, st.released_chars - st.dropped)
        end_tok = st.released_tokens
        while end_tok < len(st.ends) and st.ends[end_tok] <= limit:
            end_tok += 1
        text_end = st.ends[end_tok - 1] if end_tok > st.released_tokens else st.released_chars
        return _Release(text_end, end_tok)

    def _take_prompt_logprobs(
        self, request: Request, st: TextState
    ) -> tuple[TokenLogprob | None, ...] | None:
        prompt_len = request.num_prompt_tokens
        computed = request.num_computed_tokens >= prompt_len or bool(request.output_token_ids)
        if not st.prompt_counted and computed:
            st.prompt_counted = True
            self.total_prompt_tokens += prompt_len
        if request.params.prompt_logprobs is None or st.prompt_logprobs_sent:
            return None
        # Entry i of request.prompt_logprobs scores prompt token i + 1.
        if not computed or len(request.prompt_logprobs) < prompt_len - 1:
            return None
        st.prompt_logprobs_sent = True
        return (None, *request.prompt_logprobs[: prompt_len - 1])

    def _make_output(
        self,
        request: Request,
        st: TextState,
        text: str,
        token_end: int,
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None,
    ) -> RequestOutput:
        first = st.released_tokens
        logprobs = None
        if request.params.logprobs is not None:
            logprobs = tuple(st.logprobs[first:token_end])
        return RequestOutput(
            request_id=request.request_id,
            text=text,
            token_ids=tuple(st.token_ids[first:token_end]),
            text_offsets=tuple(st.starts[first:token_end]),
            logprobs=logprobs,
            finished=request.is_finished,
            finish_reason=request.finish_reason if request.is_finished else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=request.num_output_tokens,
            cumulative_logprob=request.cumulative_logprob,
            prompt_logprobs=prompt_logprobs,
            error=request.error,
        )
