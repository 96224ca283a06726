"""What a JSON-schema constraint costs the engine: throughput with every stream constrained
by one schema against the same streams unconstrained, and the time a never-seen schema adds
to its request's first token. No HTTP: engines as `textmill serve` builds them
(wiring.build_engine), on the bundled model or --model.

Throughput: C streams (bench/workload.py prompts, `--max-tokens` greedy tokens) added at once,
Engine.step() until all finish; constrained streams follow SCHEMA (an array of at least 200
small integers, so no stream can finish before max_tokens), unconstrained ones ignore EOS.
The two take turns for `--repeats` rounds; the table keeps each one's best round.

First token: one request alone on an idle engine, three ways: unconstrained, with a schema the
compiler has cached, with a new schema (a fresh "description" each time). Engine-direct, the
runner compiles the new schema itself (the server compiles it in prepare(), in a worker
thread, before queuing: the same cost, moved off the engine thread). Medians over --repeats.

Sampler alone (--sampler-only, or first in a full run): Sampler.sample on random logits,
greedy, 1 and 16 rows, every row under a JSON schema against none, for the bundled model's
vocabulary and --model's; the minimum over interleaved calls (robust on a shared machine):
the mask's own cost per step, with no forward pass to hide it.

    .venv/bin/python bench/structured_cost.py [--concurrency 16] [--repeats 3] [--model PATH] [--sampler-only]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from workload import Workload, make_prompt  # noqa: E402

from bench.stamp import code_stamp, machine_label, machine_stamp  # noqa: E402
from textmill.cli import build_parser, engine_config_from_args  # noqa: E402
from textmill.messages import EngineRequest  # noqa: E402
from textmill.sampling_params import SamplingParams  # noqa: E402
from textmill.structured import StructuredOutput  # noqa: E402
from textmill.wiring import build_engine  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 200}
RECORD = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"]}


def throughput(built, workload: Workload, concurrency: int, constrained: bool, first: int) -> float:
    engine, tok = built.engine, built.tokenizer
    structured = StructuredOutput("json", json.dumps(SCHEMA)) if constrained else None
    params = SamplingParams(max_tokens=workload.max_tokens, temperature=0.0, structured=structured,
                            stop_token_ids=())  # EOS ignored: every stream runs max_tokens
    for i in range(concurrency):
        ids = tuple(tok.encode(make_prompt(workload, first + i)))
        engine.add_request(EngineRequest(f"t{first + i}", ids, params))
    generated, start = 0, time.perf_counter()
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                generated += out.num_output_tokens
    return generated / (time.perf_counter() - start)


def first_token_ms(built, workload: Workload, structured: StructuredOutput | None, index: int) -> float:
    engine, tok = built.engine, built.tokenizer
    ids = tuple(tok.encode(make_prompt(workload, index)))
    params = SamplingParams(max_tokens=1, temperature=0.0, structured=structured)
    start = time.perf_counter()
    engine.add_request(EngineRequest(f"f{index}", ids, params))
    while engine.has_unfinished:
        engine.step()
    return (time.perf_counter() - start) * 1e3


def sampler_overhead(tokenizer, vocab_size: int, grammars, calls: int = 60) -> list[dict]:
    import torch

    from textmill.runner.sampler import Sampler
    schema = StructuredOutput("json", json.dumps(RECORD))
    rows_out = []
    for rows in (1, 16):
        samplers = {}
        for constrained in (False, True):
            s = Sampler(vocab_size, grammars=grammars)
            for i in range(rows):
                s.add_request(f"r{i}", SamplingParams(temperature=0.0, structured=schema if constrained else None))
            samplers[constrained] = s
        ids = [f"r{i}" for i in range(rows)]
        logits = torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(0))
        best = {False: float("inf"), True: float("inf")}
        for _ in range(calls):
            for constrained, s in samplers.items():
                start = time.perf_counter()
                s.sample(logits, ids)
                best[constrained] = min(best[constrained], time.perf_counter() - start)
        rows_out.append({"vocab": vocab_size, "rows": rows, "threads": torch.get_num_threads(),
                         "greedy_ms": best[False] * 1e3, "constrained_ms": best[True] * 1e3})
    return rows_out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default=None)
    p.add_argument("--sampler-only", action="store_true")
    args = p.parse_args()
    workload = Workload(max_tokens=args.max_tokens)
    ns = build_parser().parse_args(["serve", "--max-num-seqs", str(args.concurrency),
                                    *([args.model] if args.model else [])])
    built = build_engine(engine_config_from_args(ns))
    sampler_rows = sampler_overhead(built.tokenizer, built.model_config.vocab_size, built.grammars)
    print("| vocab | rows | threads | greedy ms | constrained ms | added ms |\n|---:|---:|---:|---:|---:|---:|")
    for r in sampler_rows:
        print(f"| {r['vocab']} | {r['rows']} | {r['threads']} | {r['greedy_ms']:.2f} | {r['constrained_ms']:.2f} | "
              f"{r['constrained_ms'] - r['greedy_ms']:+.2f} |")
    if args.sampler_only:
        return 0
    built.grammars.compile(StructuredOutput("json", json.dumps(SCHEMA)))  # as prepare() would, first
    first, rates = 10_000, {False: [], True: []}
    for _ in range(args.repeats):
        for constrained in (False, True):
            rates[constrained].append(throughput(built, workload, args.concurrency, constrained, first))
            first += args.concurrency
    cached = StructuredOutput("json", json.dumps(RECORD))
    built.grammars.compile(cached)
    ttft = {"unconstrained": [], "cached schema": [], "new schema": []}
    for r in range(args.repeats + 2):  # the first rounds warm up
        fresh = StructuredOutput("json", json.dumps({**RECORD, "description": f"round {r} {time.time()}"}))
        for name, structured in (("unconstrained", None), ("cached schema", cached), ("new schema", fresh)):
            ms = first_token_ms(built, workload, structured, first)
            first += 1
            if r >= 2:
                ttft[name].append(ms)
    plain, constrained = max(rates[False]), max(rates[True])
    medians = {k: statistics.median(v) for k, v in ttft.items()}
    print(f"| streams | unconstrained tok/s | one JSON schema tok/s | ratio |\n|---:|---:|---:|---:|\n"
          f"| {args.concurrency} | {plain:.1f} | {constrained:.1f} | {constrained / plain:.2f}x |")
    print("\n| first token, alone | ms (median) | vs unconstrained |\n|---|---:|---:|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.1f} | {ms - medians['unconstrained']:+.1f} |")
    machine = machine_stamp()
    out = ROOT / "bench" / "results" / time.strftime("structured_cost-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"code": code_stamp(), "machine": machine, "model": built.model_name,
                               "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                               "tok_s": {"unconstrained": rates[False], "constrained": rates[True]},
                               "first_token_ms": ttft, "sampler": sampler_rows}, indent=1))
    print(f"\n{machine_label(machine)}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
