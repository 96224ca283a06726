"""Constraints -> llguidance grammars, compiled once per distinct text and kept in an LRU.

One LLGuidanceCompiler per server, shared by the API (which compiles each request's
constraint before anything is queued, off the event loop, so a bad one is a 400) and the
runner (which takes a fresh matcher per sequence from the compiled template: a deep copy,
no second compile). llguidance imports neither torch nor numpy, so this module may be
reached from the API through textmill.structured.GrammarCompiler.

Why llguidance: bench/grammar_engines.py and docs/architecture.md.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict

import llguidance

from textmill.structured import GrammarError, GrammarStats, StructuredOutput
from textmill.tokenizer import Tokenizer

# Larger specs are refused before llguidance sees them: what a client may make the server
# compile is bounded in size here and in work by llguidance's own limits (lexer fuel, grammar
# size, Earley items per step), so a huge or catastrophic grammar is a 400, never a stall.
MAX_SPEC_CHARS = 256 * 1024
MAX_MESSAGE_CHARS = 600
# A grammar whose first token mask takes longer than this is refused: every step of every
# stream it runs beside would wait that long (typical masks take 0.03-0.2 ms; a 5,000-key
# object schema took 540 ms). llguidance's per-step limits bound the later masks.
FIRST_MASK_BUDGET_S = 0.1

# JSON is generated compactly, with one space after "," and ":" and nowhere else: flexible
# whitespace lets a small model pad its output with blank lines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def build_ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary: textmill's token bytes (the same table the text
    is decoded from), special tokens marked so that no grammar allows them as text, and the
    model's EOS ids as the tokens allowed exactly when the grammar can end.

    `vocab_size` is the logits' width; ids past the tokenizer's or the model's rows are special.
    """
    n = max(vocab_size, tokenizer.vocab_size)
    # Ids the model has no logit for (a vocabulary longer than the embedding) are special
    # too: a grammar state must never count on a token that cannot be sampled.
    specials = set(tokenizer.special_token_ids()) | set(range(min(vocab_size, tokenizer.vocab_size), n))
    eos = sorted(t for t in tokenizer.eos_token_ids if t < vocab_size)
    if not eos:
        raise ValueError("structured outputs need an end-of-sequence token, and this vocabulary has none")

    class Vocabulary:  # what llguidance.TokenizerWrapper reads
        eos_token_id = eos[0]
        bos_token_id = tokenizer.bos_token_id
        tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)] + [b""] * (n - tokenizer.vocab_size)
        special_token_ids = sorted(specials)

        def __call__(self, text):
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            return tokenizer.encode(text, add_special_tokens=False)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocabulary()), n_vocab=n, eos_token=eos)


def grammar_text(structured: StructuredOutput) -> str:
    """The llguidance grammar of a constraint; GrammarError for a spec it cannot read."""
    if len(structured.spec) > MAX_SPEC_CHARS:
        raise GrammarError(f"the {structured.kind} is {len(structured.spec)} characters long; this server "
                           f"compiles at most {MAX_SPEC_CHARS}")
    try:
        if structured.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(structured.spec, defaults=JSON_OPTIONS)
        if structured.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(structured.spec)
        if structured.kind == "choice":
            return llguidance.grammar_from("choice", json.loads(structured.spec))
        return llguidance.grammar_from("grammar", structured.spec)  # GBNF or Lark
    except (ValueError, TypeError) as exc:
        raise GrammarError(_short(str(exc))) from None


class LLGuidanceCompiler:
    """Implements textmill.structured.GrammarCompiler; thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256):
        self.vocab_size = vocab_size
        self.mask_width = max(vocab_size, tokenizer.vocab_size)  # bits per row of a bitmask
        # llguidance's view of the vocabulary takes 0.17 s (49k tokens) to 1.2 s (262k) to
        # build, all of it holding the GIL: the server answers nothing meanwhile. So it is built
        # by the first constrained request (under this lock: once, however many arrive
        # together), not at startup, where it held /health and every stream behind it for that
        # long on a server that may never see a constraint (docs/performance.md).
        self._tokenizer = tokenizer
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._build_error: Exception | None = None
        self._build_lock = threading.Lock()
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._requests = self._compiles = self._hits = self._failures = 0
        self._seconds = 0.0

    @property
    def vocabulary_built(self) -> bool:
        """Whether llguidance's view of the vocabulary exists yet (a constrained request came)."""
        return self._ll_tokenizer is not None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._build_lock:
            if self._ll_tokenizer is None and self._build_error is None:
                try:
                    self._ll_tokenizer = build_ll_tokenizer(self._tokenizer, self.vocab_size)
                except Exception as exc:  # reported to every constrained request instead
                    self._build_error = exc
        if self._ll_tokenizer is None:
            raise RuntimeError(f"structured outputs are unavailable: {self._build_error}")
        return self._ll_tokenizer

    def compile(self, structured: StructuredOutput) -> None:
        self._template(structured, count=True)
        with self._lock:
            self._requests += 1

    def new_matcher(self, structured: StructuredOutput) -> llguidance.LLMatcher:
        """A matcher at the start of `structured`, for one sequence (the runner's)."""
        return self._template(structured).deep_copy()

    def stats(self) -> GrammarStats:
        with self._lock:
            return GrammarStats(self._requests, self._compiles, self._hits, self._seconds, self._failures)

    def _template(self, structured: StructuredOutput, count: bool = False) -> llguidance.LLMatcher:
        """`count`: a request's compile (the runner's copies are no cache hits of their own)."""
        with self._lock:
            template = self._cache.get(structured)
            if template is not None:
                self._cache.move_to_end(structured)
                self._hits += count
                return template
        start = time.perf_counter()
        try:
            template = self._build(structured)
        except GrammarError:
            with self._lock:
                self._failures += 1
            raise
        seconds = time.perf_counter() - start
        with self._lock:  # two threads may have compiled the same text: either copy serves
            self._compiles += 1
            self._seconds += seconds
            self._cache[structured] = template
            self._cache.move_to_end(structured)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template

    def _build(self, structured: StructuredOutput) -> llguidance.LLMatcher:
        grammar = grammar_text(structured)
        try:
            ll_tokenizer = self.ll_tokenizer
        except RuntimeError as exc:
            raise GrammarError(str(exc)) from None
        # The constructor builds the lexer (llguidance drops the GIL meanwhile) and reports
        # grammar errors through is_error(), never by raising.
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        # The first mask, here rather than in the engine's first step: it finds the grammars
        # llguidance only refuses when asked for a mask (a 20,000-way alternative) and the ones
        # too slow to run beside other streams, and it warms the lexer the copies share.
        start = time.perf_counter()
        matcher.compute_bitmask()
        seconds = time.perf_counter() - start
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        if seconds > FIRST_MASK_BUDGET_S:
            raise GrammarError(f"the grammar is too complex for this server: its first token mask took "
                               f"{seconds * 1e3:.0f} ms (at most {FIRST_MASK_BUDGET_S * 1e3:.0f} ms)")
        return matcher


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
