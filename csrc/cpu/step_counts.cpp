// The step counts of the eager CPU step, read and incremented for a whole bucket in one call each.
// Reading: the host rows of step scalars need every count as a double (childopt/optim/functional.py),
// and torch.stack(counts).tolist() took 37 us over 139 counts on a 2-core EPYC.  Increment: +1 on
// every state["step"]; torch._foreach_add_ has no CPU fast path and dispatches once per tensor
// (about 1 ms of a step over roberta-base's 139 tensors there, a fifth of a 1%-sparse step).  Both
// are plain loops.  Only plain 0-dim float32 CPU tensors outside autograd qualify (the counts
// childopt creates and loads), and only with no Python dispatch mode active; for anything else
// they read or change nothing and say so, and the caller takes torch's ops.  (The exact Python
// type, which a __torch_function__ subclass changes without changing the keys, is checked in
// bindings.cpp, where the Python objects are.)  No memory traffic to speak of: 4 B per tensor.
#include <algorithm>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "../ops.h"

namespace childopt {
namespace cpu {
namespace {

// The dispatch keys of a plain (dense, strided) CPU tensor, assembled as TensorImpl assembles them (dense CPU,
// its autograd and autocast keys) rather than read off a tensor built at run time, which would
// take the keys of whatever mode (fake, inference) was active at that moment.
c10::DispatchKeySet plain_cpu_keys() {
  constexpr auto cpu = c10::BackendComponent::CPUBit;
  return c10::DispatchKeySet(c10::DispatchKey::CPU) | c10::getAutogradRelatedKeySetFromBackend(cpu) |
         c10::getAutocastRelatedKeySetFromBackend(cpu);
}

// A Python dispatch mode (FakeTensorMode, make_fx's tracer, a FlopCounter) is active: it must see the add.
bool dispatch_mode_active() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::Python) || included.has(c10::DispatchKey::PythonTLSSnapshot);
}

bool is_plain_count(const at::Tensor& count) {
  return count.defined() && count.dim() == 0 && count.scalar_type() == at::kFloat &&
         count.key_set() == plain_cpu_keys() && !count.requires_grad() && !count.is_inference();
}

bool all_plain_counts(const std::vector<at::Tensor>& counts) {
  if (dispatch_mode_active()) return false;
  return std::all_of(counts.begin(), counts.end(), is_plain_count);
}

}  // namespace

std::optional<std::vector<double>> read_step_counts(const std::vector<at::Tensor>& counts) {
  if (!all_plain_counts(counts)) return std::nullopt;
  std::vector<double> values;
  values.reserve(counts.size());
  for (const auto& count : counts) values.push_back(static_cast<double>(*count.data_ptr<float>()));
  return values;
}

bool advance_step_counts(const std::vector<at::Tensor>& counts) {
  if (!all_plain_counts(counts)) return false;
  for (const auto& count : counts) {
    *count.data_ptr<float>() += 1.0f;
    count.unsafeGetTensorImpl()->bump_version();  // as an in-place op would: autograd's saved-tensor checks see it
  }
  return true;
}

}  // namespace cpu
}  // namespace childopt
