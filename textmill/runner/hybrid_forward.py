"""The hybrids' forward pass (models/qwen35.py, models/lfm2.py, models/granite_hybrid.py,
models/nemotron_h.py, models/falcon_h1.py) on textmill's C++ kernels (float32 CPU).

Every call computes a row from that row alone (the 2- to 8-bit linears, layer.cpp's norms, RoPE
and paged attention, recurrent.cpp's convolution, delta rule, scan and gate, exact elementwise
products) and a recurrent state takes a sequence's tokens one by one, so a position gets the same
bits in a prompt chunk as in a one-token step (echo scores a continuation exactly as generation gave
it). A layer is a pre-norm mixer and a pre-norm MLP, or (Nemotron-H) one of them alone; each
sublayer's output joins h with the next sublayer's norm in one call:

    y = rms_norm(h, w_first)
    for each sublayer: a = mixer(y) or mlp(y);  y = add_rms_norm(a, h, w_next)      h += a
    mixers:
        Qwen3.5's delta net:   [qkv | z | b | a] = in_proj(y)
                               out_proj(gated_delta(causal_conv(qkv, silu), z, b, a, ...))
        Qwen3.5's attention:   [q | gate | k | v] = qkv_proj(y)
                               o_proj(sigmoid_gate(paged_attention(rope_kv_write([q | k | v], ...)), gate))
        LFM2's convolution:    [b | c | x] = in_proj(y);  out_proj(c * causal_conv(b * x))
        LFM2's attention:      o_proj(paged_attention(rope_kv_write(qkv_proj(y), q_norm, k_norm)))
        Mamba-2 (Granite 4.0-H, Nemotron-H):  [z | xBC | dt] = in_proj(y)
                               out_proj(ssm_scan(causal_conv(xBC, bias, silu), z, dt, ...))
        their attention:       LFM2's without q/k norms, on an identity RoPE table (NoPE)
        Falcon-H1's:           Mamba-2's plus Llama's attention (RoPE), side by side
    MLPs: down(silu_mul(gate_up(y))), a mixture of experts (runner/moe.py), Nemotron-H's down(relu(up(y))^2)
    (a times Granite's residual multiplier before it joins h)

Built for models whose layers runner/fused.py fused (fuse_qwen35_layers and fuse_llama_layers; LFM2's
convolutions and the Mamba-2 mixers have one projection in already).
"""
from __future__ import annotations

from types import ModuleType

import torch

from textmill.models import falcon_h1, granite_hybrid, lfm2, nemotron_h, qwen35
from textmill.models.moe import SparseMoE
from textmill.runner.kernel_attention import KernelPagedAttention
from textmill.runner.kernel_forward import KernelForwardBase, direct_call
from textmill.runner.moe import KernelMoE
from textmill.runner.recurrent_state import StepStates


def _weight(norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight.detach().float().contiguous()


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise convolution's (channels, taps) weight as (taps, channels): a tap's adjacent."""
    return weight.detach().float().t().contiguous()


class HybridKernelForward(KernelForwardBase):
    """KernelForwardBase's place in the runner (rows kept, chunks that match steps) with a layer
    loop of its own, over a recurrent kind of layer and an attending one."""

    def __init__(self, model: torch.nn.Module, ops: ModuleType, recurrent: ModuleType):
        # Not KernelForwardBase.__init__: that one reads the Llama families' four fused linears.
        self.ops, self.recurrent, self.model, self.one_call = ops, recurrent, model, None
        config = model.config
        self.eps = config.norm_eps
        # Granite's multipliers (None: not used); its NoPE attention turns by the identity table.
        self.embed_scale, self.residual = config.embedding_multiplier, config.residual_multiplier
        self.nope = bool(config.no_rope_layers)
        self.embed = model.embed_tokens
        self.layers = list(model.layers)
        self.final_norm = _weight(model.norm)
        # Each layer's mixer (None: a Nemotron-H MLP layer's) and MLP (None: a Nemotron-H mixer layer's),
        # and the sublayers in order: (the norm before it, layer, whether it is the mixer).
        self.steps = [None if getattr(b, "mlp_only", False) else self._mixer(b) for b in self.layers]
        self.mlps = [self._mlp(b.mlp) if hasattr(b, "mlp") else None for b in self.layers]
        self.sublayers = []
        for i, b in enumerate(self.layers):
            if self.steps[i] is not None:
                self.sublayers.append((_weight(b.input_layernorm), i, True))
            if self.mlps[i] is not None:
                norm = (b.input_layernorm if self.steps[i] is None
                        else b.pre_ff_layernorm if isinstance(b, falcon_h1.Block) else b.post_attention_layernorm)
                self.sublayers.append((_weight(norm), i, False))
        # Each recurrent layer's replay: its kernels over recorded inputs, into the states (hybrids' guesses).
        self.replays = {i: self._replay_of(b) for i, b in enumerate(self.layers) if b.recurrent}

    def _mlp(self, mlp: torch.nn.Module):
        """The layer's MLP as a function of y: a mixture of experts as it is (runner/moe.py's KernelMoE,
        or models/moe.py's over fused experts where the file's could not be stacked), else SwiGLU."""
        if isinstance(mlp, (KernelMoE, SparseMoE)):
            return mlp
        if isinstance(mlp, nemotron_h.ReluSquaredMLP):
            up, down = direct_call(mlp.up_proj), direct_call(mlp.down_proj)
            return lambda y: down(nemotron_h.relu_squared(up(y)))
        gate_up, down = direct_call(mlp.gate_up_proj), direct_call(mlp.down_proj)
        return lambda y: down(self.ops.silu_mul(gate_up(y)))

    def _mixer(self, block: torch.nn.Module):
        """The layer's mixer as a function of (y, positions' rows, cos, sin, ctx, states, seqs)."""
        if isinstance(block, falcon_h1.Block):  # both side by side: mamba(y) + attention(y)
            mamba, attention = self._mamba2(block.mamba), self._attention(block.self_attn)
            return lambda y, *step: mamba(y, *step).add_(attention(y, *step))
        if isinstance(block, qwen35.Block) and block.recurrent:
            return self._delta_net(block.linear_attn)
        if isinstance(block, qwen35.Block):
            return self._gated_attention(block.self_attn)
        if isinstance(block, (granite_hybrid.Block, nemotron_h.Block)) and block.recurrent:
            return self._mamba2(block.mamba)
        if block.recurrent:
            return self._short_conv(block.conv)
        return self._attention(block.self_attn)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """A hybrid whose layers were fused: one projection into each mixer (LFM2's convolutions and the
        Mamba-2 mixers have one already), qkv for attention, and gate|up (or a mixture of experts, or
        Nemotron-H's up alone)."""
        if type(model) not in (qwen35.Qwen35ForCausalLM, lfm2.Lfm2ForCausalLM, granite_hybrid.GraniteHybridForCausalLM,
                               nemotron_h.NemotronHForCausalLM, falcon_h1.FalconH1ForCausalLM):
            return False
        if 0 < len(model.config.no_rope_layers) < model.config.num_layers:  # one table for every attention layer
            return False
        for b in model.layers:
            mlp = getattr(b, "mlp", None)
            if mlp is not None and not isinstance(mlp, (KernelMoE, SparseMoE, nemotron_h.ReluSquaredMLP)) \
                    and getattr(mlp, "gate_up_proj", None) is None:
                return False
            if b.recurrent and getattr(getattr(b, b.mixer_name), "in_proj", None) is None:
                return False
            if hasattr(b, "self_attn") and getattr(b.self_attn, "qkv_proj", None) is None:
                return False
        return True

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: KernelPagedAttention,
                 keep: torch.Tensor | None = None, states: StepStates | None = None) -> torch.Tensor:
        assert states is not None, "a hybrid's recurrent layers run over the runner's per-sequence states"
        ops, eps = self.ops, self.eps
        h = self.embed(input_ids).float()  # (N, C): the residual stream
        if self.embed_scale is not None:
            h.mul_(self.embed_scale)
        cos, sin = self.model.rotary.table(positions)
        if self.nope:  # cos 1, sin 0: the rotation leaves q and k bitwise as they are
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        rows = torch.arange(h.shape[0])
        seqs = torch.tensor(states.rows, dtype=torch.int64).view(-1, 3)
        y = ops.rms_norm(h, self.sublayers[0][0], eps)
        for j, (_, i, mixer) in enumerate(self.sublayers):
            a = self.steps[i](y, rows, cos, sin, ctx, states, seqs) if mixer else self.mlps[i](y)
            if self.residual is not None:
                a.mul_(self.residual)
            if j + 1 < len(self.sublayers):
                y = ops.add_rms_norm(a, h, self.sublayers[j + 1][0], eps)  # h += a, and the next sublayer's norm
            else:
                h.add_(a)
        if keep is not None:
            h = h.index_select(0, keep)
        return ops.rms_norm(h, self.final_norm, eps)

    def replay(self, states: StepStates, rows: torch.Tensor, slot: int) -> None:
        """Run `rows` of a recorded step (one sequence's, in order) through its recurrent layers again,
        into `slot`'s states (put back to before the step first): the state those rows alone leave."""
        seqs = torch.tensor([[0, rows.numel(), slot]], dtype=torch.int64)
        for i, replay in self.replays.items():
            replay(*(t.index_select(0, rows) for t in states.record[i]), states.pools(i), seqs)

    def _replay_of(self, block: torch.nn.Module):
        if isinstance(block, qwen35.Block) or hasattr(block, "mamba"):  # a delta net's or a Mamba-2 mixer's
            run = self._delta_kernels(block.linear_attn) if isinstance(block, qwen35.Block) \
                else self._mamba2_kernels(block.mamba)
            return lambda p, pools, seqs: run(p, *pools, seqs)
        taps = _taps(block.conv.conv_weight)
        return lambda bx, pools, seqs: self.recurrent.causal_conv(bx, taps, pools[0], seqs, False)

    def _delta_kernels(self, net: qwen35.GatedDeltaNet):
        """(p = in_proj's [qkv | z | b | a], conv pool, state pool, seqs) -> the net's output before out_proj."""
        s, norm = net.shape, _weight(net.norm)
        c, z, b, a = torch.tensor((s.conv_channels, s.value_heads * s.value_dim, s.value_heads, s.value_heads)
                                  ).cumsum(0).tolist()
        taps, A, dt_bias = _taps(net.conv_weight), net.A.detach().float().contiguous(), \
            net.dt_bias.detach().float().contiguous()

        def run(p, conv, ssm, seqs):
            x = self.recurrent.causal_conv(p[:, :c], taps, conv, seqs, True)
            return self.recurrent.gated_delta(x, p[:, c:z], p[:, z:b], p[:, b:a], A, dt_bias, norm, ssm, seqs,
                                              s.key_heads, s.tiled_heads, self.eps)
        return run

    def _delta_net(self, net: qwen35.GatedDeltaNet):
        in_proj, out_proj, run = direct_call(net.in_proj), direct_call(net.out_proj), self._delta_kernels(net)

        def step(y, rows, cos, sin, ctx, states, seqs):
            p = in_proj(y)  # (N, qkv | z | b | a)
            if states.record is not None:
                states.record[net.layer_idx] = (p,)
            return out_proj(run(p, *states.pools(net.layer_idx), seqs))
        return step

    def _mamba2_kernels(self, mixer: granite_hybrid.Mamba2):
        """(p = in_proj's [z | xBC | dt], conv pool, state pool, seqs) -> the mixer's output before out_proj."""
        s, inner = mixer.shape, mixer.inner
        end = inner + s.conv_channels
        taps, bias = _taps(mixer.conv1d.weight), mixer.conv1d.bias.detach().float().contiguous()
        A, D, dt_bias = (t.detach().float().contiguous() for t in (mixer.A, mixer.D, mixer.dt_bias))
        norm = _weight(mixer.norm) if mixer.norm is not None else torch.empty(0)

        def run(p, conv, ssm, seqs):
            xbc = self.recurrent.causal_conv(p[:, inner:end], taps, conv, seqs, True, bias)
            return self.recurrent.ssm_scan(xbc, p[:, :inner], p[:, end:], A, D, dt_bias, norm, ssm, seqs,
                                           s.key_heads, self.eps)
        return run

    def _mamba2(self, mixer: granite_hybrid.Mamba2):
        in_proj, out_proj, run = direct_call(mixer.in_proj), direct_call(mixer.out_proj), self._mamba2_kernels(mixer)

        def step(y, rows, cos, sin, ctx, states, seqs):
            p = in_proj(y)  # (N, z | xBC | dt)
            if states.record is not None:
                states.record[mixer.layer_idx] = (p,)
            return out_proj(run(p, *states.pools(mixer.layer_idx), seqs))
        return step

    def _gated_attention(self, attn: qwen35.Attention):
        qkv_proj, o_proj = direct_call(attn.qkv_proj), direct_call(attn.o_proj)
        w_q, w_k, i = _weight(attn.q_norm), _weight(attn.k_norm), attn.layer_idx
        hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim

        def step(y, rows, cos, sin, ctx, states, seqs):
            p = qkv_proj(y)  # (N, q | gate | k | v)
            qkv = torch.cat([p[:, :hq * d], p[:, 2 * hq * d:]], dim=1)
            q = self.ops.rope_kv_write(qkv, rows, cos, sin, ctx.cache.kv[i], ctx.meta.slot_mapping, hq, hkv,
                                       q_norm=w_q, k_norm=w_k, norm_eps=self.eps)  # (N, Hq, D)
            o = ctx.attend_cached(i, q, scale=d**-0.5).flatten(1)
            return o_proj(self.recurrent.sigmoid_gate(o.contiguous(), p[:, hq * d:2 * hq * d]))
        return step

    def _short_conv(self, conv: lfm2.ShortConv):
        in_proj, out_proj, taps = direct_call(conv.in_proj), direct_call(conv.out_proj), _taps(conv.conv_weight)
        width = self.model.config.hidden_size

        def step(y, rows, cos, sin, ctx, states, seqs):
            bcx = in_proj(y)  # (N, b | c | x)
            pool, _ = states.pools(conv.layer_idx)
            bx = bcx[:, :width] * bcx[:, 2 * width:]
            if states.record is not None:
                states.record[conv.layer_idx] = (bx,)
            return out_proj(bcx[:, width:2 * width] * self.recurrent.causal_conv(bx, taps, pool, seqs, False))
        return step

    def _attention(self, attn: torch.nn.Module):
        """LFM2's and the Mamba-2 hybrids': Llama's attention as runner/fused.py's FusedAttention, with
        per-head q/k norms (LFM2's) or without (the others')."""
        qkv_proj, o_proj = direct_call(attn.qkv_proj), direct_call(attn.o_proj)
        norms = attn.q_norm is not None
        w_q, w_k, i = _weight(attn.q_norm) if norms else None, _weight(attn.k_norm) if norms else None, attn.layer_idx
        hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim

        def step(y, rows, cos, sin, ctx, states, seqs):
            q = self.ops.rope_kv_write(qkv_proj(y), rows, cos, sin, ctx.cache.kv[i], ctx.meta.slot_mapping, hq, hkv,
                                       q_norm=w_q, k_norm=w_k, norm_eps=self.eps)  # (N, Hq, D)
            return o_proj(ctx.attend_cached(i, q, scale=attn.scale, sliding_window=attn.sliding_window).flatten(1))
        return step
