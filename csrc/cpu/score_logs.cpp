// log2 of importance scores on the CPU (childopt.portable_math.log2, bit for bit; portable_math.h):
// the first pass of an importance refresh, over every score.  With level codes, the score of a
// zero-grad group's running estimate: log2(x * level(code)) (childopt.backends.base.Backend.score_logs),
// the fp32 product as torch's multiply rounds it.  torch.log2 takes 3-4 ns per element where many
// scores are zero (entries never kept yet) and about 20 where they are subnormal, and the level
// lookup (index_select) 1.5 ns; this is branch-free and costs the same for every input.  Bytes: 4
// read (and 1 with codes) and 4 written per element.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>

#include "childopt/importance_levels.h"
#include "cpu_common.h"
#include "portable_math.h"

namespace childopt {
namespace cpu {
namespace {

CHILDOPT_CPU_CLONES
void block_log2(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = portable_log2(x[i]);
}

CHILDOPT_CPU_CLONES
void block_log2_at_levels(const float* x, const uint8_t* codes, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = portable_log2(x[i] * level_probability(codes[i]));
}

}  // namespace

void portable_log2_into(const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& codes) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "childopt: x must be a contiguous float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.numel() == x.numel(),
              "childopt: out must be a contiguous float32 CPU tensor of x's ", x.numel(), " elements, got ",
              out.scalar_type(), " on ", out.device(), " with ", out.numel());
  TORCH_CHECK(!codes || (codes->device().is_cpu() && codes->scalar_type() == at::kByte && codes->is_contiguous() &&
                         codes->numel() == x.numel()),
              "childopt: codes must be None or a contiguous uint8 CPU tensor of x's ", x.numel(), " elements");
  const float* in = x.data_ptr<float>();
  const uint8_t* levels = codes ? codes->data_ptr<uint8_t>() : nullptr;
  float* result = out.data_ptr<float>();
  at::parallel_for(0, x.numel(), kChunk, [&](int64_t first, int64_t last) {
    if (chunk_threads_recording()) note_chunk_thread(last - first);
    if (levels != nullptr) {
      block_log2_at_levels(in + first, levels + first, result + first, last - first);
    } else {
      block_log2(in + first, result + first, last - first);
    }
  });
}

}  // namespace cpu
}  // namespace childopt
