// Block-level pieces of the CPU AdamW steps (masked_adamw.cpp, sparse_adamw.cpp): the element
// update of adamw_element.h over a block in raw storage, and the loops that widen 16-bit
// elements into fp32 scratch and narrow them back.  Each is one loop the compiler vectorises per
// ISA clone.  They live in an unnamed namespace on purpose: every kernel file gets its own
// target_clones copies (and ifunc resolvers), never a shared inline definition across objects.
#pragma once

#include "cpu_common.h"

namespace childopt {
namespace cpu {
namespace {

enum class Keep { kAll, kZeroGrad, kFreeze };

// The update of one block on raw storage; frozen entries are written back with their old bits.
// SCALED (the importance mask under zero-grad): each gradient is scaled by its element's entry of
// `scales` in place of grad_scale, g * grad_sign * scales[i], the product adamw_element forms.
template <typename P, typename G, bool AMSGRAD, Keep KEEP, bool SCALED>
CHILDOPT_CPU_CLONES void adamw_block(Raw<P>* __restrict p, const Raw<G>* __restrict g, float* __restrict m,
                                     float* __restrict v, float* __restrict vmax, const uint8_t* __restrict keep,
                                     const float* __restrict scales, int64_t n, StepScalars s) {
  const float grad_sign = s.grad_sign;
  if constexpr (SCALED) {
    s.grad_sign = 1.0f;
    s.grad_scale = 1.0f;
  }
  for (int64_t i = 0; i < n; ++i) {
    bool dropped = false;
    if constexpr (KEEP != Keep::kAll) dropped = keep[i] == 0;
    const Raw<P> p_old = p[i];
    const float m_old = m[i];
    const float v_old = v[i];
    const float vmax_old = AMSGRAD ? vmax[i] : 0.0f;
    float grad = Storage<G>::load(g[i]);
    if constexpr (SCALED) grad = grad * grad_sign * scales[i];
    const ElementState e = adamw_element<AMSGRAD>(Storage<P>::load(p_old), grad, m_old, v_old, vmax_old,
                                                  KEEP == Keep::kZeroGrad && dropped, s);
    const bool frozen = KEEP == Keep::kFreeze && dropped;
    p[i] = frozen ? p_old : Storage<P>::store(e.p);
    m[i] = frozen ? m_old : e.m;
    v[i] = frozen ? v_old : e.v;
    if (AMSGRAD) vmax[i] = frozen ? vmax_old : e.vmax;
  }
}

// 16-bit elements of a block widened into fp32 scratch.
template <typename T>
CHILDOPT_CPU_CLONES void widen_block(const Raw<T>* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Storage<T>::load(src[i]);
}

// Updated fp32 scratch narrowed back into 16-bit params; under freeze a frozen entry keeps its
// old bits (a NaN payload would not survive the round trip).
template <typename P, bool FREEZE>
CHILDOPT_CPU_CLONES void narrow_block(Raw<P>* __restrict dst, const float* __restrict src,
                                      const uint8_t* __restrict keep, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const Raw<P> old = dst[i];
    const Raw<P> fresh = Storage<P>::store(src[i]);
    dst[i] = (FREEZE && keep[i] == 0) ? old : fresh;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace childopt
