// Multi-tensor launches in the style of apex's / torch's multi_tensor_apply: the addresses of up
// to kMaxTensors tensors and a map from each block to (tensor, chunk) travel as one kernel
// argument (under the 4 KB parameter limit every CUDA version accepts), so one launch steps
// many tensors with no host-to-device copy; a longer list takes several launches.
//
// Every block owns kChunk consecutive elements of one tensor; chunk starts are multiples of
// kChunk, so a tensor's alignment carries over to each chunk and Philox groups (4 elements)
// never straddle two blocks.  Element offsets are int64.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "childopt/cuda_ops.h"

namespace childopt {
namespace cuda_kernels {

constexpr int kMaxTensors = 32;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

template <int DEPTH>
struct TensorListMeta {
  void* ptr[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t extra[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// The tensor slot and chunk of this block, and the chunk's element range.
template <int DEPTH>
struct BlockWork {
  int slot;
  int64_t start;
  int64_t n;

  __device__ explicit BlockWork(const TensorListMeta<DEPTH>& meta) {
    slot = meta.block_tensor[blockIdx.x];
    start = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
    const int64_t left = meta.numel[slot] - start;
    n = left < kChunk ? left : kChunk;
  }
};

// Launch `launch(meta, blocks)` over every chunk of `tensors`, packing as many tensors and
// chunks into each launch as the metadata holds.  Returns the first launch error.
template <int DEPTH, typename Launch>
cudaError_t multi_tensor_apply(const std::vector<TensorRefs>& tensors, int64_t chunk, const Launch& launch) {
  TensorListMeta<DEPTH> meta;
  int slots = 0;
  int blocks = 0;
  for (const TensorRefs& t : tensors) {
    if (t.numel == 0) continue;
    for (int d = 0; d < DEPTH; ++d) meta.ptr[d][slots] = t.ptr[d];
    meta.numel[slots] = t.numel;
    meta.extra[slots] = t.extra;
    const int64_t chunks = (t.numel + chunk - 1) / chunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = static_cast<uint8_t>(slots);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (last_chunk && slots + 1 == kMaxTensors)) {
        launch(meta, blocks);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        blocks = 0;
        if (last_chunk) {
          slots = -1;  // the next tensor starts a fresh table
        } else {
          // The rest of this tensor's chunks continue in slot 0 of a fresh table.
          for (int d = 0; d < DEPTH; ++d) meta.ptr[d][0] = t.ptr[d];
          meta.numel[0] = t.numel;
          meta.extra[0] = t.extra;
          slots = 0;
        }
      }
    }
    ++slots;
  }
  if (blocks > 0) {
    launch(meta, blocks);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace cuda_kernels
}  // namespace childopt
