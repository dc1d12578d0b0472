// Work split over XLA's CPU thread pool, shared by the native kernels (gemv.cc,
// attention.cc): tasks 0..tasks-1 are claimed from an atomic counter by the calling thread
// and by `helpers` tasks scheduled on the FFI ThreadPool context, so there is no pool of
// our own and a busy or single-thread pool never leaves the caller waiting for a task
// nobody has started.
#ifndef JAXOPT_LLM_CSRC_PARALLEL_FOR_H_
#define JAXOPT_LLM_CSRC_PARALLEL_FOR_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(JAXOPT_LLM_PORTABLE_ONLY)
#include <immintrin.h>
#define JAXOPT_LLM_PAUSE() _mm_pause()
#else
#define JAXOPT_LLM_PAUSE() std::this_thread::yield()
#endif

namespace jaxopt_llm {
namespace parallel {

// The job outlives the call through the tasks' shared_ptr: a task that starts late finds
// nothing left and returns without touching the (by then dead) context.
struct ParallelJob {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  void (*fn)(const void*, int64_t) = nullptr;
  const void* ctx = nullptr;
};

inline void Drain(ParallelJob& job) {
  for (;;) {
    const int64_t i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job.total) return;
    job.fn(job.ctx, i);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

// fn(ctx, i) for every i < tasks, on the caller and up to `helpers` pool tasks.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t helpers,
                        void (*fn)(const void*, int64_t), const void* ctx) {
  if (tasks <= 1 || helpers <= 0) {
    for (int64_t i = 0; i < tasks; ++i) fn(ctx, i);
    return;
  }
  auto job = std::make_shared<ParallelJob>();
  job->total = tasks;
  job->fn = fn;
  job->ctx = ctx;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job]() { Drain(*job); });
  Drain(*job);
  for (int64_t spins = 0; job->done.load(std::memory_order_acquire) < tasks; ++spins) {
    if (spins < 256) {  // a few µs: about one task; then let a descheduled helper run
      JAXOPT_LLM_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace parallel
}  // namespace jaxopt_llm

#endif  // JAXOPT_LLM_CSRC_PARALLEL_FOR_H_
