// AdamW on the selected entries of CPU tensors (sparse-index storage): the element update of
// adamw_element.h at p[idx[k]] with compact state m[k], v[k] (and vmax[k]).
//
// Bytes per selected element (fp32, int32 indices): idx 4 + p 4+4 + g 4 + m, v 8+8 = 32;
// gathers from p and g are the cost, so the loop prefetches the lines of entries ahead.  The
// gradient is dense (gathered at idx) or compact (g[k]).  Scalars come per tensor (one float64
// row each).  Indices are sorted and unique, so chunks of k never write the same p entry.
#include "../ops.h"

#include "cpu_common.h"

namespace childopt {
namespace cpu {
namespace {

// Entries ahead whose p (and dense g) lines are prefetched: the gathers follow sorted indices
// with gaps the hardware prefetcher does not follow once the child network is sparse.
constexpr int64_t kPrefetchAhead = 16;

template <typename P, typename G, typename I, bool AMSGRAD, bool COMPACT>
CHILDOPT_CPU_CLONES void sparse_block(P* __restrict p, const G* __restrict g, const I* __restrict idx,
                                      float* __restrict m, float* __restrict v, float* __restrict vmax, int64_t n,
                                      StepScalars s) {
  for (int64_t k = 0; k < n; ++k) {
    if (k + kPrefetchAhead < n) {
      const int64_t ahead = static_cast<int64_t>(idx[k + kPrefetchAhead]);
      __builtin_prefetch(p + ahead, 1);
      if (!COMPACT) __builtin_prefetch(g + ahead, 0);
    }
    const int64_t j = static_cast<int64_t>(idx[k]);
    const float grad = Storage<G>::load(COMPACT ? g[k] : g[j]);
    const ElementState e = adamw_element<AMSGRAD>(Storage<P>::load(p[j]), grad, m[k], v[k],
                                                  AMSGRAD ? vmax[k] : 0.0f, false, s);
    p[j] = Storage<P>::store(e.p);
    m[k] = e.m;
    v[k] = e.v;
    if (AMSGRAD) vmax[k] = e.vmax;
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
    sparse_block<P, G, I, AMSGRAD, COMPACT>(params[t].data_ptr<P>(), grads[t].data_ptr<G>() + (COMPACT ? c.begin : 0),
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
