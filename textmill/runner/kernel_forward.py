"""The Llama family's and Gemma's forward pass on textmill's C++ kernels (float32 CPU).

models/llama.py states the math; this runs the same math in about ten calls per layer
instead of ~60 eager ops, because on a small model the per-op dispatch, not the arithmetic,
is most of a decode step. Per layer:

    qkv = qkv_proj(y)                                  one matmul (runner/fused.py)
    q = rope_kv_write(qkv, ...)                        RoPE on q and k, k and v into the cache
    o = o_proj(paged_attention(q, ...))                straight from the paged pool
    y = add_rms_norm(o, h, w_post)                     h += o; y = RMSNorm(h)
    y = add_rms_norm(down(silu_mul(gate_up(y))), h, w_next)   the next layer's input norm

The residual stream h stays one float32 buffer updated in place, and each RMSNorm is fused
with the residual add before it. The last layer runs past its attention only for the rows
whose logits the step reads (`keep`): the rest of a prompt chunk needs that layer's k and v
in the cache, not its output, so o_proj and the MLP skip them (about 0.85 of a layer's
multiply-adds, 3-5% of a prefill step at 16-30 layers). Rows are independent in the
quantized kernels, so there the kept rows are bitwise the full pass's; float32 weights go
through MKL, whose sums depend on the row count (within rounding).

The linears are whatever the runner installed (nn.Linear, or runner/qlinear.py's 2- to
8-bit kernels), so this module owns only the order of the calls. It states that order
twice: layer() below, in Python, and kernels/csrc/layer.cpp's Forward, which makes the same
calls from C++ in one call per step. Forward runs wherever every linear is one it can call
(QLinear, float32 nn.Linear, SideBySide of those: every layer the runner installs on this
path); on SmolLM2 at one stream the interpreter between the calls was 7-17% of a decode
step. layer() stays the reference: tests hold Forward to it bitwise, which is what
keeps the two in step, and it runs any other linear.

Built only for exact llama.LlamaForCausalLM / qwen2 / qwen3 / olmo2 / Gemma 1, 2 and 3 instances
whose layers runner/fused.py has fused (a mixture of experts' MLP: runner/moe.py's KernelMoE,
whose layers stay in the Python loop); anything else keeps the model's own forward. Qwen3's
QK norm runs inside rope_kv_write, as Gemma 3's does (and OLMo 2's, over all heads at once);
SmolLM3's NoPE layers take an identity RoPE table; Granite's multipliers scale the embedding
(as Gemma's), the scores, and each attention and MLP output before it joins h; OLMo 2 norms
each attention and MLP output instead of each layer input.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from textmill.models import llama
from textmill.models.glm4 import Glm4ForCausalLM
from textmill.models.olmo2 import Olmo2ForCausalLM
from textmill.models.qwen2 import Qwen2ForCausalLM
from textmill.models.qwen3 import Qwen3ForCausalLM
from textmill.runner.fused import FusedAttention, FusedMLP
from textmill.runner.kernel_attention import KernelPagedAttention
from textmill.runner.moe import KernelMoE
from textmill.runner.qlinear import QLinear, SideBySide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Step:
    """What every layer of one forward call reads."""

    ctx: KernelPagedAttention
    rows: torch.Tensor  # (N,) 0..N-1: this step's rows of the RoPE tables
    rope: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (cos, sin) per RoPE base, (N, D/2) each


class KernelForwardBase:
    """The shape both kernel forwards share: the embedding into the residual stream h (one
    float32 buffer every layer adds to in place), the first input norm, this step's RoPE
    rows, then the layers, each ending with the next layer's input norm (the last with the
    model's final norm). A family states its norm weights, its RoPE tables and one layer."""

    embed_scale: float | None = None  # multiplies the embedding (Gemma), if set

    def __init__(self, model: torch.nn.Module, ops: ModuleType):
        self.ops = ops
        self.embed = model.embed_tokens  # nn.Embedding, or file_weights.RowEmbedding
        self.eps = model.config.norm_eps
        self.layers = list(model.layers)
        # None: the family norms no layer input (OLMo 2), and h itself is the input.
        self.input_norms = [None if getattr(layer, "input_layernorm", None) is None
                            else self.norm_weight(layer.input_layernorm) for layer in self.layers]
        self.next_norms = self.input_norms[1:] + [self.norm_weight(model.norm)]
        # Each layer's four matmuls as plain callables: nn.Module.__call__ costs more than
        # a small kernel call, 120 times a step.
        self.matmuls = [tuple(direct_call(m) for m in _linears(layer)) for layer in self.layers]
        # The families' __init__ finish first: build_one_call() reads their per-layer state.
        self.one_call = None

    def build_one_call(self, quant_ext=None) -> None:
        """Layer loop as one C++ call (layer.cpp's Forward), where the kernels have it and
        every linear is one it can call; otherwise the layers stay in Python. `quant_ext`:
        the quant extension whose linear entry the Forward calls, by default the one the
        runner packed these layers with (bench/step_ab.py passes another build's, whose
        packed layout and form numbers must be this one's)."""
        forward_cls = getattr(self.ops, "Forward", None)
        if forward_cls is None:
            return
        linears = [[_parts(m) for m in _linears(layer)] for layer in self.layers]
        if any(p is None for layer in linears for p in layer):
            log.info("layers in Python: a linear here is none the C++ forward calls (or a mixture of experts)")
            return
        quant = None
        if any(form is not None for layer in linears for parts in layer for form, *_ in parts):
            from textmill.kernels import load

            quant = quant_ext or load("quant")  # loaded already: the runner packed these layers with it
            if quant is None or not hasattr(quant, "linear_capsule"):
                return
            linears = [[[(quant.mode_number(form), *rest) if form is not None else (None, *rest)
                         for form, *rest in parts] for parts in layer] for layer in linears]
        specs = [dict(zip(("qkv", "o", "gate_up", "down"), layer)) | self.layer_spec(i)
                 for i, layer in enumerate(linears)]
        self.one_call = forward_cls(None if quant is None else quant.linear_capsule(), specs, self.eps)

    def layer_spec(self, i: int) -> dict:
        """Layer i's norms and attention settings for Forward (layer.cpp's LayerSpec), as layer() uses them."""
        raise NotImplementedError

    @staticmethod
    def norm_weight(norm: torch.nn.Module) -> torch.Tensor:
        return norm.weight.detach().float().contiguous()

    def rope_tables(self, positions: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        raise NotImplementedError

    def layer(self, i: int, y: torch.Tensor, h: torch.Tensor, step: _Step,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i on y (its input, normed) and h; returns the next layer's normed input and
        the residual stream (h itself, updated in place, or with `keep`, only those rows)."""
        raise NotImplementedError

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 ctx: KernelPagedAttention, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) final hidden states; with `keep` (row indices), only those rows, in its order."""
        h = self.embed(input_ids).float()  # (N, C): the residual stream
        if self.embed_scale is not None:
            h = h * self.embed_scale
        y = h if self.input_norms[0] is None else self.ops.rms_norm(h, self.input_norms[0], self.eps)
        step = _Step(ctx, torch.arange(h.shape[0]), self.rope_tables(positions))
        if self.one_call is not None:
            groups = [(g.token_start, g.num_tokens, g.block_table, g.query_start, g.starts, g.context_lens)
                      for g in ctx.meta.groups]
            return self.one_call.run(y, h, step.rows, step.rope, ctx.cache.kv, ctx.meta.slot_mapping, groups,
                                     ctx.cache.block_size, keep)
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            y, h = self.layer(i, y, h, step, keep if i == last else None)
        return y  # (N, C) or (len(keep), C): after the final norm, as CausalLM.forward promises


def _add_norm(ops: ModuleType, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """h += x; the norm of h, or without a norm h itself (read before h next changes), as
    layer.cpp's Forward does."""
    if w is not None:
        return ops.add_rms_norm(x, h, w, eps)
    h.add_(x)
    return h


def _kept(o: torch.Tensor, h: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output and residual rows the rest of the last layer computes."""
    return (o, h) if keep is None else (o.index_select(0, keep), h.index_select(0, keep))


class KernelForward(KernelForwardBase):
    """The Llama family (Llama, Qwen2, Qwen3, OLMo 2, GLM-4) on the kernels; see the module docstring.
    OLMo 2 norms each attention and MLP output before it joins h and no layer input, so h
    itself is each matmul's input there; GLM-4 norms both, inputs and outputs."""

    def __init__(self, model: llama.LlamaForCausalLM, ops: ModuleType):
        super().__init__(model, ops)
        self.rotary, self.rotary_local = model.rotary, model.rotary_local
        # Each layer's RoPE table, of those the model's layers use (settled once, not every
        # step): the model's, the identity (cos 1, sin 0: the rotation leaves q and k bitwise
        # as they are) for SmolLM3's NoPE layers, the local layers' plain one (OLMo 3); so
        # rope_kv_write and the one-call Forward need no case of their own.
        kinds = ["identity" if not b.self_attn.rope else "local" if local else "model"
                 for b, local in zip(self.layers, model.local)]
        self.table_kinds = tuple(k for k in ("model", "identity", "local") if k in kinds)
        self.rope_index = [self.table_kinds.index(k) for k in kinds]
        # Granite: the embedding's multiplier (as Gemma's scale), and each layer's attention
        # and MLP outputs times the residual multiplier before they join h (None: not used).
        if model.config.embedding_multiplier is not None:
            self.embed_scale = float(model.config.embedding_multiplier)
        self.residual = model.config.residual_multiplier
        # (after attention, before the MLP, after the MLP) per layer; None where there is none.
        if type(model) is Olmo2ForCausalLM:  # its post_attention_layernorm norms the attention's output
            self.norms = [(self.norm_weight(b.post_attention_layernorm), None,
                           self.norm_weight(b.post_feedforward_layernorm)) for b in self.layers]
        elif type(model) is Glm4ForCausalLM:  # all four: input (next_norms), after attention, MLP in, MLP out
            self.norms = [(self.norm_weight(b.post_self_attn_layernorm), self.norm_weight(b.post_attention_layernorm),
                           self.norm_weight(b.post_mlp_layernorm)) for b in self.layers]
        else:
            self.norms = [(None, self.norm_weight(b.post_attention_layernorm), None) for b in self.layers]
        # A mixture of experts' MLP (runner/moe.py), where a layer has one: the layers then stay
        # in Python (Forward calls no experts), its MLP five kernel calls a step.
        self.experts = [b.mlp if isinstance(b.mlp, KernelMoE) else None for b in self.layers]
        # Qwen3: (q_norm, k_norm) weights per layer, for rope_kv_write; None elsewhere.
        self.qk_norms = [None if b.self_attn.q_norm is None else
                         (self.norm_weight(b.self_attn.q_norm), self.norm_weight(b.self_attn.k_norm))
                         for b in self.layers]
        if all(b.self_attn.sinks is None for b in self.layers):  # Forward has no sinks (gpt-oss: MoE anyway)
            self.build_one_call()

    def layer_spec(self, i: int) -> dict:
        attn = self.layers[i].self_attn
        q_norm, k_norm = self.qk_norms[i] or (None, None)
        post_attn, mid_norm, post_ffw = self.norms[i]
        return dict(q_norm=q_norm, k_norm=k_norm, post_attn=post_attn, post_ffw=post_ffw, mid_norm=mid_norm,
                    next_norm=self.next_norms[i], heads=attn.num_heads, kv_heads=attn.num_kv_heads,
                    rope=self.rope_index[i],
                    window=int(attn.sliding_window or 0), scale=float(attn.scale), softcap=0.0, gelu=False,
                    residual=1.0 if self.residual is None else float(self.residual))

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        if type(model) not in (llama.LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Olmo2ForCausalLM,
                               Glm4ForCausalLM):
            return False
        return all(type(layer) is model.block_class and isinstance(layer.self_attn, FusedAttention)
                   and isinstance(layer.mlp, (FusedMLP, KernelMoE)) for layer in model.layers)

    def rope_tables(self, positions: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        def table(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
            if kind == "identity":
                zeros = torch.zeros(len(positions), self.rotary.inv_freq.numel())
                return torch.ones_like(zeros), zeros
            return (self.rotary if kind == "model" else self.rotary_local).table(positions)

        return tuple(table(kind) for kind in self.table_kinds)

    def layer(self, i: int, y: torch.Tensor, h: torch.Tensor, step: _Step,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ops, eps, attn = self.ops, self.eps, self.layers[i].self_attn
        qkv_proj, o_proj, gate_up_proj, down_proj = self.matmuls[i]
        cos, sin = step.rope[self.rope_index[i]]
        q_norm, k_norm = self.qk_norms[i] or (None, None)
        q = ops.rope_kv_write(qkv_proj(y), step.rows, cos, sin, step.ctx.cache.kv[i], step.ctx.meta.slot_mapping,
                              attn.num_heads, attn.num_kv_heads, q_norm=q_norm, k_norm=k_norm,
                              norm_eps=self.eps)  # (N, Hq, D)
        o = step.ctx.attend_cached(i, q, scale=attn.scale, sliding_window=attn.sliding_window, sinks=attn.sinks)
        o, h = _kept(o, h, keep)
        post_attn, mid_norm, post_ffw = self.norms[i]
        x = o_proj(o.flatten(1))
        if post_attn is not None:
            x = ops.rms_norm(x, post_attn, eps)
        if self.residual is not None:  # in place, as layer.cpp's Forward does
            x.mul_(self.residual)
        y = _add_norm(ops, x, h, mid_norm, eps)
        moe = self.experts[i]
        x = moe(y) if moe is not None else down_proj(ops.silu_mul(gate_up_proj(y)))
        if post_ffw is not None:
            x = ops.rms_norm(x, post_ffw, eps)
        if self.residual is not None:
            x.mul_(self.residual)
        return _add_norm(ops, x, h, self.next_norms[i], eps), h


def _linears(layer: torch.nn.Module) -> tuple[torch.nn.Module | None, ...]:
    """A fused layer's four linears, in the order of KernelForwardBase.matmuls (the MLP's None
    where it is a mixture of experts)."""
    mlp = layer.mlp
    return (layer.self_attn.qkv_proj, layer.self_attn.o_proj, getattr(mlp, "gate_up_proj", None),
            getattr(mlp, "down_proj", None))


def _parts(linear: torch.nn.Module) -> list[tuple] | None:
    """The linear as Forward's parts, (form, weight, out_features, bias) each, whose outputs
    side by side are its output (form None: a float32 weight, computed as F.linear); None
    for a linear Forward cannot call."""
    if type(linear) is QLinear:
        return [(linear.mode, linear.packed, linear.out_features, linear.bias)]
    if type(linear) is torch.nn.Linear and linear.weight.dtype == torch.float32 and linear.weight.device.type == "cpu":
        return [(None, linear.weight, linear.out_features, linear.bias)]
    if type(linear) is SideBySide:
        parts = [_parts(p) for p in linear.parts]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]
    return None


def direct_call(linear: torch.nn.Module | None):
    """x -> linear(x) without the module machinery, for the layer types the runner installs."""
    if linear is None:
        return None
    if type(linear) is torch.nn.Linear:
        weight, bias = linear.weight, linear.bias
        return lambda x: F.linear(x, weight, bias)
    if type(linear) is QLinear:  # its forward() minus the reshape for >2-D inputs
        op = linear.op()
        packed, n, bias = linear.packed, linear.out_features, linear.bias
        return lambda x: op(x, packed, n, bias)
    return linear


class GemmaKernelForward(KernelForwardBase):
    """Gemma 1's, 2's and 3's forward (models/gemma3.py) on the same kernels. Per layer:

        x = rms_norm(h, w_in)                               h: the residual stream
        q = rope_kv_write(qkv_proj(x), ..., q_norm, k_norm)  QK norm (Gemma 3), RoPE, k and v cached
        a = rms_norm(o_proj(paged_attention(q)), w_post_attn)  scores soft-capped (Gemma 2); no norm (Gemma 1)
        x = add_rms_norm(a, h, w_pre_ffw)                   h += a
        m = rms_norm(down(gelu_tanh_mul(gate_up(x))), w_post_ffw)  no norm (Gemma 1)
        x = add_rms_norm(m, h, w_next)                      h += m; the next layer's input norm

    Gemma's norms multiply by (1 + w) in float32; the weights are stored that way once here.
    Built for exact Gemma models whose layers runner/fused.py's fuse_gemma_layers fused."""

    def __init__(self, model: torch.nn.Module, ops: ModuleType):
        super().__init__(model, ops)
        self.embed_scale = torch.tensor(model.embed_scale, dtype=torch.float32).item()
        # Gemma 2 has no QK norm: None for rope_kv_write; Gemma 1 no output norms either.
        self.norms = [tuple(None if n is None else self.norm_weight(n)
                            for n in (b.post_attention_layernorm, b.pre_feedforward_layernorm,
                                      b.post_feedforward_layernorm, b.self_attn.q_norm, b.self_attn.k_norm))
                      for b in self.layers]
        self.rotary = (model.rotary_global, model.rotary_local)
        self.sliding = [b.self_attn.is_sliding for b in self.layers]
        self._gelu_mul = getattr(ops, "gelu_tanh_mul", None) or _gelu_tanh_mul
        # A kernel build from before rope_kv_write took the QK norm: norm q and k in torch.
        self._fused_qk_norm = "q_norm" in (ops.rope_kv_write.__doc__ or "")
        self.build_one_call()

    def layer_spec(self, i: int) -> dict:
        attn = self.layers[i].self_attn
        post_attn, pre_ffw, post_ffw, q_norm, k_norm = self.norms[i]
        return dict(q_norm=q_norm, k_norm=k_norm, post_attn=post_attn, post_ffw=post_ffw, mid_norm=pre_ffw,
                    next_norm=self.next_norms[i], heads=attn.num_heads, kv_heads=attn.num_kv_heads,
                    rope=int(self.sliding[i]), window=int(attn.sliding_window or 0), scale=float(attn.scale),
                    softcap=float(attn.softcap or 0.0), gelu=True)

    @staticmethod
    def norm_weight(norm: torch.nn.Module) -> torch.Tensor:
        return (1.0 + norm.weight.detach().float()).contiguous()

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        from textmill.models import gemma3

        if type(model) is not gemma3.Gemma3ForCausalLM:
            return False
        return all(getattr(b.self_attn, "qkv_proj", None) is not None and getattr(b.mlp, "gate_up_proj", None)
                   is not None for b in model.layers)

    def rope_tables(self, positions: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(r.table(positions) for r in self.rotary)  # global, local

    def layer(self, i: int, y: torch.Tensor, h: torch.Tensor, step: _Step,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ops, eps, attn = self.ops, self.eps, self.layers[i].self_attn
        qkv_proj, o_proj, gate_up_proj, down_proj = self.matmuls[i]
        post_attn, pre_ffw, post_ffw, q_norm, k_norm = self.norms[i]
        cos, sin = step.rope[self.sliding[i]]
        kv, slots = step.ctx.cache.kv[i], step.ctx.meta.slot_mapping
        qkv = qkv_proj(y)
        if self._fused_qk_norm:
            q = ops.rope_kv_write(qkv, step.rows, cos, sin, kv, slots, attn.num_heads,
                                  attn.num_kv_heads, q_norm=q_norm, k_norm=k_norm, norm_eps=eps)  # (N, Hq, D)
        else:
            if q_norm is not None:
                _qk_norm_(qkv, attn.num_heads, attn.num_kv_heads, attn.head_dim, q_norm, k_norm, eps)
            q = ops.rope_kv_write(qkv, step.rows, cos, sin, kv, slots, attn.num_heads, attn.num_kv_heads)
        o = step.ctx.attend_cached(i, q, scale=attn.scale, sliding_window=attn.sliding_window,
                                   logit_softcap=attn.softcap)
        o, h = _kept(o, h, keep)
        a = o_proj(o.flatten(1))
        if post_attn is not None:  # Gemma 1 has no output norms
            a = ops.rms_norm(a, post_attn, eps)
        y = ops.add_rms_norm(a, h, pre_ffw, eps)
        m = down_proj(self._gelu_mul(gate_up_proj(y)))
        if post_ffw is not None:
            m = ops.rms_norm(m, post_ffw, eps)
        return ops.add_rms_norm(m, h, self.next_norms[i], eps), h


def _qk_norm_(qkv: torch.Tensor, hq: int, hkv: int, d: int, q_w: torch.Tensor, k_w: torch.Tensor,
              eps: float) -> None:
    """Gemma's per-head RMSNorm of q and k, in place in the (N, (Hq + 2 Hkv) D) rows."""
    n = qkv.shape[0]
    for start, heads, w in ((0, hq, q_w), (hq * d, hkv, k_w)):
        x = qkv[:, start:start + heads * d].view(n, heads, d)
        x.copy_(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w)


def _gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up over [gate | up] rows, for kernels built before gelu_tanh_mul."""
    half = gate_up.shape[-1] // 2
    return F.gelu(gate_up[:, :half], approximate="tanh") * gate_up[:, half:]
