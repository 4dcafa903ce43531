// Vectorised Philox4x32-10 (philox_cpu.h).  Intrinsics rather than target_clones: GCC vectorises
// the widening 32x32->64 multiply of a plain loop as a full 64-bit multiply (three vpmuludq per
// vector instead of one, slower than scalar code), so the rounds keep one counter per 64-bit lane
// and take each product whole from one vpmuludq.  Each vector step runs its counters through the
// 10 rounds; words leave in element order (a transpose), keep decisions are compared in the
// Philox layout and put in element order as bits (AVX-512) or bytes (AVX2).
#include "philox_cpu.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>

#include "childopt/importance_levels.h"
#include "cpu_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CHILDOPT_X86_PHILOX 1
#include <immintrin.h>
#endif

namespace childopt {
namespace cpu {
namespace {

// Scalar: one group at a time, the shared definition of philox.h.
void scalar_words(const BernoulliDraw& draw, uint64_t first, int64_t groups, uint32_t* words) {
  for (int64_t q = 0; q < groups; ++q) {
    const uint64_t group = first + static_cast<uint64_t>(q);
    uint32_t c[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                     static_cast<uint32_t>(draw.step), static_cast<uint32_t>(draw.step >> 32)};
    philox4x32_10(c, draw.seed_lo, draw.seed_hi);
    for (int w = 0; w < 4; ++w) words[4 * q + w] = c[w];
  }
}

void scalar_keep(const BernoulliDraw& draw, uint64_t first, int64_t groups, uint8_t* keep) {
  for (int64_t q = 0; q < groups; ++q) keep_group(draw, first + static_cast<uint64_t>(q), keep + 4 * q);
}

// Importance decisions and scales of given words by the portable definition (importance_levels.h),
// vectorised per ISA clone.
CHILDOPT_CPU_CLONES void portable_levels(const uint32_t* __restrict words, const uint8_t* __restrict codes,
                                         int64_t n, uint8_t* __restrict keep, float* __restrict scales) {
  for (int64_t i = 0; i < n; ++i) keep[i] = level_keep(words[i], codes[i]);
  if (scales == nullptr) return;
  for (int64_t i = 0; i < n; ++i) scales[i] = level_scale(codes[i]);
}

// Elements whose words the portable importance draw holds at a time.
constexpr int64_t kPortablePiece = 256;

// The importance draw through words: `words_fn` draws a piece's words, portable_levels decides.
void portable_importance(void (*words_fn)(const BernoulliDraw&, uint64_t, int64_t, uint32_t*),
                         const BernoulliDraw& draw, uint64_t first, int64_t n, const uint8_t* codes, uint8_t* keep,
                         float* scales) {
  uint32_t words[kPortablePiece];
  for (int64_t at = 0; at < n; at += kPortablePiece) {
    const int64_t count = std::min(kPortablePiece, n - at);
    words_fn(draw, first + static_cast<uint64_t>(at / 4), (count + 3) / 4, words);
    portable_levels(words, codes + at, count, keep + at, scales == nullptr ? nullptr : scales + at);
  }
}

#ifdef CHILDOPT_X86_PHILOX

// ---------------------------------------------------------------- AVX-512: 32 groups per step

// 8 counters per vector, one per 64-bit lane with its words in the low halves: vpmuludq then
// yields each full 64-bit product, the high word is one dword swap away and the low word is the
// product itself (the high half left in a lane is garbage that vpmuludq and the final
// narrowing ignore, and XOR keeps it out of the low half).  Four such vectors run interleaved,
// so the multiplies of one chain hide the latency of the others.
constexpr int kChains512 = 4;

struct Words512 {
  __m512i w[4];  // w[j] holds groups 4j .. 4j+3 of 16 groups, each as its 4 words in order
};

// Words c0..c3 of 16 groups (two chains of 8, in qword lanes) -> element order.
__attribute__((target("avx512f"))) inline Words512 transpose_512(const __m512i (&lo)[4], const __m512i (&hi)[4]) {
  __m512i c[4];
  for (int j = 0; j < 4; ++j) {
    c[j] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo[j])), _mm512_cvtepi64_epi32(hi[j]), 1);
  }
  // 4 x 16 transpose: within each 128-bit lane, then across lanes.
  const __m512i t0 = _mm512_unpacklo_epi32(c[0], c[1]);
  const __m512i t1 = _mm512_unpackhi_epi32(c[0], c[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(c[2], c[3]);
  const __m512i t3 = _mm512_unpackhi_epi32(c[2], c[3]);
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2);  // group 4k of 128-bit lane k
  const __m512i u1 = _mm512_unpackhi_epi64(t0, t2);  // group 4k + 1
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3);  // group 4k + 2
  const __m512i u3 = _mm512_unpackhi_epi64(t1, t3);  // group 4k + 3
  const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44);
  const __m512i v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
  const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE);
  const __m512i v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  return {{_mm512_shuffle_i32x4(v0, v1, 0x88), _mm512_shuffle_i32x4(v0, v1, 0xDD),
           _mm512_shuffle_i32x4(v2, v3, 0x88), _mm512_shuffle_i32x4(v2, v3, 0xDD)}};
}

// The state of groups first .. first + 31 after the 10 rounds, in Philox layout: c[w][v] holds
// word w of groups first + 8v .. first + 8v + 7, one per qword lane, in the low dword (the high
// dword is garbage).
struct Lanes512 {
  __m512i c[4][kChains512];
};

__attribute__((target("avx512f"))) inline Lanes512 rounds_512(const BernoulliDraw& draw, uint64_t first) {
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i low_word = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i step_lo = _mm512_set1_epi64(static_cast<uint32_t>(draw.step));
  const __m512i step_hi = _mm512_set1_epi64(static_cast<uint32_t>(draw.step >> 32));
  __m512i c0[kChains512], c1[kChains512], c2[kChains512], c3[kChains512];
  for (int v = 0; v < kChains512; ++v) {
    // 64-bit group numbers, so the carry into the high counter word is exact.
    const __m512i group = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first + 8u * v)), lane);
    c0[v] = _mm512_and_si512(group, low_word);
    c1[v] = _mm512_srli_epi64(group, 32);
    c2[v] = step_lo;
    c3[v] = step_hi;
  }
  const __m512i mul_a = _mm512_set1_epi64(kPhiloxRoundA);
  const __m512i mul_b = _mm512_set1_epi64(kPhiloxRoundB);
  uint32_t k0 = draw.seed_lo;
  uint32_t k1 = draw.seed_hi;
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi64(k0);
    const __m512i key1 = _mm512_set1_epi64(k1);
    for (int v = 0; v < kChains512; ++v) {
      const __m512i p0 = _mm512_mul_epu32(c0[v], mul_a);
      const __m512i p2 = _mm512_mul_epu32(c2[v], mul_b);
      // The high word to the low half by a dword swap (vpshufd, off the multiplier's port; the
      // low word it moves up is garbage like the rest of the high half), then a ^ b ^ c.  A
      // 32-bit shift instead measured 6% slower on Zen 4.
      c0[v] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(p2, _MM_PERM_CDAB), c1[v], key0, 0x96);
      c2[v] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(p0, _MM_PERM_CDAB), c3[v], key1, 0x96);
      c1[v] = p2;
      c3[v] = p0;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  Lanes512 lanes;
  for (int v = 0; v < kChains512; ++v) {
    lanes.c[0][v] = c0[v];
    lanes.c[1][v] = c1[v];
    lanes.c[2][v] = c2[v];
    lanes.c[3][v] = c3[v];
  }
  return lanes;
}

// The words of groups first .. first + 31, as two 16-group sets in element order.
__attribute__((target("avx512f"))) inline void philox_512(const BernoulliDraw& draw, uint64_t first,
                                                          Words512 (&out)[kChains512 / 2]) {
  const Lanes512 lanes = rounds_512(draw, first);
  for (int half = 0; half < kChains512 / 2; ++half) {
    const __m512i lo[4] = {lanes.c[0][2 * half], lanes.c[1][2 * half], lanes.c[2][2 * half], lanes.c[3][2 * half]};
    const __m512i hi[4] = {lanes.c[0][2 * half + 1], lanes.c[1][2 * half + 1], lanes.c[2][2 * half + 1],
                           lanes.c[3][2 * half + 1]};
    out[half] = transpose_512(lo, hi);
  }
}

__attribute__((target("avx512f"))) void avx512_words(const BernoulliDraw& draw, uint64_t first, int64_t groups,
                                                     uint32_t* words) {
  constexpr int64_t kGroups = 8 * kChains512;
  int64_t q = 0;
  for (; q + kGroups <= groups; q += kGroups) {
    Words512 out[kChains512 / 2];
    philox_512(draw, first + static_cast<uint64_t>(q), out);
    for (int half = 0; half < kChains512 / 2; ++half) {
      for (int j = 0; j < 4; ++j) _mm512_storeu_si512(words + 4 * q + 64 * half + 16 * j, out[half].w[j]);
    }
  }
  scalar_words(draw, first + static_cast<uint64_t>(q), groups - q, words + 4 * q);
}

// Keep decisions compared in the Philox layout, so no transpose: per vector of 8 groups, one
// compare per word (a 16-bit mask, its even bits valid), the four masks interleaved into the
// 32 element bits by two bit deposits (BMI2), and 64 decisions at a time expanded to bytes by
// one masked move (AVX-512BW).  The transpose and the byte narrowing cost as many shuffles as
// the rounds themselves: this draws 24.3M decisions in 8.6-8.9 ms on one Zen 4 core, against
// 11.4-11.5 ms through words in element order.
__attribute__((target("avx512f,avx512bw,bmi2"))) void avx512_keep(const BernoulliDraw& draw, uint64_t first,
                                                                  int64_t groups, uint8_t* keep) {
  // keep_threshold < 2**32 (check_draw), so `word < threshold` is an unsigned 32-bit compare.
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(draw.keep_threshold)));
  const __m512i one = _mm512_set1_epi8(1);
  constexpr __mmask16 kLowWords = 0x5555;
  constexpr int64_t kGroups = 8 * kChains512;
  int64_t q = 0;
  for (; q + kGroups <= groups; q += kGroups) {
    const Lanes512 lanes = rounds_512(draw, first + static_cast<uint64_t>(q));
    uint64_t bits[kChains512];
    for (int v = 0; v < kChains512; ++v) {
      uint32_t word_bits[4];  // bit 2g: word w of the vector's group g kept
      for (int w = 0; w < 4; ++w) word_bits[w] = _mm512_mask_cmplt_epu32_mask(kLowWords, lanes.c[w][v], threshold);
      // bits 2g, 2g + 1 of words 0, 1 (then 2, 3) -> element bits 4g, 4g + 1 (4g + 2, 4g + 3)
      bits[v] = _pdep_u32(word_bits[0] | (word_bits[1] << 1), 0x33333333u) |
                _pdep_u32(word_bits[2] | (word_bits[3] << 1), 0xCCCCCCCCu);
    }
    for (int half = 0; half < kChains512 / 2; ++half) {
      const __mmask64 kept = bits[2 * half] | (bits[2 * half + 1] << 32);
      _mm512_storeu_si512(keep + 4 * q + 64 * half, _mm512_maskz_mov_epi8(kept, one));
    }
  }
  scalar_keep(draw, first + static_cast<uint64_t>(q), groups - q, keep + 4 * q);
}

// The importance decisions of 16 elements from their words, and their scales unless `scales` is
// null: importance_levels.h with AVX-512F.  The threshold's mantissa is one permute
// (kLevelMantissas[k % 8] from a 16-entry table indexed by k's low 4 bits) and its octave two
// variable shifts, whose counts past 31 give 0 on x86: mantissa << 1 in octave 0, mantissa >>
// (octave - 1) after it, the other shift 0.  About 15 instructions per 16 elements, where the
// portable form's blends take about 80.
__attribute__((target("avx512f"))) inline void levels_512(__m512i words, const uint8_t* codes, uint8_t* keep,
                                                         float* scales) {
  alignas(64) static constexpr uint32_t kMantissas[16] = {CHILDOPT_LEVEL_MANTISSAS, CHILDOPT_LEVEL_MANTISSAS};
  const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const __m512i always_code = _mm512_set1_epi32(static_cast<int>(kLevelAlways));
  const __m512i k = _mm512_xor_si512(code, always_code);  // 255 - code
  const __m512i mantissa = _mm512_permutexvar_epi32(k, _mm512_load_si512(kMantissas));
  const __m512i octave = _mm512_srli_epi32(k, 3);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i threshold = _mm512_or_si512(_mm512_srlv_epi32(mantissa, _mm512_sub_epi32(octave, one)),
                                            _mm512_sllv_epi32(mantissa, _mm512_sub_epi32(one, octave)));
  const __mmask16 always = _mm512_cmpeq_epi32_mask(code, always_code);
  const __mmask16 sometimes = _mm512_test_epi32_mask(code, code);  // code != kLevelNever
  const __mmask16 kept = _mm512_kor(always, _mm512_mask_cmplt_epu32_mask(sometimes, words, threshold));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(keep), _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(kept, one)));
  if (scales == nullptr) return;
  // level_scale: code 255's threshold wrapped to 0 and its divisor is 2**32.
  const __m512 two_32 = _mm512_set1_ps(4294967296.0f);
  const __m512 divisor = _mm512_mask_mov_ps(_mm512_cvtepu32_ps(threshold), always, two_32);
  _mm512_storeu_ps(scales, _mm512_div_ps(two_32, divisor));
}

// The importance draw of n elements: 32 groups of words per step go straight from the Philox
// registers to the level compare; the last partial step through words in memory.
__attribute__((target("avx512f"))) void avx512_importance(const BernoulliDraw& draw, uint64_t first, int64_t n,
                                                          const uint8_t* codes, uint8_t* keep, float* scales) {
  constexpr int64_t kElements = 4 * 8 * kChains512;
  int64_t at = 0;
  for (; at + kElements <= n; at += kElements) {
    Words512 out[kChains512 / 2];
    philox_512(draw, first + static_cast<uint64_t>(at / 4), out);
    for (int half = 0; half < kChains512 / 2; ++half) {
      for (int j = 0; j < 4; ++j) {
        const int64_t e = at + 64 * half + 16 * j;
        levels_512(out[half].w[j], codes + e, keep + e, scales == nullptr ? nullptr : scales + e);
      }
    }
  }
  if (at < n) {
    portable_importance(scalar_words, draw, first + static_cast<uint64_t>(at / 4), n - at, codes + at, keep + at,
                        scales == nullptr ? nullptr : scales + at);
  }
}

__attribute__((target("avx512f"))) void avx512_levels(const uint32_t* words, const uint8_t* codes, int64_t n,
                                                      uint8_t* keep, float* scales) {
  int64_t at = 0;
  for (; at + 16 <= n; at += 16) {
    levels_512(_mm512_loadu_si512(words + at), codes + at, keep + at, scales == nullptr ? nullptr : scales + at);
  }
  portable_levels(words + at, codes + at, n - at, keep + at, scales == nullptr ? nullptr : scales + at);
}

// ---------------------------------------------------------------- AVX2: 8 groups per step

// The AVX-512 layout at half width: 4 counters per vector, one per qword lane, words in the low
// dwords, so one vpmuludq yields a whole product and one vpshufd its high word: 8 vector ops per
// 4 counters and round, where 8 counters in dword lanes take 18 (a multiply-high and -low pair
// is 2 multiplies, 3 shifts and 2 blends).  The draw is bound by those ops, not by latency: on a
// Zen 3 core the words of 64K elements (in L2) took 0.85 ns per element against 1.01 in dword
// lanes; the rounds alone took 0.66 ns per element with two interleaved chains, 0.92 with one
// and 0.75 with four (which spill the 16 ymm registers).
constexpr int kChains256 = 2;

// The state of groups first .. first + 4 * kChains256 - 1 after the 10 rounds: c[w][v] holds word w of groups
// first + 4v .. first + 4v + 3 in the low dwords of the qword lanes (the high dwords are garbage).
struct Lanes256 {
  __m256i c[4][kChains256];
};

__attribute__((target("avx2"))) inline Lanes256 rounds_256(const BernoulliDraw& draw, uint64_t first) {
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i low_word = _mm256_set1_epi64x(0xFFFFFFFFll);
  const __m256i step_lo = _mm256_set1_epi64x(static_cast<uint32_t>(draw.step));
  const __m256i step_hi = _mm256_set1_epi64x(static_cast<uint32_t>(draw.step >> 32));
  __m256i c0[kChains256], c1[kChains256], c2[kChains256], c3[kChains256];
  for (int v = 0; v < kChains256; ++v) {
    // 64-bit group numbers, so the carry into the high counter word is exact.
    const __m256i group = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(first + 4u * v)), lane);
    c0[v] = _mm256_and_si256(group, low_word);
    c1[v] = _mm256_srli_epi64(group, 32);
    c2[v] = step_lo;
    c3[v] = step_hi;
  }
  const __m256i mul_a = _mm256_set1_epi64x(kPhiloxRoundA);
  const __m256i mul_b = _mm256_set1_epi64x(kPhiloxRoundB);
  const __m256i key_step0 = _mm256_set1_epi64x(kPhiloxKeyA);
  const __m256i key_step1 = _mm256_set1_epi64x(kPhiloxKeyB);
  __m256i key0 = _mm256_set1_epi64x(draw.seed_lo);
  __m256i key1 = _mm256_set1_epi64x(draw.seed_hi);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    for (int v = 0; v < kChains256; ++v) {
      const __m256i p0 = _mm256_mul_epu32(c0[v], mul_a);
      const __m256i p2 = _mm256_mul_epu32(c2[v], mul_b);
      // key ^ c1 does not wait on the multiply, so a round's chain is multiply, swap, one XOR.
      c0[v] = _mm256_xor_si256(_mm256_shuffle_epi32(p2, 0xB1), _mm256_xor_si256(c1[v], key0));
      c2[v] = _mm256_xor_si256(_mm256_shuffle_epi32(p0, 0xB1), _mm256_xor_si256(c3[v], key1));
      c1[v] = p2;
      c3[v] = p0;
    }
    key0 = _mm256_add_epi32(key0, key_step0);
    key1 = _mm256_add_epi32(key1, key_step1);
  }
  Lanes256 lanes;
  for (int v = 0; v < kChains256; ++v) {
    lanes.c[0][v] = c0[v];
    lanes.c[1][v] = c1[v];
    lanes.c[2][v] = c2[v];
    lanes.c[3][v] = c3[v];
  }
  return lanes;
}

// Four qword-lane vectors x0..x3 (word w of 4 groups in x[w]'s low dwords) as each group's 4
// dwords: `even` holds group 0 | group 2 (one per 128-bit half), `odd` group 1 | group 3.
__attribute__((target("avx2"))) inline void group_words_256(__m256i x0, __m256i x1, __m256i x2, __m256i x3,
                                                            __m256i& even, __m256i& odd) {
  const __m256i words01 = _mm256_blend_epi32(x0, _mm256_slli_epi64(x1, 32), 0xAA);  // g0w0 g0w1 g1w0 g1w1 | g2, g3
  const __m256i words23 = _mm256_blend_epi32(x2, _mm256_slli_epi64(x3, 32), 0xAA);
  even = _mm256_unpacklo_epi64(words01, words23);
  odd = _mm256_unpackhi_epi64(words01, words23);
}

// Dwords in element order from four qword-lane vectors: `first` holds groups 0 and 1, `second`
// groups 2 and 3.
__attribute__((target("avx2"))) inline void interleave_256(__m256i x0, __m256i x1, __m256i x2, __m256i x3,
                                                           __m256i& first, __m256i& second) {
  __m256i even, odd;
  group_words_256(x0, x1, x2, x3, even, odd);
  first = _mm256_permute2x128_si256(even, odd, 0x20);
  second = _mm256_permute2x128_si256(even, odd, 0x31);
}

__attribute__((target("avx2"))) void avx2_words(const BernoulliDraw& draw, uint64_t first, int64_t groups,
                                                uint32_t* words) {
  constexpr int64_t kGroups = 4 * kChains256;
  int64_t q = 0;
  for (; q + kGroups <= groups; q += kGroups) {
    const Lanes256 lanes = rounds_256(draw, first + static_cast<uint64_t>(q));
    for (int v = 0; v < kChains256; ++v) {
      __m256i groups01, groups23;
      interleave_256(lanes.c[0][v], lanes.c[1][v], lanes.c[2][v], lanes.c[3][v], groups01, groups23);
      uint32_t* out = words + 4 * q + 16 * v;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), groups01);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), groups23);
    }
  }
  scalar_words(draw, first + static_cast<uint64_t>(q), groups - q, words + 4 * q);
}

// Keep decisions compared in the Philox layout (an unsigned compare through the sign flip), then
// the 0/-1 dwords put in element order and narrowed to bytes by saturating packs: per two chains,
// one 32-byte store.
__attribute__((target("avx2"))) void avx2_keep(const BernoulliDraw& draw, uint64_t first, int64_t groups,
                                               uint8_t* keep) {
  static_assert(kChains256 % 2 == 0, "chains are narrowed to bytes in pairs");
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i threshold =
      _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(draw.keep_threshold))), sign);
  const __m256i one = _mm256_set1_epi8(1);
  constexpr int64_t kGroups = 4 * kChains256;
  int64_t q = 0;
  for (; q + kGroups <= groups; q += kGroups) {
    const Lanes256 lanes = rounds_256(draw, first + static_cast<uint64_t>(q));
    __m256i packed[kChains256];  // int16 0/-1: groups 0, 1 | groups 2, 3 of the chain
    for (int v = 0; v < kChains256; ++v) {
      __m256i kept[4];
      for (int w = 0; w < 4; ++w) kept[w] = _mm256_cmpgt_epi32(threshold, _mm256_xor_si256(lanes.c[w][v], sign));
      __m256i even, odd;
      group_words_256(kept[0], kept[1], kept[2], kept[3], even, odd);
      packed[v] = _mm256_packs_epi32(even, odd);
    }
    for (int v = 0; v < kChains256; v += 2) {
      // bytes: chain v groups 0-1, chain v+1 groups 0-1 | chain v groups 2-3, chain v+1 groups 2-3
      const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(packed[v], packed[v + 1]), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + 4 * q + 16 * v), _mm256_and_si256(bytes, one));
    }
  }
  scalar_keep(draw, first + static_cast<uint64_t>(q), groups - q, keep + 4 * q);
}

// The importance decisions of 8 elements from their words, and their scales unless `scales` is
// null: levels_512 at half width.  vpermd reads the low 3 bits of k, the variable shifts give 0
// for counts past 31 as AVX-512's do, and AVX2 has no unsigned conversion: float(threshold) is
// float(high 16 bits) * 2**16 + float(low 16 bits), both exact, so the one rounding of the sum
// gives the correctly rounded value level_scale's conversion does.
__attribute__((target("avx2"))) inline void levels_256(__m256i words, const uint8_t* codes, uint8_t* keep,
                                                       float* scales) {
  alignas(32) static constexpr uint32_t kMantissas[8] = {CHILDOPT_LEVEL_MANTISSAS};
  const __m256i code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  const __m256i always_code = _mm256_set1_epi32(static_cast<int>(kLevelAlways));
  const __m256i k = _mm256_xor_si256(code, always_code);  // 255 - code
  const __m256i table = _mm256_load_si256(reinterpret_cast<const __m256i*>(kMantissas));
  const __m256i mantissa = _mm256_permutevar8x32_epi32(table, k);
  const __m256i octave = _mm256_srli_epi32(k, 3);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i threshold = _mm256_or_si256(_mm256_srlv_epi32(mantissa, _mm256_sub_epi32(octave, one)),
                                            _mm256_sllv_epi32(mantissa, _mm256_sub_epi32(one, octave)));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i below = _mm256_cmpgt_epi32(_mm256_xor_si256(threshold, sign), _mm256_xor_si256(words, sign));
  const __m256i always = _mm256_cmpeq_epi32(code, always_code);
  const __m256i never = _mm256_cmpeq_epi32(code, _mm256_setzero_si256());
  const __m256i kept = _mm256_and_si256(_mm256_or_si256(always, _mm256_andnot_si256(never, below)), one);
  const __m128i halves = _mm_packs_epi32(_mm256_castsi256_si128(kept), _mm256_extracti128_si256(kept, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(keep), _mm_packus_epi16(halves, halves));
  if (scales == nullptr) return;
  const __m256 high = _mm256_cvtepi32_ps(_mm256_srli_epi32(threshold, 16));
  const __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(threshold, _mm256_set1_epi32(0xFFFF)));
  const __m256 two_32 = _mm256_set1_ps(4294967296.0f);
  const __m256 converted = _mm256_add_ps(_mm256_mul_ps(high, _mm256_set1_ps(65536.0f)), low);
  // level_scale: code 255's threshold wrapped to 0 and its divisor is 2**32.
  const __m256 divisor = _mm256_blendv_ps(converted, two_32, _mm256_castsi256_ps(always));
  _mm256_storeu_ps(scales, _mm256_div_ps(two_32, divisor));
}

// The importance draw of n elements: 4 * kChains256 groups of words per step go from the Philox
// registers, put in element order, to the level compare; the last partial step through words in
// memory.
__attribute__((target("avx2"))) void avx2_importance(const BernoulliDraw& draw, uint64_t first, int64_t n,
                                                     const uint8_t* codes, uint8_t* keep, float* scales) {
  constexpr int64_t kElements = 16 * kChains256;
  int64_t at = 0;
  for (; at + kElements <= n; at += kElements) {
    const Lanes256 lanes = rounds_256(draw, first + static_cast<uint64_t>(at / 4));
    for (int v = 0; v < kChains256; ++v) {
      __m256i in_order[2];
      interleave_256(lanes.c[0][v], lanes.c[1][v], lanes.c[2][v], lanes.c[3][v], in_order[0], in_order[1]);
      for (int half = 0; half < 2; ++half) {
        const int64_t e = at + 16 * v + 8 * half;
        levels_256(in_order[half], codes + e, keep + e, scales == nullptr ? nullptr : scales + e);
      }
    }
  }
  if (at < n) {
    portable_importance(scalar_words, draw, first + static_cast<uint64_t>(at / 4), n - at, codes + at, keep + at,
                        scales == nullptr ? nullptr : scales + at);
  }
}

__attribute__((target("avx2"))) void avx2_levels(const uint32_t* words, const uint8_t* codes, int64_t n,
                                                 uint8_t* keep, float* scales) {
  int64_t at = 0;
  for (; at + 8 <= n; at += 8) {
    levels_256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + at)), codes + at, keep + at,
               scales == nullptr ? nullptr : scales + at);
  }
  portable_levels(words + at, codes + at, n - at, keep + at, scales == nullptr ? nullptr : scales + at);
}

bool cpu_has(PhiloxIsa isa) {
  // BW and BMI2 for the keep decisions' byte expansion and bit deposits (every AVX-512 CPU but
  // Xeon Phi, which runs the AVX2 path).
  if (isa == PhiloxIsa::kAvx512) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("bmi2");
  }
  if (isa == PhiloxIsa::kAvx2) return __builtin_cpu_supports("avx2");
  return true;
}

#else

bool cpu_has(PhiloxIsa isa) { return isa == PhiloxIsa::kScalar; }

#endif  // CHILDOPT_X86_PHILOX

PhiloxIsa detect() {
  if (cpu_has(PhiloxIsa::kAvx512)) return PhiloxIsa::kAvx512;
  if (cpu_has(PhiloxIsa::kAvx2)) return PhiloxIsa::kAvx2;
  return PhiloxIsa::kScalar;
}

std::atomic<PhiloxIsa>& current() {
  static std::atomic<PhiloxIsa> isa{detect()};
  return isa;
}

}  // namespace

PhiloxIsa philox_isa() { return current().load(std::memory_order_relaxed); }

PhiloxIsa best_philox_isa() { return detect(); }

PhiloxIsa set_philox_isa(PhiloxIsa isa) {
  TORCH_CHECK(isa == PhiloxIsa::kScalar || isa == PhiloxIsa::kAvx2 || isa == PhiloxIsa::kAvx512,
              "childopt: unknown Philox ISA ", static_cast<int64_t>(isa));
  TORCH_CHECK(cpu_has(isa), "childopt: this CPU cannot run the Philox ISA ", static_cast<int64_t>(isa));
  return current().exchange(isa);
}

#ifdef CHILDOPT_X86_PHILOX
namespace {

// An operation over Philox groups, writing T per element (keep bytes or words).
template <typename T>
using GroupsFn = void (*)(const BernoulliDraw&, uint64_t, int64_t, T*);

// The variant of an operation that the selected ISA runs.
template <typename T>
GroupsFn<T> for_selected_isa(GroupsFn<T> avx512, GroupsFn<T> avx2, GroupsFn<T> scalar) {
  switch (philox_isa()) {
    case PhiloxIsa::kAvx512:
      return avx512;
    case PhiloxIsa::kAvx2:
      return avx2;
    case PhiloxIsa::kScalar:
      break;
  }
  return scalar;
}

}  // namespace

#define CHILDOPT_FOR_SELECTED_ISA(OP) for_selected_isa(avx512_##OP, avx2_##OP, scalar_##OP)
#else
#define CHILDOPT_FOR_SELECTED_ISA(OP) scalar_##OP
#endif

void keep_groups(const BernoulliDraw& draw, uint64_t first_group, int64_t groups, uint8_t* keep) {
  CHILDOPT_FOR_SELECTED_ISA(keep)(draw, first_group, groups, keep);
}

void philox_words(const BernoulliDraw& draw, uint64_t first_group, int64_t groups, uint32_t* words) {
  CHILDOPT_FOR_SELECTED_ISA(words)(draw, first_group, groups, words);
}

void importance_draw(const BernoulliDraw& draw, uint64_t first_group, int64_t n, const uint8_t* codes,
                     uint8_t* keep, float* scales) {
#ifdef CHILDOPT_X86_PHILOX
  if (philox_isa() == PhiloxIsa::kAvx512) return avx512_importance(draw, first_group, n, codes, keep, scales);
  if (philox_isa() == PhiloxIsa::kAvx2) return avx2_importance(draw, first_group, n, codes, keep, scales);
#endif
  portable_importance(CHILDOPT_FOR_SELECTED_ISA(words), draw, first_group, n, codes, keep, scales);
}

#undef CHILDOPT_FOR_SELECTED_ISA

void importance_levels(const uint32_t* words, const uint8_t* codes, int64_t n, uint8_t* keep, float* scales) {
#ifdef CHILDOPT_X86_PHILOX
  if (philox_isa() == PhiloxIsa::kAvx512) return avx512_levels(words, codes, n, keep, scales);
  if (philox_isa() == PhiloxIsa::kAvx2) return avx2_levels(words, codes, n, keep, scales);
#endif
  portable_levels(words, codes, n, keep, scales);
}

}  // namespace cpu
}  // namespace childopt
