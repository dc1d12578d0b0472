// N:M sparse GEMV for decode-sized inputs, read as stored (see jaxopt_llm/weights/native_nm.py).
//
// y (rows, N) float32 = x (rows, K) float32 @ W, W (K, N) kept `kept` of every `m`
// consecutive k as an NMSparseWeight stores it:
//   values (G·kept, N) float32, G = K / m: value row g·kept + j is the j-th kept entry of
//     group g (ascending position);
//   positions packed along the value rows, `bits` (1 or 2) per position: byte row b holds
//     value rows b·(8/bits) + i in bits [i·bits, (i+1)·bits) (jaxopt_llm.weights.packing).
// y[r, n] = Σ_{g, j} x[r, g·m + pos(g·kept + j, n)] · values(g·kept + j, n). Nothing is
// expanded: per value row the kernel reads its values and the position bits once, and picks
// each column's x with a lane permute of the group's m (≤ 4) inputs (AVX2), so 2:4 streams
// 2.1 bytes per dense weight instead of 4.
//
// Columns are split into chunks over the calling thread and helpers (parallel_for.h); each
// chunk walks the value rows in panels of kPanel columns whose accumulators stay in L1.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "gemv.h"  // Variant, HaveAvx2, kMaxRows
#include "nm_gemv.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(JAXOPT_LLM_PORTABLE_ONLY)
#define JAXOPT_LLM_NM_X86 1
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace jaxopt_llm {
namespace {

// Columns per accumulator panel: long contiguous value-row segments stream best (the dense
// kernels found the same), while rows × panel accumulators stay within ~32 KiB.
constexpr int64_t kPanel = 2048;
constexpr int64_t kAccFloats = 8192;
inline int64_t PanelWidth(int64_t rows) {
  return std::min<int64_t>(kPanel, kAccFloats / rows / 8 * 8);
}

struct NmProblem {
  const float* x = nullptr;  // (rows, K)
  int64_t rows = 0;          // 1..kMaxRows
  int64_t K = 0, N = 0, m = 0, kept = 0, bits = 0;
  const float* values = nullptr;   // (G·kept, N)
  const uint8_t* pos = nullptr;    // (ceil(G·kept·bits / 8), N)
  float* y = nullptr;              // (rows, N)
};

inline int Position(const NmProblem& p, int64_t vr, int64_t n) {
  const int64_t per_byte = 8 / p.bits;
  const uint8_t byte = p.pos[(vr / per_byte) * p.N + n];
  return (byte >> ((vr % per_byte) * p.bits)) & ((1 << p.bits) - 1);
}

void PanelScalar(const NmProblem& p, int64_t c0, int64_t c1) {
  float acc[kMaxRows][kPanel];
  const int64_t width = c1 - c0;
  for (int64_t r = 0; r < p.rows; ++r) std::fill(acc[r], acc[r] + width, 0.0f);
  const int64_t value_rows = p.K / p.m * p.kept;
  for (int64_t vr = 0; vr < value_rows; ++vr) {
    const int64_t base = (vr / p.kept) * p.m;
    const float* v = p.values + vr * p.N;
    for (int64_t c = c0; c < c1; ++c) {
      const int slot = Position(p, vr, c);
      if (slot >= p.m) continue;  // not a position (a damaged index): what materialize drops
      for (int64_t r = 0; r < p.rows; ++r) acc[r][c - c0] += p.x[r * p.K + base + slot] * v[c];
    }
  }
  for (int64_t r = 0; r < p.rows; ++r) std::memcpy(p.y + r * p.N + c0, acc[r], 4 * width);
}

#ifdef JAXOPT_LLM_NM_X86
__attribute__((target("avx2,fma"))) void PanelAvx2(const NmProblem& p, int64_t c0, int64_t c1) {
  alignas(32) float acc[kMaxRows][kPanel];
  const int64_t width = c1 - c0;
  const int64_t vector_end = c0 + width / 8 * 8;
  for (int64_t r = 0; r < p.rows; ++r) std::fill(acc[r], acc[r] + width, 0.0f);
  const int64_t value_rows = p.K / p.m * p.kept;
  const int64_t per_byte = 8 / p.bits;
  const __m256i low_bits = _mm256_set1_epi32((1 << p.bits) - 1);
  __m256 inputs[kMaxRows];
  int64_t group = -1;
  for (int64_t vr = 0; vr < value_rows; ++vr) {
    if (vr / p.kept != group) {  // the group's m inputs in lanes 0..m-1 of each row, zeros
      // above (a position code ≥ m, only in a damaged index, picks a zero as the scalar
      // code skips it)
      group = vr / p.kept;
      for (int64_t r = 0; r < p.rows; ++r) {
        alignas(32) float lanes[8] = {};
        std::memcpy(lanes, p.x + r * p.K + group * p.m, 4 * p.m);
        inputs[r] = _mm256_load_ps(lanes);
      }
    }
    const float* v = p.values + vr * p.N;
    const uint8_t* bytes = p.pos + (vr / per_byte) * p.N;
    const __m128i shift = _mm_cvtsi32_si128(static_cast<int>((vr % per_byte) * p.bits));
    for (int64_t c = c0; c < vector_end; c += 8) {
      if ((c & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(v + 2 * p.N + c), _MM_HINT_T0);
      const __m256 w = _mm256_loadu_ps(v + c);
      const __m256i b = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + c)));
      const __m256i slot = _mm256_and_si256(_mm256_srl_epi32(b, shift), low_bits);
      for (int64_t r = 0; r < p.rows; ++r) {
        float* a = acc[r] + (c - c0);
        const __m256 xs = _mm256_permutevar8x32_ps(inputs[r], slot);
        _mm256_store_ps(a, _mm256_fmadd_ps(xs, w, _mm256_load_ps(a)));
      }
    }
    const int64_t base = group * p.m;
    for (int64_t c = vector_end; c < c1; ++c) {
      const int slot = Position(p, vr, c);
      if (slot >= p.m) continue;  // as the permute: lanes m..7 hold zeros
      for (int64_t r = 0; r < p.rows; ++r) acc[r][c - c0] += p.x[r * p.K + base + slot] * v[c];
    }
  }
  for (int64_t r = 0; r < p.rows; ++r) std::memcpy(p.y + r * p.N + c0, acc[r], 4 * width);
}
#endif

struct NmJob {
  const NmProblem* problem;
  bool avx2;
  int64_t columns_per_task;
};

void RunColumns(const void* ctx, int64_t task) {
  const NmJob& job = *static_cast<const NmJob*>(ctx);
  const NmProblem& p = *job.problem;
  const int64_t n0 = task * job.columns_per_task;
  const int64_t n1 = std::min(p.N, n0 + job.columns_per_task);
  const int64_t width = PanelWidth(p.rows);
  for (int64_t c = n0; c < n1; c += width) {
    const int64_t end = std::min(n1, c + width);
#ifdef JAXOPT_LLM_NM_X86
    if (job.avx2) {
      PanelAvx2(p, c, end);
      continue;
    }
#endif
    PanelScalar(p, c, end);
  }
}

std::string Shape(ffi::Span<const int64_t> dims) {
  std::string out = "(";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + (dims.size() == 1 ? ",)" : ")");
}

int64_t Count(ffi::Span<const int64_t> dims, size_t last) {
  int64_t count = 1;
  for (size_t i = 0; i + last < dims.size(); ++i) count *= dims[i];
  return count;
}

ffi::Error NmGemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> values,
                  ffi::Buffer<ffi::U8> pos, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t m,
                  int64_t kept, int64_t bits, int64_t variant_attr, int64_t tasks_attr) {
  auto invalid = [](const std::string& what) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jaxopt_llm_nm_gemv: " + what);
  };
  const auto x_dims = x.dimensions();
  const auto v_dims = values.dimensions();
  const auto p_dims = pos.dimensions();
  const auto y_dims = y->dimensions();
  if (x_dims.size() < 2 || v_dims.size() < 2 || p_dims.size() < 2 ||
      y_dims.size() != x_dims.size()) {
    return invalid("x " + Shape(x_dims) + ", values " + Shape(v_dims) + ", positions " +
                   Shape(p_dims) + " and the result must be matrices (leading batch dims)");
  }
  if (bits != 1 && bits != 2) return invalid("positions must take 1 or 2 bits");
  if (m < 1 || m > (1 << bits) || kept < 1 || kept > m) {
    return invalid("kept " + std::to_string(kept) + " of m " + std::to_string(m) +
                   " does not fit positions of " + std::to_string(bits) + " bits");
  }
  if (Count(v_dims, 2) != 1 || Count(p_dims, 2) != 1) {
    return invalid("a batched weight is not supported (vmap it over x only)");
  }
  const int64_t K = x_dims.back();
  const int64_t N = v_dims.back();
  const int64_t value_rows = v_dims[v_dims.size() - 2];
  const int64_t per_byte = 8 / bits;
  if (K % m || value_rows != K / m * kept) {
    return invalid("values " + Shape(v_dims) + " do not hold " + std::to_string(kept) + " of " +
                   std::to_string(m) + " of x's " + std::to_string(K) + " inputs");
  }
  if (p_dims.back() != N || p_dims[p_dims.size() - 2] != (value_rows + per_byte - 1) / per_byte) {
    return invalid("positions " + Shape(p_dims) + " do not match values " + Shape(v_dims));
  }
  const int64_t rows = Count(x_dims, 1);
  if (y_dims.back() != N || Count(y_dims, 1) != rows) {
    return invalid("result " + Shape(y_dims) + " is not x's rows by " + std::to_string(N));
  }
  bool avx2 = false;
  if (variant_attr == static_cast<int64_t>(Variant::kAuto)) {
    avx2 = HaveAvx2();
  } else if (variant_attr == static_cast<int64_t>(Variant::kAvx2)) {
    if (!HaveAvx2()) return invalid("this CPU has no AVX2 + FMA");
    avx2 = true;
  } else if (variant_attr != static_cast<int64_t>(Variant::kScalar)) {
    return invalid("unknown variant " + std::to_string(variant_attr) + " (auto, scalar, avx2)");
  }
#ifndef JAXOPT_LLM_NM_X86
  avx2 = false;
#endif
  if (rows == 0 || N == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t tasks = tasks_attr > 0 ? tasks_attr : threads;
  // whole panels per task, and no task under ~32 KiB of values (a helper would not pay)
  tasks = std::max<int64_t>(1, std::min(tasks, value_rows * N * 4 / (32 * 1024)));
  const int64_t per_task = ((N + tasks - 1) / tasks + 7) / 8 * 8;
  tasks = (N + per_task - 1) / per_task;
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    NmProblem p;
    p.x = x.typed_data() + r0 * K;
    p.rows = std::min<int64_t>(kMaxRows, rows - r0);
    p.K = K;
    p.N = N;
    p.m = m;
    p.kept = kept;
    p.bits = bits;
    p.values = values.typed_data();
    p.pos = pos.typed_data();
    p.y = y->typed_data() + r0 * N;
    const NmJob job{&p, avx2, per_task};
    parallel::ParallelFor(pool, tasks, std::min(tasks, threads) - 1, &RunColumns, &job);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxopt_llm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxoptLlmNmGemv, jaxopt_llm::NmGemv,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("kept")
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("variant")
                                  .Attr<int64_t>("tasks"));
