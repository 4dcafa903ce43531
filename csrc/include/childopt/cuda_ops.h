// Launchers of the CUDA kernels, on raw pointers: the interface between the torch glue
// (csrc/cuda/ops_cuda.cpp) and the kernels (csrc/cuda/*.cu), which include no torch header so
// nvcc can compile each of them alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "childopt/adamw_element.h"

namespace childopt {
namespace cuda_kernels {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One tensor of a multi-tensor launch: up to 6 addresses, its element count and one
// per-tensor integer (its row of the step scalars, or a scope / scale index).
struct TensorRefs {
  void* ptr[6];
  int64_t numel;
  int64_t extra;
};

struct AdamwConfig {
  DType p_dtype;
  bool g_float;  // gradients in fp32 while params are bf16/fp16; else the params' dtype
  bool amsgrad;
  MaskKind mask_kind;  // dense: ptr[5] = bool mask; importance: ptr[5] = uint8 level codes;
                       // Bernoulli and importance: rng base and step from the row
  bool freeze;
  const double* scalars;  // device rows [n, kNumStepScalars]; extra = the tensor's row
  BernoulliDraw draw;     // key and threshold; the step comes from each row
};

// ptr: p, g, m, v, vmax, mask
cudaError_t adamw_step(const std::vector<TensorRefs>& tensors, const AdamwConfig& config, cudaStream_t stream);

struct SparseAdamwConfig {
  DType p_dtype;
  bool g_float;
  bool amsgrad;
  bool compact_grads;
  bool wide_indices;  // int64 indices, else int32
  const double* scalars;  // device rows [n, kNumStepScalars]; extra = the tensor's row
};

// ptr: p, g, indices, m, v, vmax; numel = number of selected entries
cudaError_t sparse_adamw_step(const std::vector<TensorRefs>& tensors, const SparseAdamwConfig& config,
                              cudaStream_t stream);

// ptr: fisher, g; extra = index into scales
cudaError_t fisher_accumulate(const std::vector<TensorRefs>& tensors, DType g_dtype, const float* scales,
                              cudaStream_t stream);

// ptr: scores; extra = scope.  hist: int64 [n_scopes, 2**bits], zeroed by the caller.
cudaError_t radix_histogram(const std::vector<TensorRefs>& tensors, int64_t* hist, const int64_t* prefixes,
                            int shift, int bits, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace childopt
