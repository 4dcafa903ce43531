// Multi-tensor masked AdamW on CUDA: mask kinds none / dense / Bernoulli / importance, freeze or
// zero-grad, amsgrad; fp32/bf16/fp16 params (fp32 or matching grads) with fp32 state.
//
// Bytes per element (fp32): p, g, m, v read + p, m, v written = 28 (+1 dense mask or importance
// level code, +8 amsgrad); Bernoulli masks cost none (Philox in registers, one call per 4
// elements); importance thresholds and scales come from the code (importance_levels.h).  Each thread
// steps one Philox group of 4 consecutive elements with vector accesses (128-bit for fp32)
// where the chunk is aligned; a tensor's last partial group is guarded element by element.
// Frozen entries are written back with their old bits so accesses stay whole vectors.  Each
// tensor's scalars (and its Philox base and step) are one float64 row, read once per block.
// Layout: multi_tensor.cuh (a persistent grid; each block steps 64K-element chunks; int64 offsets).
#include "childopt/importance_levels.h"
#include "multi_tensor.cuh"
#include "storage.cuh"

namespace childopt {
namespace cuda_kernels {
namespace {

// One chunk of one tensor.
template <typename P, typename G, bool AMSGRAD, int KIND, bool FREEZE>
__device__ __forceinline__ void step_chunk(const TensorListMeta<6>& meta, const ChunkWork<6>& work,
                                           const double* __restrict__ rows, BernoulliDraw draw) {
  constexpr bool kCoded = KIND == 1 || KIND == 3;  // a byte per element: dense mask or level code
  const StepScalars s = step_scalars_from_row(rows + meta.extra[work.slot] * kNumStepScalars);
  StepScalars unit = s;  // importance zero-grad gradients arrive signed and scaled
  unit.grad_sign = 1.0f;
  unit.grad_scale = 1.0f;
  draw.step = s.step;
  P* __restrict__ p = static_cast<P*>(meta.ptr[0][work.slot]) + work.start;
  const G* __restrict__ g = static_cast<const G*>(meta.ptr[1][work.slot]) + work.start;
  float* __restrict__ m = static_cast<float*>(meta.ptr[2][work.slot]) + work.start;
  float* __restrict__ v = static_cast<float*>(meta.ptr[3][work.slot]) + work.start;
  float* __restrict__ vmax = AMSGRAD ? static_cast<float*>(meta.ptr[4][work.slot]) + work.start : nullptr;
  const uint8_t* __restrict__ mask =
      kCoded ? static_cast<const uint8_t*>(meta.ptr[5][work.slot]) + work.start : nullptr;
  const bool vec = vec4_aligned<P>(p) && vec4_aligned<G>(g) && vec4_aligned<float>(m) && vec4_aligned<float>(v) &&
                   (!AMSGRAD || vec4_aligned<float>(vmax)) && (!kCoded || vec4_aligned<uint8_t>(mask));
  const uint64_t group0 = s.rng_base + static_cast<uint64_t>(work.start / 4);

  for (int64_t i = 4 * static_cast<int64_t>(threadIdx.x); i < work.n; i += 4 * kThreads) {
    const bool full = vec && i + 4 <= work.n;
    uint8_t keep[4] = {1, 1, 1, 1};
    uint8_t code[4] = {0, 0, 0, 0};
    float scale[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (KIND == 1) load4(mask, i, work.n, full, keep);
    if (KIND == 2) keep_group(draw, group0 + static_cast<uint64_t>(i / 4), keep);
    if (KIND == 3) {
      uint32_t words[4];
      group_words(draw, group0 + static_cast<uint64_t>(i / 4), words);
      load4(mask, i, work.n, full, code);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        keep[k] = level_keep(words[k], code[k]);
        scale[k] = level_scale(code[k]);
      }
    }
    P p_raw[4];
    G g_raw[4];
    float m_old[4], v_old[4], vmax_old[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    load4(p, i, work.n, full, p_raw);
    load4(g, i, work.n, full, g_raw);
    load4(m, i, work.n, full, m_old);
    load4(v, i, work.n, full, v_old);
    if (AMSGRAD) load4(vmax, i, work.n, full, vmax_old);
    P p_new[4];
    float m_new[4], v_new[4], vmax_new[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool dropped = KIND != 0 && keep[k] == 0;
      // importance, zero-grad: g * grad_sign * (the level's scale, in place of grad_scale), then the
      // update with unit scalars
      const bool rescaled = KIND == 3 && !FREEZE;
      const float g_k = rescaled ? Storage<G>::load(g_raw[k]) * s.grad_sign * scale[k] : Storage<G>::load(g_raw[k]);
      const ElementState e = adamw_element<AMSGRAD>(Storage<P>::load(p_raw[k]), g_k, m_old[k], v_old[k],
                                                    vmax_old[k], !FREEZE && dropped, rescaled ? unit : s);
      const bool frozen = FREEZE && dropped;
      p_new[k] = frozen ? p_raw[k] : Storage<P>::store(e.p);
      m_new[k] = frozen ? m_old[k] : e.m;
      v_new[k] = frozen ? v_old[k] : e.v;
      vmax_new[k] = frozen ? vmax_old[k] : e.vmax;
    }
    store4(p, i, work.n, full, p_new);
    store4(m, i, work.n, full, m_new);
    store4(v, i, work.n, full, v_new);
    if (AMSGRAD) store4(vmax, i, work.n, full, vmax_new);
  }
}

template <typename P, typename G, bool AMSGRAD, int KIND, bool FREEZE>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    masked_adamw_kernel(TensorListMeta<6> meta, const double* __restrict__ rows, BernoulliDraw draw) {
  for_each_chunk(meta, [&](const ChunkWork<6>& work) { step_chunk<P, G, AMSGRAD, KIND, FREEZE>(meta, work, rows, draw); });
}

struct LaunchAdamw {
  const std::vector<TensorRefs>& tensors;
  const AdamwConfig& config;
  cudaStream_t stream;
  cudaError_t* result;

  template <typename P, typename G, bool AMSGRAD, int KIND, bool FREEZE>
  void run() const {
    const auto kernel = masked_adamw_kernel<P, G, AMSGRAD, KIND, FREEZE>;
    *result = multi_tensor_apply<6>(tensors, resident_blocks<masked_adamw_kernel<P, G, AMSGRAD, KIND, FREEZE>>(),
                                    [&](const TensorListMeta<6>& meta, int blocks) {
                                      kernel<<<blocks, kThreads, 0, stream>>>(meta, config.scalars, config.draw);
                                    });
  }

  template <typename P, typename G, bool AMSGRAD>
  void by_mask() const {
    switch (config.mask_kind) {
      case MaskKind::kDense:
        return config.freeze ? run<P, G, AMSGRAD, 1, true>() : run<P, G, AMSGRAD, 1, false>();
      case MaskKind::kBernoulli:
        return config.freeze ? run<P, G, AMSGRAD, 2, true>() : run<P, G, AMSGRAD, 2, false>();
      case MaskKind::kImportance:
        return config.freeze ? run<P, G, AMSGRAD, 3, true>() : run<P, G, AMSGRAD, 3, false>();
      default:
        return run<P, G, AMSGRAD, 0, false>();
    }
  }

  template <typename P, typename G>
  void operator()() const {
    return config.amsgrad ? by_mask<P, G, true>() : by_mask<P, G, false>();
  }
};

}  // namespace

cudaError_t adamw_step(const std::vector<TensorRefs>& tensors, const AdamwConfig& config, cudaStream_t stream) {
  cudaError_t result = cudaSuccess;
  dispatch_storage(config.p_dtype, config.g_float, LaunchAdamw{tensors, config, stream, &result});
  return result;
}

}  // namespace cuda_kernels
}  // namespace childopt
