"""Fast linear layers for the CPU, swapped in for the model's nn.Linear after loading.

Models stay plain nn.Modules; the runner replaces their nn.Linear children here, the way
gpt-fast does for quantization, so no model file knows about kernels.

* PackedLinear (bfloat16): the weight is reordered once into oneDNN's blocked layout. An
  nn.Linear hands oneDNN a plain (N, K) weight, which the AMX/AVX-512 kernels reformat on
  every call: at decode sizes that reformatting costs as much as the product itself.
  The result is the same, bit for bit (same kernel, same summation order).
* QuantLinear (runner/quant.py): int8 or int4 weights for steps of a few tokens, where the
  product is bound by memory reads.

A tied LM head (logits from the embedding matrix) gets a linear of its own as `lm_head`:
the models' head_logits() calls `lm_head` whenever it is set, so the head is swapped too.
"""
from __future__ import annotations

import torch
from torch import nn

# oneDNN picks its blocking for this batch size; the packed weight serves any batch.
_PACK_BATCH_HINT = 16


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU whose oneDNN has bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT: the
    weight reorder refuses plain AVX2 CPUs). float32 keeps nn.Linear (MKL)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W pre-packed for oneDNN; x (M, K) bf16 -> (M, N) bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        assert weight.dtype == torch.bfloat16 and weight.dim() == 2
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # An opaque oneDNN tensor, kept as a plain attribute: state_dict and .to() must not
        # see it (it has no strides to copy).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_BATCH_HINT)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16).contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


def swap_linears(model: nn.Module, make) -> int:
    """Replace every nn.Linear below `model` by make(linear); returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
                count += 1
    return count


def tie_head_as_linear(model: nn.Module, vocab_size: int) -> bool:
    """Give a tied model an `lm_head` Linear over its embedding matrix, so that a swap
    reaches the LM head too. False when the model has no `lm_head = None` slot or no
    embedding of the vocabulary's size."""
    if not hasattr(model, "lm_head") or model.lm_head is not None:
        return False
    embeds = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size]
    if len(embeds) != 1:
        return False
    weight = embeds[0].weight
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = weight  # shared, not copied: the swap then makes its own packed copy
    model.lm_head = head
    return True
