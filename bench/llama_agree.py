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
    python bench/llama_agree.py --models /path/to/model.gguf --tokens 16 --reference

--reference adds textmill's eager float32 path (the file's weights dequantized, float32
activations and KV) and compares each server with it: which of the two is nearer the model
the file describes.

Results: bench/results/llama_agree-<time>.json, stamped with commit and machine.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import models  # noqa: E402
import servers  # noqa: E402
from stamp import write_result  # noqa: E402

from textmill.tokenizer import load_gguf_tokenizer  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "The three primary colors are red, yellow and",
)


def _textmill_steps(choice: dict) -> list[tuple[str, float, dict[str, float]]]:
    lp = choice["logprobs"]
    return list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))


def _llama_steps(choice: dict, text: Callable[[int], str]) -> list[tuple[str, float, dict[str, float]]]:
    # llama-server answers /v1/completions' logprobs in the chat format: one entry a token,
    # with its id. Tokens are named by textmill's text for the id: llama-server spells
    # unused and control tokens as "", which would make different tokens look alike.
    return [(text(c["id"]), c["logprob"], {text(t["id"]): t["logprob"] for t in c["top_logprobs"]})
            for c in choice["logprobs"]["content"]]


def ask(url: str, model: str, tokens: int, top: int, llama: bool,
        text: Callable[[int], str]) -> list[list[tuple[str, float, dict[str, float]]]]:
    out = []
    with httpx.Client(timeout=600) as client:
        for prompt in PROMPTS:
            body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "logprobs": top}
            r = client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            out.append(_llama_steps(choice, text) if llama else _textmill_steps(choice))
    return out


def compare(ours: list, theirs: list) -> dict:
    """Per prompt: tokens agreeing before the first difference, and the mean and largest
    |log-prob difference| over the tokens both top lists hold, at those positions and the
    first one that differs."""
    agreed, diffs = 0, []
    for (tok_a, _, top_a), (tok_b, _, top_b) in zip(ours, theirs):
        diffs += [abs(top_a[t] - top_b[t]) for t in set(top_a) & set(top_b)]
        if tok_a != tok_b:
            break
        agreed += 1
    return {"agreed": agreed, "of": min(len(ours), len(theirs)),
            "mean_abs_logprob_diff": sum(diffs) / len(diffs) if diffs else None,
            "max_abs_logprob_diff": max(diffs, default=None)}


# textmill's eager float32 path on the file's dequantized weights, a float32 KV cache: the
# model the file describes, without either server's int8 activations or 16-bit KV.
REFERENCE_ARGS = ["--no-kernels", "--dtype", "float32", "--kv-cache-dtype", "float32"]


def run(key: str, tokens: int, top: int, port: int, reference: bool) -> dict:
    path = models.resolve(key)
    servers.prepare_textmill(path)
    text = load_gguf_tokenizer(path).token_text
    systems = {"textmill": [], "llama-server": None} | ({"float32 reference": REFERENCE_ARGS} if reference else {})
    answers = {}
    for system, flags in systems.items():
        # One llama-server slot has 1024 tokens of context; textmill serves the same window (it
        # picks LongRoPE's factors by it, as llama.cpp does by its context).
        server = (servers.start_llama_server(port, path, slots=1) if flags is None else
                  servers.start_textmill(port, ["--max-model-len", "1024", *flags], model=path))
        try:
            answers[system] = ask(server.url, server.model, tokens, top, system == "llama-server", text)
        finally:
            servers.stop(server)
    pairs = [("textmill", "llama-server")] + ([("textmill", "float32 reference"), ("llama-server", "float32 reference")]
                                              if reference else [])
    rows = [{"prompt": p, "pair": f"{a} / {b}"} | compare(answers[a][i], answers[b][i])
            for i, p in enumerate(PROMPTS) for a, b in pairs]
    return {"model": key, "file": path.name, "tokens": tokens, "top": top, "comparisons": rows, "answers": answers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2"], help="matrix names or GGUF paths (bench/models.py)")
    ap.add_argument("--tokens", type=int, default=8, help="greedy tokens a prompt")
    ap.add_argument("--top", type=int, default=5, help="log-probs listed a token")
    ap.add_argument("--port", type=int, default=8350)
    ap.add_argument("--reference", action="store_true",
                    help="also serve textmill's eager float32 path and compare both servers with it")
    args = ap.parse_args()
    results = [run(key, args.tokens, args.top, args.port, args.reference) for key in args.models]
    print("| model | prompt | pair | greedy tokens agreeing | mean / max abs log-prob diff (nats) |")
    print("|---|---|---|---:|---:|")
    for r in results:
        for c in r["comparisons"]:
            mean, worst = (f"{v:.3f}" if v is not None else "-" for v in (c["mean_abs_logprob_diff"],
                                                                         c["max_abs_logprob_diff"]))
            print(f"| {r['model']} | {c['prompt'][:24]!r} | {c['pair']} | {c['agreed']} of {c['of']} | {mean} / {worst} |")
    write_result("llama_agree", {"results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
