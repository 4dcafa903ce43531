// The roofline reference of the CPU step rows (childopt.bench): one in-place pass with the
// traffic of a fp32 AdamW step and almost none of its arithmetic.  Reads p, g, m, v and writes
// p, m, v (28 B per element, no write-allocate: every written line was just read), chunked over
// torch's intra-op threads exactly like the kernels (cpu_common.h), loops vectorised per ISA.
#include <ATen/ATen.h>

#include "cpu_common.h"

namespace childopt {
namespace cpu {
namespace {

CHILDOPT_CPU_CLONES void stream_block(float* __restrict p, const float* __restrict g, float* __restrict m,
                                      float* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float grad = g[i];
    const float m_new = m[i] + grad;
    v[i] = v[i] + grad;
    m[i] = m_new;
    p[i] = p[i] + m_new;
  }
}

}  // namespace

void inplace_stream(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v) {
  const at::Tensor* tensors[] = {&p, &g, &m, &v};
  const char* names[] = {"p", "g", "m", "v"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == p.numel(),
                "childopt: ", names[i], " must be a contiguous float32 CPU tensor of ", p.numel(), " elements, got ",
                t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
  }
  float* pp = p.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  for_each_chunk({p.numel()}, [&](const Chunk& c) {
    stream_block(pp + c.begin, gp + c.begin, mp + c.begin, vp + c.begin, c.end - c.begin);
  });
}

}  // namespace cpu
}  // namespace childopt
