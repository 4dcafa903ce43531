// The test-only recorder of cpu_common.h: which threads ran chunks of the CPU kernels since
// recording was switched on, and how many work items each ran.  Off, it costs one relaxed atomic
// load per thread and op call.
#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "cpu_common.h"

namespace childopt {
namespace cpu {
namespace {

std::atomic<bool> recording{false};
std::mutex mutex;
std::map<std::thread::id, int64_t> items_of;

}  // namespace

bool chunk_threads_recording() { return recording.load(std::memory_order_relaxed); }

void note_chunk_thread(int64_t items) {
  const std::lock_guard<std::mutex> lock(mutex);
  items_of[std::this_thread::get_id()] += items;
}

void record_chunk_threads(bool on) {
  const std::lock_guard<std::mutex> lock(mutex);
  items_of.clear();
  recording.store(on, std::memory_order_relaxed);
}

int64_t chunk_thread_count() {
  const std::lock_guard<std::mutex> lock(mutex);
  return static_cast<int64_t>(items_of.size());
}

std::vector<int64_t> chunk_thread_items() {
  const std::lock_guard<std::mutex> lock(mutex);
  std::vector<int64_t> items;
  for (const auto& entry : items_of) items.push_back(entry.second);
  return items;
}

}  // namespace cpu
}  // namespace childopt
