"""How often a constrained completion that finishes with `stop` is valid: hundreds of seeded
samples at temperature 1 through the engine (wiring.build_engine, as `textmill serve` builds
it; no HTTP), on the bundled model or --model (e.g. Gemma 3's GGUF).

Constraints: a JSON schema with nested objects, arrays, enums, bounded numbers, required and
optional keys and strings that invite escapes (checked with `jsonschema`), a regex (checked
with `re.fullmatch`), a choice (checked by equality). The goal is 100% valid among `stop`
finishes; `length` finishes are counted apart (each is a valid prefix, not a whole output).
Results: bench/results/structured_validity-<time>.json, stamped with commit and machine.

    .venv/bin/python bench/structured_validity.py [--samples 200] [--model PATH] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stamp import code_stamp, machine_label, machine_stamp  # noqa: E402
from textmill.cli import build_parser, engine_config_from_args  # noqa: E402
from textmill.messages import EngineRequest  # noqa: E402
from textmill.sampling_params import SamplingParams  # noqa: E402
from textmill.structured import StructuredOutput  # noqa: E402
from textmill.wiring import build_engine  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 30, "description": "may quote \"text\" or a path C:\\dir"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
        "genre": {"enum": ["drama", "comedy", "horror", "documentary"]},
        "cast": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 20}, "lead": {"type": "boolean"}},
            "required": ["name"], "additionalProperties": False}, "maxItems": 3},
        "studio": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                    "country": {"type": "string", "pattern": "^[A-Z]{2}$"}},
                   "required": ["name"], "additionalProperties": False},
        "quote": {"type": "string", "maxLength": 40},
    },
    "required": ["title", "year", "genre", "cast"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,8} \d{1,3}(\.\d{1,2})? (kg|lb)"
CHOICES = ["strongly agree", "agree", "neutral", "disagree", "strongly disagree"]
CASES = {  # name -> (constraint, prompt, max_tokens, check)
    "json schema": (StructuredOutput("json", json.dumps(SCHEMA)), 'A film record as JSON, with a "quote":\n', 160,
                    lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
    "regex": (StructuredOutput("regex", REGEX), "Weight of the parcel:", 24,
              lambda text: re.fullmatch(REGEX, text) is not None),
    "choice": (StructuredOutput("choice", json.dumps(CHOICES)), "I think pineapple belongs on pizza. Verdict:", 24,
               lambda text: text in CHOICES),
}


def run_case(built, name: str, samples: int, concurrency: int) -> dict:
    structured, prompt, max_tokens, check = CASES[name]
    engine, tok = built.engine, built.tokenizer
    built.grammars.compile(structured)  # as prepare() does before queuing
    ids = tuple(tok.encode(prompt))
    eos = tuple(sorted(t for t in tok.eos_token_ids if t < built.model_config.vocab_size))
    texts: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    seed = 0
    start = time.perf_counter()
    while seed < samples:
        for _ in range(min(concurrency, samples - seed)):
            rid = f"{name}-{seed}"
            texts[rid] = []
            params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, stop_token_ids=eos,
                                    structured=structured)
            engine.add_request(EngineRequest(rid, ids, params))
            seed += 1
        while engine.has_unfinished:
            for out in engine.step():
                texts[out.request_id].append(out.text)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason.value
    stopped = [("".join(texts[r])) for r, why in reasons.items() if why == "stop"]
    invalid = []
    for text in stopped:
        try:
            ok = check(text)
        except (ValueError, jsonschema.ValidationError):
            ok = False
        if not ok:
            invalid.append(text)
    return {"case": name, "samples": samples, "stop": len(stopped), "valid": len(stopped) - len(invalid),
            "length": sum(1 for why in reasons.values() if why == "length"), "invalid_examples": invalid[:5],
            "examples": stopped[:3], "seconds": time.perf_counter() - start}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--model", default=None)
    args = p.parse_args()
    ns = build_parser().parse_args(["serve", "--max-num-seqs", str(args.concurrency),
                                    *([args.model] if args.model else [])])
    built = build_engine(engine_config_from_args(ns))
    rows = [run_case(built, name, args.samples, args.concurrency) for name in args.cases]
    print(f"model: {built.model_name}\n\n| constraint | samples | stop | valid of stop | length |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['samples']} | {r['stop']} | {r['valid']}/{r['stop']} | {r['length']} |")
    for r in rows:
        for text in r["invalid_examples"]:
            print(f"INVALID {r['case']}: {text!r}")
    machine = machine_stamp()
    out = ROOT / "bench" / "results" / time.strftime("structured_validity-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"code": code_stamp(), "machine": machine, "model": built.model_name,
                               "results": rows}, indent=1, ensure_ascii=False))
    print(f"\n{machine_label(machine)}; wrote {out}")
    return 0 if all(r["valid"] == r["stop"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
