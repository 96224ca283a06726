"""Llama (Llama 2/3, SmolLM, Mistral): RMSNorm, rotate-half RoPE, GQA attention, SwiGLU.
Qwen2 (q/k/v biases) and Qwen3 (QK norm) are this model with a switch each (qwen2.py, qwen3.py);
OLMo 2 is its attention and MLP with the norms moved to their outputs (olmo2.py).

Parameter names follow the Hugging Face checkpoints without the leading "model."; the
loader maps other formats onto them. Weights may be float32 or bfloat16: matmuls run in
the weight dtype, RMSNorm and the rotary rotation in float32, logits come back float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textmill.config import ModelConfig
from textmill.models import moe
from textmill.models.base import AttentionContext, Embedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares overflows or loses precision in bf16, so normalize in float32.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin of each position's rotation angles, computed per call in float64 and rounded
    to float32. (A table for every position up to the context window cost 64 MiB and ~0.2 s
    at start for Gemma 3's 32k positions and two bases; a step's own positions are a few
    thousand angles at most.)"""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling_factor: float | None = None,
                 freq_factors: tuple[float, ...] | None = None, magnitude: float = 1.0) -> None:
        super().__init__()
        # An explicit device keeps the frequencies real when the model is built under "meta".
        idx = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu")
        inv_freq = 1.0 / theta ** (idx / head_dim)  # (D/2,)
        if freq_factors is not None:  # Llama 3.1+: low frequencies stretched, high ones kept
            inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float64, device="cpu")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling_factor = scaling_factor  # linear position interpolation
        self.magnitude = magnitude  # LongRoPE's attention factor, on cos and sin alike
        self.max_positions = max_positions

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,) -> cos, sin (N, D/2) float32, contiguous."""
        t = positions.to(device=self.inv_freq.device, dtype=torch.float64)
        if self.scaling_factor:
            t = t / self.scaling_factor
        freqs = torch.outer(t, self.inv_freq)  # (N, D/2)
        if self.magnitude != 1.0:
            return (freqs.cos() * self.magnitude).float(), (freqs.sin() * self.magnitude).float()
        return freqs.cos().float(), freqs.sin().float()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (N, 1, D/2) each: one row per token, broadcast over heads.
        cos, sin = self.table(positions)
        return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: dimension i pairs with i + D/2.  x: (N, H, D). With cos/sin of
    fewer than D/2 angles (partial rotary), only the first 2 x that many values turn."""
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)  # (N, H, D/2) each
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)


def is_sliding_layer(config: ModelConfig, layer_idx: int) -> bool:
    """Layer i is global when (i + 1) % pattern == 0; with no pattern every layer is global
    (and a Llama's window, if any, is in every layer). A local layer uses the local RoPE
    (Gemma's base; OLMo 3's unscaled) even if the config sets no window."""
    return config.is_sliding(layer_idx)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        # A window in every layer (Mistral), or with a pattern in the local layers only (OLMo 3).
        local = config.sliding_window_pattern is None or is_sliding_layer(config, layer_idx)
        self.sliding_window = config.sliding_window if local else None
        self.rope = layer_idx not in config.no_rope_layers  # SmolLM3's NoPE layers: False
        C, D, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.scale = D**-0.5 if config.attention_scale is None else config.attention_scale  # Granite's own
        self.q_proj = nn.Linear(C, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(C, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(C, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, C, bias=config.attention_out_bias)
        # gpt-oss: each head's sink logit (config.attention_sinks), handed to the context.
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if config.attention_sinks else None
        # Qwen3: each head's q and k RMS-normed (one weight per dimension) before RoPE; OLMo 2:
        # all heads' together (one weight per value of the projection; norm_heads tells them apart).
        whole = config.qk_norm_whole
        self.q_norm = RMSNorm(D * (self.num_heads if whole else 1), config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(D * (self.num_kv_heads if whole else 1), config.norm_eps) if config.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        N, D = x.shape[0], self.head_dim
        q = self.q_proj(x).view(N, self.num_heads, D)  # (N, Hq, D)
        k = self.k_proj(x).view(N, self.num_kv_heads, D)  # (N, Hkv, D)
        v = self.v_proj(x).view(N, self.num_kv_heads, D)  # (N, Hkv, D)
        if self.q_norm is not None:
            q, k = norm_heads(self.q_norm, q), norm_heads(self.k_norm, k)
        if self.rope:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = ctx.attend(self.layer_idx, q, k, v, scale=self.scale, sliding_window=self.sliding_window,
                       sinks=self.sinks)  # (N, Hq, D)
        return self.o_proj(y.reshape(N, self.num_heads * D))


def norm_heads(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """x (N, H, D) through a QK norm: each head alone where the norm has D weights (Qwen3), all
    H heads together where it has H x D (OLMo 2's norm over the whole projection)."""
    if norm.weight.numel() == x.shape[-1]:
        return norm(x)
    return norm(x.reshape(x.shape[0], -1)).view(x.shape)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gpt-oss's experts: with biases and clamped
    (swiglu_clamped)."""

    def __init__(self, config: ModelConfig, width: int | None = None, *, expert: bool = False) -> None:
        super().__init__()
        C, F_ = config.hidden_size, width or config.intermediate_size  # width: a MoE expert's (models/moe.py)
        bias = expert and config.moe_bias
        self.gate_proj = nn.Linear(C, F_, bias=bias)
        self.up_proj = nn.Linear(C, F_, bias=bias)
        self.down_proj = nn.Linear(F_, C, bias=bias)
        self.limit = config.swiglu_limit if expert else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is not None:
            return self.down_proj(swiglu_clamped(self.gate_proj(x), self.up_proj(x), self.limit))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


SWIGLU_ALPHA = 1.702  # gpt-oss's sigmoid slope (transformers' and llama.cpp's constant)


def swiglu_clamped(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """gpt-oss: the gate capped above at `limit`, up clamped to +-limit, and (up + 1) times
    gate * sigmoid(1.702 gate)."""
    g = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (g * torch.sigmoid(SWIGLU_ALPHA * g))


def feed_forward(config: ModelConfig, layer_idx: int) -> nn.Module:
    """The layer's MLP: a mixture of SwiGLU experts where the config makes the layer sparse."""
    if moe.is_sparse_layer(config, layer_idx):
        return moe.SparseMoE(config, lambda width: MLP(config, width, expert=True))
    return MLP(config)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = feed_forward(config, layer_idx)
        self.residual = config.residual_multiplier  # Granite: each output scaled as it joins x

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        x = x + (a if self.residual is None else a * self.residual)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (m if self.residual is None else m * self.residual)


class LlamaForCausalLM(nn.Module):
    """The CausalLM protocol of models/base.py over a flat batch of N tokens."""

    block_class: type[nn.Module] = Block  # OLMo 2's moves the norms (olmo2.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"llama uses SwiGLU (silu), not {config.hidden_act!r}")
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.block_class(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.rotary_dim or config.head_dim, config.max_position_embeddings,
                                      config.rope_theta, config.rope_scaling_factor,
                                      config.rope_freq_factors, config.rope_attention_factor)
        # OLMo 3's local layers turn by plain RoPE (their own base), the global ones by the scaled;
        # where the config names no local base (gpt-oss) every layer takes the model's.
        self.local = [is_sliding_layer(config, i) and config.rope_local_theta is not None
                      for i in range(config.num_layers)]
        self.rotary_local = (RotaryEmbedding(config.rotary_dim or config.head_dim, config.max_position_embeddings,
                                             config.rope_local_theta) if any(self.local) else None)
        # Tied models have no lm_head: logits() reads the embedding matrix instead.
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (N, C)
        if self.config.embedding_multiplier is not None:  # Granite
            x = x * self.config.embedding_multiplier
        rope = self.rotary(positions)  # (cos, sin), (N, 1, D/2) each
        rope_local = rope if self.rotary_local is None else self.rotary_local(positions)
        for layer, local in zip(self.layers, self.local):
            x = layer(x, *(rope_local if local else rope), ctx)
        return self.norm(x)  # (N, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = head_logits(hidden, self.embed_tokens, self.lm_head)  # (M, V), this call's own
        # Granite's division in place (the runner's head may write into a reused buffer).
        return logits if self.config.logit_scale is None else logits.div_(self.config.logit_scale)


def head_logits(hidden: torch.Tensor, embed: nn.Embedding, lm_head: nn.Module | None) -> torch.Tensor:
    """float32 logits; an untied head is called as a module, so a runner that swaps its
    Linear layers for quantized ones after loading swaps this one too."""
    out = F.linear(hidden, embed.weight) if lm_head is None else lm_head(hidden)
    return out.float()
