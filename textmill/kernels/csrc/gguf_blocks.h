// GGUF block decoding, one group of 32 weights at a time, for packing a file's tensors
// straight into the kernels' layout (quant.cpp pack_gguf). It is the C++ twin of
// loader/group_codes.py + loader/dequant.py and must give the same bytes: the Python
// converters stay as the reference (tests compare the two) and as the path for the rare
// types not decoded here (the 1- to 3-bit IQ types). Layouts follow ggml's block_q* structs: scales are
// little-endian f16, nibbles low half first.
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
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23, BF16 = 30,
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
    default: return {0, 0};
  }
}

// Types whose groups are 4-bit codes with a scale and a min (the kernels' Q4 form).
inline bool four_bit(int64_t type) { return type == Q4_0 || type == Q4_1 || type == Q4_K; }

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

// Sub-block s of a Q4_K/Q5_K super-block: d * sc and -dmin * mn, each rounded to a half.
inline bool k_scale_min(const uint8_t* blk, int s, uint16_t* d, uint16_t* m) {
  float sc, mn;
  scale_min_k4(s, blk + 4, &sc, &mn);
  const float dd = f16(blk) * sc, mm = -(f16(blk + 2) * mn);
  if (!half_ok(dd) || !half_ok(mm)) return false;
  *d = to_half(dd);
  *m = to_half(mm);
  return true;
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

// Group b (32 weights) of a 4-bit type's row -> codes 0..15, d and m as half bits.
// False when a scale or min does not fit a half.
inline bool decode4(int64_t type, const uint8_t* row, int64_t b, uint8_t* codes, uint16_t* d, uint16_t* m) {
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
inline bool six_bit(int64_t type) { return type == Q6_K || type == Q3_K; }
// Q3_K's own width: the kernels' 3-bit form (codes 0..7 standing for code - 4, a scale per 16).
inline bool three_bit(int64_t type) { return type == Q3_K; }

// Group b (32 weights) of a Q5_0, Q5_1 or Q5_K row -> codes 0..31, d and m as half bits
// (w = d * q + m). Q5_0 (m = -16 d, exact) and Q5_1 keep the file's values; Q5_K's
// sub-block scale and min are rounded to halves, as Q4_K's. False when one does not fit.
inline bool decode5(int64_t type, const uint8_t* row, int64_t b, uint8_t* codes, uint16_t* d, uint16_t* m) {
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
inline void q6_k_group(const uint8_t* row, int64_t b, uint8_t* codes, const int8_t** sc, float* d) {
  const uint8_t* blk = row + (b / 8) * 210;
  const int g = static_cast<int>(b % 8), h = g / 4, j = g % 4;
  const uint8_t* ql = blk + 64 * h + 32 * (j & 1);
  const uint8_t* qh = blk + 128 + 32 * h;
  *sc = reinterpret_cast<const int8_t*>(blk + 192) + 8 * h + 2 * j;
  *d = f16(blk + 208);
  for (int l = 0; l < 32; ++l) {
    const int low = j < 2 ? (ql[l] & 0x0F) : (ql[l] >> 4);
    codes[l] = static_cast<uint8_t>(low | (((qh[l] >> (2 * j)) & 3) << 4));
  }
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
// Q3_K's codes q become q + 32 (28..35), so that code - 32 is the file's q.
inline bool decode6(int64_t type, const uint8_t* row, int64_t b, uint8_t* codes, uint16_t* d0, uint16_t* d1) {
  float d;
  int sc[2];
  if (type == Q3_K) {
    int q[32];
    q3_k_group(row, b, q, sc, &d);
    for (int l = 0; l < 32; ++l) codes[l] = static_cast<uint8_t>(q[l] + 32);
  } else {  // Q6_K
    const int8_t* sc8;
    q6_k_group(row, b, codes, &sc8, &d);
    sc[0] = sc8[0], sc[1] = sc8[1];
  }
  const float s0 = d * static_cast<float>(sc[0]), s1 = d * static_cast<float>(sc[1]);
  if (!half_ok(s0) || !half_ok(s1)) return false;
  *d0 = to_half(s0);
  *d1 = to_half(s1);
  return true;
}

// Group b of a Q3_K row -> its codes + 4 (0..7) and its halves' scales as decode6 gives them.
inline bool decode3(int64_t type, const uint8_t* row, int64_t b, uint8_t* codes, uint16_t* d0, uint16_t* d1) {
  if (!decode6(type, row, b, codes, d0, d1)) return false;  // Q3_K: codes q + 32
  for (int l = 0; l < 32; ++l) codes[l] = static_cast<uint8_t>(codes[l] - 28);
  return true;
}

// IQ4_NL/IQ4_XS: a 4-bit code indexes these 16 int8 values (ggml's kvalues_iq4nl).
constexpr int8_t kIQ4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// IQ4_NL and IQ4_XS: the types whose groups take the kernels' IQ4 form (4-bit indices into
// kIQ4Values, one scale per 32).
inline bool iq4(int64_t type) { return type == IQ4_NL || type == IQ4_XS; }

// Group b of an IQ4_NL or IQ4_XS row -> its 32 table indices (0..15) and its scale as a
// float: IQ4_NL's d, or IQ4_XS's d * (ls - 32) for sub-block b % 8 (ls: 6 bits, the low 4 a
// nibble of scales_l, the top 2 a pair of bits of scales_h). Within a group, value l < 16 is
// the low nibble of qs[l], value l + 16 its high nibble.
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
  for (int l = 0; l < 16; ++l) {
    idx[l] = qs[l] & 0x0F;
    idx[l + 16] = qs[l] >> 4;
  }
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

// These reproduce loader/dequant.py's float32 operations in its order; contracting them
// into FMAs would round differently from numpy.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// Group b of a row of any type decoded here -> 32 float32 weights (dequant.py's values).
inline void decode_floats(int64_t type, const uint8_t* row, int64_t b, float* w) {
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
    default: return;
  }
}

// Group b -> 8-bit codes and a half scale. Q8_0 and Q5_0 keep the file's codes (Q8_0's
// -128 becomes -127: the kernels' sign trick has no place for it), IQ4_NL and IQ4_XS their
// table values (IQ4_XS's sub-block scale rounded to a half, as Q4_K's); every other type is
// rounded as group_codes.requantize_8bit does: d = half(max|w| / 127), q = round(w / d),
// ties to even. False when d does not fit a half (or a weight is not finite).
inline bool decode8(int64_t type, const uint8_t* row, int64_t b, int8_t* codes, uint16_t* d) {
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
  float w[32];
  decode_floats(type, row, b, w);
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
