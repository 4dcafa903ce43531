// The test-only recorder of cpu_common.h: which threads ran chunks of the CPU kernels since
// recording was switched on.  Off, it costs one relaxed atomic load per thread and op call.
#include <atomic>
#include <mutex>
#include <set>
#include <thread>

#include "cpu_common.h"

namespace childopt {
namespace cpu {
namespace {

std::atomic<bool> recording{false};
std::mutex mutex;
std::set<std::thread::id> threads;

}  // namespace

bool chunk_threads_recording() { return recording.load(std::memory_order_relaxed); }

void note_chunk_thread() {
  const std::lock_guard<std::mutex> lock(mutex);
  threads.insert(std::this_thread::get_id());
}

void record_chunk_threads(bool on) {
  const std::lock_guard<std::mutex> lock(mutex);
  threads.clear();
  recording.store(on, std::memory_order_relaxed);
}

int64_t chunk_thread_count() {
  const std::lock_guard<std::mutex> lock(mutex);
  return static_cast<int64_t>(threads.size());
}

}  // namespace cpu
}  // namespace childopt
