// childopt._C: implementations of the ops torch.ops.childopt.* (CPU kernels always, CUDA
// kernels in CUDA builds), plus a pybind11 module that reports how it was built.
//
// The schemas are declared once, in Python (childopt/backends/contract.py, with the fake
// kernels torch.compile needs); this module only registers implementations, so it must be
// loaded after childopt.backends is imported (childopt._native does).  Ops go through the
// dispatcher rather than pybind11 functions so they accept CPU and CUDA tensors through one
// name and compose with torch's tooling; the pybind11 module exists so the build is an
// importable Python extension (torch.utils.cpp_extension's contract), and exports the field
// order of StepScalars and the MaskKind values for the contract's drift test.
#include <optional>
#include <vector>

#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"
#include "cpu/philox_cpu.h"
#include "ops.h"

TORCH_LIBRARY_IMPL(childopt, CPU, m) {
  m.impl("adamw_step", &childopt::cpu::adamw_step);
  m.impl("sparse_adamw_step", &childopt::cpu::sparse_adamw_step);
  m.impl("fisher_accumulate", &childopt::cpu::fisher_accumulate);
  m.impl("radix_histogram", &childopt::cpu::radix_histogram);
}

namespace {

// The tensors of a list whose items are all exactly torch.Tensor (or Parameter), else nullopt: a
// subclass may override an op in __torch_function__ with the keys of a plain tensor.
std::optional<std::vector<at::Tensor>> exact_tensors(const pybind11::list& items) {
  std::vector<at::Tensor> tensors;
  tensors.reserve(items.size());
  for (const auto& item : items) {
    if (!THPVariable_CheckExact(item.ptr())) return std::nullopt;
    tensors.push_back(THPVariable_Unpack(item.ptr()));
  }
  return tensors;
}

}  // namespace

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
  std::vector<std::string> fields;
#define CHILDOPT_NAME(type, name) fields.emplace_back(#name);
  CHILDOPT_STEP_SCALAR_FIELDS(CHILDOPT_NAME)
#undef CHILDOPT_NAME
  m.attr("step_scalar_fields") = fields;
  m.attr("mask_kinds") = std::vector<std::pair<std::string, int64_t>>{
      {"NONE", static_cast<int64_t>(childopt::MaskKind::kNone)},
      {"DENSE", static_cast<int64_t>(childopt::MaskKind::kDense)},
      {"BERNOULLI", static_cast<int64_t>(childopt::MaskKind::kBernoulli)},
      {"IMPORTANCE", static_cast<int64_t>(childopt::MaskKind::kImportance)}};
  m.def("_record_chunk_threads", &childopt::cpu::record_chunk_threads,
        "test-only: clear the set of threads that ran CPU kernel chunks and switch recording on or off");
  m.def("_chunk_thread_count", &childopt::cpu::chunk_thread_count,
        "test-only: how many distinct threads ran CPU kernel chunks since recording was switched on");
  m.def("_chunk_thread_items", &childopt::cpu::chunk_thread_items,
        "test-only: the work items each thread that ran CPU kernel chunks ran since recording was switched on");
  m.def("_philox_words", &childopt::cpu::philox_words_into, pybind11::arg("words"), pybind11::arg("rng_base"),
        pybind11::arg("seed"), pybind11::arg("step"),
        "fill a contiguous int32 CPU tensor with the Philox words (bit patterns) of its elements, as "
        "childopt.philox.random_words draws them");
  m.def("_level_codes", &childopt::cpu::level_codes_into, pybind11::arg("p"), pybind11::arg("codes"),
        pybind11::arg("rng_base"), pybind11::arg("seed"), pybind11::arg("step"),
        "fill a contiguous uint8 CPU tensor with the importance level codes of the contiguous float32 keep "
        "probabilities p, rounded by their Philox words, as childopt.importance.level_codes draws them");
  m.def("_portable_log2", &childopt::cpu::portable_log2_into, pybind11::arg("x"), pybind11::arg("out"),
        pybind11::arg("codes") = pybind11::none(),
        "fill a contiguous float32 CPU tensor with the log2 of the contiguous float32 CPU tensor x (times the "
        "level probability of each uint8 code when codes are given), as childopt.portable_math.log2 computes it");
  m.def("_keep_probabilities", &childopt::cpu::keep_probabilities_into, pybind11::arg("log_r"), pybind11::arg("p"),
        pybind11::arg("whole"), pybind11::arg("factor"), pybind11::arg("floor"),
        "fill a contiguous float32 CPU tensor with clamp(exp2(log_r + whole) * factor, floor, 1), as "
        "childopt.importance.probabilities computes them (exp2: childopt.portable_math's)");
  m.def("_probability_sums", &childopt::cpu::probability_sums, pybind11::arg("log_r"), pybind11::arg("whole"),
        pybind11::arg("factor"), pybind11::arg("floor"),
        "(sum in units of 2**-30, entries equal to 1, entries equal to float32(floor)) of the keep probabilities "
        "_keep_probabilities would write, without writing them, as childopt.importance.probability_sums sums them");
  m.def("_importance_draw", &childopt::cpu::importance_draw_of, pybind11::arg("codes"), pybind11::arg("rng_base"),
        pybind11::arg("seed"), pybind11::arg("step"),
        "test-only: the importance keep decisions (bool) and level scales (float32) of a contiguous uint8 CPU "
        "tensor of level codes, drawn in one call as the masked step draws a block");
  m.def("_importance_levels", &childopt::cpu::importance_levels_of, pybind11::arg("words"), pybind11::arg("codes"),
        "test-only: the importance keep decisions (bool) and level scales (float32) of int32 Philox words and "
        "uint8 level codes, by the level arithmetic of the selected Philox ISA");
  m.def("_inplace_stream", &childopt::cpu::inplace_stream, pybind11::arg("p"), pybind11::arg("g"),
        pybind11::arg("m"), pybind11::arg("v"),
        "benchmark reference: m += g; v += g; p += m over four fp32 CPU tensors, 28 B per element, in parallel");
  m.def(
      "_advance_step_counts",
      [](const pybind11::list& counts) {
        const auto tensors = exact_tensors(counts);
        return tensors.has_value() && childopt::cpu::advance_step_counts(*tensors);
      },
      pybind11::arg("counts"),
      "+1 on each of a list of plain 0-dim float32 CPU step counts in one call; returns False, changing nothing, "
      "if any count is not one or a Python dispatch mode is active");
  m.def(
      "_step_counts",
      [](const pybind11::list& counts) -> std::optional<std::vector<double>> {
        const auto tensors = exact_tensors(counts);
        if (!tensors.has_value()) return std::nullopt;
        return childopt::cpu::read_step_counts(*tensors);
      },
      pybind11::arg("counts"),
      "the values of a list of plain 0-dim float32 CPU step counts, as floats, in one call; None if any count "
      "is not one or a Python dispatch mode is active");
  // The Philox ISAs of the CPU draws: 0 scalar, 1 AVX2, 2 AVX-512F (philox_cpu.h).
  m.def("_philox_isa", [] { return static_cast<int64_t>(childopt::cpu::philox_isa()); },
        "the ISA the CPU Philox draws use now: 0 scalar, 1 AVX2, 2 AVX-512F");
  m.def("_best_philox_isa", [] { return static_cast<int64_t>(childopt::cpu::best_philox_isa()); },
        "the fastest Philox ISA this CPU supports");
  m.def("_set_philox_isa",
        [](int64_t isa) {
          return static_cast<int64_t>(childopt::cpu::set_philox_isa(static_cast<childopt::cpu::PhiloxIsa>(isa)));
        },
        "test-only: draw with this ISA from now on (refused if the CPU lacks it); returns the previous one");
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
