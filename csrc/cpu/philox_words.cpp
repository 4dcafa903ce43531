// The raw Philox words of a tensor's elements on the CPU (childopt.philox.random_words, fast):
// the Gumbel noise of childopt.masks.sample_mask draws from them.  Bytes: 4 written per element;
// the words come from the vectorised Philox of philox_cpu.h, split over torch's intra-op threads.
// Also the test hooks of the importance draw: keep decisions and scales of a whole tensor's codes
// in one importance_draw call, and of given words.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_common.h"
#include "philox_cpu.h"

namespace childopt {
namespace cpu {

void philox_words_into(const at::Tensor& words, uint64_t rng_base, uint64_t seed, uint64_t step) {
  TORCH_CHECK(words.device().is_cpu() && words.scalar_type() == at::kInt && words.is_contiguous(),
              "childopt: words must be a contiguous int32 CPU tensor, got ", words.scalar_type(), " on ",
              words.device());
  const int64_t numel = words.numel();
  const int64_t groups = (numel + 3) / 4;
  const BernoulliDraw key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), step, 0};
  uint32_t* out = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
  // Whole groups go straight to the output; the last, partial group through a 4-word buffer.
  const int64_t whole = numel / 4;
  at::parallel_for(0, whole, kChunk / 4, [&](int64_t first, int64_t last) {
    if (chunk_threads_recording()) note_chunk_thread(last - first);
    philox_words(key, rng_base + static_cast<uint64_t>(first), last - first, out + 4 * first);
  });
  if (groups > whole) {
    uint32_t tail[4];
    philox_words(key, rng_base + static_cast<uint64_t>(whole), 1, tail);
    for (int64_t i = 4 * whole; i < numel; ++i) out[i] = tail[i - 4 * whole];
  }
}

std::tuple<at::Tensor, at::Tensor> importance_draw_of(const at::Tensor& codes, uint64_t rng_base, uint64_t seed,
                                                      uint64_t step) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "childopt: codes must be a contiguous uint8 CPU tensor, got ", codes.scalar_type(), " on ",
              codes.device());
  at::Tensor keep = at::empty(codes.sizes(), codes.options().dtype(at::kBool));
  at::Tensor scales = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const BernoulliDraw key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), step, 0};
  importance_draw(key, rng_base, codes.numel(), codes.data_ptr<uint8_t>(),
                  reinterpret_cast<uint8_t*>(keep.data_ptr<bool>()), scales.data_ptr<float>());
  return {keep, scales};
}

std::tuple<at::Tensor, at::Tensor> importance_levels_of(const at::Tensor& words, const at::Tensor& codes) {
  TORCH_CHECK(words.device().is_cpu() && words.scalar_type() == at::kInt && words.is_contiguous() && words.dim() == 1,
              "childopt: words must be a contiguous 1-D int32 CPU tensor, got ", words.scalar_type(), " of shape ",
              words.sizes(), " on ", words.device());
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.sizes() == words.sizes(),
              "childopt: codes must be a contiguous uint8 CPU tensor of the words' shape, got ", codes.scalar_type(),
              " of shape ", codes.sizes(), " on ", codes.device());
  at::Tensor keep = at::empty(words.sizes(), codes.options().dtype(at::kBool));
  at::Tensor scales = at::empty(words.sizes(), codes.options().dtype(at::kFloat));
  importance_levels(reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>()), codes.data_ptr<uint8_t>(),
                    words.numel(), reinterpret_cast<uint8_t*>(keep.data_ptr<bool>()), scales.data_ptr<float>());
  return {keep, scales};
}

}  // namespace cpu
}  // namespace childopt
