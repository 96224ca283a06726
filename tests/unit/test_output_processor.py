"""OutputProcessor: incremental text, stop strings, hold-back, offsets and logprobs alignment.

The tokenizer here is real-ish: tokens are byte strings and the decoder is the stdlib
incremental UTF-8 decoder, so a character can be split across tokens as in a BPE vocab.
"""
from __future__ import annotations

import codecs
import random

import pytest

from textmill.engine.output_processor import OutputProcessor
from textmill.engine.request import Request, RequestStatus
from textmill.messages import RequestOutput, TokenLogprob
from textmill.sampling_params import FinishReason, SamplingParams

EOS = 0


class ByteDecoder:
    def __init__(self, vocab: dict[int, bytes]):
        self._vocab = vocab
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._vocab[token_id])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteTokenizer:
    """Token id -> bytes. New pieces get ids on first use; id 0 is EOS."""

    def __init__(self):
        self.vocab: dict[int, bytes] = {EOS: b"</s>"}
        self._ids: dict[bytes, int] = {}
        self.eos_token_ids = frozenset({EOS})

    def id(self, piece: bytes | str) -> int:
        piece = piece.encode() if isinstance(piece, str) else piece
        if piece not in self._ids:
            self._ids[piece] = len(self.vocab)
            self.vocab[self._ids[piece]] = piece
        return self._ids[piece]

    def decoder(self) -> ByteDecoder:
        return ByteDecoder(self.vocab)


class Harness:
    """Plays the scheduler's part: appends sampled tokens and finishes on length / EOS."""

    def __init__(self, **params):
        self.tok = ByteTokenizer()
        self.proc = OutputProcessor(self.tok)
        self.finished_by_processor: list[str] = []
        self.request = Request("r", (5, 6, 7), SamplingParams(**{"stop_token_ids": (EOS,), **params}))

    def step(self, piece: bytes | str | int, logprob: float = -0.5) -> list[RequestOutput]:
        req = self.request
        token_id = piece if isinstance(piece, int) else self.tok.id(piece)
        req.num_computed_tokens = req.num_tokens
        req.output_token_ids.append(token_id)
        req.output_logprobs.append(TokenLogprob(token_id, logprob, ((token_id, logprob),)))
        req.cumulative_logprob += logprob
        if token_id in req.params.stop_token_ids:
            self._finish(FinishReason.STOP)
        elif req.num_output_tokens >= req.params.max_tokens:
            self._finish(FinishReason.LENGTH)
        return self.proc.process([req], self.finished_by_processor.append)

    def _finish(self, reason: FinishReason) -> None:
        self.request.status = RequestStatus.FINISHED
        self.request.finish_reason = reason

    def run(self, pieces) -> list[RequestOutput]:
        outputs = []
        for piece in pieces:
            outputs += self.step(piece)
            if self.request.is_finished:
                break
        return outputs


def joined(outputs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outputs)


def test_plain_streaming_deltas_and_offsets():
    h = Harness(max_tokens=3)
    outs = h.run(["Hel", "lo", " world"])
    assert [o.text for o in outs] == ["Hel", "lo", " world"]
    assert [o.text_offsets for o in outs] == [(0,), (3,), (5,)]
    assert [o.token_ids for o in outs] == [(h.tok.id("Hel"),), (h.tok.id("lo"),), (h.tok.id(" world"),)]
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert [o.num_output_tokens for o in outs] == [1, 2, 3]
    assert all(o.logprobs is None and o.num_prompt_tokens == 3 for o in outs)
    assert outs[-1].cumulative_logprob == pytest.approx(-1.5)


def test_emoji_split_across_tokens_is_released_whole_with_both_tokens():
    emoji = "😀".encode()  # 4 bytes
    h = Harness(max_tokens=4, logprobs=0)
    a, b = h.tok.id(emoji[:2]), h.tok.id(emoji[2:])
    outs = [h.step("x")]
    assert h.step(emoji[:2]) == []  # half a character: nothing to release, no output
    outs.append(h.step(emoji[2:]))
    outs.append(h.step("!"))
    first, second, third = (o[0] for o in outs)
    assert second.text == "😀" and second.token_ids == (a, b)
    # Both tokens begin where the character does; logprobs stay aligned with tokens.
    assert second.text_offsets == (1, 1)
    assert [lp.token_id for lp in second.logprobs] == [a, b]
    assert third.text == "!" and third.text_offsets == (2,) and third.finished


def test_incomplete_character_at_finish_is_flushed_as_replacement():
    h = Harness(max_tokens=2)
    outs = h.run(["ok", "é".encode()[:1]])
    assert joined(outs) == "ok\ufffd"
    assert outs[-1].finished and outs[-1].token_ids == (h.tok.id("é".encode()[:1]),)


def test_stop_inside_a_token_cuts_text_and_keeps_that_token():
    h = Harness(max_tokens=10, stop=(" w",), logprobs=1)
    outs = h.run(["Hel", "lo wor", "ld"])
    assert joined(outs) == "Hello"
    last = outs[-1]
    assert last.text == "lo" and last.token_ids == (h.tok.id("lo wor"),)
    assert last.finished and last.finish_reason is FinishReason.STOP
    assert len(last.logprobs) == 1 and last.logprobs[0].token_id == h.tok.id("lo wor")
    assert h.finished_by_processor == ["r"]
    assert h.request.is_finished and h.request.num_output_tokens == 2


def test_stop_straddling_tokens_holds_back_then_drops_the_stop_tokens():
    h = Harness(max_tokens=10, stop=("STOP",))
    outs = [h.step("a"), h.step(" S"), h.step("TO"), h.step("P"), ]
    assert [len(o) for o in outs] == [1, 0, 0, 1]
    assert outs[0][0].text == "a"
    final = outs[3][0]
    # " S" starts before the stop, so it is kept with its text cut; "TO" and "P" are dropped.
    assert final.text == " " and final.token_ids == (h.tok.id(" S"),) and final.text_offsets == (1,)
    assert final.finished and final.finish_reason is FinishReason.STOP
    assert final.num_output_tokens == 4  # usage counts every generated token


def test_held_back_text_is_released_when_it_does_not_become_a_stop():
    h = Harness(max_tokens=10, stop=("\n\nUser:",))
    assert h.step("Hi") and h.step("\n") == [] and h.step("\n") == []
    out = h.step("Bob")
    assert [o.text for o in out] == ["\n\nBob"] and out[0].text_offsets == (2, 3, 4)


def test_finish_by_length_flushes_hold_back():
    h = Harness(max_tokens=2, stop=("XYZ",))
    outs = h.run(["a", "bX"])
    assert joined(outs) == "abX" and outs[-1].finish_reason is FinishReason.LENGTH
    assert outs[-1].token_ids == (h.tok.id("bX"),)


def test_stop_completed_by_the_last_allowed_token_reports_stop():
    h = Harness(max_tokens=2, stop=("ab",))
    outs = h.run(["xa", "b"])
    assert joined(outs) == "x" and outs[-1].finish_reason is FinishReason.STOP


def test_stop_at_the_very_start():
    h = Harness(max_tokens=5, stop=("<|",))
    outs = h.run(["<", "|im_end", "more"])
    assert len(outs) == 1 and outs[0].text == "" and outs[0].token_ids == ()
    assert outs[0].finished and outs[0].finish_reason is FinishReason.STOP


def test_eos_is_counted_but_never_text_token_or_logprob():
    h = Harness(max_tokens=10, logprobs=0)
    outs = h.run(["Hi", EOS])
    assert joined(outs) == "Hi"
    last = outs[-1]
    assert last.finished and last.finish_reason is FinishReason.STOP
    assert last.token_ids == () and last.logprobs == () and last.num_output_tokens == 2


def test_eos_outside_stop_token_ids_is_text():
    # What the API sends for ignore_eos: EOS is left out of stop_token_ids.
    h = Harness(max_tokens=2, stop_token_ids=())
    outs = h.run([EOS, "x"])
    assert joined(outs) == "</s>x" and outs[-1].finish_reason is FinishReason.LENGTH


def test_stop_token_ids_end_without_text():
    h = Harness(max_tokens=10)
    stop_id = h.tok.id("<|end|>")
    h.request = Request("r", (1,), SamplingParams(max_tokens=10, stop_token_ids=(stop_id,)))
    outs = h.step("a")
    h.request.output_token_ids.append(stop_id)
    h.request.status, h.request.finish_reason = RequestStatus.FINISHED, FinishReason.STOP
    outs += h.proc.process([h.request], h.finished_by_processor.append)
    assert joined(outs) == "a" and outs[-1].token_ids == ()


def test_prompt_logprobs_on_the_first_output_only_once_the_prompt_is_computed():
    h = Harness(max_tokens=2, prompt_logprobs=1)
    req = h.request
    req.num_computed_tokens = 2  # a first prefill chunk: nothing to send yet
    req.prompt_logprobs.append(TokenLogprob(6, -1.0))
    assert h.proc.process([req], h.finished_by_processor.append) == []
    req.prompt_logprobs.append(TokenLogprob(7, -2.0))
    outs = h.run(["a", "b"])
    assert outs[0].prompt_logprobs == (None, TokenLogprob(6, -1.0), TokenLogprob(7, -2.0))
    assert outs[1].prompt_logprobs is None


def test_max_tokens_zero_gives_one_final_output_with_prompt_logprobs():
    h = Harness(max_tokens=0, prompt_logprobs=0)
    req = h.request
    req.num_computed_tokens = 3
    req.prompt_logprobs += [TokenLogprob(6, -1.0), TokenLogprob(7, -2.0)]
    req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.LENGTH
    outs = h.proc.process([req], h.finished_by_processor.append)
    assert len(outs) == 1
    out = outs[0]
    assert out.text == "" and out.token_ids == () and out.finished
    assert out.finish_reason is FinishReason.LENGTH and len(out.prompt_logprobs) == 3
    assert h.proc.process([req], h.finished_by_processor.append) == []  # never twice


def test_finish_outside_a_step_releases_held_text():
    h = Harness(max_tokens=10, stop=("STOP",))
    h.run(["a", "ST"])
    req = h.request
    req.status, req.finish_reason, req.error = RequestStatus.FINISHED, FinishReason.ERROR, "boom"
    out = h.proc.finish(req)
    assert out.finished and out.finish_reason is FinishReason.ERROR and out.error == "boom"
    assert out.text == "ST" and out.token_ids == (h.tok.id("ST"),)


@pytest.mark.parametrize("seed", range(30))
def test_any_tokenization_gives_the_same_text(seed: int):
    rng = random.Random(seed)
    full = "Héllo 😀 wörld, the end. 日本語 STOP after".encode()
    cuts = sorted(rng.sample(range(1, len(full)), rng.randint(1, 20)))
    pieces = [full[i:j] for i, j in zip([0, *cuts], [*cuts, len(full)])]
    h = Harness(max_tokens=len(pieces) + 1, stop=("STOP", "end.!"), logprobs=0)
    outs = h.run(pieces)
    assert joined(outs) == "Héllo 😀 wörld, the end. 日本語 "
    assert outs[-1].finish_reason is FinishReason.STOP and h.finished_by_processor == ["r"]
    offsets = [off for o in outs for off in o.text_offsets]
    tokens = [t for o in outs for t in o.token_ids]
    assert offsets == sorted(offsets) and offsets[0] == 0
    # Tokens released in order, each with its logprob, none after the stop begins.
    assert tokens == [lp.token_id for o in outs for lp in o.logprobs]
    assert tokens == [h.tok.id(p) for p in pieces[: len(tokens)]]
    text = joined(outs)
    assert all(off <= len(text) for off in offsets)
    # Text and tokens travel together: before the stop, the text released so far is the
    # text of the tokens released so far (less a trailing incomplete character).
    released_text, released_bytes = "", b""
    for o in outs[:-1]:
        released_text += o.text
        released_bytes += b"".join(h.tok.vocab[t] for t in o.token_ids)
        assert released_text == released_bytes.decode(errors="ignore")


# ---------------------------------------------------------------- cost per token
class _TextLengths:
    """Stands in for the stop matcher's functions and records how much text each call is
    handed: what the processor appends to, searches and slices each token."""

    def __init__(self, monkeypatch):
        import textmill.engine.output_processor as op

        self.lengths: list[int] = []
        real_find, real_safe = op.find_stop, op.safe_end

        def find_stop(text, stops, new_start=0):
            self.lengths.append(len(text))
            return real_find(text, stops, new_start)

        def safe_end(text, stops, released=0):
            self.lengths.append(len(text))
            return real_safe(text, stops, released)

        monkeypatch.setattr(op, "find_stop", find_stop)
        monkeypatch.setattr(op, "safe_end", safe_end)


def _generate(num_tokens: int, **params) -> tuple[Harness, str]:
    h = Harness(max_tokens=num_tokens, **params)
    outs = h.run(["ab", "c", "d ", "éf"] * (num_tokens // 4))
    return h, joined(outs)


@pytest.mark.parametrize("stop", [(), ("zz",), ("\n\nUser:", "q")])
def test_work_per_token_does_not_grow_with_the_output(monkeypatch, stop):
    # Appending each piece to the whole text (text += piece) and handing the whole text to
    # the stop matcher made every token cost as much as the text so far.
    seen = _TextLengths(monkeypatch)
    short, short_text = _generate(40, stop=stop)
    short_max = max(seen.lengths)
    seen.lengths.clear()
    long, long_text = _generate(4000, stop=stop)
    assert long_text == "abcd éf" * 1000 and len(long_text) == 7000
    assert max(seen.lengths) == short_max  # the same text per token at 40 and at 4000 tokens
    assert short_max <= max(map(len, stop), default=0) + len("éf")
    # What a request keeps of its text is its unreleased tail, not the whole output.
    assert len(long.request.output_state.tail) <= max(map(len, stop), default=0)


def test_held_back_text_stays_in_the_tail_until_released():
    h = Harness(max_tokens=100, stop=("STOP",))
    outs = h.run(["x" * 10, "y" * 10, "S", "T", "O"])
    assert joined(outs) == "x" * 10 + "y" * 10
    state = h.request.output_state
    assert state.tail.endswith("STO") and len(state.tail) <= 6  # 3 held back, 3 searched again
    outs = h.run(["P", "never"])
    assert joined(outs) == "" and outs[-1].finish_reason is FinishReason.STOP
