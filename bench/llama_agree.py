"""Does textmill compute the same model as llama.cpp on a GGUF file? Greedy tokens and top log-probs.

The parity tests compare textmill with transformers; llama.cpp is the other reference, and
the one whose reading of a GGUF file users know (which RoPE base a layer takes, the
soft-caps, the query scale of a 27B). This serves one file on textmill and on llama.cpp's
llama-server in turn, sends each the same greedy requests with `logprobs`, and prints per
prompt how many generated tokens agree and how far apart the log-probs of the tokens both
list are. Both sides quantize activations their own way (textmill int8 per 32 values,
llama.cpp per block type), so a few hundredths of a nat apart is agreement; a wrong
soft-cap, norm or RoPE base moves them by tenths or more.

    python bench/llama_agree.py --models smollm2 synthetic-gemma2
    python bench/llama_agree.py --models /path/to/model.gguf --tokens 16

Results: bench/results/llama_agree-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import models  # noqa: E402
import servers  # noqa: E402
from stamp import write_result  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The three primary colors are red, yellow and",
)


def _textmill_steps(choice: dict) -> list[tuple[str, float, dict[str, float]]]:
    lp = choice["logprobs"]
    return list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))


def _llama_steps(choice: dict) -> list[tuple[str, float, dict[str, float]]]:
    # llama-server answers /v1/completions' logprobs in the chat format: one entry a token.
    return [(c["token"], c["logprob"], {t["token"]: t["logprob"] for t in c["top_logprobs"]})
            for c in choice["logprobs"]["content"]]


def ask(url: str, model: str, tokens: int, top: int, system: str) -> list[list[tuple[str, float, dict[str, float]]]]:
    out = []
    with httpx.Client(timeout=600) as client:
        for prompt in PROMPTS:
            body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "logprobs": top}
            r = client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            out.append(_textmill_steps(choice) if system == "textmill" else _llama_steps(choice))
    return out


def compare(ours: list, theirs: list) -> dict:
    """Per prompt: tokens agreeing before the first difference, and the largest |log-prob
    difference| over the tokens both top lists hold at those positions."""
    agreed = 0
    worst = 0.0
    for (tok_a, lp_a, top_a), (tok_b, lp_b, top_b) in zip(ours, theirs):
        shared = set(top_a) & set(top_b)
        worst = max([worst, abs(lp_a - lp_b)] if tok_a == tok_b else [worst]
                    + [abs(top_a[t] - top_b[t]) for t in shared])
        if tok_a != tok_b:
            break
        agreed += 1
    return {"agreed": agreed, "of": min(len(ours), len(theirs)), "max_abs_logprob_diff": worst,
            "first_tokens": [ours[0][0] if ours else None, theirs[0][0] if theirs else None]}


def run(key: str, tokens: int, top: int, port: int) -> dict:
    path = models.resolve(key)
    servers.prepare_textmill(path)
    answers = {}
    for system in ("textmill", "llama-server"):
        server = (servers.start_textmill(port, ["--max-model-len", "4096"], model=path) if system == "textmill"
                  else servers.start_llama_server(port, path, slots=1))
        try:
            answers[system] = ask(server.url, server.model, tokens, top, system)
        finally:
            servers.stop(server)
    rows = [compare(a, b) | {"prompt": p} for p, a, b in zip(PROMPTS, answers["textmill"], answers["llama-server"])]
    return {"model": key, "file": path.name, "tokens": tokens, "top": top, "prompts": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2"], help="matrix names or GGUF paths (bench/models.py)")
    ap.add_argument("--tokens", type=int, default=8, help="greedy tokens a prompt")
    ap.add_argument("--top", type=int, default=5, help="log-probs listed a token")
    ap.add_argument("--port", type=int, default=8350)
    args = ap.parse_args()
    results = [run(key, args.tokens, args.top, args.port) for key in args.models]
    print("| model | prompt | greedy tokens agreeing | max abs log-prob diff (nats) |")
    print("|---|---|---:|---:|")
    for r in results:
        for p in r["prompts"]:
            print(f"| {r['model']} | {p['prompt'][:32]!r} | {p['agreed']} of {p['of']} | {p['max_abs_logprob_diff']:.3f} |")
    write_result("llama_agree", {"results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
