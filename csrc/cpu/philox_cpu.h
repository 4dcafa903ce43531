// Philox4x32-10 on the CPU, many counters at a time: the Bernoulli keep decisions of the masked
// step and the raw words of the philox_words op (the Gumbel noise of childopt.masks.sample_mask).
//
// The stream is childopt/philox.py's (group g -> counter (g lo, g hi, step lo, step hi), key
// (seed lo, seed hi), word w of the group -> element 4g + w); every path here returns exactly its
// bits.  Three implementations, picked once per process from what the CPU supports: AVX-512F
// (32 counters per step), AVX2 (8) and portable scalar code; a test may force a slower one to
// prove that all three agree.  No memory traffic: 10 rounds of 2 widening multiplies per counter.
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

}  // namespace cpu
}  // namespace childopt
