// AdamW on the selected entries of CUDA tensors (sparse-index storage): the element update of
// adamw_element.h at p[idx[k]] with compact state m[k], v[k] (and vmax[k]).
//
// Bytes per selected element (fp32, int32 indices): idx 4 + p 4+4 + g 4 + m, v 8+8 = 32.
// Each thread steps 4 consecutive selected entries: their indices and compact state in one vector
// access each where aligned, then all four gathers of p (and g) before any is used, so the
// gathers' latencies overlap (sorted indices keep neighbouring threads on neighbouring lines).  Indices are unique, so
// no two threads write one entry.  Each tensor's scalars are one float64 row.  Layout: multi_tensor.cuh over the index lists.
#include "multi_tensor.cuh"
#include "storage.cuh"

namespace childopt {
namespace cuda_kernels {
namespace {

template <typename P, typename G, typename I, bool AMSGRAD, bool COMPACT>
__device__ __forceinline__ void step_chunk(const TensorListMeta<6>& meta, const ChunkWork<6>& work,
                                           const double* __restrict__ rows) {
  const StepScalars s = step_scalars_from_row(rows + meta.extra[work.slot] * kNumStepScalars);
  P* __restrict__ p = static_cast<P*>(meta.ptr[0][work.slot]);
  const G* __restrict__ g = static_cast<const G*>(meta.ptr[1][work.slot]);
  const I* __restrict__ idx = static_cast<const I*>(meta.ptr[2][work.slot]) + work.start;
  float* __restrict__ m = static_cast<float*>(meta.ptr[3][work.slot]) + work.start;
  float* __restrict__ v = static_cast<float*>(meta.ptr[4][work.slot]) + work.start;
  float* __restrict__ vmax = AMSGRAD ? static_cast<float*>(meta.ptr[5][work.slot]) + work.start : nullptr;
  if (COMPACT) g += work.start;
  const bool vec = vec4_aligned<I>(idx) && vec4_aligned<float>(m) && vec4_aligned<float>(v) &&
                   (!AMSGRAD || vec4_aligned<float>(vmax)) && (!COMPACT || vec4_aligned<G>(g));
  for (int64_t i = 4 * static_cast<int64_t>(threadIdx.x); i < work.n; i += 4 * kThreads) {
    const bool full = vec && i + 4 <= work.n;
    I j[4] = {0, 0, 0, 0};
    load4(idx, i, work.n, full, j);
    // The four gathers of p (and g) are issued before any is used, so their latencies overlap.
    P p_raw[4] = {};
    G g_raw[4] = {};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (i + k < work.n) {
        p_raw[k] = p[j[k]];
        if (!COMPACT) g_raw[k] = g[j[k]];
      }
    }
    if (COMPACT) load4(g, i, work.n, full, g_raw);
    float m_old[4] = {}, v_old[4] = {}, vmax_old[4] = {};
    load4(m, i, work.n, full, m_old);
    load4(v, i, work.n, full, v_old);
    if (AMSGRAD) load4(vmax, i, work.n, full, vmax_old);
    float m_new[4], v_new[4], vmax_new[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const ElementState e = adamw_element<AMSGRAD>(Storage<P>::load(p_raw[k]), Storage<G>::load(g_raw[k]),
                                                    m_old[k], v_old[k], vmax_old[k], false, s);
      if (i + k < work.n) p[j[k]] = Storage<P>::store(e.p);
      m_new[k] = e.m;
      v_new[k] = e.v;
      vmax_new[k] = e.vmax;
    }
    store4(m, i, work.n, full, m_new);
    store4(v, i, work.n, full, v_new);
    if (AMSGRAD) store4(vmax, i, work.n, full, vmax_new);
  }
}

template <typename P, typename G, typename I, bool AMSGRAD, bool COMPACT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    sparse_adamw_kernel(TensorListMeta<6> meta, const double* __restrict__ rows) {
  for_each_chunk(meta, [&](const ChunkWork<6>& work) { step_chunk<P, G, I, AMSGRAD, COMPACT>(meta, work, rows); });
}

struct LaunchSparse {
  const std::vector<TensorRefs>& tensors;
  const SparseAdamwConfig& config;
  cudaStream_t stream;
  cudaError_t* result;

  template <typename P, typename G, typename I, bool AMSGRAD, bool COMPACT>
  void run() const {
    const auto kernel = sparse_adamw_kernel<P, G, I, AMSGRAD, COMPACT>;
    *result = multi_tensor_apply<6>(tensors, resident_blocks<sparse_adamw_kernel<P, G, I, AMSGRAD, COMPACT>>(),
                                    [&](const TensorListMeta<6>& meta, int blocks) {
                                      kernel<<<blocks, kThreads, 0, stream>>>(meta, config.scalars);
                                    });
  }

  template <typename P, typename G, typename I>
  void by_flags() const {
    if (config.amsgrad) return config.compact_grads ? run<P, G, I, true, true>() : run<P, G, I, true, false>();
    return config.compact_grads ? run<P, G, I, false, true>() : run<P, G, I, false, false>();
  }

  template <typename P, typename G>
  void operator()() const {
    return config.wide_indices ? by_flags<P, G, int64_t>() : by_flags<P, G, int32_t>();
  }
};

}  // namespace

cudaError_t sparse_adamw_step(const std::vector<TensorRefs>& tensors, const SparseAdamwConfig& config,
                              cudaStream_t stream) {
  cudaError_t result = cudaSuccess;
  dispatch_storage(config.p_dtype, config.g_float, LaunchSparse{tensors, config, stream, &result});
  return result;
}

}  // namespace cuda_kernels
}  // namespace childopt
