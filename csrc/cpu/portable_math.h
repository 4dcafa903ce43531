// exp2 and log2 whose bits depend on nothing but the input element: childopt.portable_math, in the
// same fp32 operations in the same order (constants as there; the build has -ffp-contract=off, so
// no multiply and add fuse).  torch's CPU exp2 takes Sleef's function in its vector loop and libm's
// on each chunk's last elements, which differ in the last bit; these depend on the element alone.
// Element functions only, branch-free and forced inline so the ISA clones of a loop vectorise them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "bit_cast.h"

namespace childopt {
namespace cpu {

// childopt.portable_math.EXP2_COEFFICIENTS: 2**f - 1 = f * (c1 + f * (c2 + ... + f * c6)).
constexpr float kExp2Coefficients[6] = {0x1.62e43p-1f,  0x1.ebfbdcp-3f,  0x1.c6aed6p-5f,
                                        0x1.3b2cc4p-7f, 0x1.5f44dcp-10f, 0x1.4258d8p-13f};
// childopt.portable_math.LOG2_COEFFICIENTS: log2 m = t * (a1 + u * (a3 + ... + u * a9)).
constexpr float kLog2Coefficients[5] = {0x1.715476p+1f, 0x1.ec709cp-1f, 0x1.2777e6p-1f, 0x1.a56974p-2f,
                                        0x1.5f08d4p-2f};
constexpr float kSqrtHalf = 0x1.6a09e6p-1f;
constexpr float kExp2Limit = 200.0f;
constexpr int32_t kScaleSplit = 100;
// 2**f * 2**k with 2**f < 2**0.5 rounds to +0 for k below this (half the smallest subnormal or less).
constexpr int32_t kVanishing = -150;
// Adding and subtracting 1.5 * 2**23 rounds |y| <= 2**22 to an integer, ties to even, as
// torch.round does, in any ISA clone (SSE2 has no round instruction; this vectorises).
constexpr float kRoundingShift = 0x1.8p23f;

// fp32 2**k for int32 k in [-126, 127], from its exponent bits.
[[gnu::always_inline]] inline float power_of_two(int32_t k) {
  return bit_cast<float>(static_cast<uint32_t>(k + 127) << 23);
}

// childopt.portable_math.exp2 of one element.
[[gnu::always_inline]] inline float portable_exp2(float y) {
  y = y < -kExp2Limit ? -kExp2Limit : (y > kExp2Limit ? kExp2Limit : y);  // NaN stays NaN
  const float k = (y + kRoundingShift) - kRoundingShift;
  const float f = y - k;
  int32_t whole = static_cast<int32_t>(k == k ? k : 0.0f);  // NaN: f is NaN, so is the result
  // Below 2**-150 the result rounds to +0.  Those lanes (every zero score's) compute 2**f instead and
  // are replaced by 0: a multiply that underflows takes a microcode assist, 3x the whole loop's time.
  const bool vanishes = whole < kVanishing;
  whole = vanishes ? 0 : whole;
  const int32_t first = std::min(std::max(whole, -kScaleSplit), kScaleSplit);
  float acc = f * kExp2Coefficients[5];
  for (int i = 4; i >= 0; --i) acc = (acc + kExp2Coefficients[i]) * f;
  acc = acc + 1.0f;
  const float value = acc * power_of_two(first) * power_of_two(whole - first);
  return vanishes ? 0.0f : value;
}

// childopt.portable_math.log2 of one element: -inf at 0, inf at inf, NaN below 0 and at NaN.
[[gnu::always_inline]] inline float portable_log2(float x) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // A subnormal x is M * 2**-149 with M its mantissa bits: float(M) is exact and normal, so frexp
  // needs no arithmetic on a subnormal (which takes a microcode assist).
  const uint32_t x_bits = bit_cast<uint32_t>(x);
  const bool subnormal = x < 0x1p-126f;  // zero and negatives too: replaced at the end
  const float normal = subnormal ? static_cast<float>(static_cast<int32_t>(x_bits & 0x7FFFFFu)) : x;
  const uint32_t bits = bit_cast<uint32_t>(normal);
  int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xFFu) - 126 - (subnormal ? 149 : 0);
  float mantissa = bit_cast<float>((bits & 0x7FFFFFu) | 0x3F000000u);  // frexp's, in [1/2, 1)
  const bool low = mantissa < kSqrtHalf;
  mantissa = low ? mantissa * 2.0f : mantissa;
  exponent -= static_cast<int32_t>(low);
  const float t = (mantissa - 1.0f) / (mantissa + 1.0f);
  const float u = t * t;
  float acc = u * kLog2Coefficients[4];
  for (int i = 3; i >= 1; --i) acc = (acc + kLog2Coefficients[i]) * u;
  acc = (acc + kLog2Coefficients[0]) * t;
  const float out = static_cast<float>(exponent) + acc;
  const float special = x == 0.0f ? -kInf : (x == kInf ? kInf : std::numeric_limits<float>::quiet_NaN());
  return (x > 0.0f && x < kInf) ? out : special;
}

}  // namespace cpu
}  // namespace childopt
