"""Qwen3.5's forward pass (models/qwen35.py) on textmill's C++ kernels (float32 CPU).

Every call computes a row from that row alone (the 2- to 8-bit linears, layer.cpp's norms, RoPE
and paged attention, recurrent.cpp's convolution, delta rule and gate), and a recurrent state
takes a sequence's tokens one by one, so a position gets the same bits in a prompt chunk as in a
one-token step (echo scores a continuation exactly as generation gave it). Per layer:

    y = rms_norm(h, w_in)
    delta net:  [qkv | z | b | a] = in_proj(y)
                o = gated_delta(conv_silu(qkv), z, b, a, ...)     both through the sequence's state
                a = out_proj(o)
    attention:  [q | gate | k | v] = qkv_proj(y)
                q = rope_kv_write([q | k | v], ..., q_norm, k_norm)    k and v cached
                a = o_proj(sigmoid_gate(paged_attention(q), gate))
    y = add_rms_norm(a, h, w_post)                             h += a
    h += down(silu_mul(gate_up(y)))

Built for Qwen35ForCausalLM whose layers runner/fused.py's fuse_qwen35_layers and
fuse_llama_layers fused.
"""
from __future__ import annotations

from types import ModuleType

import torch

from textmill.models import qwen35
from textmill.runner.kernel_attention import KernelPagedAttention
from textmill.runner.kernel_forward import KernelForwardBase, direct_call
from textmill.runner.recurrent_state import StepStates


def _weight(norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight.detach().float().contiguous()


class Qwen35KernelForward(KernelForwardBase):
    """KernelForwardBase's place in the runner (rows kept, chunks that match steps) with a layer
    loop of its own, over two kinds of layer."""

    def __init__(self, model: qwen35.Qwen35ForCausalLM, ops: ModuleType, recurrent: ModuleType):
        # Not KernelForwardBase.__init__: that one reads the Llama families' four fused linears.
        self.ops, self.recurrent, self.model, self.one_call = ops, recurrent, model, None
        config = model.config
        self.eps, self.shape = config.norm_eps, config.linear_attention
        self.embed = model.embed_tokens
        self.layers = list(model.layers)
        self.final_norm = _weight(model.norm)
        self.norms = [(_weight(b.input_layernorm), _weight(b.post_attention_layernorm)) for b in self.layers]
        self.mlps = [(direct_call(b.mlp.gate_up_proj), direct_call(b.mlp.down_proj)) for b in self.layers]
        self.mixers = [self._delta_net(b.linear_attn) if b.recurrent else self._attention(b.self_attn)
                       for b in self.layers]

    def _delta_net(self, net: qwen35.GatedDeltaNet) -> tuple:
        s = net.shape
        widths = (s.conv_channels, s.value_heads * s.value_dim, s.value_heads, s.value_heads)
        ends = torch.tensor(widths).cumsum(0).tolist()
        params = [p.detach().float().contiguous() for p in (net.A, net.dt_bias)]
        return (direct_call(net.in_proj), direct_call(net.out_proj), ends,
                net.conv_weight.detach().float().t().contiguous(),  # (taps, channels): a tap's weights adjacent
                *params, _weight(net.norm))

    def _attention(self, attn: qwen35.Attention) -> tuple:
        return direct_call(attn.qkv_proj), direct_call(attn.o_proj), _weight(attn.q_norm), _weight(attn.k_norm)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        if type(model) is not qwen35.Qwen35ForCausalLM:
            return False
        return all(getattr(b.mlp, "gate_up_proj", None) is not None
                   and getattr(b.linear_attn if b.recurrent else b.self_attn,
                               "in_proj" if b.recurrent else "qkv_proj", None) is not None
                   for b in model.layers)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: KernelPagedAttention,
                 keep: torch.Tensor | None = None, states: StepStates | None = None) -> torch.Tensor:
        assert states is not None, "Qwen3.5's delta nets run over the runner's per-sequence states"
        ops, eps = self.ops, self.eps
        h = self.embed(input_ids).float()  # (N, C): the residual stream
        cos, sin = self.model.rotary.table(positions)
        rows = torch.arange(h.shape[0])
        seqs = torch.tensor(states.rows, dtype=torch.int64).view(-1, 3)
        for i, layer in enumerate(self.layers):
            w_in, w_post = self.norms[i]
            y = ops.rms_norm(h, w_in, eps)
            if layer.recurrent:
                a = self._delta_net_step(i, y, states, seqs)
            else:
                a = self._attention_step(i, layer.self_attn, y, cos, sin, rows, ctx)
            y = ops.add_rms_norm(a, h, w_post, eps)  # h += a
            gate_up, down = self.mlps[i]
            h.add_(down(ops.silu_mul(gate_up(y))))
        if keep is not None:
            h = h.index_select(0, keep)
        return ops.rms_norm(h, self.final_norm, eps)

    def _delta_net_step(self, i: int, y: torch.Tensor, states: StepStates, seqs: torch.Tensor) -> torch.Tensor:
        in_proj, out_proj, (c, z, b, a), conv_weight, A, dt_bias, norm = self.mixers[i]
        conv, ssm = states.pools(i)
        p = in_proj(y)  # (N, qkv | z | b | a)
        x = self.recurrent.conv_silu(p[:, :c], conv_weight, conv, seqs)
        o = self.recurrent.gated_delta(x, p[:, c:z], p[:, z:b], p[:, b:a], A, dt_bias, norm, ssm, seqs,
                                       self.shape.key_heads, self.shape.tiled_heads, self.eps)
        return out_proj(o)

    def _attention_step(self, i: int, attn: qwen35.Attention, y: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, rows: torch.Tensor, ctx: KernelPagedAttention) -> torch.Tensor:
        qkv_proj, o_proj, w_q, w_k = self.mixers[i]
        hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        p = qkv_proj(y)  # (N, q | gate | k | v)
        qkv = torch.cat([p[:, :hq * d], p[:, 2 * hq * d:]], dim=1)
        q = self.ops.rope_kv_write(qkv, rows, cos, sin, ctx.cache.kv[i], ctx.meta.slot_mapping, hq, hkv,
                                   q_norm=w_q, k_norm=w_k, norm_eps=self.eps)  # (N, Hq, D)
        o = ctx.attend_cached(i, q, scale=d**-0.5).flatten(1)
        return o_proj(self.recurrent.sigmoid_gate(o.contiguous(), p[:, hq * d:2 * hq * d]))
