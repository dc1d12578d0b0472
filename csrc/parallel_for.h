// Work split shared by the native kernels (gemv.cc, attention.cc): tasks 0..tasks-1 are
// claimed from an atomic counter by the calling thread and by helper threads, so a helper
// that starts late never leaves the caller waiting for a task nobody has started. The
// helpers are this file's spinning workers (`SpinPool`), or tasks scheduled on XLA's CPU
// pool (the FFI ThreadPool context) while those serve another call. How many helpers a call
// uses comes from XLA's pool size, so the user's XLA thread settings still apply.
#ifndef JAXOPT_LLM_CSRC_PARALLEL_FOR_H_
#define JAXOPT_LLM_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

#include <pthread.h>

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

// fn(ctx, i) for every i < tasks, on the caller and up to `helpers` tasks of XLA's pool.
inline void XlaPoolFor(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t helpers,
                       void (*fn)(const void*, int64_t), const void* ctx) {
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

// Helper threads that stay awake between calls. A decode step makes ~200 kernel calls of
// 5-60 µs each, a few µs apart; an idle XLA pool thread takes longer than that to wake, so
// with XLA's pool the caller usually did every chunk itself (one core's bandwidth). These
// workers spin for kSpinMicros after each job (what llama.cpp's threads do between ops)
// and then sleep on a condition variable, so they cost nothing while no kernel runs. One
// job at a time: a call that finds the pool busy (XLA running two kernels concurrently)
// uses XLA's pool instead.
class SpinPool {
 public:
  static constexpr int64_t kSpinMicros = 300;
  static constexpr int kMaxWorkers = 63;

  static SpinPool& Get() {
    static SpinPool* pool = [] {
      auto* created = new SpinPool();  // never destroyed: its threads are detached
      pthread_atfork(nullptr, nullptr, &SpinPool::AfterForkInChild);
      return created;
    }();
    return *pool;
  }

  // Runs the job with `helpers` workers besides the caller; false (nothing run) when busy.
  bool Run(int64_t tasks, int64_t helpers, void (*fn)(const void*, int64_t), const void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    helpers = std::min<int64_t>(helpers, kMaxWorkers);
    while (workers_ < helpers) {
      std::thread(&SpinPool::Work, this, workers_).detach();
      ++workers_;
    }
    job_.next.store(0, std::memory_order_relaxed);
    job_.done.store(0, std::memory_order_relaxed);
    job_.total = tasks;
    job_.fn = fn;
    job_.ctx = ctx;
    helpers_.store(helpers, std::memory_order_relaxed);
    open_.store(true, std::memory_order_seq_cst);
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    Drain(job_);
    while (job_.done.load(std::memory_order_acquire) < tasks) JAXOPT_LLM_PAUSE();
    open_.store(false, std::memory_order_seq_cst);
    while (inside_.load(std::memory_order_seq_cst) > 0) JAXOPT_LLM_PAUSE();  // late workers
    return true;
  }

 private:
  SpinPool() = default;

  // A forked child has none of the workers (and may hold copies of locked mutexes): start
  // again from nothing.
  static void AfterForkInChild() {
    SpinPool& pool = Get();
    new (&pool.busy_) std::mutex();
    new (&pool.sleep_mutex_) std::mutex();
    new (&pool.wake_) std::condition_variable();
    pool.sleeping_.store(0);
    pool.inside_.store(0);
    pool.open_.store(false);
    pool.workers_ = 0;
  }

  static int64_t Micros() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  void Work(int index) {
    uint64_t seen = epoch_.load(std::memory_order_acquire);
    for (;;) {
      int64_t idle_since = Micros();
      for (int64_t spins = 1;; ++spins) {
        if (epoch_.load(std::memory_order_acquire) != seen) break;
        JAXOPT_LLM_PAUSE();
        if ((spins & 1023) == 0 && Micros() - idle_since > kSpinMicros) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return epoch_.load(std::memory_order_seq_cst) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_seq_cst);
          idle_since = Micros();
        }
      }
      seen = epoch_.load(std::memory_order_acquire);
      if (index >= helpers_.load(std::memory_order_relaxed)) continue;
      inside_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst)) Drain(job_);
      inside_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::mutex busy_;
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<int> inside_{0};
  std::atomic<bool> open_{false};
  std::atomic<int64_t> helpers_{0};
  ParallelJob job_;
  int64_t workers_ = 0;
};

// fn(ctx, i) for every i < tasks, on the caller and up to `helpers` other threads: the
// spinning workers, or XLA's pool when those are busy.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t helpers,
                        void (*fn)(const void*, int64_t), const void* ctx) {
  if (tasks <= 1 || helpers <= 0) {
    for (int64_t i = 0; i < tasks; ++i) fn(ctx, i);
    return;
  }
  if (SpinPool::Get().Run(tasks, helpers, fn, ctx)) return;
  XlaPoolFor(pool, tasks, helpers, fn, ctx);
}

}  // namespace parallel
}  // namespace jaxopt_llm

#endif  // JAXOPT_LLM_CSRC_PARALLEL_FOR_H_
