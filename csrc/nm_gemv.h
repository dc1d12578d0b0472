// N:M sparse GEMV for decode-sized inputs (see nm_gemv.cc and jaxopt_llm/weights/native_nm.py).
#ifndef JAXOPT_LLM_CSRC_NM_GEMV_H_
#define JAXOPT_LLM_CSRC_NM_GEMV_H_

extern "C" {
struct XLA_FFI_Error;
struct XLA_FFI_CallFrame;
// The FFI handler (typed FFI, api_version 1), exported for the Python module's capsules.
XLA_FFI_Error* JaxoptLlmNmGemv(XLA_FFI_CallFrame* call_frame);
}

#endif  // JAXOPT_LLM_CSRC_NM_GEMV_H_
