// One radix-select pass over fp32 scores of many CUDA tensors (childopt/masks.py).
//
// Each score s (-0.0 counted as +0.0) has the order-preserving key `bits | 0x80000000` (s >= 0)
// or `~bits` (s < 0).  Per scope, the pass counts the keys that agree with the scope's prefix
// above bit shift + bits, into bin (key >> shift) & (2**bits - 1).  Bytes: 4 per element, read
// only.  Each block counts its chunk in shared memory (2**bits 32-bit bins, 8 KB at 11 bits)
// and adds the non-zero bins to the global int64 histogram with one atomic each.
#include "multi_tensor.cuh"

namespace childopt {
namespace cuda_kernels {
namespace {

constexpr int kMaxSharedBits = 12;

// One chunk's counts into the block's shared bins, then its non-zero bins into its scope's row.
__device__ __forceinline__ void count_chunk(const TensorListMeta<1>& meta, const ChunkWork<1>& work,
                                            uint32_t* local, int64_t* hist, const int64_t* prefixes, int shift,
                                            int bits) {
  const float* __restrict__ s = static_cast<const float*>(meta.ptr[0][work.slot]) + work.start;
  const int64_t scope = meta.extra[work.slot];
  const int bins = 1 << bits;
  const uint32_t bin_mask = static_cast<uint32_t>(bins - 1);
  const bool check_prefix = shift + bits < 32;
  const int64_t prefix = prefixes[scope];
  for (int b = threadIdx.x; b < bins; b += kThreads) local[b] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < work.n; i += kThreads) {
    const uint32_t b = __float_as_uint(s[i] + 0.0f);
    const uint32_t key = (b >> 31) ? ~b : (b | 0x80000000u);
    if (check_prefix && static_cast<int64_t>(key >> (shift + bits)) != prefix) continue;
    atomicAdd(&local[(key >> shift) & bin_mask], 1u);
  }
  __syncthreads();
  unsigned long long* out = reinterpret_cast<unsigned long long*>(hist + scope * bins);
  for (int b = threadIdx.x; b < bins; b += kThreads) {
    if (local[b] != 0) atomicAdd(&out[b], static_cast<unsigned long long>(local[b]));
  }
  __syncthreads();  // the bins are read before the next chunk clears them
}

__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    radix_histogram_kernel(TensorListMeta<1> meta, int64_t* hist, const int64_t* prefixes, int shift, int bits) {
  __shared__ uint32_t local[1 << kMaxSharedBits];
  for_each_chunk(meta, [&](const ChunkWork<1>& work) { count_chunk(meta, work, local, hist, prefixes, shift, bits); });
}

}  // namespace

cudaError_t radix_histogram(const std::vector<TensorRefs>& tensors, int64_t* hist, const int64_t* prefixes,
                            int shift, int bits, cudaStream_t stream) {
  if (bits > kMaxSharedBits) return cudaErrorInvalidValue;
  return multi_tensor_apply<1>(tensors, resident_blocks(radix_histogram_kernel, kThreads),
                               [&](const TensorListMeta<1>& meta, int blocks) {
                                 radix_histogram_kernel<<<blocks, kThreads, 0, stream>>>(meta, hist, prefixes, shift,
                                                                                         bits);
                               });
}

}  // namespace cuda_kernels
}  // namespace childopt
