// The Python extension module jaxopt_llm._native_gemv: the FFI handlers of gemv.cc,
// nm_gemv.cc and attention.cc as PyCapsules for jax.ffi.register_ffi_target, and what the kernels will run
// on this CPU.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "attention.h"
#include "gemv.h"
#include "nm_gemv.h"

namespace {

PyObject* Registrations(PyObject*, PyObject*) {
  struct Target {
    const char* name;
    void* handler;
  };
  const Target targets[] = {
      {"jaxopt_llm_weight_gemv", reinterpret_cast<void*>(&JaxoptLlmWeightGemv)},
      {"jaxopt_llm_weight_gemv_zero", reinterpret_cast<void*>(&JaxoptLlmWeightGemvZero)},
      {"jaxopt_llm_table_gemv", reinterpret_cast<void*>(&JaxoptLlmTableGemv)},
      {"jaxopt_llm_table_gemv_zero", reinterpret_cast<void*>(&JaxoptLlmTableGemvZero)},
      {"jaxopt_llm_prefix_attention", reinterpret_cast<void*>(&JaxoptLlmPrefixAttention)},
      {"jaxopt_llm_nm_gemv", reinterpret_cast<void*>(&JaxoptLlmNmGemv)},
  };
  PyObject* result = PyDict_New();
  if (result == nullptr) return nullptr;
  for (const Target& target : targets) {
    PyObject* capsule = PyCapsule_New(target.handler, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(result, target.name, capsule) < 0) {
      Py_XDECREF(capsule);
      Py_DECREF(result);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return result;
}

PyObject* BestVariant(PyObject*, PyObject*) {
  return PyUnicode_FromString(jaxopt_llm::BestVariantName());
}

PyObject* PoolThreads(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(jaxopt_llm::LastPoolThreads()));
}

PyMethodDef kMethods[] = {
    {"registrations", Registrations, METH_NOARGS,
     "registrations() -> dict: FFI target name -> PyCapsule of its XLA FFI handler."},
    {"best_variant", BestVariant, METH_NOARGS,
     "best_variant() -> str: 'avx512', 'avx2' or 'scalar', the GEMV kernel form chosen on "
     "this CPU at run time (tables and attention run their AVX2 code under 'avx512')."},
    {"pool_threads", PoolThreads, METH_NOARGS,
     "pool_threads() -> int: threads of XLA's CPU pool seen by the last call (0 before)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "_native_gemv",
    "Native CPU kernels as XLA FFI handlers: weight-only quantized GEMV (see "
    "jaxopt_llm.weights.native) and causal-prefix attention (jaxopt_llm.models."
    "native_attention).",
    -1,
    kMethods,
};

}  // namespace

PyMODINIT_FUNC PyInit__native_gemv(void) { return PyModule_Create(&kModule); }
