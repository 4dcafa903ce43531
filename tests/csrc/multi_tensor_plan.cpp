// Host driver of csrc/cuda/multi_tensor.cuh for tests/csrc/test_multi_tensor_plan.py: the tables
// of a tensor list and, for a grid limit, the chunks each block of each launch steps, computed by
// the header's own code (for_each_table, launch_blocks, for_each_chunk_of: the kernels' chunk
// loop) with blockIdx/gridDim played by a loop.  argv: max_blocks numel...; prints one line per launch ("launch T slots S
// blocks B") and one per chunk stepped ("chunk T tensor block start n"; tensor = list index).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../csrc/cuda/multi_tensor.cuh"

using childopt::cuda_kernels::TensorRefs;
namespace mt = childopt::cuda_kernels;

int main(int argc, char** argv) {
  const int max_blocks = std::atoi(argv[1]);
  std::vector<TensorRefs> tensors;
  for (int i = 2; i < argc; ++i) {
    TensorRefs t{};
    t.numel = std::atoll(argv[i]);
    t.extra = i - 2;  // the list index, as the kernels' scalar row
    tensors.push_back(t);
  }
  int launch = 0;
  mt::for_each_table<6>(tensors, [&](const mt::TensorListMeta<6>& meta) {
    const int blocks = mt::launch_blocks(meta, max_blocks);
    std::printf("launch %d slots %d blocks %d\n", launch, meta.slots, blocks);
    for (int block = 0; block < blocks; ++block) {
      mt::for_each_chunk_of(meta, block, blocks, [&](const mt::ChunkWork<6>& work) {
        std::printf("chunk %d %lld %d %lld %lld\n", launch, static_cast<long long>(meta.extra[work.slot]), block,
                    static_cast<long long>(work.start), static_cast<long long>(work.n));
      });
    }
    ++launch;
  });
  return 0;
}
