"""A mixture of experts in place of a decoder layer's MLP (Qwen3 MoE, OLMoE, Mixtral, Granite MoE,
Qwen2 MoE, gpt-oss, ERNIE 4.5 MoE; the hybrids Qwen3.5 MoE and LFM2 MoE).

A router (`gate`, C -> E logits) picks each token's k likeliest experts by the softmax of its
logits; the MLP's output is their SwiGLU outputs weighted by those probabilities, which are
first divided by their sum where the family renormalizes them (ModelConfig.norm_topk_prob:
Qwen3 MoE and Mixtral, not OLMoE), as transformers' and llama.cpp's routers compute them.
Qwen2 MoE adds a shared expert every token takes, its output times sigmoid(a learned gate);
Granite MoE's shared variant one without a gate. gpt-oss's router and experts have biases and
its experts clamp their SwiGLU (llama.swiglu_clamped); its softmax over the k chosen logits is
this renormalized softmax. ERNIE 4.5 MoE chooses by the probabilities plus a per-expert bias
(`selection_bias`) and weighs by the probabilities alone; LFM2 MoE too, its probabilities each
logit's sigmoid (`router_sigmoid`), renormalized over the chosen.

The experts are llama.MLPs named as the Hugging Face checkpoints name them
(`mlp.experts.3.gate_proj`, `mlp.gate`); a GGUF file's stacked expert tensors are split per
expert by the loader. This forward is the reference: each expert runs once over the tokens
that chose it. On the CPU kernels the runner swaps the experts for one packed weight per
projection and runs them in two grouped calls (runner/moe.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from textmill.config import ModelConfig


def route(logits: torch.Tensor, k: int, normalize: bool, selection_bias: torch.Tensor | None = None,
          sigmoid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) router logits -> each token's k experts' weights (N, k) float32 and ids (N, k).
    `selection_bias` (E,) (ERNIE 4.5 MoE, LFM2 MoE) joins the probabilities that choose, not the
    weights; `sigmoid` (LFM2 MoE): each expert's probability is the sigmoid of its logit."""
    probs = torch.sigmoid(logits.float()) if sigmoid else F.softmax(logits.float(), dim=-1)
    if selection_bias is not None:
        ids = torch.topk(probs + selection_bias.float(), k, dim=-1).indices
        weights = probs.gather(-1, ids)
    else:
        weights, ids = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    """`make_expert(width)`: one expert (the family's MLP, llama.MLP), `width` wide."""

    def __init__(self, config: ModelConfig, make_expert: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.top_k, self.normalize = config.num_experts_per_tok, config.norm_topk_prob
        self.sigmoid, self.scale = config.router_sigmoid, config.router_scale
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=config.moe_bias)  # gpt-oss: biased
        self.selection_bias = (nn.Parameter(torch.zeros(config.num_experts)) if config.router_selection_bias
                               else None)
        width = config.moe_intermediate_size or config.intermediate_size
        self.experts = nn.ModuleList(make_expert(width) for _ in range(config.num_experts))
        shared = config.shared_expert_intermediate_size
        self.shared_expert = make_expert(shared) if shared else None
        self.shared_expert_gate = (nn.Linear(config.hidden_size, 1, bias=False)
                                   if shared and config.shared_expert_gate else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.normalize, self.selection_bias, self.sigmoid)
        if self.scale != 1.0:
            weights = weights * self.scale
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            y = self.experts[e](x.index_select(0, token)) * weights[token, slot, None].to(x.dtype)
            out.index_add_(0, token, y)
        return out if self.shared_expert is None else out + self.shared(x)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert's output, gated (Qwen2 MoE) or not (Granite MoE shared)."""
        y = self.shared_expert(x)
        return y if self.shared_expert_gate is None else torch.sigmoid(self.shared_expert_gate(x)) * y


def is_sparse_layer(config: ModelConfig, layer_idx: int) -> bool:
    return config.num_experts > 0 and layer_idx not in config.dense_layers
