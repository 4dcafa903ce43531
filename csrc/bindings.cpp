// childopt._C: the op set registered as torch.ops.childopt.* (CPU kernels always, CUDA kernels
// in CUDA builds), plus a pybind11 module that reports how it was built.
//
// Ops go through the dispatcher rather than pybind11 functions so they accept CPU and CUDA
// tensors through one name and compose with torch's tooling; the pybind11 module exists so
// the build is an importable Python extension (torch.utils.cpp_extension's contract).
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(childopt, m) {
  m.def(
      "adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] masks, int[] rng_bases, float[] scalars, int mask_kind, bool freeze, "
      "bool amsgrad, int keep_threshold, int seed_lo, int seed_hi, int step) -> ()");
  m.def(
      "sparse_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor[] indices, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, float[] scalars, bool amsgrad, bool compact_grads) "
      "-> ()");
  m.def("fisher_accumulate(Tensor(a!)[] fisher, Tensor[] grads, Tensor scales) -> ()");
  m.def("radix_histogram(Tensor[] scores, int[] scopes, Tensor prefixes, int shift, int bits, int n_scopes) -> Tensor");
}

TORCH_LIBRARY_IMPL(childopt, CPU, m) {
  m.impl("adamw_step", &childopt::cpu::adamw_step);
  m.impl("sparse_adamw_step", &childopt::cpu::sparse_adamw_step);
  m.impl("fisher_accumulate", &childopt::cpu::fisher_accumulate);
  m.impl("radix_histogram", &childopt::cpu::radix_histogram);
}

#ifdef CHILDOPT_WITH_CUDA
TORCH_LIBRARY_IMPL(childopt, CUDA, m) {
  m.impl("adamw_step", &childopt::cuda::adamw_step);
  m.impl("sparse_adamw_step", &childopt::cuda::sparse_adamw_step);
  m.impl("fisher_accumulate", &childopt::cuda::fisher_accumulate);
  m.impl("radix_histogram", &childopt::cuda::radix_histogram);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "childopt native kernels; the ops are torch.ops.childopt.*";
#ifdef CHILDOPT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#if defined(__clang__)
  m.attr("compiler") = "clang " __clang_version__;
#elif defined(__GNUC__)
  m.attr("compiler") = "gcc " __VERSION__;
#else
  m.attr("compiler") = "unknown";
#endif
}
