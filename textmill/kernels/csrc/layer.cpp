// Fused per-layer kernels for Llama-style decoder layers on CPU, float32.
//
// On a small model a decode step is dominated by eager torch's per-op cost (a few us of
// dispatch and allocation per op, ~60 ops per layer), not by the math. Each function here
// replaces a run of those ops with one call:
//   rms_norm         RMSNorm                                        (8 eager ops)
//   add_rms_norm     residual add + RMSNorm, residual updated in place
//   rope_kv_write    [QK norm +] RoPE on q and k + the paged KV cache write (~12-30 eager ops)
//   silu_mul         SwiGLU's silu(gate) * up                       (3 eager ops)
//   gelu_tanh_mul    GeGLU's gelu_tanh(gate) * up                   (3 eager ops)
//   paged_attention  attention straight from the paged cache through the block table:
//                    no context gather, no mask tensors            (~20 eager ops)
//   dense_rows, moe_route, moe_combine: a mixture of experts' router and weighted sum
//   Forward          all of a model's layers in one call: the calls above and the linears
//                    (quant.cpp's, through linear_entry.h) in kernel_forward.py's order
// rope_kv_write and paged_attention take a float32, float16, bfloat16 or int8 cache (below).
//
// Vector code is written once against the small `Vec` wrapper below, which maps to AVX-512,
// AVX2+FMA or plain scalar floats depending on what -march=native enables on the machine
// that builds it, so the same source is correct everywhere and fast on x86-64.
//
// The paged KV cache may hold float32, float16 or bfloat16 (`KV` below): activations and
// all arithmetic stay float32; rope_kv_write rounds k and v once when it stores them
// (round to nearest even, as torch's .to() does) and paged_attention widens each key and
// value as it loads it (exact). So a 16-bit pool gives bitwise the results of a float32
// pool holding the same, rounded, values.
//
// An int8 pool stores each head's row of D values as D codes and then its scale, a float32
// in the row's last 4 bytes (rows of D + 4 bytes): s = max|x| / 127, code = round(x / s)
// (computed as x * (1 / s), ties to even). Attention widens the codes exactly and applies
// the scales outside the inner loops: a key's score is s_k * (q . codes), and each value
// row's probability is multiplied by its s_v before the values are summed. Half the bytes
// of a 16-bit pool (68 against 128 for D = 64), for the reads that bound batched decode.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

#include "linear_entry.h"
#include "vec.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Vec (vec.h): one SIMD register of floats, and W, its width; exp_tail, the scalar exp of the
// elements that do not fill one.

// ---------------------------------------------------------------------------------------
// KV cache elements: KVIO<KV>::load/store move one register of floats from/to W cache
// elements, to_float/from_float one element (the tails, and the scalar build). Widening is
// exact; narrowing rounds to nearest even. Vector and scalar narrowing give the same bits
// for every value but NaN payloads (a NaN stays a NaN): the F16C/AVX-512 conversion
// instructions for float16, the same integer rounding as c10's for bfloat16.
// ---------------------------------------------------------------------------------------
inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// bfloat16 is float32's upper half: keep it after adding half an ulp of it, ties to even.
// A NaN becomes the canonical quiet NaN (c10::BFloat16's choice; the add could carry a NaN
// with a low payload into infinity).
inline uint16_t bf16_round(float x) {
  if (std::isnan(x)) return 0x7FC0;
  const uint32_t u = float_bits(x);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

template <typename KV>
struct KVIO;

template <>
struct KVIO<float> {
  static Vec::T load(const float* p) { return Vec::load(p); }
  static void store(float* p, Vec::T v) { Vec::store(p, v); }
  static float to_float(float x) { return x; }
  static float from_float(float x) { return x; }
};

template <>
struct KVIO<at::Half> {
  // c10::Half's conversions: exact widening, round-to-nearest-even narrowing.
  static float to_float(at::Half x) { return static_cast<float>(x); }
  static at::Half from_float(float x) { return at::Half(x); }
#if defined(__AVX512F__)
  static Vec::T load(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(at::Half* p, Vec::T v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  static Vec::T load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(at::Half* p, Vec::T v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#elif defined(__AVX2__) && defined(__FMA__)  // AVX2 without F16C: element by element
  static Vec::T load(const at::Half* p) {
    alignas(32) float f[W];
    for (int i = 0; i < W; ++i) f[i] = to_float(p[i]);
    return Vec::load(f);
  }
  static void store(at::Half* p, Vec::T v) {
    alignas(32) float f[W];
    Vec::store(f, v);
    for (int i = 0; i < W; ++i) p[i] = from_float(f[i]);
  }
#else
  static Vec::T load(const at::Half* p) { return to_float(*p); }
  static void store(at::Half* p, Vec::T v) { *p = from_float(v); }
#endif
};

template <>
struct KVIO<at::BFloat16> {
  static float to_float(at::BFloat16 x) { return bits_float(static_cast<uint32_t>(x.x) << 16); }
  static at::BFloat16 from_float(float x) { return at::BFloat16(bf16_round(x), at::BFloat16::from_bits()); }
#if defined(__AVX512F__)
  static Vec::T load(const at::BFloat16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void store(at::BFloat16* p, Vec::T v) {  // bf16_round, 16 lanes at once
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  static Vec::T load(const at::BFloat16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void store(at::BFloat16* p, Vec::T v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // 8 x 32 -> 8 x 16 bits: packus works within 128-bit lanes, the permute joins them.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
#else
  static Vec::T load(const at::BFloat16* p) { return to_float(*p); }
  static void store(at::BFloat16* p, Vec::T v) { *p = from_float(v); }
#endif
};

// int8 codes (the scale is applied by the callers; see the top of this file). Widening is
// exact; there is no per-element narrowing: rows are quantized whole (quantize_kv_row).
template <>
struct KVIO<int8_t> {
  static float to_float(int8_t x) { return static_cast<float>(x); }
#if defined(__AVX512F__)
  static Vec::T load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  static Vec::T load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#else
  static Vec::T load(const int8_t* p) { return to_float(*p); }
#endif
};

template <typename KV>
constexpr bool kQuantizedKV = std::is_same_v<KV, int8_t>;
constexpr int64_t kKVScaleBytes = 4;  // an int8 row's float32 scale, after its D codes
// Cache elements per head row: D, or D codes and the scale for an int8 pool.
inline int64_t kv_row(bool int8_pool, int64_t d) { return int8_pool ? d + kKVScaleBytes : d; }
template <typename KV>
constexpr int64_t kv_row(int64_t d) { return kQuantizedKV<KV> ? d + kKVScaleBytes : d; }
// The scale of an int8 row of D codes (1 for the float pools, never called for them).
template <typename KV>
inline float kv_scale(const KV* row, int64_t d) {
  float s = 1.f;
  if constexpr (kQuantizedKV<KV>) std::memcpy(&s, row + d, sizeof s);
  return s;
}
// x (D floats) into an int8 row: codes, then the scale.
inline void quantize_kv_row(const float* x, int8_t* dst, int64_t d) {
  float amax = 0.f;
  for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax / 127.f;
  const float inv = s > 0.f ? 1.f / s : 0.f;
  for (int64_t i = 0; i < d; ++i)
    dst[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] * inv))));
  std::memcpy(dst + d, &s, sizeof s);
}

// n floats from src into the cache elements at dst.
template <typename KV>
inline void store_row(const float* src, KV* dst, int64_t n) {
  if constexpr (std::is_same_v<KV, float>) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    int64_t i = 0;
    for (; i + W <= n; i += W) KVIO<KV>::store(dst + i, Vec::load(src + i));
    for (; i < n; ++i) dst[i] = KVIO<KV>::from_float(src[i]);
  }
}

void check_kv(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": must be a CPU tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == torch::kFloat || st == torch::kHalf || st == torch::kBFloat16 || st == torch::kChar, name,
              ": must be float32, float16, bfloat16 or int8, got ", st);
  TORCH_CHECK(t.dim() == dim, name, ": must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
}

// f(KV{}) with KV the C++ type of the cache's dtype (checked by check_kv).
template <typename F>
auto dispatch_kv(const torch::Tensor& cache, F&& f) {
  switch (cache.scalar_type()) {
    case torch::kHalf:
      return f(at::Half{});
    case torch::kBFloat16:
      return f(at::BFloat16{});
    case torch::kChar:
      return f(int8_t{});
    default:
      return f(float{});
  }
}

// ---------------------------------------------------------------------------------------
// Argument checks: a wrong shape from the runner must be a Python error, never a bad read.
// ---------------------------------------------------------------------------------------
void check_f32(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat, name, ": must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, ": must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
}

void check_i64(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kLong, name, ": must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, ": must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": must be contiguous");
}

// Rows per parallel task so that one task is a few tens of thousands of elements: smaller
// steps (decode) then run inline instead of paying for a thread wake-up.
int64_t row_grain(int64_t row_elems, int64_t target = 32768) {
  return std::max<int64_t>(1, target / std::max<int64_t>(1, row_elems));
}

// ---------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------
inline float sum_squares(const float* x, int64_t n) {
  // Four accumulators: an FMA's latency is several cycles, one chain would stall on it.
  Vec::T a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    Vec::T v0 = Vec::load(x + i), v1 = Vec::load(x + i + W);
    Vec::T v2 = Vec::load(x + i + 2 * W), v3 = Vec::load(x + i + 3 * W);
    a0 = Vec::fma(v0, v0, a0);
    a1 = Vec::fma(v1, v1, a1);
    a2 = Vec::fma(v2, v2, a2);
    a3 = Vec::fma(v3, v3, a3);
  }
  for (; i + W <= n; i += W) {
    Vec::T v = Vec::load(x + i);
    a0 = Vec::fma(v, v, a0);
  }
  float s = Vec::sum(Vec::add(Vec::add(a0, a1), Vec::add(a2, a3)));
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// y = w * (x * inv), the eager order of the two products.
inline void scale_by_weight(const float* x, float inv, const float* w, float* y, int64_t n) {
  const Vec::T vi = Vec::set1(inv);
  int64_t i = 0;
  for (; i + W <= n; i += W) Vec::store(y + i, Vec::mul(Vec::load(w + i), Vec::mul(Vec::load(x + i), vi)));
  for (; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

inline float inv_rms(float sum_sq, int64_t n, double eps) {
  return 1.f / std::sqrt(sum_sq / static_cast<float>(n) + static_cast<float>(eps));
}

void check_norm_args(const torch::Tensor& x, const torch::Tensor& w) {
  check_f32(x, "x", 2);
  check_f32(w, "w", 1);
  TORCH_CHECK(w.size(0) == x.size(1), "w: expected (", x.size(1), ",), got ", w.sizes());
}

// y = w * (x * rsqrt(mean(x^2) + eps)), row by row. x (M, C).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_norm_args(x, w);
  const int64_t m = x.size(0), c = x.size(1);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, m, row_grain(c), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * c;
      scale_by_weight(row, inv_rms(sum_squares(row, c), c, eps), wp, yp + r * c, c);
    }
  });
  return y;
}

// residual += x (in place), then y = rms_norm(residual): the "x = x + attn(..)" of a block
// and the next norm in one pass over the row.
torch::Tensor add_rms_norm(const torch::Tensor& x, torch::Tensor residual, const torch::Tensor& w, double eps) {
  check_norm_args(x, w);
  check_f32(residual, "residual", 2);
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual: expected shape ", x.sizes(), ", got ", residual.sizes());
  const int64_t m = x.size(0), c = x.size(1);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, m, row_grain(c), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * c;
      float* rr = rp + r * c;
      int64_t i = 0;
      for (; i + W <= c; i += W) Vec::store(rr + i, Vec::add(Vec::load(rr + i), Vec::load(xr + i)));
      for (; i < c; ++i) rr[i] += xr[i];
      // The row was just written: the second pass reads it from L1.
      scale_by_weight(rr, inv_rms(sum_squares(rr, c), c, eps), wp, yp + r * c, c);
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------
// Greedy argmax
// ---------------------------------------------------------------------------------------
// The first index of each row's maximum, a NaN counting as the maximum (its first one), as
// torch.max and numpy.argmax pick. numpy's SIMD argmax ran on one thread while the other
// waited: 0.9 ms of Gemma 3's 16-stream step (16 x 262,144 logits), 3.5 ms at 64 streams.
// Here rows are cut into chunks, the chunks are spread over the threads, and each row's
// chunk results are merged in order (an earlier chunk keeps a tie), so the answer does not
// depend on the split.

constexpr int64_t kArgmaxChunk = 16384;

struct ArgmaxPart {
  float value;
  int64_t index;  // into the row
  bool nan;       // index is the chunk's first NaN
};

// x[lo, hi) of one row (lo is the chunk's first column).
ArgmaxPart argmax_chunk(const float* x, int64_t lo, int64_t hi) {
  if (std::isnan(x[lo])) return {x[lo], lo, true};
  float best = x[lo];
  int64_t at = lo, j = lo + 1;
#if defined(__AVX512F__)
  if (hi - lo >= 16) {
    __m512 bv = _mm512_loadu_ps(x + lo);
    __m512i bi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);  // from lo
    __mmask16 unordered = _mm512_cmp_ps_mask(bv, bv, _CMP_UNORD_Q);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i ci = bi;
    for (j = lo + 16; j + 16 <= hi; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      ci = _mm512_add_epi32(ci, step);
      unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);  // strictly: a lane keeps its first
      bv = _mm512_mask_mov_ps(bv, gt, v);
      bi = _mm512_mask_mov_epi32(bi, gt, ci);
    }
    if (unordered) {  // rare: find the first NaN the plain way
      for (int64_t i = lo; i < j; ++i)
        if (std::isnan(x[i])) return {x[i], i, true};
    }
    alignas(64) float vals[16];
    alignas(64) int32_t idx[16];
    _mm512_store_ps(vals, bv);
    _mm512_store_si512(idx, bi);
    best = vals[0], at = idx[0];
    for (int l = 1; l < 16; ++l)  // the largest lane value, and of equal ones the lowest index
      if (vals[l] > best || (vals[l] == best && idx[l] < at)) best = vals[l], at = idx[l];
    at += lo;
  }
#endif
  for (; j < hi; ++j) {  // the tail (or the whole chunk without AVX-512)
    if (std::isnan(x[j])) return {x[j], j, true};
    if (x[j] > best) best = x[j], at = j;
  }
  return {best, at, false};
}

torch::Tensor argmax_rows(const torch::Tensor& x) {
  check_f32(x, "x", 2);
  const int64_t m = x.size(0), v = x.size(1);
  TORCH_CHECK(v > 0, "x: rows of at least one value");
  auto out = torch::empty({m}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t chunks = (v + kArgmaxChunk - 1) / kArgmaxChunk;
  std::vector<ArgmaxPart> parts(m * chunks);
  // ~4 chunks (256 KB of logits) a piece of work: below that, one thread.
  at::parallel_for(0, m * chunks, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r = p / chunks, c = p % chunks;
      parts[p] = argmax_chunk(xp + r * v, c * kArgmaxChunk, std::min(v, (c + 1) * kArgmaxChunk));
    }
  });
  for (int64_t r = 0; r < m; ++r) {
    ArgmaxPart best = parts[r * chunks];
    for (int64_t c = 1; c < chunks && !best.nan; ++c) {
      const ArgmaxPart& p = parts[r * chunks + c];
      if (p.nan || p.value > best.value) best = p;
    }
    op[r] = best.index;
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------
// out = silu(gate) * up with silu(g) = g / (1 + exp(-g)); gate_up rows are [gate | up].
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_f32(gate_up, "gate_up", 2);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up: the last dim must be even (gate | up), got ", gate_up.size(1));
  const int64_t n = gate_up.size(0), f = gate_up.size(1) / 2;
  auto out = torch::empty({n, f}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // An exp per element makes a row ~10x dearer than a norm's: smaller tasks pay off.
  at::parallel_for(0, n, row_grain(f, 4096), [&](int64_t begin, int64_t end) {
    const Vec::T one = Vec::set1(1.f), neg = Vec::set1(-1.f);
    for (int64_t r = begin; r < end; ++r) {
      const float* g = gp + r * 2 * f;
      const float* u = g + f;
      float* o = op + r * f;
      int64_t i = 0;
      for (; i + W <= f; i += W) {
        Vec::T gv = Vec::load(g + i);
        Vec::T s = Vec::div(gv, Vec::add(one, Vec::exp(Vec::mul(gv, neg))));
        Vec::store(o + i, Vec::mul(s, Vec::load(u + i)));
      }
      for (; i < f; ++i) o[i] = g[i] / (1.f + exp_tail(-g[i])) * u[i];
    }
  });
  return out;
}

// out = gelu_tanh(gate) * up, gelu_tanh(g) = 0.5 g (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3)
// (torch's F.gelu(approximate="tanh"), Gemma's GeGLU). Computed as g / (1 + exp(-2u)), the
// same value (0.5 (1 + tanh(u)) = sigmoid(2u)) with one exp and no cancellation: torch's
// 1 + tanh(u) loses all digits of a large negative g's output (to an ulp of 1), this form
// keeps them. Where both are accurate they agree to a few ulp.
torch::Tensor gelu_tanh_mul(const torch::Tensor& gate_up) {
  check_f32(gate_up, "gate_up", 2);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up: the last dim must be even (gate | up), got ", gate_up.size(1));
  const int64_t n = gate_up.size(0), f = gate_up.size(1) / 2;
  auto out = torch::empty({n, f}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // -2 sqrt(2/pi) and 0.044715, in float as torch's float kernel has them.
  constexpr float kMinusTwoBeta = static_cast<float>(-2.0 * 0.7978845608028654);
  constexpr float kKappa = 0.044715f;
  at::parallel_for(0, n, row_grain(f, 4096), [&](int64_t begin, int64_t end) {
    const Vec::T one = Vec::set1(1.f), m2b = Vec::set1(kMinusTwoBeta), kappa = Vec::set1(kKappa);
    for (int64_t r = begin; r < end; ++r) {
      const float* g = gp + r * 2 * f;
      const float* u = g + f;
      float* o = op + r * f;
      int64_t i = 0;
      for (; i + W <= f; i += W) {
        const Vec::T gv = Vec::load(g + i);
        // -2u = -2 beta * (g + kappa * g^3)
        const Vec::T arg = Vec::mul(m2b, Vec::add(gv, Vec::mul(kappa, Vec::mul(Vec::mul(gv, gv), gv))));
        const Vec::T s = Vec::div(gv, Vec::add(one, Vec::exp(arg)));
        Vec::store(o + i, Vec::mul(s, Vec::load(u + i)));
      }
      for (; i < f; ++i) {
        const float gi = g[i];
        o[i] = gi / (1.f + exp_tail(kMinusTwoBeta * (gi + kKappa * (gi * gi * gi)))) * u[i];
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// [QK norm +] RoPE + KV cache write
// ---------------------------------------------------------------------------------------
// Rotate-half: dimension i pairs with i + D/2. out (float, or a 16-bit cache row, rounded
// once) may not alias x.
template <typename Out>
inline void rotate_half(const float* x, const float* c, const float* s, Out* out, int64_t half) {
  using IO = KVIO<Out>;
  int64_t i = 0;
  for (; i + W <= half; i += W) {
    Vec::T x1 = Vec::load(x + i), x2 = Vec::load(x + half + i);
    Vec::T cv = Vec::load(c + i), sv = Vec::load(s + i);
    IO::store(out + i, Vec::sub(Vec::mul(x1, cv), Vec::mul(x2, sv)));
    IO::store(out + half + i, Vec::add(Vec::mul(x2, cv), Vec::mul(x1, sv)));
  }
  for (; i < half; ++i) {
    const float x1 = x[i], x2 = x[half + i];
    out[i] = IO::from_float(x1 * c[i] - x2 * s[i]);
    out[half + i] = IO::from_float(x2 * c[i] + x1 * s[i]);
  }
}

// An optional per-head norm weight: float32 (D,), or an empty pointer for none.
// A QK norm's weight: D values (one head's, every head normed alone: Qwen3, Gemma 3) or
// heads x D (all heads normed together: OLMo 2); `whole` says which.
const float* norm_weight(const c10::optional<torch::Tensor>& w, const char* name, int64_t d, int64_t heads,
                         bool& whole) {
  whole = false;
  if (!w.has_value()) return nullptr;
  check_f32(*w, name, 1);
  TORCH_CHECK(w->size(0) == d || w->size(0) == heads * d, name, ": expected (", d, ",) (head_dim) or (", heads * d,
              ",) (all heads), got ", w->sizes());
  whole = heads > 1 && w->size(0) == heads * d;
  return w->data_ptr<float>();
}

// qkv rows are [q heads | k heads | v heads]. Rotated k goes to kv_cache[slot, 0], v as is
// to kv_cache[slot, 1] (both rounded once when the cache is 16-bit); the rotated q comes
// back as a new float32 (N, Hq, D) tensor.
//
// q_norm / k_norm (Gemma 3's QK norm): each q (k) head is first RMS-normalized over its D
// values and multiplied by the weight, the whole (1 + w) of GemmaRMSNorm as one float32
// vector: y = (x * inv) * w', inv = 1 / sqrt(sum(x^2) / D + eps), the float operations of
// models/gemma3.py's x32 * rsqrt(x32.pow(2).mean(-1) + eps) * (1 + w) in its order, the sum
// of squares alone in another summation order (so equal to float32 rounding). A weight of
// heads x D values (OLMo 2) norms all of a side's heads together: one RMS over them, each head
// times its slice of the weight.
torch::Tensor rope_kv_write(const torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& cos,
                            const torch::Tensor& sin, torch::Tensor kv_cache, const torch::Tensor& slot_mapping,
                            int64_t num_heads, int64_t num_kv_heads, const c10::optional<torch::Tensor>& q_norm,
                            const c10::optional<torch::Tensor>& k_norm, double norm_eps) {
  check_f32(qkv, "qkv", 2);
  check_i64(positions, "positions", 1);
  check_f32(cos, "cos", 2);
  check_f32(sin, "sin", 2);
  check_kv(kv_cache, "kv_cache", 4);
  check_i64(slot_mapping, "slot_mapping", 1);
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0, "num_heads and num_kv_heads must be positive");
  const int64_t n = qkv.size(0), hq = num_heads, hkv = num_kv_heads;
  const bool int8_pool = kv_cache.scalar_type() == torch::kChar;
  const int64_t d = kv_cache.size(3) - (int8_pool ? kKVScaleBytes : 0), half = d / 2;
  TORCH_CHECK(d > 0, "kv_cache: rows too short, got shape ", kv_cache.sizes());
  TORCH_CHECK(kv_cache.size(1) == 2 && kv_cache.size(2) == hkv,
              "kv_cache: expected (S, 2, ", hkv, ", D), got ", kv_cache.sizes());
  TORCH_CHECK(d % 2 == 0, "head_dim must be even for rotate-half RoPE, got ", d);
  TORCH_CHECK(qkv.size(1) == (hq + 2 * hkv) * d, "qkv: expected (N, ", (hq + 2 * hkv) * d, ") for ", hq, " + 2 x ",
              hkv, " heads of ", d, ", got ", qkv.sizes());
  TORCH_CHECK(positions.size(0) == n && slot_mapping.size(0) == n, "positions and slot_mapping must have N=", n,
              " entries, got ", positions.size(0), " and ", slot_mapping.size(0));
  // cos/sin of fewer than D/2 angles: RoPE on the first 2 x that many values of each head, the
  // rest passed as they are (partial rotary: Phi-4-mini's 3/4 of a head).
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(1) > 0 && cos.size(1) <= half, "cos/sin: expected (P, ", half,
              ") each (or fewer angles), got ", cos.sizes(), " and ", sin.sizes());
  const int64_t rh = cos.size(1);
  TORCH_CHECK(norm_eps >= 0, "norm_eps must be >= 0, got ", norm_eps);
  bool q_whole = false, k_whole = false;
  const float* qw = norm_weight(q_norm, "q_norm", d, hq, q_whole);
  const float* kw = norm_weight(k_norm, "k_norm", d, hkv, k_whole);
  const int64_t num_pos = cos.size(0), num_slots = kv_cache.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < num_pos, "positions[", t, "] = ", pos[t], " outside the rope table [0, ",
                num_pos, ")");
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot_mapping[", t, "] = ", slots[t],
                " outside the cache [0, ", num_slots, ")");
  }
  auto q = torch::empty({n, hq, d}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  const int64_t row = (hq + 2 * hkv) * d;
  dispatch_kv(kv_cache, [&](auto kv_type) {
    using KV = decltype(kv_type);
    KV* cache = kv_cache.data_ptr<KV>();
    const int64_t cr = kv_row<KV>(d), slot_stride = 2 * hkv * cr;
    at::parallel_for(0, n, row_grain(row), [&](int64_t begin, int64_t end) {
      std::vector<float> normed((qw || kw) ? d : 0);
      std::vector<float> rotated(kQuantizedKV<KV> ? d : 0);
      // Head h at x, normalized into `normed` when its side has a weight: by its own RMS, or
      // (`whole`) by `inv`, the inverse RMS of all its side's heads, with its slice of their weight.
      auto head = [&](const float* x, const float* w, bool whole, int64_t h, float inv) -> const float* {
        if (!w) return x;
        if (whole) {
          scale_by_weight(x, inv, w + h * d, normed.data(), d);
        } else {
          scale_by_weight(x, inv_rms(sum_squares(x, d), d, norm_eps), w, normed.data(), d);
        }
        return normed.data();
      };
      auto whole_inv = [&](const float* x, int64_t heads, bool whole) {
        return whole ? inv_rms(sum_squares(x, heads * d), heads * d, norm_eps) : 0.f;
      };
      // One head: its first 2 rh values rotated, the rest (partial rotary) copied.
      auto rope = [&](const float* in, const float* c, const float* s, auto* out) {
        rotate_half(in, c, s, out, rh);
        if (2 * rh < d) store_row(in + 2 * rh, out + 2 * rh, d - 2 * rh);
      };
      for (int64_t t = begin; t < end; ++t) {
        const float* x = xp + t * row;
        const float* c = cp + pos[t] * rh;
        const float* s = sp + pos[t] * rh;
        KV* dst = cache + slots[t] * slot_stride;
        const float q_inv = whole_inv(x, hq, q_whole), k_inv = whole_inv(x + hq * d, hkv, k_whole);
        for (int64_t h = 0; h < hq; ++h) rope(head(x + h * d, qw, q_whole, h, q_inv), c, s, qp + (t * hq + h) * d);
        if constexpr (kQuantizedKV<KV>) {
          for (int64_t h = 0; h < hkv; ++h) {
            rope(head(x + (hq + h) * d, kw, k_whole, h, k_inv), c, s, rotated.data());
            quantize_kv_row(rotated.data(), dst + h * cr, d);
          }
          for (int64_t h = 0; h < hkv; ++h) quantize_kv_row(x + (hq + hkv + h) * d, dst + (hkv + h) * cr, d);
        } else {
          for (int64_t h = 0; h < hkv; ++h) rope(head(x + (hq + h) * d, kw, k_whole, h, k_inv), c, s, dst + h * d);
          store_row(x + (hq + hkv) * d, dst + hkv * d, hkv * d);  // v heads, contiguous in both
        }
      }
    });
  });
  return q;
}

// ---------------------------------------------------------------------------------------
// Paged attention
// ---------------------------------------------------------------------------------------
// Keys are visited in tiles of kKeyTile at absolute positions multiple of kKeyTile, and the
// online softmax restarts every kKeyChunk keys (also absolute), its per-chunk states folded
// in chunk order. So the arithmetic for a query row depends only on the row, its position
// and its sequence's cache, never on which other rows share its tile, how the work is split
// or how many threads run: an output is bitwise the same whatever the batch. (This is also
// what lets a long decode context be split over threads: a chunk is a unit of work.)
constexpr int64_t kKeyTile = 32;
constexpr int64_t kKeyChunk = 256;
static_assert(kKeyChunk % kKeyTile == 0 && kKeyTile % 16 == 0, "tiles must be whole registers and nest in chunks");
// Query rows of one sequence processed together (times the G heads of a kv head): each K/V
// row loaded from memory is reused this many times from L1.
constexpr int64_t kTileQueries = 16;

// a := fold(a, b): the merge of two partial softmaxes over disjoint key sets.
inline void fold_state(float* acc_a, float& m_a, float& l_a, const float* acc_b, float m_b, float l_b, int64_t d) {
  if (m_b == kNegInf) return;  // b saw no key
  if (m_a == kNegInf) {
    std::memcpy(acc_a, acc_b, sizeof(float) * d);
    m_a = m_b;
    l_a = l_b;
    return;
  }
  const float mx = std::max(m_a, m_b);
  const float sa = std::exp(m_a - mx), sb = std::exp(m_b - mx);
  l_a = l_a * sa + l_b * sb;
  m_a = mx;
  const Vec::T va = Vec::set1(sa), vb = Vec::set1(sb);
  int64_t i = 0;
  for (; i + W <= d; i += W) Vec::store(acc_a + i, Vec::fma(Vec::load(acc_b + i), vb, Vec::mul(Vec::load(acc_a + i), va)));
  for (; i < d; ++i) acc_a[i] = acc_b[i] * sb + acc_a[i] * sa;
}

// Query vectors that share each key and value row a load brings in: the G heads of a kv
// head read the same keys. Four queries x four keys of accumulators fit in AVX-512's 32
// registers beside the key rows; AVX2 has 16, which hold two.
constexpr int kQueryBlock = W == 16 ? 4 : 2;

// One cache row's lines asked for, into L2 (see prefetch_rows below).
template <typename KV>
inline void prefetch_row(const KV* r, int64_t d) {
#if defined(__GNUC__)
  for (int64_t i = 0; i < d; i += 64 / sizeof(KV)) __builtin_prefetch(r + i, 0, 2);
#endif
}

// The next tile's rows, asked for a few at a time by the loops over this tile's keys:
// entry j of a loop asks for rows[j] (when j < n) as it takes key j. Spread so, the
// requests run behind the multiply-adds. Asked all at once as a tile started (up to 512
// lines on Gemma 3's shapes), they filled the core's miss queue and the arithmetic behind
// them waited for it to drain: a pool read from DRAM took about the time on a cached pool
// plus the time of the reads alone. bench/attention_ab.py, Zen 4, two runs: 0.63-0.85x
// the time from DRAM at 16-64 sequences (1 and 2 threads), 0.84-1.05x cached; one
// sequence's first tile is still asked for at once (nothing runs before it).
template <typename KV>
struct Ahead {
  const KV* const* rows = nullptr;
  int64_t n = 0;
  void ask(int64_t j, int64_t count, int64_t d) const {
    for (int64_t e = std::min(n, j + count); j < e; ++j) prefetch_row(rows[j], d);
  }
};

// q_b . k_j for QB query rows q_b = q + b * q_stride and keys [0, n), into
// out[b * out_stride + j]. Four keys at a time for instruction-level parallelism, yet each
// (query, key) goes through the same operations in the same order (one accumulator over
// D, then sum()'s tree, then the scalar tail) wherever it falls in the group of four and
// however many queries share the pass: the batch invariance above relies on it.
template <int QB, typename KV>
inline void dots_block(const float* q, int64_t q_stride, const KV* const* k, int64_t n, int64_t d, float* out,
                       int64_t out_stride, const Ahead<KV>& ahead) {
  using IO = KVIO<KV>;
  const int64_t dv = d - d % W;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    ahead.ask(j, 4, d);
    const KV *k0 = k[j], *k1 = k[j + 1], *k2 = k[j + 2], *k3 = k[j + 3];
    Vec::T a[QB][4];
#pragma GCC unroll 4
    for (int b = 0; b < QB; ++b) a[b][0] = a[b][1] = a[b][2] = a[b][3] = Vec::zero();
    for (int64_t i = 0; i < dv; i += W) {
      const Vec::T x0 = IO::load(k0 + i), x1 = IO::load(k1 + i), x2 = IO::load(k2 + i), x3 = IO::load(k3 + i);
#pragma GCC unroll 4
      for (int b = 0; b < QB; ++b) {
        const Vec::T qv = Vec::load(q + b * q_stride + i);
        a[b][0] = Vec::fma(qv, x0, a[b][0]);
        a[b][1] = Vec::fma(qv, x1, a[b][1]);
        a[b][2] = Vec::fma(qv, x2, a[b][2]);
        a[b][3] = Vec::fma(qv, x3, a[b][3]);
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < QB; ++b) {
      const float* qb = q + b * q_stride;
      float* o = out + b * out_stride + j;
      Vec::sum4(a[b][0], a[b][1], a[b][2], a[b][3], o);
      for (int64_t i = dv; i < d; ++i) {  // std::fma: no room for the compiler to differ by path
        o[0] = std::fma(qb[i], IO::to_float(k0[i]), o[0]);
        o[1] = std::fma(qb[i], IO::to_float(k1[i]), o[1]);
        o[2] = std::fma(qb[i], IO::to_float(k2[i]), o[2]);
        o[3] = std::fma(qb[i], IO::to_float(k3[i]), o[3]);
      }
    }
  }
  for (; j < n; ++j) {
    ahead.ask(j, 1, d);
#pragma GCC unroll 4
    for (int b = 0; b < QB; ++b) {
      const float* qb = q + b * q_stride;
      Vec::T a0 = Vec::zero();
      for (int64_t i = 0; i < dv; i += W) a0 = Vec::fma(Vec::load(qb + i), IO::load(k[j] + i), a0);
      float s = Vec::sum(a0);
      for (int64_t i = dv; i < d; ++i) s = std::fma(qb[i], IO::to_float(k[j][i]), s);
      out[b * out_stride + j] = s;
    }
  }
}

// f(std::integral_constant<int, QB>, first query) over nq queries in blocks of
// kQueryBlock, the remainder in one smaller block.
template <typename F>
inline void by_query_blocks(int64_t nq, F&& f) {
  int64_t b = 0;
  for (; b + kQueryBlock <= nq; b += kQueryBlock) f(std::integral_constant<int, kQueryBlock>{}, b);
  switch (nq - b) {
    case 1: f(std::integral_constant<int, 1>{}, b); break;
    case 2: f(std::integral_constant<int, 2>{}, b); break;
    case 3: f(std::integral_constant<int, 3>{}, b); break;
    default: break;
  }
}

// dots_block over nq query rows of D floats each (q), their scores out_stride apart.
template <typename KV>
inline void dots(const float* q, int64_t nq, const KV* const* k, int64_t n, int64_t d, float* out, int64_t out_stride,
                 const Ahead<KV>& ahead = {}) {
  by_query_blocks(nq, [&](auto qb, int64_t b) {  // the first block asks
    dots_block<decltype(qb)::value>(q + b * d, d, k, n, d, out + b * out_stride, out_stride,
                                    b == 0 ? ahead : Ahead<KV>{});
  });
}

// Asks for the cache lines of K and V rows ahead of their use: a tile's rows are scattered
// over the pool (one run per block), beyond what the hardware prefetcher predicts. Into L2
// (prefetcht1), not L1: a tile is ~128 lines, several times the misses L1 can track, and
// asked into L1 most of them never came ahead of use (a pool read from DRAM: 0.54-0.76x
// the time with L2, Zen 4, docs/performance.md).
template <typename KV>
inline void prefetch_rows(const KV* const* k, const KV* const* v, int64_t n, int64_t d) {
#if defined(__GNUC__)
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < d; i += 64 / sizeof(KV)) {
      __builtin_prefetch(k[j] + i, 0, 2);
      __builtin_prefetch(v[j] + i, 0, 2);
    }
#endif
}

// acc_b += sum_j p_b[j] * v_j over n keys for QB query rows (acc_b = acc + b * d, p_b = p +
// b * p_stride), accumulators held in registers across the keys and each value row loaded
// once for all QB. Per query the same operations in the same order whatever QB is.
template <int QB, typename KV>
inline void accumulate_pv_block(float* acc, const float* p, int64_t p_stride, const KV* const* vrows, int64_t n,
                                int64_t d, Ahead<KV> ahead) {
  using IO = KVIO<KV>;
  int64_t i = 0;
  // The first pass over the keys asks (the rows' dims go in slices, each a pass).
  for (; i + 4 * W <= d; i += 4 * W, ahead = {}) {
    Vec::T a[QB][4];
#pragma GCC unroll 4
    for (int b = 0; b < QB; ++b)
#pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) a[b][x] = Vec::load(acc + b * d + i + x * W);
    for (int64_t j = 0; j < n; ++j) {
      ahead.ask(j, 1, d);
      const KV* v = vrows[j] + i;
      const Vec::T v0 = IO::load(v), v1 = IO::load(v + W), v2 = IO::load(v + 2 * W), v3 = IO::load(v + 3 * W);
#pragma GCC unroll 4
      for (int b = 0; b < QB; ++b) {
        const Vec::T pj = Vec::set1(p[b * p_stride + j]);
        a[b][0] = Vec::fma(pj, v0, a[b][0]);
        a[b][1] = Vec::fma(pj, v1, a[b][1]);
        a[b][2] = Vec::fma(pj, v2, a[b][2]);
        a[b][3] = Vec::fma(pj, v3, a[b][3]);
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < QB; ++b)
#pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) Vec::store(acc + b * d + i + x * W, a[b][x]);
  }
  for (; i + W <= d; i += W, ahead = {}) {
    Vec::T a[QB];
#pragma GCC unroll 4
    for (int b = 0; b < QB; ++b) a[b] = Vec::load(acc + b * d + i);
    for (int64_t j = 0; j < n; ++j) {
      ahead.ask(j, 1, d);
      const Vec::T v = IO::load(vrows[j] + i);
#pragma GCC unroll 4
      for (int b = 0; b < QB; ++b) a[b] = Vec::fma(Vec::set1(p[b * p_stride + j]), v, a[b]);
    }
#pragma GCC unroll 4
    for (int b = 0; b < QB; ++b) Vec::store(acc + b * d + i, a[b]);
  }
  ahead.ask(0, ahead.n, d);  // d < W: no pass above
  for (; i < d; ++i) {
#pragma GCC unroll 4
    for (int b = 0; b < QB; ++b) {
      float a = acc[b * d + i];
      // std::fma, as in dots(): a plain a += p * v is contracted, or not, as the compiler
      // sees fit for each element type, and the types must agree bitwise.
      for (int64_t j = 0; j < n; ++j) a = std::fma(p[b * p_stride + j], IO::to_float(vrows[j][i]), a);
      acc[b * d + i] = a;
    }
  }
}

template <typename KV>
inline void accumulate_pv(float* acc, int64_t nq, const float* p, int64_t p_stride, const KV* const* vrows, int64_t n,
                          int64_t d, const Ahead<KV>& ahead = {}) {
  by_query_blocks(nq, [&](auto qb, int64_t b) {  // the first block asks
    accumulate_pv_block<decltype(qb)::value>(acc + b * d, p + b * p_stride, p_stride, vrows, n, d,
                                             b == 0 ? ahead : Ahead<KV>{});
  });
}

inline void scale_in_place(float* x, float s, int64_t d) {
  const Vec::T vs = Vec::set1(s);
  int64_t i = 0;
  for (; i + W <= d; i += W) Vec::store(x + i, Vec::mul(Vec::load(x + i), vs));
  for (; i < d; ++i) x[i] *= s;
}

template <typename KV>
struct AttnArgs {
  const float* q;   // (N, Hq, D)
  const KV* cache;  // (S, 2, Hkv, D)
  const int64_t* block_table;
  int64_t max_blocks, block_size, hq, hkv, group, d;
  int64_t row;           // cache elements per head row: kv_row<KV>(d)
  float scale, softcap;  // softcap 0: none
  int64_t window;        // 0: none
  float* out;            // (N, Hq, D)
  const float* sinks;    // (Hq,) or null: gpt-oss's sink logit per head (write_out)
};

// One unit of work: query rows [row0, row0 + nrows) of sequence `seq` (at positions pos0,
// pos0 + 1, ...), the G query heads of kv head `kvh`, over key chunks [chunk0, chunk1].
struct Task {
  int64_t seq, kvh, row0, nrows, pos0;
  int64_t lo, hi;          // the keys some row of the tile may see: [lo, hi)
  int64_t chunk0, chunk1;  // inclusive
  int64_t split;           // index into the split tiles; -1 when the task covers all its chunks
  int64_t cost;            // query-key pairs, for scheduling
  // The keys of chunk c that some row of the tile may see: [key_lo(c), key_hi(c)).
  int64_t key_lo(int64_t c) const { return std::max(lo, c * kKeyChunk); }
  int64_t key_hi(int64_t c) const { return std::min(hi, (c + 1) * kKeyChunk); }
};

// A tile whose chunks run as separate tasks: their states meet in `partials`, and the task
// that finishes last folds them.
struct SplitTile {
  Task whole;
  int64_t offset;  // into partials: nchunks * nq * (D + 2) floats
  int64_t nchunks;
};

// A 16-bit cache is read in one of two ways, with bitwise the same results (widening is
// exact): a task whose queries fit one query block (decode: the G <= 4 heads of one row)
// converts each key and value inside dots() / accumulate_pv(), once for the block, as it
// loads them; a task with more (prefill tiles: up to 16 rows x G) widens each tile once
// into float scratch and reads that rows x G times. Measured on SmolLM2's shapes (G = 3,
// D = 64, 1 thread, Zen 4, CPU time): a 64-row prefill chunk at positions 64-127 takes
// 400 us converting inline, 320-335 widening tiles (a float32 pool: 300-310). Decode of
// four heads converting inline: 0.63-0.83x the time of widening on Gemma 3's shapes
// (bench/attention_ab.py, docs/performance.md).
constexpr int64_t kWidenMin = kQueryBlock + 1;

// Per-thread buffers, sized for the largest tile.
template <typename KV>
struct Scratch {
  std::vector<float> q, acc, m, l, acc_chunk, m_chunk, l_chunk, scores;
  std::vector<float> kscale, vscale;  // an int8 tile's row scales (kv_scale), read once a tile
  std::vector<const KV*> krows, vrows;
  // A 16-bit tile's keys and values widened to float32, and pointers to their rows: key j
  // and value j side by side, as in the pool, each row starting a cache line (a register
  // load that straddles two lines costs two).
  // Only where some task widens (see kWidenMin), and left uninitialized: each tile
  // writes the rows it reads.
  std::unique_ptr<float[]> wide;
  std::vector<float*> kwide_rows, vwide_rows;
  Scratch(int64_t nq, int64_t d)
      : q(nq * d), acc(nq * d), m(nq), l(nq), acc_chunk(nq * d), m_chunk(nq), l_chunk(nq), scores(nq * kKeyTile),
        kscale(kQuantizedKV<KV> ? kKeyTile : 0), vscale(kQuantizedKV<KV> ? kKeyTile : 0), krows(2 * kKeyTile), vrows(2 * kKeyTile), kwide_rows(kKeyTile), vwide_rows(kKeyTile) {
    if (std::is_same_v<KV, float> || nq < kWidenMin) return;
    constexpr int64_t line = 64 / sizeof(float);
    const int64_t stride = (d + line - 1) / line * line;
    wide.reset(new float[2 * kKeyTile * stride + line]);
    const auto base = reinterpret_cast<uintptr_t>(wide.get());
    float* p = wide.get() + ((64 - base % 64) % 64) / sizeof(float);
    for (int64_t j = 0; j < kKeyTile; ++j) kwide_rows[j] = p + 2 * j * stride, vwide_rows[j] = p + (2 * j + 1) * stride;
  }
};

// n cache elements from src as floats at dst (exact).
template <typename KV>
inline void widen_row(const KV* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) Vec::store(dst + i, KVIO<KV>::load(src + i));
  for (; i < n; ++i) dst[i] = KVIO<KV>::to_float(src[i]);
}

// The task's queries, pre-multiplied by the softmax scale, as nq = nrows * G rows of D.
template <typename KV>
void load_queries(const AttnArgs<KV>& a, const Task& t, Scratch<KV>& s) {
  const int64_t d = a.d;
  const Vec::T vs = Vec::set1(a.scale);
  for (int64_t r = 0; r < t.nrows; ++r) {
    const float* src = a.q + ((t.row0 + r) * a.hq + t.kvh * a.group) * d;  // G heads, contiguous
    float* dst = s.q.data() + r * a.group * d;
    const int64_t len = a.group * d;
    int64_t i = 0;
    for (; i + W <= len; i += W) Vec::store(dst + i, Vec::mul(Vec::load(src + i), vs));
    for (; i < len; ++i) dst[i] = src[i] * a.scale;
  }
}

// The K and V rows of task t's keys [from, to) (positions in its sequence, its kv head)
// into k[0, to - from) and v[0, to - from). The block table is walked along the
// consecutive positions: one division per call, not one per key (a 64-bit divide costs as
// much as a key's whole dot product here).
template <typename KV>
void key_rows(const AttnArgs<KV>& a, const Task& t, int64_t from, int64_t to, const KV** k, const KV** v) {
  const int64_t slot_stride = 2 * a.hkv * a.row;
  const KV* head = a.cache + t.kvh * a.row;
  const int64_t* table = a.block_table + t.seq * a.max_blocks;
  int64_t blk = from / a.block_size, off = from % a.block_size;
  for (int64_t j = from; j < to; ++j) {
    const int64_t slot = table[blk] * a.block_size + off;
    k[j - from] = head + slot * slot_stride;
    v[j - from] = head + slot * slot_stride + a.hkv * a.row;
    if (++off == a.block_size) off = 0, ++blk;
  }
}

// The K and V rows of task t's first tile (of its first chunk), from the task's first key
// on, into k[0, n) and v[0, n); returns n.
template <typename KV>
int64_t first_tile_rows(const AttnArgs<KV>& a, const Task& t, const KV** k, const KV** v) {
  const int64_t clo = t.key_lo(t.chunk0), chi = t.key_hi(t.chunk0);
  const int64_t khi = std::min((clo / kKeyTile + 1) * kKeyTile, chi);
  key_rows(a, t, clo, khi, k, v);
  return std::max<int64_t>(0, khi - clo);
}

// Key chunk c of task t, from an empty state into (acc_chunk, m_chunk, l_chunk).
// `after`: the task this thread runs next, if known; the last tile of t's last chunk asks
// for its first tile's rows as a tile asks for the next one's (see Ahead). A decode task
// is one to a few tiles, so without this each task began with its first tile's misses
// all outstanding at once and nothing to run behind them. `asked`: this task's own first
// tile was asked for so (by the task before).
template <typename KV>
void attend_chunk(const AttnArgs<KV>& a, const Task& t, int64_t c, Scratch<KV>& s, const Task* after = nullptr,
                  bool asked = false) {
  const int64_t d = a.d, nq = t.nrows * a.group;
  const int64_t clo = t.key_lo(c), chi = t.key_hi(c);
  std::fill(s.acc_chunk.begin(), s.acc_chunk.begin() + nq * d, 0.f);
  std::fill(s.m_chunk.begin(), s.m_chunk.begin() + nq, kNegInf);
  std::fill(s.l_chunk.begin(), s.l_chunk.begin() + nq, 0.f);
  float* sc = s.scores.data();
  // Row pointers of the current tile (kr, vr) and of the next one (kn, vn), whose rows the
  // current one's loops ask for (Ahead); the first tile's are asked for as it is located.
  const KV** kr = s.krows.data();
  const KV** vr = s.vrows.data();
  const KV** kn = kr + kKeyTile;
  const KV** vn = vr + kKeyTile;
  auto locate = [&](int64_t ts, const KV** k, const KV** v, bool ask) {
    const int64_t klo = std::max(ts, clo), khi = std::min(ts + kKeyTile, chi);
    key_rows(a, t, klo, khi, k + (klo - ts), v + (klo - ts));
    if (ask) prefetch_rows(k + (klo - ts), v + (klo - ts), khi - klo, d);
  };
  const int64_t first_tile = (clo / kKeyTile) * kKeyTile;
  locate(first_tile, kr, vr, !asked || c != t.chunk0);
  const bool widen = !std::is_same_v<KV, float> && nq >= kWidenMin;
  for (int64_t ts = first_tile; ts < chi; ts += kKeyTile) {
    const int64_t klo = std::max(ts, clo), khi = std::min(ts + kKeyTile, chi);
    // The next tile's keys: entries [0, next) of kn and vn (it starts past clo).
    int64_t next = std::max<int64_t>(0, std::min(ts + 2 * kKeyTile, chi) - (ts + kKeyTile));
    if (next > 0) locate(ts + kKeyTile, kn, vn, false);
    else if (after != nullptr && c == t.chunk1 && ts + kKeyTile >= chi) next = first_tile_rows(a, *after, kn, vn);
    // Entries [asked_lo, asked_hi) of the next tile get asked for by this tile's loops;
    // the rest (this tile's keys fewer than the next's) all at once after them.
    int64_t asked_lo = 0, asked_hi = 0;
    if (widen) {
      const Ahead<KV> ahead_k{kn, next}, ahead_v{vn, next};
      for (int64_t j = klo; j < khi; ++j) {
        ahead_k.ask(j - ts, 1, d);
        ahead_v.ask(j - ts, 1, d);
        widen_row(kr[j - ts], s.kwide_rows[j - ts], d);
        widen_row(vr[j - ts], s.vwide_rows[j - ts], d);
      }
      asked_lo = klo - ts, asked_hi = khi - ts;
    }
    if constexpr (kQuantizedKV<KV>) {
      for (int64_t j = klo; j < khi; ++j) {
        s.kscale[j - ts] = kv_scale(kr[j - ts], d);
        s.vscale[j - ts] = kv_scale(vr[j - ts], d);
      }
    }
    // An int8 tile's scores (or probabilities) of keys [jlo, jhi) times their rows' scales.
    auto scale_columns = [&](const std::vector<float>& by, int64_t jlo, int64_t jhi) {
      for (int64_t g = 0; g < a.group; ++g)
        for (int64_t j = jlo; j < jhi; ++j) sc[g * kKeyTile + j - ts] *= by[j - ts];
    };
    for (int64_t r = 0; r < t.nrows; ++r) {
      const int64_t pos = t.pos0 + r;
      // This row's keys in the tile: causal, and within the window.
      const int64_t jlo = std::max(klo, a.window > 0 ? pos - a.window + 1 : int64_t(0));
      const int64_t jhi = std::min(khi, pos + 1);
      if (jlo >= jhi) continue;
      // The first row that reads the tile's rows itself asks for the next tile's.
      Ahead<KV> ahead_k, ahead_v;
      if (!widen && asked_lo == asked_hi) {
        const int64_t from = jlo - ts;
        ahead_k = {kn + from, next - from};
        ahead_v = {vn + from, next - from};
        asked_lo = from, asked_hi = jhi - ts;
      }
      // The row's G heads together: their scores, then each one's softmax update, then
      // their values, each key and value row loaded once for all G (dots, accumulate_pv).
      // Scores cover the whole tile, -inf outside the row's keys: the max, the exp and the
      // sum below then run over whole registers and treat every row alike.
      const int64_t q0 = r * a.group;
      std::fill(sc, sc + a.group * kKeyTile, kNegInf);
      if (widen)
        dots(s.q.data() + q0 * d, a.group, s.kwide_rows.data() + (jlo - ts), jhi - jlo, d, sc + (jlo - ts), kKeyTile);
      else
        dots(s.q.data() + q0 * d, a.group, kr + (jlo - ts), jhi - jlo, d, sc + (jlo - ts), kKeyTile, ahead_k);
      if constexpr (kQuantizedKV<KV>) scale_columns(s.kscale, jlo, jhi);  // s_k * (q . codes), both paths
      for (int64_t g = 0; g < a.group; ++g) {
        const int64_t qi = q0 + g;
        float* scg = sc + g * kKeyTile;
        if (a.softcap > 0.f)
          for (int64_t j = jlo; j < jhi; ++j) scg[j - ts] = a.softcap * std::tanh(scg[j - ts] / a.softcap);
        Vec::T vmax = Vec::load(scg);
        for (int64_t i = W; i < kKeyTile; i += W) vmax = Vec::max(vmax, Vec::load(scg + i));
        const float mt = Vec::hmax(vmax);
        const float m_old = s.m_chunk[qi], m_new = std::max(m_old, mt);
        const Vec::T vm = Vec::set1(m_new);
        Vec::T vsum = Vec::zero();
        for (int64_t i = 0; i < kKeyTile; i += W) {
          const Vec::T p = Vec::exp(Vec::sub(Vec::load(scg + i), vm));
          Vec::store(scg + i, p);
          vsum = Vec::add(vsum, p);
        }
        const float tile_sum = Vec::sum(vsum);
        float* acc = s.acc_chunk.data() + qi * d;
        if (m_old == kNegInf) {
          s.l_chunk[qi] = tile_sum;  // acc is still zero: nothing to rescale
        } else {
          const float alpha = std::exp(m_old - m_new);
          s.l_chunk[qi] = s.l_chunk[qi] * alpha + tile_sum;
          if (alpha != 1.f) scale_in_place(acc, alpha, d);
        }
        s.m_chunk[qi] = m_new;
      }
      if constexpr (kQuantizedKV<KV>) scale_columns(s.vscale, jlo, jhi);  // after the sums: p_j * s_v
      float* acc = s.acc_chunk.data() + q0 * d;
      if (widen)
        accumulate_pv(acc, a.group, sc + (jlo - ts), kKeyTile, s.vwide_rows.data() + (jlo - ts), jhi - jlo, d);
      else
        accumulate_pv(acc, a.group, sc + (jlo - ts), kKeyTile, vr + (jlo - ts), jhi - jlo, d, ahead_v);
    }
    // What no loop asked for (a first or window-cut tile shorter than the next; a tile no
    // row reads): at once.
    if (next > 0) {
      const int64_t lo = std::min(asked_lo, next), hi = std::min(std::max(asked_hi, lo), next);
      prefetch_rows(kn, vn, lo, d);
      prefetch_rows(kn + hi, vn + hi, next - hi, d);
    }
    std::swap(kr, kn);
    std::swap(vr, vn);
  }
}

// out rows of the tile = acc / l. A sink (gpt-oss) is one more logit in the softmax whose
// weight goes to no value: it adds exp(sink - m) to the sum and nothing to acc, so it joins
// here, once, whichever way the keys' chunks were folded.
template <typename KV>
void write_out(const AttnArgs<KV>& a, const Task& t, const float* acc, const float* l, const float* m) {
  const int64_t d = a.d;
  for (int64_t r = 0; r < t.nrows; ++r) {
    for (int64_t g = 0; g < a.group; ++g) {
      const int64_t qi = r * a.group + g, h = t.kvh * a.group + g;
      float* dst = a.out + ((t.row0 + r) * a.hq + h) * d;
      std::memcpy(dst, acc + qi * d, sizeof(float) * d);
      const float sum = a.sinks == nullptr ? l[qi] : l[qi] + std::exp(a.sinks[h] - m[qi]);
      scale_in_place(dst, 1.f / sum, d);
    }
  }
}

template <typename KV>
void run_task(const AttnArgs<KV>& a, const Task& t, Scratch<KV>& s, const std::vector<SplitTile>& splits,
              std::vector<float>& partials, std::atomic<int64_t>* remaining, const Task* after, bool asked) {
  const int64_t d = a.d, nq = t.nrows * a.group;
  load_queries(a, t, s);
  if (t.split < 0) {
    std::fill(s.m.begin(), s.m.begin() + nq, kNegInf);
    std::fill(s.l.begin(), s.l.begin() + nq, 0.f);
    for (int64_t c = t.chunk0; c <= t.chunk1; ++c) {
      attend_chunk(a, t, c, s, after, asked);
      for (int64_t qi = 0; qi < nq; ++qi)
        fold_state(s.acc.data() + qi * d, s.m[qi], s.l[qi], s.acc_chunk.data() + qi * d, s.m_chunk[qi], s.l_chunk[qi], d);
    }
    write_out(a, t, s.acc.data(), s.l.data(), s.m.data());
    return;
  }
  const SplitTile& st = splits[t.split];
  const int64_t c = t.chunk0, k = c - st.whole.chunk0;
  attend_chunk(a, t, c, s, after, asked);
  float* acc_p = partials.data() + st.offset;             // (nchunks, nq, D)
  float* m_p = acc_p + st.nchunks * nq * d;                // (nchunks, nq)
  float* l_p = m_p + st.nchunks * nq;                      // (nchunks, nq)
  std::memcpy(acc_p + k * nq * d, s.acc_chunk.data(), sizeof(float) * nq * d);
  std::memcpy(m_p + k * nq, s.m_chunk.data(), sizeof(float) * nq);
  std::memcpy(l_p + k * nq, s.l_chunk.data(), sizeof(float) * nq);
  // acq_rel: the last task sees every other chunk's writes.
  if (remaining[t.split].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  std::fill(s.m.begin(), s.m.begin() + nq, kNegInf);
  std::fill(s.l.begin(), s.l.begin() + nq, 0.f);
  for (int64_t kk = 0; kk < st.nchunks; ++kk)  // chunk order, as in the unsplit path
    for (int64_t qi = 0; qi < nq; ++qi)
      fold_state(s.acc.data() + qi * d, s.m[qi], s.l[qi], acc_p + (kk * nq + qi) * d, m_p[kk * nq + qi],
                 l_p[kk * nq + qi], d);
  write_out(a, st.whole, s.acc.data(), s.l.data(), s.m.data());
}

// Below this many multiply-adds a call runs on the calling thread: waking the pool costs
// more than it saves.
constexpr int64_t kInlineWork = int64_t(1) << 17;

torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                              const torch::Tensor& query_start, const torch::Tensor& seq_start,
                              const torch::Tensor& context_lens, int64_t block_size, double scale,
                              int64_t sliding_window, double softcap,
                              const c10::optional<torch::Tensor>& sinks = c10::nullopt) {
  check_f32(q, "q", 3);
  check_kv(kv_cache, "kv_cache", 4);
  check_i64(block_table, "block_table", 2);
  check_i64(query_start, "query_start", 1);
  check_i64(seq_start, "seq_start", 1);
  check_i64(context_lens, "context_lens", 1);
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t num_slots = kv_cache.size(0), hkv = kv_cache.size(2);
  const int64_t row = kv_row(kv_cache.scalar_type() == torch::kChar, d);
  TORCH_CHECK(kv_cache.size(1) == 2 && kv_cache.size(3) == row, "kv_cache: expected (S, 2, Hkv, ", row, "), got ",
              kv_cache.sizes());
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "q heads (", hq, ") must be a multiple of kv heads (", hkv, ")");
  const int64_t nseq = block_table.size(0), max_blocks = block_table.size(1);
  TORCH_CHECK(query_start.size(0) == nseq + 1, "query_start: expected ", nseq + 1, " entries (B + 1), got ",
              query_start.size(0));
  TORCH_CHECK(seq_start.size(0) == nseq && context_lens.size(0) == nseq, "seq_start and context_lens: expected ",
              nseq, " entries (B), got ", seq_start.size(0), " and ", context_lens.size(0));
  TORCH_CHECK(block_size > 0 && num_slots % block_size == 0, "block_size ", block_size,
              " must be positive and divide the cache's ", num_slots, " slots");
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0: none), got ", sliding_window);
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "softcap must be >= 0 (0: none), got ", softcap);
  if (sinks) check_f32(*sinks, "sinks", 1);
  TORCH_CHECK(!sinks || sinks->size(0) == hq, "sinks: expected one per q head (", hq, "), got ", sinks->size(0));
  const int64_t* qs = query_start.data_ptr<int64_t>();
  const int64_t* ss = seq_start.data_ptr<int64_t>();
  const int64_t* cl = context_lens.data_ptr<int64_t>();
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t num_blocks = num_slots / block_size;
  TORCH_CHECK(qs[0] == 0 && qs[nseq] == n, "query_start must run from 0 to N=", n, ", got ", qs[0], "..", qs[nseq]);
  for (int64_t b = 0; b < nseq; ++b) {
    const int64_t rows = qs[b + 1] - qs[b];
    TORCH_CHECK(rows >= 0, "query_start must be non-decreasing (sequence ", b, ")");
    TORCH_CHECK(ss[b] >= 0 && cl[b] == ss[b] + rows, "sequence ", b, ": context_lens (", cl[b],
                ") must equal seq_start (", ss[b], ") + its query rows (", rows, ")");
    if (rows == 0) continue;
    const int64_t used = (cl[b] + block_size - 1) / block_size;
    TORCH_CHECK(used <= max_blocks, "sequence ", b, ": ", cl[b], " keys need ", used, " blocks, block_table has ",
                max_blocks);
    for (int64_t i = 0; i < used; ++i)
      TORCH_CHECK(bt[b * max_blocks + i] >= 0 && bt[b * max_blocks + i] < num_blocks, "block_table[", b, ", ", i,
                  "] = ", bt[b * max_blocks + i], " outside the cache's ", num_blocks, " blocks");
  }
  auto out = torch::empty({n, hq, d}, q.options());
  if (n == 0) return out;

  const int64_t group = hq / hkv;
  const int64_t tile_rows = std::max<int64_t>(1, kTileQueries / group);
  const int64_t window = sliding_window;

  std::vector<Task> tasks;
  bool multi_chunk = false;
  int64_t work = 0;
  for (int64_t b = 0; b < nseq; ++b) {
    const int64_t rows = qs[b + 1] - qs[b];
    for (int64_t t0 = 0; t0 < rows; t0 += tile_rows) {
      const int64_t nr = std::min(tile_rows, rows - t0), pos0 = ss[b] + t0;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos0 - window + 1) : 0, hi = pos0 + nr;
      const int64_t cost = nr * group * (hi - lo);
      multi_chunk |= lo / kKeyChunk != (hi - 1) / kKeyChunk;
      for (int64_t h = 0; h < hkv; ++h) {
        tasks.push_back({b, h, qs[b] + t0, nr, pos0, lo, hi, lo / kKeyChunk, (hi - 1) / kKeyChunk, -1, cost});
        work += cost * d;
      }
    }
  }
  const int64_t threads = work < kInlineWork ? 1 : at::get_num_threads();
  // Too few tiles to keep every thread busy (decode of a few long sequences): split tiles
  // into their key chunks. The result is bitwise the same either way (see kKeyChunk).
  std::vector<SplitTile> splits;
  int64_t partial_floats = 0;
  if (threads > 1 && multi_chunk && static_cast<int64_t>(tasks.size()) < 4 * threads) {
    std::vector<Task> split_tasks;
    for (const Task& t : tasks) {
      const int64_t nch = t.chunk1 - t.chunk0 + 1;
      if (nch == 1) {
        split_tasks.push_back(t);
        continue;
      }
      const int64_t id = static_cast<int64_t>(splits.size());
      splits.push_back({t, partial_floats, nch});
      partial_floats += nch * t.nrows * group * (d + 2);
      for (int64_t c = t.chunk0; c <= t.chunk1; ++c) {
        Task p = t;
        p.chunk0 = p.chunk1 = c;
        p.split = id;
        p.cost = t.nrows * group * (t.key_hi(c) - t.key_lo(c));
        split_tasks.push_back(p);
      }
    }
    tasks.swap(split_tasks);
  }
  std::vector<float> partials(partial_floats);
  std::unique_ptr<std::atomic<int64_t>[]> remaining(new std::atomic<int64_t>[splits.size() + 1]);
  for (size_t i = 0; i < splits.size(); ++i) remaining[i].store(splits[i].nchunks, std::memory_order_relaxed);

  // Longest tasks first, handed out as threads come for them (one at a time, or a tile's
  // kv heads at a time: see `claim` below): tiles differ in cost (context lengths, causal
  // prefill), so a static split of the range over threads would leave some idle.
  std::vector<int64_t> order(tasks.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return tasks[x].cost > tasks[y].cost; });
  int64_t max_rows = 0;  // of any task: decode-only batches need scratch for G queries, not a tile's
  for (const Task& t : tasks) max_rows = std::max(max_rows, t.nrows);
  const int64_t max_nq = max_rows * group;
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t workers = std::min(threads, num_tasks);
  dispatch_kv(kv_cache, [&](auto kv_type) {
    using KV = decltype(kv_type);
    const AttnArgs<KV> args{q.data_ptr<float>(), kv_cache.data_ptr<KV>(), bt, max_blocks, block_size, hq, hkv,
                            group, d, row, static_cast<float>(scale), static_cast<float>(softcap), window,
                            out.data_ptr<float>(), sinks ? sinks->data_ptr<float>() : nullptr};
    std::atomic<int64_t> next{0};
    // A tile's kv heads go to one thread together. A token's slot in the pool holds every
    // head's K row, then every head's V row (a float16 pool on SmolLM2: 3 x 128 bytes,
    // twice), so a head's task reads a K run and a V run per token, and the lines between
    // are the tile's other heads' rows; on the thread that reads those next, what the
    // hardware prefetcher brought in beside its own runs is used. bench/attention_ab.py,
    // Ice Lake, 2 threads: 0.81-0.91x the time on SmolLM2's, the 1B's and Qwen3's shapes
    // (3, 8 and 8 kv heads), level on Gemma 3's (one). Without splits the heads are
    // adjacent in `order` (equal cost, stable sort, and pushed together), so a claim of hkv
    // tasks is one tile's heads. Only with enough tiles to go round (four claims a worker):
    // the 1B's one decode row is 8 tasks, which two threads share better one at a time.
    // Which thread runs a task never changes its bits.
    const int64_t claim = splits.empty() && num_tasks / hkv >= 4 * workers ? hkv : 1;
    // Each task's last tile asks for the keys of the task this thread runs next (see
    // attend_chunk's `after`): the next of its claim, or, before the claim's last task
    // runs, the first of its next claim, taken then (not earlier, so that a thread holds
    // no more than one task that another could run).
    auto worker = [&](int64_t, int64_t) {
      Scratch<KV> s(max_nq, d);
      bool asked = false;
      for (int64_t i = next.fetch_add(claim, std::memory_order_relaxed), i_next = num_tasks; i < num_tasks;
           i = i_next) {
        const int64_t end = std::min(num_tasks, i + claim);
        for (int64_t j = i; j < end; ++j) {
          if (j + 1 == end) i_next = next.fetch_add(claim, std::memory_order_relaxed);
          const int64_t f = j + 1 < end ? j + 1 : i_next;
          const Task* after = f < num_tasks ? &tasks[order[f]] : nullptr;
          run_task(args, tasks[order[j]], s, splits, partials, remaining.get(), after, asked);
          asked = after != nullptr;
        }
      }
    };
    if (workers <= 1) {
      worker(0, 1);
    } else {
      at::parallel_for(0, workers, 1, worker);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Mixture of experts: the router, and the weighted sum of the experts' outputs
// ---------------------------------------------------------------------------------------
// runner/moe.py runs a layer's experts as: logits = router(y); (tok, w, offsets) =
// moe_route(logits); the routed rows y[tok] through each expert's two projections in one
// call each (quant.cpp's experts_linear, rows [offsets[e], offsets[e + 1]) for expert e);
// out = moe_combine(those outputs, tok, w). Every step here depends on a token's own row
// alone and sums a token's experts in one fixed order (by expert number), so a token's
// output is bitwise the same whatever tokens share its step, as the quantized linears' are.

// (N, K) x (E, K) -> (N, E) float32 logits, x_n . w_e each in one fixed order (four
// accumulators over K, then Vec::sum's tree, then the tail): row-independent, unlike a
// BLAS product whose blocking follows N. The router's weight is float (llama.cpp's
// quantizer leaves ffn_gate_inp alone); four experts share each load of x.
torch::Tensor dense_rows(const torch::Tensor& x, const torch::Tensor& w) {
  check_f32(x, "x", 2);
  check_f32(w, "w", 2);
  TORCH_CHECK(x.size(1) == w.size(1), "x and w must have the same K");
  const int64_t n = x.size(0), e = w.size(0), k = x.size(1);
  auto out = torch::empty({n, e}, torch::kFloat);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t kv = k - k % W;
  auto dot_tail = [&](const float* a, const float* b, Vec::T acc) {
    float s = Vec::sum(acc);
    for (int64_t i = kv; i < k; ++i) s = std::fma(a[i], b[i], s);
    return s;
  };
  at::parallel_for(0, n * ((e + 3) / 4), row_grain(4 * k), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / ((e + 3) / 4), e0 = (t % ((e + 3) / 4)) * 4, ne = std::min<int64_t>(4, e - e0);
      const float* xr = xp + row * k;
      const float* wr[4];
      for (int64_t j = 0; j < 4; ++j) wr[j] = wp + (e0 + std::min(j, ne - 1)) * k;  // a short group repeats its last
      Vec::T a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
      for (int64_t i = 0; i < kv; i += W) {
        const Vec::T xv = Vec::load(xr + i);
        a0 = Vec::fma(xv, Vec::load(wr[0] + i), a0);
        a1 = Vec::fma(xv, Vec::load(wr[1] + i), a1);
        a2 = Vec::fma(xv, Vec::load(wr[2] + i), a2);
        a3 = Vec::fma(xv, Vec::load(wr[3] + i), a3);
      }
      const Vec::T acc[4] = {a0, a1, a2, a3};
      for (int64_t j = 0; j < ne; ++j) op[row * e + e0 + j] = dot_tail(xr, wr[j], acc[j]);
    }
  });
  return out;
}

// Router logits (N, E) -> each token's k experts by the softmax of its logits, as
// transformers' and llama.cpp's routers choose them: the probabilities p = softmax(logits)
// (each logit's sigmoid where `sigmoid`: LFM2 MoE), the k largest (the lower expert number
// first on a tie), their weights p (or p / their sum, `normalize`). Returned grouped by
// expert: tok (N k,) the token of each routed row, w (N k,) its weight, offsets (E + 1,) where
// each expert's rows start (tokens ascending within an expert). A `bias` (E,) (ERNIE 4.5's
// e_score_correction_bias, llama.cpp's exp_probs_b) is added to p to choose the k, not to
// weigh them.
std::vector<torch::Tensor> moe_route(const torch::Tensor& logits, int64_t k, bool normalize,
                                     const c10::optional<torch::Tensor>& bias, bool sigmoid) {
  check_f32(logits, "logits", 2);
  const int64_t n = logits.size(0), e = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= e, "k must be 1..", e, ", got ", k);
  if (bias) check_f32(*bias, "bias", 1);
  TORCH_CHECK(!bias || bias->size(0) == e, "bias: expected one per expert (", e, ")");
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  std::vector<int64_t> chosen(n * k);
  std::vector<float> weight(n * k);
  const float* lp = logits.data_ptr<float>();
  at::parallel_for(0, n, row_grain(e), [&](int64_t r0, int64_t r1) {
    std::vector<float> p(e), s(e);  // s: what chooses (p, or p + bias)
    std::vector<int64_t> order(e);
    for (int64_t r = r0; r < r1; ++r) {
      const float* l = lp + r * e;
      if (sigmoid) {
        for (int64_t j = 0; j < e; ++j) p[j] = 1.f / (1.f + std::exp(-l[j]));
      } else {
        const float mx = *std::max_element(l, l + e);
        float sum = 0.f;
        for (int64_t j = 0; j < e; ++j) sum += p[j] = std::exp(l[j] - mx);
        for (int64_t j = 0; j < e; ++j) p[j] /= sum;
      }
      for (int64_t j = 0; j < e; ++j) s[j] = bp ? p[j] + bp[j] : p[j];
      std::iota(order.begin(), order.end(), int64_t(0));
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [&](int64_t a, int64_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
      float picked = 0.f;
      for (int64_t j = 0; j < k; ++j) picked += p[order[j]];
      for (int64_t j = 0; j < k; ++j) {
        chosen[r * k + j] = order[j];
        weight[r * k + j] = normalize ? p[order[j]] / picked : p[order[j]];
      }
    }
  });
  auto offsets = torch::zeros({e + 1}, torch::kLong);
  auto tok = torch::empty({n * k}, torch::kLong);
  auto w = torch::empty({n * k}, torch::kFloat);
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n * k; ++i) ++off[chosen[i] + 1];
  for (int64_t j = 0; j < e; ++j) off[j + 1] += off[j];
  std::vector<int64_t> next(off, off + e);
  int64_t* tp = tok.data_ptr<int64_t>();
  float* wp = w.data_ptr<float>();
  for (int64_t i = 0; i < n * k; ++i) {  // tokens ascending: a counting sort by expert
    const int64_t at = next[chosen[i]]++;
    tp[at] = i / k;
    wp[at] = weight[i];
  }
  return {tok, w, offsets};
}

// out (N, C): out[tok[i]] += w[i] * d[i] over the routed rows i in order (by expert, the
// order moe_route gives), from zero. Each thread takes a band of columns through every row,
// so a token's sum runs in that order whatever the split.
// Each routed row's expert, from moe_route's offsets (E + 1,): row r is expert e's where
// offsets[e] <= r < offsets[e + 1]; the bias (E, width) rows they read, checked.
std::vector<const float*> expert_bias_rows(const torch::Tensor& offsets, const torch::Tensor& bias, int64_t rows,
                                           int64_t width) {
  check_i64(offsets, "offsets", 1);
  check_f32(bias, "bias", 2);
  const int64_t e = offsets.size(0) - 1;
  TORCH_CHECK(e >= 1 && bias.size(0) == e && bias.size(1) == width, "bias: expected (", e, ", ", width, "), got ",
              bias.sizes());
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[e] == rows, "offsets must run from 0 to the ", rows, " routed rows");
  std::vector<const float*> out(rows);
  for (int64_t x = 0; x < e; ++x) {
    TORCH_CHECK(off[x] <= off[x + 1], "offsets must be non-decreasing");
    for (int64_t r = off[x]; r < off[x + 1]; ++r) out[r] = bias.data_ptr<float>() + x * width;
  }
  return out;
}

// gpt-oss's experts between their projections (runner/moe.py): each routed row's expert's
// gate|up biases added, then (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g) with
// g = min(gate, limit): transformers' and ggml's swiglu_oai, in one pass where ten torch ops
// took 41 ms a layer for a 256-token chunk's 1024 routed rows (0.6 ms at 16 streams).
torch::Tensor moe_glu(const torch::Tensor& gate_up, const torch::Tensor& offsets, const torch::Tensor& bias,
                      double limit, double alpha) {
  check_f32(gate_up, "gate_up", 2);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up: the last dim must be even (gate | up), got ", gate_up.size(1));
  TORCH_CHECK(limit > 0 && std::isfinite(limit), "limit must be positive, got ", limit);
  const int64_t n = gate_up.size(0), f = gate_up.size(1) / 2;
  const std::vector<const float*> brow = expert_bias_rows(offsets, bias, n, 2 * f);
  auto out = torch::empty({n, f}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lim = static_cast<float>(limit), a = static_cast<float>(alpha);
  at::parallel_for(0, n, row_grain(f, 4096), [&](int64_t begin, int64_t end) {
    const Vec::T one = Vec::set1(1.f), neg = Vec::set1(-1.f), neg_a = Vec::set1(-a);
    const Vec::T hi = Vec::set1(lim), neg_hi = Vec::set1(-lim);
    for (int64_t r = begin; r < end; ++r) {
      const float *g = gp + r * 2 * f, *u = g + f, *bg = brow[r], *bu = bg + f;
      float* o = op + r * f;
      int64_t i = 0;
      for (; i + W <= f; i += W) {  // min(x, l) = -max(-x, -l)
        const Vec::T x = Vec::mul(neg, Vec::max(Vec::mul(neg, Vec::add(Vec::load(g + i), Vec::load(bg + i))), neg_hi));
        const Vec::T y = Vec::mul(neg, Vec::max(Vec::mul(neg, Vec::max(Vec::add(Vec::load(u + i), Vec::load(bu + i)),
                                                                        neg_hi)), neg_hi));
        const Vec::T glu = Vec::div(x, Vec::add(one, Vec::exp(Vec::mul(x, neg_a))));
        Vec::store(o + i, Vec::mul(Vec::add(y, one), glu));
      }
      for (; i < f; ++i) {
        const float x = std::min(g[i] + bg[i], lim), y = std::min(std::max(u[i] + bu[i], -lim), lim);
        o[i] = (y + 1.f) * (x / (1.f + exp_tail(-a * x)));
      }
    }
  });
  return out;
}

torch::Tensor moe_combine(const torch::Tensor& d, const torch::Tensor& tok, const torch::Tensor& w, int64_t n,
                          const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& offsets) {
  check_f32(d, "d", 2);
  check_i64(tok, "tok", 1);
  check_f32(w, "w", 1);
  const int64_t rows = d.size(0), c = d.size(1);
  TORCH_CHECK(tok.size(0) == rows && w.size(0) == rows, "tok and w need one entry per row of d");
  const int64_t* tp = tok.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) TORCH_CHECK(tp[i] >= 0 && tp[i] < n, "tok[", i, "] = ", tp[i], " outside 0..", n);
  TORCH_CHECK(bias.has_value() == offsets.has_value(), "bias needs the offsets that say each row's expert");
  // gpt-oss: each row's expert's down bias, weighted with the row: w (d + b).
  const std::vector<const float*> brow = bias ? expert_bias_rows(*offsets, *bias, rows, c)
                                              : std::vector<const float*>();
  auto out = torch::zeros({n, c}, torch::kFloat);
  const float *dp = d.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t bands = (c + 4 * W - 1) / (4 * W);
  at::parallel_for(0, bands, std::max<int64_t>(1, bands / std::max<int64_t>(1, rows * c / 16384)),
                   [&](int64_t b0, int64_t b1) {
    const int64_t lo = b0 * 4 * W, hi = std::min(c, b1 * 4 * W);
    for (int64_t i = 0; i < rows; ++i) {
      const Vec::T wv = Vec::set1(wp[i]);
      const float* src = dp + i * c;
      float* dst = op + tp[i] * c;
      int64_t j = lo;
      if (!brow.empty()) {
        const float* b = brow[i];
        for (; j + W <= hi; j += W)
          Vec::store(dst + j, Vec::fma(wv, Vec::add(Vec::load(src + j), Vec::load(b + j)), Vec::load(dst + j)));
        for (; j < hi; ++j) dst[j] = std::fma(wp[i], src[j] + b[j], dst[j]);
        continue;
      }
      for (; j + W <= hi; j += W) Vec::store(dst + j, Vec::fma(wv, Vec::load(src + j), Vec::load(dst + j)));
      for (; j < hi; ++j) dst[j] = std::fma(wp[i], src[j], dst[j]);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// A whole forward pass in one call
// ---------------------------------------------------------------------------------------
// runner/kernel_forward.py's layer loop makes about ten calls a layer into this module and
// quant.cpp. From Python each costs argument conversion, a result tensor wrapped for the
// interpreter and the loop's own bookkeeping: on SmolLM2 at one stream that was 7-17% of a
// decode step (docs/performance.md, the engine with and without). Forward makes the same
// calls, in the same order, with the same arguments, from C++, so its results are bitwise
// the loop's. It keeps each layer's weights and norms (handles to the runner's tensors,
// not copies); run() takes what changes from step to step.
//
// One layer, for the Llama family and Gemma alike (Gemma's extra norms are optional):
//   q = rope_kv_write(qkv(y))              [QK norm,] RoPE; k and v into the cache
//   o = paged_attention(q)                 per attention group, concatenated
//   a = o_proj(o); a = rms_norm(a, post_attn) if any         (Gemma)
//   y = add_rms_norm(a, h, mid_norm)       h += a
//   m = down(act_mul(gate_up(y))); m = rms_norm(m, post_ffw) if any   (Gemma)
//   y = add_rms_norm(m, h, next_norm)      h += m; the next layer's input norm
// The last layer computes past its attention only for the rows in `keep`, when given.

struct LinearPart {
  c10::optional<int64_t> mode;  // quant.cpp's form number; none: a float (N, K) weight through at::linear, as F.linear
  torch::Tensor w;
  int64_t n;
  c10::optional<torch::Tensor> bias;
};

struct LayerSpec {
  std::vector<LinearPart> qkv, o, gate_up, down;  // two or more parts: outputs side by side
  c10::optional<torch::Tensor> q_norm, k_norm, post_attn, post_ffw;
  c10::optional<torch::Tensor> mid_norm, next_norm;  // none (OLMo 2): h += x, and h is the next input
  int64_t heads, kv_heads, rope, window;  // rope: which of run()'s tables; window 0: none
  double scale, softcap;                  // softcap 0: none
  bool gelu;                              // GeGLU, else SwiGLU
  double residual = 1.0;                  // Granite: attention and MLP outputs times this as they join h
};

// (token_start, num_tokens, block_table, query_start, starts, context_lens): one
// kv_cache.AttentionGroup.
using AttnGroup = std::tuple<int64_t, int64_t, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>;

c10::optional<torch::Tensor> optional_tensor(const py::handle& v) {
  if (v.is_none()) return c10::nullopt;
  return v.cast<torch::Tensor>();
}

class Forward {
 public:
  // linear: quant's linear_capsule(), or None when every linear is a float one; layers: one
  // dict per layer (kernel_forward.py's build_one_call() and layer_spec() name the keys).
  // The function pointer outlives the capsule: Python never unloads an extension module.
  Forward(const py::object& linear, const std::vector<py::dict>& layers, double eps) : eps_(eps) {
    if (!linear.is_none()) {
      auto capsule = linear.cast<py::capsule>();
      const char* name = capsule.name();
      TORCH_CHECK(name != nullptr && std::strcmp(name, textmill::kLinearCapsule) == 0,
                  "expected quant's linear_capsule()");
      const auto* entry = static_cast<const textmill::LinearEntry*>(capsule.get_pointer());
      linear_parts_ = entry->parts;
    }
    for (const py::dict& d : layers) {
      LayerSpec s;
      s.qkv = parts(d["qkv"]);
      s.o = parts(d["o"]);
      s.gate_up = parts(d["gate_up"]);
      s.down = parts(d["down"]);
      s.q_norm = optional_tensor(d["q_norm"]);
      s.k_norm = optional_tensor(d["k_norm"]);
      s.post_attn = optional_tensor(d["post_attn"]);
      s.post_ffw = optional_tensor(d["post_ffw"]);
      s.mid_norm = optional_tensor(d["mid_norm"]);
      s.next_norm = optional_tensor(d["next_norm"]);
      s.heads = d["heads"].cast<int64_t>();
      s.kv_heads = d["kv_heads"].cast<int64_t>();
      s.rope = d["rope"].cast<int64_t>();
      TORCH_CHECK(s.rope >= 0, "rope: a table index, got ", s.rope);
      max_rope_ = std::max(max_rope_, s.rope);
      s.window = d["window"].cast<int64_t>();
      s.scale = d["scale"].cast<double>();
      s.softcap = d["softcap"].cast<double>();
      s.gelu = d["gelu"].cast<bool>();
      if (d.contains("residual")) s.residual = d["residual"].cast<double>();
      for (const auto* linear_parts : {&s.qkv, &s.o, &s.gate_up, &s.down})
        for (const LinearPart& p : *linear_parts)
          TORCH_CHECK(!p.mode || linear_parts_ != nullptr, "a quantized linear needs quant's linear_capsule()");
      layers_.push_back(std::move(s));
    }
  }

  // y (N, C): layer 0's normed input; h (N, C): the residual stream, updated in place
  // (with `keep`, the last layer works on a copy of those rows). Returns the last layer's
  // output after the final norm: (N, C), or (len(keep), C).
  torch::Tensor run(torch::Tensor y, torch::Tensor h, const torch::Tensor& rows,
                    const std::vector<std::pair<torch::Tensor, torch::Tensor>>& rope,
                    const std::vector<torch::Tensor>& kv, const torch::Tensor& slot_mapping,
                    const std::vector<AttnGroup>& groups, int64_t block_size,
                    const c10::optional<torch::Tensor>& keep) const {
    const int64_t num_layers = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(static_cast<int64_t>(kv.size()) == num_layers, "kv: expected ", num_layers, " layers, got ",
                kv.size());
    TORCH_CHECK(max_rope_ < static_cast<int64_t>(rope.size()), "the layers want RoPE table ", max_rope_, " of ",
                rope.size());
    for (int64_t i = 0; i < num_layers; ++i) {
      const LayerSpec& s = layers_[i];
      const auto& [cos, sin] = rope[s.rope];
      // Each intermediate is dropped as soon as its reader returns, as the Python loop's
      // temporaries are (the largest, gate|up, before the down projection runs): a step's
      // peak memory and the allocator's reuse of blocks stay the loop's.
      torch::Tensor o = attend(rope_kv_write(linear(s.qkv, y), rows, cos, sin, kv[i], slot_mapping, s.heads,
                                             s.kv_heads, s.q_norm, s.k_norm, eps_),
                               kv[i], groups, block_size, s);
      if (keep.has_value() && i == num_layers - 1) {
        o = o.index_select(0, *keep);
        h = h.index_select(0, *keep);
      }
      torch::Tensor x = linear(s.o, o.flatten(1));
      o.reset();
      if (s.post_attn) x = rms_norm(x, *s.post_attn, eps_);
      if (s.residual != 1.0) x.mul_(s.residual);
      y = add_norm(x, h, s.mid_norm);
      x = linear(s.gate_up, y);
      x = s.gelu ? gelu_tanh_mul(x) : silu_mul(x);
      x = linear(s.down, x);
      if (s.post_ffw) x = rms_norm(x, *s.post_ffw, eps_);
      if (s.residual != 1.0) x.mul_(s.residual);
      y = add_norm(x, h, s.next_norm);
    }
    return y;
  }

 private:
  // h += x; the norm of h, or without a norm h itself (read before h next changes).
  torch::Tensor add_norm(const torch::Tensor& x, torch::Tensor& h, const c10::optional<torch::Tensor>& w) const {
    if (w) return add_rms_norm(x, h, *w, eps_);
    h.add_(x);
    return h;
  }

  static std::vector<LinearPart> parts(const py::handle& v) {
    std::vector<LinearPart> out;
    for (const py::handle& p : v.cast<py::list>()) {
      auto t = p.cast<py::tuple>();
      TORCH_CHECK(t.size() == 4, "a linear part is (mode, weight, n, bias)");
      c10::optional<int64_t> mode;
      if (!t[0].is_none()) mode = t[0].cast<int64_t>();
      out.push_back({mode, t[1].cast<torch::Tensor>(), t[2].cast<int64_t>(), optional_tensor(t[3])});
    }
    TORCH_CHECK(!out.empty(), "a linear needs at least one part");
    return out;
  }

  torch::Tensor linear(const std::vector<LinearPart>& parts, const torch::Tensor& x) const {
    // Quantized parts in one call (quant's run_parts): one activation quantization and one
    // parallel region, their columns written side by side. Bitwise the concatenation below.
    if (std::all_of(parts.begin(), parts.end(), [](const LinearPart& p) { return p.mode.has_value(); })) {
      std::vector<textmill::LinearPart> refs;
      refs.reserve(parts.size());
      for (const LinearPart& p : parts) refs.push_back({*p.mode, &p.w, p.n, &p.bias});
      return linear_parts_(refs.data(), static_cast<int64_t>(refs.size()), x);
    }
    if (parts.size() == 1) return at::linear(x, parts[0].w, parts[0].bias);
    std::vector<torch::Tensor> outs;
    outs.reserve(parts.size());
    for (const LinearPart& p : parts) outs.push_back(linear({p}, x));
    return torch::cat(outs, -1);  // as qlinear.SideBySide
  }

  // kernel_attention.KernelPagedAttention.attend_cached's calls.
  static torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& kv, const std::vector<AttnGroup>& groups,
                              int64_t block_size, const LayerSpec& s) {
    std::vector<torch::Tensor> outs;
    outs.reserve(groups.size());
    for (const auto& [start, count, block_table, query_start, starts, context_lens] : groups)
      outs.push_back(paged_attention(q.narrow(0, start, count), kv, block_table, query_start, starts, context_lens,
                                     block_size, s.scale, s.window, s.softcap));
    TORCH_CHECK(!outs.empty(), "a step has at least one attention group");
    return outs.size() == 1 ? outs[0] : torch::cat(outs);
  }

  textmill::LinearPartsFn linear_parts_ = nullptr;
  std::vector<LayerSpec> layers_;
  int64_t max_rope_ = 0;  // the highest RoPE table index a layer reads: run() checks it once
  double eps_;
};

}  // namespace

// The compute functions run without the GIL, as torch's own operators do: the server's
// event loop thread (HTTP, SSE) then runs while a step's kernels do, instead of waiting for
// the engine thread to come back to Python (the interpreter's 5 ms switch interval).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("rms_norm", &rms_norm, nogil, "y = w * x * rsqrt(mean(x^2) + eps), row by row; x (M, C) float32", py::arg("x"),
        py::arg("w"), py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, nogil, "residual += x in place, then rms_norm(residual, w, eps)", py::arg("x"),
        py::arg("residual"), py::arg("w"), py::arg("eps"));
  m.def("argmax_rows", &argmax_rows, nogil,
        "x (M, V) float32 -> (M,) int64: the first index of each row's maximum (a NaN counts as the maximum)",
        py::arg("x"));
  m.def("silu_mul", &silu_mul, nogil, "silu(gate_up[:, :F]) * gate_up[:, F:]", py::arg("gate_up"));
  m.def("gelu_tanh_mul", &gelu_tanh_mul, nogil, "gelu_tanh(gate_up[:, :F]) * gate_up[:, F:]", py::arg("gate_up"));
  m.def("rope_kv_write", &rope_kv_write, nogil,
        "[per-head RMSNorm of q / k times q_norm / k_norm (D,) float32, then] rotate-half RoPE on q and k of "
        "qkv, k and v written to kv_cache[slot_mapping] (float32, float16 or bfloat16, rounded to nearest "
        "even; or int8 rows of D codes and a float32 scale); returns q (N, Hq, D) float32",
        py::arg("qkv"), py::arg("positions"), py::arg("cos"), py::arg("sin"), py::arg("kv_cache"),
        py::arg("slot_mapping"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("q_norm") = py::none(),
        py::arg("k_norm") = py::none(), py::arg("norm_eps") = 1e-6);
  m.def("paged_attention", &paged_attention, nogil,
        "causal attention of q (N, Hq, D) float32 over the paged kv_cache (S, 2, Hkv, D) (float32, float16 or "
        "bfloat16; or int8, (S, 2, Hkv, D + 4)) through block_table",
        py::arg("q"), py::arg("kv_cache"), py::arg("block_table"), py::arg("query_start"), py::arg("seq_start"),
        py::arg("context_lens"), py::arg("block_size"), py::arg("scale"), py::arg("sliding_window"),
        py::arg("softcap"), py::arg("sinks") = py::none());
  m.def("dense_rows", &dense_rows, nogil,
        "x (N, K) @ w (E, K)^T float32, each output in one fixed order whatever N (a router's logits)",
        py::arg("x"), py::arg("w"));
  m.def("moe_route", &moe_route, nogil,
        "router logits (N, E) -> tok (N k,), w (N k,), offsets (E + 1,): each token's k likeliest experts "
        "by softmax (or sigmoid; weights renormalized over them if `normalize`; chosen by p + bias if given), "
        "grouped by expert",
        py::arg("logits"), py::arg("k"), py::arg("normalize"), py::arg("bias") = py::none(),
        py::arg("sigmoid") = false);
  m.def("moe_combine", &moe_combine, nogil,
        "out (n, C) = sum over routed rows i of w[i] (d[i] [+ bias[its expert]]) into row tok[i]",
        py::arg("d"), py::arg("tok"), py::arg("w"), py::arg("n"), py::arg("bias") = py::none(),
        py::arg("offsets") = py::none());
  m.def("moe_glu", &moe_glu, nogil,
        "gpt-oss's clamped SwiGLU of routed rows (R, 2F) after each row's expert's gate|up bias (E, 2F) -> (R, F)",
        py::arg("gate_up"), py::arg("offsets"), py::arg("bias"), py::arg("limit"), py::arg("alpha"));
  py::class_<Forward>(m, "Forward", "a whole forward pass of a decoder's layers in one call (see layer.cpp)")
      .def(py::init<const py::object&, const std::vector<py::dict>&, double>(), py::arg("linear"),
           py::arg("layers"), py::arg("eps"))
      .def("run", &Forward::run, nogil, "the layers on y and h for one step; returns the final hidden states",
           py::arg("y"), py::arg("h"), py::arg("rows"), py::arg("rope"), py::arg("kv"), py::arg("slot_mapping"),
           py::arg("groups"), py::arg("block_size"), py::arg("keep") = py::none());
}
