"""A GGUF file's weights on the CPU kernels as the file stores them (load_model(codes=True)).

The loader hands over each linear weight as group codes (loader/group_codes.py); this
module packs them into runner/qlinear.py's layout, fuses q/k/v and gate/up where the parts
share a width, and replaces the embedding by a row reader of the mapped file. No float copy
of a quantized weight exists at any point, and the model's own nn.Linear weights stay on
the "meta" device: only the kernel forwards (runner/kernel_forward.py) run such a model.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from textmill.kernels import load
from textmill.loader.ggml_types import GGML_QUANT_SIZES
from textmill.loader.group_codes import (GROUP, PACKED_FROM_FILE_TYPES, CodesRef, GGUFRows, GroupCodes, concat,
                                         convertible, release_file_pages)
from textmill.runner.fused import fuse_gemma4_layers, fuse_gemma_layers, fuse_llama_layers, fuse_qwen35_layers
from textmill.runner.linear import swap_linears
from textmill.runner.moe import KernelMoE, stack_experts
from textmill.runner.qlinear import OutOfHalfRange, QLinear, SideBySide, width_form
from textmill.runner.weight_arena import WeightArena

HEAD = "lm_head.weight"
# The forms of 4 to 5 bits a weight that stacking in 8 bits would near double: beside an 8-bit
# part such a weight keeps its own form (SideBySide), as it does beside any other form.
_NARROW_FORMS = frozenset({"q2", "q3", "q4", "iq4", "mxfp4", "iq2"})


class RowEmbedding(nn.Module):
    """nn.Embedding's forward over a table left in the file: ids (N,) -> (N, C) float32."""

    def __init__(self, rows: GGUFRows):
        super().__init__()
        self.rows = rows
        self.num_embeddings, self.embedding_dim = rows.shape
        # models/gemma3.py rounds its embedding scale to the table's dtype: float32 here.
        self.weight = torch.empty(0, dtype=torch.float32)
        # The C++ lookup gives numpy's values bit for bit without its per-call temporaries.
        # (A float table whose rows are no whole number of 32-value groups, as a tiny model's
        # per-layer table, is read by numpy.)
        lookup = rows.qtype in PACKED_FROM_FILE_TYPES and convertible(rows.qtype, rows.shape)
        self._ext = load("quant") if lookup else None
        self._bytes = rows.flat_bytes() if self._ext is not None else None
        self._grid = rows.grid()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.cpu()
        if self._ext is None:
            return self.rows(ids)
        return self._ext.gguf_rows(self._bytes, int(self.rows.qtype), ids.long(), self.embedding_dim, self._grid)


def file_decoder() -> Callable[[GGUFRows], torch.Tensor | None] | None:
    """The float path's decoder for whole quantized tensors (load_model(decode=...)): the
    kernels' C++ block decoder, tested bit for bit against numpy's and parallel over rows.
    A 1B Q4_K_M file's float load: 1.2 s, numpy's 10-27 s (bench/float_load.py). None where
    the kernels do not build."""
    ext = load("quant")
    if ext is None:
        return None

    def decode(rows: GGUFRows) -> torch.Tensor | None:
        n, k = rows.shape
        if rows.qtype not in PACKED_FROM_FILE_TYPES or k % GROUP or k % GGML_QUANT_SIZES[rows.qtype][0]:
            return None
        return ext.gguf_rows(rows.flat_bytes(), int(rows.qtype), torch.arange(n), k, rows.grid())

    return decode


class _Maker:
    """Kernel layers for the model's linears, found by parameter name in the codes."""

    def __init__(self, model: nn.Module, codes: Mapping[str, CodesRef], arena: WeightArena | None):
        self.codes = codes
        self.arena = arena  # where weights packed from the file go
        self.names = {id(m): name for name, m in model.named_modules()}
        self.widths: dict[str, int] = {}

    def ref(self, linear: nn.Linear) -> CodesRef | None:
        """The file's tensor of this linear's weight, where it holds one in blocks."""
        return self.codes.get(f"{self.names.get(id(linear), '?')}.weight")

    def _codes(self, linear: nn.Linear) -> GroupCodes | None:
        ref = self.ref(linear)
        return None if ref is None else ref.load()

    def _count(self, source: str) -> None:
        self.widths[source] = self.widths.get(source, 0) + 1

    def _from_file(self, refs: list[CodesRef], bias: torch.Tensor | None, form: str | None = None) -> QLinear | None:
        """Packed straight from the file, or None where the Python converter must decide
        (a type it alone reads, or scales past a half's range)."""
        if not all(r.qtype in PACKED_FROM_FILE_TYPES for r in refs):
            return None
        try:
            made = QLinear.from_file(refs, bias, form, self.arena)
        except OutOfHalfRange:
            return None
        for r in refs:
            self._count(r.source)
        return made

    def one(self, linear: nn.Linear, codes: GroupCodes | None = None) -> nn.Module:
        if codes is None:
            ref = self.ref(linear)
            if ref is None:
                return linear  # a float tensor in the file: it loaded as a float weight
            made = self._from_file([ref], linear.bias)
            if made is not None:
                return made
            codes = ref.load()
        self._count(codes.source)
        return QLinear.from_codes(codes, linear.bias)

    def fused(self, parts: list[nn.Linear]) -> nn.Module:
        if len(parts) == 1:
            return self.one(parts[0])
        refs = [self.ref(p) for p in parts]
        if all(r is not None for r in refs):
            forms = {r.form for r in refs}
            if len(forms) > 1:
                # the k-quants' own forms take their type alone: beside another type of their
                # width (an IQ3_M file's IQ3_S q and Q4_K k) both go in that width's form, one matmul
                forms = {width_form(f) for f in forms}
            # A Q4_K_M file's Q4_K q/k beside a Q6_K v, a Q5_K_M file's Q5_K q/k beside a Q6_K v:
            if len(forms) > 1 and (forms & _NARROW_FORMS or "q8" not in forms):
                return SideBySide([self.fused(run) if len(run) > 1 else self.one(run[0])
                                   for run in _runs_of_equal_width(parts, refs)])
            # 5/6-bit parts beside an 8-bit one (Gemma 3's Q5_0 q/k and Q8_0 v) go in 8 bits,
            # one matmul. Apart (one call, SideBySide) they read a quarter fewer bytes, 0.76-0.84x
            # the time at one row, but the 5-bit form's unpacking makes 16-64 rows 1.05-1.19x:
            # under 1% of a step either way (docs/performance.md).
            made = self._from_file(refs, self._stacked_bias(parts), "q8" if len(forms) > 1 else forms.pop())
            if made is not None:
                return made
        found = [self._codes(p) for p in parts]
        if any(c is None for c in found) or len({c.bits for c in found}) > 1:
            return SideBySide([self.one(p, c) for p, c in zip(parts, found)])
        for c in found:
            self._count(c.source)
        return QLinear.from_codes(concat(found), self._stacked_bias(parts))

    def head(self, ref: CodesRef) -> QLinear:
        """A tied head packed from the embedding's own blocks."""
        made = self._from_file([ref], None)
        if made is not None:
            return made
        self._count(ref.source)
        return QLinear.from_codes(ref.load())

    @staticmethod
    def _stacked_bias(parts: list[nn.Linear]) -> torch.Tensor | None:
        biases = [p.bias for p in parts]
        if all(b is None for b in biases):
            return None
        return torch.cat([b if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts)])


def _runs_of_equal_width(parts: list[nn.Linear], refs: list[CodesRef]) -> list[list[nn.Linear]]:
    """Consecutive parts of one width, together: a Q4_K_M layer's q and k become one 4-bit
    matmul beside its 6-bit v, two calls (and two passes over the activations) instead of
    three."""
    runs: list[list[nn.Linear]] = []
    for i, (part, ref) in enumerate(zip(parts, refs)):
        if i and width_form(ref.form) == width_form(refs[i - 1].form):  # pack_gguf stacks parts of one form, whatever their types
            runs[-1].append(part)
        else:
            runs.append([part])
    return runs


def install_file_weights(model: nn.Module, codes: Mapping[str, CodesRef], rows: GGUFRows,
                         tables: Mapping[str, GGUFRows] | None = None) -> str:
    """Swap the model's linears and embedding for kernel layers; returns a line for the log.
    `tables`: other lookup tables to read from the file ("embed_tokens_per_layer.weight": rows)."""
    maker = _Maker(model, codes, WeightArena())
    model.embed_tokens = RowEmbedding(rows)
    tables = tables or {}
    for name, table in tables.items():
        setattr(model, name.removesuffix(".weight"), RowEmbedding(table))
    if HEAD in codes and getattr(model, "lm_head", 0) is None:  # tied: packed from the embedding's blocks
        model.lm_head = maker.head(codes[HEAD])
    # A mixture's experts, one packed weight per projection (runner/moe.py), before fusing
    # would pack each expert's MLP alone.
    for ref in stack_experts(model, maker.ref, maker.one, maker.arena):
        maker._count(ref.source)
    moes = sum(isinstance(m, KernelMoE) for m in model.modules())
    fused = sum(fuse(model, maker.fused) for fuse in (fuse_llama_layers, fuse_gemma_layers, fuse_gemma4_layers,
                                                   fuse_qwen35_layers))
    count = swap_linears(model, maker.one)
    release_file_pages([r.raw for r in codes.values()] + [rows.raw] + [t.raw for t in tables.values()])
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(maker.widths.items()))
    experts = f", {moes} mixtures of experts stacked" if moes else ""
    return (f"the file's own blocks as 2- to 8-bit codes ({kinds}); {fused} attention/MLP modules fused{experts}, "
            f"{count} more linears")
