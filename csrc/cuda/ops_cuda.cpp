// The torch side of the CUDA ops: argument checks (shared with the CPU ops, ops.h), tensor
// lists to raw launch tables, the current stream and device, and launch errors as exceptions.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "childopt/cuda_ops.h"

namespace childopt {
namespace cuda {
namespace {

using cuda_kernels::DType;
using cuda_kernels::TensorRefs;

DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "childopt: CUDA kernels take float32, bfloat16 or float16 tensors, got ", s);
  }
}

// Launch tables: tensor i of each list in `lists` (empty lists give null addresses).
std::vector<TensorRefs> refs(std::initializer_list<at::TensorList> lists, at::TensorList sized,
                             const std::vector<int64_t>& extra) {
  std::vector<TensorRefs> out(sized.size());
  for (size_t i = 0; i < sized.size(); ++i) {
    int d = 0;
    for (const at::TensorList& list : lists) out[i].ptr[d++] = list.empty() ? nullptr : list[i].data_ptr();
    for (; d < 6; ++d) out[i].ptr[d] = nullptr;
    out[i].numel = sized[i].numel();
    out[i].extra = extra.empty() ? static_cast<int64_t>(i) : extra[i];
  }
  return out;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "childopt: ", op, " launch failed: ", cudaGetErrorString(err));
}

// fp32 grads with 16-bit params (check_grad_dtype allows only that or matching dtypes).
bool grads_float(at::TensorList params, at::TensorList grads) {
  return grads[0].scalar_type() != params[0].scalar_type();
}

}  // namespace

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList masks, const at::Tensor& scalars, int64_t mask_kind,
                bool freeze, bool amsgrad, int64_t keep_threshold, int64_t seed_lo, int64_t seed_hi) {
  const MaskKind kind = mask_kind_from(mask_kind);
  check_adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, scalars, kind, amsgrad);
  const bool drawn = kind == MaskKind::kBernoulli || kind == MaskKind::kImportance;
  if (drawn) check_draw(keep_threshold, seed_lo, seed_hi);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cuda_kernels::AdamwConfig config{dtype_of(params[0].scalar_type()),
                                         grads_float(params, grads),
                                         amsgrad,
                                         kind,
                                         freeze,
                                         scalars.data_ptr<double>(),
                                         drawn ? bernoulli_draw(keep_threshold, seed_lo, seed_hi, 0)
                                               : BernoulliDraw{0, 0, 0, 0}};
  const bool coded = kind == MaskKind::kDense || kind == MaskKind::kImportance;
  const auto tables = refs({params, grads, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(),
                            coded ? masks : at::TensorList()},
                           params, {});
  check_launch(cuda_kernels::adamw_step(tables, config, c10::cuda::getCurrentCUDAStream().stream()), "adamw_step");
}

void sparse_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList indices, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const at::Tensor& scalars,
                       bool amsgrad, bool compact_grads) {
  check_sparse_adamw_step(params, grads, indices, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars, amsgrad,
                          compact_grads);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cuda_kernels::SparseAdamwConfig config{dtype_of(params[0].scalar_type()), grads_float(params, grads),
                                               amsgrad, compact_grads, indices[0].scalar_type() == at::kLong,
                                               scalars.data_ptr<double>()};
  const auto tables =
      refs({params, grads, indices, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList()}, indices, {});
  check_launch(cuda_kernels::sparse_adamw_step(tables, config, c10::cuda::getCurrentCUDAStream().stream()), "sparse_adamw_step");
}

void fisher_accumulate(at::TensorList fisher, at::TensorList grads, const at::Tensor& scales) {
  check_fisher_accumulate(fisher, grads, scales);
  if (fisher.empty()) return;
  const c10::cuda::CUDAGuard guard(fisher[0].device());
  const auto tables = refs({fisher, grads}, fisher, {});
  check_launch(cuda_kernels::fisher_accumulate(tables, dtype_of(grads[0].scalar_type()), scales.data_ptr<float>(),
                                               c10::cuda::getCurrentCUDAStream().stream()),
               "fisher_accumulate");
}

at::Tensor radix_histogram(at::TensorList scores, at::IntArrayRef scopes, const at::Tensor& prefixes, int64_t shift,
                           int64_t bits, int64_t n_scopes) {
  check_radix_histogram(scores, scopes, prefixes, shift, bits, n_scopes);
  TORCH_CHECK(bits <= 12, "childopt: the CUDA radix_histogram counts at most 12 bits per pass, got ", bits);
  const c10::cuda::CUDAGuard guard(prefixes.device());
  at::Tensor hist = at::zeros({n_scopes, int64_t{1} << bits}, prefixes.options());
  if (scores.empty()) return hist;
  const auto tables = refs({scores}, scores, std::vector<int64_t>(scopes.begin(), scopes.end()));
  check_launch(cuda_kernels::radix_histogram(tables, hist.data_ptr<int64_t>(), prefixes.data_ptr<int64_t>(),
                                             static_cast<int>(shift), static_cast<int>(bits),
                                             c10::cuda::getCurrentCUDAStream().stream()),
               "radix_histogram");
  return hist;
}

}  // namespace cuda
}  // namespace childopt
