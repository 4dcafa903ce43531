// fp32 views of the storage dtypes on the device, and 4-element vector accesses.
//
// bf16 and fp16 are carried as 16-bit words so these kernels need no torch header; bf16 uses
// the hand rounding of adamw_element.h (the CPU kernels' and Triton's bits), fp16 the
// round-to-nearest-even intrinsic.  Four elements are one Philox group, one 128-bit access for
// fp32 and one 64-bit access for 16-bit types when the address is aligned.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "childopt/adamw_element.h"
#include "childopt/cuda_ops.h"

namespace childopt {
namespace cuda_kernels {

struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};

template <>
struct Storage<bf16_t> {
  __device__ static float load(bf16_t x) { return float_from_bf16_bits(x.x); }
  __device__ static bf16_t store(float x) { return {bf16_bits_from_float(x)}; }
};

template <>
struct Storage<f16_t> {
  __device__ static float load(f16_t x) { return __half2float(__ushort_as_half(x.x)); }
  __device__ static f16_t store(float x) { return {__half_as_ushort(__float2half_rn(x))}; }
};

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Elements [i, i + 4) of ptr, each only if below n unless `full` (then one vector access).
template <typename T>
__device__ __forceinline__ void load4(const T* ptr, int64_t i, int64_t n, bool full, T out[4]) {
  if (full) {
    const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(ptr + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = x.v[k];
    return;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (i + k < n) out[k] = ptr[i + k];
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* ptr, int64_t i, int64_t n, bool full, const T in[4]) {
  if (full) {
    Vec4<T> x;
#pragma unroll
    for (int k = 0; k < 4; ++k) x.v[k] = in[k];
    *reinterpret_cast<Vec4<T>*>(ptr + i) = x;
    return;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (i + k < n) ptr[i + k] = in[k];
  }
}

template <typename T>
__device__ __forceinline__ bool vec4_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Vec4<T>) == 0;
}

// Run body.template operator()<P, G>() for the storage types of a launch's dtypes.
template <typename Body>
void dispatch_storage(DType p_dtype, bool g_float, const Body& body) {
  switch (p_dtype) {
    case DType::kFloat32:
      return body.template operator()<float, float>();
    case DType::kBFloat16:
      return g_float ? body.template operator()<bf16_t, float>() : body.template operator()<bf16_t, bf16_t>();
    case DType::kFloat16:
      return g_float ? body.template operator()<f16_t, float>() : body.template operator()<f16_t, f16_t>();
  }
}

}  // namespace cuda_kernels
}  // namespace childopt
