// GGUF block decoding, one group of 32 weights at a time, for packing a file's tensors
// straight into the kernels' layout (quant.cpp pack_gguf). It is the C++ twin of
// loader/group_codes.py + loader/dequant.py and must give the same bytes: the Python
// converters stay as the reference (tests compare the two). For the 1- to 3-bit IQ types the
// reference is the values of gguf-py's dequantizer (dequant.py's own for IQ1_M), which these
// give bit for bit: their codes here are the file's, where the Python path rounds them to 8
// bits. Layouts follow ggml's block_* structs: scales are little-endian f16, nibbles low
// half first.
//
// Why here and not numpy: numpy converts a tensor in several whole-tensor passes with
// temporaries (a 1B Q4_K_M file took ~12 s to load on 2 cores, two thirds of it in
// Q6_K's dequantize and the 8-bit requantize); one pass over the mapped bytes, parallel
// over tiles, writes the packed weights directly.
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace gguf {

// ggml's type ids (gguf.constants.GGMLQuantizationType).
enum Type : int64_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18,
  IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23, IQ1_M = 29, BF16 = 30, MXFP4 = 39,
};

struct Layout {
  int64_t block_values;  // weights per block
  int64_t block_bytes;
};

// The block layout of a type decoded here; block_values 0 for any other type.
inline Layout layout(int64_t type) {
  switch (type) {
    case F32: return {1, 4};
    case F16: return {1, 2};
    case BF16: return {1, 2};
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q2_K: return {256, 84};
    case Q3_K: return {256, 110};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    case IQ4_NL: return {32, 18};
    case IQ4_XS: return {256, 136};
    case MXFP4: return {32, 17};
    case IQ2_XXS: return {256, 66};
    case IQ2_XS: return {256, 74};
    case IQ2_S: return {256, 82};
    case IQ3_XXS: return {256, 98};
    case IQ3_S: return {256, 110};
    case IQ1_S: return {256, 50};
    case IQ1_M: return {256, 56};
    default: return {0, 0};
  }
}

// The 1- to 3-bit IQ types index a lattice grid: each 8 (IQ1, IQ2) or 4 (IQ3) weights are
// one row of small integers. The tables are not copied here: the caller passes gguf-py's
// (group_codes.iq_grid), as int8 rows of this shape; {0, 0} for a type without one.
struct GridShape {
  int64_t rows;
  int64_t width;
};
inline GridShape grid_shape(int64_t type) {
  switch (type) {
    case IQ2_XXS: return {256, 8};
    case IQ2_XS: return {512, 8};
    case IQ2_S: return {1024, 8};
    case IQ3_XXS: return {256, 4};
    case IQ3_S: return {512, 4};
    case IQ1_S: case IQ1_M: return {2048, 8};
    default: return {0, 0};
  }
}

// The grid values each type's decoding below relies on (the codes it derives must fit the
// kernels' forms): IQ2's 8/25/43, IQ3_XXS's even 2..62 (its grid: 4..62), IQ3_S's odd
// 1..15, IQ1's -1/0/1.
inline bool grid_value_ok(int64_t type, int v) {
  switch (type) {
    case IQ2_XXS: case IQ2_XS: case IQ2_S: return v == 8 || v == 25 || v == 43;
    case IQ3_XXS: return v >= 2 && v <= 62 && v % 2 == 0;
    case IQ3_S: return v >= 1 && v <= 15 && v % 2 == 1;
    case IQ1_S: case IQ1_M: return v >= -1 && v <= 1;
    default: return false;
  }
}

// Types whose groups are 4-bit codes with a scale and a min (the kernels' Q4 form). IQ3_S's
// values are odd integers -15..15 (2q - 15 for a 4-bit q) and IQ1_S's three grid values per
// group sit at one shift: both are a scale and a min on 4-bit codes.
inline bool four_bit(int64_t type) {
  return type == Q4_0 || type == Q4_1 || type == Q4_K || type == IQ3_S || type == IQ1_S;
}

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}
inline uint16_t f16_bits(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}
inline uint16_t to_half(float f) { return c10::Half(f).x; }

// Q4_K/Q5_K: sub-block j's 6-bit scale and min from the 12 packed bytes (ggml's
// get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, float* sc, float* mn) {
  if (j < 4) {
    *sc = static_cast<float>(q[j] & 63);
    *mn = static_cast<float>(q[j + 4] & 63);
  } else {
    *sc = static_cast<float>((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    *mn = static_cast<float>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// The scales and mins must fit a half; a value at or past 65504 (or not finite) makes
// the caller fall back to the Python path, which rounds such a tensor to 8 bits instead.
inline bool half_ok(float x) { return std::fabs(x) < 65504.0f; }

// Sub-block s of a Q4_K/Q5_K super-block: d * sc and -dmin * mn, each rounded to a half;
// d and dmin are the super-block's (f16(blk), f16(blk + 2)), read once by a caller that
// walks all 8 sub-blocks (a Q4_K row packed whole: ~1.15x its time when read per group).
inline bool k_scale_min(const uint8_t* blk, int s, float d, float dmin, uint16_t* dh, uint16_t* mh) {
  float sc, mn;
  scale_min_k4(s, blk + 4, &sc, &mn);
  const float dd = d * sc, mm = -(dmin * mn);
  if (!half_ok(dd) || !half_ok(mm)) return false;
  *dh = to_half(dd);
  *mh = to_half(mm);
  return true;
}
inline bool k_scale_min(const uint8_t* blk, int s, uint16_t* d, uint16_t* m) {
  return k_scale_min(blk, s, f16(blk), f16(blk + 2), d, m);
}

// A Q4_0/Q5_0 block's d and m = -offset * d (exact in a half whenever it fits one), or a
// Q4_1/Q5_1 block's own d and m (symmetric false).
inline bool block_scale_min(const uint8_t* blk, bool symmetric, float offset, uint16_t* d, uint16_t* m) {
  const float dd = f16(blk);
  const float mm = symmetric ? -offset * dd : f16(blk + 2);
  if (!half_ok(dd) || !half_ok(mm)) return false;
  *d = f16_bits(blk);
  *m = symmetric ? to_half(mm) : f16_bits(blk + 2);
  return true;
}

// IQ2_XXS, IQ2_XS and IQ3_XXS store 8 signs as a 7-bit index: the eighth is the parity
// of the seven (an even number of minus signs), ggml's ksigns_iq2xs table computed.
inline uint32_t ksigns(uint32_t i) { return i | ((__builtin_popcount(i) & 1u) << 7); }
inline int signed_by(int v, uint32_t signs, int j) { return (signs >> j) & 1 ? -v : v; }

// One group of 32 weights of an IQ type: w = scale[l / 16] * (q[l] + delta[l / 8]), the
// scales and deltas as float32 in gguf-py's order of operations (IQ2/IQ3: delta 0).
struct IQGroup {
  int q[32];  // grid value times sign (IQ1: the grid value, -1..1)
  float scale[2];
  float delta[4];
};

// Group b (sub-block b % 8 of a super-block of 256) of an IQ row; grid: grid_shape(type)
// int8 rows. Layouts (ggml's block_iq*): IQ2_XXS d, then per 32 a uint32 of 4 grid
// indices and a uint32 of 4 sign indices (7 bits each) and a 4-bit scale (top); IQ2_XS d,
// uint16 per 8 (9-bit index, 7-bit signs), scales[8] (a nibble per 16); IQ2_S d, qs[32],
// signs[32] (plain bits), qh[8] (2 index bits per 8), scales[8]; IQ3_XXS d, qs[64] (an
// index per 4), per 32 a uint32 of signs and scale as IQ2_XXS's; IQ3_S d, qs[64], qh[8] (the
// 9th index bit per 4), signs[32], scales[4] (a nibble per 32); IQ1_S d, qs[32], per 32 a
// uint16 of 3 index bits per 8, a 3-bit scale and the delta's sign; IQ1_M qs[32], qh[16]
// (a nibble per 8: 3 index bits and the delta's sign), 4 uint16 of 3-bit scales per 16
// whose top nibbles assemble d.
inline void iq_group(int64_t type, const uint8_t* row, int64_t b, const int8_t* grid, IQGroup* g) {
  const int s = static_cast<int>(b % 8);
  const int64_t sb = b / 8;
  for (int t = 0; t < 4; ++t) g->delta[t] = 0.0f;
  auto put8 = [&](int k, int index, uint32_t signs) {  // 8 values from one 8-wide grid row
    for (int j = 0; j < 8; ++j) g->q[8 * k + j] = signed_by(grid[8 * index + j], signs, j);
  };
  switch (type) {
    case IQ2_XXS: case IQ3_XXS: {
      const bool two = type == IQ2_XXS;
      const uint8_t* blk = row + sb * (two ? 66 : 98);
      const float d = f16(blk);
      uint32_t idx = 0, aux;
      if (two) std::memcpy(&idx, blk + 2 + 8 * s, 4);
      std::memcpy(&aux, two ? blk + 6 + 8 * s : blk + 66 + 4 * s, 4);
      const float db = d * (0.5f + static_cast<float>(aux >> 28)) * (two ? 0.25f : 0.5f);
      g->scale[0] = g->scale[1] = db;
      for (int k = 0; k < 4; ++k) {
        const uint32_t signs = ksigns((aux >> (7 * k)) & 127);
        if (two) {
          put8(k, (idx >> (8 * k)) & 255, signs);
        } else {
          const uint8_t* qs = blk + 2 + 8 * s + 2 * k;  // two 4-wide rows per 8 signs
          for (int j = 0; j < 8; ++j) g->q[8 * k + j] = signed_by(grid[4 * qs[j / 4] + j % 4], signs, j);
        }
      }
      return;
    }
    case IQ2_XS: case IQ2_S: {
      const bool xs = type == IQ2_XS;
      const uint8_t* blk = row + sb * (xs ? 74 : 82);
      const float d = f16(blk);
      const uint8_t sc = blk[xs ? 66 + s : 74 + s];
      for (int h = 0; h < 2; ++h) g->scale[h] = d * (0.5f + static_cast<float>((sc >> (4 * h)) & 15)) * 0.25f;
      for (int k = 0; k < 4; ++k) {
        const int i = 4 * s + k;
        if (xs) {
          uint16_t v;
          std::memcpy(&v, blk + 2 + 2 * i, 2);
          put8(k, v & 511, ksigns(v >> 9));
        } else {
          put8(k, blk[2 + i] | (((blk[66 + s] >> (2 * k)) & 3) << 8), blk[34 + i]);
        }
      }
      return;
    }
    case IQ3_S: {
      const uint8_t* blk = row + sb * 110;
      const float d = f16(blk);
      g->scale[0] = g->scale[1] = d * static_cast<float>(1 + 2 * ((blk[106 + s / 2] >> (4 * (s % 2))) & 15));
      for (int m = 0; m < 8; ++m) {  // 4-wide grid rows
        const int index = blk[2 + 8 * s + m] | (((blk[66 + s] >> m) & 1) << 8);
        for (int j = 0; j < 4; ++j) {
          const int l = 4 * m + j;
          g->q[l] = signed_by(grid[4 * index + j], blk[74 + 4 * s + l / 8], l % 8);
        }
      }
      return;
    }
    case IQ1_S: {
      const uint8_t* blk = row + sb * 50;
      uint16_t qh;
      std::memcpy(&qh, blk + 34 + 2 * s, 2);
      g->scale[0] = g->scale[1] = f16(blk) * static_cast<float>(2 * ((qh >> 12) & 7) + 1);
      for (int k = 0; k < 4; ++k) {
        g->delta[k] = qh & 0x8000 ? -0.125f : 0.125f;
        put8(k, blk[2 + 4 * s + k] | (((qh >> (3 * k)) & 7) << 8), 0);
      }
      return;
    }
    case IQ1_M: {
      const uint8_t* blk = row + sb * 56;
      uint16_t sc[4];
      std::memcpy(sc, blk + 48, 8);
      const uint16_t dbits = static_cast<uint16_t>((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) |
                                                   (sc[3] & 0xF000));
      const float d = static_cast<float>(c10::Half(dbits, c10::Half::from_bits()));
      for (int h = 0; h < 2; ++h)
        g->scale[h] = d * static_cast<float>(2 * ((sc[s / 2] >> (6 * (s % 2) + 3 * h)) & 7) + 1);
      for (int k = 0; k < 4; ++k) {
        const int nib = (blk[32 + 2 * s + k / 2] >> (4 * (k % 2))) & 15;
        g->delta[k] = nib & 8 ? -0.125f : 0.125f;
        put8(k, blk[4 * s + k] | ((nib & 7) << 8), 0);
      }
      return;
    }
    default: return;
  }
}

// Group b (32 weights) of a 4-bit type's row -> codes 0..15, d and m as half bits.
// False when a scale or min does not fit a half.
inline bool decode4(int64_t type, const uint8_t* row, int64_t b, uint8_t* codes, uint16_t* d, uint16_t* m,
                    const int8_t* grid = nullptr) {
  if (type == IQ3_S || type == IQ1_S) {
    // IQ3_S: w = s * v for odd v in -15..15, so code (v + 15) / 2 with d = 2s, m = -15s.
    // IQ1_S: w = s * (v + delta) for v in -1..1, so code v + 1 with d = s, m = s (delta - 1).
    // d (a half times an odd integer up to 31) and m are rounded to halves, as Q4_K's.
    IQGroup g;
    iq_group(type, row, b, grid, &g);
    const bool three = type == IQ3_S;
    const float s = g.scale[0], dd = three ? 2.0f * s : s, mm = three ? -15.0f * s : s * (g.delta[0] - 1.0f);
    if (!half_ok(dd) || !half_ok(mm)) return false;
    for (int l = 0; l < 32; ++l) codes[l] = static_cast<uint8_t>(three ? (g.q[l] + 15) / 2 : g.q[l] + 1);
    *d = to_half(dd);
    *m = to_half(mm);
    return true;
  }
  if (type == Q4_K) {
    const uint8_t* blk = row + (b / 8) * 144;
    const int s = static_cast<int>(b % 8);
    if (!k_scale_min(blk, s, d, m)) return false;
    const uint8_t* qs = blk + 16 + (s / 2) * 32;
    for (int l = 0; l < 32; ++l) codes[l] = (s & 1) ? (qs[l] >> 4) : (qs[l] & 0x0F);
    return true;
  }
  const int64_t bytes = type == Q4_0 ? 18 : 20;
  const uint8_t* blk = row + b * bytes;
  const uint8_t* qs = blk + (type == Q4_0 ? 2 : 4);
  for (int l = 0; l < 16; ++l) {
    codes[l] = qs[l] & 0x0F;
    codes[l + 16] = qs[l] >> 4;
  }
  return block_scale_min(blk, type == Q4_0, 8.0f, d, m);
}

// Types whose groups take the kernels' 5-bit form (codes 0..31, a scale and a min per 32,
// as the 4-bit form) and its 6-bit form (codes 0..63 standing for code - 32, a scale per 16:
// Q6_K's own layout, and Q3_K's, whose codes -4..3 and 16-weight scales it holds as they are).
inline bool five_bit(int64_t type) { return type == Q5_0 || type == Q5_1 || type == Q5_K; }
inline bool six_bit(int64_t type) { return type == Q6_K || type == Q3_K || type == IQ3_XXS || type == IQ1_M; }
// Q3_K's own width: the kernels' 3-bit form (codes 0..7 standing for code - 4, a scale per 16).
inline bool three_bit(int64_t type) { return type == Q3_K; }
// Q2_K's: the kernels' 2-bit form (codes 0..3, a scale and a min per 16).
inline bool two_bit(int64_t type) { return type == Q2_K; }

// Group b (32 weights) of a Q2_K row (super-blocks of 256 in 84 bytes: scales[16], qs[64],
// d, dmin) -> its codes 0..3 and, per half (16 weights), the scale d * (scales[i] & 15)
// and the min -dmin * (scales[i] >> 4) as half bits (w = d_h q + m_h), each rounded to a
// half as Q4_K's are. Value 128h + 32j + l is bits 2j..2j+1 of qs[32h + l]. False when one
// does not fit a half.
inline bool decode2(const uint8_t* row, int64_t b, uint8_t* codes, uint16_t* d, uint16_t* m) {
  const uint8_t* blk = row + (b / 8) * 84;
  const int g = static_cast<int>(b % 8), h = g / 4, j = g % 4;
  const uint8_t* qs = blk + 16 + 32 * h;
  for (int l = 0; l < 32; ++l) codes[l] = static_cast<uint8_t>((qs[l] >> (2 * j)) & 3);
  const float dd = f16(blk + 80), dmin = f16(blk + 82);
  for (int t = 0; t < 2; ++t) {
    const int i = 2 * g + t;
    const float sc = dd * static_cast<float>(blk[i] & 0x0F), mn = -(dmin * static_cast<float>(blk[i] >> 4));
    if (!half_ok(sc) || !half_ok(mn)) return false;
    d[t] = to_half(sc);
    m[t] = to_half(mn);
  }
  return true;
}

// Group b (32 weights) of a Q5_0, Q5_1 or Q5_K row -> codes 0..31, d and m as half bits
// (w = d * q + m). Q5_0 (m = -16 d, exact) and Q5_1 keep the file's values; Q5_K's
// sub-block scale and min are rounded to halves, as Q4_K's. False when one does not fit.
inline bool decode5(int64_t type, const uint8_t* row, int64_t b, uint8_t* codes, uint16_t* d, uint16_t* m,
                    const int8_t* /*grid*/ = nullptr) {
  if (type == Q5_K) {
    const uint8_t* blk = row + (b / 8) * 176;
    const int s = static_cast<int>(b % 8);
    if (!k_scale_min(blk, s, d, m)) return false;
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + 48 + (s / 2) * 32;
    for (int l = 0; l < 32; ++l)
      codes[l] = static_cast<uint8_t>(((s & 1) ? (qs[l] >> 4) : (qs[l] & 0x0F)) | (((qh[l] >> s) & 1) << 4));
    return true;
  }
  const uint8_t* blk = row + b * (type == Q5_0 ? 22 : 24);
  const uint8_t* qh = blk + (type == Q5_0 ? 2 : 4);
  const uint8_t* qs = qh + 4;
  uint32_t high;
  std::memcpy(&high, qh, 4);
  for (int l = 0; l < 32; ++l) {
    const int low = l < 16 ? (qs[l] & 0x0F) : (qs[l - 16] >> 4);
    codes[l] = static_cast<uint8_t>(low | (((high >> l) & 1) << 4));
  }
  return block_scale_min(blk, type == Q5_0, 16.0f, d, m);
}

// Group b (32 weights) of a Q6_K row: its codes 0..63 (the weight is d * sc[l / 16] *
// (code - 32)), its two 16-weight scales sc and the super-block's d. Group b%8 of the
// super-block: half h of 128, quarter j inside it; value 128h + 32j + l takes the low (j < 2)
// or high nibble of ql[64h + l + 32 (j & 1)], bits 2j..2j+1 of qh[32h + l] as its top bits,
// and scale 8h + 2j + l / 16.
struct Q6KGroup {
  const uint8_t* ql;  // 32 bytes: the group's low 4 bits, their low (j < 2) or high nibbles
  const uint8_t* qh;  // 32 bytes: its top 2 bits, bits 2j..2j+1
  const int8_t* sc;   // its two 16-weight scales
  float d;            // the super-block's d
  int j;              // its quarter of the half
};
inline Q6KGroup q6_k_at(const uint8_t* row, int64_t b) {
  const uint8_t* blk = row + (b / 8) * 210;
  const int g = static_cast<int>(b % 8), h = g / 4, j = g % 4;
  return {blk + 64 * h + 32 * (j & 1), blk + 128 + 32 * h, reinterpret_cast<const int8_t*>(blk + 192) + 8 * h + 2 * j,
          f16(blk + 208), j};
}
inline void q6_k_group(const uint8_t* row, int64_t b, uint8_t* codes, const int8_t** sc, float* d) {
  const Q6KGroup at = q6_k_at(row, b);
  *sc = at.sc;
  *d = at.d;
  for (int l = 0; l < 32; ++l) {
    const int low = at.j < 2 ? (at.ql[l] & 0x0F) : (at.ql[l] >> 4);
    codes[l] = static_cast<uint8_t>(low | (((at.qh[l] >> (2 * at.j)) & 3) << 4));
  }
}

// A group's two 16-weight scales as half bits; false when one does not fit a half.
inline bool half_pair(float s0, float s1, uint16_t* d0, uint16_t* d1) {
  if (!half_ok(s0) || !half_ok(s1)) return false;
  *d0 = to_half(s0);
  *d1 = to_half(s1);
  return true;
}

// Group b (32 weights) of a Q3_K row (super-blocks of 256 in 110 bytes: hmask[32], qs[64],
// scales[12], d): its signed codes -4..3 (the weight is d * sc[l / 16] * q) and the 6-bit
// signed scales (-32..31) of its two halves. Value 128h + 32j + l takes bits 2j..2j+1 of
// qs[32h + l] as its low bits and bit 4h + j of hmask[l] as its high one (clear: 4 less);
// scale i's low 4 bits are a nibble of byte i % 8 (the low one for i < 8), its top 2 bits
// pair i / 4 of byte 8 + i % 4 (ggml's block_q3_K; dequant.py's _q3_k).
inline void q3_k_group(const uint8_t* row, int64_t b, int* q, int* sc, float* d) {
  const uint8_t* blk = row + (b / 8) * 110;
  const int g = static_cast<int>(b % 8), h = g / 4, j = g % 4;
  const uint8_t* qs = blk + 32 + 32 * h;
  for (int l = 0; l < 32; ++l) q[l] = ((qs[l] >> (2 * j)) & 3) - (((blk[l] >> (4 * h + j)) & 1) ? 0 : 4);
  const uint8_t* s = blk + 96;
  for (int t = 0; t < 2; ++t) {
    const int i = 2 * g + t;
    const int low = i < 8 ? (s[i] & 0x0F) : (s[i - 8] >> 4);
    sc[t] = (low | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32;
  }
  *d = f16(blk + 108);
}

// Group b of a Q6_K or Q3_K row -> its codes and the scale of each half (16 weights) as half bits:
// a half's scale d * sc (a half times an int8, exact in float32) is rounded to a half, as
// Q4_K's sub-block scales are (a relative error below 2^-11 against the codes' 2^-6).
// False when a scale does not fit a half.
// Q3_K's codes q become q + 32 (28..35), so that code - 32 is the file's q. IQ3_XXS's values
// are even, -62..62: code v / 2 + 32 with both halves' scale 2 * db (exact), rounded to a half.
// IQ1_M's w = s_h (v + delta) with v in -1..1 and delta = +-1/8 per 8 weights is
// (s_h / 8) (8 v +- 1): code 8 v +- 1 + 32 (23..41) on the half's scale s_h / 8.
inline bool decode6(int64_t type, const uint8_t* row, int64_t b, uint8_t* codes, uint16_t* d0, uint16_t* d1,
                    const int8_t* grid = nullptr) {
  float d;
  int sc[2];
  if (type == IQ3_XXS || type == IQ1_M) {
    IQGroup g;
    iq_group(type, row, b, grid, &g);
    const bool one = type == IQ1_M;
    const float s0 = one ? 0.125f * g.scale[0] : 2.0f * g.scale[0], s1 = one ? 0.125f * g.scale[1] : s0;
    if (!half_pair(s0, s1, d0, d1)) return false;
    for (int l = 0; l < 32; ++l)
      codes[l] = static_cast<uint8_t>((one ? 8 * g.q[l] + (g.delta[l / 8] > 0 ? 1 : -1) : g.q[l] / 2) + 32);
    return true;
  }
  if (type == Q3_K) {
    int q[32];
    q3_k_group(row, b, q, sc, &d);
    for (int l = 0; l < 32; ++l) codes[l] = static_cast<uint8_t>(q[l] + 32);
  } else {  // Q6_K
    const int8_t* sc8;
    q6_k_group(row, b, codes, &sc8, &d);
    sc[0] = sc8[0], sc[1] = sc8[1];
  }
  return half_pair(d * static_cast<float>(sc[0]), d * static_cast<float>(sc[1]), d0, d1);
}

// Group b of a Q3_K row -> its codes + 4 (0..7) and its halves' scales as decode6 gives them.
inline bool decode3(int64_t type, const uint8_t* row, int64_t b, uint8_t* codes, uint16_t* d0, uint16_t* d1,
                    const int8_t* /*grid*/ = nullptr) {
  if (!decode6(type, row, b, codes, d0, d1)) return false;  // Q3_K: codes q + 32
  for (int l = 0; l < 32; ++l) codes[l] = static_cast<uint8_t>(codes[l] - 28);
  return true;
}

// The IQ2 types' six values (their grid's 8, 25, 43 with a sign), indexed by the kernels'
// IQ2 form's 4-bit codes (the other ten entries unused, 0).
constexpr int8_t kIQ2Values[16] = {-43, -25, -8, 8, 25, 43, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
inline bool iq2(int64_t type) { return type == IQ2_XXS || type == IQ2_XS || type == IQ2_S; }

// Group b of an IQ2_XXS, IQ2_XS or IQ2_S row -> the kIQ2Values index of each weight and each
// half's scale (d (0.5 + s) / 4, a half times an odd integer / 8) rounded to a half, as
// Q4_K's. False when a scale does not fit a half.
inline bool decode_iq2(int64_t type, const uint8_t* row, int64_t b, uint8_t* idx, uint16_t* d0, uint16_t* d1,
                       const int8_t* grid) {
  IQGroup g;
  iq_group(type, row, b, grid, &g);
  if (!half_ok(g.scale[0]) || !half_ok(g.scale[1])) return false;
  for (int l = 0; l < 32; ++l) {
    const int v = g.q[l] < 0 ? -g.q[l] : g.q[l], rank = v == 8 ? 0 : v == 25 ? 1 : 2;
    idx[l] = static_cast<uint8_t>(g.q[l] > 0 ? 3 + rank : 2 - rank);
  }
  *d0 = to_half(g.scale[0]);
  *d1 = to_half(g.scale[1]);
  return true;
}

// IQ4_NL/IQ4_XS: a 4-bit code indexes these 16 int8 values (ggml's kvalues_iq4nl).
constexpr int8_t kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// IQ4_NL and IQ4_XS: the types whose groups take the kernels' IQ4 form (4-bit indices into
// kIQ4Values, one scale per 32).
inline bool iq4(int64_t type) { return type == IQ4_NL || type == IQ4_XS; }

// A group's 16 bytes of 4-bit indices (IQ4_NL's, IQ4_XS's and MXFP4's order) -> its 32
// indices: value l < 16 is the low nibble of qs[l], value l + 16 its high nibble.
inline void nibble_indices(const uint8_t* qs, uint8_t* idx) {
  for (int l = 0; l < 16; ++l) {
    idx[l] = qs[l] & 0x0F;
    idx[l + 16] = qs[l] >> 4;
  }
}

// Group b of an IQ4_NL or IQ4_XS row -> its 32 table indices (0..15) and its scale as a
// float: IQ4_NL's d, or IQ4_XS's d * (ls - 32) for sub-block b % 8 (ls: 6 bits, the low 4 a
// nibble of scales_l, the top 2 a pair of bits of scales_h).
inline float iq4_indices(int64_t type, const uint8_t* row, int64_t b, uint8_t* idx) {
  const uint8_t* qs;
  float scale;
  if (type == IQ4_NL) {
    const uint8_t* blk = row + b * 18;
    qs = blk + 2;
    scale = f16(blk);
  } else {
    const uint8_t* blk = row + (b / 8) * 136;
    const int s = static_cast<int>(b % 8);
    const int high = (f16_bits(blk + 2) >> (2 * s)) & 3, low = (blk[4 + s / 2] >> (4 * (s & 1))) & 0x0F;
    qs = blk + 8 + 16 * s;
    scale = f16(blk) * static_cast<float>((low | (high << 4)) - 32);
  }
  nibble_indices(qs, idx);
  return scale;
}

// The same group's table values (int8) and scale.
inline float iq4_group(int64_t type, const uint8_t* row, int64_t b, int8_t* codes) {
  uint8_t idx[32];
  const float scale = iq4_indices(type, row, b, idx);
  for (int l = 0; l < 32; ++l) codes[l] = kIQ4Values[idx[l]];
  return scale;
}

// Group b of an IQ4 row -> its indices and its scale as half bits: IQ4_NL's own d, IQ4_XS's
// sub-block scale rounded to a half (as Q4_K's). False when the scale does not fit a half.
inline bool decode_iq4(int64_t type, const uint8_t* row, int64_t b, uint8_t* idx, uint16_t* d) {
  const float scale = iq4_indices(type, row, b, idx);
  if (!half_ok(scale)) return false;
  *d = type == IQ4_NL ? f16_bits(row + b * 18) : to_half(scale);
  return true;
}

// MXFP4 (gpt-oss's experts): a 4-bit code indexes these 16 int8 values, e2m1's doubled
// (ggml's kvalues_mxfp4), on the power-of-two scale 2^(e - 128) of the block's E8M0 byte e
// (ggml's e8m0_to_fp32_half: 2^(e - 127) halved, the halving paid for by the doubling).
constexpr int8_t kMXFP4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// Group b of an MXFP4 row (blocks of 17 bytes: e, then qs[16]) -> its 32 table indices, and
// its scale's power e - 128.
inline int mxfp4_indices(const uint8_t* row, int64_t b, uint8_t* idx) {
  const uint8_t* blk = row + b * 17;
  nibble_indices(blk + 1, idx);
  return static_cast<int>(blk[0]) - 128;
}

// The same group's table values (int8) and scale as a float (every e: 2^-128 and 2^-127 are
// float32 subnormals).
inline float mxfp4_group(const uint8_t* row, int64_t b, int8_t* codes) {
  uint8_t idx[32];
  const int power = mxfp4_indices(row, b, idx);
  for (int l = 0; l < 32; ++l) codes[l] = kMXFP4Values[idx[l]];
  return std::ldexp(1.0f, power);
}

// Group b of an MXFP4 row -> its indices and its scale as half bits, exact for a power in
// -24..15 (a half's smallest subnormal to its largest power of two). False for any other
// power, except on a group whose values are all zero (indices 0 and 8), which scale 0 holds
// exactly: ggml's quantizer writes e = 0 (2^-128) for such a group.
inline bool decode_mxfp4(const uint8_t* row, int64_t b, uint8_t* idx, uint16_t* d) {
  const int power = mxfp4_indices(row, b, idx);
  if (power >= -24 && power <= 15) {
    *d = to_half(std::ldexp(1.0f, power));
    return true;
  }
  *d = 0;
  return std::all_of(idx, idx + 32, [](uint8_t i) { return (i & 7) == 0; });
}

// These reproduce loader/dequant.py's float32 operations in its order; contracting them
// into FMAs would round differently from numpy.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// Group b of a row of any type decoded here -> 32 float32 weights (dequant.py's values).
inline void decode_floats(int64_t type, const uint8_t* row, int64_t b, float* w, const int8_t* grid = nullptr) {
  switch (type) {
    case F32: std::memcpy(w, row + b * 128, 128); return;
    case F16:
      for (int l = 0; l < 32; ++l) w[l] = f16(row + b * 64 + 2 * l);
      return;
    case BF16:
      for (int l = 0; l < 32; ++l) {
        uint32_t u = static_cast<uint32_t>(row[b * 64 + 2 * l]) | (static_cast<uint32_t>(row[b * 64 + 2 * l + 1]) << 8);
        u <<= 16;
        std::memcpy(&w[l], &u, 4);
      }
      return;
    case Q8_0: {
      const uint8_t* blk = row + b * 34;
      const float d = f16(blk);
      for (int l = 0; l < 32; ++l) w[l] = static_cast<float>(static_cast<int8_t>(blk[2 + l])) * d;
      return;
    }
    case Q4_0: case Q4_1: case Q4_K: {
      uint8_t c[32];
      uint16_t dh, mh;
      // Values through the same float ops as dequant.py (not through the half-rounded
      // Q4_K scales of decode4): what an embedding lookup (gguf_rows) of these types gives.
      if (type == Q4_K) {
        const uint8_t* blk = row + (b / 8) * 144;
        const int s = static_cast<int>(b % 8);
        float sc, mn;
        scale_min_k4(s, blk + 4, &sc, &mn);
        const uint8_t* qs = blk + 16 + (s / 2) * 32;
        const float d = f16(blk), dmin = f16(blk + 2);
        for (int l = 0; l < 32; ++l) {
          const float q = static_cast<float>((s & 1) ? (qs[l] >> 4) : (qs[l] & 0x0F));
          w[l] = d * sc * q - dmin * mn;
        }
        return;
      }
      decode4(type, row, b, c, &dh, &mh);
      const uint8_t* blk = row + b * (type == Q4_0 ? 18 : 20);
      const float d = f16(blk);
      for (int l = 0; l < 32; ++l) {
        w[l] = type == Q4_0 ? (static_cast<float>(c[l]) - 8.0f) * d : static_cast<float>(c[l]) * d + f16(blk + 2);
      }
      return;
    }
    case Q5_0: case Q5_1: {
      const int64_t bytes = type == Q5_0 ? 22 : 24;
      const uint8_t* blk = row + b * bytes;
      const uint8_t* qh = blk + (type == Q5_0 ? 2 : 4);
      const uint8_t* qs = qh + 4;
      uint32_t high;
      std::memcpy(&high, qh, 4);
      const float d = f16(blk);
      for (int l = 0; l < 32; ++l) {
        const int low = l < 16 ? (qs[l] & 0x0F) : (qs[l - 16] >> 4);
        const float q = static_cast<float>(low | (((high >> l) & 1) << 4));
        w[l] = type == Q5_0 ? d * (q - 16.0f) : d * q + f16(blk + 2);
      }
      return;
    }
    case Q5_K: {
      const uint8_t* blk = row + (b / 8) * 176;
      const int s = static_cast<int>(b % 8);
      float sc, mn;
      scale_min_k4(s, blk + 4, &sc, &mn);
      const uint8_t* qh = blk + 16;
      const uint8_t* qs = blk + 48 + (s / 2) * 32;
      const float d = f16(blk), dmin = f16(blk + 2);
      for (int l = 0; l < 32; ++l) {
        const int low = (s & 1) ? (qs[l] >> 4) : (qs[l] & 0x0F);
        const float q = static_cast<float>(low | (((qh[l] >> s) & 1) << 4));
        w[l] = d * sc * q - dmin * mn;
      }
      return;
    }
    case Q2_K: {  // 84 bytes: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin
      // Value 128h + 32j + l is bits 2j..2j+1 of qs[32h + l]; its 16-weight group i has the
      // scale d * (scales[i] & 15) and the min dmin * (scales[i] >> 4): w = q * scale - min.
      const uint8_t* blk = row + (b / 8) * 84;
      const int g = static_cast<int>(b % 8), h = g / 4, j = g % 4;
      const uint8_t* qs = blk + 16 + 32 * h;
      const float d = f16(blk + 80), dmin = f16(blk + 82);
      for (int l = 0; l < 32; ++l) {
        const int i = 2 * g + l / 16;
        const float sc = d * static_cast<float>(blk[i] & 0x0F), mn = dmin * static_cast<float>(blk[i] >> 4);
        w[l] = static_cast<float>((qs[l] >> (2 * j)) & 3) * sc - mn;
      }
      return;
    }
    case Q3_K: {
      int q[32], sc[2];
      float d;
      q3_k_group(row, b, q, sc, &d);
      for (int l = 0; l < 32; ++l) w[l] = d * (static_cast<float>(q[l]) * static_cast<float>(sc[l / 16]));
      return;
    }
    case Q6_K: {
      uint8_t c[32];
      const int8_t* sc;
      float d;
      q6_k_group(row, b, c, &sc, &d);
      for (int l = 0; l < 32; ++l) w[l] = d * ((static_cast<float>(c[l]) - 32.0f) * static_cast<float>(sc[l / 16]));
      return;
    }
    case IQ4_NL: case IQ4_XS: {
      int8_t c[32];
      const float scale = iq4_group(type, row, b, c);
      for (int l = 0; l < 32; ++l) w[l] = scale * static_cast<float>(c[l]);
      return;
    }
    case MXFP4: {
      int8_t c[32];
      const float scale = mxfp4_group(row, b, c);
      for (int l = 0; l < 32; ++l) w[l] = scale * static_cast<float>(c[l]);
      return;
    }
    case IQ2_XXS: case IQ2_XS: case IQ2_S: case IQ3_XXS: case IQ3_S: case IQ1_S: case IQ1_M: {
      // gguf-py's db * grid * sign (a sign flip commutes with the rounding) and dl * (grid + delta)
      IQGroup g;
      iq_group(type, row, b, grid, &g);
      for (int l = 0; l < 32; ++l) w[l] = g.scale[l / 16] * (static_cast<float>(g.q[l]) + g.delta[l / 8]);
      return;
    }
    default: return;
  }
}

// Group b -> 8-bit codes and a half scale. Q8_0 and Q5_0 keep the file's codes (Q8_0's
// -128 becomes -127: the kernels' sign trick has no place for it), IQ4_NL and IQ4_XS their
// table values (IQ4_XS's sub-block scale rounded to a half, as Q4_K's), MXFP4 its table values
// on its power-of-two scale (false where decode_mxfp4 is), the IQ types with one
// scale per 32 (IQ2_XXS, IQ3_XXS, IQ3_S, IQ1_S) theirs (IQ1_S's 8 (v + delta) over s / 8);
// every other type is rounded as group_codes.requantize_8bit does: d = half(max|w| / 127),
// q = round(w / d), ties to even. False when d does not fit a half (or a weight is not finite).
inline bool decode8(int64_t type, const uint8_t* row, int64_t b, int8_t* codes, uint16_t* d,
                    const int8_t* grid = nullptr) {
  if (type == IQ2_XXS || type == IQ3_XXS || type == IQ3_S || type == IQ1_S) {
    IQGroup g;
    iq_group(type, row, b, grid, &g);
    const bool one = type == IQ1_S;
    const float s = one ? g.scale[0] * 0.125f : g.scale[0];
    if (!half_ok(s)) return false;
    for (int l = 0; l < 32; ++l) codes[l] = static_cast<int8_t>(one ? 8 * g.q[l] + (g.delta[0] > 0 ? 1 : -1) : g.q[l]);
    *d = to_half(s);
    return true;
  }
  if (type == Q8_0 || type == Q5_0) {
    const uint8_t* blk = row + b * (type == Q8_0 ? 34 : 22);
    if (!half_ok(f16(blk))) return false;
    *d = f16_bits(blk);
    if (type == Q8_0) {
      for (int l = 0; l < 32; ++l) codes[l] = static_cast<int8_t>(std::max<int>(static_cast<int8_t>(blk[2 + l]), -127));
    } else {
      uint32_t high;
      std::memcpy(&high, blk + 2, 4);
      const uint8_t* qs = blk + 6;
      for (int l = 0; l < 32; ++l) {
        const int low = l < 16 ? (qs[l] & 0x0F) : (qs[l - 16] >> 4);
        codes[l] = static_cast<int8_t>((low | (((high >> l) & 1) << 4)) - 16);
      }
    }
    return true;
  }
  if (type == IQ4_NL || type == IQ4_XS) {
    const float scale = iq4_group(type, row, b, codes);
    if (!half_ok(scale)) return false;
    *d = type == IQ4_NL ? f16_bits(row + b * 18) : to_half(scale);
    return true;
  }
  if (type == MXFP4) {
    uint8_t idx[32];
    if (!decode_mxfp4(row, b, idx, d)) return false;
    for (int l = 0; l < 32; ++l) codes[l] = kMXFP4Values[idx[l]];
    return true;
  }
  float w[32];
  decode_floats(type, row, b, w, grid);
  float amax = 0.0f;
  bool finite = true;
  for (int l = 0; l < 32; ++l) {
    finite = finite && std::isfinite(w[l]);
    amax = std::max(amax, std::fabs(w[l]));
  }
  const float scale = amax / 127.0f;
  if (!finite || !(scale < 65504.0f)) return false;
  *d = to_half(scale);
  const float dh = static_cast<float>(c10::Half(*d, c10::Half::from_bits()));
  const float inv = dh > 0.0f ? 1.0f / dh : 0.0f;
  for (int l = 0; l < 32; ++l) {
    const float q = std::nearbyint(w[l] * inv);  // the default rounding mode: ties to even
    codes[l] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
  }
  return true;
}

#pragma GCC pop_options

}  // namespace gguf
