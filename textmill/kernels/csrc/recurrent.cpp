// Kernels for the recurrent layers of hybrid models (Qwen3.5's gated delta nets, LFM2's short
// convolutions, Granite 4.0-H's Mamba-2 mixers), float32 CPU.
//
//   causal_conv  each sequence's rows through a causal depthwise convolution (its first taps
//                from the sequence's state), plus a bias (Mamba-2's), then SiLU (Qwen3.5, Mamba-2;
//                LFM2's without); the state keeps its last taps - 1 inputs
//   gated_delta  q and k L2-normed, the gated delta rule through each sequence's state token by
//                token, each output head RMS-normed times the norm's weight and silu(z)
//   ssm_scan     Mamba-2's selective scan through each sequence's state token by token, plus D x,
//                times silu(z), RMS-normed by groups of heads times the norm's weight (where given)
//   sigmoid_gate x *= sigmoid(gate): the gate on Qwen3.5's attention output
//
// models/qwen35.py and models/granite_hybrid.py state the same math in torch (the tests hold these
// to it). A sequence is a
// run of rows of the flat batch and a slot of the state pools: `rows` is (B, 3) int64, each
// sequence's first row, row count and slot.
//
// Every value is computed from its own row, channel and head alone, in one fixed order, with
// loops whose vector split depends on the channel or the head width, never on how many rows a
// step holds. So a position gets the same bits in a prompt chunk as in a one-token step, as with
// layer.cpp's kernels (echo scores a continuation exactly as generating it did).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "vec.h"

namespace {

using V = Vec::T;

void check_rows(const torch::Tensor& rows, int64_t n, int64_t slots) {
  TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.dim() == 2 && rows.size(1) == 3 && rows.is_contiguous(),
              "rows: expected (B, 3) int64 (first row, rows, slot), got ", rows.sizes());
  const int64_t* r = rows.data_ptr<int64_t>();
  int64_t covered = 0;
  for (int64_t b = 0; b < rows.size(0); ++b) {
    TORCH_CHECK(r[3 * b] == covered && r[3 * b + 1] > 0, "rows: sequence ", b, " must start at row ", covered,
                " and hold rows");
    TORCH_CHECK(r[3 * b + 2] >= 0 && r[3 * b + 2] < slots, "rows: slot ", r[3 * b + 2], " outside [0, ", slots, ")");
    covered += r[3 * b + 1];
  }
  TORCH_CHECK(covered == n, "rows cover ", covered, " rows, the batch has ", n);
}

// A float32 matrix whose rows may be apart (a column slice of a wider output) but whose values
// within a row are adjacent.
void check_rows_f32(const torch::Tensor& t, const char* name, int64_t n, int64_t width) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.dim() == 2 && t.size(0) == n && t.size(1) == width &&
                  t.stride(1) == 1,
              name, ": expected (", n, ", ", width, ") float32 with adjacent columns, got ", t.sizes());
}

inline float silu(float x) { return x / (1.f + exp_tail(-x)); }
inline V silu(V x) { return Vec::div(x, Vec::add(Vec::set1(1.f), Vec::exp(Vec::sub(Vec::zero(), x)))); }

// y[i] = silu(x[i]) (times m[i] where given), W at a time, then the tail: which path a value takes
// depends on its index alone.
inline void silu_row(const float* x, float* y, int64_t n, const float* m = nullptr) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V s = silu(Vec::load(x + i));
    Vec::store(y + i, m ? Vec::mul(s, Vec::load(m + i)) : s);
  }
  for (; i < n; ++i) y[i] = m ? silu(x[i]) * m[i] : silu(x[i]);
}

// The sum of x[i] * x[i], in one fixed order for a given n.
inline float sum_squares(const float* x, int64_t n) {
  V acc = Vec::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = Vec::fma(Vec::load(x + i), Vec::load(x + i), acc);
  float ss = Vec::sum(acc);
  for (; i < n; ++i) ss += x[i] * x[i];
  return ss;
}

// torch's softplus (beta 1, threshold 20): x past the threshold is returned as it is.
inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }

torch::Tensor causal_conv(const torch::Tensor& x, const torch::Tensor& weight, torch::Tensor pool,
                          const torch::Tensor& rows, bool silu, const c10::optional<torch::Tensor>& bias) {
  const int64_t n = x.size(0), channels = weight.size(1), taps = weight.size(0);
  check_rows_f32(x, "x", n, channels);
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.dim() == 2 && weight.is_contiguous() && taps >= 1,
              "weight: expected (taps, channels) float32, contiguous, got ", weight.sizes());
  TORCH_CHECK(pool.scalar_type() == torch::kFloat && pool.dim() == 3 && pool.is_contiguous() &&
                  pool.size(1) == taps - 1 && pool.size(2) == channels,
              "pool: expected (slots, ", taps - 1, ", ", channels, ") float32, contiguous, got ", pool.sizes());
  check_rows(rows, n, pool.size(0));
  if (bias)
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == channels,
                "bias: expected (", channels, ") float32");
  auto out = torch::empty({n, channels}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* pp = pool.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t xs = x.stride(0), past = taps - 1, seqs = rows.size(0);
  // Each thread owns a range of channels across every sequence and row: a channel's taps and
  // state are its own.
  at::parallel_for(0, channels, 64, [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    std::vector<float> acc(width);
    for (int64_t b = 0; b < seqs; ++b) {
      const int64_t first = r[3 * b], count = r[3 * b + 1];
      float* state = pp + r[3 * b + 2] * past * channels;
      for (int64_t t = 0; t < count; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < taps; ++j) {
          const int64_t at = t - past + j;  // the input this tap reads: the chunk's, or the state's
          const float* in = (at >= 0 ? xp + (first + at) * xs : state + (past + at) * channels) + c0;
          const float* w = wp + j * channels + c0;
          for (int64_t c = 0; c < width; ++c) acc[c] += w[c] * in[c];
        }
        if (bp)
          for (int64_t c = 0; c < width; ++c) acc[c] += bp[c0 + c];
        float* o = op + (first + t) * channels + c0;
        if (silu) {
          silu_row(acc.data(), o, width);
        } else {
          std::copy(acc.begin(), acc.end(), o);
        }
      }
      // The state becomes the last `past` inputs: older state rows first where the chunk is short.
      const int64_t keep = std::min<int64_t>(past, count), shift = past - keep;
      for (int64_t i = 0; i < shift; ++i)
        std::copy(state + (i + keep) * channels + c0, state + (i + keep) * channels + c1, state + i * channels + c0);
      for (int64_t i = 0; i < keep; ++i) {
        const float* in = xp + (first + count - keep + i) * xs;
        std::copy(in + c0, in + c1, state + (shift + i) * channels + c0);
      }
    }
  });
  return out;
}

inline void l2_normalize(const float* x, float* y, int64_t d, float scale) {
  const float inv = scale / std::sqrt(sum_squares(x, d) + 1e-6f);
  for (int64_t i = 0; i < d; ++i) y[i] = x[i] * inv;
}

// One token through one value head's state S (dk rows of dv): S *= decay, then
// S += k (beta (v - S^T k))^T, and o = S^T q. Each S value is read and written in both passes,
// the sums over the dk rows run in row order, four registers of columns at a time where dv
// allows it (Qwen3.5's 128), else one column at a time.
inline void delta_step(float* S, const float* q, const float* k, const float* v, float decay, float beta,
                       float* o, float* scratch, int64_t dk, int64_t dv) {
  constexpr int64_t kBlock = 4 * W;
  if (dv % kBlock == 0) {
    const V e = Vec::set1(decay);
    for (int64_t jb = 0; jb < dv; jb += kBlock) {
      V r0 = Vec::zero(), r1 = r0, r2 = r0, r3 = r0;
      for (int64_t i = 0; i < dk; ++i) {
        float* Si = S + i * dv + jb;
        const V kk = Vec::set1(k[i]);
        const V s0 = Vec::mul(Vec::load(Si), e), s1 = Vec::mul(Vec::load(Si + W), e);
        const V s2 = Vec::mul(Vec::load(Si + 2 * W), e), s3 = Vec::mul(Vec::load(Si + 3 * W), e);
        Vec::store(Si, s0), Vec::store(Si + W, s1), Vec::store(Si + 2 * W, s2), Vec::store(Si + 3 * W, s3);
        r0 = Vec::fma(s0, kk, r0), r1 = Vec::fma(s1, kk, r1), r2 = Vec::fma(s2, kk, r2), r3 = Vec::fma(s3, kk, r3);
      }
      // delta = (v - S^T k) * beta, into scratch
      const V b = Vec::set1(beta);
      const V rs[4] = {r0, r1, r2, r3};
      for (int u = 0; u < 4; ++u)
        Vec::store(scratch + jb + u * W, Vec::mul(Vec::sub(Vec::load(v + jb + u * W), rs[u]), b));
    }
    for (int64_t jb = 0; jb < dv; jb += kBlock) {
      const V d0 = Vec::load(scratch + jb), d1 = Vec::load(scratch + jb + W);
      const V d2 = Vec::load(scratch + jb + 2 * W), d3 = Vec::load(scratch + jb + 3 * W);
      V o0 = Vec::zero(), o1 = o0, o2 = o0, o3 = o0;
      for (int64_t i = 0; i < dk; ++i) {
        float* Si = S + i * dv + jb;
        const V kk = Vec::set1(k[i]), qq = Vec::set1(q[i]);
        const V s0 = Vec::fma(kk, d0, Vec::load(Si)), s1 = Vec::fma(kk, d1, Vec::load(Si + W));
        const V s2 = Vec::fma(kk, d2, Vec::load(Si + 2 * W)), s3 = Vec::fma(kk, d3, Vec::load(Si + 3 * W));
        Vec::store(Si, s0), Vec::store(Si + W, s1), Vec::store(Si + 2 * W, s2), Vec::store(Si + 3 * W, s3);
        o0 = Vec::fma(s0, qq, o0), o1 = Vec::fma(s1, qq, o1), o2 = Vec::fma(s2, qq, o2), o3 = Vec::fma(s3, qq, o3);
      }
      Vec::store(o + jb, o0), Vec::store(o + jb + W, o1);
      Vec::store(o + jb + 2 * W, o2), Vec::store(o + jb + 3 * W, o3);
    }
    return;
  }
  float* remembered = scratch;
  std::fill(remembered, remembered + dv, 0.f);
  for (int64_t i = 0; i < dk; ++i) {
    float* Si = S + i * dv;
    for (int64_t j = 0; j < dv; ++j) {
      Si[j] *= decay;
      remembered[j] = std::fma(Si[j], k[i], remembered[j]);
    }
  }
  for (int64_t j = 0; j < dv; ++j) remembered[j] = (v[j] - remembered[j]) * beta;  // now delta
  std::fill(o, o + dv, 0.f);
  for (int64_t i = 0; i < dk; ++i) {
    float* Si = S + i * dv;
    for (int64_t j = 0; j < dv; ++j) {
      Si[j] = std::fma(k[i], remembered[j], Si[j]);
      o[j] = std::fma(Si[j], q[i], o[j]);
    }
  }
}

torch::Tensor gated_delta(const torch::Tensor& qkv, const torch::Tensor& z, const torch::Tensor& b,
                          const torch::Tensor& a, const torch::Tensor& A, const torch::Tensor& dt_bias,
                          const torch::Tensor& norm_weight, torch::Tensor pool, const torch::Tensor& rows,
                          int64_t key_heads, bool tiled, double eps) {
  TORCH_CHECK(pool.scalar_type() == torch::kFloat && pool.dim() == 4 && pool.is_contiguous(),
              "pool: expected (slots, value_heads, key_dim, value_dim) float32, contiguous, got ", pool.sizes());
  const int64_t n = qkv.size(0), hv = pool.size(1), dk = pool.size(2), dv = pool.size(3), hk = key_heads;
  TORCH_CHECK(hk > 0 && hv % hk == 0, "value heads (", hv, ") must be a multiple of key heads (", hk, ")");
  check_rows_f32(qkv, "qkv", n, 2 * hk * dk + hv * dv);
  check_rows_f32(z, "z", n, hv * dv);
  check_rows_f32(b, "b", n, hv);
  check_rows_f32(a, "a", n, hv);
  for (const auto* t : {&A, &dt_bias})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == hv,
                "A and dt_bias: expected (", hv, ") float32");
  TORCH_CHECK(norm_weight.scalar_type() == torch::kFloat && norm_weight.is_contiguous() && norm_weight.numel() == dv,
              "norm_weight: expected (", dv, ") float32");
  check_rows(rows, n, pool.size(0));
  // q (times key_dim ** -0.5) and k of every row, L2-normed per key head, first: row by row.
  auto qk = torch::empty({n, 2 * hk, dk}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  float* qkp = qk.data_ptr<float>();
  const int64_t xs = qkv.stride(0);
  const float q_scale = 1.f / std::sqrt(static_cast<float>(dk));
  at::parallel_for(0, n * 2 * hk, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / (2 * hk), h = i % (2 * hk);
      l2_normalize(xp + row * xs + h * dk, qkp + i * dk, dk, h < hk ? q_scale : 1.f);
    }
  });
  auto out = torch::empty({n, hv * dv}, qkv.options());
  float* op = out.data_ptr<float>();
  const float *zp = z.data_ptr<float>(), *bp = b.data_ptr<float>(), *ap = a.data_ptr<float>();
  const float *Ap = A.data_ptr<float>(), *dtp = dt_bias.data_ptr<float>(), *wp = norm_weight.data_ptr<float>();
  float* sp = pool.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t seqs = rows.size(0), zs = z.stride(0), bs = b.stride(0), as = a.stride(0);
  const int64_t group = hv / hk;
  // One task per (sequence, value head): its state, (key_dim, value_dim), through its tokens in order.
  at::parallel_for(0, seqs * hv, 1, [&](int64_t task0, int64_t task1) {
    std::vector<float> scratch(dv), gate(dv);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t s = task / hv, h = task % hv, kh = tiled ? h % hk : h / group;
      const int64_t first = r[3 * s], count = r[3 * s + 1];
      float* S = sp + (r[3 * s + 2] * hv + h) * dk * dv;
      for (int64_t row = first; row < first + count; ++row) {
        const float* q = qkp + (row * 2 * hk + kh) * dk;
        const float* k = qkp + (row * 2 * hk + hk + kh) * dk;
        const float* v = xp + row * xs + 2 * hk * dk + h * dv;
        const float decay = std::exp(Ap[h] * softplus(ap[row * as + h] + dtp[h]));
        const float beta = 1.f / (1.f + std::exp(-bp[row * bs + h]));
        float* o = op + row * hv * dv + h * dv;
        delta_step(S, q, k, v, decay, beta, o, scratch.data(), dk, dv);
        // The gated norm: o * rsqrt(mean(o^2) + eps) * w * silu(z)
        const float inv = 1.f / std::sqrt(sum_squares(o, dv) / static_cast<float>(dv) + static_cast<float>(eps));
        silu_row(zp + row * zs + h * dv, gate.data(), dv, wp);  // w * silu(z)
        for (int64_t j = 0; j < dv; ++j) o[j] = o[j] * inv * gate[j];
      }
    }
  });
  return out;
}

// Up to kTokens tokens of one sequence through one Mamba-2 head's state S (ns rows of p): for each
// token t in order, S = S * decay_t + B_t (dt_t x_t)^T and o_t = S^T C_t + D x_t, K registers of
// columns at a time. Each value takes the same operations in the same order, token after token and
// row after row, whatever the grouping, so a token gets the same bits in a chunk as in a step.
// Where a head's width holds only one register's columns a block (Nemotron-H's 80 on AVX-512), one
// chain of dependent multiply-adds a token leaves the core waiting: there a block of S stays in a
// register across the group's tokens (read and written once a group, each token's accumulator a
// chain of its own; a prompt's scan 1.2-1.5x as fast). Four registers of one token's columns
// already keep four chains going, and holding them across tokens would chain each register's
// updates from token to token: a 64-wide head (Granite's, Falcon-H1's) takes its tokens one by one,
// which measured faster.
constexpr int kTokens = 4;

struct ScanToken {
  const float *B, *C, *x;
  float dt, decay;
  float* o;
};

template <int K, int T>
inline void scan_block(float* S, const ScanToken* tok, float D, int64_t ns, int64_t p) {
  V e[T];
  for (int t = 0; t < T; ++t) e[t] = Vec::set1(tok[t].decay);
  for (int64_t jb = 0; jb < p; jb += K * W) {
    V xd[T][K], acc[T][K], s[K];
    for (int t = 0; t < T; ++t) {
      const V d = Vec::set1(tok[t].dt);
      for (int u = 0; u < K; ++u) xd[t][u] = Vec::mul(Vec::load(tok[t].x + jb + u * W), d), acc[t][u] = Vec::zero();
    }
    for (int64_t i = 0; i < ns; ++i) {
      float* Si = S + i * p + jb;
      for (int u = 0; u < K; ++u) s[u] = Vec::load(Si + u * W);
      for (int t = 0; t < T; ++t) {
        const V b = Vec::set1(tok[t].B[i]), c = Vec::set1(tok[t].C[i]);
        for (int u = 0; u < K; ++u) {
          s[u] = Vec::fma(s[u], e[t], Vec::mul(b, xd[t][u]));
          acc[t][u] = Vec::fma(s[u], c, acc[t][u]);
        }
      }
      for (int u = 0; u < K; ++u) Vec::store(Si + u * W, s[u]);
    }
    const V dd = Vec::set1(D);
    for (int t = 0; t < T; ++t)
      for (int u = 0; u < K; ++u)
        Vec::store(tok[t].o + jb + u * W, Vec::fma(Vec::load(tok[t].x + jb + u * W), dd, acc[t][u]));
  }
}

// The same for one token, one column at a time: head widths that are no multiple of K * W.
inline void scan_columns(float* S, const ScanToken& tok, float D, int64_t ns, int64_t p) {
  std::fill(tok.o, tok.o + p, 0.f);
  for (int64_t i = 0; i < ns; ++i) {
    float* Si = S + i * p;
    for (int64_t j = 0; j < p; ++j) {
      Si[j] = std::fma(Si[j], tok.decay, tok.B[i] * (tok.x[j] * tok.dt));
      tok.o[j] = std::fma(Si[j], tok.C[i], tok.o[j]);
    }
  }
  for (int64_t j = 0; j < p; ++j) tok.o[j] = std::fma(tok.x[j], D, tok.o[j]);
}

template <int K>
inline void scan_group(float* S, const ScanToken* tok, int n, float D, int64_t ns, int64_t p) {
  switch (n) {
    case 1: return scan_block<K, 1>(S, tok, D, ns, p);
    case 2: return scan_block<K, 2>(S, tok, D, ns, p);
    case 3: return scan_block<K, 3>(S, tok, D, ns, p);
    default: return scan_block<K, kTokens>(S, tok, D, ns, p);
  }
}

inline void scan_tokens(float* S, const ScanToken* tok, int n, float D, int64_t ns, int64_t p) {
  if (p % (4 * W) == 0) {  // Granite's and Falcon-H1's 64: four independent chains of a token's columns
    for (int t = 0; t < n; ++t) scan_block<4, 1>(S, tok + t, D, ns, p);
    return;
  }
  if (p % W == 0) return scan_group<1>(S, tok, n, D, ns, p);  // Nemotron-H's 80 on AVX-512
  for (int t = 0; t < n; ++t) scan_columns(S, tok[t], D, ns, p);
}

torch::Tensor ssm_scan(const torch::Tensor& xbc, const torch::Tensor& z, const torch::Tensor& dt,
                       const torch::Tensor& A, const torch::Tensor& D, const torch::Tensor& dt_bias,
                       const torch::Tensor& norm_weight, torch::Tensor pool, const torch::Tensor& rows, int64_t groups,
                       double eps) {
  TORCH_CHECK(pool.scalar_type() == torch::kFloat && pool.dim() == 4 && pool.is_contiguous(),
              "pool: expected (slots, heads, state_size, head_dim) float32, contiguous, got ", pool.sizes());
  const int64_t n = xbc.size(0), nh = pool.size(1), ns = pool.size(2), p = pool.size(3), g = groups;
  TORCH_CHECK(g > 0 && nh % g == 0, "heads (", nh, ") must be a multiple of groups (", g, ")");
  const int64_t inner = nh * p, group_width = inner / g;
  check_rows_f32(xbc, "xbc", n, inner + 2 * g * ns);
  check_rows_f32(z, "z", n, inner);
  check_rows_f32(dt, "dt", n, nh);
  for (const auto* t : {&A, &D, &dt_bias})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->numel() == nh,
                "A, D and dt_bias: expected (", nh, ") float32");
  const bool normed = norm_weight.numel() > 0;  // empty: y silu(z) alone (Falcon-H1's files without ssm_norm)
  TORCH_CHECK(norm_weight.scalar_type() == torch::kFloat && norm_weight.is_contiguous() &&
                  (!normed || norm_weight.numel() == inner),
              "norm_weight: expected (", inner, ") float32, or none");
  check_rows(rows, n, pool.size(0));
  auto out = torch::empty({n, inner}, xbc.options());
  float* op = out.data_ptr<float>();
  const float *xp = xbc.data_ptr<float>(), *zp = z.data_ptr<float>(), *dtp = dt.data_ptr<float>();
  const float *Ap = A.data_ptr<float>(), *Dp = D.data_ptr<float>(), *bp = dt_bias.data_ptr<float>();
  const float* wp = norm_weight.data_ptr<float>();
  float* sp = pool.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t seqs = rows.size(0), xs = xbc.stride(0), zs = z.stride(0), ds = dt.stride(0), per_group = nh / g;
  // One task per (sequence, head): its state, (state_size, head_dim), through its tokens in order.
  at::parallel_for(0, seqs * nh, 1, [&](int64_t task0, int64_t task1) {
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t s = task / nh, h = task % nh, grp = h / per_group;
      const int64_t first = r[3 * s], count = r[3 * s + 1];
      float* S = sp + (r[3 * s + 2] * nh + h) * ns * p;
      ScanToken tok[kTokens];
      for (int64_t row0 = first; row0 < first + count; row0 += kTokens) {
        const int n = static_cast<int>(std::min<int64_t>(kTokens, first + count - row0));
        for (int t = 0; t < n; ++t) {
          const int64_t row = row0 + t;
          const float* in = xp + row * xs;
          const float step = softplus(dtp[row * ds + h] + bp[h]);
          tok[t] = {in + inner + grp * ns, in + inner + (g + grp) * ns, in + h * p, step, std::exp(step * Ap[h]),
                    op + row * inner + h * p};
        }
        scan_tokens(S, tok, n, Dp[h], ns, p);
      }
    }
  });
  // The gated norm by groups of heads: y silu(z) * rsqrt(mean((y silu(z))^2) + eps) * w, row by row.
  at::parallel_for(0, n * g, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / g, at = (i % g) * group_width;
      float* y = op + row * inner + at;
      silu_row(zp + row * zs + at, y, group_width, y);
      if (!normed) continue;
      const float inv = 1.f / std::sqrt(sum_squares(y, group_width) / static_cast<float>(group_width) +
                                        static_cast<float>(eps));
      for (int64_t j = 0; j < group_width; ++j) y[j] = y[j] * inv * wp[at + j];
    }
  });
  return out;
}

// x *= sigmoid(gate), row by row (Qwen3.5's gate on its attention's output).
torch::Tensor sigmoid_gate(torch::Tensor x, const torch::Tensor& gate) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x: expected (N, W) float32, contiguous, got ", x.sizes());
  const int64_t n = x.size(0), width = x.size(1);
  check_rows_f32(gate, "gate", n, width);
  float* xp = x.data_ptr<float>();
  const float* gp = gate.data_ptr<float>();
  const int64_t gs = gate.stride(0);
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row)
      for (int64_t c = 0; c < width; ++c) xp[row * width + c] *= 1.f / (1.f + exp_tail(-gp[row * gs + c]));
  });
  return x;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("causal_conv", &causal_conv, nogil,
        "each sequence's rows of x (N, C) through the causal depthwise convolution weight (taps, C) [then silu], "
        "its first taps from pool (slots, taps - 1, C), which keeps the last taps - 1 inputs after",
        py::arg("x"), py::arg("weight"), py::arg("pool"), py::arg("rows"), py::arg("silu"),
        py::arg("bias") = py::none());
  m.def("ssm_scan", &ssm_scan, nogil,
        "Mamba-2's selective scan of each sequence's rows of xbc (N, x | B | C) through its state in pool (slots, "
        "H, Ns, P), plus D x, then the gated RMSNorm by groups; returns (N, H * P)",
        py::arg("xbc"), py::arg("z"), py::arg("dt"), py::arg("A"), py::arg("D"), py::arg("dt_bias"),
        py::arg("norm_weight"), py::arg("pool"), py::arg("rows"), py::arg("groups"), py::arg("eps"));
  m.def("gated_delta", &gated_delta, nogil,
        "the gated delta rule of each sequence's rows through its state in pool (slots, Hv, Dk, Dv), then "
        "the gated RMSNorm; returns (N, Hv * Dv)",
        py::arg("qkv"), py::arg("z"), py::arg("b"), py::arg("a"), py::arg("A"), py::arg("dt_bias"),
        py::arg("norm_weight"), py::arg("pool"), py::arg("rows"), py::arg("key_heads"), py::arg("tiled"),
        py::arg("eps"));
  m.def("sigmoid_gate", &sigmoid_gate, nogil, "x *= sigmoid(gate) in place, row by row; returns x", py::arg("x"),
        py::arg("gate"));
}
