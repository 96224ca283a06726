"""Offline baseline: Hugging Face transformers generate() on the same GGUF, in bf16.

The GGUF is dequantized by transformers (gguf_file=) and run in bfloat16. The prompts are
the load generator's 64-word prompts; min_new_tokens = max_new_tokens bans EOS the way
logit_bias does for the servers, and decoding is greedy. Batches are left-padded. No HTTP
and no scheduling: an upper bound for "just call generate()".

    python bench/hf_baseline.py --batch-sizes 1 16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpuwatch  # noqa: E402
from workload import Workload, make_prompt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Everything is local: never let transformers wait on a hub it cannot reach.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class HFResult:
    batch_size: int
    new_tokens: int  # per sequence
    seconds: float  # best of the timed repeats
    tok_s: float  # batch_size * new_tokens / seconds
    prompt_tokens: int  # padded prompt length
    dtype: str
    threads: int
    others_cpu: float  # share of the CPUs other processes used during the timed runs
    cores: float  # cores generate() kept busy on average


def default_gguf() -> Path:
    sys.path.insert(0, str(REPO))
    from textmill.loader.bundled import bundled_model_path
    return bundled_model_path()


def load(gguf: Path, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Unpack every weight to `dtype` at load: the plain dense model that generate() users run.
    # (Recent transformers otherwise keeps GGUF blocks packed and looks for a hub kernel.)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
                                                 **_dequantize_kwargs(gguf))
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only: pad on the left so generation continues the text
    return tok, model


def _dequantize_kwargs(gguf: Path) -> dict:
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF weights
        return {}
    return {"quantization_config": GgufConfig(gguf_file=str(gguf), dequantize=True)}


def time_generate(tok, model, workload: Workload, batch_size: int, repeats: int) -> HFResult:
    import torch

    # The same prompts as the servers' run at concurrency == batch_size (bench/run.py's seeds).
    prompts = [make_prompt(replace(workload, seed=workload.seed + 1000 * batch_size), i)
               for i in range(batch_size)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    n = workload.max_tokens
    kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    best = float("inf")
    with torch.inference_mode():
        model.generate(**enc, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        before = cpuwatch.snapshot()
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(**enc, **kwargs)
            best = min(best, time.perf_counter() - t)
        after = cpuwatch.snapshot()
        others, cores = cpuwatch.others_share(before, after), cpuwatch.own_cores(before, after)
    generated = out.shape[1] - enc["input_ids"].shape[1]
    assert generated == n, f"generated {generated} tokens, expected {n}"
    return HFResult(batch_size=batch_size, new_tokens=n, seconds=best, tok_s=batch_size * n / best,
                    prompt_tokens=enc["input_ids"].shape[1], dtype=str(model.dtype).removeprefix("torch."),
                    threads=torch.get_num_threads(), others_cpu=others, cores=cores)


def run(gguf: Path, batch_sizes: list[int], workload: Workload, repeats: int = 1,
        dtype: str = "bfloat16", threads: int | None = None) -> list[HFResult]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    tok, model = load(gguf, dtype)
    return [time_generate(tok, model, workload, b, repeats) for b in batch_sizes]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help="default: the bundled SmolLM2-135M Q4_1")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per batch size (best is kept)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    workload = Workload(prompt_words=args.prompt_words, max_tokens=args.max_tokens)
    results = run(args.gguf or default_gguf(), args.batch_sizes, workload, args.repeats,
                  args.dtype, args.threads)
    print("| batch | new tokens | seconds | tok/s | prompt tokens (padded) | dtype | threads | others % |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in results:
        print(f"| {r.batch_size} | {r.new_tokens} | {r.seconds:.2f} | {r.tok_s:.1f} | {r.prompt_tokens} "
              f"| {r.dtype} | {r.threads} | {100 * r.others_cpu:.0f} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
