"""Gemma 4 (text; the dense E2B, E4B and 31B): Gemma 3's block with these changes.

- RMSNorm multiplies by its weight itself (no 1 + weight), in float32;
- attention scale 1: q and k are RMS-normed per head, and v too (without a weight);
- the global (full-attention) layers have heads of their own width and count
  (ModelConfig.global_head_dim, global_kv_heads) and turn only part of each head by RoPE
  ("proportional": the first quarter of the angles of the whole head's frequencies, the rest
  fixed; llama.cpp's files hold that as rope_freqs divisors of 1 and 1e30); where
  attention_k_eq_v (31B) they have no v_proj and take V from k_proj's output;
- the last kv_shared_layers layers compute no K/V: each attends over the cache of the last
  earlier layer of its kind (ModelConfig.kv_source), and their MLP may be twice as wide;
- per-layer embeddings (E2B, E4B): a second table gives each token a small vector per layer,
  mixed with a projection of the embedded token; each layer gates its output with it and
  adds a projection of the product to the residual stream;
- each layer's output is scaled by a learned scalar (layer_scalar);
- the final logits are soft-capped.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from textmill.config import ModelConfig
from textmill.models.base import AttentionContext, Embedding
from textmill.models.gemma3 import MLP
from textmill.models.llama import RotaryEmbedding, apply_rotary, head_logits

PER_LAYER_INPUT_SCALE = 2.0**-0.5  # the two halves of a per-layer input, summed, keep their scale


class RMSNorm(nn.Module):
    """x_hat * weight in float32, cast back; without a weight (v's norm) x_hat alone."""

    def __init__(self, dim: int, eps: float, *, with_weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 if self.weight is None else x32 * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_sliding = config.is_sliding(layer_idx)
        self.sliding_window = config.sliding_window if self.is_sliding else None
        self.num_heads = config.num_heads
        self.num_kv_heads, self.head_dim = config.layer_kv_shape(layer_idx)
        self.source = config.kv_source(layer_idx)  # the layer whose cache this one reads
        C, D, eps = config.hidden_size, self.head_dim, config.norm_eps
        self.q_proj = nn.Linear(C, self.num_heads * D, bias=False)
        self.q_norm = RMSNorm(D, eps)
        self.o_proj = nn.Linear(self.num_heads * D, C, bias=False)
        if self.source == layer_idx:
            self.k_proj = nn.Linear(C, self.num_kv_heads * D, bias=False)
            k_eq_v = config.attention_k_eq_v and not self.is_sliding
            self.v_proj = None if k_eq_v else nn.Linear(C, self.num_kv_heads * D, bias=False)
            self.k_norm = RMSNorm(D, eps)
        self.v_norm = RMSNorm(D, eps, with_weight=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        N, D = x.shape[0], self.head_dim
        q = apply_rotary(self.q_norm(self.q_proj(x).view(N, self.num_heads, D)), cos, sin)  # (N, Hq, D)
        if self.source != self.layer_idx:  # the source layer wrote this step's k/v already
            y = ctx.attend(self.source, q, None, None, scale=1.0, sliding_window=self.sliding_window)
        else:
            k = self.k_proj(x).view(N, self.num_kv_heads, D)  # (N, Hkv, D)
            v = k if self.v_proj is None else self.v_proj(x).view(N, self.num_kv_heads, D)
            k, v = apply_rotary(self.k_norm(k), cos, sin), self.v_norm(v)
            y = ctx.attend(self.layer_idx, q, k, v, scale=1.0, sliding_window=self.sliding_window)
        return self.o_proj(y.reshape(N, self.num_heads * D))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        C, eps, P = config.hidden_size, config.norm_eps, config.per_layer_input_size
        self.input_layernorm = RMSNorm(C, eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(C, eps)
        self.pre_feedforward_layernorm = RMSNorm(C, eps)
        self.mlp = MLP(config, config.intermediate_size_of(layer_idx))  # Gemma 3's GeGLU
        self.post_feedforward_layernorm = RMSNorm(C, eps)
        if P:
            self.per_layer_input_gate = nn.Linear(C, P, bias=False)
            self.per_layer_projection = nn.Linear(P, C, bias=False)
            self.post_per_layer_input_norm = RMSNorm(C, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1)) if config.layer_scalars else None

    def forward(self, x: torch.Tensor, per_layer: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, ctx))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if per_layer is not None:  # (N, P): this layer's slice of the per-layer inputs
            gated = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * per_layer
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return x if self.layer_scalar is None else x * self.layer_scalar


class Gemma4ForCausalLM(nn.Module):
    """The CausalLM protocol of models/base.py over a flat batch of N tokens."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act != "gelu_tanh":
            raise ValueError(f"Gemma 4 uses GeGLU with tanh GELU, not {config.hidden_act!r}")
        if config.rotary_dim is not None or config.rope_attention_factor != 1 or config.rope_scaling_factor:
            raise ValueError("Gemma 4 with RoPE scaling or partial rotary sliding layers is not supported")
        self.config = config
        C, P, L = config.hidden_size, config.per_layer_input_size, config.num_layers
        self.embed_tokens = Embedding(config.vocab_size, C)
        if P:
            self.embed_tokens_per_layer = Embedding(config.vocab_size, L * P)
            self.per_layer_model_projection = nn.Linear(C, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, config.norm_eps)
        self.layers = nn.ModuleList(Block(config, i) for i in range(L))
        self.norm = RMSNorm(C, config.norm_eps)
        positions, global_dim = config.max_position_embeddings, config.global_head_dim or config.head_dim
        # The global layers' divisors (1, and 1e30 for the angles that stay put) come with the file.
        self.rotary_global = RotaryEmbedding(global_dim, positions, config.rope_theta,
                                             freq_factors=config.rope_freq_factors)
        self.rotary_local = RotaryEmbedding(config.head_dim, positions, config.rope_local_theta or config.rope_theta)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(C, config.vocab_size, bias=False)

    # The runner may pass `keep` (runner/model_runner.py): the shared layers write no cache, so
    # rows whose output no one reads (a prompt's but its last) stop before them.
    forward_keeps_rows = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C); with `keep` (row indices, in order), only those rows: the layers from the first
        shared one on run for them alone (HF's logits_to_keep slicing), over a context that
        takes each as a one-token query (`ctx.for_rows`)."""
        C = self.config.hidden_size
        # The reference multiplies by the scales rounded to the table's dtype.
        x = self.embed_tokens(input_ids) * rounded_scale(math.sqrt(C), self.embed_tokens)  # (N, C)
        per_layer = self._per_layer_inputs(input_ids, x)  # (N, L, P) or None
        rope_global, rope_local = self.rotary_global(positions), self.rotary_local(positions)
        first_shared = self.config.num_layers - self.config.kv_shared_layers
        for i, layer in enumerate(self.layers):
            if i == first_shared and keep is not None:
                x, ctx = x.index_select(0, keep), ctx.for_rows(keep)
                per_layer = None if per_layer is None else per_layer.index_select(0, keep)
                rope_global, rope_local = (tuple(t.index_select(0, keep) for t in r) for r in (rope_global, rope_local))
                keep = None
                if x.shape[0] == 0:  # mid-prompt chunks only: nothing past here is read
                    return x
            cos, sin = rope_local if layer.self_attn.is_sliding else rope_global
            x = layer(x, None if per_layer is None else per_layer[:, i], cos, sin, ctx)
        x = self.norm(x)  # (N, C)
        return x if keep is None else x.index_select(0, keep)

    def _per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Each token's vector for each layer: its row of the per-layer table, scaled, plus the
        normed projection of its embedding, both times 2 ** -0.5."""
        P, L = self.config.per_layer_input_size, self.config.num_layers
        if not P:
            return None
        table = self.embed_tokens_per_layer
        own = (table(input_ids) * rounded_scale(math.sqrt(P), table)).view(-1, L, P)
        mixed = self.per_layer_model_projection(x) * self.config.hidden_size**-0.5
        mixed = self.per_layer_projection_norm(mixed.view(-1, L, P))
        return (mixed + own) * PER_LAYER_INPUT_SCALE

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = head_logits(hidden, self.embed_tokens, self.lm_head)  # (M, V), this call's own
        cap = self.config.final_logit_softcap
        return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)


def rounded_scale(value: float, table: nn.Module) -> float:
    """A table's multiplier rounded to the table's dtype first, as the reference does (its scale
    is a buffer of the weights' dtype)."""
    return torch.tensor(value, dtype=table.weight.dtype).item()
