"""A GGUF file's mixture of experts (models/moe.py), as llama.cpp reads one: the config fields
its metadata and tensors give, and its stacked expert tensors as each expert's own."""
from __future__ import annotations

import re
from typing import Any

from textmill.loader.gguf_file import GGUFFile, GGUFMetadata, TensorInfo

# What llama.cpp does with the weights of a token's experts, by architecture: renormalized
# over the chosen ones (Qwen3 MoE, Mixtral's "llama" files, Granite MoE) or taken as they are
# (OLMoE, Qwen2 MoE).
# gpt-oss's softmax over the k chosen logits is the renormalized one; ERNIE 4.5 MoE, Qwen3.5 MoE and
# LFM2 MoE renormalize.
_EXPERT_WEIGHTS_NORMED = {"qwen3moe": True, "qwen3vlmoe": True, "llama": True, "olmoe": False, "granitemoe": True,
                          "granitemoeshared": True, "qwen2moe": False, "gpt-oss": True, "ernie4_5-moe": True,
                          "qwen35moe": True, "lfm2moe": True, "qwen3next": True, "granitehybrid": True,
                          "nemotron_h_moe": True}
# A shared expert behind a sigmoid gate (the others' shared expert, Granite MoE's, has none).
_GATED_SHARED_EXPERT = frozenset({"qwen2moe", "qwen35moe", "qwen3next"})
# llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE: the router's probabilities by softmax or by sigmoid.
_SOFTMAX, _SIGMOID = 1, 2


def expert_fields(meta: GGUFMetadata, gguf: GGUFFile) -> dict[str, Any]:
    """A mixture of experts' fields (models/moe.py); the experts' width from the file's key,
    else from their tensors; layers without a router dense; a shared expert where the file has
    one (several shared experts are one wider SwiGLU: the converters write them as one, ERNIE
    4.5's two so); a router's selection bias where the file has one; Nemotron-H MoE's weights scaled
    after the router (2.5). Routers other than a softmax or a sigmoid, choosing within groups, or
    scaled elsewhere are refused."""
    count = int(meta.arch_get("expert_count", 0))
    if not count:
        return {}
    if meta.arch not in _EXPERT_WEIGHTS_NORMED:
        raise ValueError(f"{meta.arch!r} files with experts are not supported (Qwen2 MoE, Qwen3 MoE, OLMoE, Mixtral, "
                         "Granite MoE, gpt-oss, ERNIE 4.5 MoE, Qwen3.5 MoE, Qwen3-Next, LFM2 MoE, Granite 4.0-H and "
                         "Nemotron 3 Nano are)")
    # Nemotron-H MoE's files name no gating function: llama.cpp's graph takes the sigmoid.
    gating = int(meta.arch_get("expert_gating_func", _SIGMOID if meta.arch == "nemotron_h_moe" else _SOFTMAX))
    if gating not in (_SOFTMAX, _SIGMOID):
        raise ValueError("only a softmax or a sigmoid router is supported")
    scale = float(meta.arch_get("expert_weights_scale", 1.0))  # llama.cpp: 0 leaves them alone, as 1 does
    if scale not in (0.0, 1.0) and meta.arch != "nemotron_h_moe":  # the graphs textmill follows take it there only
        raise ValueError("experts' weights scaled after the router are not supported")
    groups, used_groups = int(meta.arch_get("expert_group_count", 1)), int(meta.arch_get("expert_group_used_count", 0))
    if groups > 1 and used_groups not in (0, groups):
        raise ValueError("routers that choose experts within groups are not supported")
    width = meta.arch_get("expert_feed_forward_length", None)
    if width is None:
        gate = next((t for t in gguf.tensors if t.name in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate.0.weight")),
                    None)
        width = gate.shape[-2] if gate is not None else meta.arch_get("feed_forward_length")
    # A layer without a router is dense (llama.cpp makes every layer of these files sparse).
    routed = {t.name for t in gguf.tensors if t.name.endswith(".ffn_gate_inp.weight")}
    dense = tuple(i for i in range(int(meta.arch_get("block_count"))) if f"blk.{i}.ffn_gate_inp.weight" not in routed)
    # A shared expert (Qwen2 MoE: gated; Granite MoE shared: not), by its tensors as llama.cpp finds it.
    shared = next((t.shape[0] for t in gguf.tensors if t.name.endswith((".ffn_gate_shexp.weight",
                                                                       ".ffn_up_shexp.weight"))), None)
    normed = _EXPERT_WEIGHTS_NORMED[meta.arch]
    if meta.arch == "nemotron_h_moe":  # its converter writes norm_topk_prob, which llama.cpp reads
        normed = bool(meta.arch_get("expert_weights_norm", True))
    return dict(num_experts=count, num_experts_per_tok=int(meta.arch_get("expert_used_count")),
                moe_intermediate_size=int(width), norm_topk_prob=normed, router_scale=scale or 1.0,
                dense_layers=dense, shared_expert_intermediate_size=shared,
                shared_expert_gate=shared is not None and meta.arch in _GATED_SHARED_EXPERT,
                router_selection_bias=any(t.name.endswith(".exp_probs_b.bias") for t in gguf.tensors),
                router_sigmoid=gating == _SIGMOID)


_STACKED_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)")


def expert_parts(t: TensorInfo) -> list[TensorInfo] | None:
    """A stacked expert tensor, (E, rows, K), as each expert's own 2-D tensor under llama.cpp's
    older per-expert names (`blk.3.ffn_gate.7.weight`, which Mixtral files still use); a
    fused gate-and-up stack as each expert's gate (its first half) and up; a stack of biases
    (gpt-oss's, (E, rows)) as each expert's bias. None for the rest."""
    m = _STACKED_EXPERTS.fullmatch(t.name)
    if m is None:
        return None
    layer, kind, suffix = m.groups()
    experts, rows = t.shape[0], t.shape[1]
    halves = (("gate", 0, rows // 2), ("up", rows // 2, rows)) if kind == "gate_up" else ((kind, 0, rows),)
    row_bytes = t.data.size // (experts * rows)
    out = []
    for e in range(experts):
        base = e * rows * row_bytes
        out += [TensorInfo(f"blk.{layer}.ffn_{name}.{e}.{suffix}", (end - start, *t.shape[2:]), t.qtype,
                           t.data[base + start * row_bytes:base + end * row_bytes]) for name, start, end in halves]
    return out
