// The level codes of an importance refresh on the CPU (childopt.importance.level_codes, bit for
// bit): each element's keep probability p (fp32, in [0, 1]) becomes the code of its level q (the
// largest with level(q) <= p, level(q) = float(threshold(q)) / 2**32, importance_levels.h), or of
// the next level up with probability (p - level(q)) / (level(q + 1) - level(q)), decided by its
// Philox word (group rng_base + i / 4, word i % 4; the words are drawn in registers, not stored).
// Below kFirstDistinct the levels repeat, so q rounds between code 0 and kFirstDistinct.
//
// Exactness: q is exact.  Its first estimate, floor(8 log2 p) + 255, comes from p's exponent and
// mantissa bits (no log2), and is within one of q (the truncated thresholds sit less than one level
// step below 2 ** ((q - 255) / 8)); one comparison each way with the level values corrects it, as
// the torch version corrects its log2 estimate.  The rounding is the same fp32 arithmetic
// (subtract, subtract, divide; the build has -ffp-contract=off).  Branch-free and without tables,
// and forced inline (GCC does not inline the element function into the ISA clones by itself), so
// the AVX2 and AVX-512 clones vectorise it.  Bytes: 4 read and 1 written per element.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "bit_cast.h"
#include "childopt/importance_levels.h"
#include "cpu_common.h"
#include "philox_cpu.h"

namespace childopt {
namespace cpu {
namespace {

// childopt.importance.FIRST_LEVEL: from this code on every level is above the one below it.
constexpr uint32_t kFirstDistinct = 25;

// The smallest 23-bit mantissa m with 1 + m / 2**23 >= 2 ** (k / 8), k = 1..7: the sub-octave
// boundaries of floor(8 log2 p) (no mantissa equals an irrational power of two).
constexpr uint32_t kOctaveSteps[7] = {759234, 1587185, 2490071, 3474676, 4548395, 5719293, 6996167};

// level(code): the keep probability of a code (importance_levels.h), forced inline into the clones.
[[gnu::always_inline]] inline float level_value(uint32_t code) { return level_probability(code); }

// floor(8 log2 p) + 255 clamped to [0, 254], exactly, from p's bits (zero, -0.0, subnormals and
// negative p: 0, as torch's log2 gives -inf for -0.0).
[[gnu::always_inline]] inline uint32_t level_estimate(float p) {
  const uint32_t bits = bit_cast<uint32_t>(p);
  const int32_t octave = static_cast<int32_t>(bits >> 23) - 127;
  const uint32_t mantissa = bits & 0x7FFFFFu;
  const int32_t step = (mantissa >= kOctaveSteps[0]) + (mantissa >= kOctaveSteps[1]) + (mantissa >= kOctaveSteps[2]) +
                       (mantissa >= kOctaveSteps[3]) + (mantissa >= kOctaveSteps[4]) + (mantissa >= kOctaveSteps[5]) +
                       (mantissa >= kOctaveSteps[6]);
  const int32_t estimate = 8 * octave + step + 255;
  return static_cast<uint32_t>(std::min(std::max(estimate, 0), 254)) & ~all_ones_if(bits >> 31);
}

[[gnu::always_inline]] inline uint8_t level_code(float p, uint32_t word) {
  uint32_t q = level_estimate(p);
  q -= static_cast<uint32_t>((p < level_value(q)) & (q > 0));
  q += static_cast<uint32_t>((p >= level_value(q + 1)) & (q < 254));
  const uint32_t below = all_ones_if(q < kFirstDistinct);
  q &= ~below;
  const uint32_t upper = blend(below, kFirstDistinct, q + 1);
  const float low = level_value(q), high = level_value(upper);
  const float up = (p - low) / (high - low);
  const float uniform = (static_cast<float>(word >> 8) + 0.5f) * 0x1p-24f;
  return static_cast<uint8_t>(blend(all_ones_if(uniform < up), upper, q));
}

CHILDOPT_CPU_CLONES
void codes_of_block(const float* p, const uint32_t* words, int64_t n, uint8_t* codes) {
  for (int64_t i = 0; i < n; ++i) codes[i] = level_code(p[i], words[i]);
}

}  // namespace

void level_codes_into(const at::Tensor& p, const at::Tensor& codes, uint64_t rng_base, uint64_t seed, uint64_t step) {
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous(),
              "childopt: p must be a contiguous float32 CPU tensor, got ", p.scalar_type(), " on ", p.device());
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.numel() == p.numel(),
              "childopt: codes must be a contiguous uint8 CPU tensor of p's numel (", p.numel(), "), got ",
              codes.scalar_type(), " of numel ", codes.numel(), " on ", codes.device());
  const int64_t numel = p.numel();
  const BernoulliDraw key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), step, 0};
  const float* probabilities = p.data_ptr<float>();
  uint8_t* out = codes.data_ptr<uint8_t>();
  at::parallel_for(0, (numel + 3) / 4, kChunk / 4, [&](int64_t first, int64_t last) {
    if (chunk_threads_recording()) note_chunk_thread(last - first);
    uint32_t words[kBlock];
    for (int64_t group = first; group < last; group += kBlock / 4) {
      const int64_t groups = std::min<int64_t>(kBlock / 4, last - group);
      philox_words(key, rng_base + static_cast<uint64_t>(group), groups, words);
      const int64_t start = 4 * group;
      codes_of_block(probabilities + start, words, std::min<int64_t>(4 * groups, numel - start), out + start);
    }
  });
}

}  // namespace cpu
}  // namespace childopt
