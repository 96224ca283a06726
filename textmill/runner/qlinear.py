"""Weight-only 4-bit / 8-bit linear layers on our own C++ kernels (kernels/csrc/quant.cpp).

QLinear holds only packed weights, in groups of 32 along the input dimension:
* "q4": codes 0..15 with a scale and a min per group, w = d*q + m: GGUF's Q4_1, so the
  Q4_1 layers of a GGUF checkpoint requantize to exactly the weights it stores (and Q4_0,
  Q4_K, IQ3_S and IQ1_S map onto it).
* "q4k", "q5k", "q6k": GGUF's Q4_K, Q5_K and Q6_K as they are: q4's (q5's, q6's) codes and
  arithmetic, each scale (and min) an integer of the file's (6 bits; Q6_K's int8 per 16)
  times a half of its 256-weight super-block, D*sc exactly where q4, q5 and q6 round it to
  a half; 4.625, 5.625 and 6.5625 bits a weight where those take 5, 6 and 7.
* "q8": codes -127..127 with one scale per group, w = d*q: GGUF's Q8_0.
* "q5": codes 0..31 with a scale and a min per group, w = d*q + m: GGUF's Q5_1 (Q5_0
  and Q5_K map onto it); 6 bits a weight where q8 takes 8.5.
* "q6": codes 0..63 with one scale per 16 weights, w = d_h*(q - 32): GGUF's Q6_K (and
  Q3_K, its codes -4..3 held as 28..35; IQ3_XXS and IQ1_M); 7 bits.
* "q3": codes 0..7 with one scale per 16 weights, w = d_h*(q - 4): GGUF's Q3_K; 4 bits,
  computed as q6 on q + 28.
* "q2": codes 0..3 with a scale and a min per 16 weights, w = d_h*q + m_h: GGUF's Q2_K;
  4 bits, computed as q6 on the codes plus each half's min term.
* "iq4": 4-bit indices into GGUF's IQ4 table of 16 int8 values, one scale per group:
  w = d*T[q] (IQ4_NL, IQ4_XS); computed as q8 on the looked-up values; 4.5 bits.
* "mxfp4": iq4's form on GGUF MXFP4's table (0, 1, 2, 3, 4, 6, 8, 12 and their negatives: e2m1's
  values doubled) with a power-of-two scale 2^(e - 128) as a half (gpt-oss's experts); 4.5 bits.
* "iq2": 4-bit indices into the IQ2 types' six values (-43, -25, -8, 8, 25, 43), one scale
  per 16 weights: w = d_h*T2[q] (IQ2_XXS, IQ2_XS, IQ2_S); computed as q6 on the looked-up
  values; 5 bits.
Scales are stored as halves, as GGUF stores them.

Each call quantizes the activations to int8 per group of 32 (one scale per group) and
computes integer dot products (AVX2 maddubs, VNNI dpbusd), llama.cpp's method. So a result
differs from F.linear(x, dequantized weight) by the activation rounding alone: at most
sum over groups of (group scale / 2) * sum|w| of that group, per output; in practice
~0.3% of the output's magnitude. It serves any number of rows M: weights are unpacked once
per tile of 16 output rows and reused for up to 4 activation rows in registers.

Measured against float32 F.linear (MKL), bench/kernel_quant.py, weights cold as in a decode
step. Zen 1 (2 cores, AVX2, no VNNI): q4 takes 0.1-0.25 of the float32 time at M = 1..4,
~0.5 at 16, ~0.7 at 64, ~0.75 at 256; q8 0.15-0.4 at M = 1..4, ~0.7 at 16 and 1.0-1.15 from
M = 64 on (16 integer multiplies per 256 weights on a core with one multiply port). Zen 5
(2 cores, 512-bit VNNI): q4 0.05-0.13 at M = 1..16, ~0.2 at 64 and 256; q8 0.1-0.2 and
0.25-0.3. So there is no dense fallback: q4 never needs one, and for q8 a dense float32
copy would cost 4x its memory to gain at most ~10% on big prefills of an AVX2-only CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from textmill.kernels import load
from textmill.loader.group_codes import CodesRef, GroupCodes
from textmill.runner.row_buffer import RowBuffer
from textmill.runner.weight_arena import WeightArena

TILE_ROWS = 16  # output rows a packed tile holds (quant.cpp's NR): a weight's rows are packed in whole tiles
# CodesRef.form names a file tensor's form among these
MODES = ("q2", "q3", "q4", "q4k", "q5", "q5k", "q6", "q6k", "q8", "iq4", "mxfp4", "iq2")
# The k-quants' own forms and the form of their width, which also takes their types (their
# scales rounded to halves) and computes the same way.
_WIDTH_OF = {"q4k": "q4", "q5k": "q5", "q6k": "q6"}


def width_form(form: str) -> str:
    """The form of `form`'s width: q4, q5 or q6 for the k-quants' own forms, else itself.
    Parts of mixed types stack in it (runner/file_weights.py)."""
    return _WIDTH_OF.get(form, form)


GROUP = 32
# Scales and the Q4 min are halves: weights beyond this magnitude would overflow them.
_HALF_MAX = 65504.0


def _ext():
    return load("quant")


def available() -> bool:
    """The C++ extension builds and loads on this machine."""
    return _ext() is not None


def supports(linear: nn.Module, mode: str) -> bool:
    """QLinear.from_linear(linear, mode) will work: a plain CPU nn.Linear whose in_features is
    a multiple of 32, with finite weights that halves can scale, and the extension loads."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not isinstance(linear, nn.Linear):
        return False
    w = linear.weight
    if w.device.type != "cpu" or w.dim() != 2 or not w.dtype.is_floating_point:
        return False
    if w.shape[1] % GROUP or w.shape[1] == 0 or w.shape[0] == 0:
        return False
    amax = w.detach().abs().max().item()
    return amax < _HALF_MAX and amax == amax and available()  # amax == amax: no NaN


class QLinear(nn.Module):
    """y = x @ W.T + b with W packed in one of MODES; x (..., K) float32 (or bf16/f16, computed in
    float32) -> (..., N) in x's dtype."""

    def __init__(self, packed: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)
        # Set by the runner on its LM head only (reuse_output): float32 results are then
        # written into this buffer and returned as views of it.
        self.output: RowBuffer | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str) -> "QLinear":
        if not supports(linear, mode):
            raise ValueError(f"cannot quantize {linear} to {mode}: needs a CPU nn.Linear with in_features "
                             f"a multiple of {GROUP}, finite weights below {_HALF_MAX}, and the C++ kernels")
        ext = _ext()
        weight = linear.weight.detach().float().contiguous()
        packed = getattr(ext, f"{mode}_pack")(weight)
        bias = _own_bias(linear.bias)
        return cls(packed, weight.shape[1], weight.shape[0], bias, mode)

    @classmethod
    def from_codes(cls, codes: GroupCodes, bias: torch.Tensor | None = None) -> "QLinear":
        """Pack a loader's group codes as they are: no float copy, no second rounding."""
        ext = _ext()
        if ext is None:
            raise ValueError("group codes need textmill's C++ kernels, which could not be built here")
        n, k = codes.shape
        if codes.bits == 4:
            packed, mode = ext.q4_pack_codes(codes.codes, codes.scale, codes.min), "q4"
        else:
            packed, mode = ext.q8_pack_codes(codes.codes, codes.scale), "q8"
        return cls(packed, k, n, _own_bias(bias), mode)

    @classmethod
    def from_file(cls, refs: list[CodesRef], bias: torch.Tensor | None = None, form: str | None = None,
                  arena: WeightArena | None = None) -> "QLinear":
        """GGUF tensors of one form (CodesRef.form), stacked along N, packed straight from the
        mapped file by the C++ converter, in one pass with no intermediate codes: for the
        types group_codes converts itself, in the q4 and q8 forms the bytes from_codes would
        pack. Forms q4, q5 and q6 also take Q4_K, Q5_K and Q6_K (forms q4k, q5k, q6k), form q8
        the types of every narrower form (their 8-bit codes). Raises OutOfHalfRange when a scale does not fit a half;
        the caller then takes from_codes' path, which rounds such a tensor to 8 bits.
        `arena`: where the packed bytes go (runner/weight_arena.py), else a tensor of their own."""
        ext = _ext()
        if ext is None:
            raise ValueError("GGUF weights need textmill's C++ kernels, which could not be built here")
        form, k = form or refs[0].form, refs[0].shape[1]
        assert all((form in (r.form, width_form(r.form))
                    or (form == "q8" and width_form(r.form) in ("q2", "q3", "q5", "q6", "iq4", "mxfp4", "iq2")))
                   and r.shape[1] == k
                   for r in refs), "parts of one form and width"
        no_order = torch.empty(0, dtype=torch.long)
        orders = [no_order if r.row_order is None else r.row_order.long().contiguous() for r in refs]
        n = sum(r.shape[0] for r in refs)
        try:
            packed = ext.pack_gguf(form, [r.flat_bytes() for r in refs], [int(r.qtype) for r in refs], orders, k,
                                   [r.grid() for r in refs],
                                   out=None if arena is None else arena.take(ext.packed_bytes(form, n, k)))
        except RuntimeError as exc:
            if "half range" in str(exc):
                raise OutOfHalfRange(str(exc)) from None
            raise
        return cls(packed, k, n, _own_bias(bias), form)

    def op(self):
        """The kernel for this layer's form: op(x, packed, out_features, bias)."""
        return getattr(_ext(), f"{self.mode}_linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = self.op()
        if x.dim() == 2:
            out = self.output.rows(x.shape[0]) if self.output is not None and x.dtype == torch.float32 else None
            return op(x, self.packed, self.out_features, self.bias, out=out)
        y = op(x.reshape(-1, self.in_features), self.packed, self.out_features, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The (N, K) float32 weights this layer computes with."""
        n, k = self.out_features, self.in_features
        width = width_form(self.mode)
        if width in ("q4", "q5", "q2"):  # a scale and a min per group (q2: per 16)
            codes, d, m = getattr(_ext(), f"{self.mode}_unpack")(self.packed, n, k)
            w = codes.float().view(n, d.shape[1], -1) * d[..., None] + m[..., None]
        elif width in ("q6", "q3", "iq2"):  # a scale per 16; iq2's codes are its table values
            codes, d = getattr(_ext(), f"{self.mode}_unpack")(self.packed, n, k)
            w = (codes.float() - {"q6": 32.0, "q3": 4.0, "iq2": 0.0}[width]).view(n, -1, GROUP // 2) * d[..., None]
        else:  # q8, or iq4's and mxfp4's table values
            codes, d = getattr(_ext(), f"{self.mode}_unpack")(self.packed, n, k)
            w = codes.float().view(n, -1, GROUP) * d[..., None]
        return w.view(n, k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode} ({self.packed.numel() / 2**20:.1f} MiB packed)")


def reuse_output(layer: nn.Module, max_bytes: int) -> bool:
    """Have a QLinear (the runner's LM head) write its float32 results into one reused
    buffer of up to max_bytes (runner/row_buffer.py says why); False for any other layer."""
    if type(layer) is not QLinear:
        return False
    layer.output = RowBuffer(layer.out_features, max_bytes=max_bytes)
    return True


def _own_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 copy the layer owns (the model's parameter may be freed or changed)."""
    return None if bias is None else bias.detach().float().contiguous().clone()


class OutOfHalfRange(ValueError):
    """A GGUF tensor's scales or mins do not fit the kernels' half-precision scales."""


class SideBySide(nn.Module):
    """Linears over one input whose outputs are concatenated: q, k and v when the file
    stores them in different widths (a Q4_K_M file's Q4_K q/k beside a Q6_K v), kept apart
    rather than rounded to one width."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if all(type(p) is QLinear for p in self.parts):
            # One kernel call for all parts: one activation quantization and one parallel
            # region instead of one a part, the columns written side by side (no cat).
            # Bitwise the concatenation of the parts' own results.
            ext = _ext()
            parts = [(ext.mode_number(p.mode), p.packed, p.out_features, p.bias) for p in self.parts]
            y = ext.linear_parts(x.reshape(-1, x.shape[-1]), parts)
            return y.view(*x.shape[:-1], self.out_features)
        return torch.cat([p(x) for p in self.parts], dim=-1)
