// Multi-tensor launches in the style of apex's / torch's multi_tensor_apply, on a persistent grid:
// the addresses of up to kMaxTensors tensors and the prefix sums of their chunk counts travel as
// one kernel argument (under the 4 KB parameter limit every CUDA version accepts), so one launch
// steps up to kMaxTensors tensors of any size with no host-to-device copy and no table in memory.
//
// The grid is at most as many blocks as the GPU holds at once (SMs x the kernel's occupancy);
// block b steps chunks b, b + gridDim.x, ... of the launch's table, so a launch is never a wave
// plus a tail and a 1B-parameter model takes one launch per 32 tensors, not one per 320 chunks.
// Every chunk is kChunk consecutive elements of one tensor; chunk starts are multiples of kChunk,
// so a tensor's alignment carries over to each chunk and Philox groups (4 elements) never
// straddle two chunks.  Element offsets and chunk numbers are int64.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "childopt/cuda_ops.h"

namespace childopt {
namespace cuda_kernels {

constexpr int kMaxTensors = 32;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;
// __launch_bounds__'s minimum resident blocks per SM: 2 x 512 threads caps a kernel at 64
// registers, so each SM keeps 32 warps of loads in flight.  The masked AdamW variants that would
// take 69-77 registers spill 4-56 bytes instead (L1-resident); 75 registers would halve the warps.
constexpr int kMinBlocksPerSm = 2;
// Blocks of a launch when the GPU's resident count cannot be read (still correct: blocks loop).
constexpr int kFallbackBlocks = 1024;

template <int DEPTH>
struct TensorListMeta {
  void* ptr[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t extra[kMaxTensors];
  // Chunks of slot s are [first_chunk[s], first_chunk[s + 1]); first_chunk[slots] is the total.
  int64_t first_chunk[kMaxTensors + 1];
  int slots;
};
// The table plus the kernels' other arguments (at most 64 bytes) stays under the 4 KB limit.
static_assert(sizeof(TensorListMeta<6>) + 64 <= 4096, "kernel arguments past CUDA's 4 KB limit");

// The tensor slot of chunk `chunk` of a table, and the chunk's element range.
template <int DEPTH>
struct ChunkWork {
  int slot;
  int64_t start;
  int64_t n;

  __host__ __device__ ChunkWork(const TensorListMeta<DEPTH>& meta, int64_t chunk) {
    // At most 32 slots, the same for every thread of the block (one broadcast read each).
    slot = 0;
    while (meta.first_chunk[slot + 1] <= chunk) ++slot;
    start = (chunk - meta.first_chunk[slot]) * kChunk;
    const int64_t left = meta.numel[slot] - start;
    n = left < kChunk ? left : kChunk;
  }
};

// body(work) for chunks block, block + grid, ... of the table: a block's share of the persistent
// grid (for_each_chunk), also run on the host by the plan test with block and grid played by loops.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <int DEPTH, typename Body>
__host__ __device__ __forceinline__ void for_each_chunk_of(const TensorListMeta<DEPTH>& meta, int64_t block,
                                                           int64_t grid, const Body& body) {
  const int64_t chunks = meta.first_chunk[meta.slots];
  for (int64_t chunk = block; chunk < chunks; chunk += grid) body(ChunkWork<DEPTH>(meta, chunk));
}

#ifdef __CUDACC__
// body(work) for every chunk of the table this block owns; uniform across the block, so a body
// may synchronise its threads.
template <int DEPTH, typename Body>
__device__ __forceinline__ void for_each_chunk(const TensorListMeta<DEPTH>& meta, const Body& body) {
  for_each_chunk_of(meta, blockIdx.x, gridDim.x, body);
}
#endif

// emit(meta) for each table of the list: its tensors with elements, in order, kMaxTensors at a
// time.  Host code only (the tests run it without a GPU).
template <int DEPTH, typename Emit>
void for_each_table(const std::vector<TensorRefs>& tensors, const Emit& emit) {
  TensorListMeta<DEPTH> meta;
  meta.slots = 0;
  meta.first_chunk[0] = 0;
  for (const TensorRefs& t : tensors) {
    if (t.numel == 0) continue;
    const int s = meta.slots;
    for (int d = 0; d < DEPTH; ++d) meta.ptr[d][s] = t.ptr[d];
    meta.numel[s] = t.numel;
    meta.extra[s] = t.extra;
    meta.first_chunk[s + 1] = meta.first_chunk[s] + (t.numel + kChunk - 1) / kChunk;
    meta.slots = s + 1;
    if (meta.slots == kMaxTensors) {
      emit(meta);
      meta.slots = 0;
    }
  }
  if (meta.slots > 0) emit(meta);
}

// Blocks of KERNEL the current GPU holds at once with kThreads threads each, asked once per
// kernel and device (kFallbackBlocks if the runtime cannot say; that query's error is cleared so
// it does not read as the launch's).
template <auto KERNEL>
int resident_blocks() {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) {
    cudaGetLastError();
    return kFallbackBlocks;
  }
  int blocks = known[device].load(std::memory_order_relaxed);
  if (blocks > 0) return blocks;
  int sms = 0;
  int per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, KERNEL, kThreads, 0) != cudaSuccess || sms <= 0 ||
      per_sm <= 0) {
    cudaGetLastError();
    return kFallbackBlocks;
  }
  blocks = sms * per_sm;
  known[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

// The grid of a table's launch: a block per chunk, at most `max_blocks` (then blocks loop).
template <int DEPTH>
int launch_blocks(const TensorListMeta<DEPTH>& meta, int max_blocks) {
  return static_cast<int>(std::min<int64_t>(meta.first_chunk[meta.slots], std::max(max_blocks, 1)));
}

// Launch `launch(meta, launch_blocks(meta, max_blocks))` for each table of `tensors`.  Returns
// the first launch error.
template <int DEPTH, typename Launch>
cudaError_t multi_tensor_apply(const std::vector<TensorRefs>& tensors, int max_blocks, const Launch& launch) {
  cudaError_t result = cudaSuccess;
  for_each_table<DEPTH>(tensors, [&](const TensorListMeta<DEPTH>& meta) {
    if (result != cudaSuccess) return;
    launch(meta, launch_blocks(meta, max_blocks));
    result = cudaGetLastError();
  });
  return result;
}

}  // namespace cuda_kernels
}  // namespace childopt
