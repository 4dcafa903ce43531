// One radix-select pass over fp32 scores of many CUDA tensors (childopt/masks.py).
//
// Each score s (-0.0 counted as +0.0) has the order-preserving key `bits | 0x80000000` (s >= 0)
// or `~bits` (s < 0).  Per scope, the pass counts the keys that agree with the scope's prefix
// above bit shift + bits, into bin (key >> shift) & (2**bits - 1).  Bytes: 4 per element, read
// only.  Each block counts its chunks in shared memory (2**bits 32-bit bins, 8 KB at 11 bits),
// one scope's run of chunks at a time, and adds the non-zero bins to the global int64 histogram
// with one atomic each when the scope changes (multi_tensor.cuh's persistent grid).
#include "multi_tensor.cuh"
#include "storage.cuh"

namespace childopt {
namespace cuda_kernels {
namespace {

constexpr int kMaxSharedBits = 12;

// One chunk's counts into the block's shared bins (4 scores per thread per iteration, one 128-bit
// load where aligned).
__device__ __forceinline__ void count_chunk(const TensorListMeta<1>& meta, const ChunkWork<1>& work,
                                            uint32_t* local, int64_t prefix, int shift, int bits) {
  const float* __restrict__ s = static_cast<const float*>(meta.ptr[0][work.slot]) + work.start;
  const uint32_t bin_mask = static_cast<uint32_t>((1 << bits) - 1);
  const bool check_prefix = shift + bits < 32;
  const bool vec = vec4_aligned<float>(s);
  for (int64_t i = 4 * static_cast<int64_t>(threadIdx.x); i < work.n; i += 4 * kThreads) {
    float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    load4(s, i, work.n, vec && i + 4 <= work.n, x);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t b = __float_as_uint(x[k] + 0.0f);
      const uint32_t key = (b >> 31) ? ~b : (b | 0x80000000u);
      const bool counted = i + k < work.n && (!check_prefix || static_cast<int64_t>(key >> (shift + bits)) == prefix);
      if (counted) atomicAdd(&local[(key >> shift) & bin_mask], 1u);
    }
  }
}

__device__ __forceinline__ void clear_bins(uint32_t* local, int bins) {
  for (int b = threadIdx.x; b < bins; b += kThreads) local[b] = 0;
  __syncthreads();
}

// The block's non-zero bins into scope `scope`'s row of the global histogram, one atomic each.
__device__ __forceinline__ void flush_bins(const uint32_t* local, int64_t* hist, int64_t scope, int bins) {
  __syncthreads();  // every thread's counts are in
  unsigned long long* out = reinterpret_cast<unsigned long long*>(hist + scope * bins);
  for (int b = threadIdx.x; b < bins; b += kThreads) {
    if (local[b] != 0) atomicAdd(&out[b], static_cast<unsigned long long>(local[b]));
  }
  __syncthreads();  // read before the bins are cleared again
}

// The bins hold one scope's counts over all the block's consecutive chunks of that scope and are
// flushed when the scope changes and at the end: with one global scope, once per block.
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    radix_histogram_kernel(TensorListMeta<1> meta, int64_t* hist, const int64_t* prefixes, int shift, int bits) {
  __shared__ uint32_t local[1 << kMaxSharedBits];
  const int bins = 1 << bits;
  int64_t held = -1;  // the scope whose counts the bins hold (uniform across the block)
  for_each_chunk(meta, [&](const ChunkWork<1>& work) {
    const int64_t scope = meta.extra[work.slot];
    if (scope != held) {
      if (held >= 0) flush_bins(local, hist, held, bins);
      clear_bins(local, bins);
      held = scope;
    }
    count_chunk(meta, work, local, prefixes[scope], shift, bits);
  });
  if (held >= 0) flush_bins(local, hist, held, bins);
}

}  // namespace

cudaError_t radix_histogram(const std::vector<TensorRefs>& tensors, int64_t* hist, const int64_t* prefixes,
                            int shift, int bits, cudaStream_t stream) {
  if (bits > kMaxSharedBits) return cudaErrorInvalidValue;
  return multi_tensor_apply<1>(tensors, resident_blocks<radix_histogram_kernel>(),
                               [&](const TensorListMeta<1>& meta, int blocks) {
                                 radix_histogram_kernel<<<blocks, kThreads, 0, stream>>>(meta, hist, prefixes, shift,
                                                                                         bits);
                               });
}

}  // namespace cuda_kernels
}  // namespace childopt
