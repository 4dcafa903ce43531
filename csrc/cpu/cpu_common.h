// Shared pieces of the CPU kernels: fp32 views of the storage dtypes, per-ISA clones, and the
// split of a tensor list into chunks run in parallel on torch's intra-op thread pool.
//
// at::parallel_for is header code over OpenMP: the extension is compiled with -fopenmp and linked
// to the OpenMP runtime torch loaded (childopt/_native/config.py), so the chunks run on all
// torch.get_num_threads() threads.  A test-only recorder (chunk_threads.cpp) counts the distinct
// threads that ran chunks, so a test can prove it without timing anything.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "childopt/adamw_element.h"

// One build serves every x86-64 CPU: GCC and clang compile the hot loops once per ISA and pick
// the clone at load time (ifunc), instead of -march=native, which would tie a cached or
// prebuilt module to the machine that built it.  GCC 12+ takes the AVX-512 clone as x86-64-v4
// (adds BW/DQ/VL: 16-bit lanes and byte masks, twice as fast bf16/fp16 conversion loops as
// avx512f alone); KNL-style avx512f-only CPUs then run the avx2 clone.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define CHILDOPT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define CHILDOPT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CHILDOPT_CPU_CLONES
#endif

namespace childopt {
namespace cpu {

// Elements per parallel work item: a multiple of 4 (a Philox group) and of kBlock.
constexpr int64_t kChunk = 1 << 15;
// Elements per inner block of the element loops.
constexpr int64_t kBlock = 1024;

// fp32 loads and stores of each storage dtype, on its raw bits (float, or uint16_t for the 16-bit
// types): a select between two uint16_t values if-converts where one between two c10 wrapper
// objects keeps a masked loop scalar.  bf16 rounds through the shared code of adamw_element.h
// so CPU and CUDA store the same bits; fp16 through c10's software conversion (the build has no
// -mf16c, so every ISA clone rounds alike).
template <typename T>
struct Storage;

template <>
struct Storage<float> {
  using Raw = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

template <>
struct Storage<c10::BFloat16> {
  using Raw = uint16_t;
  static float load(uint16_t bits) { return float_from_bf16_bits(bits); }
  static uint16_t store(float x) { return bf16_bits_from_float(x); }
};

template <>
struct Storage<c10::Half> {
  using Raw = uint16_t;
  static float load(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }
  static uint16_t store(float x) { return c10::Half(x).x; }
};

template <typename T>
using Raw = typename Storage<T>::Raw;

// The elements of a float32 / bfloat16 / float16 tensor as their raw storage type.
template <typename T>
Raw<T>* raw_data(const at::Tensor& t) {
  return reinterpret_cast<Raw<T>*>(t.data_ptr<T>());
}

// Run the lambda with scalar_t bound to the storage type of a float32 / bfloat16 / float16 tensor.
#define CHILDOPT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// The elements [begin, end) of tensor `tensor` of a list.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Every kChunk-sized piece of tensors of the given sizes, in list order.  Tiny tensors become one
// work item each, so a list of many small tensors still spreads over the threads.
inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += kChunk) {
      chunks.push_back({t, begin, std::min(numels[t], begin + kChunk)});
    }
  }
  return chunks;
}

// Test-only recording of the threads that run chunks and of the work items each ran: elements
// for the ops over for_each_chunk, the host helpers' own units for them (off unless a test
// switches it on).
bool chunk_threads_recording();
void note_chunk_thread(int64_t items);
void record_chunk_threads(bool on);
int64_t chunk_thread_count();
std::vector<int64_t> chunk_thread_items();

// Run body(first, last) over contiguous ranges [first, last) of `chunks` on the intra-op threads,
// each range holding about the same number of elements: a chunk goes to the thread whose equal
// share of the elements holds the chunk's middle, so shares differ by at most one chunk.  Split
// by chunk count, as at::parallel_for over the chunk indices would, one thread gets a large
// tensor's full chunks and another the small tensors' one-piece chunks (at 5% sparse storage of
// the bench's 24m list: 0.8M against 0.4M selected entries).  Which thread runs a chunk never
// changes its result.
template <typename F>
void parallel_over_chunks(const std::vector<Chunk>& chunks, const F& body) {
  std::vector<int64_t> starts(chunks.size() + 1, 0);  // elements of the chunks before chunk i
  std::vector<int64_t> middles(chunks.size());        // twice the element index of chunk i's middle
  for (size_t i = 0; i < chunks.size(); ++i) {
    const int64_t size = chunks[i].end - chunks[i].begin;
    middles[i] = 2 * starts[i] + size;
    starts[i + 1] = starts[i] + size;
  }
  at::parallel_for(0, starts.back(), 1, [&](int64_t first, int64_t last) {
    const int64_t lo = std::lower_bound(middles.begin(), middles.end(), 2 * first) - middles.begin();
    const int64_t hi = std::lower_bound(middles.begin(), middles.end(), 2 * last) - middles.begin();
    if (lo == hi) return;
    if (chunk_threads_recording()) note_chunk_thread(starts[hi] - starts[lo]);
    body(lo, hi);
  });
}

// Run fn(chunk) over every chunk of the tensors, in parallel.
template <typename F>
void for_each_chunk(const std::vector<int64_t>& numels, const F& fn) {
  const std::vector<Chunk> chunks = make_chunks(numels);
  parallel_over_chunks(chunks, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) fn(chunks[i]);
  });
}

}  // namespace cpu
}  // namespace childopt
