// Philox4x32-10 on the CPU, many counters at a time: the Bernoulli keep decisions of the masked
// step and the raw words of the philox_words op (the Gumbel noise of childopt.masks.sample_mask).
//
// The stream is childopt/philox.py's (group g -> counter (g lo, g hi, step lo, step hi), key
// (seed lo, seed hi), word w of the group -> element 4g + w); every path here returns exactly its
// bits.  Three implementations, picked once per process from what the CPU supports: AVX-512
// (F, BW and BMI2; 32 counters per step), AVX2 (8) and portable scalar code; a test may force a
// slower one to prove that all three agree.  No memory traffic: 10 rounds of 2 widening
// multiplies per counter.
// The importance mask's decisions (importance_levels.h) are drawn the same way and, with
// AVX-512, compared with each element's level threshold while the words are still in registers.
#pragma once

#include <cstdint>

#include "childopt/philox.h"

namespace childopt {
namespace cpu {

enum class PhiloxIsa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The ISA the CPU draws use now, and the fastest this CPU supports.
PhiloxIsa philox_isa();
PhiloxIsa best_philox_isa();
// Test-only: use `isa` from now on (refused if this CPU lacks it); returns the previous one.
PhiloxIsa set_philox_isa(PhiloxIsa isa);

// Keep decisions (0/1) of the elements of Philox groups [first_group, first_group + groups):
// keep[4 * q + w] for word w of group first_group + q.
void keep_groups(const BernoulliDraw& draw, uint64_t first_group, int64_t groups, uint8_t* keep);

// The words themselves: words[4 * q + w], as keep_groups draws them (draw.keep_threshold unused).
void philox_words(const BernoulliDraw& draw, uint64_t first_group, int64_t groups, uint32_t* words);

// Importance keep decisions (importance_levels.h) of the n elements from element 4 * first_group
// on, from their level codes (n elements read, not a whole last group); with `scales` non-null,
// each element's level scale 2**32 / threshold as well (level_scale).
void importance_draw(const BernoulliDraw& draw, uint64_t first_group, int64_t n, const uint8_t* codes,
                     uint8_t* keep, float* scales);

// Test-only: the decisions and scales of given words, by the level arithmetic importance_draw
// runs with the selected ISA (`scales` may be null).
void importance_levels(const uint32_t* words, const uint8_t* codes, int64_t n, uint8_t* keep, float* scales);

}  // namespace cpu
}  // namespace childopt
