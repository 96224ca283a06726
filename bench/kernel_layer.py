"""Micro-benchmark: kernels/csrc/layer.cpp against the eager torch ops each one replaces.

Shapes are SmolLM2-135M's (hidden 576, 9 q heads, 3 kv heads, head_dim 64, MLP 1536), float32,
for five steps: decode of 1 and of 16 sequences at context 128 and 1024, and a 64-token
prefill chunk continuing a prompt (positions 64..127). The eager code is copied from
models/llama.py (RMSNorm, residual add), runner/fused.py (RoPE, SwiGLU) and
runner/kv_cache.py (KV write, then PagedAttention's gather + masks + SDPA, used as is).

A second table times the two kernels that touch the KV pool (rope_kv_write, which writes
it, and paged_attention, which reads it) with the pool in each of --kv-dtypes (float32,
float16, bfloat16: KVCache's kv_dtype; activations stay float32). There, as in a step,
successive calls go through the pools of 30 layers, so a context larger than the caches
is read from memory (the first table's single pool stays in L2/L3 from call to call).

Method: every variant of a row runs interleaved with the others in one process, a batch of
calls per round, several rounds; the table shows the minimum per-call time over rounds
(this machine is shared: minima are the least noisy). Each sequence's blocks are
consecutive in the pool, as on a fresh server (the eager path then reads a lone sequence's
context as a view, its fastest case).

    .venv/bin/python bench/kernel_layer.py [--threads 1 2] [--rounds 7] [--kv-dtypes float32 float16]
        [--scenarios NAME ...] [--clock wall|thread]
"""
from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from textmill.config import CacheConfig, ModelConfig
from textmill.kernels import load
from textmill.messages import ScheduledChunk, SchedulerOutput
from textmill.models.llama import RMSNorm, RotaryEmbedding
from textmill.runner.batch import build_batch
from textmill.runner.block_tables import BlockTables
from textmill.runner.kv_cache import KVCache, PagedAttention

C, HQ, HKV, D, FF, EPS, LAYERS = 576, 9, 3, 64, 1536, 1e-5, 30
BLOCK = 16
SCENARIOS = {  # name -> [(start, rows)] per sequence
    "decode 1 seq, ctx 128": [(127, 1)],
    "decode 16 seqs, ctx 128": [(127, 1)] * 16,
    "decode 1 seq, ctx 1024": [(1023, 1)],
    "decode 16 seqs, ctx 1024": [(1023, 1)] * 16,
    "prefill chunk 64 (pos 64-127)": [(64, 64)],
}


# --clock: "wall" (time.perf_counter), or "thread" (time.thread_time, this thread's CPU
# time: on a machine shared with other work, time the process spends preempted does not
# count; only meaningful with one thread, as the kernels then run on the calling thread).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
clock = time.perf_counter


def timeit(fns: dict[str, Callable[[], object]], rounds: int, target_s: float = 0.02) -> dict[str, float]:
    """Minimum microseconds per call of each fn, the fns interleaved round by round."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up (allocator, lazy init)
        t0 = clock()
        fn()
        calls[name] = max(5, int(target_s / max(clock() - t0, 1e-6)))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = calls[name]
            t0 = clock()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (clock() - t0) / n * 1e6)
    return best


class Step:
    """One step's tensors for one layer: activations, the paged cache and its metadata."""

    def __init__(self, seqs: list[tuple[int, int]], threads: int, kv_dtype: torch.dtype = torch.float32,
                 num_layers: int = 1):
        g = torch.Generator().manual_seed(0)
        mc = ModelConfig(architecture="llama", vocab_size=16, hidden_size=C, intermediate_size=FF,
                         num_layers=num_layers, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                         max_position_embeddings=2048)
        blocks_per_seq = [-(-(s + r) // BLOCK) for s, r in seqs]
        self.kv = KVCache(mc, CacheConfig(block_size=BLOCK, num_blocks=sum(blocks_per_seq) + 1), kv_dtype=kv_dtype)
        for pool in self.kv.kv:
            pool.copy_(torch.randn(pool.shape, generator=g))
        chunks, next_block = [], 1
        for i, ((start, rows), nb) in enumerate(zip(seqs, blocks_per_seq)):
            blocks = tuple(range(next_block, next_block + nb))
            next_block += nb
            chunks.append(ScheduledChunk(f"r{i}", tuple(range(rows)), start, blocks, sample=True))
        scheduled = SchedulerOutput((), tuple(chunks))
        tables = BlockTables(BLOCK)
        tables.update(scheduled)
        self.batch = build_batch(scheduled, tables, "cpu")
        self.eager_ctx = PagedAttention(self.kv, self.batch.attn, grouped_decode=threads > 1)
        n = self.batch.positions.shape[0]
        self.n = n
        self.x = torch.randn(n, C, generator=g)
        self.residual = torch.randn(n, C, generator=g)
        self.norm = RMSNorm(C, EPS).requires_grad_(False)
        self.norm.weight.copy_(torch.rand(C, generator=g) + 0.5)
        self.qkv = torch.randn(n, (HQ + 2 * HKV) * D, generator=g)
        self.gate_up = torch.randn(n, 2 * FF, generator=g)
        self.rotary = RotaryEmbedding(D, 2048, 10000.0)
        cos, sin = self.rotary(self.batch.positions)  # (N, 1, D/2), once per step in the model
        # runner/kernel_forward.py: the step's own rows of cos/sin, indexed 0..N-1
        self.cos_rows, self.sin_rows = self.rotary.table(self.batch.positions)
        self.rows = torch.arange(n)
        # runner/fused.py's RopeTables: built once per step, shared by the layers.
        self.cos2, self.sin2 = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        self.q = torch.randn(n, HQ, D, generator=g)


# --- eager code, as in models/llama.py, runner/fused.py, runner/kv_cache.py -------------
def eager_rope_write(s: Step):
    n, hq, hkv, d = s.n, HQ, HKV, D
    qk = s.qkv[:, : (hq + hkv) * d].view(n, hq + hkv, d)
    v = s.qkv[:, (hq + hkv) * d :].view(n, hkv, d)
    x32 = qk.float()
    qk = (x32 * s.cos2 + x32.roll(d // 2, dims=-1) * s.sin2).to(qk.dtype)
    q, k = qk[:, :hq], qk[:, hq:]
    cache = s.kv.kv[0]
    cache.index_copy_(0, s.batch.attn.slot_mapping, torch.stack([k, v], dim=1))
    return q


def eager_attention(s: Step):
    # PagedAttention.attend without its KV write (timed in the row above).
    cache, ctx = s.kv.kv[0], s.eager_ctx
    outs = [ctx._attend_group(i, g, cache, s.q[g.token_start : g.token_start + g.num_tokens], D**-0.5, None, None)
            for i, g in enumerate(ctx.meta.groups)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def kernel_attention(ops, s: Step, layer: int = 0):
    # As runner/kernel_attention.py calls it: one call per group.
    cache = s.kv.kv[layer]
    outs = [ops.paged_attention(s.q[g.token_start : g.token_start + g.num_tokens], cache, g.block_table,
                                g.query_start, g.starts, g.context_lens, BLOCK, D**-0.5, 0, 0.0)
            for g in s.batch.attn.groups]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def rows_for(ops, s: Step) -> dict[str, tuple[Callable, Callable]]:
    w, eps = s.norm.weight, EPS
    return {
        "rms_norm": (lambda: s.norm(s.x), lambda: ops.rms_norm(s.x, w, eps)),
        # the kernel adds in place: eager's out-of-place add of the same tensors is the same work
        "add_rms_norm": (lambda: s.norm(s.x + s.residual), lambda: ops.add_rms_norm(s.x, s.residual, w, eps)),
        "rope_kv_write": (lambda: eager_rope_write(s),
                          lambda: ops.rope_kv_write(s.qkv, s.rows, s.cos_rows, s.sin_rows, s.kv.kv[0],
                                                    s.batch.attn.slot_mapping, HQ, HKV)),
        "silu_mul": (lambda: F.silu(s.gate_up[:, :FF]) * s.gate_up[:, FF:], lambda: ops.silu_mul(s.gate_up)),
        "paged_attention": (lambda: eager_attention(s), lambda: kernel_attention(ops, s)),
    }


# A layer calls add_rms_norm twice (the residual add before each norm), then RoPE + write,
# attention and SwiGLU once.
PER_LAYER = {"add_rms_norm": 2, "rope_kv_write": 1, "paged_attention": 1, "silu_mul": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--kv-dtypes", nargs="+", default=["float32", "float16", "bfloat16"],
                    choices=["float32", "float16", "bfloat16"],
                    help="KV pool dtypes for the second table (one: no second table)")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS), metavar="NAME")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="thread: CPU time of the calling thread (with --threads 1 only; see CLOCKS)")
    args = ap.parse_args()
    if args.clock == "thread" and args.threads != [1]:
        ap.error("--clock thread measures one thread: use it with --threads 1")
    global clock
    clock = CLOCKS[args.clock]
    ops = load("layer")
    if ops is None:
        raise SystemExit("the layer kernels did not build (see the warning above)")
    print(f"torch {torch.__version__}; min us per call over {args.rounds} interleaved rounds ({args.clock} clock)\n")
    with torch.inference_mode():  # as the runner runs the model
        table(ops, args)
        if len(args.kv_dtypes) > 1:
            print()
            kv_table(ops, args)


def table(ops, args) -> None:
    print("| step | op | threads | eager us | kernel us | speedup |")
    print("|---|---|---:|---:|---:|---:|")
    for scenario in args.scenarios:
        seqs = SCENARIOS[scenario]
        for threads in args.threads:
            torch.set_num_threads(threads)
            s = Step(seqs, threads)
            totals = [0.0, 0.0]
            for op, (eager, kernel) in rows_for(ops, s).items():
                t = timeit({"eager": eager, "kernel": kernel}, args.rounds)
                print(f"| {scenario} | {op} | {threads} | {t['eager']:.1f} | {t['kernel']:.1f} | "
                      f"{t['eager'] / t['kernel']:.1f}x |")
                for i, name in enumerate(("eager", "kernel")):
                    totals[i] += PER_LAYER.get(op, 0) * t[name]
            print(f"| {scenario} | **x{LAYERS} layers** (ms/step) | {threads} | {totals[0] * LAYERS / 1e3:.2f} | "
                  f"{totals[1] * LAYERS / 1e3:.2f} | {totals[0] / totals[1]:.1f}x |")


def kv_table(ops, args) -> None:
    """The kernels that write and read the pool, per pool dtype, interleaved in one run,
    each call on the next layer's pool."""
    names = args.kv_dtypes
    print("| step | op | threads | " + " | ".join(f"{n} pool us" for n in names) + " |")
    print("|---|---|---:|" + "---:|" * len(names))
    for scenario in args.scenarios:
        seqs = SCENARIOS[scenario]
        steps = {n: Step(seqs, 1, getattr(torch, n), num_layers=LAYERS) for n in names}
        for threads in args.threads:
            torch.set_num_threads(threads)

            def cycling(call):  # call(layer), each call on the next layer
                layers = itertools.cycle(range(LAYERS))
                return lambda: call(next(layers))

            ops_for = {
                "rope_kv_write": lambda s: cycling(lambda i: ops.rope_kv_write(
                    s.qkv, s.rows, s.cos_rows, s.sin_rows, s.kv.kv[i], s.batch.attn.slot_mapping,
                    HQ, HKV)),
                "paged_attention": lambda s: cycling(lambda i: kernel_attention(ops, s, i)),
            }
            for op, make in ops_for.items():
                t = timeit({n: make(steps[n]) for n in names}, args.rounds)
                print(f"| {scenario} | {op} | {threads} | " + " | ".join(f"{t[n]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
