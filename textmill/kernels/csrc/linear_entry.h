// The quantized linear as one C++ function that another extension can call.
//
// quant.cpp owns the linear kernels, layer.cpp the rest of a decoder layer; each is its own
// extension module. layer.cpp's Forward runs a whole forward pass in one call from Python,
// so it must call the linears without Python in between: quant.cpp hands it a LinearEntry
// (below), the linear's functions, in a Python capsule named kLinearCapsule. Both modules are
// built by the same compiler against the same libtorch, so passing torch::Tensor across is safe.
#pragma once

#include <torch/extension.h>

namespace textmill {

// One part of a weight whose parts' outputs go side by side (a Q4_K q/k beside a Q6_K v),
// or a whole weight: packed in form `mode` (quant.cpp's Mode, as the number quant's
// mode_number() gives for a form's name).
struct LinearPart {
  int64_t mode;
  const torch::Tensor* packed;
  int64_t n;
  const c10::optional<torch::Tensor>* bias;
};

// y (M, sum of n) = x (M, K) @ [W_0 | W_1 | ...]^T (+ biases), in one call: each part's
// columns bitwise what quant's <form>_linear gives for that part alone (one part: a linear).
using LinearPartsFn = torch::Tensor (*)(const LinearPart* parts, int64_t count, const torch::Tensor& x);

struct LinearEntry {
  LinearPartsFn parts;
};

// Versioned: a layer module built against another LinearEntry refuses the capsule instead of
// misreading it (bench/step_ab.py builds layer.cpp at older revisions).
inline constexpr const char* kLinearCapsule = "textmill.linear_entry.2";

}  // namespace textmill
