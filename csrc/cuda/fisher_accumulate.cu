// In-place Fisher accumulation over many CUDA tensors: fisher[i] += (grads[i] * scales[i])^2.
//
// Bytes per element (fp32 grad): fisher 4+4, g 4 = 12.  fp32 math in the order
// (g * c) * (g * c) + f, as the CPU kernel and the reference's addcmul.  The scale stays on the
// device (a clip or GradScaler coefficient), so accumulation never syncs with the host.
// Four elements per thread, vector accesses where aligned.  Layout: multi_tensor.cuh.
#include "multi_tensor.cuh"
#include "storage.cuh"

namespace childopt {
namespace cuda_kernels {
namespace {

template <typename G>
__device__ __forceinline__ void accumulate_chunk(const TensorListMeta<2>& meta, const ChunkWork<2>& work,
                                                 const float* __restrict__ scales) {
  float* __restrict__ f = static_cast<float*>(meta.ptr[0][work.slot]) + work.start;
  const G* __restrict__ g = static_cast<const G*>(meta.ptr[1][work.slot]) + work.start;
  const float scale = scales[meta.extra[work.slot]];
  const bool vec = vec4_aligned<float>(f) && vec4_aligned<G>(g);
  for (int64_t i = 4 * static_cast<int64_t>(threadIdx.x); i < work.n; i += 4 * kThreads) {
    const bool full = vec && i + 4 <= work.n;
    float f_old[4];
    G g_raw[4];
    load4(f, i, work.n, full, f_old);
    load4(g, i, work.n, full, g_raw);
    float f_new[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float x = Storage<G>::load(g_raw[k]) * scale;
      f_new[k] = f_old[k] + x * x;
    }
    store4(f, i, work.n, full, f_new);
  }
}

template <typename G>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    fisher_accumulate_kernel(TensorListMeta<2> meta, const float* scales) {
  for_each_chunk(meta, [&](const ChunkWork<2>& work) { accumulate_chunk<G>(meta, work, scales); });
}

struct LaunchFisher {
  const std::vector<TensorRefs>& tensors;
  const float* scales;
  cudaStream_t stream;
  cudaError_t* result;

  template <typename G, typename Unused>
  void operator()() const {
    const auto kernel = fisher_accumulate_kernel<G>;
    *result = multi_tensor_apply<2>(tensors, resident_blocks<fisher_accumulate_kernel<G>>(),
                                    [&](const TensorListMeta<2>& meta, int blocks) {
                                      kernel<<<blocks, kThreads, 0, stream>>>(meta, scales);
                                    });
  }
};

}  // namespace

cudaError_t fisher_accumulate(const std::vector<TensorRefs>& tensors, DType g_dtype, const float* scales,
                              cudaStream_t stream) {
  cudaError_t result = cudaSuccess;
  dispatch_storage(g_dtype, false, LaunchFisher{tensors, scales, stream, &result});
  return result;
}

}  // namespace cuda_kernels
}  // namespace childopt
