"""Native CPU kernel for N:M sparse kernels at decode sizes (1–8 rows), read as stored.

The pure-JAX `NMSparseWeight.linear` expands the kept values to a dense (K, N) kernel in
every call, so a 2:4 model decodes slower than the dense one (it writes and reads a dense
copy of each weight every step). `native_nm_matmul` (csrc/nm_gemv.cc, in the optional
extension `jaxopt_llm._native_gemv`) reads the kept values and their packed positions once
and never builds the dense kernel: for each value row it loads the values of 8 columns and
their positions, picks each column's input with a lane permute of the group's m inputs
(AVX2; a portable loop elsewhere) and accumulates in float32. 2:4 streams 2.1 bytes per
dense weight (values 2 of 4, positions 2 bits each) instead of 4.

Supported: float32 values (not quantized ones), positions of 1 or 2 bits (m ≤ 4: 1:2,
1:4, 2:4, 3:4), 1 ≤ rows ≤ `native.MAX_ROWS`, float32 activations, a CPU default backend,
the extension built and `native.path_in_use()` (JAXOPT_LLM_NATIVE not off, no sharded
program). Anything else returns None and the caller expands as before. Under `vmap` of x
the batch folds into the rows (`vmap_method="expand_dims"`); a batched weight is refused
by the kernel. The derivative is the pure-JAX product's (a custom JVP).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.weights import native

_TARGET = "jaxopt_llm_nm_gemv"


def supports_nm(w: Any, rows: int) -> bool:
    """Whether `native_nm_matmul` runs `w` natively for `rows` input rows.

    Only static properties are looked at (traced weights work); the extension itself is
    checked by `native.path_in_use`.

    Args:
        w: a weight leaf (only an `NMSparseWeight` with float32 array values qualifies).
        rows: rows (tokens) of the input.

    Returns:
        True for float32 values, positions of 1–2 bits, 1 ≤ rows ≤ `native.MAX_ROWS` and
        a CPU default backend.

    Example:
        >>> from jaxopt_llm.weights.sparse import nm_sparse_weight
        >>> w = nm_sparse_weight(jnp.ones((8, 4)), jnp.tile(jnp.array([1, 1, 0, 0], bool),
        ...                      2)[:, None].repeat(4, 1), 2, 4)
        >>> supports_nm(w, 1), supports_nm(w, 9)
        (True, False)
    """
    if type(w).__name__ != "NMSparseWeight" or not 1 <= rows <= native.MAX_ROWS:
        return False  # (by name: sparse.py imports this module, not the reverse)
    values = w.values
    if not hasattr(values, "dtype") or getattr(values, "ndim", 0) != 2:
        return False  # quantized values: the expansion path
    if jnp.dtype(values.dtype) != jnp.float32 or w.index_bits not in (1, 2):
        return False
    return jax.default_backend() == "cpu"


def native_nm_matmul(x: jax.Array, w: Any, *, variant: str = "auto",
                     tasks: int = 0) -> jax.Array | None:
    """x (..., K) float32 @ an N:M sparse kernel by the native kernel; None if not handled.

    Equal to `x @ w.materialize()` up to float32 rounding (the order of the sums differs),
    without expanding the kernel. Works under `jit` and `vmap` (of x).

    Args:
        x: float32 activations (..., K) with at most `native.MAX_ROWS` rows.
        w: an `NMSparseWeight` (K, N).
        variant: "auto" (AVX2 where the CPU has it), "scalar" or "avx2".
        tasks: column chunks to split the work into (0: XLA's CPU pool threads).

    Returns:
        The float32 (..., N) product, or None when `supports_nm` is false, x is not float32
        with K inputs, or the native path is off here.

    Raises:
        ValueError: for a variant other than auto, scalar or avx2.

    Example:
        >>> from jaxopt_llm.weights.sparse import nm_sparse_weight
        >>> keep = jnp.array([[1], [1], [0], [0]], bool)
        >>> w = nm_sparse_weight(jnp.array([[2.0], [3.0], [5.0], [7.0]]), keep, 2, 4)
        >>> native_nm_matmul(jnp.ones((1, 4)), w).tolist()  # doctest: +SKIP
        [[5.0]]
    """
    if variant not in ("auto", "scalar", "avx2"):
        raise ValueError(f"variant must be one of auto, scalar, avx2, got {variant!r}")
    rows = math.prod(x.shape[:-1])
    if x.ndim < 2 or x.dtype != jnp.float32 or not supports_nm(w, rows):
        return None
    if x.shape[-1] != w.shape[0] or not native.path_in_use()[0]:
        return None
    x2 = x.reshape(rows, x.shape[-1])
    return _differentiable_call(x2, w, variant, tasks).reshape(*x.shape[:-1], w.shape[1])


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _differentiable_call(x2: jax.Array, w: Any, variant: str, tasks: int) -> jax.Array:
    """The kernel call; its derivative is the pure-JAX product's (the kernel has none)."""
    return _call(x2, w, variant, tasks)


@_differentiable_call.defjvp
def _jvp(variant, tasks, primals, tangents):
    _, tangent = jax.jvp(lambda x2, w: x2 @ w.materialize(), primals, tangents)
    return _call(*primals, variant, tasks), tangent


def _call(x2: jax.Array, w: Any, variant: str, tasks: int) -> jax.Array:
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x2.shape[0], w.shape[1]),
                                                          jnp.float32),
                            vmap_method="expand_dims")
    return call(x2, w.values, w.index, m=np.int64(w.m), kept=np.int64(w.kept),
                bits=np.int64(w.index_bits), variant=np.int64(native.VARIANTS[variant]),
                tasks=np.int64(tasks))
