// The op set of childopt._C (docs/design.md, childopt/backends/contract.py, which declares
// the schemas): declarations of the CPU and CUDA implementations and the argument checks both
// share.
//
// Ops (implemented for torch.ops.childopt.* in bindings.cpp):
//   adamw_step         masked AdamW over a bucket; mask_kind: MaskKind (step_scalars.h)
//   sparse_adamw_step  AdamW on selected flat indices with compact state
//   fisher_accumulate  fisher[i] += (grads[i] * scales[i])^2
//   radix_histogram    one radix-select pass over fp32 score bit patterns, per scope
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "childopt/adamw_element.h"

namespace childopt {

inline MaskKind mask_kind_from(int64_t mask_kind) {
  TORCH_CHECK(mask_kind >= 0 && mask_kind <= 3,
              "childopt: mask_kind must be 0 (none), 1 (dense), 2 (bernoulli) or 3 (importance), got ", mask_kind);
  return static_cast<MaskKind>(mask_kind);
}

// The ops' `Tensor scalars`: one contiguous float64 row of kNumStepScalars values per tensor,
// on the params' device.
inline void check_scalars(const at::Tensor& scalars, size_t n, const at::Device& device) {
  TORCH_CHECK(scalars.scalar_type() == at::kDouble && scalars.dim() == 2 &&
                  scalars.size(0) == static_cast<int64_t>(n) && scalars.size(1) == kNumStepScalars &&
                  scalars.is_contiguous() && scalars.device() == device,
              "childopt: scalars must be a contiguous float64 tensor of shape [", n, ", ", kNumStepScalars, "] on ",
              device, ", got ", scalars.scalar_type(), " of shape ", scalars.sizes(), " on ", scalars.device());
}

// The Bernoulli draw of a tensor: the bucket's key and threshold with the tensor's step.
inline BernoulliDraw bernoulli_draw(int64_t keep_threshold, int64_t seed_lo, int64_t seed_hi, uint64_t step) {
  return {static_cast<uint32_t>(seed_lo), static_cast<uint32_t>(seed_hi), step, static_cast<uint64_t>(keep_threshold)};
}

inline void check_draw(int64_t keep_threshold, int64_t seed_lo, int64_t seed_hi) {
  TORCH_CHECK(keep_threshold > 0 && keep_threshold < (int64_t{1} << 32),
              "childopt: keep_threshold must be in [1, 2**32), got ", keep_threshold);
  TORCH_CHECK(seed_lo >= 0 && seed_lo < (int64_t{1} << 32) && seed_hi >= 0 && seed_hi < (int64_t{1} << 32),
              "childopt: seed_lo and seed_hi must be 32-bit words, got ", seed_lo, " and ", seed_hi);
}

// Check that `list` has `n` contiguous tensors on `device` of `dtype` (any float dtype when
// dtype is Undefined) whose sizes match `like` (numel of `like[i]`, or `numels` when given).
inline void check_list(const char* what, at::TensorList list, size_t n, const at::Device& device,
                       c10::optional<at::ScalarType> dtype, at::TensorList like) {
  TORCH_CHECK(list.size() == n, "childopt: ", what, " must hold ", n, " tensors, got ", list.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device() == device, "childopt: ", what, "[", i, "] is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.is_contiguous(), "childopt: ", what, "[", i, "] must be contiguous");
    if (dtype) {
      TORCH_CHECK(t.scalar_type() == *dtype, "childopt: ", what, "[", i, "] must be ", *dtype, ", got ",
                  t.scalar_type());
    } else {
      const auto s = t.scalar_type();
      TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "childopt: ", what, "[", i,
                  "] must be float32, bfloat16 or float16, got ", s);
    }
    if (!like.empty()) {
      TORCH_CHECK(t.numel() == like[i].numel(), "childopt: ", what, "[", i, "] has ", t.numel(),
                  " elements, expected ", like[i].numel());
    }
  }
}

// The dtype shared by every tensor of a list (the front-end buckets by dtype).
inline at::ScalarType common_dtype(const char* what, at::TensorList list) {
  const auto dtype = list[0].scalar_type();
  for (size_t i = 1; i < list.size(); ++i) {
    TORCH_CHECK(list[i].scalar_type() == dtype, "childopt: ", what, " must share one dtype, got ", dtype, " and ",
                list[i].scalar_type());
  }
  return dtype;
}

// The grads share the params' dtype, or are float32 (16-bit params trained with fp32 grads).
inline void check_grad_dtype(at::TensorList params, at::TensorList grads) {
  const auto p = params[0].scalar_type();
  const auto g = grads[0].scalar_type();
  TORCH_CHECK(g == p || g == at::kFloat, "childopt: grads must have the params' dtype (", p, ") or float32, got ", g);
}

// Validates the arguments of adamw_step.
inline void check_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masks,
                             const at::Tensor& scalars, MaskKind mask_kind, bool amsgrad) {
  const size_t n = params.size();
  if (n == 0) return;
  const at::Device device = params[0].device();
  check_list("params", params, n, device, c10::nullopt, {});
  check_list("grads", grads, n, device, c10::nullopt, params);
  check_list("exp_avgs", exp_avgs, n, device, at::kFloat, params);
  check_list("exp_avg_sqs", exp_avg_sqs, n, device, at::kFloat, params);
  if (amsgrad) check_list("max_exp_avg_sqs", max_exp_avg_sqs, n, device, at::kFloat, params);
  if (mask_kind == MaskKind::kDense) check_list("masks", masks, n, device, at::kBool, params);
  if (mask_kind == MaskKind::kImportance) check_list("masks", masks, n, device, at::kByte, params);
  check_scalars(scalars, n, device);
  common_dtype("params", params);
  common_dtype("grads", grads);
  check_grad_dtype(params, grads);
}

inline void check_sparse_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList indices,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                    at::TensorList max_exp_avg_sqs, const at::Tensor& scalars, bool amsgrad,
                                    bool compact_grads) {
  const size_t n = params.size();
  if (n == 0) return;
  const at::Device device = params[0].device();
  check_list("params", params, n, device, c10::nullopt, {});
  check_list("grads", grads, n, device, c10::nullopt, compact_grads ? indices : params);
  TORCH_CHECK(indices.size() == n, "childopt: indices must hold ", n, " tensors, got ", indices.size());
  for (size_t i = 0; i < n; ++i) {
    const auto s = indices[i].scalar_type();
    TORCH_CHECK(indices[i].device() == device && indices[i].dim() == 1 && indices[i].is_contiguous() &&
                    (s == at::kInt || s == at::kLong),
                "childopt: indices[", i, "] must be a contiguous 1-D int32/int64 tensor on ", device);
  }
  check_list("exp_avgs", exp_avgs, n, device, at::kFloat, indices);
  check_list("exp_avg_sqs", exp_avg_sqs, n, device, at::kFloat, indices);
  if (amsgrad) check_list("max_exp_avg_sqs", max_exp_avg_sqs, n, device, at::kFloat, indices);
  common_dtype("params", params);
  common_dtype("grads", grads);
  check_grad_dtype(params, grads);
  common_dtype("indices", indices);
  check_scalars(scalars, n, device);
}

inline void check_fisher_accumulate(at::TensorList fisher, at::TensorList grads, const at::Tensor& scales) {
  const size_t n = fisher.size();
  if (n == 0) return;
  const at::Device device = fisher[0].device();
  check_list("fisher", fisher, n, device, at::kFloat, {});
  check_list("grads", grads, n, device, c10::nullopt, fisher);
  TORCH_CHECK(scales.device() == device && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.numel() == static_cast<int64_t>(n) && scales.is_contiguous(),
              "childopt: scales must be a contiguous float32 vector of ", n, " values on ", device);
  common_dtype("grads", grads);
}

inline void check_radix_histogram(at::TensorList scores, at::IntArrayRef scopes, const at::Tensor& prefixes,
                                  int64_t shift, int64_t bits, int64_t n_scopes) {
  TORCH_CHECK(scopes.size() == scores.size(), "childopt: scopes must hold one index per score tensor");
  TORCH_CHECK(bits >= 1 && bits <= 16 && shift >= 0 && shift + bits <= 32,
              "childopt: need 1 <= bits <= 16 and 0 <= shift, shift + bits <= 32; got shift=", shift, " bits=", bits);
  TORCH_CHECK(prefixes.scalar_type() == at::kLong && prefixes.dim() == 1 && prefixes.numel() == n_scopes &&
                  prefixes.is_contiguous(),
              "childopt: prefixes must be a contiguous int64 vector of n_scopes=", n_scopes, " values");
  for (size_t i = 0; i < scores.size(); ++i) {
    TORCH_CHECK(scopes[i] >= 0 && scopes[i] < n_scopes, "childopt: scopes[", i, "]=", scopes[i],
                " is outside [0, ", n_scopes, ")");
  }
  if (!scores.empty()) check_list("scores", scores, scores.size(), prefixes.device(), at::kFloat, {});
}

// The op signatures, declared once for each device namespace.
#define CHILDOPT_DECLARE_OPS()                                                                                        \
  void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,  \
                  at::TensorList max_exp_avg_sqs, at::TensorList masks, const at::Tensor& scalars, int64_t mask_kind, \
                  bool freeze, bool amsgrad, int64_t keep_threshold, int64_t seed_lo, int64_t seed_hi);               \
  void sparse_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList indices,                         \
                         at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,         \
                         const at::Tensor& scalars, bool amsgrad, bool compact_grads);                                \
  void fisher_accumulate(at::TensorList fisher, at::TensorList grads, const at::Tensor& scales);                      \
  at::Tensor radix_histogram(at::TensorList scores, at::IntArrayRef scopes, const at::Tensor& prefixes, int64_t shift, \
                             int64_t bits, int64_t n_scopes);

namespace cpu {
CHILDOPT_DECLARE_OPS()

// CPU-only functions of the pybind11 module (not dispatcher ops): the Philox words behind
// sample_mask's Gumbel noise (philox_words.cpp), the importance draw's test hooks (the same file)
// the benchmark's roofline reference (inplace_stream.cpp), the eager step's count increment and
// the passes of an importance refresh: its score logs (score_logs.cpp), keep probabilities and the
// solve's sums of them (keep_probabilities.cpp), and level codes (level_codes.cpp).
void philox_words_into(const at::Tensor& words, uint64_t rng_base, uint64_t seed, uint64_t step);
void level_codes_into(const at::Tensor& p, const at::Tensor& codes, uint64_t rng_base, uint64_t seed, uint64_t step);
void portable_log2_into(const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& codes);
void keep_probabilities_into(const at::Tensor& log_r, const at::Tensor& p, double whole, double factor, double floor);
std::tuple<int64_t, int64_t, int64_t> probability_sums(const at::Tensor& log_r, double whole, double factor,
                                                       double floor);
std::tuple<at::Tensor, at::Tensor> importance_draw_of(const at::Tensor& codes, uint64_t rng_base, uint64_t seed,
                                                      uint64_t step);
std::tuple<at::Tensor, at::Tensor> importance_levels_of(const at::Tensor& words, const at::Tensor& codes);
void inplace_stream(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v);
// +1 on each count if all are plain 0-dim float32 CPU tensors (step_counts.cpp); false, and
// nothing changed, otherwise.  read_step_counts: their values, or nullopt on the same condition.
bool advance_step_counts(const std::vector<at::Tensor>& counts);
std::optional<std::vector<double>> read_step_counts(const std::vector<at::Tensor>& counts);
}  // namespace cpu

#ifdef CHILDOPT_WITH_CUDA
namespace cuda {
CHILDOPT_DECLARE_OPS()
}  // namespace cuda
#endif

#undef CHILDOPT_DECLARE_OPS

}  // namespace childopt
