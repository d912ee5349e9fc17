// What flaxdepth's CPU kernels share: chunks of images, SIMD vector types, a parallel loop on
// XLA's intra-op thread pool (flaxdepth/cpu_kernels.py compiles every .cc file here into one library).

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace flaxdepth {

// Work is cut into fixed chunks of images, whatever the number of threads, and sums are taken
// per chunk, then over chunks in order: the same inputs give the same bits on any number of threads.
constexpr int64_t kImagesPerChunk = 8;

// L floats, unaligned, allowed to alias float memory (as the compilers' own __m256_u types are).
template <int L>
struct VecOf {
  typedef float type __attribute__((vector_size(4 * L), aligned(4), may_alias));
  typedef int32_t mask __attribute__((vector_size(4 * L)));
};

#ifdef __AVX512F__
constexpr int kMaxLanes = 16;
#else
constexpr int kMaxLanes = 8;
#endif

// Lanes of the SIMD vectors holding CO output channels: as many as the processor has, at most CO.
template <int CO>
constexpr int Lanes() {
  return CO % kMaxLanes == 0 ? kMaxLanes : CO % 8 == 0 ? 8 : CO % 4 == 0 ? 4 : 1;
}

// Runs body(chunk) for chunk in [0, chunks) on the pool's threads and the calling one. A task
// that starts after every chunk is taken does nothing, so waiting only ever waits on running work.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, const Body& body) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  const Body* shared_body = &body;
  auto work = [state, chunks, shared_body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      (*shared_body)(c);
      if (state->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->all_done.notify_all();
      }
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done.load() == chunks; });
}

inline ffi::Error CheckNHWC(const char* what, ffi::Span<const int64_t> d) {
  if (d.size() != 4) return ffi::Error::InvalidArgument(std::string(what) + " must be NHWC (rank 4)");
  return ffi::Error::Success();
}

}  // namespace flaxdepth
