// AdamW on the selected entries of CPU tensors (sparse-index storage): the element update of
// adamw_element.h at p[idx[k]] with compact state m[k], v[k] (and vmax[k]).
//
// Bytes per selected element (fp32, int32 indices): idx 4 + p 4+4 + g 4 + m, v 8+8 = 32;
// gathers from p and g are the cost, so the gather prefetches the lines of entries ahead.  The
// gradient is dense (gathered at idx) or compact (g[k]).  Scalars come per tensor (one float64
// row each).  Indices are sorted and unique, so chunks of k never write the same p entry.
#include <algorithm>
#include <type_traits>

#include "../ops.h"

#include "adamw_block.h"
#include "cpu_common.h"

namespace childopt {
namespace cpu {
namespace {

// Entries ahead whose p (and dense g) lines are prefetched: the gathers follow sorted indices
// with gaps the hardware prefetcher does not follow once the child network is sparse.
constexpr int64_t kPrefetchAhead = 16;

// p[idx[k]] (and g[idx[k]] for a dense gradient) of a block gathered into fp32 scratch.
template <typename P, typename G, typename I, bool COMPACT>
void gather_block(const Raw<P>* __restrict p, const Raw<G>* __restrict g, const I* __restrict idx, int64_t n,
                  int64_t left, float* __restrict p_wide, float* __restrict g_wide) {
  for (int64_t k = 0; k < n; ++k) {
    if (kPrefetchAhead < left - k) {
      const int64_t ahead = static_cast<int64_t>(idx[k + kPrefetchAhead]);
      __builtin_prefetch(p + ahead, 1);
      if (!COMPACT) __builtin_prefetch(g + ahead, 0);
    }
    const int64_t j = static_cast<int64_t>(idx[k]);
    p_wide[k] = Storage<P>::load(p[j]);
    if (!COMPACT) g_wide[k] = Storage<G>::load(g[j]);
  }
}

// The updated scratch written back to p[idx[k]].
template <typename P, typename I>
void scatter_block(Raw<P>* __restrict p, const I* __restrict idx, const float* __restrict p_wide, int64_t n) {
  for (int64_t k = 0; k < n; ++k) p[static_cast<int64_t>(idx[k])] = Storage<P>::store(p_wide[k]);
}

// A chunk of selected entries in 1K blocks: gather (prefetching ahead), the fp32 update of
// adamw_block.h over the compact block (vectorised: its division and square root were the
// scalar loop's cost once the gathers are prefetched), scatter.  The arithmetic is the dense
// step's, element for element.
template <typename P, typename G, typename I, bool AMSGRAD, bool COMPACT>
void sparse_chunk(Raw<P>* p, const Raw<G>* g, const I* idx, float* m, float* v, float* vmax, int64_t n,
                  const StepScalars& s) {
  alignas(64) float p_wide[kBlock];
  alignas(64) float g_wide[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t count = std::min(kBlock, n - b);
    gather_block<P, G, I, COMPACT>(p, g, idx + b, count, n - b, p_wide, g_wide);
    const float* g32 = g_wide;
    if constexpr (COMPACT && std::is_same_v<G, float>) {
      g32 = g + b;
    } else if constexpr (COMPACT) {
      widen_block<G>(g + b, g_wide, count);
    }
    adamw_block<float, float, AMSGRAD, Keep::kAll, false>(p_wide, g32, m + b, v + b, AMSGRAD ? vmax + b : nullptr,
                                                          nullptr, nullptr, count, s);
    scatter_block<P, I>(p, idx + b, p_wide, count);
  }
}

template <typename P, typename G, typename I, bool AMSGRAD, bool COMPACT>
void sparse_lists(at::TensorList params, at::TensorList grads, at::TensorList indices, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const double* rows) {
  std::vector<int64_t> numels;
  for (const auto& t : indices) numels.push_back(t.numel());
  for_each_chunk(numels, [&](const Chunk& c) {
    const int64_t t = c.tensor;
    const StepScalars s = step_scalars_from_row(rows + t * kNumStepScalars);
    float* vmax = AMSGRAD ? max_exp_avg_sqs[t].data_ptr<float>() + c.begin : nullptr;
    sparse_chunk<P, G, I, AMSGRAD, COMPACT>(raw_data<P>(params[t]), raw_data<G>(grads[t]) + (COMPACT ? c.begin : 0),
                                            indices[t].data_ptr<I>() + c.begin,
                                            exp_avgs[t].data_ptr<float>() + c.begin,
                                            exp_avg_sqs[t].data_ptr<float>() + c.begin, vmax, c.end - c.begin, s);
  });
}

template <typename P, typename G, typename I>
void dispatch_flags(at::TensorList params, at::TensorList grads, at::TensorList indices, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, bool amsgrad, bool compact,
                    const double* rows) {
#define CHILDOPT_RUN(AMS, COMPACT) \
  return sparse_lists<P, G, I, AMS, COMPACT>(params, grads, indices, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, rows)
  if (amsgrad) {
    if (compact) CHILDOPT_RUN(true, true);
    CHILDOPT_RUN(true, false);
  }
  if (compact) CHILDOPT_RUN(false, true);
  CHILDOPT_RUN(false, false);
#undef CHILDOPT_RUN
}

}  // namespace

void sparse_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList indices, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const at::Tensor& scalars,
                       bool amsgrad, bool compact_grads) {
  check_sparse_adamw_step(params, grads, indices, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars, amsgrad,
                          compact_grads);
  if (params.empty()) return;
  const double* rows = scalars.data_ptr<double>();
  const auto p_dtype = params[0].scalar_type();
  const auto g_dtype = grads[0].scalar_type();
  const bool wide = indices[0].scalar_type() == at::kLong;
  CHILDOPT_DISPATCH_FLOAT_TYPES(p_dtype, "childopt_sparse_adamw_step", [&] {
    using P = scalar_t;
    if (g_dtype == p_dtype) {
      if (wide) return dispatch_flags<P, P, int64_t>(params, grads, indices, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                                     amsgrad, compact_grads, rows);
      return dispatch_flags<P, P, int32_t>(params, grads, indices, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad,
                                           compact_grads, rows);
    }
    if (wide) return dispatch_flags<P, float, int64_t>(params, grads, indices, exp_avgs, exp_avg_sqs,
                                                       max_exp_avg_sqs, amsgrad, compact_grads, rows);
    return dispatch_flags<P, float, int32_t>(params, grads, indices, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad,
                                             compact_grads, rows);
  });
}

}  // namespace cpu
}  // namespace childopt
