"""CompletionRequest -> what the engine runs: tokenized prompts and one EngineRequest per
candidate (prompt x best_of). All semantic validation that needs the model lives here;
type and range checks are pydantic's, in protocol.py.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from textmill.api.constraints import requested_constraint, unsupported
from textmill.api.errors import bad_request
from textmill.api.protocol import CompletionRequest
from textmill.api.serving import TextTokenizer
from textmill.api.unsupported import reject_unsupported
from textmill.messages import EngineRequest
from textmill.sampling_params import InvalidParam, SamplingParams
from textmill.structured import GrammarCompiler, GrammarError, StructuredOutput

MAX_STOP_STRINGS = 4
# Seeds of the n candidates of one prompt are spread by the 64-bit golden ratio, so that
# candidate i's seed does not depend on how many prompts or candidates the request has.
_SEED_STRIDE = 0x9E3779B97F4A7C15
_SEED_MOD = 2**63
_TOKEN_KEY = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_prompts: int = 256
    max_logit_bias: int = 1024
    max_prompt_tokens: int | None = None
    max_n: int = 128
    max_best_of: int = 20


@dataclass(frozen=True)
class PromptInput:
    token_ids: tuple[int, ...]
    text: str  # the prompt as text: the string given, or the token prompt decoded
    from_text: bool  # a string prompt (tokenized here) rather than token ids


@dataclass(frozen=True)
class PreparedCompletion:
    prompts: tuple[PromptInput, ...]
    params: tuple[SamplingParams, ...]  # per candidate index (seeds differ)
    n: int
    best_of: int
    echo: bool
    logprobs: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats
    return_token_ids: bool = False  # vLLM: prompt_token_ids and token_ids in each choice
    prompt_logprobs: int | None = None  # vLLM: top-k per prompt position, with ranks

    def engine_requests(self, request_id: str, now: float) -> list[tuple[int, int, EngineRequest]]:
        """(prompt index, candidate index, request) for every candidate of every prompt."""
        return [
            (p, c, EngineRequest(f"{request_id}-{p}-{c}", prompt.token_ids, self.params[c], now))
            for p, prompt in enumerate(self.prompts)
            for c in range(self.best_of)
        ]


def prepare(req: CompletionRequest, tokenizer: TextTokenizer, limits: Limits,
            grammars: GrammarCompiler | None = None) -> PreparedCompletion:
    """`grammars` compiles a structured-output constraint (None: the server has none). A
    compile may take a while: call prepare off the event loop when the request has one."""
    reject_unsupported(req)
    n = req.n if req.n is not None else 1
    best_of = req.best_of if req.best_of is not None else n
    stream = bool(req.stream)
    _check_counts(n, best_of, stream, req)
    _check_caps(n, req.best_of, limits)
    _check_unicode(req)
    echo = bool(req.echo)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    prompts = _tokenize_prompts(req, tokenizer, limits)
    for prompt in prompts:
        _check_context(len(prompt.token_ids), max_tokens, limits)
    structured = _compiled_constraint(req, grammars)
    base_seed = req.seed if req.seed is not None else secrets.randbits(63)
    try:
        params = tuple(
            _sampling_params(req, tokenizer, limits, max_tokens, echo, (base_seed + i * _SEED_STRIDE) % _SEED_MOD,
                             structured, rank_by_logprob=best_of > n)
            for i in range(best_of)
        )
    except InvalidParam as exc:
        raise bad_request(exc.message, exc.param) from exc
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    return PreparedCompletion(prompts, params, n, best_of, echo, req.logprobs, stream, include_usage,
                              continuous, bool(req.return_token_ids), req.prompt_logprobs)


def _check_counts(n: int, best_of: int, stream: bool, req: CompletionRequest) -> None:
    if best_of < n:
        raise bad_request(f"best_of ({best_of}) must be greater than or equal to n ({n}).", "best_of")
    if stream and best_of > n:
        raise bad_request("best_of cannot be used with stream: the best candidates are only known at the end.", "best_of")
    if req.prompt_logprobs is not None and stream:
        raise bad_request("prompt_logprobs is not available with stream: ask without streaming.", "prompt_logprobs")
    if req.stream_options is not None and not stream:
        raise bad_request("stream_options can only be set when stream is true.", "stream_options")


def _check_caps(n: int, best_of: int | None, limits: Limits) -> None:
    """The server's own caps (flags), below the spec's 128 and 20."""
    if n > limits.max_n:
        raise bad_request(f"n may be at most {limits.max_n} on this server, got {n}.", "n")
    if best_of is not None and best_of > limits.max_best_of:
        raise bad_request(f"best_of may be at most {limits.max_best_of} on this server, got {best_of}.", "best_of")


def _check_unicode(req: CompletionRequest) -> None:
    """JSON may escape lone surrogates ("\\ud800"), which no tokenizer or UTF-8 reply can hold."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt or []
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    fields = [("prompt", p) for p in prompts if isinstance(p, str)]
    fields += [("stop", s) for s in stops] + [("suffix", req.suffix or "")]
    fields += [("bad_words", w) for w in req.bad_words or ()]
    for param, text in fields:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"{param} is not valid Unicode text: it holds a lone surrogate.", param) from None


def _tokenize_prompts(req: CompletionRequest, tok: TextTokenizer, limits: Limits) -> tuple[PromptInput, ...]:
    raw = req.prompt
    if raw is None:
        raw = ""
    if isinstance(raw, list) and not raw:
        raise bad_request("prompt must not be an empty list.", "prompt")
    if isinstance(raw, str):
        items: list = [raw]
    elif isinstance(raw[0], int):
        items = [raw]
    else:
        items = list(raw)
    if len(items) > limits.max_prompts:
        raise bad_request(f"At most {limits.max_prompts} prompts per request, got {len(items)}.", "prompt")
    if req.suffix is not None and tok.fim is None:
        raise bad_request("This model does not support suffix (fill-in-the-middle): its vocabulary has no FIM tokens.", "suffix")
    prompts = tuple(_one_prompt(item, req.suffix, tok, limits) for item in items)
    if req.truncate_prompt_tokens is None:
        return prompts
    return tuple(_truncated(p, req, tok, limits) for p in prompts)


def _truncated(prompt: PromptInput, req: CompletionRequest, tok: Tokenizer, limits: Limits) -> PromptInput:
    """vLLM's truncate_prompt_tokens: keep the last k tokens of each prompt (-1: the context
    window). A cut prompt's text is its kept tokens decoded (what echo shows)."""
    k = limits.max_model_len if req.truncate_prompt_tokens == -1 else req.truncate_prompt_tokens
    if k == 0 or k > limits.max_model_len:
        raise bad_request(f"truncate_prompt_tokens must be -1 or between 1 and the context window "
                          f"({limits.max_model_len}), got {req.truncate_prompt_tokens}.", "truncate_prompt_tokens")
    if req.suffix is not None:
        raise bad_request("truncate_prompt_tokens cannot be combined with suffix: cutting would lose the "
                          "fill-in-the-middle tokens.", "truncate_prompt_tokens")
    if len(prompt.token_ids) <= k:
        return prompt
    ids = prompt.token_ids[-k:]
    return PromptInput(ids, tok.decode(ids), False)


def _one_prompt(item: str | list[int], suffix: str | None, tok: TextTokenizer, limits: Limits) -> PromptInput:
    if isinstance(item, str):
        if suffix is not None:
            ids = _fim_ids(tok, tok.encode(item, add_special_tokens=False), suffix)
        else:
            ids = tok.encode(item)
        # Text prompts too: a tokenizer may know (added) tokens that the model's embedding
        # lacks, and one such id would fail the whole step it is computed in.
        return PromptInput(_in_vocab(_non_empty(ids, tok), limits, "prompt"), item, True)
    if not item:
        raise bad_request("A token prompt must hold at least one token id.", "prompt")
    ids = _in_vocab(item, limits, "prompt")
    if suffix is not None:
        ids = _in_vocab(_fim_ids(tok, item, suffix), limits, "prompt")
    return PromptInput(ids, tok.decode(item), False)


def _in_vocab(ids, limits: Limits, param: str) -> tuple[int, ...]:
    """`ids` as a tuple, or a 400 for the first id the model has no row for."""
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise bad_request(out_of_vocabulary(bad, limits.vocab_size, f"in {param}"), param)
    return tuple(ids)


def out_of_vocabulary(token_id: int, vocab_size: int, where: str) -> str:
    # "out of vocabulary" is vLLM's wording, and clients match on it.
    return f"Token id {token_id} {where} is out of vocabulary (this model's token ids are 0..{vocab_size - 1})."


def _fim_ids(tok: TextTokenizer, prefix_ids, suffix: str) -> tuple[int, ...]:
    # Prefix-suffix-middle order, as the FIM-trained code models expect; the model then
    # writes the middle, which is what the choice's text is.
    fim = tok.fim
    bos = [tok.bos_token_id] if tok.add_bos and tok.bos_token_id is not None else []
    return (*bos, fim.prefix, *prefix_ids, fim.suffix, *tok.encode(suffix, add_special_tokens=False), fim.middle)


def _non_empty(ids: list[int], tok: TextTokenizer) -> tuple[int, ...]:
    """An empty prompt starts a new document, as the spec's default "<|endoftext|>" says:
    the model sees that separator when its vocabulary has it, else its BOS (or EOS)."""
    if ids:
        return tuple(ids)
    separator = tok.encode("<|endoftext|>", add_special_tokens=False)
    if len(separator) == 1:
        return tuple(separator)
    start = tok.bos_token_id if tok.bos_token_id is not None else min(tok.eos_token_ids)
    return (start,)


def _check_context(num_prompt: int, max_tokens: int, limits: Limits) -> None:
    if limits.max_prompt_tokens is not None and num_prompt > limits.max_prompt_tokens:
        raise bad_request(
            f"The prompt has {num_prompt} tokens; this server accepts at most {limits.max_prompt_tokens}.", "prompt")
    if num_prompt + max_tokens > limits.max_model_len:
        raise bad_request(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in your prompt; {max_tokens} for the completion). "
            "Please reduce your prompt or completion length.", "max_tokens")


def _compiled_constraint(req: CompletionRequest, grammars: GrammarCompiler | None) -> StructuredOutput | None:
    """The request's constraint, compiled (the cache keeps it for the runner), or None."""
    found = requested_constraint(req)
    if found is None:
        return None
    structured, param = found
    if grammars is None:
        raise unsupported(param, "Structured outputs are not available on this server.")
    if req.ignore_eos:
        # The grammar ends on EOS: ignoring it would generate past the end of the grammar.
        raise bad_request("ignore_eos cannot be combined with an output constraint.", "ignore_eos")
    if req.min_tokens:
        raise bad_request("min_tokens cannot be combined with an output constraint: once the grammar is "
                          "complete only EOS may follow.", "min_tokens")
    try:
        grammars.compile(structured)
    except GrammarError as exc:
        raise bad_request(f"Invalid {param}: {exc.message}", param) from None
    return structured


def _sampling_params(req: CompletionRequest, tok: TextTokenizer, limits: Limits, max_tokens: int,
                     echo: bool, seed: int, structured: StructuredOutput | None = None,
                     rank_by_logprob: bool = False) -> SamplingParams:
    stops = _stops(req.stop)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=_logit_bias(req.logit_bias, limits),
        stop=stops,
        stop_token_ids=_stop_token_ids(req, tok, limits),
        logprobs=req.logprobs,
        prompt_logprobs=_prompt_k(req, echo),
        seed=seed,
        top_k=min(req.top_k, limits.vocab_size) if req.top_k is not None and req.top_k > 0 else None,
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_tokens=req.min_tokens or 0,
        structured=structured,
        allowed_token_ids=_allowed_token_ids(req, limits),
        bad_words_token_ids=_bad_words(req.bad_words, tok),
        rank_by_logprob=rank_by_logprob,
    )


def _allowed_token_ids(req: CompletionRequest, limits: Limits) -> tuple[int, ...] | None:
    if req.allowed_token_ids is None:
        return None
    if not req.allowed_token_ids:
        raise bad_request("allowed_token_ids must list at least one token id.", "allowed_token_ids")
    return tuple(sorted(set(_in_vocab(req.allowed_token_ids, limits, "allowed_token_ids"))))


MAX_BAD_WORDS = 256


def _bad_words(words: list[str] | None, tok: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """vLLM's rule: each word as written and with a leading space (its mid-text spelling)
    when that is a different first token and as many tokens."""
    if not words:
        return ()
    if len(words) > MAX_BAD_WORDS:
        raise bad_request(f"bad_words may hold at most {MAX_BAD_WORDS} words, got {len(words)}.", "bad_words")
    out: list[tuple[int, ...]] = []
    for word in words:
        if not word.strip():
            raise bad_request("bad_words must not hold empty words.", "bad_words")
        plain = tuple(tok.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tok.encode(" " + word.lstrip(), add_special_tokens=False))
        out.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return tuple(dict.fromkeys(out))


def _prompt_k(req: CompletionRequest, echo: bool) -> int | None:
    """Prompt positions are scored for echo with logprobs and for vLLM's prompt_logprobs."""
    wanted = [k for k in (req.logprobs if echo else None, req.prompt_logprobs) if k is not None]
    return max(wanted) if wanted else None


def _stop_token_ids(req: CompletionRequest, tok: TextTokenizer, limits: Limits) -> tuple[int, ...]:
    """The ids that end a choice: EOS (unless ignore_eos) and the client's stop_token_ids."""
    extra = _in_vocab(req.stop_token_ids or (), limits, "stop_token_ids")
    # The tokenizer's own end ids may lie past the model's rows (a GGUF vocabulary longer
    # than its embedding, an HF generation_config listing extra ids). The model can never
    # sample those, and min_tokens bans every stop id by index: an id past the logits
    # would fail every request of the step.
    eos = () if req.ignore_eos else (t for t in tok.eos_token_ids if 0 <= t < limits.vocab_size)
    return tuple(sorted({*eos, *extra}))


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop may hold at most {MAX_STOP_STRINGS} sequences, got {len(stops)}.", "stop")
    if any(s == "" for s in stops):
        raise bad_request("stop sequences must not be empty strings.", "stop")
    return tuple(dict.fromkeys(stops))


def _logit_bias(bias: dict[str, float] | None, limits: Limits) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    if len(bias) > limits.max_logit_bias:
        raise bad_request(f"logit_bias may hold at most {limits.max_logit_bias} entries.", "logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        # Only plain decimal digits: int() would also take " 5", "+5" and "1_0".
        if not _TOKEN_KEY.fullmatch(key):
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias")
        token_id = int(key)
        if not 0 <= token_id < limits.vocab_size:
            raise bad_request(out_of_vocabulary(token_id, limits.vocab_size, "in logit_bias"), "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise bad_request(f"logit_bias values must be between -100 and 100, got {value!r} for {key}.", "logit_bias")
        out[token_id] = float(value)
    return tuple(sorted(out.items()))


def has_constraint(req: CompletionRequest) -> bool:
    """Whether the request sets any constraint field (its prepare may compile a grammar)."""
    return any(getattr(req, f) is not None for f in (
        "structured_outputs", "response_format", "json_schema", "grammar",
        "guided_json", "guided_regex", "guided_choice", "guided_grammar"))
