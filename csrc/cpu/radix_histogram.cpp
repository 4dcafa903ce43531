// One radix-select pass over fp32 scores of many CPU tensors (childopt/masks.py).
//
// Each score s (-0.0 counted as +0.0) has the order-preserving key `bits | 0x80000000` (s >= 0)
// or `~bits` (s < 0).  Per scope, the pass counts the keys that agree with the scope's prefix
// above bit shift + bits, into bin (key >> shift) & (2**bits - 1).  Bytes: 4 per element, read
// only.  Each thread counts into its own histogram; the threads' histograms are summed at the end.
#include "../ops.h"

#include <mutex>

#include "cpu_common.h"

namespace childopt {
namespace cpu {
namespace {

CHILDOPT_CPU_CLONES void count_block(const float* __restrict s, int64_t n, uint32_t shift, uint32_t bits,
                                     bool check_prefix, int64_t prefix, int64_t* __restrict hist) {
  const uint32_t bin_mask = (1u << bits) - 1u;
  for (int64_t i = 0; i < n; ++i) {
    const float x = s[i] + 0.0f;
    uint32_t b;
    std::memcpy(&b, &x, sizeof b);
    const uint32_t key = (b >> 31) ? ~b : (b | 0x80000000u);
    if (check_prefix && static_cast<int64_t>(key >> (shift + bits)) != prefix) continue;
    ++hist[(key >> shift) & bin_mask];
  }
}

}  // namespace

at::Tensor radix_histogram(at::TensorList scores, at::IntArrayRef scopes, const at::Tensor& prefixes, int64_t shift,
                           int64_t bits, int64_t n_scopes) {
  check_radix_histogram(scores, scopes, prefixes, shift, bits, n_scopes);
  const int64_t bins = int64_t{1} << bits;
  at::Tensor hist = at::zeros({n_scopes, bins}, prefixes.options());
  int64_t* out = hist.data_ptr<int64_t>();
  const int64_t* prefix = prefixes.data_ptr<int64_t>();
  const bool check_prefix = shift + bits < 32;
  std::vector<int64_t> numels;
  for (const auto& t : scores) numels.push_back(t.numel());
  const std::vector<Chunk> chunks = make_chunks(numels);
  std::mutex merge;
  parallel_over_chunks(chunks, [&](int64_t first, int64_t last) {
    std::vector<int64_t> local(static_cast<size_t>(n_scopes * bins), 0);
    for (int64_t i = first; i < last; ++i) {
      const Chunk& c = chunks[i];
      const int64_t scope = scopes[c.tensor];
      count_block(scores[c.tensor].data_ptr<float>() + c.begin, c.end - c.begin, static_cast<uint32_t>(shift),
                  static_cast<uint32_t>(bits), check_prefix, prefix[scope], local.data() + scope * bins);
    }
    std::lock_guard<std::mutex> guard(merge);
    for (size_t i = 0; i < local.size(); ++i) out[i] += local[i];
  });
  return hist;
}

}  // namespace cpu
}  // namespace childopt
