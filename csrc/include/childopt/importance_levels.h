// The importance mask's levels (childopt/importance.py): a uint8 code per element, its keep
// threshold and gradient scale computed from the code with shifts and selects, identically on the
// CPU, in CUDA and in Triton (no table, so CPU loops vectorise without gathers).
//
//   k = 255 - code, threshold = kLevelMantissas[k % 8] << 1 (k < 8) or >> (k / 8 - 1) (k >= 8);
//   code 0: never kept; code 255: always kept (threshold 2**32, scale 1);
//   keep = word < threshold;  scale = 2**32 / float(threshold) in fp32 (zero-grad only).
#pragma once

#include <cstdint>

#include "childopt/adamw_element.h"

namespace childopt {

// round(2 ** (31 - j / 8)): childopt.importance.MANTISSAS (a test compares them).
#define CHILDOPT_LEVEL_MANTISSAS 2147483648u, 1969251188u, 1805811301u, 1655936265u, 1518500250u, 1392470869u, \
                                 1276901417u, 1170923762u
constexpr uint32_t kLevelNever = 0;
constexpr uint32_t kLevelAlways = 255;

// Everything below is written with masks and arithmetic, not branches, selects or an array
// lookup: GCC turns a chain of selects into a switch, and a lookup into a gather, and either
// keeps the CPU loops scalar (7-9 ns per element instead of about 0.4).
CHILDOPT_HD uint32_t all_ones_if(bool condition) { return 0u - static_cast<uint32_t>(condition); }

CHILDOPT_HD uint32_t blend(uint32_t mask, uint32_t if_set, uint32_t if_clear) {
  return (if_set & mask) | (if_clear & ~mask);
}

// kLevelMantissas[j] by a binary tree of blends on j's three bits (7 blends: one ternary-logic
// instruction each with AVX-512).
CHILDOPT_HD uint32_t level_mantissa(uint32_t j) {
  constexpr uint32_t m[8] = {CHILDOPT_LEVEL_MANTISSAS};
  const uint32_t bit0 = all_ones_if(j & 1u), bit1 = all_ones_if(j & 2u), bit2 = all_ones_if(j & 4u);
  const uint32_t low = blend(bit1, blend(bit0, m[3], m[2]), blend(bit0, m[1], m[0]));
  const uint32_t high = blend(bit1, blend(bit0, m[7], m[6]), blend(bit0, m[5], m[4]));
  return blend(bit2, high, low);
}

// The threshold of codes 0..254 (code 255's 2**32 wraps to 0 here); the right shift by
// `shift - 1` is taken modulo 32 and discarded when `shift` is 0.
CHILDOPT_HD uint32_t level_threshold32(uint32_t code) {
  const uint32_t k = kLevelAlways - code;
  const uint32_t mantissa = level_mantissa(k & 7u);
  const uint32_t shift = k >> 3;
  const uint32_t first_octave = all_ones_if(shift == 0);
  return ((mantissa << 1) & first_octave) | ((mantissa >> ((shift + 31u) & 31u)) & ~first_octave);
}

CHILDOPT_HD bool level_keep(uint32_t word, uint32_t code) {
  return (code == kLevelAlways) | ((code != kLevelNever) & (word < level_threshold32(code)));
}

// The keep probability of a code in fp32, float(threshold) / 2**32 (code 0: 0, code 255: 1):
// childopt.importance.level_probabilities().float().
CHILDOPT_HD float level_probability(uint32_t code) {
  const uint32_t threshold = level_threshold32(code) & all_ones_if(code != kLevelNever);
  return static_cast<float>(threshold) * 0x1p-32f + static_cast<float>(code == kLevelAlways);
}

// 2**32 / float(threshold) in fp32; code 255's wrapped 0 becomes 2**32 by an exact add, so its scale is 1.
CHILDOPT_HD float level_scale(uint32_t code) {
  const float divisor = static_cast<float>(level_threshold32(code)) +
                        static_cast<float>(code == kLevelAlways) * 4294967296.0f;
  return div_rn(4294967296.0f, divisor);
}

}  // namespace childopt
