// Philox4x32-10 and the Child-Tuning-F keep rule, shared by the CPU and CUDA kernels.
//
// The same stream as childopt/philox.py (the definition) and kernels/philox.py (Triton):
//   key     = (seed lo, seed hi)
//   counter = (group lo, group hi, step lo, step hi),  group = rng_base + element / 4
//   keep    = word[element % 4] < keep_threshold
// One Philox call serves four consecutive elements of a tensor, so the mask of an element is a
// pure function of (seed, step, global index) on every backend, grid and chunking.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CHILDOPT_HD __host__ __device__ __forceinline__
#else
#define CHILDOPT_HD inline
#endif

namespace childopt {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

CHILDOPT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four words of Philox4x32-10 for counter c (in/out) and key (k0, k1).
CHILDOPT_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c[0];
    const uint32_t a2 = c[2];
    c[0] = mulhi32(a2, kPhiloxRoundB) ^ c[1] ^ k0;
    c[2] = mulhi32(a0, kPhiloxRoundA) ^ c[3] ^ k1;
    c[1] = a2 * kPhiloxRoundB;
    c[3] = a0 * kPhiloxRoundA;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// The Bernoulli draw of one step: seed words, step and the uint32 keep threshold.
struct BernoulliDraw {
  uint32_t seed_lo;
  uint32_t seed_hi;
  uint64_t step;
  uint64_t keep_threshold;  // up to 2**32 - 1; compared as 64-bit so the rule is `word < threshold`
};

// The four words of Philox group `group` at the draw's step.
CHILDOPT_HD void group_words(const BernoulliDraw& draw, uint64_t group, uint32_t c[4]) {
  c[0] = static_cast<uint32_t>(group);
  c[1] = static_cast<uint32_t>(group >> 32);
  c[2] = static_cast<uint32_t>(draw.step);
  c[3] = static_cast<uint32_t>(draw.step >> 32);
  philox4x32_10(c, draw.seed_lo, draw.seed_hi);
}

// Keep decisions (0/1) of the four elements of Philox group `group`.
CHILDOPT_HD void keep_group(const BernoulliDraw& draw, uint64_t group, uint8_t keep[4]) {
  uint32_t c[4];
  group_words(draw, group, c);
  for (int w = 0; w < 4; ++w) keep[w] = static_cast<uint64_t>(c[w]) < draw.keep_threshold;
}

}  // namespace childopt
