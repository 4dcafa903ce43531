// The AdamW element update of childopt/backends/contract.py, shared by every native kernel.
//
// fp32 math with IEEE sqrt and division and no contraction into FMA (compile with
// -ffp-contract=off / --fmad=false), in the order the Triton kernel uses, so the native CPU,
// native CUDA and Triton kernels round identically.  Switches the host resolves once per
// bucket are folded into exact scalars instead of template flags: maximize is g * -1,
// decay before or after the update is a multiply by 1 on the other side, an unscaled gradient
// is g * 1.  Multiplying by +-1 is exact, so no result changes and the kernels stay few.
#pragma once

#include <cstdint>
#include <cstring>

#include "childopt/step_scalars.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace childopt {

CHILDOPT_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

CHILDOPT_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

// bf16 storage: round to nearest even by hand, NaN to 0x7FC0 (c10::BFloat16's and Triton's
// round_to bits), so CPU and CUDA produce the same bits without either library's conversion.
CHILDOPT_HD uint16_t bf16_bits_from_float(float x) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof bits);
#endif
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return x != x ? uint16_t{0x7FC0} : rounded;  // a select, not a branch, so CPU loops vectorise
}

CHILDOPT_HD float float_from_bf16_bits(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// The moments and parameter of one element after one step; `keep == false` (dropped under
// zero-grad) means a zero gradient.  The caller writes the results back, or the old values
// when the element is frozen.
struct ElementState {
  float p;
  float m;
  float v;
  float vmax;
};

template <bool AMSGRAD>
CHILDOPT_HD ElementState adamw_element(float p, float g, float m, float v, float vmax, bool zero_grad,
                                       const StepScalars& s) {
  g = g * s.grad_sign;
  g = zero_grad ? 0.0f : g * s.grad_scale;
  p = p * s.decay_before;
  // Both sides of torch.lerp's formula and a select: a branch would keep CPU loops scalar.
  const float m_from_start = m + s.one_minus_beta1 * (g - m);
  const float m_from_end = g - (g - m) * (1.0f - s.one_minus_beta1);
  m = s.lerp_from_start ? m_from_start : m_from_end;
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  float second = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    second = vmax;
  }
  const float denom = div_rn(sqrt_rn(second), s.bc2_sqrt) + s.eps;
  p = p - div_rn(s.step_size * m, denom);
  p = p * s.decay_after;
  return {p, m, v, vmax};
}

}  // namespace childopt
