"""Compute precision of a whole model: `compute_in(params, "bfloat16")` runs a model's
float weights and its activations in bfloat16 (what `torch_dtype=torch.bfloat16` does in
transformers), for evaluation and generation.

What changes, leaf by leaf (the model's activation dtype follows its token table's):
- float arrays (kernels, tables, biases, low-rank factors, kept N:M values) → bfloat16;
- arrays whose name ends in `scale` (RMSNorm/LayerNorm scales, AWQ's kept input scales)
  stay float32: norms compute in float32 anyway and rescale in the activation dtype;
- `QuantizedWeight` keeps its codes and scales and gets `compute="bfloat16"`: matmuls of
  prefill-sized inputs run in bf16 with float32 accumulation (`weights/quantized.py`);
- integer arrays (codes, masks, N:M positions) are untouched.

Where it pays: bf16 halves the bytes of a float model; XLA's CPU bf16 prefill measured
1.36× float32 on an AVX-512 BF16 host but 0.69× on an AVX2-only one, and its GEMV
(decode) is slower than float32 on the CPUs measured; on GPU/TPU bf16 is the native
format. `resolve_compute("auto")` picks bfloat16 only where it pays
(`hardware.bf16_prefill_pays`). Rounding activations to bf16 changes perplexity slightly
(measured on SmolLM2 in benchmarks/bench_compute_dtype.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_llm import hardware
from jaxopt_llm.errors import ParameterError
from jaxopt_llm.weights import QuantizedWeight

COMPUTE_DTYPES = ("float32", "bfloat16", "auto")


def resolve_compute(compute: str, backend: str | None = None) -> str:
    """The dtype `compute` means on `backend`: "auto" → "bfloat16" where bf16 pays (GPU,
    TPU, CPUs with bf16 instructions), else "float32".

    Args:
        compute: one of `COMPUTE_DTYPES`.
        backend: the JAX backend (default: `jax.default_backend()`).

    Returns:
        "float32" or "bfloat16".

    Raises:
        ParameterError: `compute` is not one of `COMPUTE_DTYPES`.

    Example:
        >>> resolve_compute("bfloat16"), resolve_compute("float32")
        ('bfloat16', 'float32')
    """
    if compute not in COMPUTE_DTYPES:
        raise ParameterError("compute", compute,
                             f"must be one of {', '.join(COMPUTE_DTYPES)}")
    if compute == "auto":
        backend = backend or jax.default_backend()
        return "bfloat16" if hardware.bf16_prefill_pays(backend) else "float32"
    return compute


def compute_in(params: Any, compute: str) -> Any:
    """`params` with float weights (and so activations) in bfloat16; see the module
    docstring for what each leaf becomes. "float32" returns `params` unchanged.

    Args:
        params: a model's parameter tree (float or compressed by any recipe).
        compute: "float32", "bfloat16" or "auto" (`resolve_compute`).

    Returns:
        The parameter tree to run.

    Raises:
        ParameterError: `compute` is not one of `COMPUTE_DTYPES`.

    Example:
        >>> import jax.numpy as jnp
        >>> tree = {"kernel": jnp.ones((2, 2)), "norm": {"scale": jnp.ones(2)}}
        >>> out = compute_in(tree, "bfloat16")
        >>> out["kernel"].dtype, out["norm"]["scale"].dtype
        (dtype(bfloat16), dtype('float32'))
    """
    dtype = resolve_compute(compute)
    if dtype == "float32":
        return params

    def cast(path, leaf):
        if isinstance(leaf, QuantizedWeight):
            return leaf.replace(compute=dtype)
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", ""))) if path else ""
        if (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
                and not name.endswith("scale")):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(
        cast, params, is_leaf=lambda node: isinstance(node, QuantizedWeight))
