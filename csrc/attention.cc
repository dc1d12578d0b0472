// Causal-prefix attention as an XLA FFI handler (see attention.h).
//
// Algorithm: the online softmax of FlashAttention (Dao et al., "FlashAttention: Fast and
// Memory-Efficient Exact Attention with IO-Awareness", 2022) on CPU-cache-sized tiles. A
// task owns one query block of one kv head: the G query heads of that kv head at `rows_t`
// consecutive positions, M = rows_t·G rows (row = position·G + head), so every K/V tile is
// loaded once for all G heads. It walks the key blocks of kKeyBlock keys up to its last
// position (the caller guarantees later keys are masked) and per block
//     S = Q·Kᵀ                      (M × W scores, in the log2 domain: Q carries log2(e)/√D)
//     S[r, j] = -inf where the mask hides key j from row r (or j is past the block)
//     m' = max(m, max_j S[r, :]);  P = 2^(S - m');  α = 2^(m - m')
//     l = α·l + Σ_j P[r, j];  O = α·O + P·V;  m = m'
// and finally out = O / l (0 where l = 0: a row that sees no key). The mask tile of a block
// is classified first (a min / max over its bytes): a block nobody sees is skipped (sliding
// windows, left padding), a block everybody sees skips the masking.
//
// Kernels. K and V are packed once per call, per kv head: K in panels of 16 keys,
// transposed ((D, 16) each, zero-padded past T), V as contiguous (T, D) rows. The AVX2
// kernel takes a block 6 rows at a time through all three steps while their scores are
// still in L1 (the block's K panels and V rows, 32 KB at D = 64, are shared by all row
// groups): S by a register-blocked product vectorised along keys (6 rows × 16 keys in 12
// accumulators: one Q broadcast and two panel loads per d), the softmax step for those
// rows as one vector over the rows (no scalar exponential on the row's critical path), then
// P·V vectorised along D (3 rows × 32 columns, the rescale by α folded into the load of O).
// 2^x is a degree-6 polynomial on the fraction (Cephes' exp2f coefficients evaluated by
// Estrin's scheme, ≤ 1.7 ulp) times 2^n built in the exponent bits; x < -125, -inf and NaN
// give 0.
// The AVX-512 kernel runs the two products at twice the width (6 rows × 32 keys of scores
// in 12 zmm accumulators, P·V 6 rows × 64 columns in 24) around the same AVX2 softmax step.
// The portable scalar kernel computes the same steps for the whole block in plain loops;
// the variant is chosen at run time.
//
// Threads: tasks (query blocks of each (b, kv head), the longest first, since causal blocks
// grow with their position) are claimed from an atomic counter by the calling thread and
// tasks scheduled on XLA's own CPU thread pool (the FFI ThreadPool context), as in gemv.cc.
#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gemv.h"  // Variant, HaveAvx2
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(JAXOPT_LLM_PORTABLE_ONLY)
#define JAXOPT_LLM_X86 1
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace jaxopt_llm {
namespace {

constexpr int64_t kPanel = 16;        // keys per packed K panel: two AVX2 vectors
constexpr int64_t kKeyBlock = 64;     // keys per tile, a multiple of kPanel
constexpr int64_t kRowsPerTile = 96;  // target M: Q, O and S tiles of ~24 KB each (D = 64)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.44269504088896340736f;

// One (query block, key block) tile as the kernels see it.
struct Tile {
  const float* q;        // (M, D): queries · log2(e)/√D, row = position·G + head
  const float* kp;       // the block's key panels: (W / 16, D, 16)
  const float* v;        // the block's first value row; key j at v + j·v_stride
  int64_t v_stride;
  const uint8_t* mask;   // mask[first position, first key]; nullptr: every key < n visible
  int64_t mask_stride;   // T
  int64_t G;             // rows per position
  int64_t M, D;
  int64_t n;             // keys in the block
  int64_t W;             // n rounded up to whole panels (columns of s)
  float* s;              // (M, W): scores, replaced by probabilities
  float* o;              // (M, D): unnormalized output
  float* m;              // (M): running max
  float* l;              // (M): running sum of probabilities
  float* alpha;          // (M): this block's rescale of o
};

// Updates s, o, m, l (and alpha) of every row of the tile with one key block.
using BlockKernel = void (*)(const Tile&);

inline const uint8_t* MaskRow(const Tile& t, int64_t r) {
  return t.mask == nullptr ? nullptr : t.mask + (r / t.G) * t.mask_stride;
}

// ----------------------------------------------------------------------------- scalar

// o[r, c0:D] = α·o + Σ_j p[r, j]·v[j, c0:D] for rows [r0, r1).
void AccumulateColumnsScalar(const Tile& t, int64_t r0, int64_t r1, int64_t c0) {
  for (int64_t r = r0; r < r1; ++r) {
    float* o = t.o + r * t.D;
    const float* p = t.s + r * t.W;
    for (int64_t c = c0; c < t.D; ++c) o[c] *= t.alpha[r];
    for (int64_t j = 0; j < t.n; ++j) {
      if (p[j] == 0.0f) continue;
      const float* v = t.v + j * t.v_stride;
      for (int64_t c = c0; c < t.D; ++c) o[c] += p[j] * v[c];
    }
  }
}

void BlockScalar(const Tile& t) {
  for (int64_t r = 0; r < t.M; ++r) {
    float* s = t.s + r * t.W;
    const float* q = t.q + r * t.D;
    for (int64_t p = 0; p < t.W / kPanel; ++p) {  // scores
      const float* panel = t.kp + p * t.D * kPanel;
      float acc[kPanel] = {};
      for (int64_t d = 0; d < t.D; ++d) {
        for (int64_t i = 0; i < kPanel; ++i) acc[i] += q[d] * panel[d * kPanel + i];
      }
      std::copy(acc, acc + kPanel, s + p * kPanel);
    }
    const uint8_t* mask = MaskRow(t, r);  // softmax
    float row_max = kNegInf;
    for (int64_t j = 0; j < t.W; ++j) {
      if (j >= t.n || (mask != nullptr && mask[j] == 0)) s[j] = kNegInf;
      row_max = std::max(row_max, s[j]);
    }
    const float m_new = std::max(t.m[r], row_max);
    if (m_new == kNegInf) {  // nothing seen yet: o and l stay 0
      std::fill(s, s + t.W, 0.0f);
      t.alpha[r] = 0.0f;
      continue;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < t.W; ++j) {
      s[j] = std::exp2(s[j] - m_new);
      sum += s[j];
    }
    t.alpha[r] = std::exp2(t.m[r] - m_new);  // 0 for the first block the row sees
    t.l[r] = t.l[r] * t.alpha[r] + sum;
    t.m[r] = m_new;
  }
  AccumulateColumnsScalar(t, 0, t.M, 0);
}

// ----------------------------------------------------------------------------- AVX2

#ifdef JAXOPT_LLM_X86
#define JAXOPT_LLM_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define JAXOPT_LLM_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define JAXOPT_LLM_UNROLL _Pragma("GCC unroll 16")
#else
#define JAXOPT_LLM_UNROLL
#endif

// Rows per register block of the scores: 6 rows × 16 keys in 12 accumulators, + 2 panel
// vectors + 1 broadcast ≤ 16 ymm registers.
constexpr int kScoreRows = 6;

// s[0:R, 0:16] = q[0:R] · panelᵀ; with kMax, also row_max[r] = max(row_max[r], s[r, :]).
template <int R, bool kMax>
JAXOPT_LLM_AVX2 inline void ScorePanel(const float* q, int64_t D, const float* panel, float* s,
                                       int64_t W, __m256* row_max) {
  __m256 acc[R][2];
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 k0 = _mm256_loadu_ps(panel + d * kPanel);
    const __m256 k1 = _mm256_loadu_ps(panel + d * kPanel + 8);
    JAXOPT_LLM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(q + r * D + d);
      acc[r][0] = _mm256_fmadd_ps(x, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, k1, acc[r][1]);
    }
  }
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(s + r * W, acc[r][0]);
    _mm256_storeu_ps(s + r * W + 8, acc[r][1]);
    if constexpr (kMax) {
      row_max[r] = _mm256_max_ps(row_max[r], _mm256_max_ps(acc[r][0], acc[r][1]));
    }
  }
}

JAXOPT_LLM_AVX2 inline float HorizontalMax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

JAXOPT_LLM_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// 2^x for x ≤ 0: 2^n · p(x - n), n = round(x), p Cephes' exp2f polynomial on [-1/2, 1/2]
// (≤ 1.7 ulp from 2^x over [-125, 0], measured against double precision).
// With kExact, x < -125, -inf (a hidden key) and NaN (-inf - -inf: a row that has seen
// nothing) give 0; without (finite x only), x < -125 gives 2^-125.
template <bool kExact = true>
JAXOPT_LLM_AVX2 inline __m256 Exp2(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-125.0f);
  __m256 keep;
  if constexpr (kExact) keep = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  // Estrin's scheme, not Horner's: a dependency chain of 3 FMAs instead of 6, so that more
  // exponentials fit in the out-of-order window (the softmax is latency-bound otherwise).
  const __m256 f2 = _mm256_mul_ps(f, f);
  const __m256 f4 = _mm256_mul_ps(f2, f2);
  const __m256 p01 =
      _mm256_fmadd_ps(f, _mm256_set1_ps(6.931472028550421e-1f), _mm256_set1_ps(1.0f));
  const __m256 p23 = _mm256_fmadd_ps(f, _mm256_set1_ps(5.550332471162809e-2f),
                                     _mm256_set1_ps(2.402264791363012e-1f));
  const __m256 p45 = _mm256_fmadd_ps(f, _mm256_set1_ps(1.339887440266574e-3f),
                                     _mm256_set1_ps(9.618437357674640e-3f));
  const __m256 p46 = _mm256_fmadd_ps(f2, _mm256_set1_ps(1.535336188319500e-4f), p45);
  const __m256 p = _mm256_fmadd_ps(f4, p46, _mm256_fmadd_ps(f2, p23, p01));
  const __m256i scale = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 value = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale));
  if constexpr (kExact) return _mm256_and_ps(value, keep);
  return value;
}

// Lanes of columns [c, c + 8) that row `mask` sees among the block's n keys.
JAXOPT_LLM_AVX2 inline __m256 VisibleLanes(const uint8_t* mask, int64_t c, int64_t n) {
  if (c + 8 <= n) {
    if (mask == nullptr) return _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    const __m256i bytes =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + c)));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256()));
  }
  alignas(32) int32_t lanes[8];
  for (int64_t i = 0; i < 8; ++i) {
    lanes[i] = c + i < n && (mask == nullptr || mask[c + i] != 0) ? -1 : 0;
  }
  return _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes)));
}

// s[r] = 2^(s[r] - max[r]) for rows [r0, r0 + rows), and sums[r] = Σ of the new row.
template <bool kExact>
JAXOPT_LLM_AVX2 inline void ExponentiateRows(const Tile& t, int64_t r0, int64_t rows,
                                             const float* max, float* sums) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = t.s + (r0 + i) * t.W;
    const __m256 shift = _mm256_set1_ps(max[i]);
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= t.W; c += 16) {
      const __m256 p0 = Exp2<kExact>(_mm256_sub_ps(_mm256_loadu_ps(s + c), shift));
      const __m256 p1 = Exp2<kExact>(_mm256_sub_ps(_mm256_loadu_ps(s + c + 8), shift));
      _mm256_storeu_ps(s + c, p0);
      _mm256_storeu_ps(s + c + 8, p1);
      sum0 = _mm256_add_ps(sum0, p0);
      sum1 = _mm256_add_ps(sum1, p1);
    }
    for (; c < t.W; c += 8) {
      const __m256 p0 = Exp2<kExact>(_mm256_sub_ps(_mm256_loadu_ps(s + c), shift));
      _mm256_storeu_ps(s + c, p0);
      sum0 = _mm256_add_ps(sum0, p0);
    }
    sums[i] = HorizontalSum(_mm256_add_ps(sum0, sum1));
  }
}

// The online-softmax step of rows [r0, r0 + rows), rows ≤ 8: mask, row max, probabilities,
// and m, l, α as one vector over the rows, so no row waits on a scalar exponential.
// `known_max`: the rows' maxima over the block, from the scores of a block every row sees
// in full (nullptr: mask and find them here).
JAXOPT_LLM_AVX2 void SoftmaxRows(const Tile& t, int64_t r0, int64_t rows,
                                 const float* known_max) {
  const bool dense = t.mask == nullptr && t.n == t.W;
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  alignas(32) float row_max[8], shift[8], sums[8], m[8], l[8];
  for (int64_t i = 0; i < 8; ++i) {
    row_max[i] = m[i] = kNegInf;
    sums[i] = l[i] = 0.0f;
  }
  std::copy(t.m + r0, t.m + r0 + rows, m);
  std::copy(t.l + r0, t.l + r0 + rows, l);
  for (int64_t i = 0; i < rows && known_max != nullptr; ++i) row_max[i] = known_max[i];
  for (int64_t i = 0; i < rows && known_max == nullptr; ++i) {
    float* s = t.s + (r0 + i) * t.W;
    const uint8_t* mask = MaskRow(t, r0 + i);
    __m256 vmax = neg_inf;
    for (int64_t c = 0; c < t.W; c += 8) {
      __m256 x = _mm256_loadu_ps(s + c);
      if (!dense) {
        x = _mm256_blendv_ps(neg_inf, x, VisibleLanes(mask, c, t.n));
        _mm256_storeu_ps(s + c, x);
      }
      vmax = _mm256_max_ps(vmax, x);
    }
    row_max[i] = HorizontalMax(vmax);
  }
  // A row that has seen nothing keeps m = -inf; its 2^(s - m) are 2^NaN = 0 and α = 0.
  const __m256 m_old = _mm256_load_ps(m);
  const __m256 m_new = _mm256_max_ps(m_old, _mm256_load_ps(row_max));
  const __m256 alpha = Exp2(_mm256_sub_ps(m_old, m_new));  // 0 for a row's first block
  _mm256_store_ps(shift, m_new);
  if (dense) {  // finite scores, every row has seen a key
    ExponentiateRows<false>(t, r0, rows, shift, sums);
  } else {
    ExponentiateRows<true>(t, r0, rows, shift, sums);
  }
  alignas(32) float scale[8];
  _mm256_store_ps(l, _mm256_fmadd_ps(_mm256_load_ps(l), alpha, _mm256_load_ps(sums)));
  _mm256_store_ps(scale, alpha);
  std::copy(l, l + rows, t.l + r0);
  std::copy(shift, shift + rows, t.m + r0);
  std::copy(scale, scale + rows, t.alpha + r0);
}

// o[r0:r0+R, c:c+8V] = α·o + P·V over the block's keys (R·V accumulators; R = 3, V = 4
// needs one register more than the 16, which costs less than the extra broadcasts of
// 6 × 16 tiles).
template <int R, int V>
JAXOPT_LLM_AVX2 inline void AccumulateBlock(const Tile& t, int64_t r0, int64_t c) {
  __m256 acc[R][V];
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) {
    const __m256 alpha = _mm256_broadcast_ss(t.alpha + r0 + r);
    JAXOPT_LLM_UNROLL
    for (int i = 0; i < V; ++i) {
      acc[r][i] = _mm256_mul_ps(alpha, _mm256_loadu_ps(t.o + (r0 + r) * t.D + c + 8 * i));
    }
  }
  const float* p = t.s + r0 * t.W;
  const float* v = t.v + c;
  for (int64_t j = 0; j < t.n; ++j, v += t.v_stride) {
    __m256 x[V];
    JAXOPT_LLM_UNROLL
    for (int i = 0; i < V; ++i) x[i] = _mm256_loadu_ps(v + 8 * i);
    JAXOPT_LLM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 w = _mm256_broadcast_ss(p + r * t.W + j);
      JAXOPT_LLM_UNROLL
      for (int i = 0; i < V; ++i) acc[r][i] = _mm256_fmadd_ps(w, x[i], acc[r][i]);
    }
  }
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) {
    JAXOPT_LLM_UNROLL
    for (int i = 0; i < V; ++i) _mm256_storeu_ps(t.o + (r0 + r) * t.D + c + 8 * i, acc[r][i]);
  }
}

template <int R>
JAXOPT_LLM_AVX2 void AccumulateRows(const Tile& t, int64_t r0) {
  int64_t c = 0;
  for (; c + 32 <= t.D; c += 32) AccumulateBlock<R, 4>(t, r0, c);
  if (c + 16 <= t.D) {
    AccumulateBlock<R, 2>(t, r0, c);
    c += 16;
  }
  if (c + 8 <= t.D) {
    AccumulateBlock<R, 1>(t, r0, c);
    c += 8;
  }
  if (c < t.D) AccumulateColumnsScalar(t, r0, r0 + R, c);  // the last D % 8 columns
}

// One register block of R ≤ 6 rows through the whole block: scores, softmax, P·V, while
// its scores are still in L1 (the block's K panels and V rows, 32 KB at D = 64, are reused
// by every row block of the tile).
template <int R>
JAXOPT_LLM_AVX2 void BlockRows(const Tile& t, int64_t r0) {
  const float* q = t.q + r0 * t.D;
  float* s = t.s + r0 * t.W;
  if (t.mask == nullptr && t.n == t.W) {  // every row sees every key: maxima on the way
    __m256 row_max[R];
    JAXOPT_LLM_UNROLL
    for (int r = 0; r < R; ++r) row_max[r] = _mm256_set1_ps(kNegInf);
    for (int64_t p = 0; p < t.W / kPanel; ++p) {
      ScorePanel<R, true>(q, t.D, t.kp + p * t.D * kPanel, s + p * kPanel, t.W, row_max);
    }
    float known_max[R];
    JAXOPT_LLM_UNROLL
    for (int r = 0; r < R; ++r) known_max[r] = HorizontalMax(row_max[r]);
    SoftmaxRows(t, r0, R, known_max);
  } else {
    for (int64_t p = 0; p < t.W / kPanel; ++p) {
      ScorePanel<R, false>(q, t.D, t.kp + p * t.D * kPanel, s + p * kPanel, t.W, nullptr);
    }
    SoftmaxRows(t, r0, R, nullptr);
  }
  if constexpr (R > 3) {
    AccumulateRows<3>(t, r0);
    AccumulateRows<R - 3>(t, r0 + 3);
  } else {
    AccumulateRows<R>(t, r0);
  }
}

JAXOPT_LLM_AVX2 void BlockAvx2(const Tile& t) {
  int64_t r = 0;
  for (; r + kScoreRows <= t.M; r += kScoreRows) BlockRows<kScoreRows>(t, r);
  switch (t.M - r) {
    case 5: return BlockRows<5>(t, r);
    case 4: return BlockRows<4>(t, r);
    case 3: return BlockRows<3>(t, r);
    case 2: return BlockRows<2>(t, r);
    case 1: return BlockRows<1>(t, r);
    default: return;
  }
}
// ----------------------------------------------------------------------------- AVX-512
//
// The two products at twice the width (the softmax step is the AVX2 one): scores for 6 rows
// × 32 keys (two panels) in 12 zmm accumulators, P·V for 6 rows × 64 columns in 24.

#define JAXOPT_LLM_AVX512 __attribute__((target("avx512f,avx2,fma")))

// s[0:R, 0:16·P] = q[0:R] · panelsᵀ for P consecutive panels (P = 1 or 2); with kMax also
// row_max[r] = max(row_max[r], s[r, :]).
template <int R, int P, bool kMax>
JAXOPT_LLM_AVX512 inline void ScorePanels512(const float* q, int64_t D, const float* panels,
                                             float* s, int64_t W, __m512* row_max) {
  __m512 acc[R][P];
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) {
    JAXOPT_LLM_UNROLL
    for (int i = 0; i < P; ++i) acc[r][i] = _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < D; ++d) {
    __m512 k[P];
    JAXOPT_LLM_UNROLL
    for (int i = 0; i < P; ++i) k[i] = _mm512_loadu_ps(panels + (i * D + d) * kPanel);
    JAXOPT_LLM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(q[r * D + d]);
      JAXOPT_LLM_UNROLL
      for (int i = 0; i < P; ++i) acc[r][i] = _mm512_fmadd_ps(x, k[i], acc[r][i]);
    }
  }
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) {
    JAXOPT_LLM_UNROLL
    for (int i = 0; i < P; ++i) {
      _mm512_storeu_ps(s + r * W + i * kPanel, acc[r][i]);
      if constexpr (kMax) row_max[r] = _mm512_max_ps(row_max[r], acc[r][i]);
    }
  }
}

// o[r0:r0+R, c:c+16V] = α·o + P·V over the block's keys.
template <int R, int V>
JAXOPT_LLM_AVX512 inline void AccumulateBlock512(const Tile& t, int64_t r0, int64_t c) {
  __m512 acc[R][V];
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) {
    const __m512 alpha = _mm512_set1_ps(t.alpha[r0 + r]);
    JAXOPT_LLM_UNROLL
    for (int i = 0; i < V; ++i) {
      acc[r][i] = _mm512_mul_ps(alpha, _mm512_loadu_ps(t.o + (r0 + r) * t.D + c + 16 * i));
    }
  }
  const float* p = t.s + r0 * t.W;
  const float* v = t.v + c;
  for (int64_t j = 0; j < t.n; ++j, v += t.v_stride) {
    __m512 x[V];
    JAXOPT_LLM_UNROLL
    for (int i = 0; i < V; ++i) x[i] = _mm512_loadu_ps(v + 16 * i);
    JAXOPT_LLM_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(p[r * t.W + j]);
      JAXOPT_LLM_UNROLL
      for (int i = 0; i < V; ++i) acc[r][i] = _mm512_fmadd_ps(w, x[i], acc[r][i]);
    }
  }
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) {
    JAXOPT_LLM_UNROLL
    for (int i = 0; i < V; ++i) _mm512_storeu_ps(t.o + (r0 + r) * t.D + c + 16 * i, acc[r][i]);
  }
}

template <int R>
JAXOPT_LLM_AVX512 void AccumulateRows512(const Tile& t, int64_t r0) {
  int64_t c = 0;
  for (; c + 64 <= t.D; c += 64) AccumulateBlock512<R, 4>(t, r0, c);
  if (c + 32 <= t.D) {
    AccumulateBlock512<R, 2>(t, r0, c);
    c += 32;
  }
  if (c + 16 <= t.D) {
    AccumulateBlock512<R, 1>(t, r0, c);
    c += 16;
  }
  if (c + 8 <= t.D) {  // the AVX2 block: the same sums, in the same order, as that kernel
    AccumulateBlock<R, 1>(t, r0, c);
    c += 8;
  }
  if (c < t.D) AccumulateColumnsScalar(t, r0, r0 + R, c);  // the last D % 8 columns
}

template <int R>
JAXOPT_LLM_AVX512 void BlockRows512(const Tile& t, int64_t r0) {
  const float* q = t.q + r0 * t.D;
  float* s = t.s + r0 * t.W;
  const int64_t panels = t.W / kPanel;
  const bool dense = t.mask == nullptr && t.n == t.W;  // every row sees every key
  __m512 row_max[R];
  JAXOPT_LLM_UNROLL
  for (int r = 0; r < R; ++r) row_max[r] = _mm512_set1_ps(kNegInf);
  int64_t p = 0;
  for (; p + 2 <= panels; p += 2) {
    const float* kp = t.kp + p * t.D * kPanel;
    if (dense) {
      ScorePanels512<R, 2, true>(q, t.D, kp, s + p * kPanel, t.W, row_max);
    } else {
      ScorePanels512<R, 2, false>(q, t.D, kp, s + p * kPanel, t.W, nullptr);
    }
  }
  if (p < panels) {
    const float* kp = t.kp + p * t.D * kPanel;
    if (dense) {
      ScorePanels512<R, 1, true>(q, t.D, kp, s + p * kPanel, t.W, row_max);
    } else {
      ScorePanels512<R, 1, false>(q, t.D, kp, s + p * kPanel, t.W, nullptr);
    }
  }
  if (dense) {
    float known_max[R];
    JAXOPT_LLM_UNROLL
    for (int r = 0; r < R; ++r) known_max[r] = _mm512_reduce_max_ps(row_max[r]);
    SoftmaxRows(t, r0, R, known_max);
  } else {
    SoftmaxRows(t, r0, R, nullptr);
  }
  AccumulateRows512<R>(t, r0);
}

JAXOPT_LLM_AVX512 void BlockAvx512(const Tile& t) {
  int64_t r = 0;
  for (; r + kScoreRows <= t.M; r += kScoreRows) BlockRows512<kScoreRows>(t, r);
  switch (t.M - r) {
    case 5: return BlockRows512<5>(t, r);
    case 4: return BlockRows512<4>(t, r);
    case 3: return BlockRows512<3>(t, r);
    case 2: return BlockRows512<2>(t, r);
    case 1: return BlockRows512<1>(t, r);
    default: return;
  }
}
#else
void BlockAvx2(const Tile& t) { BlockScalar(t); }
void BlockAvx512(const Tile& t) { BlockScalar(t); }
#endif  // JAXOPT_LLM_X86

// ------------------------------------------------------------------------- the driver

struct AttentionProblem {
  const float* q;       // (B, T, H, D)
  const float* k;       // (B, T, Hkv, D)
  const float* v;       // (B, T, Hkv, D)
  const uint8_t* mask;  // (B, T, T)
  float* out;           // (B, T, H, D)
  int64_t B, T, H, Hkv, G, D;
  int64_t rows_t;       // positions per query block
  int64_t q_blocks;     // query blocks per (b, kv head)
  int64_t panels;       // key panels per (b, kv head): ceil(T / 16)
  float* kp;            // packed keys (B, Hkv, panels, D, 16)
  float* vp;            // packed values (B, Hkv, T, D): one contiguous stream per kv head
  float q_scale;        // log2(e) / √D
  BlockKernel block;
};

// Panels per packing task.
constexpr int64_t kPanelsPerPackTask = 32;

// Keys (transposed into panels) and values of kPanelsPerPackTask panels of one kv head.
void PackKeysValues(const AttentionProblem& p, int64_t task) {
  const int64_t chunks = (p.panels + kPanelsPerPackTask - 1) / kPanelsPerPackTask;
  const int64_t bh = task / chunks, chunk = task % chunks;
  const int64_t b = bh / p.Hkv, kvh = bh % p.Hkv, D = p.D;
  const int64_t p0 = chunk * kPanelsPerPackTask;
  const int64_t p1 = std::min(p.panels, p0 + kPanelsPerPackTask);
  for (int64_t panel = p0; panel < p1; ++panel) {
    float* out = p.kp + (bh * p.panels + panel) * D * kPanel;
    for (int64_t i = 0; i < kPanel; ++i) {
      const int64_t s = panel * kPanel + i;
      if (s >= p.T) {  // padding keys: finite scores, hidden by the kernels
        for (int64_t d = 0; d < D; ++d) out[d * kPanel + i] = 0.0f;
        continue;
      }
      const float* key = p.k + ((b * p.T + s) * p.Hkv + kvh) * D;
      for (int64_t d = 0; d < D; ++d) out[d * kPanel + i] = key[d];
      std::copy(p.v + ((b * p.T + s) * p.Hkv + kvh) * D,
                p.v + ((b * p.T + s) * p.Hkv + kvh + 1) * D, p.vp + (bh * p.T + s) * D);
    }
  }
}

enum class Seen { kNone, kAll, kSome };

// Which of keys [0, n) rows [0, rows) of a mask tile (row stride `stride`) see. The loops
// over a row are plain min / max reductions, which compilers vectorise.
Seen ClassifyMask(const uint8_t* mask, int64_t stride, int64_t rows, int64_t n) {
  uint8_t lowest = 1, highest = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = mask + r * stride;
    uint8_t row_min = 0xff, row_max = 0;
    for (int64_t j = 0; j < n; ++j) {
      row_min = std::min(row_min, row[j]);
      row_max = std::max(row_max, row[j]);
    }
    lowest = std::min(lowest, row_min);
    highest = std::max(highest, row_max);
    if (highest != 0 && lowest == 0) return Seen::kSome;
  }
  return highest == 0 ? Seen::kNone : lowest != 0 ? Seen::kAll : Seen::kSome;
}

// Floats starting on a cache line, so that no aligned row's vector load straddles two lines
// (malloc's large blocks start 16 bytes into a page). Grown on demand.
class LineAligned {
 public:
  float* Get(size_t count) {
    if (count + kSlack > storage_.size()) storage_.resize(count + kSlack);
    const uintptr_t address = reinterpret_cast<uintptr_t>(storage_.data());
    return storage_.data() + (-address % 64) / sizeof(float);
  }

 private:
  static constexpr size_t kSlack = 64 / sizeof(float);
  std::vector<float> storage_;
};

// Per-thread tiles, grown on demand and reused across calls.
struct Scratch {
  LineAligned q, o, s;
  std::vector<float> m, l, alpha;
};

void RunQueryBlock(const AttentionProblem& p, int64_t task) {
  const int64_t heads = p.B * p.Hkv;  // tasks are ordered longest (last) query block first
  const int64_t block = p.q_blocks - 1 - task / heads, bh = task % heads;
  const int64_t b = bh / p.Hkv, kvh = bh % p.Hkv, G = p.G, D = p.D, T = p.T;
  const int64_t t0 = block * p.rows_t, t1 = std::min(T, t0 + p.rows_t);
  const int64_t M = (t1 - t0) * G;

  thread_local Scratch scratch;
  float* q = scratch.q.Get(M * D);
  float* o = scratch.o.Get(M * D);
  std::fill(o, o + M * D, 0.0f);
  scratch.m.assign(M, kNegInf);
  scratch.l.assign(M, 0.0f);
  scratch.alpha.assign(M, 0.0f);
  for (int64_t t = t0; t < t1; ++t) {  // the G heads of one position are contiguous
    const float* src = p.q + ((b * T + t) * p.H + kvh * G) * D;
    float* dst = q + (t - t0) * G * D;
    for (int64_t i = 0; i < G * D; ++i) dst[i] = src[i] * p.q_scale;
  }

  Tile tile;
  tile.q = q;
  tile.v_stride = D;
  tile.mask_stride = T;
  tile.G = G;
  tile.M = M;
  tile.D = D;
  tile.s = scratch.s.Get(M * kKeyBlock);
  tile.o = o;
  tile.m = scratch.m.data();
  tile.l = scratch.l.data();
  tile.alpha = scratch.alpha.data();
  const uint8_t* mask_rows = p.mask + (b * T + t0) * T;
  for (int64_t s0 = 0; s0 < t1; s0 += kKeyBlock) {  // keys ≥ t1 are masked (causal prefix)
    tile.n = std::min(kKeyBlock, t1 - s0);
    const Seen seen = ClassifyMask(mask_rows + s0, T, t1 - t0, tile.n);
    if (seen == Seen::kNone) continue;
    tile.W = (tile.n + kPanel - 1) / kPanel * kPanel;
    tile.kp = p.kp + (bh * p.panels + s0 / kPanel) * D * kPanel;
    tile.v = p.vp + (bh * T + s0) * D;
    tile.mask = seen == Seen::kAll ? nullptr : mask_rows + s0;
    p.block(tile);
  }

  for (int64_t r = 0; r < M; ++r) {
    const int64_t t = t0 + r / G, h = kvh * G + r % G;
    float* dst = p.out + ((b * T + t) * p.H + h) * D;
    const float* row = o + r * D;
    const float l = scratch.l[r];
    if (l > 0.0f) {
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < D; ++d) dst[d] = row[d] * inv;
    } else {
      std::fill(dst, dst + D, 0.0f);  // a row that sees no key
    }
  }
}

// The whole computation for checked operands (p's pointers and sizes set): pack K and V,
// then every query block. `for_each(count, fn, p)` runs fn(p, i) for every i < count, in
// any order and on any threads (XLA's pool in the handler).
template <class ForEach>
void Attend(AttentionProblem p, BlockKernel block, ForEach&& for_each) {
  p.G = p.H / p.Hkv;
  p.rows_t = std::max<int64_t>(1, kRowsPerTile / p.G);
  p.q_blocks = (p.T + p.rows_t - 1) / p.rows_t;
  p.panels = (p.T + kPanel - 1) / kPanel;
  LineAligned keys, values;
  p.kp = keys.Get(static_cast<size_t>(p.B * p.Hkv * p.panels * p.D * kPanel));
  p.vp = values.Get(static_cast<size_t>(p.B * p.Hkv * p.T * p.D));
  p.q_scale = kLog2e / std::sqrt(static_cast<float>(p.D));
  p.block = block;
  const int64_t chunks = (p.panels + kPanelsPerPackTask - 1) / kPanelsPerPackTask;
  for_each(p.B * p.Hkv * chunks, &PackKeysValues, p);
  for_each(p.B * p.Hkv * p.q_blocks, &RunQueryBlock, p);
}

// ------------------------------------------------------------------------ threading

struct AttentionTask {
  void (*fn)(const AttentionProblem&, int64_t);
  const AttentionProblem* problem;
};

void RunAttentionTask(const void* ctx, int64_t i) {
  const auto& task = *static_cast<const AttentionTask*>(ctx);
  task.fn(*task.problem, i);
}

// ---------------------------------------------------------------------------- handler

std::string ShapeString(ffi::Span<const int64_t> dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + ")";
}

std::string TypeName(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::PRED: return "bool";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S8: return "int8";
    case ffi::DataType::U8: return "uint8";
    case ffi::DataType::S32: return "int32";
    default: return "element type " + std::to_string(static_cast<int>(type));
  }
}

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("prefix attention: " + message);
}

ffi::Error PrefixAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::AnyBuffer mask,
                           ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t variant_attr,
                           int64_t tasks_attr) {
  const auto q_dims = q.dimensions(), k_dims = k.dimensions(), v_dims = v.dimensions();
  const auto mask_dims = mask.dimensions(), out_dims = out->dimensions();
  const struct {
    const char* name;
    const ffi::AnyBuffer& buffer;
  } operands[] = {{"q", q}, {"k", k}, {"v", v}};
  for (const auto& operand : operands) {
    if (operand.buffer.dimensions().size() != 4) {
      return Invalid(std::string(operand.name) + " must be (B, T, heads, D), got shape " +
                     ShapeString(operand.buffer.dimensions()));
    }
    if (operand.buffer.element_type() != ffi::DataType::F32) {
      return Invalid(std::string(operand.name) + " must be float32, got " +
                     TypeName(operand.buffer.element_type()));
    }
  }
  if (mask_dims.size() != 3 || mask.element_type() != ffi::DataType::PRED) {
    return Invalid("mask must be bool (B, T, T), got " + TypeName(mask.element_type()) + " " +
                   ShapeString(mask_dims));
  }
  const int64_t B = q_dims[0], T = q_dims[1], H = q_dims[2], D = q_dims[3];
  const int64_t Hkv = k_dims[2];
  for (int i = 0; i < 4; ++i) {
    if (k_dims[i] != v_dims[i]) {
      return Invalid("k " + ShapeString(k_dims) + " and v " + ShapeString(v_dims) + " differ");
    }
  }
  if (k_dims[0] != B || k_dims[1] != T || k_dims[3] != D) {
    return Invalid("k and v " + ShapeString(k_dims) + " do not match q " +
                   ShapeString(q_dims) + " in B, T or D");
  }
  if (Hkv < 1 || H % Hkv != 0) {
    return Invalid("H = " + std::to_string(H) + " query heads is not a multiple of Hkv = " +
                   std::to_string(Hkv) + " kv heads");
  }
  if (mask_dims[0] != B || mask_dims[1] != T || mask_dims[2] != T) {
    return Invalid("mask " + ShapeString(mask_dims) + " is not (B, T, T) = (" +
                   std::to_string(B) + ", " + std::to_string(T) + ", " + std::to_string(T) +
                   ")");
  }
  for (int i = 0; i < 4; ++i) {
    if (out_dims.size() != 4 || out_dims[i] != q_dims[i]) {
      return Invalid("result " + ShapeString(out_dims) + " is not q's shape " +
                     ShapeString(q_dims));
    }
  }
  Variant variant = static_cast<Variant>(variant_attr);
  if (variant == Variant::kAuto) {
    variant = HaveAvx512() ? Variant::kAvx512 : HaveAvx2() ? Variant::kAvx2 : Variant::kScalar;
  }
  if (variant == Variant::kAvx2 && !HaveAvx2()) {
    return Invalid("this CPU has no AVX2 + FMA (use variant 'scalar' or 'auto')");
  }
  if (variant == Variant::kAvx512 && !HaveAvx512()) {
    return Invalid("this CPU has no AVX-512F (use variant 'avx2', 'scalar' or 'auto')");
  }
  if (variant != Variant::kAvx512 && variant != Variant::kAvx2 && variant != Variant::kScalar) {
    return Invalid("unknown variant " + std::to_string(variant_attr));
  }
  if (B == 0 || T == 0 || H == 0 || D == 0) return ffi::Error::Success();  // nothing to do

  AttentionProblem p;
  p.q = static_cast<const float*>(q.untyped_data());
  p.k = static_cast<const float*>(k.untyped_data());
  p.v = static_cast<const float*>(v.untyped_data());
  p.mask = static_cast<const uint8_t*>(mask.untyped_data());
  p.out = out->typed_data();
  p.B = B;
  p.T = T;
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  const int64_t threads = tasks_attr > 0 ? tasks_attr : std::max<int64_t>(1, pool.num_threads());
  Attend(p, variant == Variant::kAvx512 ? &BlockAvx512
            : variant == Variant::kAvx2  ? &BlockAvx2
                                         : &BlockScalar,
         [&](int64_t count, void (*fn)(const AttentionProblem&, int64_t),
             const AttentionProblem& problem) {
           const AttentionTask task{fn, &problem};
           parallel::ParallelFor(pool, count, std::min(threads, count) - 1, &RunAttentionTask,
                                 &task);
         });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxopt_llm

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxoptLlmPrefixAttention, jaxopt_llm::PrefixAttention,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("variant")
                                  .Attr<int64_t>("tasks"));
