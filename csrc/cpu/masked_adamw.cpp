// Masked AdamW over a bucket of CPU tensors: mask kinds none / dense / Bernoulli / importance,
// freeze or zero-grad, amsgrad; fp32/bf16/fp16 params with fp32 state.
//
// Bytes per element (fp32): p, g, m, v read + p, m, v written = 28 (+1 for a dense mask, +8
// with amsgrad); the Bernoulli mask is drawn in cache; the importance mask reads one level code
// per element (+1) and compares each word with its level's threshold, computed from the code
// while the words are still in registers (philox_cpu.h).  Scalars come per tensor (one float64
// row each, step_scalars.h), read once per chunk.  Work is split into 32K-element chunks
// over torch's thread pool; each chunk runs 1K-element blocks: first the block's keep
// decisions (vectorised Philox, philox_cpu.h, prefetching the block meanwhile), then the
// element update, a loop the compiler vectorises per ISA clone (bf16/fp16 params or grads go
// through fp32 scratch where a single loop would stay scalar: update_block).  Frozen entries are
// written back with their old bits (a select), so the update loop has no branches.
#include <type_traits>

#include "../ops.h"

#include "adamw_block.h"
#include "cpu_common.h"
#include "philox_cpu.h"

namespace childopt {
namespace cpu {
namespace {

// Elements per pass of the fp32-scratch loops of update_block.  A whole 1K block's scratch (two
// 4 KB fp32 arrays) beside the lines of its p, g, m, v and keep bytes is about 21 KB of a 32 KB
// L1, and the three loops evicted lines the next one still read: the bf16 dense-freeze step at
// 2 threads took 14.3-14.4 ms in 1K passes against 11.1-12.2 ms in 256-element ones (1 thread:
// 23.0-23.7 against 18.9-19.0; two interleaved A/Bs in one process on the 24.3M list, 2-core
// EPYC, README's #20 section; again 8-18% less time on a Zen 5, the same tensors stepped both ways);
// 128 measured alike, 64 slower.
constexpr int64_t kScratchBlock = 256;

// One block of any storage types.  fp32, and bf16 without a mask, run adamw_block on the tensors
// themselves.  Otherwise (fp16 anywhere, or a mask beside 16-bit elements) GCC keeps that single
// loop scalar: no vector shape fits 16-bit elements, byte masks and fp32 state together, and
// fp16's software rounding does not if-convert beside the update.  Those blocks go through fp32
// scratch in three loops (widen, the fp32 update, narrow) that each vectorise, kScratchBlock
// elements at a time so the scratch (2 KB) and the block's lines stay in L1.  The arithmetic,
// and so every stored bit, is the same either way.
template <typename P, typename G, bool AMSGRAD, Keep KEEP, bool SCALED>
void update_block(Raw<P>* p, const Raw<G>* g, float* m, float* v, float* vmax, const uint8_t* keep,
                  const float* scales, int64_t n, const StepScalars& s) {
  constexpr bool kFloat = std::is_same_v<P, float> && std::is_same_v<G, float>;
  constexpr bool kBf16Dense = std::is_same_v<P, c10::BFloat16> && !std::is_same_v<G, c10::Half> && KEEP == Keep::kAll;
  if constexpr (kFloat || kBf16Dense) {
    adamw_block<P, G, AMSGRAD, KEEP, SCALED>(p, g, m, v, vmax, keep, scales, n, s);
  } else {
    alignas(64) float p_wide[kScratchBlock];
    alignas(64) float g_wide[kScratchBlock];
    for (int64_t at = 0; at < n; at += kScratchBlock) {
      const int64_t count = std::min(kScratchBlock, n - at);
      const uint8_t* keep_at = keep == nullptr ? nullptr : keep + at;
      float* p32 = p_wide;
      const float* g32 = g_wide;
      if constexpr (std::is_same_v<P, float>) {
        p32 = p + at;
      } else {
        widen_block<P>(p + at, p_wide, count);
      }
      if constexpr (std::is_same_v<G, float>) {
        g32 = g + at;
      } else {
        widen_block<G>(g + at, g_wide, count);
      }
      adamw_block<float, float, AMSGRAD, KEEP, SCALED>(p32, g32, m + at, v + at, AMSGRAD ? vmax + at : nullptr,
                                                        keep_at, SCALED ? scales + at : nullptr, count, s);
      if constexpr (!std::is_same_v<P, float>) narrow_block<P, KEEP == Keep::kFreeze>(p + at, p_wide, keep_at, count);
    }
  }
}

// The element streams of a block (vmax null without amsgrad).
template <typename P, typename G>
struct BlockStreams {
  Raw<P>* p;
  const Raw<G>* g;
  float* m;
  float* v;
  float* vmax;
};

// Elements whose keep decisions are drawn between two rounds of prefetches: 32 Philox groups,
// one AVX-512 step of philox_cpu.h.  Drawing and updating 256 elements at a time without
// software prefetches measured the same, within the timing spread, on a Zen 5 core, in cache
// and streaming (the same tensors stepped alternately both ways), so both draws share this path.
constexpr int64_t kDrawStep = 128;

// Prefetch the lines of n elements; WRITE asks for them in a writable state.
template <int WRITE, typename T>
inline void prefetch_span(const T* first, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(first + i, WRITE, 3);
}

// Philox draws of elements [begin, begin + n) of a tensor whose groups start at rng_base (begin
// a multiple of 4): draw(first group, elements, offset in the block) per step.  Drawing is
// pure arithmetic, so each step of it first asks for the lines the update of the same elements
// will read: the memory system fetches them while the core computes, instead of the update
// waiting for them afterwards.
template <typename P, typename G, typename Draw>
void draw_block(uint64_t rng_base, int64_t begin, int64_t n, const BlockStreams<P, G>& streams, const Draw& draw) {
  for (int64_t at = 0; at < n; at += kDrawStep) {
    const int64_t count = std::min(kDrawStep, n - at);
    prefetch_span<1>(streams.p + at, count);
    prefetch_span<0>(streams.g + at, count);
    prefetch_span<1>(streams.m + at, count);
    prefetch_span<1>(streams.v + at, count);
    if (streams.vmax != nullptr) prefetch_span<1>(streams.vmax + at, count);
    draw(rng_base + static_cast<uint64_t>((begin + at) / 4), count, at);
  }
}


template <typename P, typename G, bool AMSGRAD, Keep KEEP>
void adamw_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList max_exp_avg_sqs, at::TensorList masks, const double* rows, MaskKind mask_kind,
                 int64_t keep_threshold, int64_t seed_lo, int64_t seed_hi) {
  std::vector<int64_t> numels;
  for (const auto& t : params) numels.push_back(t.numel());
  for_each_chunk(numels, [&](const Chunk& c) {
    const StepScalars s = step_scalars_from_row(rows + c.tensor * kNumStepScalars);
    const BernoulliDraw draw = bernoulli_draw(keep_threshold, seed_lo, seed_hi, s.step);
    Raw<P>* p = raw_data<P>(params[c.tensor]);
    const Raw<G>* g = raw_data<G>(grads[c.tensor]);
    float* m = exp_avgs[c.tensor].data_ptr<float>();
    float* v = exp_avg_sqs[c.tensor].data_ptr<float>();
    float* vmax = AMSGRAD ? max_exp_avg_sqs[c.tensor].data_ptr<float>() : nullptr;
    // 4 spare entries: the last Philox group of a tensor may run past its end.
    uint8_t drawn[kBlock + 4];
    alignas(64) float level_scales[kBlock];
    for (int64_t b = c.begin; b < c.end; b += kBlock) {
      const int64_t n = std::min(kBlock, c.end - b);
      const BlockStreams<P, G> streams{p + b, g + b, m + b, v + b, AMSGRAD ? vmax + b : nullptr};
      const uint8_t* keep = nullptr;
      if (mask_kind == MaskKind::kDense) {
        keep = reinterpret_cast<const uint8_t*>(masks[c.tensor].data_ptr<bool>()) + b;
      } else if (mask_kind == MaskKind::kBernoulli) {
        draw_block(s.rng_base, b, n, streams, [&](uint64_t group, int64_t count, int64_t at) {
          keep_groups(draw, group, (count + 3) / 4, drawn + at);
        });
        keep = drawn;
      } else if (mask_kind == MaskKind::kImportance) {
        const uint8_t* codes = masks[c.tensor].data_ptr<uint8_t>() + b;
        float* scales = KEEP == Keep::kZeroGrad ? level_scales : nullptr;
        draw_block(s.rng_base, b, n, streams, [&](uint64_t group, int64_t count, int64_t at) {
          importance_draw(draw, group, count, codes + at, drawn + at, scales == nullptr ? nullptr : scales + at);
        });
        keep = drawn;
        if constexpr (KEEP == Keep::kZeroGrad) {
          // the level's scale replaces grad_scale (contract.py)
          update_block<P, G, AMSGRAD, KEEP, true>(p + b, g + b, m + b, v + b, AMSGRAD ? vmax + b : nullptr, keep,
                                                  level_scales, n, s);
          continue;
        }
      }
      update_block<P, G, AMSGRAD, KEEP, false>(p + b, g + b, m + b, v + b, AMSGRAD ? vmax + b : nullptr, keep,
                                               nullptr, n, s);
    }
  });
}

template <typename P, typename G>
void dispatch_flags(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList masks, const double* rows, MaskKind mask_kind,
                    bool freeze, bool amsgrad, int64_t keep_threshold, int64_t seed_lo, int64_t seed_hi) {
#define CHILDOPT_RUN(AMS, KEEP)                                                                                   \
  return adamw_lists<P, G, AMS, KEEP>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, rows,    \
                                      mask_kind, keep_threshold, seed_lo, seed_hi)
  const Keep keep = mask_kind == MaskKind::kNone ? Keep::kAll : (freeze ? Keep::kFreeze : Keep::kZeroGrad);
  if (amsgrad) {
    if (keep == Keep::kAll) CHILDOPT_RUN(true, Keep::kAll);
    if (keep == Keep::kFreeze) CHILDOPT_RUN(true, Keep::kFreeze);
    CHILDOPT_RUN(true, Keep::kZeroGrad);
  }
  if (keep == Keep::kAll) CHILDOPT_RUN(false, Keep::kAll);
  if (keep == Keep::kFreeze) CHILDOPT_RUN(false, Keep::kFreeze);
  CHILDOPT_RUN(false, Keep::kZeroGrad);
#undef CHILDOPT_RUN
}

}  // namespace

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList masks, const at::Tensor& scalars, int64_t mask_kind,
                bool freeze, bool amsgrad, int64_t keep_threshold, int64_t seed_lo, int64_t seed_hi) {
  const MaskKind kind = mask_kind_from(mask_kind);
  check_adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, scalars, kind, amsgrad);
  if (kind == MaskKind::kBernoulli || kind == MaskKind::kImportance) check_draw(keep_threshold, seed_lo, seed_hi);
  if (params.empty()) return;
  const double* rows = scalars.data_ptr<double>();
  const auto p_dtype = params[0].scalar_type();
  const auto g_dtype = grads[0].scalar_type();
  CHILDOPT_DISPATCH_FLOAT_TYPES(p_dtype, "childopt_adamw_step", [&] {
    if (g_dtype == p_dtype) {
      dispatch_flags<scalar_t, scalar_t>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, rows, kind,
                                         freeze, amsgrad, keep_threshold, seed_lo, seed_hi);
    } else {
      dispatch_flags<scalar_t, float>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, rows, kind,
                                      freeze, amsgrad, keep_threshold, seed_lo, seed_hi);
    }
  });
}

}  // namespace cpu
}  // namespace childopt
