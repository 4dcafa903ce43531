// The per-tensor scalars of one step and the mask kinds: the C++ side of the op contract in
// childopt/backends/contract.py (docs/design.md, "The op contract").
//
// The ops take `Tensor scalars`: a contiguous float64 [n_tensors, kNumStepScalars] tensor on
// the params' device, one row per tensor, columns in the order of CHILDOPT_STEP_SCALAR_FIELDS.
// The field list is written once, here, and expands into the struct, the row reader and the
// names that childopt._C exports (a test compares them with contract.STEP_SCALAR_FIELDS).
// Each value is rounded from float64 to its field type once (fp32 math thereafter), as the
// Triton kernels and the reference backend do.
#pragma once

#include <cstdint>

#include "childopt/philox.h"

namespace childopt {

// X(type, name): in column order.
#define CHILDOPT_STEP_SCALAR_FIELDS(X) \
  X(float, decay_before)               \
  X(float, decay_after)                \
  X(float, one_minus_beta1)            \
  X(float, beta2)                      \
  X(float, one_minus_beta2)            \
  X(float, eps)                        \
  X(float, step_size)                  \
  X(float, bc2_sqrt)                   \
  X(float, grad_scale)                 \
  X(float, grad_sign)                  \
  X(bool, lerp_from_start)             \
  X(uint64_t, step)                    \
  X(uint64_t, rng_base)

struct StepScalars {
#define CHILDOPT_FIELD(type, name) type name;
  CHILDOPT_STEP_SCALAR_FIELDS(CHILDOPT_FIELD)
#undef CHILDOPT_FIELD
};

#define CHILDOPT_COUNT(type, name) +1
constexpr int kNumStepScalars = 0 CHILDOPT_STEP_SCALAR_FIELDS(CHILDOPT_COUNT);
#undef CHILDOPT_COUNT

// The row of one tensor, rounded once from the float64 columns.
CHILDOPT_HD StepScalars step_scalars_from_row(const double* row) {
  StepScalars s;
  int column = 0;
#define CHILDOPT_READ(type, name) s.name = static_cast<type>(row[column++]);
  CHILDOPT_STEP_SCALAR_FIELDS(CHILDOPT_READ)
#undef CHILDOPT_READ
  return s;
}

// The ops' `int mask_kind` (contract.MaskKind).
enum class MaskKind : int64_t { kNone = 0, kDense = 1, kBernoulli = 2, kImportance = 3 };

}  // namespace childopt
