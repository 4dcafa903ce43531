// The keep probabilities of an importance refresh on the CPU (childopt.importance.probabilities,
// bit for bit): from an element's log ratio r, p = clamp(exp2(r + whole) * factor, floor, 1), where
// whole and factor split 2**log_c into an integer part added exactly and an fp32 factor, and exp2
// is childopt.portable_math's (portable_math.h), so p depends on nothing but its element.
//
// Two ops: the probabilities written out (4 B read, 4 B written per element; the draw rounds them
// to level codes), and the sums one pass of the scale solve needs (4 B read, nothing written):
// the sum of p and the counts at 1 and at the floor, from which the solve's slope follows (sum -
// ones - floor * floors).  The pass replaces six torch ops over a piece (add, exp2, multiply,
// clamp, a sum and two counts).  The sum is childopt.importance.probability_sums's: each p in
// whole units of 2**-30 (truncated, an int32), added as int64, so exact in any order: the same
// integer at every thread count and on every device.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu_common.h"
#include "portable_math.h"

namespace childopt {
namespace cpu {
namespace {

struct KeepScale {
  float whole;   // floor(log_c) as fp32 (torch.add's cast of the Python float)
  float factor;  // 2 ** (log_c - floor(log_c)) as fp32 (mul_'s cast)
  float floor;   // p_min as fp32 (clamp_'s cast)
};

[[gnu::always_inline]] inline float keep_probability(float log_r, const KeepScale& scale) {
  const float p = portable_exp2(log_r + scale.whole) * scale.factor;
  return std::min(std::max(p, scale.floor), 1.0f);
}

// childopt.importance.SUM_UNITS: p * 2**30 is exact in fp32 and at most 2**30, so an int32.
constexpr float kSumUnits = 0x1p30f;

struct BlockSums {
  int64_t units = 0;
  int64_t ones = 0;
  int64_t floors = 0;
};

CHILDOPT_CPU_CLONES
BlockSums block_sums(const float* log_r, int64_t n, KeepScale scale) {
  constexpr int kLanes = 16;
  int64_t units[kLanes] = {};
  int32_t ones[kLanes] = {}, floors[kLanes] = {};  // a block holds at most kChunk < 2**31 entries
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float p = keep_probability(log_r[i + j], scale);
      units[j] += static_cast<int32_t>(p * kSumUnits);
      ones[j] += static_cast<int32_t>(p == 1.0f);
      floors[j] += static_cast<int32_t>(p == scale.floor);
    }
  }
  BlockSums out;
  for (; i < n; ++i) {
    const float p = keep_probability(log_r[i], scale);
    out.units += static_cast<int32_t>(p * kSumUnits);
    out.ones += static_cast<int64_t>(p == 1.0f);
    out.floors += static_cast<int64_t>(p == scale.floor);
  }
  for (int j = 0; j < kLanes; ++j) {
    out.units += units[j];
    out.ones += ones[j];
    out.floors += floors[j];
  }
  return out;
}

CHILDOPT_CPU_CLONES
void block_probabilities(const float* log_r, float* p, int64_t n, KeepScale scale) {
  for (int64_t i = 0; i < n; ++i) p[i] = keep_probability(log_r[i], scale);
}

KeepScale checked_scale(const at::Tensor& log_r, double whole, double factor, double floor) {
  TORCH_CHECK(log_r.device().is_cpu() && log_r.scalar_type() == at::kFloat && log_r.is_contiguous(),
              "childopt: log_r must be a contiguous float32 CPU tensor, got ", log_r.scalar_type(), " on ",
              log_r.device());
  return {static_cast<float>(whole), static_cast<float>(factor), static_cast<float>(floor)};
}

}  // namespace

std::tuple<int64_t, int64_t, int64_t> probability_sums(const at::Tensor& log_r, double whole, double factor,
                                                       double floor) {
  const KeepScale scale = checked_scale(log_r, whole, factor, floor);
  const int64_t numel = log_r.numel();
  const float* data = log_r.data_ptr<float>();
  std::vector<BlockSums> blocks(static_cast<size_t>((numel + kChunk - 1) / kChunk));
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
    if (chunk_threads_recording()) note_chunk_thread(last - first);
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * kChunk;
      blocks[static_cast<size_t>(b)] = block_sums(data + start, std::min(kChunk, numel - start), scale);
    }
  });
  BlockSums total;
  for (const BlockSums& block : blocks) {
    total.units += block.units;
    total.ones += block.ones;
    total.floors += block.floors;
  }
  return {total.units, total.ones, total.floors};
}

void keep_probabilities_into(const at::Tensor& log_r, const at::Tensor& p, double whole, double factor,
                             double floor) {
  const KeepScale scale = checked_scale(log_r, whole, factor, floor);
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous() &&
                  p.numel() == log_r.numel(),
              "childopt: p must be a contiguous float32 CPU tensor of log_r's ", log_r.numel(), " elements, got ",
              p.scalar_type(), " on ", p.device(), " with ", p.numel());
  const float* in = log_r.data_ptr<float>();
  float* out = p.data_ptr<float>();
  at::parallel_for(0, log_r.numel(), kChunk, [&](int64_t first, int64_t last) {
    if (chunk_threads_recording()) note_chunk_thread(last - first);
    block_probabilities(in + first, out + first, last - first, scale);
  });
}

}  // namespace cpu
}  // namespace childopt
