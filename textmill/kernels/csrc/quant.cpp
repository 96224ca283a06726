// Weight-only 4-bit / 8-bit linear layers for float32 activations, llama.cpp style:
// activations are quantized to int8 per block of 32 (once per call, all rows), and each
// block's dot product with the weights is an integer dot product (AVX2 maddubs + madd, or
// VNNI dpbusd), scaled in float32 afterwards. On a CPU without AMX the float32 product of
// small batches is bound by reading the weights; these read 5 (Q4) or 8.5 (Q8) bits per
// weight instead of 32 and do 32 multiply-adds per integer instruction.
//
// Paths: AVX2 (+FMA, F16C); the same code with 256-bit dpbusd where AVX512-VNNI+VL or
// AVX-VNNI compile; 512-bit dpbusd over whole tiles where AVX512-VNNI+BW compile; and a
// scalar fallback. On the project's Zen 1 machine (one 256-bit integer multiply port) Q4
// takes ~25-30 cycles per 8 rows x 32 weights x 1 activation row, near the 18 of its 9
// multiplies; Q8 needs 16. On Zen 5 the 512-bit path is 1.4-1.7x the 256-bit one from 16
// activation rows up (batched decode, prefill); one row is bound by memory reads either way.
//
// Formats (per group of 32 weights along K):
//   Q4: codes q in 0..15, w = d*q + m         (GGUF Q4_1)
//   Q8: codes q in -127..127, w = d*q         (GGUF Q8_0)
//   Q5: codes q in 0..31, w = d*q + m         (GGUF Q5_1; Q5_0 and Q5_K map onto it)
//   Q6: codes q in 0..63, w = d_h*(q - 32)    (GGUF Q6_K; Q3_K's -4..3 as 28..35), one d per half (16 weights)
//   Q4K, Q5K, Q6K: Q4's, Q5's and Q6's codes and arithmetic with GGUF Q4_K's, Q5_K's and
//        Q6_K's own scales: d = D*sc, m = Dm*mn (Q6K: d_h = D*sc_h), sc and mn the file's
//        6-bit integers (Q6_K's int8 per 16 weights), D and Dm halves of a super-block
//        of 256 weights (the file's d and -dmin). The products are exact in float32.
//   IQ4: indices q in 0..15, w = d*T[q]       (GGUF IQ4_NL, IQ4_XS), T = gguf::kIQ4Values
//   MXFP4: indices q in 0..15, w = d*T[q]     (GGUF MXFP4), T = gguf::kMXFP4Values (0..12 with
//        a sign, e2m1's values doubled), d = 2^(e - 128) from the file's exponent byte e
//   Q3: codes q in 0..7, w = d_h*(q - 4)      (GGUF Q3_K), one d per half (16 weights)
//   Q2: codes q in 0..3, w = d_h*q + m_h      (GGUF Q2_K), one d and one m per half (16 weights)
//   IQ2: indices q in 0..5, w = d_h*T2[q]     (GGUF IQ2_XXS, IQ2_XS, IQ2_S), T2 = gguf::kIQ2Values
//        (-43, -25, -8, 8, 25, 43), one d per half (16 weights)
// d and m are stored as IEEE half, as GGUF stores them: GGUF weights requantize exactly,
// and at one decode token (bound by memory reads) 4 bytes of scales per group instead of 8
// are ~17% less traffic for Q4. The super-block forms store what the k-quants store (8-bit
// integers a group, halves a super-block): 4.625, 5.625 and 6.5625 bits a weight where Q4,
// Q5 and Q6 take 5, 6 and 7, and none of Q4's half roundings of d*sc.
//
// Packed layout: output rows in tiles of 16 (N padded with zero rows), tiles one after the
// other, each tile contiguous so that one thread streams through it. Inside a tile, a block
// of 32 weights of the 16 rows is stored "k-group major": 64 bytes hold 4 consecutive k of
// each of the 16 rows (byte 4r + i = row r, k = 4g + i). A u8 x s8 multiply-add of such a
// vector with 4 activation bytes broadcast to all 16 dwords (one 512-bit dpbusd) leaves row
// r's partial sum in dword r: the rows come out in lanes with no horizontal reduction, and
// one weight vector serves every activation row in a register tile. The 256-bit paths take
// a tile as two halves: the low 32 bytes of every 64 are rows 0..7, the high 32 rows 8..15.
//   Q4 block: codes [4][64 bytes]; scales [d of 16 rows, m of 16 rows] (fp16).
//            Vector p's low nibbles are k-group p (k = 4p..4p+3), its high nibbles k-group
//            p + 4 (k = 16 + 4p..): the two nibble planes cost one AND and one shift.
//   Q8 block: codes [8][64 bytes] (k-group g = k 4g..4g+3); scales [16] (fp16).
//   Q5 block: the low 4 bits of the codes as a Q4 block's [4][64 bytes], then their top
//            bits [64 bytes]: byte 4r + i holds in bit g that of k-group g (k = 4g + i);
//            scales as Q4's. 6 bits a weight.
//   Q6 block: the low 4 bits of the codes as a Q4 block's [4][64 bytes], then the top 2
//            bits [2][64 bytes]: byte 4r + i of vector h holds, in bits 2t..2t+1, those of
//            k-group 4h + t (k = 16h + 4t + i); scales [d of the first 16 k of 16 rows,
//            d of the last 16] (fp16). 7 bits a weight, where Q8 takes 8.5.
//   IQ4 block: the indices as a Q4 block's [4][64 bytes]; scales [16] (fp16), as Q8's.
//            The kernels turn the nibbles into the table's int8 values with one byte
//            shuffle (vpshufb, a 16-entry lookup), and an IQ4 layer gives the bits of a Q8
//            layer of the same values (the same integer sums, the same float steps), from
//            4.5 bits a weight, not 8.5.
//   MXFP4 block: IQ4's, looked up in its own table (is_lookup4 and table_of name both).
//   Q3 block: the codes' low 2 bits [2][64 bytes] laid out as Q6's top bits (byte 4r + i of
//            vector h holds, in bits 2t..2t+1, those of k-group 4h + t), then their top bit
//            [64 bytes] as Q5's (bit g of byte 4r + i: k-group g); scales as Q6's. 4 bits a
//            weight (Q3_K's 3.4), where the 6-bit form takes 7. The kernels unpack a block to
//            Q6's codes (q + 28 = the file's code + 32) and run Q6's arithmetic on them, so a
//            Q3 layer gives the bits of a Q6 layer of the same values.
//   Q2 block: the codes [2][64 bytes] laid out as Q3's low 2 bits; scales [d0[16], d1[16],
//            m0[16], m1[16]] (fp16). 4 bits a weight (Q2_K's 2.6), where 8-bit codes take
//            8.5. The kernels compute Q6's two scaled sums on the codes (u8, from zero) and
//            add each half's min times the activations' half sum (e x sum, from Q6's offset).
//   IQ2 block: the indices as a Q4 block's [4][64 bytes]; scales as Q6's. 5 bits a weight
//            (the files' 2.1-2.6), where 8-bit codes take 8.5. The kernels turn the nibbles
//            into T2's values + 64 (u8, 21..107) with one byte shuffle and run Q6's
//            arithmetic with twice its offset (-64 x each half's sum): Q6's integer sums
//            and float steps on T2's values (the scalar path: on T2 + 32, Q6's offset).
//   Q4K, Q5K, Q6K blocks: codes as Q4's, Q5's, Q6's; scales [sc of 16 rows, mn of 16 rows]
//            (u8; Q6K: [sc0 of 16 rows, sc1 of 16 rows], s8). Each super-block of 8 blocks
//            starts with a header [D of 16 rows, Dm of 16 rows] (fp16; Q6K: D alone).
//   A tile's blocks go in pairs: both blocks' codes, then both blocks' scales (codes_at).
// Activations, per row and block of 32: int8 codes a, scale e = max|x|/127, and (for Q4's
// min term) s = e * sum(a):  sum_i (d q_i + m)(e a_i) = (d e) sum(q_i a_i) + m s.
// Q6's offset is integer: per half h, sum_i (q_i - 32) a_i = sum_i q_i a_i + off_h with
// off_h = -32 sum_h(a), computed once per activation block, beside hs_h = e * sum_h(a)
// (Q2's min per half: sum_i (d_h q_i + m_h)(e a_i) = d_h e sum(q_i a_i) + m_h hs_h).
//
// Every path computes, per output (row, column), the same float32 operations in the same
// order: acc = fma(float(isum_b), d_b * e_b, acc) [Q4: acc = fma(m_b, s_b, acc)] over the
// blocks b (Q6: t = fma(isum_0, d_0, isum_1 * d_1), acc = fma(t, e_b, acc) [Q2: then
// fma(m_0, hs_0, acc), fma(m_1, hs_1, acc)]), then acc + bias. Integer block sums are exact, so the scalar and SIMD paths
// agree bit for bit (the tests check it); only MKL's float32 reference differs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "gguf_blocks.h"
#include "linear_entry.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TM_AVX2 1
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
// VNNI on 256-bit vectors: AVX512-VNNI with VL (Ice Lake, Zen 4 and later) or AVX-VNNI
// (Alder Lake and later). Same instruction, two encodings.
#if defined(TM_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define TM_VNNI 1
#define TM_DPBUSD _mm256_dpbusd_epi32
#elif defined(TM_AVX2) && defined(__AVXVNNI__)
#define TM_VNNI 1
#define TM_DPBUSD _mm256_dpbusd_avx_epi32
#elif defined(TM_AVX2) && defined(TM_EMULATE_VNNI)
// Test hook (-DTM_EMULATE_VNNI): run the VNNI code path on an AVX2-only CPU. Exact for the
// operands used here, whose maddubs pair sums cannot saturate.
#define TM_VNNI 1
#define TM_DPBUSD(acc, u, s) \
  _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#endif
// 512-bit VNNI (Ice Lake, Zen 4 and later): whole 16-row tiles per vector.
#if defined(TM_VNNI) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(TM_EMULATE_VNNI)
#define TM_VNNI512 1
#endif

namespace {

constexpr int64_t QK = 32;  // weights per group (one scale, or one scale and one min)
constexpr int64_t NR = 16;  // output rows per tile: one 512-bit vector of dwords
constexpr int64_t NH = 8;   // rows per half tile: one 256-bit vector of dwords
constexpr int64_t Q4_CODE_BYTES = NR * QK / 2;  // 256 per tile-block
constexpr int64_t Q4_SCALE_HALVES = 2 * NR;     // d[16], m[16]
constexpr int64_t Q8_CODE_BYTES = NR * QK;      // 512 per tile-block
constexpr int64_t Q8_SCALE_HALVES = NR;         // d[16]
constexpr int64_t Q5_CODE_BYTES = Q4_CODE_BYTES + NR * QK / 8;  // + 64: the codes' top bits
constexpr int64_t Q6_LOW_BYTES = NR * QK / 2;   // 256: the codes' low nibbles, as Q4's
constexpr int64_t Q6_CODE_BYTES = Q6_LOW_BYTES + NR * QK / 4;  // + 128: their top 2 bits
constexpr int64_t Q6_SCALE_HALVES = 2 * NR;     // d of each half: d0[16], d1[16]
constexpr int64_t Q3_LOW_BYTES = NR * QK / 4;   // 128: the codes' low 2 bits
constexpr int64_t Q3_CODE_BYTES = Q3_LOW_BYTES + NR * QK / 8;  // + 64: their top bit
constexpr int64_t Q2_CODE_BYTES = Q3_LOW_BYTES;  // 128: Q3's low 2 bits alone
constexpr int64_t Q2_SCALE_HALVES = 4 * NR;      // d0[16], d1[16], m0[16], m1[16]
// The super-block forms (Q4K, Q5K, Q6K: GGUF's Q4_K, Q5_K, Q6_K as they are): per block,
// 8-bit integer scales; per super-block of K_SUPER blocks, a header of halves.
constexpr int64_t K_SUPER = 8;                   // blocks of 32 per super-block (256 weights)
constexpr int64_t K_SCALE_BYTES = 2 * NR;        // Q4K, Q5K: sc[16], mn[16] (u8); Q6K: sc0[16], sc1[16] (s8)
// Activation rows per register tile. (8 on the 512-bit path, whose 32 registers hold
// them, measured no faster: 0.91-1.0x of 4 on Zen 4 at M = 16 and 64.)
constexpr int MAX_MR = 4;
// The 512-bit path runs block-major (tile_rows_avx512) over up to this many activation rows
// at a time. kernel_ab on Zen 4, one thread, against a cap of 32: 0.79-0.95x the time at
// 33-128 rows (64-stream decode, short prefills) over every model's shapes, mixed at 256
// (0.77-1.2x). Past 128 rows (prefill chunks) every form goes on block-major too, in passes
// of PASS_BYTES of activations: against the row groups, 0.34-0.52x the time for q8 (whose
// Q8Block recomputes the weights' offset sum for every group of 4 rows), 0.71-0.83x for q5
// and q6 (Zen 4); for q4 0.51-0.98x on an Intel Xeon (family 6 model 207), where the row
// groups ran prefill at a quarter of the int8 peak (Zen 4, 128-row passes: 0.97-1.07x, one
// shape 1.3x; the K-sized passes below came after). From PANEL_ROWS rows a pass, a tile
// pair goes on the panel order instead (tile_pair_panel_avx512).
constexpr int64_t BLOCK_MAJOR_ROWS = 128;
// One block-major pass covers the rows whose int8 activations fit in this, so that they
// stay in L2 while a piece of tiles passes them (each tile is re-read per pass, from L1/L2).
// 128-row passes read all of a long-K matrix's rows for every tile: at K = 5632 (46-row
// passes instead) 0.71-0.79x the time for q4, 0.74-0.87x for q8 at 192-512 rows (Xeon).
constexpr int64_t PASS_BYTES = 256 << 10;

// Whether a batch's tile pairs may take the 512-bit panel order (tile_pair_panel_avx512).
// Its measurements (PANEL_ROWS) are an Intel Xeon's (Ice Lake, family 6 model 106; model
// 207), where a 512-bit multiply-add issues every cycle and block-major's loads and stores
// of the rows' accumulators bound it. On Zen 4 (AMD family 25) a 512-bit multiply-add
// takes two cycles of its two 256-bit pipes, which leaves room for those loads and stores,
// and the panel's trip through memory for the unpacked blocks costs more than it saves:
// kernel_ab, block-major against the panel at 24-256 rows over q4, q4k, q5, q5k, q6, q6k
// and q8 (K = 576-8192), one thread on cached weights 0.73-0.99x the time, two threads on
// weights from memory 0.82-0.95x; bitwise the same. So the panel is the order where it
// was measured to pay, and Zen 4 runs block-major at every size. (Family 25 is Zen 3 too,
// which has no 512-bit path, so no panel either way.) Other CPUs keep the panel until
// measured (Zen 5's 512-bit pipes are full width, as the Xeon's are).
bool panel_pays() {
  static const bool pays = [] {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return true;
    const bool amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;  // "AuthenticAMD"
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return true;
    const unsigned base = (a >> 8) & 0xF, family = base == 0xF ? base + ((a >> 20) & 0xFF) : base;
    return family != 0x19;
#else
    return true;
#endif
  }();
  return pays;
}

enum class Mode { Q4, Q8, Q6, Q5, IQ4, Q3, IQ2, Q2, Q4K, Q5K, Q6K, MXFP4 };
// The last form: mode_number()'s numbers run 0..kLastMode (a new form goes after it, and here).
constexpr Mode kLastMode = Mode::MXFP4;
// IQ4 and MXFP4: 4-bit indices into a table of 16 int8 values, one half scale per 32, computed
// as Q8 on the looked-up values. The two differ in their table alone, so every step of IQ4's
// takes the form's table_of (and its shifted_of below) and serves both.
constexpr bool is_lookup4(Mode m) { return m == Mode::IQ4 || m == Mode::MXFP4; }
// Such a form's table (IQ4's for the other forms, which never read it).
constexpr const int8_t* table_of(Mode m) { return m == Mode::MXFP4 ? gguf::kMXFP4Values : gguf::kIQ4Values; }
constexpr bool is_super(Mode m) { return m == Mode::Q4K || m == Mode::Q5K || m == Mode::Q6K; }
// Q4K and Q5K: a scale and a min per block from 6-bit integers (Q4's and Q5's arithmetic).
constexpr bool is_k_min(Mode m) { return m == Mode::Q4K || m == Mode::Q5K; }
constexpr bool is_five(Mode m) { return m == Mode::Q5 || m == Mode::Q5K; }  // Q5's codes
// A super-block's header: Q4K and Q5K D[16] and Dm[16], Q6K D[16] (fp16).
constexpr int64_t header_bytes(Mode m) { return m == Mode::Q6K ? 2 * NR : is_k_min(m) ? 4 * NR : 0; }

constexpr int64_t code_bytes(Mode m) {
  return m == Mode::Q4 || is_lookup4(m) || m == Mode::IQ2 || m == Mode::Q4K ? Q4_CODE_BYTES
         : m == Mode::Q8                 ? Q8_CODE_BYTES
         : m == Mode::Q6 || m == Mode::Q6K ? Q6_CODE_BYTES
         : m == Mode::Q3                 ? Q3_CODE_BYTES
         : m == Mode::Q2                 ? Q2_CODE_BYTES
                                         : Q5_CODE_BYTES;
}
constexpr int64_t scale_bytes(Mode m) {  // Q5 has Q4's d and m, IQ4 and MXFP4 Q8's d, Q3 and IQ2 Q6's d0 and d1
  if (is_super(m)) return K_SCALE_BYTES;  // its 8-bit scales (and mins; the halves: the super-block headers)
  return 2 * (m == Mode::Q8 || is_lookup4(m)                 ? Q8_SCALE_HALVES
              : m == Mode::Q6 || m == Mode::Q3 || m == Mode::IQ2 ? Q6_SCALE_HALVES
              : m == Mode::Q2                                    ? Q2_SCALE_HALVES
                                               : Q4_SCALE_HALVES);
}

// A super-block form's super-block of `blocks` blocks: its header, then the blocks in pairs
// (see codes_at).
constexpr int64_t super_bytes(Mode m, int64_t blocks) {
  return blocks == 0 ? 0 : header_bytes(m) + blocks * (code_bytes(m) + scale_bytes(m));
}
int64_t tile_bytes(Mode mode, int64_t kb) {
  if (is_super(mode)) return kb / K_SUPER * super_bytes(mode, K_SUPER) + super_bytes(mode, kb % K_SUPER);
  return kb * (code_bytes(mode) + scale_bytes(mode));
}
constexpr bool has_min(Mode m) { return m == Mode::Q4 || m == Mode::Q5 || is_k_min(m); }  // w = d*q + m

// fn(std::integral_constant<Mode, M>{}) for the runtime mode: the kernels are templates on it.
template <typename Fn>
inline void with_mode(Mode mode, Fn fn) {
  switch (mode) {
    case Mode::Q4: return fn(std::integral_constant<Mode, Mode::Q4>{});
    case Mode::Q5: return fn(std::integral_constant<Mode, Mode::Q5>{});
    case Mode::Q6: return fn(std::integral_constant<Mode, Mode::Q6>{});
    case Mode::Q8: return fn(std::integral_constant<Mode, Mode::Q8>{});
    case Mode::IQ4: return fn(std::integral_constant<Mode, Mode::IQ4>{});
    case Mode::Q3: return fn(std::integral_constant<Mode, Mode::Q3>{});
    case Mode::IQ2: return fn(std::integral_constant<Mode, Mode::IQ2>{});
    case Mode::Q2: return fn(std::integral_constant<Mode, Mode::Q2>{});
    case Mode::Q4K: return fn(std::integral_constant<Mode, Mode::Q4K>{});
    case Mode::Q5K: return fn(std::integral_constant<Mode, Mode::Q5K>{});
    case Mode::Q6K: return fn(std::integral_constant<Mode, Mode::Q6K>{});
    case Mode::MXFP4: return fn(std::integral_constant<Mode, Mode::MXFP4>{});
  }
}

// A 16-entry int8 table shifted into u8, as the SIMD paths look it up (one byte shuffle)
// and multiply it with the signed activations; built at compile time, not per block.
struct alignas(16) ShiftedTable {
  uint8_t v[16];
};
constexpr ShiftedTable shifted(const int8_t (&table)[16], int shift) {
  ShiftedTable t{};
  for (int i = 0; i < 16; ++i) t.v[i] = static_cast<uint8_t>(table[i] + shift);
  return t;
}
// IQ4: + 128 (1..241), its sums started from 4x Q6's offset (-128 x each half's sum); MXFP4
// the same (116..140), so that it runs IQ4's steps.
constexpr ShiftedTable kIQ4Shifted = shifted(gguf::kIQ4Values, 128);
constexpr ShiftedTable kMXFP4Shifted = shifted(gguf::kMXFP4Values, 128);
constexpr const ShiftedTable& shifted_of(Mode m) { return m == Mode::MXFP4 ? kMXFP4Shifted : kIQ4Shifted; }
// IQ2: + 64 (21..107), from twice Q6's offset; a maddubs pair of them reaches
// 2 * 107 * 127 = 27178, inside int16.
constexpr ShiftedTable kIQ2Shifted = shifted(gguf::kIQ2Values, 64);

// What the 6-bit arithmetic's sums start from, in units of Q6's offset (-32 x a half's
// activation sum): Q6's codes stand for code - 32; IQ2's looked-up values are T2 + 64; Q2's
// codes are the weights' own, from zero (its mins are added apart).
template <Mode M>
constexpr int offset_scale() {
  return M == Mode::IQ2 ? 2 : M == Mode::Q2 ? 0 : 1;
}

int64_t packed_bytes(Mode mode, int64_t n, int64_t k) {
  return (n + NR - 1) / NR * tile_bytes(mode, k / QK);
}

// Byte offset, inside a tile-block's codes, of row r's weight j (0..31) of the block.
// Q4: the nibble is the high one for j >= 16.
inline int64_t q4_byte(int64_t r, int64_t j) { return ((j & 15) >> 2) * (4 * NR) + 4 * r + (j & 3); }
inline int64_t q8_byte(int64_t r, int64_t j) { return (j >> 2) * (4 * NR) + 4 * r + (j & 3); }
// Four bytes as one word, and the 4-bit fields at `shift` of each of its bytes. The fields of
// a word's bytes are worked on together: no shift or mask here carries a bit from one byte
// into a kept bit of another, so the words are the bytes' values on any byte order.
inline uint32_t load32(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}
inline void store32(uint8_t* p, uint32_t w) { std::memcpy(p, &w, 4); }
inline uint32_t nibbles(uint32_t w, unsigned shift) { return (w >> shift) & 0x0F0F0F0Fu; }
// Row r owns, in every 64-byte vector of a tile-block, the 4 bytes at 4r: the put_* below
// build each of those words whole and store it (no read of the destination), so a packed
// tile needs no zeroing first except where rows are padding (pack_by_row). Building the
// words a byte at a time, and OR-ing them into zeroed memory, packed ~2-3x slower.
// Row r's four Q4 words (dst = its word of the first vector, q4_byte(r, 0)) from 32 bytes
// whose 4 bits at `shift` are the codes: byte i of word p holds code 4p+i low and 16+4p+i
// high. shift 0 for codes one per byte; 0 or 4 for a GGUF plane of two groups' nibbles.
inline void put_nibble_words(uint8_t* dst, const uint8_t* c, unsigned shift) {
  for (int64_t p = 0; p < 4; ++p)
    store32(dst + p * 4 * NR, nibbles(load32(c + 4 * p), shift) | nibbles(load32(c + 16 + 4 * p), shift) << 4);
}
// Row r's 32 codes of a Q4 tile-block (the low 4 bits of the codes of Q5 and Q6) into their
// nibbles, and one of them back.
inline void put_q4(uint8_t* block_codes, int64_t r, const uint8_t* c) {
  put_nibble_words(block_codes + q4_byte(r, 0), c, 0);
}
inline int q4_code(const uint8_t* block_codes, int64_t r, int64_t j) {
  return (block_codes[q4_byte(r, j)] >> (j < 16 ? 0 : 4)) & 15;
}
// The word of row r whose byte i holds, in bit g, bit `bit` of code 4g + i (g = 0..7): Q5's
// and Q3's top bits.
inline void put_bit_plane(uint8_t* dst, const uint8_t* c, unsigned bit) {
  uint32_t w = 0;
  for (unsigned g = 0; g < 8; ++g) w |= ((load32(c + 4 * g) >> bit) & 0x01010101u) << g;
  store32(dst, w);
}
// The two words (h = 0, 1, 64 bytes apart) of row r whose byte i holds, in bits 2t..2t+1,
// bits `shift`..`shift`+1 of code 16h + 4t + i: Q6's top bits, Q3's and Q2's low ones.
inline void put_pair_planes(uint8_t* dst, const uint8_t* c, unsigned shift) {
  for (int64_t h = 0; h < 2; ++h) {
    uint32_t w = 0;
    for (unsigned t = 0; t < 4; ++t) w |= ((load32(c + 16 * h + 4 * t) >> shift) & 0x03030303u) << (2 * t);
    store32(dst + h * 4 * NR, w);
  }
}
// Q5: the low 4 bits as Q4's, the top one at q5_top_byte(r, j), bit j / 4.
inline int64_t q5_top_byte(int64_t r, int64_t j) { return Q4_CODE_BYTES + 4 * r + (j & 3); }
inline void put_q5(uint8_t* block_codes, int64_t r, const uint8_t* c) {
  put_q4(block_codes, r, c);
  put_bit_plane(block_codes + q5_top_byte(r, 0), c, 4);
}
inline int q5_code(const uint8_t* block_codes, int64_t r, int64_t j) {
  return q4_code(block_codes, r, j) | (((block_codes[q5_top_byte(r, j)] >> (j >> 2)) & 1) << 4);
}
// Q6: the low 4 bits at q4_byte(r, j); the top 2 at q6_top_byte(r, j), bits q6_top_shift(j).
inline int64_t q6_top_byte(int64_t r, int64_t j) { return Q6_LOW_BYTES + (j >> 4) * (4 * NR) + 4 * r + (j & 3); }
inline int q6_top_shift(int64_t j) { return static_cast<int>(2 * ((j >> 2) & 3)); }
inline void put_q6(uint8_t* block_codes, int64_t r, const uint8_t* c) {
  put_q4(block_codes, r, c);
  put_pair_planes(block_codes + q6_top_byte(r, 0), c, 4);
}
// Q3: the low 2 bits at q3_low_byte(r, j), bits q6_top_shift(j); the top one at
// q3_top_byte(r, j), bit j / 4.
inline int64_t q3_low_byte(int64_t r, int64_t j) { return (j >> 4) * (4 * NR) + 4 * r + (j & 3); }
inline int64_t q3_top_byte(int64_t r, int64_t j) { return Q3_LOW_BYTES + 4 * r + (j & 3); }
inline void put_q3(uint8_t* block_codes, int64_t r, const uint8_t* c) {
  put_pair_planes(block_codes + q3_low_byte(r, 0), c, 0);
  put_bit_plane(block_codes + q3_top_byte(r, 0), c, 2);
}
// Q2: Q3's low 2 bits alone.
inline void put_q2(uint8_t* block_codes, int64_t r, const uint8_t* c) {
  put_pair_planes(block_codes + q3_low_byte(r, 0), c, 0);
}
inline int q2_code(const uint8_t* block_codes, int64_t r, int64_t j) {
  return (block_codes[q3_low_byte(r, j)] >> q6_top_shift(j)) & 3;
}
template <Mode M>  // Q4, Q5, Q6, Q3, Q2 or IQ2 (its indices as Q4's codes)
inline void put_codes(uint8_t* block_codes, int64_t r, const uint8_t* c) {
  if constexpr (M == Mode::Q4 || M == Mode::IQ2 || M == Mode::Q4K) put_q4(block_codes, r, c);
  else if constexpr (M == Mode::Q2) put_q2(block_codes, r, c);
  else if constexpr (is_five(M)) put_q5(block_codes, r, c);
  else if constexpr (M == Mode::Q3) put_q3(block_codes, r, c);
  else put_q6(block_codes, r, c);
}
inline int q6_code(const uint8_t* block_codes, int64_t r, int64_t j) {
  return q4_code(block_codes, r, j) | (((block_codes[q6_top_byte(r, j)] >> q6_top_shift(j)) & 3) << 4);
}
inline int q3_code(const uint8_t* block_codes, int64_t r, int64_t j) {
  return ((block_codes[q3_low_byte(r, j)] >> q6_top_shift(j)) & 3) |
         (((block_codes[q3_top_byte(r, j)] >> (j >> 2)) & 1) << 2);
}
// The Q6 code a Q6, Q3 or IQ2 block's weight computes as: Q3's code q stands for q - 4, Q6's
// for code - 32, so Q3 runs as Q6 on q + 28, IQ2 on T2[q] + 32 (-11..75: the scalar path's
// sums are plain ints; the SIMD paths take T2[q] + 64 against twice the offset).
template <Mode M>
inline int six_bit_code(const uint8_t* block_codes, int64_t r, int64_t j) {
  if constexpr (M == Mode::Q3) return q3_code(block_codes, r, j) + 28;
  else if constexpr (M == Mode::IQ2) return gguf::kIQ2Values[q4_code(block_codes, r, j)] + 32;
  else if constexpr (M == Mode::Q2) return q2_code(block_codes, r, j);  // no offset: its sums start from 0
  else return q6_code(block_codes, r, j);
}

// Where a tile-block lives inside its tile. The blocks go in pairs, each pair's codes (2 x
// 256, 320, 384, 512, 256, 192, 128 or 256 bytes for Q4, Q5, Q6, Q8, IQ4 and MXFP4, Q3, Q2, IQ2)
// followed by the pair's scales (2 x 64; 32 for Q8, IQ4 and MXFP4, 128 for Q2): a pass over a tile
// is then one sequential stream of whole cache lines (a pair is 640, 768, 896, 1088, 576,
// 512, 512 or 640 bytes). The
// layout before put every block's scales after all the codes, two streams, which Zen 4's
// hardware prefetcher served at half the rate of one (one thread, weights from memory:
// 9.4-11.8 against 18-20 GB/s for Gemma 3's K = 640), and software prefetch did not help.
// An odd kb's last block stands alone: its codes, then its scales.
// The super-block forms: each super-block of 8 blocks starts with its header (the 16 rows'
// halves), then its blocks in pairs as above, each block's scales 32 bytes of 8-bit
// integers: a block of Q4K takes 296 bytes where Q4 takes 320, Q5K 360 where Q5 takes 384,
// Q6K 420 where Q6 takes 448. A short last super-block (K not a multiple of 256: float
// weights in tests; the GGUF types never) has fewer pairs and perhaps a lone last block.
// Forced inline: the kernels call these with their template's mode for every block, and
// only inlined do they fold to the few adds of each form. With the super-block forms GCC
// stopped inlining them into some kernels (a call and the super-block arithmetic a block:
// the AVX2 q4 kernel 1.03-1.11x the time, kernel_ab-20261205-164510).
#define TM_LAYOUT inline __attribute__((always_inline))
constexpr int64_t pair_bytes(Mode m) { return 2 * (code_bytes(m) + scale_bytes(m)); }
TM_LAYOUT int64_t super_start(Mode m, int64_t b) {  // a super-block form: b's super-block's first pair; else 0
  return is_super(m) ? b / K_SUPER * super_bytes(m, K_SUPER) + header_bytes(m) : 0;
}
TM_LAYOUT int64_t in_super(Mode m, int64_t b) { return is_super(m) ? b % K_SUPER : b; }
TM_LAYOUT int64_t codes_at(Mode m, int64_t b) {
  const int64_t i = in_super(m, b);
  return super_start(m, b) + (i >> 1) * pair_bytes(m) + (i & 1) * code_bytes(m);
}
TM_LAYOUT int64_t scales_at(Mode m, int64_t kb, int64_t b) {
  const int64_t in_pair = (b | 1) < kb ? 2 : 1, i = in_super(m, b);
  return super_start(m, b) + (i >> 1) * pair_bytes(m) + in_pair * code_bytes(m) + (i & 1) * scale_bytes(m);
}
// A super-block form: the header of block b's super-block (D[16], then Q4K's and Q5K's Dm[16]).
TM_LAYOUT const uint16_t* k_header(const uint8_t* tile, Mode m, int64_t b) {
  return reinterpret_cast<const uint16_t*>(tile + super_start(m, b) - header_bytes(m));
}
TM_LAYOUT uint16_t* k_header(uint8_t* tile, Mode m, int64_t b) {
  return reinterpret_cast<uint16_t*>(tile + super_start(m, b) - header_bytes(m));
}
TM_LAYOUT uint16_t* scales_of(uint8_t* tile, Mode m, int64_t kb, int64_t b) {
  return reinterpret_cast<uint16_t*>(tile + scales_at(m, kb, b));
}
TM_LAYOUT const uint16_t* scales_of(const uint8_t* tile, Mode m, int64_t kb, int64_t b) {
  return reinterpret_cast<const uint16_t*>(tile + scales_at(m, kb, b));
}

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline uint16_t float_to_half(float f) { return c10::Half(f).x; }

// Q4K and Q5K: row j's scale and min of block b, d = D * sc and m = Dm * mn: a half times a
// 6-bit integer, exact in float32 (11 + 6 significant bits), as every path computes them.
inline float k_d(const uint8_t* tile, Mode m, int64_t kb, int64_t b, int64_t j) {
  return half_to_float(k_header(tile, m, b)[j]) * static_cast<float>(tile[scales_at(m, kb, b) + j]);
}
inline float k_m(const uint8_t* tile, Mode m, int64_t kb, int64_t b, int64_t j) {
  return half_to_float(k_header(tile, m, b)[NR + j]) * static_cast<float>(tile[scales_at(m, kb, b) + NR + j]);
}
// Q6K: row j's scale of half h of block b, D * sc_h (a half times an int8: exact).
inline float k6_d(const uint8_t* tile, int64_t kb, int64_t b, int64_t h, int64_t j) {
  const int8_t sc = static_cast<int8_t>(tile[scales_at(Mode::Q6K, kb, b) + h * NR + j]);
  return half_to_float(k_header(tile, Mode::Q6K, b)[j]) * static_cast<float>(sc);
}

void check_weight(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "weight must be (N, K)");
  TORCH_CHECK(w.size(1) % QK == 0, "K = ", w.size(1), " is not a multiple of ", QK);
  TORCH_CHECK(w.size(0) >= 1 && w.size(1) >= QK, "empty weight");
}

void check_packed(Mode mode, const torch::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(k % QK == 0 && k > 0 && n > 0, "bad shape N=", n, " K=", k);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 1 && packed.is_contiguous(),
              "packed weights: contiguous 1-D uint8");
  TORCH_CHECK(packed.numel() == packed_bytes(mode, n, k), "packed weights have ", packed.numel(),
              " bytes, (N=", n, ", K=", k, ") needs ", packed_bytes(mode, n, k));
}

// ---------------------------------------------------------------------------------------
// Packing (once per weight; plain loops, parallel over tiles)

// Walks every row of an (N, K) weight in its tile: fn(tile, r, row), where tile is the row's
// tile in `out` and r its row inside it. Parallel over tiles. `out`: where to pack (the
// runner's weight arena), or undefined for a tensor of its own.
template <typename Fn>
torch::Tensor pack_by_row(Mode mode, int64_t n, int64_t k, Fn fn, torch::Tensor out = {}) {
  const int64_t kb = k / QK, ntiles = (n + NR - 1) / NR;
  // Not zeroed here: fn writes every byte of a row's codes and scales (the put_* above), so
  // only a tile with padding rows is cleared, by the thread that fills it. (Zeroing all of it
  // first wrote every byte twice, in one thread.)
  if (!out.defined()) out = torch::empty({packed_bytes(mode, n, k)}, torch::kUInt8);
  TORCH_CHECK(out.scalar_type() == torch::kUInt8 && out.dim() == 1 && out.is_contiguous() &&
                  out.numel() == packed_bytes(mode, n, k),
              "out: contiguous 1-D uint8 of ", packed_bytes(mode, n, k), " bytes");
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t tb = tile_bytes(mode, kb);
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if ((t + 1) * NR > n) std::memset(op + t * tb, 0, tb);
      for (int64_t r = 0; r < NR && t * NR + r < n; ++r) fn(op + t * tb, r, t * NR + r);
    }
  });
  return out;
}

// The same walk over every (row, block): fn(tile, r, row, b).
template <typename Fn>
torch::Tensor pack_by_block(Mode mode, int64_t n, int64_t k, Fn fn, torch::Tensor out = {}) {
  const int64_t kb = k / QK;
  return pack_by_row(
      mode, n, k, [&](uint8_t* tile, int64_t r, int64_t row) {
        for (int64_t b = 0; b < kb; ++b) fn(tile, r, row, b);
      },
      std::move(out));
}

// Packs a float (N, K) weight: fn(tile, r, kb, b, g) for each row's group g (its 32 floats)
// of block b, r the row inside its tile (pack_by_block's walk over a float32 copy).
template <typename Fn>
torch::Tensor pack_float(Mode mode, const torch::Tensor& weight, Fn fn) {
  check_weight(weight);
  auto w = weight.to(torch::kFloat).contiguous();
  const int64_t k = w.size(1), kb = k / QK;
  const float* wp = w.data_ptr<float>();
  return pack_by_block(mode, w.size(0), k, [&](uint8_t* tile, int64_t r, int64_t row, int64_t b) {
    fn(tile, r, kb, b, wp + row * k + b * QK);
  });
}

// Q4 and Q5 from float weights: Q4_1's (Q5_1's) rule, the group's min and max map to codes
// 0 and 15 (31), d = (max - min) / 15 (31) and m = min stored as halves; codes are rounded
// against the stored d and m, so weights that already are GGUF Q4_1 values d*q + m come
// back exactly. (GGUF weights come through pack_gguf; this is for float checkpoints and tests.)
template <Mode M>
torch::Tensor pack_min_max(const torch::Tensor& weight) {
  static_assert(has_min(M), "Q4 or Q5");
  constexpr float levels = M == Mode::Q4 ? 15.f : 31.f;
  return pack_float(M, weight, [&](uint8_t* tile, int64_t r, int64_t kb, int64_t b, const float* g) {
    float lo = g[0], hi = g[0];
    for (int64_t i = 1; i < QK; ++i) lo = std::min(lo, g[i]), hi = std::max(hi, g[i]);
    const uint16_t d16 = float_to_half((hi - lo) / levels), m16 = float_to_half(lo);
    const float d = half_to_float(d16), m = half_to_float(m16);
    const float id = d > 0.f ? 1.f / d : 0.f;
    uint8_t c[QK];
    for (int64_t j = 0; j < QK; ++j)
      c[j] = static_cast<uint8_t>(std::min(levels, std::max(0.f, std::nearbyint((g[j] - m) * id))));
    put_codes<M>(tile + codes_at(M, b), r, c);
    uint16_t* sc = scales_of(tile, M, kb, b);
    sc[r] = d16;
    sc[NR + r] = m16;
  });
}

// Q4K and Q5K from float weights (tests; GGUF Q4_K and Q5_K come through pack_gguf). Simple,
// not llama.cpp's search, but every weight within half a step of its code: a super-block's
// Dm is its most negative group min / 62.5 and each group's mn rounded up (m = Dm * mn at
// or below the group's min; a group whose min is positive gets mn = 0), then D is the
// largest step (max - m) / 15 (31) over 62.5 and each sc rounded up (d = D * sc at least
// that step), so no code clamps; the codes are rounded against the d and m the kernels use.
// The half nearest to v, moved away from zero while `top` integer steps of it fall short of
// |need|: small super-blocks have subnormal D, whose rounding would otherwise leave the
// largest group past what its 6-bit (8-bit) scale reaches.
inline uint16_t half_reaching(float v, float top, float need) {
  uint16_t h = float_to_half(v);
  while (std::fabs(half_to_float(h)) * top < std::fabs(need) && (h & 0x7FFF) < 0x7BFF) ++h;  // to the largest finite
  return h;
}

template <Mode M>
torch::Tensor k_min_pack(const torch::Tensor& weight) {
  static_assert(is_k_min(M), "Q4K or Q5K");
  constexpr float levels = M == Mode::Q4K ? 15.f : 31.f;
  check_weight(weight);
  auto w = weight.to(torch::kFloat).contiguous();
  const int64_t k = w.size(1), kb = k / QK;
  const float* wp = w.data_ptr<float>();
  return pack_by_row(M, w.size(0), k, [&](uint8_t* tile, int64_t r, int64_t row) {
    for (int64_t b0 = 0; b0 < kb; b0 += K_SUPER) {
      const int64_t nb = std::min(K_SUPER, kb - b0);
      float hi[K_SUPER], lo[K_SUPER], step[K_SUPER], top = 0.f, low = 0.f;
      for (int64_t i = 0; i < nb; ++i) {
        const float* g = wp + row * k + (b0 + i) * QK;
        lo[i] = hi[i] = g[0];
        for (int64_t j = 1; j < QK; ++j) lo[i] = std::min(lo[i], g[j]), hi[i] = std::max(hi[i], g[j]);
        low = std::min(low, lo[i]);
      }
      uint16_t* hdr = k_header(tile, M, b0);
      hdr[NR + r] = half_reaching(low / 62.5f, 63.f, low);
      const float dm = half_to_float(hdr[NR + r]);
      uint8_t mn[K_SUPER];
      for (int64_t i = 0; i < nb; ++i) {
        mn[i] = static_cast<uint8_t>(dm < 0.f ? std::min(63.f, std::max(0.f, std::ceil(lo[i] / dm))) : 0.f);
        step[i] = (hi[i] - dm * static_cast<float>(mn[i])) / levels;
        top = std::max(top, step[i]);
      }
      hdr[r] = half_reaching(top / 62.5f, 63.f, top);
      const float dd = half_to_float(hdr[r]);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t b = b0 + i;
        uint8_t* sm = tile + scales_at(M, kb, b);
        sm[r] = static_cast<uint8_t>(dd > 0.f ? std::min(63.f, std::ceil(step[i] / dd)) : 0.f);
        sm[NR + r] = mn[i];
        const float d = k_d(tile, M, kb, b, r), m = k_m(tile, M, kb, b, r);
        const float id = d > 0.f ? 1.f / d : 0.f;
        const float* g = wp + row * k + b * QK;
        uint8_t c[QK];
        for (int64_t j = 0; j < QK; ++j)
          c[j] = static_cast<uint8_t>(std::min(levels, std::max(0.f, std::nearbyint((g[j] - m) * id))));
        put_codes<M>(tile + codes_at(M, b), r, c);
      }
    }
  });
}

// Q6K from float weights (tests; GGUF Q6_K comes through pack_gguf): per half of a group
// (16 weights) a step max|w| / 31, as Q6's; the super-block's D = its largest step / 126.5
// and each half's sc = its step / D rounded up (so no code clamps), its codes
// round(w / (D * sc)) + 32 in 0..63.
torch::Tensor q6k_pack(const torch::Tensor& weight) {
  check_weight(weight);
  auto w = weight.to(torch::kFloat).contiguous();
  const int64_t k = w.size(1), kb = k / QK;
  const float* wp = w.data_ptr<float>();
  return pack_by_row(Mode::Q6K, w.size(0), k, [&](uint8_t* tile, int64_t r, int64_t row) {
    for (int64_t b0 = 0; b0 < kb; b0 += K_SUPER) {
      const int64_t nb = std::min(K_SUPER, kb - b0);
      float step[K_SUPER][2], top = 0.f;
      for (int64_t i = 0; i < nb; ++i)
        for (int64_t h = 0; h < 2; ++h) {
          const float* g = wp + row * k + (b0 + i) * QK + 16 * h;
          float peak = 0.f;
          for (int64_t j = 0; j < 16; ++j) peak = std::max(peak, std::fabs(g[j]));
          step[i][h] = peak / 31.f;
          top = std::max(top, step[i][h]);
        }
      uint16_t* hdr = k_header(tile, Mode::Q6K, b0);
      hdr[r] = half_reaching(top / 126.5f, 127.f, top);
      const float dd = half_to_float(hdr[r]);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t b = b0 + i;
        uint8_t* sm = tile + scales_at(Mode::Q6K, kb, b);
        uint8_t c[QK];
        for (int64_t h = 0; h < 2; ++h) {
          sm[h * NR + r] = static_cast<uint8_t>(dd > 0.f ? std::min(127.f, std::ceil(step[i][h] / dd)) : 0.f);
          const float d = k6_d(tile, kb, b, h, r);
          const float id = d > 0.f ? 1.f / d : 0.f;
          const float* g = wp + row * k + b * QK + 16 * h;
          for (int64_t j = 0; j < 16; ++j)
            c[16 * h + j] = static_cast<uint8_t>(32.f + std::min(31.f, std::max(-32.f, std::nearbyint(g[j] * id))));
        }
        put_codes<Mode::Q6>(tile + codes_at(Mode::Q6K, b), r, c);
      }
    }
  });
}

// -> codes (N, K) uint8 in 0..15 (Q4, Q4K) or 0..31 (Q5, Q5K), d (N, K/32) float32, m (N, K/32) float32
template <Mode M>
std::vector<torch::Tensor> unpack_min_max(const torch::Tensor& packed, int64_t n, int64_t k) {
  static_assert(has_min(M), "Q4, Q5, Q4K or Q5K");
  check_packed(M, packed, n, k);
  const int64_t kb = k / QK;
  auto codes = torch::empty({n, k}, torch::kUInt8);
  auto d = torch::empty({n, kb}, torch::kFloat), m = torch::empty({n, kb}, torch::kFloat);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t t = row / NR, r = row % NR;
    const uint8_t* tile = pp + t * tile_bytes(M, kb);
    for (int64_t b = 0; b < kb; ++b) {
      const uint8_t* src = tile + codes_at(M, b);
      const uint16_t* sc = scales_of(tile, M, kb, b);
      uint8_t* c = codes.data_ptr<uint8_t>() + row * k + b * QK;
      for (int64_t j = 0; j < QK; ++j) c[j] = static_cast<uint8_t>(is_five(M) ? q5_code(src, r, j) : q4_code(src, r, j));
      if constexpr (is_k_min(M)) {
        d.data_ptr<float>()[row * kb + b] = k_d(tile, M, kb, b, r);
        m.data_ptr<float>()[row * kb + b] = k_m(tile, M, kb, b, r);
        continue;
      }
      d.data_ptr<float>()[row * kb + b] = half_to_float(sc[r]);
      m.data_ptr<float>()[row * kb + b] = half_to_float(sc[NR + r]);
    }
  }
  return {codes, d, m};
}

// Q8_0's rule: d = max|w| / 127 (half), codes rounded against the stored d.
torch::Tensor q8_pack(const torch::Tensor& weight) {
  return pack_float(Mode::Q8, weight, [&](uint8_t* tile, int64_t r, int64_t kb, int64_t b, const float* g) {
    float amax = 0.f;
    for (int64_t i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(g[i]));
    const uint16_t d16 = float_to_half(amax / 127.f);
    const float d = half_to_float(d16);
    const float id = d > 0.f ? 1.f / d : 0.f;
    int8_t* dst = reinterpret_cast<int8_t*>(tile + codes_at(Mode::Q8, b));
    for (int64_t j = 0; j < QK; ++j)
      dst[q8_byte(r, j)] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(g[j] * id))));
    scales_of(tile, Mode::Q8, kb, b)[r] = d16;
  });
}

// IQ4 and MXFP4 from float weights (tests; GGUF weights come through pack_gguf): per group a
// half d, and each weight the index of the table value nearest to w / d (the lowest index on a
// tie, as gguf-py's argmin). IQ4: d maps the weight of largest magnitude onto the table's end
// of its sign (-127 or 113). MXFP4: ggml's rule, d = 2^(floor(log2 max|w|) - 3) (max|w| / d in
// 8..16, so past 12 it clips), the power kept to a half's -24..15; so a float weight packs as
// gguf-py's quantizer writes it.
template <Mode M>
torch::Tensor lookup4_pack(const torch::Tensor& weight) {
  static_assert(is_lookup4(M), "IQ4 or MXFP4");
  return pack_float(M, weight, [&](uint8_t* tile, int64_t r, int64_t kb, int64_t b, const float* g) {
    uint16_t d16;
    if constexpr (M == Mode::MXFP4) {
      float amax = 0.f;
      for (int64_t i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(g[i]));
      int power = 0;
      std::frexp(amax, &power);  // amax = f 2^power, f in [0.5, 1): floor(log2 amax) = power - 1
      d16 = amax > 0.f ? float_to_half(std::ldexp(1.f, std::clamp(power - 4, -24, 15))) : 0;
    } else {
      float peak = 0.f;
      for (int64_t i = 0; i < QK; ++i) peak = std::fabs(g[i]) > std::fabs(peak) ? g[i] : peak;
      d16 = float_to_half(peak / (peak < 0.f ? -127.f : 113.f));
    }
    const float d = half_to_float(d16);
    const float id = d != 0.f ? 1.f / d : 0.f;
    const int8_t* table = table_of(M);
    uint8_t idx[QK];
    for (int64_t j = 0; j < QK; ++j) {
      const float v = g[j] * id;
      int best = 0;
      for (int t = 1; t < 16; ++t)
        if (std::fabs(v - table[t]) < std::fabs(v - table[best])) best = t;
      idx[j] = static_cast<uint8_t>(best);
    }
    put_q4(tile + codes_at(M, b), r, idx);
    scales_of(tile, M, kb, b)[r] = d16;
  });
}

// Q8 -> codes (N, K) int8, d (N, K/32) float32; IQ4 and MXFP4 (M) -> their table values and d:
// what a Q8 layer of the same weights holds.
template <Mode M>
std::vector<torch::Tensor> unpack_signed(const torch::Tensor& packed, int64_t n, int64_t k) {
  check_packed(M, packed, n, k);
  const int64_t kb = k / QK;
  auto codes = torch::empty({n, k}, torch::kInt8);
  auto d = torch::empty({n, kb}, torch::kFloat);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t t = row / NR, r = row % NR;
    const uint8_t* tile = pp + t * tile_bytes(M, kb);
    for (int64_t b = 0; b < kb; ++b) {
      const uint8_t* src = tile + codes_at(M, b);
      int8_t* c = codes.data_ptr<int8_t>() + row * k + b * QK;
      for (int64_t j = 0; j < QK; ++j)
        c[j] = is_lookup4(M) ? table_of(M)[q4_code(src, r, j)] : static_cast<int8_t>(src[q8_byte(r, j)]);
      d.data_ptr<float>()[row * kb + b] = half_to_float(scales_of(tile, M, kb, b)[r]);
    }
  }
  return {codes, d};
}

// Q6 and Q3 from float weights (tests; GGUF weights come through pack_gguf): per half of a
// group (16 weights) one half scale d, codes round(w / d) + zero clamped to the form's range.
// Q6: d = max|w| / 31, codes 0..63 around 32. Q3: d = -peak / 4, the peak the value of
// largest magnitude, which so takes code 0 (-4), codes 0..7 around 4.
template <Mode M>
torch::Tensor half_scale_pack(const torch::Tensor& weight) {
  static_assert(M == Mode::Q6 || M == Mode::Q3, "Q6 or Q3");
  constexpr float zero = M == Mode::Q3 ? 4.f : 32.f, top = M == Mode::Q3 ? 3.f : 31.f;
  return pack_float(M, weight, [&](uint8_t* tile, int64_t r, int64_t kb, int64_t b, const float* g) {
    uint8_t c[QK];
    uint16_t* sc = scales_of(tile, M, kb, b);
    for (int64_t h = 0; h < 2; ++h) {
      float peak = 0.f;
      for (int64_t i = 16 * h; i < 16 * h + 16; ++i)
        if (std::fabs(g[i]) > std::fabs(peak)) peak = g[i];
      const uint16_t d16 = float_to_half(M == Mode::Q3 ? peak / -4.f : std::fabs(peak) / 31.f);
      const float d = half_to_float(d16);
      const float id = d != 0.f ? 1.f / d : 0.f;
      for (int64_t i = 16 * h; i < 16 * h + 16; ++i)
        c[i] = static_cast<uint8_t>(zero + std::min(top, std::max(-zero, std::nearbyint(g[i] * id))));
      sc[h * NR + r] = d16;
    }
    put_codes<M>(tile + codes_at(M, b), r, c);
  });
}

// IQ2 from float weights (tests; GGUF weights come through pack_gguf): per half of a group,
// d = max|w| / 43 as a half; each weight takes the index of the T2 value nearest to w / d
// (the lower on a tie).
torch::Tensor iq2_pack(const torch::Tensor& weight) {
  return pack_float(Mode::IQ2, weight, [&](uint8_t* tile, int64_t r, int64_t kb, int64_t b, const float* g) {
    uint8_t idx[QK];
    uint16_t* sc = scales_of(tile, Mode::IQ2, kb, b);
    for (int64_t h = 0; h < 2; ++h) {
      float amax = 0.f;
      for (int64_t i = 16 * h; i < 16 * h + 16; ++i) amax = std::max(amax, std::fabs(g[i]));
      const uint16_t d16 = float_to_half(amax / 43.f);
      const float d = half_to_float(d16);
      const float id = d != 0.f ? 1.f / d : 0.f;
      for (int64_t i = 16 * h; i < 16 * h + 16; ++i) {
        const float v = g[i] * id;
        int best = 0;
        for (int t = 1; t < 6; ++t)
          if (std::fabs(v - gguf::kIQ2Values[t]) < std::fabs(v - gguf::kIQ2Values[best])) best = t;
        idx[i] = static_cast<uint8_t>(best);
      }
      sc[h * NR + r] = d16;
    }
    put_q4(tile + codes_at(Mode::IQ2, b), r, idx);
  });
}

// Q2 from float weights (tests; GGUF weights come through pack_gguf): per half of a group,
// Q4's min-max rule on 4 levels: d = (max - min) / 3 and m = min as halves, codes rounded
// against the stored d and m.
torch::Tensor q2_pack(const torch::Tensor& weight) {
  return pack_float(Mode::Q2, weight, [&](uint8_t* tile, int64_t r, int64_t kb, int64_t b, const float* g) {
    uint8_t c[QK];
    uint16_t* sc = scales_of(tile, Mode::Q2, kb, b);
    for (int64_t h = 0; h < 2; ++h) {
      float lo = g[16 * h], hi = g[16 * h];
      for (int64_t i = 16 * h + 1; i < 16 * h + 16; ++i) lo = std::min(lo, g[i]), hi = std::max(hi, g[i]);
      const uint16_t d16 = float_to_half((hi - lo) / 3.f), m16 = float_to_half(lo);
      const float d = half_to_float(d16), m = half_to_float(m16);
      const float id = d > 0.f ? 1.f / d : 0.f;
      for (int64_t i = 16 * h; i < 16 * h + 16; ++i)
        c[i] = static_cast<uint8_t>(std::min(3.f, std::max(0.f, std::nearbyint((g[i] - m) * id))));
      sc[h * NR + r] = d16;
      sc[(2 + h) * NR + r] = m16;
    }
    put_q2(tile + codes_at(Mode::Q2, b), r, c);
  });
}

// Q2 -> codes (N, K) uint8 0..3, d and m (N, 2 K/32) float32: one each per 16 weights.
std::vector<torch::Tensor> q2_unpack(const torch::Tensor& packed, int64_t n, int64_t k) {
  check_packed(Mode::Q2, packed, n, k);
  const int64_t kb = k / QK;
  auto codes = torch::empty({n, k}, torch::kUInt8);
  auto d = torch::empty({n, 2 * kb}, torch::kFloat), m = torch::empty({n, 2 * kb}, torch::kFloat);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t t = row / NR, r = row % NR;
    const uint8_t* tile = pp + t * tile_bytes(Mode::Q2, kb);
    for (int64_t b = 0; b < kb; ++b) {
      const uint8_t* src = tile + codes_at(Mode::Q2, b);
      const uint16_t* sc = scales_of(tile, Mode::Q2, kb, b);
      uint8_t* c = codes.data_ptr<uint8_t>() + row * k + b * QK;
      for (int64_t j = 0; j < QK; ++j) c[j] = static_cast<uint8_t>(q2_code(src, r, j));
      for (int64_t h = 0; h < 2; ++h) {
        d.data_ptr<float>()[row * 2 * kb + 2 * b + h] = half_to_float(sc[h * NR + r]);
        m.data_ptr<float>()[row * 2 * kb + 2 * b + h] = half_to_float(sc[(2 + h) * NR + r]);
      }
    }
  }
  return {codes, d, m};
}

// -> codes (N, K) uint8 (Q6: 0..63 standing for code - 32; Q3: 0..7 standing for code - 4)
// or, for IQ2, int8 (its table values), d (N, 2 K/32) float32: one per 16
template <Mode M>
std::vector<torch::Tensor> half_scale_unpack(const torch::Tensor& packed, int64_t n, int64_t k) {
  check_packed(M, packed, n, k);
  const int64_t kb = k / QK;
  auto codes = torch::empty({n, k}, M == Mode::IQ2 ? torch::kChar : torch::kUInt8);
  auto d = torch::empty({n, 2 * kb}, torch::kFloat);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t t = row / NR, r = row % NR;
    const uint8_t* tile = pp + t * tile_bytes(M, kb);
    for (int64_t b = 0; b < kb; ++b) {
      const uint8_t* src = tile + codes_at(M, b);
      uint8_t* c = static_cast<uint8_t*>(codes.data_ptr()) + row * k + b * QK;
      for (int64_t j = 0; j < QK; ++j)
        c[j] = static_cast<uint8_t>(M == Mode::Q3    ? q3_code(src, r, j)
                                    : M == Mode::IQ2 ? gguf::kIQ2Values[q4_code(src, r, j)]
                                                     : q6_code(src, r, j));
      for (int64_t h = 0; h < 2; ++h)
        d.data_ptr<float>()[row * 2 * kb + 2 * b + h] =
            M == Mode::Q6K ? k6_d(tile, kb, b, h, r) : half_to_float(scales_of(tile, M, kb, b)[h * NR + r]);
    }
  }
  return {codes, d};
}

// Packing from codes a loader already holds (GGUF blocks converted without a float copy,
// loader/group_codes.py): the same layout as q4_pack / q8_pack, byte for byte, so a weight
// packed either way computes the same. d and m are halves (torch.float16), one per group.
void check_codes(const torch::Tensor& codes, const torch::Tensor& d, torch::ScalarType code_type) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == code_type && codes.is_contiguous(),
              "codes must be a contiguous (N, K) tensor of ", c10::toString(code_type));
  check_weight(codes);
  TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.dim() == 2 &&
              d.size(0) == codes.size(0) && d.size(1) == codes.size(1) / QK,
              "scales must be contiguous float16 (N, K/32)");
}

torch::Tensor q4_pack_codes(const torch::Tensor& codes, const torch::Tensor& d, const torch::Tensor& m) {
  check_codes(codes, d, torch::kUInt8);
  TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == torch::kHalf && m.is_contiguous(),
              "mins must be contiguous float16 like the scales");
  const int64_t n = codes.size(0), k = codes.size(1), kb = k / QK;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  return pack_by_block(Mode::Q4, n, k, [&](uint8_t* tile, int64_t r, int64_t row, int64_t b) {
    put_q4(tile + codes_at(Mode::Q4, b), r, cp + row * k + b * QK);
    uint16_t* sc = scales_of(tile, Mode::Q4, kb, b);
    sc[r] = dp[row * kb + b];
    sc[NR + r] = mp[row * kb + b];
  });
}

torch::Tensor q8_pack_codes(const torch::Tensor& codes, const torch::Tensor& d) {
  check_codes(codes, d, torch::kChar);
  const int64_t n = codes.size(0), k = codes.size(1), kb = k / QK;
  const int8_t* cp = codes.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  return pack_by_block(Mode::Q8, n, k, [&](uint8_t* tile, int64_t r, int64_t row, int64_t b) {
    const int8_t* g = cp + row * k + b * QK;
    int8_t* dst = reinterpret_cast<int8_t*>(tile + codes_at(Mode::Q8, b));
    // -128 has no place in the kernels' sign trick (|-128| overflows a byte).
    for (int64_t j = 0; j < QK; ++j) dst[q8_byte(r, j)] = std::max<int8_t>(g[j], -127);
    scales_of(tile, Mode::Q8, kb, b)[r] = dp[row * kb + b];
  });
}

// An IQ type's grid, checked against its shape (indices into it are then in range by
// construction) and, for packing, against the values gguf_blocks.h's forms rely on (the
// float decoding of an embedding lookup takes any); nullptr for a type that has none.
const int8_t* checked_grid(int64_t type, const torch::Tensor* grid, bool check_values = true) {
  const gguf::GridShape shape = gguf::grid_shape(type);
  if (shape.rows == 0) return nullptr;
  TORCH_CHECK(grid != nullptr && grid->numel() > 0, "GGUF type ", type, " needs its grid");
  TORCH_CHECK(grid->scalar_type() == torch::kChar && grid->is_contiguous() && grid->dim() == 2 &&
                  grid->size(0) == shape.rows && grid->size(1) == shape.width,
              "GGUF type ", type, "'s grid: contiguous int8 (", shape.rows, ", ", shape.width, ")");
  const int8_t* g = grid->data_ptr<int8_t>();
  for (int64_t i = 0; check_values && i < grid->numel(); ++i)
    TORCH_CHECK(gguf::grid_value_ok(type, g[i]), "GGUF type ", type, "'s grid holds ", int(g[i]));
  return g;
}

// The form a name stands for (runner/qlinear.py's modes); raises for any other name.
Mode mode_of(const std::string& form) {
  if (form == "q2") return Mode::Q2;
  if (form == "q3") return Mode::Q3;
  if (form == "q4") return Mode::Q4;
  if (form == "q5") return Mode::Q5;
  if (form == "q6") return Mode::Q6;
  if (form == "q8") return Mode::Q8;
  if (form == "iq4") return Mode::IQ4;
  if (form == "mxfp4") return Mode::MXFP4;
  if (form == "q4k") return Mode::Q4K;
  if (form == "q5k") return Mode::Q5K;
  if (form == "q6k") return Mode::Q6K;
  TORCH_CHECK(form == "iq2", "form must be q2, q3, q4, q4k, q5, q5k, q6, q6k, q8, iq4, mxfp4 or iq2, not ", form);
  return Mode::IQ2;
}

// Whether pack_gguf packs a GGUF type in a form (q8 takes every type decoded here), and the
// form's name in its refusal.
bool form_takes(Mode mode, int64_t type) {
  switch (mode) {
    case Mode::Q2: return gguf::two_bit(type);
    case Mode::Q3: return gguf::three_bit(type);
    case Mode::Q4: return gguf::four_bit(type);
    case Mode::Q5: return gguf::five_bit(type);
    case Mode::Q6: return gguf::six_bit(type);
    case Mode::IQ4: return gguf::iq4(type);
    case Mode::IQ2: return gguf::iq2(type);
    case Mode::Q4K: return type == gguf::Q4_K;
    case Mode::Q5K: return type == gguf::Q5_K;
    case Mode::Q6K: return type == gguf::Q6_K;
    case Mode::MXFP4: return type == gguf::MXFP4;
    case Mode::Q8: return true;
  }
  return false;
}
const char* form_title(Mode mode) {
  switch (mode) {
    case Mode::Q2: return "2-bit";
    case Mode::Q3: return "3-bit";
    case Mode::Q4: return "4-bit";
    case Mode::Q5: return "5-bit";
    case Mode::Q6: return "6-bit";
    case Mode::IQ4: return "IQ4";
    case Mode::IQ2: return "IQ2";
    case Mode::Q4K: return "Q4_K";
    case Mode::Q5K: return "Q5_K";
    case Mode::Q6K: return "Q6_K";
    case Mode::MXFP4: return "MXFP4";
    case Mode::Q8: return "8-bit";
  }
  return "?";
}

// Q4_K and Q6_K rows in the q4 and q6 forms (beside another type of that width: their own
// forms are k_min_row's and q6k_row's), packed straight from the file's bytes: each
// group's scales as decode4/decode6 compute them, its words built from the file's nibble and
// bit planes by the put_* word builders (no codes buffer between). Through the per-group
// decoders, which first spread a group's codes into a buffer, these packed at ~1.5 GB/s of
// file (Xeon, two threads), 2.5-4x slower. False where a scale does not fit a half, as the
// decoders.
inline bool q4_k_row(const uint8_t* src, int64_t kb, uint8_t* tile, int64_t r) {
  for (int64_t sb = 0; sb < kb / 8; ++sb) {
    const uint8_t* blk = src + sb * 144;
    const float d = gguf::f16(blk), dmin = gguf::f16(blk + 2);
    for (int s = 0; s < 8; ++s) {
      const int64_t b = sb * 8 + s;
      uint16_t* scales = scales_of(tile, Mode::Q4, kb, b);
      if (!gguf::k_scale_min(blk, s, d, dmin, &scales[r], &scales[NR + r])) return false;
      // group s is the low (even s) or high nibbles of the super-block's 32-byte plane s / 2
      put_nibble_words(tile + codes_at(Mode::Q4, b) + q4_byte(r, 0), blk + 16 + (s / 2) * 32, (s & 1) * 4);
    }
  }
  return true;
}
// Q4_K and Q5_K rows in their own forms: the file's d and dmin as they are (dmin negated:
// the kernels add Dm * mn), its 6-bit scales and mins as integers, so each group's d and m
// are exactly the file's d * sc and -dmin * mn (the q4 and q5 forms round them to halves).
// Q5_K (176-byte super-blocks: d, dmin, scales[12], qh[32], qs[128]) adds bit s of qh as
// group s's top bits. False where d or dmin is not finite.
template <Mode M>
inline bool k_min_row(const uint8_t* src, int64_t kb, uint8_t* tile, int64_t r) {
  static_assert(is_k_min(M), "Q4K or Q5K");
  constexpr int64_t super = M == Mode::Q4K ? 144 : 176, qs_at = M == Mode::Q4K ? 16 : 48;
  for (int64_t sb = 0; sb < kb / K_SUPER; ++sb) {
    const uint8_t* blk = src + sb * super;
    const int64_t b0 = sb * K_SUPER;
    uint16_t* hdr = k_header(tile, M, b0);
    hdr[r] = gguf::f16_bits(blk);
    hdr[NR + r] = gguf::f16_bits(blk + 2) ^ 0x8000;
    if (!std::isfinite(half_to_float(hdr[r])) || !std::isfinite(half_to_float(hdr[NR + r]))) return false;
    for (int s = 0; s < K_SUPER; ++s) {
      const int64_t b = b0 + s;
      float sc, mn;
      gguf::scale_min_k4(s, blk + 4, &sc, &mn);
      uint8_t* sm = tile + scales_at(M, kb, b);
      sm[r] = static_cast<uint8_t>(sc);
      sm[NR + r] = static_cast<uint8_t>(mn);
      uint8_t* dst = tile + codes_at(M, b);
      // group s is the low (even s) or high nibbles of the super-block's 32-byte plane s / 2
      put_nibble_words(dst + q4_byte(r, 0), blk + qs_at + (s / 2) * 32, (s & 1) * 4);
      if constexpr (M == Mode::Q5K) put_bit_plane(dst + q5_top_byte(r, 0), blk + 16, s);
    }
  }
  return true;
}
// Q6_K rows in their own form: the file's d as it is and its int8 scales, one per 16
// weights, so each half's scale is exactly d * sc (the q6 form rounds it to a half).
inline bool q6k_row(const uint8_t* src, int64_t kb, uint8_t* tile, int64_t r) {
  for (int64_t b = 0; b < kb; ++b) {
    const gguf::Q6KGroup at = gguf::q6_k_at(src, b);
    if (b % K_SUPER == 0) {
      k_header(tile, Mode::Q6K, b)[r] = gguf::f16_bits(src + (b / K_SUPER) * 210 + 208);
      if (!std::isfinite(at.d)) return false;
    }
    uint8_t* sm = tile + scales_at(Mode::Q6K, kb, b);
    sm[r] = static_cast<uint8_t>(at.sc[0]);
    sm[NR + r] = static_cast<uint8_t>(at.sc[1]);
    uint8_t* dst = tile + codes_at(Mode::Q6K, b);
    put_nibble_words(dst + q4_byte(r, 0), at.ql, at.j < 2 ? 0 : 4);
    put_pair_planes(dst + q6_top_byte(r, 0), at.qh, 2 * at.j);
  }
  return true;
}
inline bool q6_k_row(const uint8_t* src, int64_t kb, uint8_t* tile, int64_t r) {
  for (int64_t b = 0; b < kb; ++b) {
    const gguf::Q6KGroup at = gguf::q6_k_at(src, b);
    uint16_t* scales = scales_of(tile, Mode::Q6, kb, b);
    if (!gguf::half_pair(at.d * static_cast<float>(at.sc[0]), at.d * static_cast<float>(at.sc[1]), &scales[r],
                         &scales[NR + r]))
      return false;
    uint8_t* dst = tile + codes_at(Mode::Q6, b);
    put_nibble_words(dst + q4_byte(r, 0), at.ql, at.j < 2 ? 0 : 4);
    put_pair_planes(dst + q6_top_byte(r, 0), at.qh, 2 * at.j);
  }
  return true;
}

// Packing straight from a GGUF file's mapped bytes (gguf_blocks.h decodes each group):
// the parts are stacked along N in order (q, k, v -> qkv), each part's output row i taken
// from its source row order[i] (llama.cpp's q/k permutation undone) or row i when order is
// empty. One pass, parallel over tiles, no intermediate codes tensor. Form "q4" takes only
// Q4_0/Q4_1/Q4_K/IQ3_S/IQ1_S parts, "q4k", "q5k" and "q6k" only Q4_K, Q5_K, Q6_K, "q5" only Q5_0/Q5_1/Q5_K, "q6" only
// Q6_K/Q3_K/IQ3_XXS/IQ1_M, "q3" only Q3_K, "q2" only Q2_K, "iq4" only IQ4_NL/IQ4_XS, "mxfp4"
// only MXFP4, "iq2" only IQ2_XXS/IQ2_XS/IQ2_S (form_takes); "q8" takes every type gguf_blocks.h
// decodes.
// grids: per part, the IQ types' grid (gguf::grid_shape, int8), an empty tensor for the
// others (or no list at all when no part needs one).
// Raises with "half range" in the message when a scale or min does not fit a half, so
// that the caller can fall back to its own (8-bit) handling of such a tensor.
// into: the packed_bytes() bytes to pack into (runner/weight_arena.py), else a new tensor.
torch::Tensor pack_gguf(const std::string& form, const std::vector<torch::Tensor>& raws,
                        const std::vector<int64_t>& types, const std::vector<torch::Tensor>& orders, int64_t k,
                        const std::vector<torch::Tensor>& grids, const std::optional<torch::Tensor>& into) {
  const Mode mode = mode_of(form);
  TORCH_CHECK(!raws.empty() && raws.size() == types.size() && raws.size() == orders.size(),
              "one type and one row order per part");
  TORCH_CHECK(grids.empty() || grids.size() == raws.size(), "one grid (or an empty tensor) per part");
  TORCH_CHECK(k > 0 && k % QK == 0, "K = ", k, " is not a positive multiple of ", QK);
  std::vector<const uint8_t*> row_ptr;
  std::vector<int64_t> row_type;
  std::vector<const int8_t*> row_grid;
  for (size_t p = 0; p < raws.size(); ++p) {
    const auto& raw = raws[p];
    const gguf::Layout lay = gguf::layout(types[p]);
    const int8_t* grid = checked_grid(types[p], grids.empty() ? nullptr : &grids[p]);
    TORCH_CHECK(lay.block_values > 0, "GGUF type ", types[p], " is not decoded here");
    TORCH_CHECK(form_takes(mode, types[p]), "GGUF type ", types[p], " has no ", form_title(mode), " form");
    TORCH_CHECK(k % lay.block_values == 0, "K = ", k, " is not a whole number of blocks of ", lay.block_values);
    TORCH_CHECK(raw.scalar_type() == torch::kUInt8 && raw.dim() == 1 && raw.is_contiguous(),
                "raw tensor bytes: contiguous 1-D uint8");
    const int64_t row_bytes = k / lay.block_values * lay.block_bytes;
    TORCH_CHECK(raw.numel() % row_bytes == 0, "part ", p, " is not a whole number of rows");
    const int64_t rows = raw.numel() / row_bytes;
    const uint8_t* base = raw.data_ptr<uint8_t>();
    const auto& order = orders[p];
    const bool permuted = order.numel() > 0;
    if (permuted)
      TORCH_CHECK(order.scalar_type() == torch::kLong && order.is_contiguous() && order.numel() == rows,
                  "row order: contiguous int64, one index per row");
    const int64_t* op = permuted ? order.data_ptr<int64_t>() : nullptr;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t src = permuted ? op[i] : i;
      TORCH_CHECK(src >= 0 && src < rows, "row order index out of range");
      row_ptr.push_back(base + src * row_bytes);
      row_type.push_back(types[p]);
      row_grid.push_back(grid);
    }
  }
  const int64_t n = static_cast<int64_t>(row_ptr.size()), kb = k / QK;
  std::atomic<bool> in_range{true};
  const torch::Tensor target = into.value_or(torch::Tensor());  // undefined: a tensor of its own
  torch::Tensor out;
  // The 3-, 4-, 5- and 6-bit forms and IQ2: codes and two halves a row (d and m, or d0 and d1).
  auto two_scales = [&](auto form, auto decode) {  // form: std::integral_constant<Mode, M>
    constexpr Mode M = decltype(form)::value;
    return pack_by_row(M, n, k, [&](uint8_t* tile, int64_t r, int64_t row) {
      if constexpr (M == Mode::Q4) {
        if (row_type[row] == gguf::Q4_K) {
          if (!q4_k_row(row_ptr[row], kb, tile, r)) in_range = false;
          return;
        }
      }
      if constexpr (M == Mode::Q6) {
        if (row_type[row] == gguf::Q6_K) {
          if (!q6_k_row(row_ptr[row], kb, tile, r)) in_range = false;
          return;
        }
      }
      for (int64_t b = 0; b < kb; ++b) {
        uint8_t c[QK];
        uint16_t s0, s1;
        if (!decode(row_type[row], row_ptr[row], b, c, &s0, &s1, row_grid[row])) in_range = false;
        put_codes<M>(tile + codes_at(M, b), r, c);
        uint16_t* sc = scales_of(tile, M, kb, b);
        sc[r] = s0;
        sc[NR + r] = s1;
      }
    }, target);
  };
  if (is_super(mode)) {  // the k-quants' own forms: a super-block at a time, its halves and scales as they are
    out = pack_by_row(mode, n, k, [&](uint8_t* tile, int64_t r, int64_t row) {
      const bool ok = mode == Mode::Q6K   ? q6k_row(row_ptr[row], kb, tile, r)
                      : mode == Mode::Q5K ? k_min_row<Mode::Q5K>(row_ptr[row], kb, tile, r)
                                          : k_min_row<Mode::Q4K>(row_ptr[row], kb, tile, r);
      if (!ok) in_range = false;
    }, target);
  } else if (mode == Mode::Q4) {
    out = two_scales(std::integral_constant<Mode, Mode::Q4>{}, gguf::decode4);
  } else if (mode == Mode::Q5) {
    out = two_scales(std::integral_constant<Mode, Mode::Q5>{}, gguf::decode5);
  } else if (mode == Mode::Q6) {
    out = two_scales(std::integral_constant<Mode, Mode::Q6>{}, gguf::decode6);
  } else if (mode == Mode::Q3) {
    out = two_scales(std::integral_constant<Mode, Mode::Q3>{}, gguf::decode3);
  } else if (mode == Mode::IQ2) {
    out = two_scales(std::integral_constant<Mode, Mode::IQ2>{}, gguf::decode_iq2);
  } else if (mode == Mode::Q2) {  // a scale and a min per half
    out = pack_by_block(Mode::Q2, n, k, [&](uint8_t* tile, int64_t r, int64_t row, int64_t b) {
      uint8_t c[QK];
      uint16_t d[2], m[2];
      if (!gguf::decode2(row_ptr[row], b, c, d, m)) in_range = false;
      put_q2(tile + codes_at(Mode::Q2, b), r, c);
      uint16_t* sc = scales_of(tile, Mode::Q2, kb, b);
      for (int h = 0; h < 2; ++h) sc[h * NR + r] = d[h], sc[(2 + h) * NR + r] = m[h];
    }, target);
  } else if (is_lookup4(mode)) {  // IQ4, MXFP4: a group's table indices and its half scale
    out = pack_by_block(mode, n, k, [&](uint8_t* tile, int64_t r, int64_t row, int64_t b) {
      uint8_t c[QK];
      uint16_t d;
      const int64_t type = row_type[row];
      const bool ok = type == gguf::MXFP4 ? gguf::decode_mxfp4(row_ptr[row], b, c, &d)
                                          : gguf::decode_iq4(type, row_ptr[row], b, c, &d);
      if (!ok) in_range = false;
      put_q4(tile + codes_at(mode, b), r, c);
      scales_of(tile, mode, kb, b)[r] = d;
    }, target);
  } else {
    out = pack_by_block(Mode::Q8, n, k, [&](uint8_t* tile, int64_t r, int64_t row, int64_t b) {
      int8_t c[QK];
      uint16_t d;
      if (!gguf::decode8(row_type[row], row_ptr[row], b, c, &d, row_grid[row])) in_range = false;
      uint8_t* dst = tile + codes_at(Mode::Q8, b) + q8_byte(r, 0);
      for (int64_t g = 0; g < QK / 4; ++g) std::memcpy(dst + g * 4 * NR, c + 4 * g, 4);  // 4 weights per k-group
      scales_of(tile, Mode::Q8, kb, b)[r] = d;
    }, target);
  }
  TORCH_CHECK(in_range.load(), "a scale or min is outside the half range (or a weight is not finite)");
  return out;
}

// Rows of a GGUF tensor -> float32 (N, K): the embedding lookup over the mapped file.
torch::Tensor gguf_rows(const torch::Tensor& raw, int64_t type, const torch::Tensor& ids, int64_t k,
                        const std::optional<torch::Tensor>& grid) {
  const gguf::Layout lay = gguf::layout(type);
  const int8_t* g = checked_grid(type, grid.has_value() ? &*grid : nullptr, false);
  TORCH_CHECK(lay.block_values > 0, "GGUF type ", type, " is not decoded here");
  TORCH_CHECK(k > 0 && k % QK == 0 && k % lay.block_values == 0, "bad row width ", k);
  TORCH_CHECK(raw.scalar_type() == torch::kUInt8 && raw.dim() == 1 && raw.is_contiguous(), "raw: 1-D uint8");
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1, "ids: 1-D int64");
  const int64_t row_bytes = k / lay.block_values * lay.block_bytes, rows = raw.numel() / row_bytes;
  auto idc = ids.contiguous();
  const int64_t* ip = idc.data_ptr<int64_t>();
  const int64_t m = idc.numel();
  for (int64_t i = 0; i < m; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < rows, "row id ", ip[i], " out of range");
  auto out = torch::empty({m, k}, torch::kFloat);
  float* o = out.data_ptr<float>();
  const uint8_t* base = raw.data_ptr<uint8_t>();
  at::parallel_for(0, m, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t b = 0; b < k / QK; ++b) gguf::decode_floats(type, base + ip[i] * row_bytes, b, o + i * k + b * QK, g);
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Activation quantization: per row and block, e = max|x| / 127, a = round-half-even(x / e)
// computed as x * (1 / e), s = e * sum(a), off = -32 * (sum of a's first 16, of its last
// 16), hs = e * each of those sums. The same float operations in every path (scalar, AVX2
// four groups at a time, AVX-512 sixteen and four at a time). Where 1 / e is not finite (e = 0, or a group whose
// largest |x| is below ~3.7e-37, so that e is subnormal and its inverse overflows) the
// inverse is 0 and so are the codes: x * inf would make a 0 NaN, which the paths clamp
// differently (and the half sums would overflow).
inline float inverse_scale(float d) {
  const float id = 1.f / d;
  return std::isfinite(id) ? id : 0.f;
}

// Per row and block, what the forms with a scale per half (16 weights) need of the
// activations' sum over each half: Q6's integer offset, and the float e x sum (Q2's mins).
struct HalfSums {
  int32_t off[2];  // -32 x the sum of each half (Q6's offset; IQ4 takes 4x it, IQ2 2x)
  float hs[2];     // e x the sum of each half
};

struct QAct {
  int8_t* a;        // (M, K)
  float* e;         // (M, KB)
  float* s;         // (M, KB)
  HalfSums* off;    // (M, KB)
};

// A block's scale d and the sums of its two halves' codes h0, h1 -> what the kernels read:
// e = d, s = d * sum, Q6's integer offsets and the half sums (every quantizer path's last step).
inline void store_block_sums(float d, int h0, int h1, float* e, float* s, HalfSums* off) {
  *e = d;
  *s = d * static_cast<float>(h0 + h1);
  off->off[0] = -32 * h0;
  off->off[1] = -32 * h1;
  off->hs[0] = d * static_cast<float>(h0);
  off->hs[1] = d * static_cast<float>(h1);
}

void quantize_block_scalar(const float* x, int8_t* a, float* e, float* s, HalfSums* off) {
  float amax = 0.f;
  for (int64_t i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.f;
  const float id = inverse_scale(d);
  int half[2] = {0, 0};
  for (int64_t i = 0; i < QK; ++i) {
    const int q = static_cast<int>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] * id))));
    a[i] = static_cast<int8_t>(q);
    half[i >> 4] += q;
  }
  store_block_sums(d, half[0], half[1], e, s, off);
}

#ifdef TM_AVX2
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int hsum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

void quantize_block_avx2(const float* x, int8_t* a, float* e, float* s, HalfSums* off) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  const float d = hmax8(amax) / 127.f;
  const float id = inverse_scale(d);
  const __m256 vid = _mm256_set1_ps(id), lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) {
    __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q[i] = _mm256_cvtps_epi32(_mm256_min_ps(lim, _mm256_max_ps(nlim, r)));
  }
  const int h0 = hsum8_epi32(_mm256_add_epi32(q[0], q[1])), h1 = hsum8_epi32(_mm256_add_epi32(q[2], q[3]));
  // packs works within 128-bit lanes: 0..3 8..11 4..7 12..15 | ..., permute back to order.
  __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
  __m256i b = _mm256_packs_epi16(p01, p23);
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), b);
  store_block_sums(d, h0, h1, e, s, off);
}
#endif

#ifdef TM_AVX2
constexpr int kQuantizeTogether = 4;  // groups of 32 per quantize_blocks_* call

// quantize_block_avx2's steps for kQuantizeTogether consecutive blocks at once, each step
// done for all of them before the next: one block's chain (a reduction for the largest |x|,
// two divisions, the rounding, two reductions for the half sums) is latency, ~65 cycles a
// block alone; independent chains side by side let the core overlap them. The same float32
// operations on the same values, so the same codes and scales. (The AVX2 build's; the
// 512-bit build has its own below.)
void quantize_blocks_avx2(const float* x, int8_t* a, float* e, float* s, HalfSums* off) {
  constexpr int U = kQuantizeTogether;
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[U][4];
  float d[U], id[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[u][i] = _mm256_loadu_ps(x + QK * u + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[u][i]));
    }
    d[u] = hmax8(amax) / 127.f;
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) id[u] = inverse_scale(d[u]);
  const __m256 lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f);
  __m256i q[U][4];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const __m256 vid = _mm256_set1_ps(id[u]);
    for (int i = 0; i < 4; ++i) {
      __m256 r = _mm256_round_ps(_mm256_mul_ps(v[u][i], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[u][i] = _mm256_cvtps_epi32(_mm256_min_ps(lim, _mm256_max_ps(nlim, r)));
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    // packs works within 128-bit lanes: 0..3 8..11 4..7 12..15 | ..., permute back to order.
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[u][0], q[u][1]), _mm256_packs_epi32(q[u][2], q[u][3]));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + QK * u), b);
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const int h0 = hsum8_epi32(_mm256_add_epi32(q[u][0], q[u][1])), h1 = hsum8_epi32(_mm256_add_epi32(q[u][2], q[u][3]));
    store_block_sums(d[u], h0, h1, e + u, s + u, off + u);
  }
}
#endif

#ifdef TM_VNNI512
// quantize_blocks_avx2 in 512-bit registers (a block is two vectors, not four).
void quantize_blocks_avx512(const float* x, int8_t* a, float* e, float* s, HalfSums* off) {
  constexpr int U = kQuantizeTogether;
  __m512 v[U][2];
  float d[U], id[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    v[u][0] = _mm512_loadu_ps(x + QK * u);
    v[u][1] = _mm512_loadu_ps(x + QK * u + 16);
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
    d[u] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[u][0]), _mm512_abs_ps(v[u][1]))) / 127.f;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) id[u] = inverse_scale(d[u]);
  const __m512 lim = _mm512_set1_ps(127.f), nlim = _mm512_set1_ps(-127.f);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m512i q[U][2];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
    for (int h = 0; h < 2; ++h)
      q[u][h] = _mm512_cvtps_epi32(_mm512_min_ps(
          lim, _mm512_max_ps(nlim, _mm512_roundscale_ps(_mm512_mul_ps(v[u][h], _mm512_set1_ps(id[u])), kNearest))));
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a + QK * u), _mm512_cvtsepi32_epi8(q[u][0]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a + QK * u + 16), _mm512_cvtsepi32_epi8(q[u][1]));
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const int h0 = _mm512_reduce_add_epi32(q[u][0]), h1 = _mm512_reduce_add_epi32(q[u][1]);
    store_block_sums(d[u], h0, h1, e + u, s + u, off + u);
  }
}
#endif

#ifdef TM_VNNI512
constexpr int kQuantizeWide = 16;  // groups of 32 per quantize_blocks16_avx512 call

// Per 128-bit lane g of the result, lane g of each input reduced: the last steps of a
// transposed reduction, shared by the largest |x| (max) and the half sums (add).
template <typename Op>
inline __m512 fold_lanes(__m512 a, __m512 b, Op op) {  // lane g: [a.0 op a.2, a.1 op a.3, b.0 op b.2, b.1 op b.3]
  return op(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}

// 16 vectors -> one whose element j is the reduction (op) of vector p(j) = 4 (j % 4) + j / 4:
// a transposed reduction, 15 steps of two shuffles and one op where 16 horizontal ones
// take 64 of each. Each element is _mm512_reduce_max_ps's (GCC's) tree on its vector, the
// same pairs with the same operand order at every step: bit for bit its value, NaN
// included (max returns its second operand where either is NaN). Integer add is exact.
template <typename Op>
inline __m512 reduce16(const __m512* v, Op op) {
  __m512 r[8], t[4], u[2];
  for (int i = 0; i < 8; ++i)  // [v2i's high 256 bits op its low | v2i+1's]
    r[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44));
  for (int i = 0; i < 4; ++i)  // 128-bit lane j: vector 4i + j, 4 partials (its high 128 op its low)
    t[i] = op(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0xDD), _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0x88));
  u[0] = fold_lanes(t[0], t[1], op);  // lane g: vectors g, g + 4 (two partials each)
  u[1] = fold_lanes(t[2], t[3], op);  // lane g: vectors g + 8, g + 12
  // lane g: [g, g + 4, g + 8, g + 12]
  return op(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The order reduce16 leaves: element j holds vector 4 (j % 4) + j / 4; this permutation
// (its own inverse) puts element b at b.
inline __m512i reduce16_order() {
  return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
}

// store_block_sums for 16 consecutive blocks, but for e (= d, which scales16_avx512 stored):
// d, h0 and h1 hold block b's values in element b. The same float32 products (an exact
// int32 sum converted, times d); the HalfSums (16 bytes a block) written as four vectors,
// from a 4 x 16 transpose.
inline void store_block_sums16(__m512 d, __m512i h0, __m512i h1, float* s, HalfSums* off) {
  static_assert(sizeof(HalfSums) == 16, "off[2], hs[2]");
  _mm512_storeu_ps(s, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_add_epi32(h0, h1))));
  const __m512i o0 = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(h0, 5));  // -32 h, as int32 wraps
  const __m512i o1 = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(h1, 5));
  const __m512i f0 = _mm512_castps_si512(_mm512_mul_ps(d, _mm512_cvtepi32_ps(h0)));
  const __m512i f1 = _mm512_castps_si512(_mm512_mul_ps(d, _mm512_cvtepi32_ps(h1)));
  // 128-bit lane g of each: blocks 4g..4g+3. After the unpacks, lane g of p[i] is block 4g + i's HalfSums.
  const __m512i lo_o = _mm512_unpacklo_epi32(o0, o1), hi_o = _mm512_unpackhi_epi32(o0, o1);
  const __m512i lo_f = _mm512_unpacklo_epi32(f0, f1), hi_f = _mm512_unpackhi_epi32(f0, f1);
  const __m512i p[4] = {_mm512_unpacklo_epi64(lo_o, lo_f), _mm512_unpackhi_epi64(lo_o, lo_f),
                        _mm512_unpacklo_epi64(hi_o, hi_f), _mm512_unpackhi_epi64(hi_o, hi_f)};
  // The 4 x 4 transpose of 128-bit lanes: vector g holds blocks 4g..4g+3, lane i from p[i].
  const __m512i a01 = _mm512_shuffle_i32x4(p[0], p[1], 0x44), a23 = _mm512_shuffle_i32x4(p[2], p[3], 0x44);
  const __m512i b01 = _mm512_shuffle_i32x4(p[0], p[1], 0xEE), b23 = _mm512_shuffle_i32x4(p[2], p[3], 0xEE);
  auto* out = reinterpret_cast<__m512i*>(off);
  _mm512_storeu_si512(out + 0, _mm512_shuffle_i32x4(a01, a23, 0x88));
  _mm512_storeu_si512(out + 1, _mm512_shuffle_i32x4(a01, a23, 0xDD));
  _mm512_storeu_si512(out + 2, _mm512_shuffle_i32x4(b01, b23, 0x88));
  _mm512_storeu_si512(out + 3, _mm512_shuffle_i32x4(b01, b23, 0xDD));
}

// Sixteen groups of 32 at once: quantize_blocks_avx512's values (the same float32 steps on
// the same inputs), with the per-group reductions done across groups. Four groups at a time
// spent most of a group's ~45 cycles in horizontal reductions (one for the largest |x|, two
// for the half sums, each a chain of shuffles) and in scalar divisions; here those are 15
// vector steps and one vector division per 16 groups. The clamp comes before the rounding
// conversion (one instruction where round, clamp, convert took two): values past +-127
// clamp to 127 either way, and NaN stays NaN up to the conversion as before.
//
// Step one: the 16 groups' scales d (to e, which is d) and 1 / d (inverse_scale's, to id).
inline void scales16_avx512(const float* x, float* e, float* id) {
  __m512 amax[kQuantizeWide];
  for (int u = 0; u < kQuantizeWide; ++u)
    amax[u] = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + QK * u)), _mm512_abs_ps(_mm512_loadu_ps(x + QK * u + 16)));
  const __m512 maxv =
      _mm512_permutexvar_ps(reduce16_order(), reduce16(amax, [](__m512 p, __m512 q) { return _mm512_max_ps(p, q); }));
  const __m512 d = _mm512_div_ps(maxv, _mm512_set1_ps(127.f));
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), d);
  _mm512_storeu_ps(e, d);
  // 0 where 1 / d is not finite (d = 0, or d subnormal); NaN compares false, as isfinite
  _mm512_storeu_ps(id, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(inv), _mm512_set1_ps(INFINITY), _CMP_LT_OQ), inv));
}

// Step two: the codes, their half sums, and the rest of what store_block_sums stores, from e and id.
inline void codes16_avx512(const float* x, const float* id, int8_t* a, const float* e, float* s, HalfSums* off) {
  const __m512 lim = _mm512_set1_ps(127.f), nlim = _mm512_set1_ps(-127.f);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m512 half[2][kQuantizeWide];  // the codes' half sums' partials, as int32 bits in float vectors
  for (int u = 0; u < kQuantizeWide; ++u) {
    const __m512 vid = _mm512_set1_ps(id[u]);
    for (int h = 0; h < 2; ++h) {
      const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(x + QK * u + 16 * h), vid);
      const __m512i q = _mm512_cvt_roundps_epi32(_mm512_min_ps(lim, _mm512_max_ps(nlim, y)), kNearest);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a + QK * u + 16 * h), _mm512_cvtsepi32_epi8(q));
      half[h][u] = _mm512_castsi512_ps(q);
    }
  }
  const auto add = [](__m512 p, __m512 q) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_castps_si512(q)));
  };
  const __m512i order = reduce16_order();
  const __m512i h0 = _mm512_permutexvar_epi32(order, _mm512_castps_si512(reduce16(half[0], add)));
  const __m512i h1 = _mm512_permutexvar_epi32(order, _mm512_castps_si512(reduce16(half[1], add)));
  store_block_sums16(_mm512_loadu_ps(e), h0, h1, s, off);
}

// Up to kQuantizeRun runs of 16 groups: every run's scales, then every run's codes. Within
// one run the codes wait on its scales (two reductions and two divisions, ~100 cycles of
// latency); the scales of the next runs are independent work the core overlaps with that wait.
constexpr int64_t kQuantizeRun = 4;
void quantize_blocks16_avx512(const float* x, int64_t runs, int8_t* a, float* e, float* s, HalfSums* off) {
  alignas(64) float id[kQuantizeRun][kQuantizeWide];
  for (int64_t c = 0; c < runs; ++c) scales16_avx512(x + c * kQuantizeWide * QK, e + c * kQuantizeWide, id[c]);
  for (int64_t c = 0; c < runs; ++c)
    codes16_avx512(x + c * kQuantizeWide * QK, id[c], a + c * kQuantizeWide * QK, e + c * kQuantizeWide,
                   s + c * kQuantizeWide, off + c * kQuantizeWide);
}
#endif

// Rows [r0, r1) of x into q.
void quantize_row_range(const float* x, int64_t r0, int64_t r1, int64_t k, const QAct& q, bool simd) {
  const int64_t kb = k / QK;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t b0 = 0;
#ifdef TM_AVX2
#ifdef TM_VNNI512
    constexpr auto quantize_blocks = quantize_blocks_avx512;
#else
    constexpr auto quantize_blocks = quantize_blocks_avx2;
#endif
#ifdef TM_VNNI512
    if (simd)
      for (int64_t runs; (runs = std::min(kQuantizeRun, (kb - b0) / kQuantizeWide)) > 0; b0 += runs * kQuantizeWide)
        quantize_blocks16_avx512(x + r * k + b0 * QK, runs, q.a + r * k + b0 * QK, q.e + r * kb + b0,
                                 q.s + r * kb + b0, q.off + r * kb + b0);
#endif
    if (simd)
      for (; b0 + kQuantizeTogether <= kb; b0 += kQuantizeTogether)
        quantize_blocks(x + r * k + b0 * QK, q.a + r * k + b0 * QK, q.e + r * kb + b0, q.s + r * kb + b0,
                        q.off + r * kb + b0);
#endif
    for (int64_t b = b0; b < kb; ++b) {
      const float* src = x + r * k + b * QK;
      int8_t* a = q.a + r * k + b * QK;
#ifdef TM_AVX2
      if (simd) {
        quantize_block_avx2(src, a, q.e + r * kb + b, q.s + r * kb + b, q.off + r * kb + b);
        continue;
      }
#endif
      quantize_block_scalar(src, a, q.e + r * kb + b, q.s + r * kb + b, q.off + r * kb + b);
    }
  }
}

void quantize_rows(const float* x, int64_t m, int64_t k, const QAct& q, bool simd) {
  // ~15-30 ns per block: only big prefills are worth waking the other threads for.
  at::parallel_for(0, m, std::max<int64_t>(1, 4096 / (k / QK)),
                   [&](int64_t r0, int64_t r1) { quantize_row_range(x, r0, r1, k, q, simd); });
}

// ---------------------------------------------------------------------------------------
// One output row's share of a tile: its ncols (of NR) results, plus the bias if any.
// A full tile's row as a fixed count: GCC made the variable-count copy a call to memcpy for
// every 64 bytes (at one row, every tile of every linear).
inline void store_row(float* dst, const float* tile_out, const float* bias, int64_t ncols) {
  if (ncols == NR) {
    if (bias) for (int64_t j = 0; j < NR; ++j) dst[j] = tile_out[j] + bias[j];
    else for (int64_t j = 0; j < NR; ++j) dst[j] = tile_out[j];
    return;
  }
  if (bias) for (int64_t j = 0; j < ncols; ++j) dst[j] = tile_out[j] + bias[j];
  else for (int64_t j = 0; j < ncols; ++j) dst[j] = tile_out[j];
}

// Matmul kernels: one tile of 16 output rows against MR activation rows, all K.
// out[r][j] = result for activation row r and tile row j (before bias).

template <Mode M>  // Q4, Q4K, Q5 or Q5K: the same math on 4- or 5-bit codes
void q4_tile_scalar(const uint8_t* tile, int64_t kb, const QAct& q, int64_t k, int64_t m0, int64_t mr,
                    float (*out)[NR]) {
  for (int64_t r = 0; r < mr; ++r) {
    const int8_t* arow = q.a + (m0 + r) * k;
    const float* e = q.e + (m0 + r) * kb;
    const float* s = q.s + (m0 + r) * kb;
    for (int64_t j = 0; j < NR; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < kb; ++b) {
        const uint8_t* c = tile + codes_at(M, b);
        const uint16_t* sc = scales_of(tile, M, kb, b);
        const int8_t* a = arow + b * QK;
        int32_t isum = 0;
        if constexpr (is_five(M)) {
          for (int64_t i = 0; i < QK; ++i) isum += q5_code(c, j, i) * a[i];
        } else {
          for (int64_t i = 0; i < QK / 2; ++i)
            isum += (c[q4_byte(j, i)] & 15) * a[i] + (c[q4_byte(j, i + 16)] >> 4) * a[i + 16];
        }
        const float d = is_k_min(M) ? k_d(tile, M, kb, b, j) : half_to_float(sc[j]);
        const float mn = is_k_min(M) ? k_m(tile, M, kb, b, j) : half_to_float(sc[NR + j]);
        acc = std::fma(static_cast<float>(isum), d * e[b], acc);
        acc = std::fma(mn, s[b], acc);
      }
      out[r][j] = acc;
    }
  }
}

template <Mode M>  // Q8, or IQ4 and MXFP4: the same math on the table values of 4-bit indices
void q8_tile_scalar(const uint8_t* tile, int64_t kb, const QAct& q, int64_t k, int64_t m0, int64_t mr,
                    float (*out)[NR]) {
  for (int64_t r = 0; r < mr; ++r) {
    const int8_t* arow = q.a + (m0 + r) * k;
    const float* e = q.e + (m0 + r) * kb;
    for (int64_t j = 0; j < NR; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < kb; ++b) {
        const uint8_t* c = tile + codes_at(M, b);
        const int8_t* a = arow + b * QK;
        int32_t isum = 0;
        for (int64_t i = 0; i < QK; ++i) {
          const int w = is_lookup4(M) ? table_of(M)[q4_code(c, j, i)] : static_cast<int8_t>(c[q8_byte(j, i)]);
          isum += w * a[i];
        }
        acc = std::fma(static_cast<float>(isum), half_to_float(scales_of(tile, M, kb, b)[j]) * e[b], acc);
      }
      out[r][j] = acc;
    }
  }
}

// Q6 (and Q3, as Q6 on its codes + 28; IQ2 on T2 + 32; Q2 on its codes from zero, then each
// half's min times the activations' half sum): per half, the integer dot product plus the
// activations' offset, then as Q8 per half.
template <Mode M>
void q6_tile_scalar(const uint8_t* tile, int64_t kb, const QAct& q, int64_t k, int64_t m0, int64_t mr,
                    float (*out)[NR]) {
  for (int64_t r = 0; r < mr; ++r) {
    const int8_t* arow = q.a + (m0 + r) * k;
    const float* e = q.e + (m0 + r) * kb;
    const HalfSums* off = q.off + (m0 + r) * kb;
    for (int64_t j = 0; j < NR; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < kb; ++b) {
        const uint8_t* c = tile + codes_at(M, b);
        const uint16_t* sc = scales_of(tile, M, kb, b);
        const int8_t* a = arow + b * QK;
        int32_t isum[2] = {M == Mode::Q2 ? 0 : off[b].off[0], M == Mode::Q2 ? 0 : off[b].off[1]};
        for (int64_t i = 0; i < QK; ++i) isum[i >> 4] += six_bit_code<M>(c, j, i) * a[i];
        const float d0 = M == Mode::Q6K ? k6_d(tile, kb, b, 0, j) : half_to_float(sc[j]);
        const float d1 = M == Mode::Q6K ? k6_d(tile, kb, b, 1, j) : half_to_float(sc[NR + j]);
        const float t = std::fma(static_cast<float>(isum[0]), d0, static_cast<float>(isum[1]) * d1);
        acc = std::fma(t, e[b], acc);
        if constexpr (M == Mode::Q2) {  // each half's min times e x its activation sum
          acc = std::fma(half_to_float(sc[2 * NR + j]), off[b].hs[0], acc);
          acc = std::fma(half_to_float(sc[3 * NR + j]), off[b].hs[1], acc);
        }
      }
      out[r][j] = acc;
    }
  }
}

#ifdef TM_AVX2
// Every multiply-add needs one k-group of an activation row (4 bytes) in all 8 dwords: a
// dword broadcast straight from memory, which the load unit does at no ALU cost, so the
// tiles read the compact int8 rows, which stay in L1. (The AVX2 path without VNNI used to
// expand the rows x8 first, each k-group a whole vector, ~15% faster on Zen 1's one 256-bit
// multiply port. On Zen 3 (AMD family 25 model 1) it took 1.0-1.2x the time at K = 2048
// and 1.8-2.6x at K = 8192, kernel_ab one thread: the expanded rows spill to L2, and at long
// K a chunk of them held so few rows that the weights were streamed again for each chunk.
// On Zen 5 the VNNI path measured the same, 1.3-1.5x at 16 rows.)
struct ActRows {
  const int8_t* a;  // register-tile row r at a + r * k
  int64_t k;
  // the rows from activation row m0 on
  static ActRows at(const QAct& q, int64_t m0, int64_t k) { return {q.a + m0 * k, k}; }
  const int8_t* block(int r, int64_t b) const { return a + r * k + b * QK; }
  __m256i get(int r, int64_t b, int g) const {
    int32_t v;
    std::memcpy(&v, block(r, b) + 4 * g, 4);
    return _mm256_set1_epi32(v);
  }
};

// The block dots below are forced inline (TM_LAYOUT): GCC kept q4's (and Q6's, Q3's and
// IQ2's) out of line in the AVX2 tiles, a call a block and row with the unpacked weights
// passed through the stack; inlined, q4 took 0.74-0.87x the time (Zen 3, kernel_ab).
#if defined(TM_VNNI)
// Q4: row r's dot product of one block in dword r. dpbusd sums u8 x s8 in fours, exactly,
// so the order of the sums does not matter: two chains halve the dependent latency.
TM_LAYOUT __m256i q4_block_dots(const __m256i* lo, const __m256i* hi, const ActRows& act, int r, int64_t b) {
  __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
  for (int p = 0; p < 4; ++p) {
    s0 = TM_DPBUSD(s0, lo[p], act.get(r, b, p));
    s1 = TM_DPBUSD(s1, hi[p], act.get(r, b, 4 + p));
  }
  return _mm256_add_epi32(s0, s1);
}

// Q5: as Q4 (dpbusd's sums are exact whatever the codes' width).
TM_LAYOUT __m256i q5_block_dots(const __m256i* lo, const __m256i* hi, const ActRows& act, int r, int64_t b) {
  return q4_block_dots(lo, hi, act, r, b);
}

// Q6: row r's dot products of the block's two halves (codes u, 0..63), each started from
// the activations' offset for that half (IQ2, M: twice it, for its values + 64).
template <Mode M>
TM_LAYOUT void q6_block_dots(const __m256i* u, const ActRows& act, int r, int64_t b, const HalfSums* off, __m256i* dots) {
  for (int h = 0; h < 2; ++h) {
    __m256i s = _mm256_set1_epi32(offset_scale<M>() * off->off[h]);
    for (int g = 4 * h; g < 4 * h + 4; ++g) s = TM_DPBUSD(s, u[g], act.get(r, b, g));
    dots[h] = s;
  }
}
#else
// Q4: row r's dot product of one block in dword r. The int16 lanes of maddubs can be summed
// over the whole block before one widening madd: each is at most 2 * 15 * 127 = 3810, eight
// of them 30480 < 32768. That is 9 multiplies per 8 rows x 32 weights, and multiplies are
// what limits AVX2 cores with one 256-bit multiply port.
TM_LAYOUT __m256i q4_block_dots(const __m256i* lo, const __m256i* hi, const ActRows& act, int r, int64_t b) {
  __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo[0], act.get(r, b, 0)),
                               _mm256_maddubs_epi16(hi[0], act.get(r, b, 4)));
  for (int p = 1; p < 4; ++p) {
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[p], act.get(r, b, p)));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[p], act.get(r, b, 4 + p)));
  }
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

// Q5: as Q4, but a maddubs lane reaches 2 * 31 * 127 = 7874, so four (not eight) sum in
// int16 before each widening madd.
TM_LAYOUT __m256i q5_block_dots(const __m256i* lo, const __m256i* hi, const ActRows& act, int r, int64_t b) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i s32 = _mm256_setzero_si256();
  for (int p = 0; p < 4; p += 2) {
    const __m256i s = _mm256_add_epi16(
        _mm256_add_epi16(_mm256_maddubs_epi16(lo[p], act.get(r, b, p)), _mm256_maddubs_epi16(hi[p], act.get(r, b, 4 + p))),
        _mm256_add_epi16(_mm256_maddubs_epi16(lo[p + 1], act.get(r, b, p + 1)),
                         _mm256_maddubs_epi16(hi[p + 1], act.get(r, b, 5 + p))));
    s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(s, ones));
  }
  return s32;
}

// Q6: as above; a maddubs lane is at most 2 * 63 * 127 = 16002, so two sum in int16. IQ2's
// (values + 64) reach 27178: each is widened at once.
template <Mode M>
TM_LAYOUT void q6_block_dots(const __m256i* u, const ActRows& act, int r, int64_t b, const HalfSums* off, __m256i* dots) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    __m256i s = _mm256_set1_epi32(offset_scale<M>() * off->off[h]);
    if constexpr (M == Mode::IQ2) {
      for (int g = 4 * h; g < 4 * h + 4; ++g)
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(u[g], act.get(r, b, g)), ones));
      dots[h] = s;
      continue;
    }
    for (int g = 4 * h; g < 4 * h + 4; g += 2) {
      const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u[g], act.get(r, b, g)),
                                         _mm256_maddubs_epi16(u[g + 1], act.get(r, b, g + 1)));
      s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
    }
    dots[h] = s;
  }
}
#endif

// Q8, IQ4, MXFP4: row r's int32 sum s plus one k-group's products, a against the weights w (u8 x s8
// only, so |w| against a carrying w's sign; codes are never -128). q8_tile_avx2 goes group
// by group, every row's sum taking a group before the next is unpacked, so that two groups'
// weights are live beside the MR rows' sums: with the whole block unpacked first, w and |w|
// (16 vectors) filled the 16 AVX2 registers and went through the stack for every row (Zen 3,
// kernel_ab at 16-64 rows: q8 0.79-1.08x the time, medians 0.85-0.97x; iq4 0.78-1.06x).
// Q4's and Q5's blocks (8 vectors, 4 with Q5's top bits folded in) stay unpacked whole:
// group by group took 1.0x and 1.3-1.5x the time.
#if defined(TM_VNNI)
TM_LAYOUT __m256i q8_group(__m256i s, __m256i w, __m256i wabs, __m256i a) {
  return TM_DPBUSD(s, wabs, _mm256_sign_epi8(a, w));
}
#else
// A maddubs lane reaches 2 * 127 * 127, so each is widened at once.
TM_LAYOUT __m256i q8_group(__m256i s, __m256i w, __m256i wabs, __m256i a) {
  return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(a, w)), _mm256_set1_epi16(1)));
}
#endif

// Q5's top bit of k-group g (0..7), moved to bit 4 of each byte (masked by the caller).
inline __m256i q5_top256(__m256i v, int g) {
  switch (g) {
    case 0: return _mm256_slli_epi16(v, 4);
    case 1: return _mm256_slli_epi16(v, 3);
    case 2: return _mm256_slli_epi16(v, 2);
    case 3: return _mm256_slli_epi16(v, 1);
    case 4: return v;
    case 5: return _mm256_srli_epi16(v, 1);
    case 6: return _mm256_srli_epi16(v, 2);
    default: return _mm256_srli_epi16(v, 3);
  }
}

// Q6's top 2 bits of k-group t (0..3) of a top-bits vector, moved to bits 4..5 of each byte
// (16-bit shifts: what crosses a byte lands outside 4..5 and is masked off by the caller).
inline __m256i q6_top256(__m256i v, int t) {
  return t == 0 ? _mm256_slli_epi16(v, 4) : t == 1 ? _mm256_slli_epi16(v, 2) : t == 2 ? v : _mm256_srli_epi16(v, 2);
}

// Software prefetch. Each block asks for one block's share of the stream (half a pair,
// see codes_at) PREFETCH_FAR_BYTES ahead into L2 and PREFETCH_BLOCKS blocks ahead into L1:
// the tile is one sequential stream, so block b's share starts at b * pair_bytes / 2, and
// past the tile's end it is the next tile's. Spread evenly, one block's lines per block: on
// Zen 4 asking for a whole pair at once every other block ran batched decode (16 rows)
// 1.2-1.9x slower on weights from memory, and no prefetch at all 1.1-1.6x slower. With one
// activation row the prefetches overlap reading with computing (Zen 1: -15..35%).
// 24 KB ahead, not 6: at 16 rows a block is ~16x the work of one row's, yet 6 KB ahead left
// the weights' reads exposed (Zen 4, 2 threads, weights from memory: Gemma 3's q8 head at
// 16 rows 10.35 against 13.25 ms, its layers' shapes 0.91-0.98x the time; 1 and 64 rows
// level). Two tiles' 24 KB in flight a thread is a small part of any L2 here (Zen 1: 512 KB).
constexpr int64_t PREFETCH_BLOCKS = 4;
constexpr int64_t PREFETCH_FAR_BYTES = 24 << 10;
inline void prefetch_l1(const void* p, int lines) {
  for (int i = 0; i < lines; ++i) _mm_prefetch(static_cast<const char*>(p) + 64 * i, _MM_HINT_T0);
}
inline void prefetch_l2(const void* p, int lines) {
  for (int i = 0; i < lines; ++i) _mm_prefetch(static_cast<const char*>(p) + 64 * i, _MM_HINT_T1);
}
template <Mode M>
inline void prefetch_ahead(const uint8_t* tile, int64_t b) {
  // 320 (Q4, IQ2), 384 (Q5), 448 (Q6), 544 (Q8), 288 (IQ4, MXFP4), 256 (Q3, Q2); with their headers
  // 296 (Q4K), 360 (Q5K), 420 (Q6K)
  constexpr int64_t share = is_super(M) ? super_bytes(M, K_SUPER) / K_SUPER : pair_bytes(M) / 2;
  constexpr int lines = static_cast<int>((share + 63) / 64);
  const uint8_t* at = tile + b * share;
  prefetch_l2(at + PREFETCH_FAR_BYTES, lines);
  prefetch_l1(at + PREFETCH_BLOCKS * share, lines);
}

// The 256-bit tiles: half h of a tile (its output rows 8h..8h+7) against MR activation
// rows: act = the rows' int8 codes, e and s = their block scales (row r at e + r * kb). A
// 64-byte k-group vector of the tile holds rows 0..7 in its low 32 bytes and rows 8..15 in
// its high 32. HALVES = 2 takes halves h0 and h0 + 1 block by block in one pass, so that
// every line of the stream is used whole when it arrives (see ONE_PASS_ROWS); 1 runs half h0
// over all the blocks. Each block's step is a function of its own (q4_block_avx2, ...), and
// each half's sums an array of its own: with one [HALVES][MR] array, GCC kept the sums of the
// one-half tiles in memory (Q6 at 16-64 rows 1.07-1.12x the time, Zen 3, kernel_ab --cold).
//
// Q4's and Q8's tiles stay out of line (TM_TILE): inlined into run_parts as GCC chose, Q5 at
// 16-64 rows took 1.22-1.37x the time and Q6 (left to GCC, inlined) 1.1-1.4x once Q8's
// tiles were inlined beside it. Out of line, Q6's own tiles took 1.05-1.16x; forced inline,
// 1.1-1.5x. So: Q4's and Q8's out of line, Q6's as GCC inlines them. The three tiles' loops
// are written out each: one template driving a lambda step put Q6_K at 16 rows at 1.16x.
#define TM_TILE __attribute__((noinline))

// One block of half h of a tile against MR activation rows, into acc (q4_tile_avx2's step).
// Q5 (M): the same with each code's top bit from the block's top-bit vector.
template <Mode M, int MR>
TM_LAYOUT void q4_block_avx2(const uint8_t* tile, int64_t kb, int64_t b, int h, const ActRows& act, const float* e,
                             const float* s, __m256 (&acc)[MR]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
  const uint8_t* c = tile + codes_at(M, b);
  __m256i lo[4], hi[4];  // unpacked once for all MR activation rows
  for (int p = 0; p < 4; ++p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * p + 32 * h));
    lo[p] = _mm256_and_si256(x, low4);
    hi[p] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
  }
  if constexpr (is_five(M)) {
    const __m256i top = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + Q4_CODE_BYTES + 32 * h));
    for (int p = 0; p < 4; ++p) {
      lo[p] = _mm256_or_si256(lo[p], _mm256_and_si256(q5_top256(top, p), bit4));
      hi[p] = _mm256_or_si256(hi[p], _mm256_and_si256(q5_top256(top, p + 4), bit4));
    }
  }
  __m256 d, mn;
  if constexpr (is_k_min(M)) {  // D * sc and Dm * mn (k_d, k_m)
    const uint16_t* hdr = k_header(tile, M, b) + NH * h;
    const uint8_t* sm = tile + scales_at(M, kb, b) + NH * h;
    d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hdr))),
                      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm)))));
    mn = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hdr + NR))),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + NR)))));
  } else {
    const uint16_t* sc = scales_of(tile, M, kb, b) + NH * h;
    d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
    mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + NR)));
  }
  for (int r = 0; r < MR; ++r) {
    const __m256i dots = is_five(M) ? q5_block_dots(lo, hi, act, r, b) : q4_block_dots(lo, hi, act, r, b);
    const __m256 isum = _mm256_cvtepi32_ps(dots);
    acc[r] = _mm256_fmadd_ps(isum, _mm256_mul_ps(d, _mm256_set1_ps(e[r * kb + b])), acc[r]);
    acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(s[r * kb + b]), acc[r]);
  }
}

template <Mode M, int MR, int HALVES = 1>
TM_TILE void q4_tile_avx2(const uint8_t* tile, int64_t kb, int h0, const ActRows& act, const float* e, const float* s,
                          float (*out)[NR]) {
  __m256 acc[MR], acc1[MR];  // halves h0 and h0 + 1
  for (int r = 0; r < MR; ++r) acc[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    prefetch_ahead<M>(tile, b);
    q4_block_avx2<M, MR>(tile, kb, b, h0, act, e, s, acc);
    if constexpr (HALVES == 2) q4_block_avx2<M, MR>(tile, kb, b, h0 + 1, act, e, s, acc1);
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out[r] + NH * h0, acc[r]);
  if constexpr (HALVES == 2)
    for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out[r] + NH * (h0 + 1), acc1[r]);
}

// One block of half h of a tile against MR activation rows, into acc (q8_tile_avx2's step).
// Q8 (M), or IQ4 and MXFP4: its k-group vectors made from the nibbles (k-groups p and p + 4 of
// vector p, as Q4's) by a 16-entry byte lookup of the table's values, then the same math.
template <Mode M, int MR>
TM_LAYOUT void q8_block_avx2(const uint8_t* tile, int64_t kb, int64_t b, int h, const ActRows& act, const float* e,
                             __m256 (&acc)[MR]) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table_of(M))));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const uint8_t* c = tile + codes_at(M, b) + 32 * h;
  __m256i sum[MR];  // row r's int32 sums
  for (int r = 0; r < MR; ++r) sum[r] = _mm256_setzero_si256();
  for (int p = 0; p < 4; ++p) {  // k-groups p and p + 4 (IQ4, MXFP4: one vector's two nibbles)
    __m256i w0, w1;
    if constexpr (is_lookup4(M)) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * p));
      w0 = _mm256_shuffle_epi8(table, _mm256_and_si256(x, low4));
      w1 = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), low4));
    } else {
      w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * p));
      w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * (p + 4)));
    }
    const __m256i abs0 = _mm256_abs_epi8(w0), abs1 = _mm256_abs_epi8(w1);
    for (int r = 0; r < MR; ++r)
      sum[r] = q8_group(q8_group(sum[r], w0, abs0, act.get(r, b, p)), w1, abs1, act.get(r, b, p + 4));
  }
  const __m256 d =
      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales_of(tile, M, kb, b) + NH * h)));
  for (int r = 0; r < MR; ++r) {
    const __m256 isum = _mm256_cvtepi32_ps(sum[r]);
    acc[r] = _mm256_fmadd_ps(isum, _mm256_mul_ps(d, _mm256_set1_ps(e[r * kb + b])), acc[r]);
  }
}

template <Mode M, int MR, int HALVES = 1>
TM_TILE void q8_tile_avx2(const uint8_t* tile, int64_t kb, int h0, const ActRows& act, const float* e, const float*,
                          float (*out)[NR]) {
  __m256 acc[MR], acc1[MR];  // halves h0 and h0 + 1
  for (int r = 0; r < MR; ++r) acc[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    prefetch_ahead<M>(tile, b);
    q8_block_avx2<M, MR>(tile, kb, b, h0, act, e, acc);
    if constexpr (HALVES == 2) q8_block_avx2<M, MR>(tile, kb, b, h0 + 1, act, e, acc1);
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out[r] + NH * h0, acc[r]);
  if constexpr (HALVES == 2)
    for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out[r] + NH * (h0 + 1), acc1[r]);
}

// Q3's top bit of k-group g (0..7), moved to bit 2 of each byte (masked by the caller;
// 16-bit shifts, what crosses a byte lands outside bit 2).
inline __m256i q3_top256(__m256i v, int g) {
  return g < 2 ? _mm256_slli_epi16(v, 2 - g) : g == 2 ? v : _mm256_srli_epi16(v, g - 2);
}

// off: the rows' half sums (row r, block b at off + r * kb + b). M: Q6, Q3 run as
// Q6 on its codes + 28, IQ2 on its values + 64 looked up from its nibbles, or Q2 on its
// codes (from zero) plus its mins.
// One block of half h of a tile against MR activation rows, into acc (q6_tile_avx2's step).
template <Mode M, int MR>
TM_LAYOUT void q6_block_avx2(const uint8_t* tile, int64_t kb, int64_t b, int h, const ActRows& act, const float* e,
                             const HalfSums* off, __m256 (&acc)[MR]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30);
  const __m256i low2 = _mm256_set1_epi8(0x03), bit2 = _mm256_set1_epi8(0x04), q3_offset = _mm256_set1_epi8(28);
  const uint8_t* c = tile + codes_at(M, b) + 32 * h;
  __m256i u[8];  // the (Q6) codes of k-groups 0..7, unpacked once for all MR activation rows
  if constexpr (M == Mode::Q2) {
    for (int g = 0; g < 8; ++g) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * (g >> 2)));
      u[g] = _mm256_and_si256(_mm256_srli_epi16(x, 2 * (g & 3)), low2);
    }
  } else if constexpr (M == Mode::IQ2) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kIQ2Shifted.v)));
    for (int p = 0; p < 4; ++p) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * p));
      u[p] = _mm256_shuffle_epi8(table, _mm256_and_si256(x, low4));
      u[p + 4] = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), low4));
    }
  } else if constexpr (M == Mode::Q3) {
    const __m256i top = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + Q3_LOW_BYTES));
    for (int g = 0; g < 8; ++g) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * (g >> 2)));
      const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(x, 2 * (g & 3)), low2);
      u[g] = _mm256_add_epi8(_mm256_or_si256(lo, _mm256_and_si256(q3_top256(top, g), bit2)), q3_offset);
    }
  } else {
    const __m256i top[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + Q6_LOW_BYTES)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + Q6_LOW_BYTES + 64))};
    for (int p = 0; p < 4; ++p) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * p));
      u[p] = _mm256_or_si256(_mm256_and_si256(x, low4), _mm256_and_si256(q6_top256(top[0], p), top2));
      u[p + 4] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4), low4),
                                 _mm256_and_si256(q6_top256(top[1], p), top2));
    }
  }
  const uint16_t* sc = scales_of(tile, M, kb, b) + NH * h;
  __m256 d0, d1;
  if constexpr (M == Mode::Q6K) {  // D * sc0 and D * sc1 (k6_d)
    const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k_header(tile, M, b) + NH * h)));
    const uint8_t* sm = tile + scales_at(M, kb, b) + NH * h;
    d0 = _mm256_mul_ps(dd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm)))));
    d1 = _mm256_mul_ps(dd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + NR)))));
  } else {
    d0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
    d1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + NR)));
  }
  __m256 m0 = _mm256_setzero_ps(), m1 = m0;  // Q2's mins
  if constexpr (M == Mode::Q2) {
    m0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 2 * NR)));
    m1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 3 * NR)));
  }
  for (int r = 0; r < MR; ++r) {
    __m256i dots[2];
    const HalfSums* ro = off + r * kb + b;
    q6_block_dots<M>(u, act, r, b, ro, dots);
    const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[0]), d0, _mm256_mul_ps(_mm256_cvtepi32_ps(dots[1]), d1));
    const float er = e[r * kb + b];
    acc[r] = _mm256_fmadd_ps(t, _mm256_set1_ps(er), acc[r]);
    if constexpr (M == Mode::Q2) {
      acc[r] = _mm256_fmadd_ps(m0, _mm256_set1_ps(ro->hs[0]), acc[r]);
      acc[r] = _mm256_fmadd_ps(m1, _mm256_set1_ps(ro->hs[1]), acc[r]);
    }
  }
}

template <Mode M, int MR, int HALVES = 1>
void q6_tile_avx2(const uint8_t* tile, int64_t kb, int h0, const ActRows& act, const float* e, const HalfSums* off,
                  float (*out)[NR]) {
  __m256 acc[MR], acc1[MR];  // halves h0 and h0 + 1
  for (int r = 0; r < MR; ++r) acc[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    prefetch_ahead<M>(tile, b);
    q6_block_avx2<M, MR>(tile, kb, b, h0, act, e, off, acc);
    if constexpr (HALVES == 2) q6_block_avx2<M, MR>(tile, kb, b, h0 + 1, act, e, off, acc1);
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out[r] + NH * h0, acc[r]);
  if constexpr (HALVES == 2)
    for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out[r] + NH * (h0 + 1), acc1[r]);
}

#ifdef TM_VNNI512
// The 512-bit path takes a whole tile per vector: every k-group vector is one load, and each
// activation k-group one dword broadcast to all 16 lanes (a load-unit broadcast, no ALU
// work). Per output lane the float32 steps are those of the 256-bit and scalar paths, so
// the bits are.
//
// pin: keeps a loaded vector in its register. Without it GCC folds the load into every
// dpbusd that uses the vector (a memory operand is free in its cost model), so each
// weight vector was read from L1 once per activation row: 512-bit loads, not the
// multiply-adds, then bound batched decode (~1.9 cycles a dpbusd at 16 rows on Zen 4).
inline void pin(__m512i& v) { asm volatile("" : "+v"(v)); }

inline __m512i bcast512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// 16 half scales (one per row of a tile) widened to float32.
inline __m512 halves16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }  // 16 bytes

// R consecutive activation rows of a block-major pass at one block: row i's codes at
// a + i * k, its block scale e[i * kb], scale * sum s[i * kb] (Q4, Q5), half sums off + i * kb.
// The tile-pair loop takes two rows at a time: their multiply-adds interleaved in program
// order (a row's four dependency chains of 4 dpbusd, 20 cycles, then its float steps)
// keep the scheduler fed where one row after the other filled it with waiting operations
// (a microbenchmark on the Xeon: 2.4-2.5 against 1.9-2.0 dpbusd per ns at 16-64 rows).
struct RowsAt {
  const int8_t* a;
  const float *e, *s;
  const HalfSums* off;
  int64_t k, kb;
  const int8_t* codes(int i) const { return a + i * k; }
  float scale(int i) const { return e[i * kb]; }
  float sum(int i) const { return s[i * kb]; }
  const HalfSums* offsets(int i) const { return off + i * kb; }
  void step(int n) { a += n * k, e += n * kb, s += n * kb, off += n * kb; }
  void next_block() { a += QK, ++e, ++s, ++off; }  // the same rows' next block (panel_rows)
};

// One tile-block's weights in registers, and one activation row's share of it. Both
// 512-bit orders below (row groups, block-major) are these helpers in different loops, so
// per output they run the same float32 steps: acc = fma(isum, d * e, acc) [+ fma(m, s, acc)].
struct Q4Block {
  __m512i lo[4], hi[4];  // the low and high nibble planes, unpacked once for all rows
  __m512 d, mn;
  Q4Block() = default;  // for Q5Block and the super-block forms, which fill these themselves
  // Pin: as Q8Block's; nothing to do here (the AND/shift results live in registers anyway).
  template <bool Pin>
  Q4Block(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin>) {
    const uint16_t* sc = scales_of(tile, Mode::Q4, kb, b);
    d = halves16(sc);
    mn = halves16(sc + NR);
    unpack(tile + codes_at(Mode::Q4, b));
  }
  void unpack(const uint8_t* c) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < 4; ++p) {
      const __m512i x = _mm512_loadu_si512(c + 64 * p);
      lo[p] = _mm512_and_si512(x, low4);
      hi[p] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low4);
    }
  }
  // Q4K's and Q5K's d = D * sc and mn = Dm * mn (k_d, k_m): the super-block's halves times
  // the block's 6-bit integers.
  void k_scales(const uint8_t* tile, Mode m, int64_t kb, int64_t b) {
    const uint16_t* hdr = k_header(tile, m, b);
    const uint8_t* sm = tile + scales_at(m, kb, b);
    d = _mm512_mul_ps(halves16(hdr), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load16(sm))));
    mn = _mm512_mul_ps(halves16(hdr + NR), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load16(sm + NR))));
  }
  // ar: the row's 32 int8 codes of this block; e, s: its block scale and scale * sum.
  __m512 row(const int8_t* ar, float e, float s, const HalfSums*, __m512 acc) const {
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    for (int p = 0; p < 4; ++p) {
      s0 = _mm512_dpbusd_epi32(s0, lo[p], bcast512(ar + 4 * p));
      s1 = _mm512_dpbusd_epi32(s1, hi[p], bcast512(ar + 16 + 4 * p));
    }
    return finish(s0, s1, e, s, acc);
  }
  // Two tiles' blocks x and y against R rows: each activation broadcast feeds both tiles.
  // The panel's four rows put both nibble planes into one sum per row and tile (integer
  // sums: the same value as two sums added), which saves a zeroing and an add each on the
  // ports the multiply-adds use (Ice Lake, one thread, 2048- and 8192-row layers: q5k
  // 1.05-1.08x the speed at 64 rows, q4k 1.00-1.02x); eight chains of eight are enough in
  // flight. Q4's and Q4K's block-major one and two rows keep a sum per plane: four chains
  // of eight left the multiply-adds waiting on each other (Zen 4, one thread, kernel_ab:
  // 0.95-0.97x the time at 8-16 rows). Q5's and Q5K's keep one (level on Zen 4, and one
  // sum ran q5k at 16 rows 1.00-1.07x the speed on Ice Lake): kPlaneSums.
  static constexpr bool kPlaneSums = true;
  template <int R, typename Block>
  static void rows2(const Block& x, const Block& y, const RowsAt& at, __m512* acc_x, __m512* acc_y) {
    constexpr int C = R >= 4 || !Block::kPlaneSums ? 1 : 2;  // sums a row and tile: the planes' own, or one for both
    __m512i xs[R][C], ys[R][C];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) xs[i][c] = ys[i][c] = _mm512_setzero_si512();
    for (int p = 0; p < 4; ++p)
      for (int i = 0; i < R; ++i) {
        const __m512i lo = bcast512(at.codes(i) + 4 * p), hi = bcast512(at.codes(i) + 16 + 4 * p);
        xs[i][0] = _mm512_dpbusd_epi32(xs[i][0], x.lo[p], lo);
        ys[i][0] = _mm512_dpbusd_epi32(ys[i][0], y.lo[p], lo);
        xs[i][C - 1] = _mm512_dpbusd_epi32(xs[i][C - 1], x.hi[p], hi);
        ys[i][C - 1] = _mm512_dpbusd_epi32(ys[i][C - 1], y.hi[p], hi);
      }
    for (int i = 0; i < R; ++i) {
      if constexpr (C == 1) {
        acc_x[i] = x.finish1(xs[i][0], at.scale(i), at.sum(i), acc_x[i]);
        acc_y[i] = y.finish1(ys[i][0], at.scale(i), at.sum(i), acc_y[i]);
      } else {
        acc_x[i] = x.finish(xs[i][0], xs[i][1], at.scale(i), at.sum(i), acc_x[i]);
        acc_y[i] = y.finish(ys[i][0], ys[i][1], at.scale(i), at.sum(i), acc_y[i]);
      }
    }
  }
  // finish's steps on one sum of both planes (rows2's)
  __m512 finish1(__m512i s01, float e, float s, __m512 acc) const {
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s01), _mm512_mul_ps(d, _mm512_set1_ps(e)), acc);
    return _mm512_fmadd_ps(mn, _mm512_set1_ps(s), acc);
  }
  __m512 finish(__m512i s0, __m512i s1, float e, float s, __m512 acc) const {
    return finish1(_mm512_add_epi32(s0, s1), e, s, acc);
  }
};

// Q4K: Q4's row with the super-block form's scales.
struct Q4KBlock : Q4Block {
  template <bool Pin>
  Q4KBlock(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin>) {
    k_scales(tile, Mode::Q4K, kb, b);
    unpack(tile + codes_at(Mode::Q4K, b));
  }
};

// Q5: Q4's row on 5-bit codes: the nibble planes with each code's top bit ORed in.
struct Q5Block : Q4Block {
  static constexpr bool kPlaneSums = false;  // see Q4Block::rows2
  Q5Block() = default;  // for Q5KBlock
  template <bool Pin>
  Q5Block(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin> pin) {
    const uint16_t* sc = scales_of(tile, Mode::Q5, kb, b);
    d = halves16(sc);
    mn = halves16(sc + NR);
    unpack5(tile + codes_at(Mode::Q5, b), pin);
  }
  template <bool Pin>
  void unpack5(const uint8_t* c, std::bool_constant<Pin>) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
    const __m512i top = _mm512_loadu_si512(c + Q4_CODE_BYTES);
    for (int p = 0; p < 4; ++p) {
      const __m512i x = _mm512_loadu_si512(c + 64 * p);
      // 0xF8: a | (b & c)
      lo[p] = _mm512_ternarylogic_epi32(_mm512_and_si512(x, low4), top_bit(top, p), bit4, 0xF8);
      hi[p] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(x, 4), low4), top_bit(top, p + 4), bit4, 0xF8);
      if constexpr (Pin) pin(lo[p]), pin(hi[p]);
    }
  }
  static __m512i top_bit(__m512i v, int g) {  // q5_top256's 512-bit twin
    switch (g) {
      case 0: return _mm512_slli_epi16(v, 4);
      case 1: return _mm512_slli_epi16(v, 3);
      case 2: return _mm512_slli_epi16(v, 2);
      case 3: return _mm512_slli_epi16(v, 1);
      case 4: return v;
      case 5: return _mm512_srli_epi16(v, 1);
      case 6: return _mm512_srli_epi16(v, 2);
      default: return _mm512_srli_epi16(v, 3);
    }
  }
};

// Q5K: Q5's row with the super-block form's scales.
struct Q5KBlock : Q5Block {
  template <bool Pin>
  Q5KBlock(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin> pin) {
    k_scales(tile, Mode::Q5K, kb, b);
    unpack5(tile + codes_at(Mode::Q5K, b), pin);
  }
};

// Q8: dpbusd multiplies u8 by s8, and both weights and activations are signed. The
// activations arrive here offset to u8 (a + 128: their sign bit flipped once per call in
// qlinear), so each multiply-add takes the weights as they are, and the offset's share,
// 128 * sum(w) per row, is one more dpbusd per k-group shared by all rows:
//   sum (a + 128) w - 128 sum w = sum a w, exactly in int32.
// Per 64 multiply-adds that is one instruction instead of two (abs/sign-mask negation),
// so batched decode and prefill through Q8 weights (a large vocabulary's head) run ~1.5-2x
// fewer instructions, with the same integer sums and so the same bits as before.
struct Q8Block {
  __m512i w[8];
  // -128 * sum(w) per output row, where every row's sum starts: the offset's share comes off
  // in the multiply-adds' own chain, not by a subtraction per row and block (integers: the
  // same sums, so the same bits).
  __m512i start;
  __m512 d;
  // Pin: keep w in registers (block-major: 2-32 rows use each); with the row groups' 1-4
  // rows, letting GCC fold the loads measured 7-15% faster at 64 rows.
  template <bool Pin>
  Q8Block(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin>) {
    // The scales first: in the second block of a pair they start a cache line of their own.
    d = halves16(scales_of(tile, Mode::Q8, kb, b));
    const uint8_t* c = tile + codes_at(Mode::Q8, b);
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));  // 128 as u8
    __m512i shift[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int g = 0; g < 8; ++g) {
      w[g] = _mm512_loadu_si512(c + 64 * g);
      if constexpr (Pin) pin(w[g]);
      shift[g & 1] = _mm512_dpbusd_epi32(shift[g & 1], offset, w[g]);
    }
    start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_add_epi32(shift[0], shift[1]));
  }
  // ar: the row's 32 codes of this block as u8 (a + 128); e: its block scale.
  __m512 row(const int8_t* ar, float e, float, const HalfSums*, __m512 acc) const {
    __m512i sm[2] = {start, _mm512_setzero_si512()};
    for (int g = 0; g < 8; ++g) sm[g & 1] = _mm512_dpbusd_epi32(sm[g & 1], bcast512(ar + 4 * g), w[g]);
    return finish(sm[0], sm[1], e, acc);
  }
  // Two tiles' blocks x and y against R rows: each activation broadcast feeds both tiles.
  // Block-major's one and two rows (the weights pinned in registers) keep two sums a row and
  // tile, for shorter dependency chains. The panel's four rows (the weights in its buffer)
  // keep one (R x 2 chains of 8, enough in flight), and load each weight vector into a
  // register once for the R rows: with two sums, they and the eight weight vectors of each
  // tile did not fit the 32 registers beside four rows' float sums, GCC spilled them, and
  // the panel ran at 2.5-3x block-major's time. One sum is the same integer as two added,
  // so the float steps after it, and the bits, are the same either way.
  template <int R>
  static void rows2(const Q8Block& x, const Q8Block& y, const RowsAt& at, __m512* acc_x, __m512* acc_y) {
    constexpr int C = R >= 4 ? 1 : 2;  // sums a row and tile
    __m512i xs[R][C], ys[R][C];
    for (int i = 0; i < R; ++i) {
      xs[i][0] = x.start, ys[i][0] = y.start;
      for (int c = 1; c < C; ++c) xs[i][c] = ys[i][c] = _mm512_setzero_si512();
    }
    for (int g = 0; g < 8; ++g) {
      __m512i wx = x.w[g], wy = y.w[g];
      if constexpr (C == 1) pin(wx), pin(wy);
      for (int i = 0; i < R; ++i) {
        const __m512i a = bcast512(at.codes(i) + 4 * g);
        xs[i][g % C] = _mm512_dpbusd_epi32(xs[i][g % C], a, wx);
        ys[i][g % C] = _mm512_dpbusd_epi32(ys[i][g % C], a, wy);
      }
    }
    for (int i = 0; i < R; ++i) {
      if constexpr (C == 1) {
        acc_x[i] = x.finish1(xs[i][0], at.scale(i), acc_x[i]);
        acc_y[i] = y.finish1(ys[i][0], at.scale(i), acc_y[i]);
      } else {
        acc_x[i] = x.finish(xs[i][0], xs[i][1], at.scale(i), acc_x[i]);
        acc_y[i] = y.finish(ys[i][0], ys[i][1], at.scale(i), acc_y[i]);
      }
    }
  }
  // finish's steps on one sum of both halves (rows2 at four rows)
  __m512 finish1(__m512i s01, float e, __m512 acc) const {
    const __m512 isum = _mm512_cvtepi32_ps(s01);
    return _mm512_fmadd_ps(isum, _mm512_mul_ps(d, _mm512_set1_ps(e)), acc);
  }
  __m512 finish(__m512i s0, __m512i s1, float e, __m512 acc) const {
    return finish1(_mm512_add_epi32(s0, s1), e, acc);
  }
};

// The rows of a block held as u8 codes of k-groups 0..7 whose two sums per row (one per half
// of the block, k-groups 0..3 and 4..7) start from the activations' offset for that half
// (-32 x its sum) times Scale: Q6Block (codes standing for code - 32: Scale 1), IQ2Block
// (values + 64: Scale 2), Lookup4Block (IQ4's and MXFP4's table values + 128: Scale 4) and Q2Block (its own
// codes: Scale 0). Block supplies finish(s0, s1, e, half sums, acc).
template <typename Block, int Scale>
struct OffsetRows {
  __m512i u[8];
  // ar: the row's 32 int8 codes of this block; e: its block scale; off: its two offsets.
  __m512 row(const int8_t* ar, float e, float, const HalfSums* off, __m512 acc) const {
    __m512i s0 = _mm512_set1_epi32(Scale * off->off[0]), s1 = _mm512_set1_epi32(Scale * off->off[1]);
    for (int g = 0; g < 4; ++g) {
      s0 = _mm512_dpbusd_epi32(s0, u[g], bcast512(ar + 4 * g));
      s1 = _mm512_dpbusd_epi32(s1, u[4 + g], bcast512(ar + 16 + 4 * g));
    }
    return static_cast<const Block*>(this)->finish(s0, s1, e, off, acc);
  }
  template <int R>
  static void rows2(const Block& x, const Block& y, const RowsAt& at, __m512* acc_x, __m512* acc_y) {
    __m512i x0[R], x1[R], y0[R], y1[R];
    for (int i = 0; i < R; ++i) {
      x0[i] = y0[i] = _mm512_set1_epi32(Scale * at.offsets(i)->off[0]);
      x1[i] = y1[i] = _mm512_set1_epi32(Scale * at.offsets(i)->off[1]);
    }
    for (int g = 0; g < 4; ++g)
      for (int i = 0; i < R; ++i) {
        const __m512i lo = bcast512(at.codes(i) + 4 * g), hi = bcast512(at.codes(i) + 16 + 4 * g);
        x0[i] = _mm512_dpbusd_epi32(x0[i], x.u[g], lo);
        x1[i] = _mm512_dpbusd_epi32(x1[i], x.u[4 + g], hi);
        y0[i] = _mm512_dpbusd_epi32(y0[i], y.u[g], lo);
        y1[i] = _mm512_dpbusd_epi32(y1[i], y.u[4 + g], hi);
      }
    for (int i = 0; i < R; ++i) {
      acc_x[i] = x.finish(x0[i], x1[i], at.scale(i), at.offsets(i), acc_x[i]);
      acc_y[i] = y.finish(y0[i], y1[i], at.scale(i), at.offsets(i), acc_y[i]);
    }
  }
};

// The 8 k-group vectors of a block's 4-bit indices (Q4's nibble layout) looked up in a
// 16-entry byte table, 64 at a time by one byte shuffle (the table replicated in each
// 128-bit lane): IQ4's, MXFP4's and IQ2's values, shifted to u8.
template <bool Pin>
inline void lookup_nibbles(const uint8_t* c, const uint8_t* table16, __m512i* u) {
  const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(table16)));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int p = 0; p < 4; ++p) {
    const __m512i x = _mm512_loadu_si512(c + 64 * p);
    u[p] = _mm512_shuffle_epi8(table, _mm512_and_si512(x, low4));
    u[p + 4] = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(x, 4), low4));
    if constexpr (Pin) pin(u[p]), pin(u[p + 4]);
  }
}

// IQ4 and MXFP4 (M): the table values of the block's 4-bit indices, looked up 64 at a time by
// one byte shuffle of the table (replicated in each 128-bit lane). Looked up shifted by 128, as
// u8 (IQ4 1..241), so that they multiply the signed activations as Q4's codes do, each sum
// started from its half's -128 * sum(a) (4 * Q6's offset) instead of Q8's per-block dpbusds
// for 128 * sum(w) and its flipped activations: the same integer sums, so Q8's bits.
template <Mode M>
struct Lookup4Block : OffsetRows<Lookup4Block<M>, 4> {  // u: the table values + 128 of k-groups 0..7
  __m512 d;
  template <bool Pin>
  Lookup4Block(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin>) {
    static_assert(is_lookup4(M), "IQ4 or MXFP4");
    d = halves16(scales_of(tile, M, kb, b));
    lookup_nibbles<Pin>(tile + codes_at(M, b), shifted_of(M).v, this->u);
  }
  __m512 finish(__m512i s0, __m512i s1, float e, const HalfSums*, __m512 acc) const {  // Q8Block::finish's steps
    const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
    return _mm512_fmadd_ps(isum, _mm512_mul_ps(d, _mm512_set1_ps(e)), acc);
  }
};

// Q6: codes 0..63 (u8, as Q4's) against the signed activations, two sums per row (one per
// half, each with its own scale), each started from the activations' offset for its half.
struct Q6Block : OffsetRows<Q6Block, 1> {  // u: the codes of k-groups 0..7
  __m512 d0, d1;
  Q6Block() = default;  // for Q3Block, which fills these itself
  // Pin: as Q8Block's.
  template <bool Pin>
  Q6Block(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin> pin) {
    const uint16_t* sc = scales_of(tile, Mode::Q6, kb, b);
    d0 = halves16(sc);
    d1 = halves16(sc + NR);
    unpack6(tile + codes_at(Mode::Q6, b), pin);
  }
  template <bool Pin>
  void unpack6(const uint8_t* c, std::bool_constant<Pin>) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), top2 = _mm512_set1_epi8(0x30);
    const __m512i top[2] = {_mm512_loadu_si512(c + Q6_LOW_BYTES), _mm512_loadu_si512(c + Q6_LOW_BYTES + 64)};
    for (int p = 0; p < 4; ++p) {
      const __m512i x = _mm512_loadu_si512(c + 64 * p);
      // 0xF8: a | (b & c), one instruction for the OR of the low nibble and the masked top bits
      u[p] = _mm512_ternarylogic_epi32(_mm512_and_si512(x, low4), top_bits(top[0], p), top2, 0xF8);
      u[p + 4] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(x, 4), low4), top_bits(top[1], p),
                                           top2, 0xF8);
      if constexpr (Pin) pin(u[p]), pin(u[p + 4]);
    }
  }
  static __m512i top_bits(__m512i v, int t) {  // q6_top256's 512-bit twin
    return t == 0 ? _mm512_slli_epi16(v, 4) : t == 1 ? _mm512_slli_epi16(v, 2) : t == 2 ? v : _mm512_srli_epi16(v, 2);
  }
  __m512 finish(__m512i s0, __m512i s1, float e, const HalfSums*, __m512 acc) const {
    const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), d0, _mm512_mul_ps(_mm512_cvtepi32_ps(s1), d1));
    return _mm512_fmadd_ps(t, _mm512_set1_ps(e), acc);
  }
};

// IQ2: Q6's rows on T2's values + 64 (u8) against twice Q6's offset, looked up from the
// nibbles 64 at a time by one byte shuffle (as Lookup4Block's); Q6's two half scales and finish.
struct IQ2Block : OffsetRows<IQ2Block, 2> {  // u: the values + 64 of k-groups 0..7
  __m512 d0, d1;
  template <bool Pin>
  IQ2Block(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin>) {
    const uint16_t* sc = scales_of(tile, Mode::IQ2, kb, b);
    d0 = halves16(sc);
    d1 = halves16(sc + NR);
    lookup_nibbles<Pin>(tile + codes_at(Mode::IQ2, b), kIQ2Shifted.v, u);
  }
  __m512 finish(__m512i s0, __m512i s1, float e, const HalfSums*, __m512 acc) const {  // Q6Block::finish's steps
    const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), d0, _mm512_mul_ps(_mm512_cvtepi32_ps(s1), d1));
    return _mm512_fmadd_ps(t, _mm512_set1_ps(e), acc);
  }
};

// Q2: the codes (u8 0..3, Q3's 2-bit plane) against the signed activations, two sums per
// row from zero, Q6's finish on them, then each half's min times e x the half's activation
// sum (HalfSums::hs, computed with the activations' quantization).
struct Q2Block : OffsetRows<Q2Block, 0> {  // u: the codes of k-groups 0..7
  // d0, d1, m0, m1 widened to float32 and kept in L1, read as memory operands by finish:
  // as registers, a tile pair's (24 of the 32) left too few for two rows' sums. With the
  // half sums computed here from the offsets, 16-64 rows took 1.36-1.39x the time.
  alignas(64) float dm[4][NR];
  template <bool Pin>
  Q2Block(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin>) {
    const uint16_t* sc = scales_of(tile, Mode::Q2, kb, b);
    for (int i = 0; i < 4; ++i)
      _mm512_store_ps(dm[i], halves16(sc + i * NR));
    const uint8_t* c = tile + codes_at(Mode::Q2, b);
    const __m512i low2 = _mm512_set1_epi8(0x03);
    const __m512i x[2] = {_mm512_loadu_si512(c), _mm512_loadu_si512(c + 64)};
    for (int g = 0; g < 8; ++g) {
      u[g] = _mm512_and_si512(_mm512_srli_epi16(x[g >> 2], 2 * (g & 3)), low2);
      if constexpr (Pin) pin(u[g]);
    }
  }
  __m512 finish(__m512i s0, __m512i s1, float e, const HalfSums* off, __m512 acc) const {
    const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_load_ps(dm[0]),
                                     _mm512_mul_ps(_mm512_cvtepi32_ps(s1), _mm512_load_ps(dm[1])));
    acc = _mm512_fmadd_ps(t, _mm512_set1_ps(e), acc);
    acc = _mm512_fmadd_ps(_mm512_load_ps(dm[2]), _mm512_set1_ps(off->hs[0]), acc);
    return _mm512_fmadd_ps(_mm512_load_ps(dm[3]), _mm512_set1_ps(off->hs[1]), acc);
  }
};

// Q6K: Q6's rows with the super-block form's scales, D * sc0 and D * sc1 (k6_d).
struct Q6KBlock : Q6Block {
  template <bool Pin>
  Q6KBlock(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin> pin) {
    const __m512 dd = halves16(k_header(tile, Mode::Q6K, b));
    const uint8_t* sm = tile + scales_at(Mode::Q6K, kb, b);
    d0 = _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(sm))));
    d1 = _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(sm + NR))));
    unpack6(tile + codes_at(Mode::Q6K, b), pin);
  }
};

// Q3: Q6's rows on the codes + 28 (the file's code + 32), unpacked from the 2-bit plane
// (as Q6's top bits: k-group 4h + t in bits 2t..2t+1 of vector h) and the top-bit plane
// (as Q5's: bit g for k-group g). 16-bit shifts: what crosses a byte is masked off.
struct Q3Block : Q6Block {
  template <bool Pin>
  Q3Block(const uint8_t* tile, int64_t kb, int64_t b, std::bool_constant<Pin>) {
    const uint16_t* sc = scales_of(tile, Mode::Q3, kb, b);
    d0 = halves16(sc);
    d1 = halves16(sc + NR);
    const uint8_t* c = tile + codes_at(Mode::Q3, b);
    const __m512i low2 = _mm512_set1_epi8(0x03), bit2 = _mm512_set1_epi8(0x04), offset = _mm512_set1_epi8(28);
    const __m512i x[2] = {_mm512_loadu_si512(c), _mm512_loadu_si512(c + 64)};
    const __m512i top = _mm512_loadu_si512(c + Q3_LOW_BYTES);
    for (int g = 0; g < 8; ++g) {
      const __m512i lo = _mm512_and_si512(_mm512_srli_epi16(x[g >> 2], 2 * (g & 3)), low2);
      const __m512i hi = g < 2 ? _mm512_slli_epi16(top, 2 - g) : g == 2 ? top : _mm512_srli_epi16(top, g - 2);
      // 0xF8: a | (b & c)
      u[g] = _mm512_add_epi8(_mm512_ternarylogic_epi32(lo, hi, bit2, 0xF8), offset);
      if constexpr (Pin) pin(u[g]);
    }
  }
};

template <Mode M>
using BlockOf =
    std::conditional_t<M == Mode::Q4, Q4Block,
    std::conditional_t<M == Mode::Q4K, Q4KBlock,
    std::conditional_t<M == Mode::Q5K, Q5KBlock,
    std::conditional_t<M == Mode::Q6K, Q6KBlock,
    std::conditional_t<M == Mode::Q8, Q8Block,
    std::conditional_t<M == Mode::Q6, Q6Block,
    std::conditional_t<M == Mode::Q5, Q5Block,
    std::conditional_t<M == Mode::Q3, Q3Block,
    std::conditional_t<M == Mode::IQ2, IQ2Block,
    std::conditional_t<M == Mode::Q2, Q2Block, Lookup4Block<M>>>>>>>>>>>;

// A whole tile against MR activation rows (the row-group order: one pass over the tile
// per group of rows). s is used by Q4 and Q5 only, off by Q6, Q3, Q2, IQ4, MXFP4 and IQ2 only.
template <Mode M, int MR>
void tile_avx512(const uint8_t* tile, int64_t kb, const ActRows& act, const float* e, const float* s,
                 const HalfSums* off, float (*out)[NR]) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    prefetch_ahead<M>(tile, b);
    const BlockOf<M> blk(tile, kb, b, std::false_type{});
    for (int r = 0; r < MR; ++r)
      acc[r] = blk.row(act.block(r, b), e[r * kb + b], has_min(M) ? s[r * kb + b] : 0.f, off + r * kb + b,
                       acc[r]);
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(out[r], acc[r]);
}

// The output lines a block-major pass will write: one per tile, `lines` adjacent tiles, at
// `row0` and every `ld` floats after. A pass ends by storing every row's result, each to a
// line of its own (the rows are `ld` apart); lines not in cache then miss on write in a
// burst the core cannot overlap with anything (perf on a 16 x 64-token SmolLM2 prefill:
// ~10% of its samples in these stores). Asking for them for writing (prefetchw), a few
// rows with each block, spreads those misses over the pass, behind the multiply-adds.
// prefetchw in asm: GCC 12 compiled this member function's loop of __builtin_prefetch(p, 1, 3)
// to nothing (the same loop in a free function kept its prefetches).
struct OutLines {
  float* row0;
  int64_t ld;
  int lines;  // 0..2
  void prefetch(int64_t b, int64_t kb, int64_t rows) const {
    const int64_t per = (rows + kb - 1) / kb;
    const int64_t end = std::min(rows, (b + 1) * per);
    for (int64_t r = b * per; r < end; ++r) {
      const float* p = row0 + r * ld;
      if (lines > 0) asm volatile("prefetchw %0" : : "m"(*p));
      if (lines > 1) asm volatile("prefetchw %0" : : "m"(*(p + NR)));
    }
  }
};

// Block-major order for a batch of up to BLOCK_MAJOR_ROWS activation rows (batched
// decode, short prefill chunks): one pass over the tile, each block's weights unpacked once and used by every
// row before the next block, the rows' accumulators in `acc` (L1). The row-group order
// above passes over a tile once per 4 rows; with the weights coming from DRAM, the first
// pass waited on misses the hardware prefetcher did not see coming (the stream restarts at
// the tile's start for each group), and 16 rows through Gemma 3's head ran at 44% of the
// same kernel on cached weights. Per output the float32 steps and their order are those
// of the other paths (the same Block::row), so are the bits.
template <Mode M>
void tile_rows_avx512(const uint8_t* tile, int64_t kb, const int8_t* a, int64_t k, int64_t rows, const float* e,
                      const float* s, const HalfSums* off, __m512* acc, const OutLines& dst) {
  for (int64_t r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    prefetch_ahead<M>(tile, b);
    dst.prefetch(b, kb, rows);
    const BlockOf<M> blk(tile, kb, b, std::true_type{});
    // Row pointers stepped, not indexed: fewer live values in the row loop, which GCC kept
    // reloading from the stack (kernel_ab on the Xeon: q4 0.93-1.0x the time at 16-256
    // rows, q6/q8 level). e, s and off are allocated for every form; each reads its own.
    const int8_t* ar = a + b * QK;
    const float *er = e + b, *sr = s + b;
    const HalfSums* offr = off + b;
    for (__m512 *acc_r = acc, *acc_end = acc + rows; acc_r != acc_end;
         ++acc_r, ar += k, er += kb, sr += kb, offr += kb)
      *acc_r = blk.row(ar, *er, has_min(M) ? *sr : 0.f, offr, *acc_r);
  }
}

// Two adjacent tiles in one block-major pass: each activation k-group, broadcast once,
// feeds both tiles' multiply-adds. One tile takes a broadcast load per dpbusd; on an Intel
// Xeon (2 loads, 2 dpbusd a cycle) the loads of a row (8 broadcasts, e, s, its accumulator)
// and the multiply-adds then bound it together (a microbenchmark at 16-128 rows, weights in
// L1: 144-160 against 188-204 GMAC/s one thread). The float32 steps per output are those of
// Block::row (each Block's finish), so the bits are.
template <Mode M>
void tile_pair_rows_avx512(const uint8_t* tile0, const uint8_t* tile1, int64_t kb, const int8_t* a, int64_t k,
                           int64_t rows, const float* e, const float* s, const HalfSums* off, __m512* acc0,
                           __m512* acc1, const OutLines& dst) {
  for (int64_t r = 0; r < rows; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    prefetch_ahead<M>(tile0, b);
    prefetch_ahead<M>(tile1, b);
    dst.prefetch(b, kb, rows);
    const BlockOf<M> x(tile0, kb, b, std::true_type{});
    const BlockOf<M> y(tile1, kb, b, std::true_type{});
    RowsAt at{a + b * QK, e + b, s + b, off + b, k, kb};
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2, at.step(2)) BlockOf<M>::template rows2<2>(x, y, at, acc0 + r, acc1 + r);
    if (r < rows) BlockOf<M>::template rows2<1>(x, y, at, acc0 + r, acc1 + r);
  }
}

// Panel order for a tile pair against many rows (prefill chunks, batched decode of 16-24
// rows and up). Block-major above keeps each row's accumulators in L1 and loads, adds and
// stores them once per block; in a microbenchmark on the Xeon (one thread, the integer
// sums alone) that held the multiply-adds to 157-209 GMAC/s, against 282 with the sums in
// registers. Here the pair's blocks are unpacked once into a buffer (each form's Block as
// it holds it in registers: ~1.3 KB a pair, L2), then the rows go four at a time over every
// block with their sums in registers: each weight vector loaded serves 4 rows, each
// activation broadcast both tiles (a replica of the q4 pair: 183-194 GMAC/s at 64-128 rows,
// block-major's 119-158). Per output the float32 steps are the Block's rows2, block after
// block, so are the bits.
template <Mode M>
struct PanelPair {
  BlockOf<M> x, y;
};
// Blocks unpacked at a time (~500 KB, in L2 beside the activations): K up to 12288 in one
// piece; longer rows take the pieces in turn, their sums going through `acc` in between.
constexpr int64_t PANEL_BLOCKS = 384;
// Rows of a pass from which a pair goes on the panel: below, unpacking every block to memory
// and reading it back costs more than the register sums save. kernel_ab on the Xeon, one
// thread, against block-major at 16 rows: q4k 0.97-1.08x the time, q6k 0.91-1.06x (at 24:
// 0.84-0.96x, 0.77-0.95x); q5k, q3, q2 and the IQ types, whose unpacking is dearer,
// 0.77-1.00x. Q8 (one sum a row and tile at four rows: Q8Block::rows2) from 48: kernel_ab,
// one thread, K = 2048-14336, 0.75-0.96x the time at 48-256 rows, level at K = 576-640; at
// 16-32 rows level or slower.
constexpr int64_t PANEL_ROWS = 16;
// (Which CPUs take the panel at all: panel_pays, above.)
template <Mode M>
constexpr int64_t panel_rows_from() {
  if constexpr (M == Mode::Q8) return PANEL_ROWS + 32;
  return M == Mode::Q4 || M == Mode::Q4K || M == Mode::Q6 || M == Mode::Q6K ? PANEL_ROWS + 8 : PANEL_ROWS;
}

template <Mode M, int R>
void panel_rows(const PanelPair<M>* pb, int64_t nb, RowsAt at, __m512* acc0, __m512* acc1) {
  __m512 ax[R], ay[R];
  for (int i = 0; i < R; ++i) ax[i] = acc0[i], ay[i] = acc1[i];
  for (int64_t b = 0; b < nb; ++b, at.next_block()) BlockOf<M>::template rows2<R>(pb[b].x, pb[b].y, at, ax, ay);
  for (int i = 0; i < R; ++i) acc0[i] = ax[i], acc1[i] = ay[i];
}

template <Mode M>
void tile_pair_panel_avx512(const uint8_t* tile0, const uint8_t* tile1, int64_t kb, const int8_t* a, int64_t k,
                            int64_t rows, const float* e, const float* s, const HalfSums* off, __m512* acc0,
                            __m512* acc1, const OutLines& dst, void* buffer) {
  PanelPair<M>* const pb = static_cast<PanelPair<M>*>(buffer);
  for (int64_t r = 0; r < rows; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < kb; b0 += PANEL_BLOCKS) {
    const int64_t nb = std::min(PANEL_BLOCKS, kb - b0);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t b = b0 + j;
      prefetch_ahead<M>(tile0, b);
      prefetch_ahead<M>(tile1, b);
      dst.prefetch(b, kb, rows);
      new (pb + j) PanelPair<M>{BlockOf<M>(tile0, kb, b, std::false_type{}), BlockOf<M>(tile1, kb, b, std::false_type{})};
    }
    RowsAt at{a + b0 * QK, e + b0, s + b0, off + b0, k, kb};
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4, at.step(4)) panel_rows<M, 4>(pb, nb, at, acc0 + r, acc1 + r);
    for (; r < rows; ++r, at.step(1)) panel_rows<M, 1>(pb, nb, at, acc0 + r, acc1 + r);
  }
}
#endif

// One tile against MR activation rows; ncols = the tile's real rows, so that the 256-bit
// kernels skip a half of padding.
//
// Up to ONE_PASS_ROWS activation rows the tile's two halves go in one pass over its blocks.
// There the weights' stream from memory is the limit, and two passes of half lines left it
// idle for the second (the tile is in L2 by then): kernel_ab --cold, Zen 3, 2 threads, every
// form at one row took 0.71-0.98x the time (Q8 0.72-0.91x, Q4_K 0.72-0.88x, Q6_K
// 0.73-0.84x), at three 0.80-1.17x (most 0.85-0.95x). At four rows the work per line is
// enough to hide the stream, and a pass over both halves needs twice the sums: Q8 at 16 rows
// took 1.03-1.10x the time.
constexpr int ONE_PASS_ROWS = 3;
#ifndef TM_VNNI512
// Out of line, so that tile_simd's four-row code (inlined in run_parts) stays as it was.
template <int MR>
__attribute__((noinline)) void one_pass_simd(Mode mode, const uint8_t* tile, int64_t kb, const ActRows& act,
                                             const float* e, const float* s, const HalfSums* off, float (*out)[NR]) {
  if (mode == Mode::Q4) q4_tile_avx2<Mode::Q4, MR, 2>(tile, kb, 0, act, e, s, out);
  else if (mode == Mode::Q4K) q4_tile_avx2<Mode::Q4K, MR, 2>(tile, kb, 0, act, e, s, out);
  else if (mode == Mode::Q5K) q4_tile_avx2<Mode::Q5K, MR, 2>(tile, kb, 0, act, e, s, out);
  else if (mode == Mode::Q6K) q6_tile_avx2<Mode::Q6K, MR, 2>(tile, kb, 0, act, e, off, out);
  else if (mode == Mode::Q8) q8_tile_avx2<Mode::Q8, MR, 2>(tile, kb, 0, act, e, s, out);
  else if (mode == Mode::IQ4) q8_tile_avx2<Mode::IQ4, MR, 2>(tile, kb, 0, act, e, s, out);
  else if (mode == Mode::MXFP4) q8_tile_avx2<Mode::MXFP4, MR, 2>(tile, kb, 0, act, e, s, out);
  else if (mode == Mode::Q6) q6_tile_avx2<Mode::Q6, MR, 2>(tile, kb, 0, act, e, off, out);
  else if (mode == Mode::Q3) q6_tile_avx2<Mode::Q3, MR, 2>(tile, kb, 0, act, e, off, out);
  else if (mode == Mode::IQ2) q6_tile_avx2<Mode::IQ2, MR, 2>(tile, kb, 0, act, e, off, out);
  else if (mode == Mode::Q2) q6_tile_avx2<Mode::Q2, MR, 2>(tile, kb, 0, act, e, off, out);
  else q4_tile_avx2<Mode::Q5, MR, 2>(tile, kb, 0, act, e, s, out);
}
#endif
template <int MR>
void tile_simd(Mode mode, const uint8_t* tile, int64_t kb, int64_t ncols, const ActRows& act, const float* e,
               const float* s, const HalfSums* off, float (*out)[NR]) {
#ifdef TM_VNNI512
  (void)ncols;
  with_mode(mode, [&](auto m) { tile_avx512<decltype(m)::value, MR>(tile, kb, act, e, s, off, out); });
#else
  if constexpr (MR <= ONE_PASS_ROWS) {
    if (ncols > NH) return one_pass_simd<MR>(mode, tile, kb, act, e, s, off, out);
  }
  for (int h = 0; h * NH < ncols; ++h) {
    if (mode == Mode::Q4) q4_tile_avx2<Mode::Q4, MR>(tile, kb, h, act, e, s, out);
    else if (mode == Mode::Q4K) q4_tile_avx2<Mode::Q4K, MR>(tile, kb, h, act, e, s, out);
    else if (mode == Mode::Q5K) q4_tile_avx2<Mode::Q5K, MR>(tile, kb, h, act, e, s, out);
    else if (mode == Mode::Q6K) q6_tile_avx2<Mode::Q6K, MR>(tile, kb, h, act, e, off, out);
    else if (mode == Mode::Q8) q8_tile_avx2<Mode::Q8, MR>(tile, kb, h, act, e, s, out);
    else if (mode == Mode::IQ4) q8_tile_avx2<Mode::IQ4, MR>(tile, kb, h, act, e, s, out);
    else if (mode == Mode::MXFP4) q8_tile_avx2<Mode::MXFP4, MR>(tile, kb, h, act, e, s, out);
    else if (mode == Mode::Q6) q6_tile_avx2<Mode::Q6, MR>(tile, kb, h, act, e, off, out);
    else if (mode == Mode::Q3) q6_tile_avx2<Mode::Q3, MR>(tile, kb, h, act, e, off, out);
    else if (mode == Mode::IQ2) q6_tile_avx2<Mode::IQ2, MR>(tile, kb, h, act, e, off, out);
    else if (mode == Mode::Q2) q6_tile_avx2<Mode::Q2, MR>(tile, kb, h, act, e, off, out);
    else q4_tile_avx2<Mode::Q5, MR>(tile, kb, h, act, e, s, out);
  }
#endif
}
#endif

std::string isa() {
#if defined(TM_VNNI512)
  return "avx512+vnni";
#elif defined(TM_VNNI) && defined(TM_EMULATE_VNNI)
  return "avx2+vnni(emulated)";
#elif defined(TM_VNNI)
  return "avx2+vnni";
#elif defined(TM_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// ---------------------------------------------------------------------------------------
// The linear: y (M, N) = x (M, K) @ W^T (+ bias), W in one or more parts side by side

// One part of a linear's weight: its output columns [col, col + n) of y. A file may store
// the weights that one input feeds in different forms (a Q4_K_M file's Q4_K q and k beside
// a Q6_K v); run_parts computes them all in one call, as if they were one weight.
struct Part {
  Mode mode;
  const uint8_t* packed;
  int64_t n;
  const float* bias;  // (n,), or nullptr
  int64_t col;
  // The rows of x (and y) this part computes: [row0, row0 + rows), or every row (rows < 0).
  // A mixture of experts' projection gives each expert its own tokens' rows (experts_linear).
  int64_t row0 = 0, rows = -1;
};

// Bytes [from, from + n) with their sign bits flipped into `to` (n a multiple of 8; to may
// be from). Eight at a time through a word: a byte loop here stores through uint8_t*, which
// may alias anything, so GCC reloaded its pointers every byte and did not vectorize it.
inline void flip_signs(const uint8_t* from, uint8_t* to, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    uint64_t v;
    std::memcpy(&v, from + i, 8);
    v ^= 0x8080808080808080ull;
    std::memcpy(to + i, &v, 8);
  }
}

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// y (M, ldy) columns of every part = x (M, K) against the parts' weights. This call's own
// threads first quantize x into q (quantize_row_range) and, where `flip_q8`, copy its codes
// with their sign bits flipped into q8.a (which may be q.a itself): Q8 parts read q8 (see
// Q8Block), every other part q. One parallel region hands out the tiles of all parts: one activation
// quantization and one fork and join a call, not one a part, and no concatenation after.
// Which thread computes a tile never changes its result, so each part's columns are
// bitwise what a call of that part alone gives.
void run_parts(const std::vector<Part>& parts, const float* x, bool flip_q8, const QAct& q, const QAct& q8,
               int64_t m, int64_t k, float* yp, int64_t ldy, bool simd, int64_t mr_max, bool panel) {
  const int64_t kb = k / QK;
  const int64_t mr_cap = mr_max == 0 ? MAX_MR : mr_max;
  // The most rows any part computes (m unless parts take rows of their own): what the choice
  // of order and the pieces' grain go by.
  int64_t max_rows = 0;
  for (const Part& part : parts) max_rows = std::max(max_rows, part.rows < 0 ? m : part.rows);
  // mr_max (tests) asks for the row-group order with register tiles of at most that many rows.
  bool block_major = false;
#ifdef TM_VNNI512
  block_major = simd && mr_max == 0 && max_rows > 1;
#endif
  (void)block_major;
  // What each part needs beside its weight: tiles, their bytes, and its block-major pass.
  struct Run {
    int64_t ntiles, tbytes, pass_rows, panel_from;
  };
  std::vector<Run> runs;
  int64_t panel_bytes = 0;  // a worker's panel buffer: the largest any part uses
  for (const Part& part : parts) {
    // Block-major passes of at most BLOCK_MAJOR_ROWS rows (their accumulators stay in L1).
    // At long K a pass of PASS_BYTES would hold fewer rows than Q4's and Q6's forms start on
    // the panel at (24: K past ~10,900, an 8B's down projection); theirs hold that many
    // (kernel_ab, Xeon, one thread, K = 12800 and 14336, 24-256 rows, two runs: q4k
    // 0.90-0.98x the time, q6k 0.72-0.98x, q4 0.92-1.00x).
    int64_t min_pass = 16, panel_from = 0;
#ifdef TM_VNNI512
    // The panel: the rows a pass needs for it, and its buffer's bytes per block (a pair's).
    int64_t pair_bytes = 0;
    with_mode(part.mode, [&](auto form) {
      constexpr Mode F = decltype(form)::value;
      panel_from = panel_rows_from<F>();
      pair_bytes = sizeof(PanelPair<F>);
    });
    if (panel && panel_from <= BLOCK_MAJOR_ROWS) min_pass = std::max(min_pass, panel_from);
    if (panel && block_major && max_rows >= panel_from)
      panel_bytes = std::max(panel_bytes, std::min(kb, PANEL_BLOCKS) * pair_bytes);
#endif
    runs.push_back({(part.n + NR - 1) / NR, tile_bytes(part.mode, kb),
                    std::clamp<int64_t>(PASS_BYTES / k, min_pass, BLOCK_MAJOR_ROWS), panel_from});
  }
  // A tile-block (16 rows) is ~20 ns of work per activation row: chunks of at least ~5 us,
  // so that a call too small to gain from waking a second thread runs on this one
  // (measured on 2 cores: 576x576 at M = 1 takes 29 us on one thread, 20 us on two).
  const int64_t grain = std::max<int64_t>(1, 256 / std::max<int64_t>(1, kb * max_rows));
  int64_t grains = 0;
  for (const Run& r : runs) grains += (r.ntiles + grain - 1) / grain;
  // Tiles are handed out in pieces from a shared counter rather than split statically:
  // on 2 cores shared with the server's event loop (and anything else), a static half
  // leaves one thread waiting whenever the other is preempted, while pieces let the
  // running thread take the preempted one's share. About 8 pieces a thread and part keep
  // the claim cost (one atomic add) negligible and the weight stream sequential within a
  // piece. Which thread computes a tile does not change its result: outputs stay bitwise equal.
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), grains);
  struct Piece {
    int64_t part, t0, t1;
  };
  // The call's last pieces shrink (guided: at most a 2 * nthreads-th of the tiles still
  // unclaimed, down to one unit): a thread that takes the last piece keeps the others
  // waiting at the join for up to a piece's time, and a full piece is 1/8 of a thread's
  // share (Gemma 3's head at 16 rows: ~0.6 ms).
  const int64_t unit = block_major ? 2 : 1;  // block-major takes tiles in pairs
  int64_t left = 0;
  for (const Run& r : runs) left += r.ntiles;
  std::vector<Piece> pieces;
  const int64_t all_tiles = left;
  for (int64_t pi = 0; pi < static_cast<int64_t>(parts.size()); ++pi) {
    const int64_t ntiles = runs[pi].ntiles;
    // A part with rows of its own (an expert of experts_linear, one of 8-128 in the call) is cut
    // by the whole call's share: cut by its own, a token's 8 experts at one row made 128 pieces
    // of ~110 KB, each a new stream to start, and ran at 0.8x the rate of one weight of their
    // bytes (1.0x cut so). Parts side by side keep their own share: a Q4_K_M 1B's q/k beside its
    // v, cut by the whole, took 1.02x the step at 16 streams (bench/step_ab.py, Zen 3).
    const int64_t share = parts[pi].rows < 0 ? ntiles : all_tiles;
    int64_t piece = std::max<int64_t>(grain, (share + 8 * nthreads - 1) / (8 * nthreads));
    piece += block_major && (piece & 1);
    for (int64_t t0 = 0; t0 < ntiles;) {
      int64_t size = std::min(piece, std::max(grain, (left + 2 * nthreads - 1) / (2 * nthreads)));
      size += (size % unit) ? unit - size % unit : 0;
      const int64_t t1 = std::min(ntiles, t0 + size);
      pieces.push_back({pi, t0, t1});
      left -= t1 - t0, t0 = t1;
    }
  }
  const int64_t npieces = static_cast<int64_t>(pieces.size());
  std::atomic<int64_t> next{0};
  // The quantization in chunks of rows (~256 blocks, a few us), claimed as the tiles are:
  // in this call's parallel region, not one of its own before it, whose grain left batched
  // decode's rows (16-64 of them, 2-7% of the call) to one thread while the other waited.
  const int64_t quant_rows = std::max<int64_t>(1, 256 / kb);
  const int64_t quant_chunks = (m + quant_rows - 1) / quant_rows;
  std::atomic<int64_t> quant_next{0}, quant_done{0};
  auto worker = [&](int64_t, int64_t) {
    for (int64_t c = quant_next.fetch_add(1, std::memory_order_relaxed); c < quant_chunks;
         c = quant_next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t r0 = c * quant_rows, r1 = std::min(m, r0 + quant_rows);
      quantize_row_range(x, r0, r1, k, q, simd);
      if (flip_q8)
        flip_signs(reinterpret_cast<const uint8_t*>(q.a) + r0 * k, reinterpret_cast<uint8_t*>(q8.a) + r0 * k,
                   (r1 - r0) * k);
      quant_done.fetch_add(1, std::memory_order_release);
    }
    // Every tile reads every row: wait for the chunks other threads have claimed.
    while (quant_done.load(std::memory_order_acquire) < quant_chunks) spin_pause();
    alignas(64) float out[MAX_MR][NR];
#ifdef TM_VNNI512
    // The panel's unpacked blocks (parts of panel_from rows and up): one buffer a worker.
    std::unique_ptr<void, decltype(&std::free)> pmem(panel_bytes ? std::aligned_alloc(64, panel_bytes) : nullptr,
                                                     &std::free);
    TORCH_CHECK(!panel_bytes || pmem, "out of memory");
#endif
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < npieces;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      const auto [pi, t0, t1] = pieces[i];
      const Part& part = parts[pi];
      const Mode mode = part.mode;
      const int64_t n = part.n, tbytes = runs[pi].tbytes;
      const uint8_t* pp = part.packed;
      const float* bp = part.bias;
      // This part's rows: x's and y's [row0, row0 + pm).
      const int64_t row0 = part.rows < 0 ? 0 : part.row0, pm = part.rows < 0 ? m : part.rows;
      float* const yc = yp + row0 * ldy + part.col;  // this part's first row and column
      // Q8's 512-bit kernels take the flipped codes; every other kernel q's own.
      const QAct& q_all = mode == Mode::Q8 ? q8 : q;
      const QAct qa{q_all.a + row0 * k, q_all.e + row0 * kb, q_all.s + row0 * kb, q_all.off + row0 * kb};
#ifdef TM_AVX2
      // A piece starts a new stream, whose first PREFETCH_FAR_BYTES the blocks' own
      // prefetches (prefetch_ahead) never ask for: ask for them at once. kernel_ab --cold on
      // Zen 4, 2 threads: one row 0.84-0.99x the time on the 512-bit path, 0.85-0.91x on
      // the AVX2 one (Gemma 3's and Qwen3's layer shapes); 16 rows 0.93-1.03x.
      prefetch_l2(pp + t0 * tbytes, static_cast<int>(std::min(PREFETCH_FAR_BYTES, (t1 - t0) * tbytes) / 64));
#endif
#ifdef TM_VNNI512
      if (block_major) {
        const int64_t pass_rows = runs[pi].pass_rows, panel_from = runs[pi].panel_from;
        alignas(64) __m512 acc[2][BLOCK_MAJOR_ROWS];
        for (int64_t r0 = 0; r0 < pm; r0 += pass_rows) {
          const int64_t rows = std::min(pass_rows, pm - r0);
          for (int64_t t = t0; t < t1; t += 2) {
            const bool pair = t + 1 < t1;  // a piece's odd last tile runs alone
            const int64_t u1 = std::min(t + 2, t1);
            // Only full tiles' lines: a last tile's padding columns are not in y.
            const OutLines lines{yc + r0 * ldy + t * NR, ldy, static_cast<int>((std::min(u1 * NR, n) - t * NR) / NR)};
            with_mode(mode, [&](auto form) {
              constexpr Mode F = decltype(form)::value;
              if (pair && panel && rows >= panel_from)
                tile_pair_panel_avx512<F>(pp + t * tbytes, pp + (t + 1) * tbytes, kb, qa.a + r0 * k, k, rows,
                                          qa.e + r0 * kb, qa.s + r0 * kb, qa.off + r0 * kb, acc[0], acc[1], lines,
                                          pmem.get());
              else if (pair)
                tile_pair_rows_avx512<F>(pp + t * tbytes, pp + (t + 1) * tbytes, kb, qa.a + r0 * k, k, rows,
                                         qa.e + r0 * kb, qa.s + r0 * kb, qa.off + r0 * kb, acc[0], acc[1], lines);
              else
                tile_rows_avx512<F>(pp + t * tbytes, kb, qa.a + r0 * k, k, rows, qa.e + r0 * kb, qa.s + r0 * kb,
                                    qa.off + r0 * kb, acc[0], lines);
            });
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t u = t; u < u1; ++u) {
                float* dst = yc + (r0 + r) * ldy + u * NR;
                const float* bu = bp ? bp + u * NR : nullptr;
                const int64_t ncols = std::min<int64_t>(NR, n - u * NR);
                // Full tiles straight from the register (store_row's adds, 16 at a time). Sent
                // through store_row's own full-tile branch instead, this worker compiled so that
                // q8 at one row (the row-group path) took 1.25-2.14x the time (kernel_ab).
                if (ncols == NR) {
                  const __m512 v = acc[u - t][r];
                  _mm512_storeu_ps(dst, bu ? _mm512_add_ps(v, _mm512_loadu_ps(bu)) : v);
                } else {
                  _mm512_store_ps(out[0], acc[u - t][r]);
                  store_row(dst, out[0], bu, ncols);
                }
              }
          }
        }
        continue;
      }
#endif
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = pp + t * tbytes;
        const int64_t ncols = std::min<int64_t>(NR, n - t * NR);
        for (int64_t m0 = 0; m0 < pm; m0 += mr_cap) {
          const int64_t mr = std::min<int64_t>(mr_cap, pm - m0);
#ifdef TM_AVX2
          if (simd) {
            const ActRows act = ActRows::at(qa, m0, k);
            const float *e = qa.e + m0 * kb, *s = qa.s + m0 * kb;
            const HalfSums* off = qa.off + m0 * kb;
            switch (mr) {
              case 1: tile_simd<1>(mode, tile, kb, ncols, act, e, s, off, out); break;
              case 2: tile_simd<2>(mode, tile, kb, ncols, act, e, s, off, out); break;
              case 3: tile_simd<3>(mode, tile, kb, ncols, act, e, s, off, out); break;
              default: tile_simd<4>(mode, tile, kb, ncols, act, e, s, off, out); break;
            }
          }
#endif
          if (!simd) {
            if (mode == Mode::Q4) q4_tile_scalar<Mode::Q4>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::Q4K) q4_tile_scalar<Mode::Q4K>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::Q5K) q4_tile_scalar<Mode::Q5K>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::Q6K) q6_tile_scalar<Mode::Q6K>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::Q8) q8_tile_scalar<Mode::Q8>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::IQ4) q8_tile_scalar<Mode::IQ4>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::MXFP4) q8_tile_scalar<Mode::MXFP4>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::Q6) q6_tile_scalar<Mode::Q6>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::Q3) q6_tile_scalar<Mode::Q3>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::IQ2) q6_tile_scalar<Mode::IQ2>(tile, kb, qa, k, m0, mr, out);
            else if (mode == Mode::Q2) q6_tile_scalar<Mode::Q2>(tile, kb, qa, k, m0, mr, out);
            else q4_tile_scalar<Mode::Q5>(tile, kb, qa, k, m0, mr, out);
          }
          for (int64_t r = 0; r < mr; ++r)
            store_row(yc + (m0 + r) * ldy + t * NR, out[r], bp ? bp + t * NR : nullptr, ncols);
        }
      }
    }
  };
  if (nthreads <= 1) worker(0, 1);
  else at::parallel_for(0, nthreads, 1, worker);
}

// run_parts on x's m rows with this call's own buffers for their quantized codes.
void run_on_rows(const std::vector<Part>& parts, const float* x, int64_t m, int64_t k, float* y, int64_t ldy,
                 int64_t impl, int64_t mr_max) {
  const int64_t kb = k / QK;
  bool simd = false;
#ifdef TM_AVX2
  simd = impl != 1;
#endif
  // Q8Block takes the activations as u8, a + 128 (see there): a copy with each sign bit
  // flipped, or the codes themselves flipped when every part is Q8.
  bool any_q8 = false, all_q8 = true;
#ifdef TM_VNNI512
  for (const Part& p : parts) any_q8 |= p.mode == Mode::Q8, all_q8 &= p.mode == Mode::Q8;
  any_q8 &= simd;
#endif
  const int64_t flipped_bytes = any_q8 && !all_q8 ? m * k : 0;
  // One buffer for a, e, s, the half sums and the flipped copy of a: allocated per call
  // (M*K bytes and 24 a block; tiny next to the weights).
  const int64_t act_bytes = m * k + (4 - (m * k) % 4) % 4;
  auto qbuf = torch::empty({act_bytes + m * kb * static_cast<int64_t>(2 * sizeof(float) + sizeof(HalfSums)) +
                            flipped_bytes}, torch::kUInt8);
  uint8_t* const base = qbuf.data_ptr<uint8_t>();
  QAct q;
  q.a = reinterpret_cast<int8_t*>(base);
  q.e = reinterpret_cast<float*>(base + act_bytes);
  q.s = q.e + m * kb;
  q.off = reinterpret_cast<HalfSums*>(q.s + m * kb);
  uint8_t* const flipped = reinterpret_cast<uint8_t*>(q.off + m * kb);
  TORCH_CHECK(flipped + flipped_bytes <= base + qbuf.numel());
  // run_parts quantizes x into q and flips the codes into q8 before it reads them. With every
  // part Q8 the flip is in place (q8.a == q.a: no part reads the unflipped codes).
  QAct q8 = q;
  if (any_q8) q8.a = reinterpret_cast<int8_t*>(all_q8 ? base : flipped);
  // The panel order where this CPU gains by it (panel_pays), or as a test asks.
  const bool panel = impl == 2 || (impl == 0 && panel_pays());
  run_parts(parts, x, any_q8, q, q8, m, k, y, ldy, simd, mr_max, panel);
}

// A linear's weight part as the callers hand it over: (mode, packed, n, bias).
struct PartArg {
  Mode mode;
  const torch::Tensor& packed;
  int64_t n;
  const c10::optional<torch::Tensor>& bias;
};

// y (M, sum of the parts' n) = x @ [W_0 | W_1 | ...]^T (+ biases): the parts' outputs side by
// side, each bitwise a call of that part alone (see run_parts). `out`: a caller's (M, N)
// float32 buffer to write into (the runner's LM head, whose (M, V) logits would otherwise be
// a fresh mapping every step: runner/qlinear.py).
torch::Tensor qlinear_parts(const std::vector<PartArg>& args, const torch::Tensor& x_in, int64_t impl,
                            int64_t mr_max, const c10::optional<torch::Tensor>& out_in = c10::nullopt) {
  TORCH_CHECK(x_in.dim() == 2, "x must be (M, K)");
  TORCH_CHECK(!args.empty(), "a linear needs at least one part");
  const int64_t m = x_in.size(0), k = x_in.size(1);
  int64_t n_all = 0;
  for (const PartArg& a : args) check_packed(a.mode, a.packed, a.n, k), n_all += a.n;
  TORCH_CHECK(impl >= 0 && impl <= 3, "impl: 0 = best available, 1 = scalar, 2 = SIMD with the panel order "
              "(where this CPU has the 512-bit kernels), 3 = SIMD without it");
  TORCH_CHECK(mr_max >= 0 && mr_max <= MAX_MR, "mr_max in 0..", MAX_MR);
  const auto out_dtype = x_in.scalar_type();
  TORCH_CHECK(out_dtype == torch::kFloat || out_dtype == torch::kBFloat16 || out_dtype == torch::kHalf,
              "x must be float32, bfloat16 or float16");
  auto x = x_in.to(torch::kFloat).contiguous();
  std::vector<torch::Tensor> biases;  // float32 copies, alive for the call
  std::vector<Part> parts;
  for (const PartArg& a : args) {
    const float* bp = nullptr;
    if (a.bias.has_value() && a.bias->defined()) {
      biases.push_back(a.bias->to(torch::kFloat).contiguous());
      TORCH_CHECK(biases.back().dim() == 1 && biases.back().size(0) == a.n, "bias must be (N,) of its part");
      bp = biases.back().data_ptr<float>();
    }
    parts.push_back({a.mode, a.packed.data_ptr<uint8_t>(), a.n, bp, parts.empty() ? 0 : parts.back().col + parts.back().n});
  }
  torch::Tensor y;
  if (out_in.has_value() && out_in->defined()) {
    TORCH_CHECK(out_dtype == torch::kFloat, "out: only for float32 x");
    TORCH_CHECK(out_in->scalar_type() == torch::kFloat && out_in->device().is_cpu() && out_in->dim() == 2 &&
                    out_in->size(0) == m && out_in->size(1) == n_all && out_in->is_contiguous(),
                "out must be a contiguous float32 CPU tensor of shape (", m, ", ", n_all, "), got ", out_in->sizes());
    y = *out_in;
  } else {
    y = torch::empty({m, n_all}, torch::kFloat);
  }
  if (m == 0) return y.to(out_dtype);
  run_on_rows(parts, x.data_ptr<float>(), m, k, y.data_ptr<float>(), n_all, impl, mr_max);
  return out_dtype == torch::kFloat ? y : y.to(out_dtype);
}

torch::Tensor qlinear(Mode mode, const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                      const c10::optional<torch::Tensor>& bias, int64_t impl, int64_t mr_max,
                      const c10::optional<torch::Tensor>& out = c10::nullopt) {
  return qlinear_parts({{mode, packed, n, bias}}, x, impl, mr_max, out);
}

// qlinear for one form, as the module exposes it (q4_linear, q5_linear, ...).
template <Mode M>
torch::Tensor linear_of(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                        const c10::optional<torch::Tensor>& bias, int64_t impl, int64_t mr_max,
                        const c10::optional<torch::Tensor>& out) {
  return qlinear(M, x, packed, n, bias, impl, mr_max, out);
}

Mode checked_mode(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= static_cast<int64_t>(kLastMode), "no form numbered ", mode);
  return static_cast<Mode>(mode);
}

// Parts side by side (or one weight), for layer.cpp's one-call forward (linear_entry.h): the
// same call as linear_parts / <form>_linear with their defaults.
torch::Tensor linear_parts_entry(const textmill::LinearPart* parts, int64_t count, const torch::Tensor& x) {
  std::vector<PartArg> args;
  for (int64_t i = 0; i < count; ++i)
    args.push_back({checked_mode(parts[i].mode), *parts[i].packed, parts[i].n, *parts[i].bias});
  return qlinear_parts(args, x, 0, 0);
}
static_assert(std::is_same_v<decltype(&linear_parts_entry), textmill::LinearPartsFn>, "linear_entry.h's signature");

constexpr textmill::LinearEntry kLinearEntry{&linear_parts_entry};

// Parts side by side, from Python: parts = [(mode number, packed, n, bias or None), ...].
torch::Tensor linear_parts(const torch::Tensor& x, const std::vector<std::tuple<int64_t, torch::Tensor, int64_t,
                                                                                c10::optional<torch::Tensor>>>& parts,
                           int64_t impl, int64_t mr_max) {
  std::vector<PartArg> args;
  for (const auto& [mode, packed, n, bias] : parts) args.push_back({checked_mode(mode), packed, n, bias});
  return qlinear_parts(args, x, impl, mr_max);
}

// A mixture of experts' projection (runner/moe.py): E experts' weights of one form stacked
// in `packed` (expert e's N = n output rows are rows [e n, (e + 1) n), whole tiles), each
// applied to its own rows of x: y rows [offsets[e], offsets[e + 1]) are those rows of x
// against expert e, bitwise what <form>_linear gives them alone. Every expert with rows is
// a part of one run_parts call (its own rows, run_on_rows): x's rows quantized once, and
// one parallel region handing out all their tiles. One call (and region) per expert took
// 1.06-1.18x the time in a one-stream step on Qwen3-30B-A3B's shapes (8 experts a token;
// Zen 3, six steps' means each, docs/performance.md).
torch::Tensor experts_linear(const torch::Tensor& x_in, const torch::Tensor& offsets, int64_t mode_number,
                             const torch::Tensor& packed, int64_t n) {
  const Mode mode = checked_mode(mode_number);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat, "x must be (R, K) float32");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == torch::kLong && offsets.size(0) >= 2,
              "offsets must be (E + 1,) int64");
  const auto x = x_in.contiguous();
  const auto off_t = offsets.contiguous();
  const int64_t rows = x.size(0), k = x.size(1), experts = off_t.size(0) - 1;
  TORCH_CHECK(n > 0 && n % NR == 0, "an expert's ", n, " output rows must fill whole tiles of ", NR);
  TORCH_CHECK(k > 0 && k % QK == 0, "K must be a multiple of ", QK);
  const int64_t bytes = packed_bytes(mode, n, k);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 1 && packed.is_contiguous() &&
                  packed.numel() == experts * bytes,
              "packed must hold ", experts, " experts of ", bytes, " bytes, got ", packed.numel());
  const int64_t* off = off_t.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[experts] == rows, "offsets must run from 0 to the rows of x");
  for (int64_t e = 0; e < experts; ++e) TORCH_CHECK(off[e] <= off[e + 1], "offsets must not decrease");
  auto y = torch::empty({rows, n}, torch::kFloat);
  std::vector<Part> parts;
  const uint8_t* base = packed.data_ptr<uint8_t>();
  for (int64_t e = 0; e < experts; ++e)
    if (off[e + 1] > off[e]) parts.push_back({mode, base + e * bytes, n, nullptr, 0, off[e], off[e + 1] - off[e]});
  if (!parts.empty()) run_on_rows(parts, x.data_ptr<float>(), rows, k, y.data_ptr<float>(), n, 0, 0);
  return y;
}

// The activation quantization alone, for tests: -> a (M, K) int8, e (M, K/32), s (M, K/32),
// and the half sums' HalfSums as bytes (M, K/32 x 16): off[2] int32, hs[2] float32 a block.
std::vector<torch::Tensor> quantize_act(const torch::Tensor& x_in, int64_t impl) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % QK == 0, "x must be (M, K), K a multiple of 32");
  auto x = x_in.to(torch::kFloat).contiguous();
  const int64_t m = x.size(0), k = x.size(1), kb = k / QK;
  auto a = torch::empty({m, k}, torch::kInt8);
  auto e = torch::empty({m, kb}, torch::kFloat), s = torch::empty({m, kb}, torch::kFloat);
  auto off = torch::empty({m * kb * static_cast<int64_t>(sizeof(HalfSums))}, torch::kUInt8);
  QAct q{a.data_ptr<int8_t>(), e.data_ptr<float>(), s.data_ptr<float>(), reinterpret_cast<HalfSums*>(off.data_ptr<uint8_t>())};
  bool simd = false;
#ifdef TM_AVX2
  simd = impl == 0;
#endif
  if (m > 0) quantize_rows(x.data_ptr<float>(), m, k, q, simd);
  return {a, e, s, off.view({m, kb * static_cast<int64_t>(sizeof(HalfSums))})};
}

}  // namespace

// The compute functions run without the GIL, as torch's own operators do: the server's
// event loop thread (HTTP, SSE) then runs while a step's kernels do, instead of waiting for
// the engine thread to come back to Python (the interpreter's 5 ms switch interval).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("isa", &isa, "the SIMD path this build uses: avx2+vnni, avx2 or scalar");
  m.def("panel_pays", &panel_pays, "whether batches take the panel order on this CPU (impl=0; see panel_pays)");
  m.def("mode_number", [](const std::string& form) { return static_cast<int64_t>(mode_of(form)); },
        "the number linear_capsule's function takes for a form (q4, q8, ...)");
  m.def("linear_capsule",
        [] { return py::capsule(const_cast<textmill::LinearEntry*>(&kLinearEntry), textmill::kLinearCapsule); },
        "the linear's functions (one weight, parts side by side) for layer.cpp's Forward (linear_entry.h)");
  m.def("linear_parts", &linear_parts, nogil,
        "x (M, K) @ [W_0 | W_1 | ...]^T (+ biases) in one call, parts = [(mode_number, packed, n, bias), ...]: "
        "each part's columns bitwise its <form>_linear",
        py::arg("x"), py::arg("parts"), py::arg("impl") = 0, py::arg("mr_max") = 0);
  m.def("experts_linear", &experts_linear, nogil,
        "rows [offsets[e], offsets[e + 1]) of x (R, K) against expert e of E stacked in packed (n rows each, "
        "form mode_number) -> y (R, n), each expert's rows bitwise its <form>_linear",
        py::arg("x"), py::arg("offsets"), py::arg("mode"), py::arg("packed"), py::arg("n"));
  m.def("packed_bytes", [](const std::string& mode, int64_t n, int64_t k) { return packed_bytes(mode_of(mode), n, k); });
  m.def("q4_pack", &pack_min_max<Mode::Q4>, nogil, "float (N, K) -> packed Q4 (uint8)");
  m.def("q4_unpack", &unpack_min_max<Mode::Q4>, nogil, "packed Q4 -> codes (N, K) uint8, d (N, K/32), m (N, K/32)");
  m.def("q8_pack", &q8_pack, nogil, "float (N, K) -> packed Q8 (uint8)");
  m.def("q8_unpack", &unpack_signed<Mode::Q8>, nogil, "packed Q8 -> codes (N, K) int8, d (N, K/32)");
  m.def("iq4_pack", &lookup4_pack<Mode::IQ4>, nogil, "float (N, K) -> packed IQ4 (uint8)");
  m.def("iq4_unpack", &unpack_signed<Mode::IQ4>, nogil, "packed IQ4 -> table values (N, K) int8, d (N, K/32)");
  m.def("mxfp4_pack", &lookup4_pack<Mode::MXFP4>, nogil, "float (N, K) -> packed MXFP4 (uint8), as gguf-py quantizes");
  m.def("mxfp4_unpack", &unpack_signed<Mode::MXFP4>, nogil, "packed MXFP4 -> table values (N, K) int8, d (N, K/32)");
  m.def("q4k_pack", &k_min_pack<Mode::Q4K>, nogil, "float (N, K) -> packed Q4K (uint8)");
  m.def("q4k_unpack", &unpack_min_max<Mode::Q4K>, nogil,
        "packed Q4K -> codes (N, K) uint8, d = D * sc (N, K/32), m = Dm * mn (N, K/32)");
  m.def("q5k_pack", &k_min_pack<Mode::Q5K>, nogil, "float (N, K) -> packed Q5K (uint8)");
  m.def("q5k_unpack", &unpack_min_max<Mode::Q5K>, nogil,
        "packed Q5K -> codes (N, K) uint8 0..31, d = D * sc (N, K/32), m = Dm * mn (N, K/32)");
  m.def("q6k_pack", &q6k_pack, nogil, "float (N, K) -> packed Q6K (uint8)");
  m.def("q6k_unpack", &half_scale_unpack<Mode::Q6K>, nogil,
        "packed Q6K -> codes (N, K) uint8 0..63 (standing for code - 32), d = D * sc (N, K/16)");
  m.def("q5_pack", &pack_min_max<Mode::Q5>, nogil, "float (N, K) -> packed Q5 (uint8)");
  m.def("q5_unpack", &unpack_min_max<Mode::Q5>, nogil, "packed Q5 -> codes (N, K) uint8 0..31, d (N, K/32), m (N, K/32)");
  m.def("q6_pack", &half_scale_pack<Mode::Q6>, nogil, "float (N, K) -> packed Q6 (uint8)");
  m.def("q6_unpack", &half_scale_unpack<Mode::Q6>, nogil,
        "packed Q6 -> codes (N, K) uint8 0..63 (standing for code - 32), d (N, K/16)");
  m.def("q3_pack", &half_scale_pack<Mode::Q3>, nogil, "float (N, K) -> packed Q3 (uint8)");
  m.def("q3_unpack", &half_scale_unpack<Mode::Q3>, nogil,
        "packed Q3 -> codes (N, K) uint8 0..7 (standing for code - 4), d (N, K/16)");
  m.def("q2_pack", &q2_pack, nogil, "float (N, K) -> packed Q2 (uint8)");
  m.def("q2_unpack", &q2_unpack, nogil, "packed Q2 -> codes (N, K) uint8 0..3, d (N, K/16), m (N, K/16)");
  m.def("iq2_pack", &iq2_pack, nogil, "float (N, K) -> packed IQ2 (uint8)");
  m.def("iq2_unpack", &half_scale_unpack<Mode::IQ2>, nogil,
        "packed IQ2 -> table values (N, K) int8 (-43, -25, -8, 8, 25, 43), d (N, K/16)");
  m.def("q4_pack_codes", &q4_pack_codes, nogil, "codes (N, K) uint8 0..15, d, m (N, K/32) float16 -> packed Q4");
  m.def("q8_pack_codes", &q8_pack_codes, nogil, "codes (N, K) int8, d (N, K/32) float16 -> packed Q8");
  m.def("pack_gguf", &pack_gguf, nogil,
        "GGUF tensors' bytes, stacked along N -> packed in form q2, q3, q4, q4k, q5, q5k, q6, q6k, q8, iq4, mxfp4 "
        "or iq2",
        py::arg("form"), py::arg("raws"), py::arg("types"), py::arg("orders"), py::arg("k"),
        py::arg("grids") = std::vector<torch::Tensor>{}, py::arg("out") = py::none());
  m.def("gguf_rows", &gguf_rows, nogil, "rows `ids` of a GGUF tensor's bytes -> float32 (len(ids), K)",
        py::arg("raw"), py::arg("type"), py::arg("ids"), py::arg("k"), py::arg("grid") = py::none());
  m.def("quantize_act", &quantize_act, nogil, "x (M, K) -> int8 codes, scales, scale*sum per block of 32, half sums (HalfSums bytes)",
        py::arg("x"), py::arg("impl") = 0);
  m.def("q4_linear", &linear_of<Mode::Q4>, nogil, "x (M, K) @ Q4 weights^T (+ bias)", py::arg("x"), py::arg("packed"),
        py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("q8_linear", &linear_of<Mode::Q8>, nogil, "x (M, K) @ Q8 weights^T (+ bias)", py::arg("x"), py::arg("packed"),
        py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("q5_linear", &linear_of<Mode::Q5>, nogil, "x (M, K) @ Q5 weights^T (+ bias)", py::arg("x"), py::arg("packed"),
        py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("q4k_linear", &linear_of<Mode::Q4K>, nogil, "x (M, K) @ Q4K weights^T (+ bias)", py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("q5k_linear", &linear_of<Mode::Q5K>, nogil, "x (M, K) @ Q5K weights^T (+ bias)", py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("q6k_linear", &linear_of<Mode::Q6K>, nogil, "x (M, K) @ Q6K weights^T (+ bias)", py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("q6_linear", &linear_of<Mode::Q6>, nogil, "x (M, K) @ Q6 weights^T (+ bias)", py::arg("x"), py::arg("packed"),
        py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("q3_linear", &linear_of<Mode::Q3>, nogil, "x (M, K) @ Q3 weights^T (+ bias)", py::arg("x"), py::arg("packed"),
        py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("q2_linear", &linear_of<Mode::Q2>, nogil, "x (M, K) @ Q2 weights^T (+ bias)", py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("iq2_linear", &linear_of<Mode::IQ2>, nogil, "x (M, K) @ IQ2 weights^T (+ bias)", py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("iq4_linear", &linear_of<Mode::IQ4>, nogil, "x (M, K) @ IQ4 weights^T (+ bias)", py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
  m.def("mxfp4_linear", &linear_of<Mode::MXFP4>, nogil, "x (M, K) @ MXFP4 weights^T (+ bias)", py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("bias") = py::none(), py::arg("impl") = 0, py::arg("mr_max") = 0,
        py::arg("out") = py::none());
}
