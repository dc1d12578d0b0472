// Causal-prefix (prefill / evaluation) attention on the CPU, called from JAX through the
// XLA FFI (see attention.cc and jaxopt_llm/models/native_attention.py).
//
// q (B, T, H, D), k and v (B, T, Hkv, D) float32, mask (B, T, T) bool (PRED, one byte each);
// H = G·Hkv (grouped-query attention: query head h reads kv head h / G):
//   out[b, t, h, :] = Σ_s p[s] · v[b, s, h / G, :],
//   p = softmax over the keys s with mask[b, t, s] of q[b, t, h, :] · k[b, s, h / G, :] / √D,
// and out[b, t, h, :] = 0 where no key is visible. The caller guarantees mask[b, t, s] is
// false for s > t (a causal prefix), so keys after a query block are never read; every
// other false entry (padding, sliding windows) is honoured.
#ifndef JAXOPT_LLM_CSRC_ATTENTION_H_
#define JAXOPT_LLM_CSRC_ATTENTION_H_

#include <cstdint>

extern "C" {
struct XLA_FFI_Error;
struct XLA_FFI_CallFrame;
// The FFI handler (typed FFI, api_version 1), exported for the Python module's capsule.
// Attributes: variant (0 auto, 1 scalar, 2 avx2), tasks (threads to use, 0: XLA's pool).
XLA_FFI_Error* JaxoptLlmPrefixAttention(XLA_FFI_CallFrame* call_frame);
}

#endif  // JAXOPT_LLM_CSRC_ATTENTION_H_
