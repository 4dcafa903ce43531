// In-place Fisher accumulation over many CPU tensors: fisher[i] += (grads[i] * scales[i])^2.
//
// Bytes per element (fp32 grad): fisher 4+4, g 4 = 12.  fp32 math, (g * c) * (g * c) + f in
// that order (torch's addcmul of the scaled gradient, the reference backend).
#include "../ops.h"

#include "cpu_common.h"

namespace childopt {
namespace cpu {
namespace {

template <typename G>
CHILDOPT_CPU_CLONES void fisher_block(float* __restrict f, const Raw<G>* __restrict g, int64_t n,
                                      float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = Storage<G>::load(g[i]) * scale;
    f[i] = f[i] + x * x;
  }
}

}  // namespace

void fisher_accumulate(at::TensorList fisher, at::TensorList grads, const at::Tensor& scales) {
  check_fisher_accumulate(fisher, grads, scales);
  if (fisher.empty()) return;
  const float* scale = scales.data_ptr<float>();
  std::vector<int64_t> numels;
  for (const auto& t : fisher) numels.push_back(t.numel());
  CHILDOPT_DISPATCH_FLOAT_TYPES(grads[0].scalar_type(), "childopt_fisher_accumulate", [&] {
    for_each_chunk(numels, [&](const Chunk& c) {
      fisher_block<scalar_t>(fisher[c.tensor].data_ptr<float>() + c.begin,
                             raw_data<scalar_t>(grads[c.tensor]) + c.begin, c.end - c.begin, scale[c.tensor]);
    });
  });
}

}  // namespace cpu
}  // namespace childopt
