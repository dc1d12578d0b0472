// Weight-only quantized GEMV/GEMM kernels for decode-sized inputs (1-8 rows), called from
// JAX through the XLA FFI (see gemv.cc and jaxopt_llm/weights/native.py).
//
// y (rows, N) float32 = x (rows, K) float32 @ dequant(W), W stored K-major as the
// QuantizedWeight leaf stores it:
//   int8   codes q (K, N), w = q * s                      (symmetric 8-bit)
//   uint8  codes u (K, N), w = (u - z) * s  or  u * s + m   (asymmetric 8-bit)
//   uint4  codes packed two per byte along K (even k in the low nibble), (ceil(K/2), N):
//          w = (u - 8) * s (symmetric), (u - z) * s, or u * s + m
//   float32 / bfloat16 (K, N), w = value * s (bits 32 / 16: a dense weight, s = 1)
// with s, z, m per group of `group` consecutive k (G = ceil(K / group) groups, the last one
// possibly shorter) and per output column: s and m float32 or float16 (G, N), z uint8 (G, N).
//
// The table form (a tied LM head, the QuantizedWeight of axis 1, ggml's layout):
// y (rows, V) float32 = x (rows, D) float32 @ dequant(T)ᵀ, T (V, D) stored row-major with
// the same codes along D (4-bit: two consecutive d per byte, (V, ceil(D/2))) and s, z, m
// (V, G) per row v and group of `group` consecutive d.
#ifndef JAXOPT_LLM_CSRC_GEMV_H_
#define JAXOPT_LLM_CSRC_GEMV_H_

#include <cstdint>

extern "C" {
struct XLA_FFI_Error;
struct XLA_FFI_CallFrame;
// The FFI handlers (typed FFI, api_version 1), exported for the Python module's capsules.
XLA_FFI_Error* JaxoptLlmWeightGemv(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxoptLlmWeightGemvZero(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxoptLlmTableGemv(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* JaxoptLlmTableGemvZero(XLA_FFI_CallFrame* call_frame);
}

namespace jaxopt_llm {

// kFloat32 / kBFloat16: a dense float kernel (K, N) read as is, with scales of 1 (the same
// panels stream a float32 or bfloat16 weight; kernels only, not tables).
enum class Codes : int { kInt8 = 0, kUint8 = 1, kUint4 = 2, kFloat32 = 3, kBFloat16 = 4 };
enum class ZeroKind : int { kNone = 0, kInteger = 1, kFloat = 2 };
// Which kernel runs: 0 the best one this CPU supports, 1 the portable scalar one, 2 AVX2,
// 3 AVX-512 (the kernel form; tables run their AVX2 code under it).
enum class Variant : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

// The most rows one kernel call accumulates in registers; more rows run in blocks of this.
constexpr int kMaxRows = 8;

// One block of at most kMaxRows rows against the whole weight.
struct Problem {
  const float* x = nullptr;   // (rows, K), row stride K
  int64_t rows = 0;           // 1..kMaxRows
  int64_t K = 0;
  int64_t N = 0;
  const uint8_t* q = nullptr; // codes, row stride N bytes
  const void* scale = nullptr;  // (G, N) float32, or float16 when scale_f16
  bool scale_f16 = false;
  const void* zero = nullptr;   // (G, N): uint8 (kInteger), float32/float16 (kFloat)
  bool zero_f16 = false;
  int64_t group = 0;          // k values per group (K for a single group)
  int64_t G = 0;
  const float* xsum = nullptr;  // (rows, G): sum of x over each group (kFloat only)
  float* y = nullptr;         // (rows, N), row stride N
  Codes codes = Codes::kInt8;
  ZeroKind zero_kind = ZeroKind::kNone;
};

// One block of at most kMaxRows rows against a whole table (axis 1).
struct TableProblem {
  const float* x = nullptr;   // (rows, D), row stride D
  const float* xe = nullptr;  // 4-bit only: x[:, 0::2] and x[:, 1::2], (rows, B) each,
  const float* xo = nullptr;  //   row stride B, xo zero-padded for an odd D
  int64_t rows = 0;           // 1..kMaxRows
  int64_t D = 0;
  int64_t V = 0;
  int64_t B = 0;              // bytes of codes per table row: D, or ceil(D/2) for 4-bit
  const uint8_t* q = nullptr; // codes (V, B)
  const void* scale = nullptr;  // (V, G) float32, or float16 when scale_f16
  bool scale_f16 = false;
  const void* zero = nullptr;   // (V, G): uint8 (kInteger), float32/float16 (kFloat)
  bool zero_f16 = false;
  int64_t group = 0;          // d values per group (D for a single group)
  int64_t G = 0;
  const float* xsum = nullptr;  // (rows, G): sum of x over each group (kFloat only)
  float* y = nullptr;         // (rows, V), row stride V
  Codes codes = Codes::kInt8;
  ZeroKind zero_kind = ZeroKind::kNone;
};

// y[:, n0:n1] of the block, portable C++.
void RunScalar(const Problem& p, int64_t n0, int64_t n1);
// y[:, n0:n1] of the block with AVX2 + FMA + F16C; only when HaveAvx2().
void RunAvx2(const Problem& p, int64_t n0, int64_t n1);
// The same with AVX-512F (16 lanes); only when HaveAvx512().
void RunAvx512(const Problem& p, int64_t n0, int64_t n1);
// Whether this CPU runs the AVX2 kernel (checked at run time).
bool HaveAvx2();
// Whether this CPU runs the AVX-512 kernel form (AVX2 and AVX-512F).
bool HaveAvx512();
// "avx512", "avx2" or "scalar": the kernel form Variant::kAuto picks on this CPU.
const char* BestVariantName();
// Threads of XLA's CPU pool seen by the last call (0 before any call).
int64_t LastPoolThreads();

}  // namespace jaxopt_llm

#endif  // JAXOPT_LLM_CSRC_GEMV_H_
