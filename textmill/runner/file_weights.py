"""A GGUF file's weights on the CPU kernels as the file stores them (load_model(codes=True)).

The loader hands over each linear weight as group codes (loader/group_codes.py); this
module packs them into runner/qlinear.py's layout, fuses q/k/v and gate/up where the parts
share a width, and replaces the embedding by a row reader of the mapped file. No float copy
of a quantized weight exists at any point, and the model's own nn.Linear weights stay on
the "meta" device: only the kernel forwards (runner/kernel_forward.py) run such a model.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from textmill.loader.group_codes import CodesRef, GGUFRows, GroupCodes, concat
from textmill.runner.fused import fuse_gemma_layers, fuse_llama_layers
from textmill.runner.linear import swap_linears
from textmill.runner.qlinear import QLinear, SideBySide

HEAD = "lm_head.weight"


class RowEmbedding(nn.Module):
    """nn.Embedding's forward over a table left in the file: ids (N,) -> (N, C) float32."""

    def __init__(self, rows: GGUFRows):
        super().__init__()
        self.rows = rows
        self.num_embeddings, self.embedding_dim = rows.shape
        # models/gemma3.py rounds its embedding scale to the table's dtype: float32 here.
        self.weight = torch.empty(0, dtype=torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids.cpu())


class _Maker:
    """Kernel layers for the model's linears, found by parameter name in the codes."""

    def __init__(self, model: nn.Module, codes: Mapping[str, CodesRef]):
        self.codes = codes
        self.names = {id(m): name for name, m in model.named_modules()}
        self.widths: dict[str, int] = {}

    def _codes(self, linear: nn.Linear) -> GroupCodes | None:
        ref = self.codes.get(f"{self.names.get(id(linear), '?')}.weight")
        return None if ref is None else ref.load()

    def one(self, linear: nn.Linear, codes: GroupCodes | None = None) -> nn.Module:
        codes = codes or self._codes(linear)
        if codes is None:
            return linear  # a float tensor in the file: it loaded as a float weight
        self.widths[codes.source] = self.widths.get(codes.source, 0) + 1
        return QLinear.from_codes(codes, linear.bias)

    def fused(self, parts: list[nn.Linear]) -> nn.Module:
        found = [self._codes(p) for p in parts]
        if len(parts) == 1 or any(c is None for c in found) or len({c.bits for c in found}) > 1:
            made = [self.one(p, c) for p, c in zip(parts, found)]
            return made[0] if len(made) == 1 else SideBySide(made)
        biases = [p.bias for p in parts]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts)])
        for c in found:
            self.widths[c.source] = self.widths.get(c.source, 0) + 1
        return QLinear.from_codes(concat(found), bias)


def install_file_weights(model: nn.Module, codes: Mapping[str, CodesRef], rows: GGUFRows) -> str:
    """Swap the model's linears and embedding for kernel layers; returns a line for the log."""
    maker = _Maker(model, codes)
    model.embed_tokens = RowEmbedding(rows)
    if HEAD in codes and getattr(model, "lm_head", 0) is None:  # tied: packed from the embedding's blocks
        model.lm_head = QLinear.from_codes(codes[HEAD].load())
        maker.widths[codes[HEAD].source] = maker.widths.get(codes[HEAD].source, 0) + 1
    fused = fuse_llama_layers(model, maker.fused) + fuse_gemma_layers(model, maker.fused)
    count = swap_linears(model, maker.one)
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(maker.widths.items()))
    return f"the file's own blocks as 4/8-bit codes ({kinds}); {fused} attention/MLP modules fused, {count} more linears"
