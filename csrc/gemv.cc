// Weight-only quantized matmul for decode-sized inputs, as XLA FFI handlers (see gemv.h).
//
// Algorithm. W is stored K-major (row k of the codes holds all N outputs), so the kernel walks
// k and vectorises along N: for a panel of up to 2,048 output columns and all rows m (≤ 8),
// for each group g of k values
//     acc[m, :] = Σ_{k∈g} x[m, k] · c[k, :]             (float32, c = q, u - z, or u)
//     y[m, :]  += s[g, :] · acc[m, :]  (+ o[g, :] · Σ_{k∈g} x[m, k] for a float offset o)
// where c is the code as an exact small integer converted to float32: symmetric 4-bit codes
// are shifted by 8 and integer zero points subtracted in the integer domain, so only the
// float offset needs the per-group row sums Σ x. The weight is read once per row block, as
// contiguous row segments with software prefetch (see "Panels" below); the scales once per
// group and panel. Codes are decoded once per (k, 8 columns) and reused by every row.
//
// Dispatch. RunAvx2 (AVX2 + FMA + F16C, compiled for that target with function attributes,
// chosen at run time with __builtin_cpu_supports) or RunScalar (portable C++). Columns are
// split into one chunk per thread of XLA's CPU pool (multiples of 32 columns) that the
// calling thread and helper threads claim from an atomic counter (parallel_for.h); the caller
// never waits for a chunk nobody has started, so a busy or single-thread pool only costs
// parallelism, never a deadlock.
#include "gemv.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(JAXOPT_LLM_PORTABLE_ONLY)
#define JAXOPT_LLM_X86 1
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace jaxopt_llm {
namespace {

std::atomic<int64_t> g_last_pool_threads{0};

// ----------------------------------------------------------------------------- scalar

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = exponent == 31
                            ? (sign | 0x7f800000u | (mantissa << 13))
                            : (sign | ((exponent + 112u) << 23) | (mantissa << 13));
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float LoadFloat(const void* base, bool f16, int64_t i) {
  return f16 ? HalfToFloat(static_cast<const uint16_t*>(base)[i])
             : static_cast<const float*>(base)[i];
}

// The integer code at (k, n), before any zero point: int8 q, uint8 u, or a uint4 nibble.
template <Codes C>
inline int32_t CodeAt(const uint8_t* q, int64_t N, int64_t k, int64_t n) {
  if constexpr (C == Codes::kInt8) {
    return static_cast<int8_t>(q[k * N + n]);
  } else if constexpr (C == Codes::kUint8) {
    return q[k * N + n];
  } else {
    const uint8_t byte = q[(k >> 1) * N + n];
    return (k & 1) ? (byte >> 4) : (byte & 0x0f);
  }
}

// Bytes per stored value along N (codes, or float32 / bfloat16 weights).
constexpr int64_t CodeBytes(Codes codes) {
  return codes == Codes::kFloat32 ? 4 : codes == Codes::kBFloat16 ? 2 : 1;
}

// The weight value at (k, n) before scale and zero point, as float32.
template <Codes C>
inline float ValueAt(const uint8_t* q, int64_t N, int64_t k, int64_t n) {
  if constexpr (C == Codes::kFloat32) {
    return reinterpret_cast<const float*>(q)[k * N + n];
  } else if constexpr (C == Codes::kBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(q)[k * N + n])
                          << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
  } else {
    return static_cast<float>(CodeAt<C>(q, N, k, n));
  }
}

template <Codes C, ZeroKind Z>
void ScalarCols(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int64_t kTile = 32;
  const int64_t N = p.N, K = p.K, rows = p.rows;
  float acc[kMaxRows][kTile];
  float weight[kTile];
  int32_t zero[kTile];
  for (int64_t nb = n0; nb < n1; nb += kTile) {
    const int64_t width = std::min(kTile, n1 - nb);
    for (int64_t m = 0; m < rows; ++m) {
      std::fill(p.y + m * N + nb, p.y + m * N + nb + width, 0.0f);
    }
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t k0 = g * p.group, k1 = std::min(K, k0 + p.group);
      for (int64_t m = 0; m < rows; ++m) std::fill(acc[m], acc[m] + width, 0.0f);
      for (int64_t j = 0; j < width; ++j) {
        if constexpr (Z == ZeroKind::kInteger) {
          zero[j] = static_cast<const uint8_t*>(p.zero)[g * N + nb + j];
        } else if constexpr (C == Codes::kUint4 && Z == ZeroKind::kNone) {
          zero[j] = 8;  // symmetric 4-bit codes are stored offset by 8
        } else {
          zero[j] = 0;
        }
      }
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t j = 0; j < width; ++j) {
          weight[j] = ValueAt<C>(p.q, N, k, nb + j) - static_cast<float>(zero[j]);
        }
        for (int64_t m = 0; m < rows; ++m) {
          const float xv = p.x[m * K + k];
          for (int64_t j = 0; j < width; ++j) acc[m][j] += xv * weight[j];
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        const float s = LoadFloat(p.scale, p.scale_f16, g * N + nb + j);
        const float offset =
            Z == ZeroKind::kFloat ? LoadFloat(p.zero, p.zero_f16, g * N + nb + j) : 0.0f;
        for (int64_t m = 0; m < rows; ++m) {
          float& out = p.y[m * N + nb + j];
          out += s * acc[m][j];
          if constexpr (Z == ZeroKind::kFloat) out += offset * p.xsum[m * p.G + g];
        }
      }
    }
  }
}

template <Codes C, ZeroKind Z>
void ScalarDispatch(const Problem& p, int64_t n0, int64_t n1) {
  ScalarCols<C, Z>(p, n0, n1);
}

// ----------------------------------------------------------------------------- AVX2

#ifdef JAXOPT_LLM_X86
#define JAXOPT_LLM_AVX2 __attribute__((target("avx2,fma,f16c")))
// Fully unroll the loops over rows and vectors early, so the accumulator arrays become
// registers (otherwise GCC may keep them in memory, behind a store-to-load chain).
#if defined(__clang__)
#define JAXOPT_LLM_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define JAXOPT_LLM_UNROLL _Pragma("GCC unroll 16")
#else
#define JAXOPT_LLM_UNROLL
#endif

JAXOPT_LLM_AVX2 inline __m256 Load8Float(const void* base, bool f16, int64_t i) {
  if (f16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
  }
  return _mm256_loadu_ps(static_cast<const float*>(base) + i);
}

JAXOPT_LLM_AVX2 inline __m256i Load8U8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

JAXOPT_LLM_AVX2 inline __m256i Load8S8(const uint8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

namespace panel_avx2 {
#define PANEL_TARGET JAXOPT_LLM_AVX2
constexpr int64_t kLanes = 8;
using VF = __m256;
using VI = __m256i;
PANEL_TARGET inline VF FLoad(const float* p) { return _mm256_loadu_ps(p); }
PANEL_TARGET inline void FStore(float* p, VF v) { _mm256_storeu_ps(p, v); }
PANEL_TARGET inline VF FSet1(float v) { return _mm256_set1_ps(v); }
PANEL_TARGET inline VF FBcast(const float* p) { return _mm256_broadcast_ss(p); }
PANEL_TARGET inline VF Fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
PANEL_TARGET inline VF ToFloat(VI v) { return _mm256_cvtepi32_ps(v); }
PANEL_TARGET inline VI ISet1(int v) { return _mm256_set1_epi32(v); }
PANEL_TARGET inline VI ISub(VI a, VI b) { return _mm256_sub_epi32(a, b); }
PANEL_TARGET inline VI IAnd(VI a, VI b) { return _mm256_and_si256(a, b); }
PANEL_TARGET inline VI ISrl4(VI v) { return _mm256_srli_epi32(v, 4); }
PANEL_TARGET inline VI LoadU8(const uint8_t* p) { return Load8U8(p); }
PANEL_TARGET inline VI LoadS8(const uint8_t* p) { return Load8S8(p); }
PANEL_TARGET inline VF LoadF32(const uint8_t* p) {
  return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
}
PANEL_TARGET inline VF LoadBF16(const uint8_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
PANEL_TARGET inline VF LoadScale(const void* base, bool f16, int64_t i) {
  return Load8Float(base, f16, i);
}
#include "gemv_panel.inc"
#undef PANEL_TARGET
}  // namespace panel_avx2

// The same panels with AVX-512 (16 lanes): half the vector uops per weight. (GCC 12 warns
// about the `_mm512_undefined` inside its own intrinsic headers: silenced here.)
#define JAXOPT_LLM_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace panel_avx512 {
#define PANEL_TARGET JAXOPT_LLM_AVX512
constexpr int64_t kLanes = 16;
using VF = __m512;
using VI = __m512i;
PANEL_TARGET inline VF FLoad(const float* p) { return _mm512_loadu_ps(p); }
PANEL_TARGET inline void FStore(float* p, VF v) { _mm512_storeu_ps(p, v); }
PANEL_TARGET inline VF FSet1(float v) { return _mm512_set1_ps(v); }
PANEL_TARGET inline VF FBcast(const float* p) { return _mm512_set1_ps(*p); }
PANEL_TARGET inline VF Fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
PANEL_TARGET inline VF ToFloat(VI v) { return _mm512_cvtepi32_ps(v); }
PANEL_TARGET inline VI ISet1(int v) { return _mm512_set1_epi32(v); }
PANEL_TARGET inline VI ISub(VI a, VI b) { return _mm512_sub_epi32(a, b); }
PANEL_TARGET inline VI IAnd(VI a, VI b) { return _mm512_and_si512(a, b); }
PANEL_TARGET inline VI ISrl4(VI v) { return _mm512_srli_epi32(v, 4); }
PANEL_TARGET inline VI LoadU8(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PANEL_TARGET inline VI LoadS8(const uint8_t* p) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PANEL_TARGET inline VF LoadF32(const uint8_t* p) {
  return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}
PANEL_TARGET inline VF LoadBF16(const uint8_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
PANEL_TARGET inline VF LoadScale(const void* base, bool f16, int64_t i) {
  if (f16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i)));
  }
  return _mm512_loadu_ps(static_cast<const float*>(base) + i);
}
#include "gemv_panel.inc"
#undef PANEL_TARGET
}  // namespace panel_avx512
#pragma GCC diagnostic pop

#endif  // JAXOPT_LLM_X86

// ------------------------------------------------------------------- table (axis 1) kernels
//
// A table T (V, D) stored row-major with groups along D (ggml's layout): y[m, v] =
// Σ_d x[m, d] · t[v, d], one dot product per table row. Each row's codes are contiguous, so
// the kernel walks d and vectorises along it: per group, the codes of R rows are converted to
// float32 (exact small integers, integer zero points subtracted first) and FMA'd against
// x[m, d:d+8] into a group accumulator per (row, m), scaled into the row's accumulator once
// per group (a float offset adds o·Σ_{d∈g} x), reduced horizontally once per row. The table is
// read once per row block; x (≤ 8 rows of D floats) stays in L1. 4-bit rows hold two d per
// byte (even d in the low nibble), so x is split once per call into its even and odd
// entries (xe, xo) and the low / high nibbles of 8 bytes meet xe / xo[b:b+8].

template <Codes C, ZeroKind Z>
void TableScalarRows(const TableProblem& p, int64_t v0, int64_t v1) {
  const int64_t D = p.D, B = p.B, rows = p.rows;
  float total[kMaxRows];
  for (int64_t v = v0; v < v1; ++v) {
    std::fill(total, total + rows, 0.0f);
    const uint8_t* row = p.q + v * B;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t d0 = g * p.group, d1 = std::min(D, d0 + p.group);
      const float s = LoadFloat(p.scale, p.scale_f16, v * p.G + g);
      float offset = 0.0f;
      int32_t zero = C == Codes::kUint4 && Z == ZeroKind::kNone ? 8 : 0;
      if constexpr (Z == ZeroKind::kFloat) offset = LoadFloat(p.zero, p.zero_f16, v * p.G + g);
      if constexpr (Z == ZeroKind::kInteger) zero = static_cast<const uint8_t*>(p.zero)[v * p.G + g];
      for (int64_t d = d0; d < d1; ++d) {
        int32_t code;
        if constexpr (C == Codes::kInt8) {
          code = static_cast<int8_t>(row[d]);
        } else if constexpr (C == Codes::kUint8) {
          code = row[d];
        } else {
          code = (d & 1) ? (row[d >> 1] >> 4) : (row[d >> 1] & 0x0f);
        }
        float w = static_cast<float>(code - zero) * s;
        if constexpr (Z == ZeroKind::kFloat) w += offset;
        for (int64_t m = 0; m < rows; ++m) total[m] += p.x[m * D + d] * w;
      }
    }
    for (int64_t m = 0; m < rows; ++m) p.y[m * p.V + v] = total[m];
  }
}

template <Codes C, ZeroKind Z>
void TableScalarDispatch(const TableProblem& p, int64_t v0, int64_t v1) {
  TableScalarRows<C, Z>(p, v0, v1);
}

#ifdef JAXOPT_LLM_X86
JAXOPT_LLM_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// One scale / offset with F16C (the portable HalfToFloat costs a branchy function per group).
JAXOPT_LLM_AVX2 inline float LoadFloat1(const void* base, bool f16, int64_t i) {
  return f16 ? _cvtsh_ss(static_cast<const uint16_t*>(base)[i])
             : static_cast<const float*>(base)[i];
}

// Table rows decoded together: R rows share each load of x (2·R·M accumulators).
template <int M>
constexpr int TableRowsAtOnce() {
  return M == 1 ? 4 : M == 2 ? 2 : 1;
}

// y[0:M, v:v+R] of the block. Per group, gacc = Σ_d x[m, d]·c[v, d] on the exact integer
// codes (integer zero points subtracted in integers), then acc += s·gacc (and, for a float
// offset, o·Σ_{d∈g} x[m, d] from p.xsum): one scale FMA per group, none per 8 codes.
template <Codes C, ZeroKind Z, int M, int R>
JAXOPT_LLM_AVX2 void TableAvx2Tile(const TableProblem& p, int64_t v) {
  const int64_t D = p.D, B = p.B, G = p.G;
  {  // the codes two tiles ahead: short rows end streams before the prefetcher catches up
    const uint8_t* ahead = p.q + std::min(p.V, v + 2 * R) * B;
    const uint8_t* end = p.q + std::min(p.V, v + 3 * R) * B;
    for (; ahead < end; ahead += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
  }
  __m256 acc[R][M];
  float tail[R][M];
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) {
    JAXOPT_LLM_UNROLL
    for (int m = 0; m < M; ++m) {
      acc[r][m] = _mm256_setzero_ps();
      tail[r][m] = 0.0f;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t d0 = g * p.group, d1 = std::min(D, d0 + p.group);
    float s[R];
    __m256i zero[R];
    __m256 gacc[R][M];
    float gtail[R][M];
    JAXOPT_LLM_UNROLL
    for (int r = 0; r < R; ++r) {
      s[r] = LoadFloat1(p.scale, p.scale_f16, (v + r) * G + g);
      zero[r] = _mm256_set1_epi32(
          Z == ZeroKind::kInteger ? static_cast<const uint8_t*>(p.zero)[(v + r) * G + g]
          : (C == Codes::kUint4 && Z == ZeroKind::kNone) ? 8 : 0);
      JAXOPT_LLM_UNROLL
      for (int m = 0; m < M; ++m) {
        gacc[r][m] = _mm256_setzero_ps();
        gtail[r][m] = 0.0f;
      }
    }
    if constexpr (C == Codes::kUint4) {
      // bytes [b0, b1) of each row: d0 is even (checked by the handler), an odd d1 ends in
      // a low nibble whose high partner meets xo = 0 (the padding of xo)
      const int64_t b0 = d0 >> 1, b1 = (d1 + 1) >> 1;
      const __m256i low_mask = _mm256_set1_epi32(0x0f);
      int64_t b = b0;
      for (; b + 8 <= b1; b += 8) {
        JAXOPT_LLM_UNROLL
        for (int r = 0; r < R; ++r) {
          const __m256i bytes = Load8U8(p.q + (v + r) * B + b);
          __m256i lo = _mm256_and_si256(bytes, low_mask);
          __m256i hi = _mm256_srli_epi32(bytes, 4);
          if constexpr (Z != ZeroKind::kFloat) {
            lo = _mm256_sub_epi32(lo, zero[r]);
            hi = _mm256_sub_epi32(hi, zero[r]);
          }
          const __m256 w_lo = _mm256_cvtepi32_ps(lo), w_hi = _mm256_cvtepi32_ps(hi);
          JAXOPT_LLM_UNROLL
          for (int m = 0; m < M; ++m) {
            gacc[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(p.xe + m * B + b), w_lo, gacc[r][m]);
            gacc[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(p.xo + m * B + b), w_hi, gacc[r][m]);
          }
        }
      }
      for (; b < b1; ++b) {
        JAXOPT_LLM_UNROLL
        for (int r = 0; r < R; ++r) {
          const uint8_t byte = p.q[(v + r) * B + b];
          const int32_t zr = Z == ZeroKind::kFloat ? 0 : _mm256_cvtsi256_si32(zero[r]);
          const float w_lo = static_cast<float>((byte & 0x0f) - zr);
          const float w_hi = static_cast<float>((byte >> 4) - zr);
          JAXOPT_LLM_UNROLL
          for (int m = 0; m < M; ++m) {
            gtail[r][m] += p.xe[m * B + b] * w_lo + p.xo[m * B + b] * w_hi;
          }
        }
      }
    } else {
      int64_t d = d0;
      for (; d + 8 <= d1; d += 8) {
        JAXOPT_LLM_UNROLL
        for (int r = 0; r < R; ++r) {
          const uint8_t* row = p.q + (v + r) * B + d;
          __m256i codes = C == Codes::kInt8 ? Load8S8(row) : Load8U8(row);
          if constexpr (Z == ZeroKind::kInteger) codes = _mm256_sub_epi32(codes, zero[r]);
          const __m256 w = _mm256_cvtepi32_ps(codes);
          JAXOPT_LLM_UNROLL
          for (int m = 0; m < M; ++m) {
            gacc[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(p.x + m * D + d), w, gacc[r][m]);
          }
        }
      }
      for (; d < d1; ++d) {
        JAXOPT_LLM_UNROLL
        for (int r = 0; r < R; ++r) {
          const uint8_t byte = p.q[(v + r) * B + d];
          const int32_t code = C == Codes::kInt8 ? static_cast<int8_t>(byte)
                                                 : static_cast<int32_t>(byte);
          const int32_t zr = Z == ZeroKind::kInteger ? _mm256_cvtsi256_si32(zero[r]) : 0;
          const float w = static_cast<float>(code - zr);
          JAXOPT_LLM_UNROLL
          for (int m = 0; m < M; ++m) gtail[r][m] += p.x[m * D + d] * w;
        }
      }
    }
    JAXOPT_LLM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 sr = _mm256_set1_ps(s[r]);
      const float offset =
          Z == ZeroKind::kFloat ? LoadFloat1(p.zero, p.zero_f16, (v + r) * G + g) : 0.0f;
      JAXOPT_LLM_UNROLL
      for (int m = 0; m < M; ++m) {
        acc[r][m] = _mm256_fmadd_ps(sr, gacc[r][m], acc[r][m]);
        tail[r][m] += s[r] * gtail[r][m];
        if constexpr (Z == ZeroKind::kFloat) tail[r][m] += offset * p.xsum[m * G + g];
      }
    }
  }
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) {
    JAXOPT_LLM_UNROLL
    for (int m = 0; m < M; ++m) p.y[m * p.V + v + r] = HorizontalSum(acc[r][m]) + tail[r][m];
  }
}

template <Codes C, ZeroKind Z, int M>
JAXOPT_LLM_AVX2 void TableAvx2Rows(const TableProblem& p, int64_t v0, int64_t v1) {
  constexpr int R = TableRowsAtOnce<M>();
  int64_t v = v0;
  for (; v + R <= v1; v += R) TableAvx2Tile<C, Z, M, R>(p, v);
  if constexpr (R > 1) {
    for (; v < v1; ++v) TableAvx2Tile<C, Z, M, 1>(p, v);
  }
}

template <Codes C, ZeroKind Z>
JAXOPT_LLM_AVX2 void TableAvx2Dispatch(const TableProblem& p, int64_t v0, int64_t v1) {
  switch (p.rows) {
    case 1: return TableAvx2Rows<C, Z, 1>(p, v0, v1);
    case 2: return TableAvx2Rows<C, Z, 2>(p, v0, v1);
    case 3: return TableAvx2Rows<C, Z, 3>(p, v0, v1);
    case 4: return TableAvx2Rows<C, Z, 4>(p, v0, v1);
    case 5: return TableAvx2Rows<C, Z, 5>(p, v0, v1);
    case 6: return TableAvx2Rows<C, Z, 6>(p, v0, v1);
    case 7: return TableAvx2Rows<C, Z, 7>(p, v0, v1);
    default: return TableAvx2Rows<C, Z, 8>(p, v0, v1);
  }
}
#endif  // JAXOPT_LLM_X86

// The quantized (codes, zero kind) combinations the handlers accept, for either kernel family
// (the dense float forms, kernels only, are dispatched before it).
#define JAXOPT_LLM_FORMAT_SWITCH(KERNEL, p, n0, n1)                                     \
  switch ((p).codes) {                                                                  \
    case Codes::kInt8:                                                                  \
      return KERNEL<Codes::kInt8, ZeroKind::kNone>(p, n0, n1);                          \
    case Codes::kUint8:                                                                 \
      if ((p).zero_kind == ZeroKind::kFloat)                                            \
        return KERNEL<Codes::kUint8, ZeroKind::kFloat>(p, n0, n1);                      \
      return KERNEL<Codes::kUint8, ZeroKind::kInteger>(p, n0, n1);                      \
    case Codes::kUint4:                                                                 \
      if ((p).zero_kind == ZeroKind::kFloat)                                            \
        return KERNEL<Codes::kUint4, ZeroKind::kFloat>(p, n0, n1);                      \
      if ((p).zero_kind == ZeroKind::kInteger)                                          \
        return KERNEL<Codes::kUint4, ZeroKind::kInteger>(p, n0, n1);                    \
      return KERNEL<Codes::kUint4, ZeroKind::kNone>(p, n0, n1);                         \
    case Codes::kFloat32:                                                               \
    case Codes::kBFloat16:                                                              \
      return;                                                                           \
  }

using parallel::ParallelFor;

// ---------------------------------------------------------------------------- handler

// Chunks: whole 32-column tiles, at least kMinBytesPerTask of codes each (a few µs of work:
// less would not pay for a helper), kTasksPerThread per thread: one wide chunk each, since
// the panels stream best over long row segments (SmolLM2 w8 decode: 8 chunks 62 tok/s, 2
// chunks 70-79) and the spinning helpers start within a microsecond or so.
constexpr int64_t kColumnAlign = 32;
constexpr int64_t kMinBytesPerTask = 24 * 1024;
constexpr int64_t kTasksPerThread = 1;

struct TaskSplit {
  int64_t tasks;
  int64_t columns_per_task;
  int64_t helpers;  // pool tasks to schedule besides the calling thread
};

// `forced` > 0: exactly that many chunks (tests); otherwise by the work and the pool size.
// Work counts each extra row of x as half a weight read (decoding is shared by the rows,
// their FMAs are not).
TaskSplit ChooseTasks(int64_t weight_bytes, int64_t rows, int64_t N, int64_t pool_threads,
                      int64_t forced) {
  int64_t tasks = forced;
  if (tasks <= 0) {
    const int64_t work = weight_bytes * (rows + 1) / 2;
    tasks = pool_threads > 1 ? std::min(kTasksPerThread * pool_threads,
                                        std::max<int64_t>(work / kMinBytesPerTask, 1))
                             : 1;
  }
  tasks = std::max<int64_t>(1, std::min(tasks, (N + kColumnAlign - 1) / kColumnAlign));
  const int64_t per_task =
      ((N + tasks - 1) / tasks + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
  tasks = (N + per_task - 1) / per_task;
  const int64_t helpers = forced > 0 ? tasks - 1
                                     : std::min<int64_t>(tasks - 1, pool_threads - 1);
  return {tasks, per_task, helpers};
}

// ------------------------------------------------------------------ weight layouts
//
// The kernel (axis 0) and table (axis 1) handlers differ only in the weight's layout: where
// its extents sit in the shapes, which block type their kernels take, what a block needs
// prepared and which kernel runs it. A layout says that; validation, the split over threads
// and the batch loop are Gemv<Layout> below, once. "Inputs" are the contraction length (K
// of a kernel, D of a table), "outputs" what y has per row (N columns, V table rows),
// "stored" the code bytes along the inputs (the inputs, or half of them for 4-bit).

// out[m, g] = Σ of x[m, :] over group g (`group` consecutive inputs, the last group possibly
// shorter): what a float offset multiplies, for either layout.
void GroupSums(const float* x, int64_t rows, int64_t inputs, int64_t group, int64_t G,
               float* out) {
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t end = std::min(inputs, (g + 1) * group);
      float total = 0.0f;
      for (int64_t i = g * group; i < end; ++i) total += x[m * inputs + i];
      out[m * G + g] = total;
    }
  }
}

// A kernel: codes (..., stored, N) K-major and scales (..., G, N); outputs are columns n.
struct KernelLayout {
  using Block = Problem;
  static constexpr const char* kName = "weight gemv";
  static constexpr bool kDense = true;  // float32 / bfloat16 weights too (bits 32 / 16)
  static constexpr const char* kInputs = "K";
  static constexpr const char* kOutputs = "N";
  static int64_t Outputs(ffi::Span<const int64_t> codes) { return codes[codes.size() - 1]; }
  static int64_t Stored(ffi::Span<const int64_t> codes) { return codes[codes.size() - 2]; }
  static int64_t Groups(ffi::Span<const int64_t> scale) { return scale[scale.size() - 2]; }
  static int64_t ScaleOutputs(ffi::Span<const int64_t> scale) {
    return scale[scale.size() - 1];
  }
  static void SetExtents(Block& p, int64_t inputs, int64_t outputs, int64_t) {
    p.K = inputs;
    p.N = outputs;
  }
  static int64_t OutputCount(const Block& p) { return p.N; }
  // A float offset needs Σ x over each group of each row (in `buffer`).
  static void Prepare(Block& p, std::vector<float>& buffer) {
    if (p.zero_kind != ZeroKind::kFloat) return;
    buffer.assign(p.rows * p.G, 0.0f);
    GroupSums(p.x, p.rows, p.K, p.group, p.G, buffer.data());
    p.xsum = buffer.data();
  }
  static void Run(const Block& p, Variant variant, int64_t n0, int64_t n1) {
    if (variant == Variant::kAvx512) {
      RunAvx512(p, n0, n1);
    } else if (variant == Variant::kAvx2) {
      RunAvx2(p, n0, n1);
    } else {
      RunScalar(p, n0, n1);
    }
  }
};

void TableScalarRun(const TableProblem& p, int64_t v0, int64_t v1) {
  JAXOPT_LLM_FORMAT_SWITCH(TableScalarDispatch, p, v0, v1)
}

void TableAvx2Run(const TableProblem& p, int64_t v0, int64_t v1) {
#ifdef JAXOPT_LLM_X86
  JAXOPT_LLM_FORMAT_SWITCH(TableAvx2Dispatch, p, v0, v1)
#else
  TableScalarRun(p, v0, v1);
#endif
}

// A table: codes (..., V, stored) row-major and scales (..., V, G); outputs are rows v.
struct TableLayout {
  using Block = TableProblem;
  static constexpr const char* kName = "table gemv";
  static constexpr bool kDense = false;
  static constexpr const char* kInputs = "D";
  static constexpr const char* kOutputs = "V";
  static int64_t Outputs(ffi::Span<const int64_t> codes) { return codes[codes.size() - 2]; }
  static int64_t Stored(ffi::Span<const int64_t> codes) { return codes[codes.size() - 1]; }
  static int64_t Groups(ffi::Span<const int64_t> scale) { return scale[scale.size() - 1]; }
  static int64_t ScaleOutputs(ffi::Span<const int64_t> scale) {
    return scale[scale.size() - 2];
  }
  static void SetExtents(Block& p, int64_t inputs, int64_t outputs, int64_t stored) {
    p.D = inputs;
    p.V = outputs;
    p.B = stored;
  }
  static int64_t OutputCount(const Block& p) { return p.V; }
  // 4-bit rows meet x's even and odd entries (xo zero-padded for an odd D); a float offset
  // needs Σ x over each group of each row (both in `buffer`).
  static void Prepare(Block& p, std::vector<float>& buffer) {
    const bool split = p.codes == Codes::kUint4, sums = p.zero_kind == ZeroKind::kFloat;
    if (!split && !sums) return;
    buffer.assign((split ? 2 * p.rows * p.B : 0) + (sums ? p.rows * p.G : 0), 0.0f);
    float* next = buffer.data();
    if (split) {
      float* xe = next;
      float* xo = xe + p.rows * p.B;
      for (int64_t m = 0; m < p.rows; ++m) {
        for (int64_t d = 0; d < p.D; ++d) {
          (d & 1 ? xo : xe)[m * p.B + (d >> 1)] = p.x[m * p.D + d];
        }
      }
      p.xe = xe;
      p.xo = xo;
      next = xo + p.rows * p.B;
    }
    if (sums) {
      GroupSums(p.x, p.rows, p.D, p.group, p.G, next);
      p.xsum = next;
    }
  }
  static void Run(const Block& p, Variant variant, int64_t v0, int64_t v1) {
    if (variant == Variant::kAvx2 || variant == Variant::kAvx512) {  // no AVX-512 table code
      TableAvx2Run(p, v0, v1);
    } else {
      TableScalarRun(p, v0, v1);
    }
  }
};

template <class Layout>
struct Job {
  const typename Layout::Block* block;
  Variant variant;
  int64_t outputs_per_task;
};

template <class Layout>
void RunOutputs(const void* ctx, int64_t task) {
  const auto& job = *static_cast<const Job<Layout>*>(ctx);
  const int64_t o0 = task * job.outputs_per_task;
  const int64_t o1 = std::min(Layout::OutputCount(*job.block), o0 + job.outputs_per_task);
  if (o0 < o1) Layout::Run(*job.block, job.variant, o0, o1);
}

// Element offset of batch `index` (over the output's batch dims) in an operand whose batch
// dims are each 1 (broadcast) or the output's.
int64_t BatchOffset(ffi::Span<const int64_t> dims, ffi::Span<const int64_t> out_dims,
                    int64_t index) {
  const int64_t batch_rank = static_cast<int64_t>(out_dims.size()) - 2;
  int64_t offset = 0, stride = dims[batch_rank] * dims[batch_rank + 1];
  for (int64_t i = batch_rank - 1; i >= 0; --i) {
    const int64_t coordinate = index % out_dims[i];
    index /= out_dims[i];
    if (dims[i] != 1) offset += coordinate * stride;
    stride *= dims[i];
  }
  return offset;
}

int64_t BatchCount(ffi::Span<const int64_t> dims) {
  int64_t count = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) count *= dims[i];
  return count;
}

std::string ShapeString(ffi::Span<const int64_t> dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(dims[i]);
  }
  return text + ")";
}

// ---------------------------------------------------------------------------- handler

// x (..., rows, inputs) against a weight of `Layout` (codes, scales and zeros with batch dims
// each 1 or y's): y (..., rows, outputs).
template <class Layout>
ffi::Error Gemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                ffi::AnyBuffer scale, const ffi::AnyBuffer* zero,
                ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t bits, int64_t group_size,
                int64_t zero_kind, int64_t variant_attr, int64_t tasks_attr) {
  const auto invalid = [](const std::string& message) {
    return ffi::Error::InvalidArgument(std::string(Layout::kName) + ": " + message);
  };
  const std::string inputs_name = Layout::kInputs, outputs_name = Layout::kOutputs;
  const auto x_dims = x.dimensions(), q_dims = q.dimensions(), s_dims = scale.dimensions();
  const auto y_dims = y->dimensions();
  const size_t rank = x_dims.size();
  if (rank < 2 || q_dims.size() != rank || s_dims.size() != rank || y_dims.size() != rank ||
      (zero != nullptr && zero->dimensions().size() != rank)) {
    return invalid("operands must share one rank >= 2, got x " + ShapeString(x_dims) +
                   ", codes " + ShapeString(q_dims) + ", scale " + ShapeString(s_dims));
  }
  const int64_t R = x_dims[rank - 2], K = x_dims[rank - 1];  // K: the inputs
  const int64_t N = Layout::Outputs(q_dims), stored = Layout::Stored(q_dims);
  const int64_t G = Layout::Groups(s_dims);

  typename Layout::Block base;
  Layout::SetExtents(base, K, N, stored);
  base.G = G;
  base.group = group_size;
  if (zero_kind < 0 || zero_kind > 2 || (zero == nullptr) != (zero_kind == 0)) {
    return invalid("bad zero_kind " + std::to_string(zero_kind));
  }
  base.zero_kind = static_cast<ZeroKind>(zero_kind);
  if (bits == 8) {
    if (q.element_type() == ffi::DataType::S8 && zero_kind == 0) {
      base.codes = Codes::kInt8;
    } else if (q.element_type() == ffi::DataType::U8 && zero_kind != 0) {
      base.codes = Codes::kUint8;
    } else {
      return invalid("8-bit codes are int8 (symmetric) or uint8 with a zero");
    }
    if (stored != K) {
      return invalid("codes " + ShapeString(q_dims) + " do not match " + inputs_name + " = " +
                     std::to_string(K));
    }
  } else if (bits == 4) {
    if (q.element_type() != ffi::DataType::U8) {
      return invalid("4-bit codes must be packed uint8");
    }
    base.codes = Codes::kUint4;
    if (stored != (K + 1) / 2) {
      return invalid("packed codes " + ShapeString(q_dims) + " do not match " + inputs_name +
                     " = " + std::to_string(K));
    }
  } else if ((bits == 32 || bits == 16) && Layout::kDense) {
    const bool f32 = bits == 32;
    if (q.element_type() != (f32 ? ffi::DataType::F32 : ffi::DataType::BF16) || zero_kind) {
      return invalid(std::string("a dense weight of bits ") + (f32 ? "32 is float32" : "16 is "
                     "bfloat16") + ", without zero points");
    }
    base.codes = f32 ? Codes::kFloat32 : Codes::kBFloat16;
    if (stored != K) {
      return invalid("weight " + ShapeString(q_dims) + " does not match " + inputs_name +
                     " = " + std::to_string(K));
    }
  } else {
    return invalid(std::string("bits must be 4 or 8") + (Layout::kDense ? " (32, 16: dense)" : "") +
                   ", got " + std::to_string(bits));
  }
  if (group_size < 1 || G != (K + group_size - 1) / group_size ||
      Layout::ScaleOutputs(s_dims) != N) {
    return invalid("scale " + ShapeString(s_dims) + " does not match " + inputs_name + " = " +
                   std::to_string(K) + ", " + outputs_name + " = " + std::to_string(N) +
                   ", group_size " + std::to_string(group_size));
  }
  if (base.codes == Codes::kUint4 && G > 1 && group_size % 2) {
    return invalid("4-bit groups must hold an even count");
  }
  if (scale.element_type() == ffi::DataType::F16) {
    base.scale_f16 = true;
  } else if (scale.element_type() != ffi::DataType::F32) {
    return invalid("scales must be float32 or float16");
  }
  if (zero != nullptr) {
    const auto z_dims = zero->dimensions();
    for (size_t i = 0; i < rank; ++i) {
      if (z_dims[i] != s_dims[i]) {
        return invalid("zero " + ShapeString(z_dims) + " and scale " + ShapeString(s_dims) +
                       " differ");
      }
    }
    const auto type = zero->element_type();
    if (base.zero_kind == ZeroKind::kInteger && type != ffi::DataType::U8) {
      return invalid("integer zero points must be uint8");
    }
    if (base.zero_kind == ZeroKind::kFloat) {
      if (type == ffi::DataType::F16) {
        base.zero_f16 = true;
      } else if (type != ffi::DataType::F32) {
        return invalid("float offsets must be float32/16");
      }
    }
  }
  if (y_dims[rank - 2] != R || y_dims[rank - 1] != N) {
    return invalid("result " + ShapeString(y_dims) + " is not (rows, " + outputs_name + ")");
  }
  const ffi::AnyBuffer* operands[4] = {nullptr, &q, &scale, zero};
  for (size_t i = 0; i + 2 < rank; ++i) {
    bool ok = x_dims[i] == 1 || x_dims[i] == y_dims[i];
    for (int j = 1; j < 4; ++j) {
      if (operands[j] != nullptr) {
        const int64_t d = operands[j]->dimensions()[i];
        ok = ok && (d == 1 || d == y_dims[i]);
      }
    }
    if (!ok) return invalid("batch dimensions do not match");
  }

  Variant variant = static_cast<Variant>(variant_attr);
  if (variant == Variant::kAuto) {
    variant = HaveAvx512() ? Variant::kAvx512 : HaveAvx2() ? Variant::kAvx2 : Variant::kScalar;
  }
  if (variant == Variant::kAvx2 && !HaveAvx2()) {
    return invalid("this CPU has no AVX2 + FMA + F16C");
  }
  if (variant == Variant::kAvx512 && !HaveAvx512()) {
    return invalid("this CPU has no AVX-512F");
  }
  if (variant != Variant::kAvx2 && variant != Variant::kAvx512 && variant != Variant::kScalar) {
    return invalid("unknown variant " + std::to_string(variant_attr));
  }

  const int64_t pool_threads = pool.num_threads();
  g_last_pool_threads.store(pool_threads, std::memory_order_relaxed);
  std::vector<float> prepared;  // what Layout::Prepare derives from each block of x
  const uint8_t* q_base = static_cast<const uint8_t*>(q.untyped_data());
  const int64_t q_width = CodeBytes(base.codes);
  const char* s_base = static_cast<const char*>(scale.untyped_data());
  const char* z_base = zero ? static_cast<const char*>(zero->untyped_data()) : nullptr;
  const int64_t s_width = base.scale_f16 ? 2 : 4;
  const int64_t z_width = zero == nullptr ? 0 : (base.zero_kind == ZeroKind::kInteger ? 1
                                                 : base.zero_f16 ? 2 : 4);

  // `count` rows of one x matrix (row stride K) against one weight, kMaxRows at a time.
  auto run_rows = [&](const float* x_rows, float* y_rows, int64_t count, const uint8_t* q_ptr,
                      const void* s_ptr, const void* z_ptr) {
    for (int64_t r0 = 0; r0 < count; r0 += kMaxRows) {
      typename Layout::Block p = base;
      p.rows = std::min<int64_t>(kMaxRows, count - r0);
      p.x = x_rows + r0 * K;
      p.y = y_rows + r0 * N;
      p.q = q_ptr;
      p.scale = s_ptr;
      p.zero = z_ptr;
      Layout::Prepare(p, prepared);
      const TaskSplit split = ChooseTasks(stored * N * q_width, p.rows, N, pool_threads,
                                          tasks_attr);
      Job<Layout> job{&p, variant, split.columns_per_task};
      ParallelFor(pool, split.tasks, split.helpers, &RunOutputs<Layout>, &job);
    }
  };

  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  const int64_t batches = BatchCount(y_dims);
  if (batches == 0 || R == 0 || N == 0) return ffi::Error::Success();  // an empty result
  const bool shared_weight = BatchCount(q_dims) == 1 && BatchCount(s_dims) == 1 &&
                             (zero == nullptr || BatchCount(zero->dimensions()) == 1) &&
                             BatchCount(x_dims) == batches;
  if (shared_weight) {  // every batch entry against one weight: one (batches·R, K) problem
    run_rows(x_data, y_data, batches * R, q_base, s_base, z_base);
    return ffi::Error::Success();
  }
  for (int64_t b = 0; b < batches; ++b) {
    const int64_t zo = zero ? BatchOffset(zero->dimensions(), y_dims, b) : 0;
    run_rows(x_data + BatchOffset(x_dims, y_dims, b), y_data + b * R * N, R,
             q_base + BatchOffset(q_dims, y_dims, b) * q_width,
             s_base + BatchOffset(s_dims, y_dims, b) * s_width,
             z_base ? z_base + zo * z_width : nullptr);
  }
  return ffi::Error::Success();
}

template <class Layout>
ffi::Error GemvNoZero(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                      ffi::AnyBuffer scale, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t bits,
                      int64_t group_size, int64_t variant, int64_t tasks) {
  return Gemv<Layout>(pool, x, q, scale, nullptr, y, bits, group_size, 0, variant, tasks);
}

template <class Layout>
ffi::Error GemvWithZero(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                        ffi::AnyBuffer scale, ffi::AnyBuffer zero,
                        ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t bits, int64_t group_size,
                        int64_t zero_kind, int64_t variant, int64_t tasks) {
  return Gemv<Layout>(pool, x, q, scale, &zero, y, bits, group_size, zero_kind, variant,
                      tasks);
}

}  // namespace

void RunScalar(const Problem& p, int64_t n0, int64_t n1) {
  if (p.codes == Codes::kFloat32) return ScalarDispatch<Codes::kFloat32, ZeroKind::kNone>(p, n0, n1);
  if (p.codes == Codes::kBFloat16) {
    return ScalarDispatch<Codes::kBFloat16, ZeroKind::kNone>(p, n0, n1);
  }
  JAXOPT_LLM_FORMAT_SWITCH(ScalarDispatch, p, n0, n1)
}

#ifdef JAXOPT_LLM_X86
void RunAvx2(const Problem& p, int64_t n0, int64_t n1) {
  using panel_avx2::Dispatch;
  if (p.codes == Codes::kFloat32) return Dispatch<Codes::kFloat32, ZeroKind::kNone>(p, n0, n1);
  if (p.codes == Codes::kBFloat16) return Dispatch<Codes::kBFloat16, ZeroKind::kNone>(p, n0, n1);
  JAXOPT_LLM_FORMAT_SWITCH(Dispatch, p, n0, n1)
}

void RunAvx512(const Problem& p, int64_t n0, int64_t n1) {
  using panel_avx512::Dispatch;
  if (p.codes == Codes::kFloat32) return Dispatch<Codes::kFloat32, ZeroKind::kNone>(p, n0, n1);
  if (p.codes == Codes::kBFloat16) return Dispatch<Codes::kBFloat16, ZeroKind::kNone>(p, n0, n1);
  JAXOPT_LLM_FORMAT_SWITCH(Dispatch, p, n0, n1)
}

bool HaveAvx512() {
  static const bool have = [] {
    __builtin_cpu_init();
    return HaveAvx2() && __builtin_cpu_supports("avx512f");
  }();
  return have;
}

bool HaveAvx2() {
  static const bool have = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return have;
}
#else
void RunAvx2(const Problem& p, int64_t n0, int64_t n1) { RunScalar(p, n0, n1); }
void RunAvx512(const Problem& p, int64_t n0, int64_t n1) { RunScalar(p, n0, n1); }
bool HaveAvx2() { return false; }
bool HaveAvx512() { return false; }
#endif

const char* BestVariantName() {
  return HaveAvx512() ? "avx512" : HaveAvx2() ? "avx2" : "scalar";
}

int64_t LastPoolThreads() { return g_last_pool_threads.load(std::memory_order_relaxed); }

}  // namespace jaxopt_llm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxoptLlmWeightGemv,
                              jaxopt_llm::GemvNoZero<jaxopt_llm::KernelLayout>,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("variant")
                                  .Attr<int64_t>("tasks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxoptLlmWeightGemvZero,
                              jaxopt_llm::GemvWithZero<jaxopt_llm::KernelLayout>,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("zero_kind")
                                  .Attr<int64_t>("variant")
                                  .Attr<int64_t>("tasks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxoptLlmTableGemv,
                              jaxopt_llm::GemvNoZero<jaxopt_llm::TableLayout>,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("variant")
                                  .Attr<int64_t>("tasks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxoptLlmTableGemvZero,
                              jaxopt_llm::GemvWithZero<jaxopt_llm::TableLayout>,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("zero_kind")
                                  .Attr<int64_t>("variant")
                                  .Attr<int64_t>("tasks"));
