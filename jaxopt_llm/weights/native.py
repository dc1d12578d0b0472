"""Native CPU kernels for weight-only quantized matmuls at decode sizes (1–8 rows).

The pure-JAX path (`QuantizedWeight.linear`) dequantizes the whole weight to float32 and
then multiplies: at decode sizes that writes and reads a float32 copy of every weight each
step, so a quantized model decodes slower than a float32 one. The kernels here
(csrc/gemv.cc, built into the optional extension `jaxopt_llm._native_gemv` by setup.py)
read the stored codes once and never materialize the float weight; JAX calls them through
the XLA FFI (`jax.ffi.ffi_call`), so they run under `jit` and `vmap` like any primitive.

Layouts (the `QuantizedWeight` of a kernel, axis=0, (K, N) = `w.shape2d`, taken as stored):
- symmetric 8-bit: int8 codes q (K, N), w = q·s;
- asymmetric 8-bit: uint8 codes u (K, N), w = (u - z)·s, or u·s + m with a float offset;
- 4-bit: uint8 (ceil(K/2), N), two consecutive k per byte, even k in the low nibble;
  w = (u - 8)·s (symmetric), (u - z)·s (uint8 zero point), or u·s + m (float offset);
- s, m: (G, N) float32 or float16 (bfloat16 is converted to float32 here); z: (G, N) uint8;
  G = 1 per channel, ceil(K / group_size) per group (the last group may be shorter);
  per-tensor (1, 1) scales are broadcast to (1, N) here.

Algorithm: the weight is K-major, so the kernel walks k and vectorises along N (AVX2 + FMA,
8 columns a vector): per group, acc[m, :] = Σ_k x[m, k]·c[k, :] with c the exact integer
code as float32 (the 4-bit offset and integer zero points subtracted in integers), then
y[m, :] += s[g, :]·acc[m, :] (+ m[g, :]·Σ_{k∈g} x[m, k] for a float offset). It works in
panels of up to 2,048 columns, 8 code rows at a time, accumulating in an L1 buffer and
prefetching the rows two blocks ahead, so the codes stream from memory as contiguous row
segments (register tiles that walked all K for 32 columns read ~8 GB/s from DRAM; panels
~24 GB/s on two cores). Codes are decoded once per k and 8 columns and reused by every row.

Dispatch: at run time the kernel picks AVX-512F (16 lanes), AVX2 + FMA + F16C (8 lanes;
`__builtin_cpu_supports`) or a portable scalar loop; the panel code is written once
(csrc/gemv_panel.inc) and compiled for each vector width. Tables and attention have AVX2
and scalar code only (their AVX2 code runs on AVX-512 hosts); columns are split
into one chunk per thread of XLA's CPU pool (whole 32-column tiles; small weights stay on
one thread), claimed from a shared counter by the calling thread and helper threads
(csrc/parallel_for.h): helpers that spin ~300 µs after each call before sleeping, since an
idle XLA pool thread wakes too late for calls of 5-60 µs (or tasks on XLA's pool while
those serve another call). The number of threads follows XLA's pool. Rows beyond 8 run
in blocks of 8; a vmapped call whose weight is not batched becomes one call with the batch
folded into the rows (`vmap_method="expand_dims"`), a batched weight loops inside the kernel.

Tables (axis 1: a tied LM head, `QuantizedWeight.attend`) have their own kernel,
`native_attend`: y[m, v] = Σ_d x[m, d]·t[v, d], one dot product per table row with groups
along D (ggml's layout). Codes (V, D) int8/uint8 or (V, ceil(D/2)) packed 4-bit, scales and
zeros (V, G); per tensor (1, 1) is broadcast to (V, 1) here. Each row's codes are contiguous,
so that kernel vectorises along d: it converts 8 codes of R table rows to float32 (exact
integers) and FMAs them against x[m, d:d+8] (4-bit: the low / high nibbles against the even
/ odd entries of x, split once per call), scaling each group's sum once (+ m·Σ x for a float
offset), one horizontal sum per row; table rows are split over the same threads like the
kernel's columns.

`native_matmul` returns None where the kernel does not apply (`supports`): tables (axis 1,
see `native_attend`), W8A8 (act_bits), other widths (2, 3, 5, 6, 7 bits), odd 4-bit group
sizes, more than `MAX_ROWS` rows, inputs other than float32 / bfloat16 (bfloat16 is widened
to float32 exactly; the result is float32), weights other than float32 (materialize() would
round the weight to that dtype; the kernel does not), a default backend other than CPU, or
the extension missing; `native_attend` likewise for tables.
Both calls differentiate as the pure-JAX product does (a custom JVP; the kernels
themselves have no derivative) and know nothing of meshes: arrays sharded
over several devices are not its use.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import native_extension
from jaxopt_llm.weights.base import WeightLeaf

# Rows (tokens) up to which `native_matmul` runs the kernel; more go through XLA.
MAX_ROWS = 8

# The kernel a call runs: the best this CPU supports, the portable one, AVX2 or AVX-512 (an
# error where the CPU lacks it).
VARIANTS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}

_TARGET = "jaxopt_llm_weight_gemv"
_TARGET_ZERO = "jaxopt_llm_weight_gemv_zero"
_TABLE_TARGET = "jaxopt_llm_table_gemv"
_TABLE_TARGET_ZERO = "jaxopt_llm_table_gemv_zero"
_SCALE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
# Activations the quantized kernels take: bfloat16 (--compute bfloat16) is widened to float32,
# exactly, on the way in; decode-sized inputs make that a few KB.
_ACTIVATIONS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# The extension, loaded and registered once for every native kernel of the package.
_load = native_extension.load


@functools.cache
def native_status() -> tuple[bool, str]:
    """Whether the native kernels run here, and a one-line description or reason.

    The first call loads the extension, registers its FFI targets and runs one tiny
    matmul against a kernel and one against a table (the tied-head kernel), checked with
    numpy, so "available" means a call really went through; the result is cached.

    Returns:
        (available, description): e.g. (True, "avx2 kernel, 2 threads (as XLA's CPU pool)") or
        (False, "extension not built: No module named 'jaxopt_llm._native_gemv'").

    Example:
        >>> available, description = native_status()
        >>> isinstance(available, bool) and isinstance(description, str)
        True
    """
    module, reason = _load()
    if module is None:
        return False, reason
    if jax.default_backend() != "cpu":
        return False, f"default backend is {jax.default_backend()}, the kernels are CPU-only"
    try:  # int8 codes with per-channel scales, checked against numpy; eagerly, even when
        # the first call comes while a model is being traced (jit stages every op otherwise)
        codes = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
        scale = np.array([[0.5, 1.0, 2.0, 0.25]], np.float32)
        x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
        call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((1, 4), jnp.float32),
                                vmap_method="expand_dims")
        with jax.ensure_compile_time_eval():
            got = np.asarray(call(jnp.asarray(x), jnp.asarray(codes), jnp.asarray(scale),
                                  bits=np.int64(8), group_size=np.int64(4),
                                  variant=np.int64(0), tasks=np.int64(0)))
        want = x @ (codes.astype(np.float32) * scale)
        if not np.allclose(got, want, rtol=1e-6, atol=1e-6):
            return False, f"self-check failed: {got.tolist()} != {want.tolist()}"
        # the same codes as a (V=4, D=4) table with one scale per row: x @ (codes·s)ᵀ
        row_scale = scale.reshape(4, 1)
        call = jax.ffi.ffi_call(_TABLE_TARGET, jax.ShapeDtypeStruct((1, 4), jnp.float32),
                                vmap_method="expand_dims")
        with jax.ensure_compile_time_eval():
            got = np.asarray(call(jnp.asarray(x), jnp.asarray(codes), jnp.asarray(row_scale),
                                  bits=np.int64(8), group_size=np.int64(4),
                                  variant=np.int64(0), tasks=np.int64(0)))
        want = x @ (codes.astype(np.float32) * row_scale).T
        if not np.allclose(got, want, rtol=1e-6, atol=1e-6):
            return False, f"table self-check failed: {got.tolist()} != {want.tolist()}"
    except Exception as error:  # noqa: BLE001 - a failed call means "not available"
        return False, f"self-check call failed: {type(error).__name__}: {error}"
    threads = module.pool_threads()
    return True, f"{module.best_variant()} kernel, {threads} threads (as XLA's CPU pool)"


# JAXOPT_LLM_NATIVE=off (or 0, no, false) keeps every matmul on the pure-JAX path.
ENV = "JAXOPT_LLM_NATIVE"


def path_in_use() -> tuple[bool, str]:
    """Whether `QuantizedWeight.linear` and `dispatch.linear` call the kernels here, and why.

    Returns:
        (enabled, description): `native_status()`, unless JAXOPT_LLM_NATIVE turns the
        kernels off, e.g. (False, "off (JAXOPT_LLM_NATIVE=off): pure-JAX dequantize +
        matmul").

    Example:
        >>> enabled, why = path_in_use()
        >>> isinstance(enabled, bool) and isinstance(why, str)
        True
    """
    if native_extension.in_sharded_program():
        return False, ("off while tracing a program sharded over several devices (the "
                       "kernels have no partitioning rule): pure-JAX dequantize + matmul")
    return _path_from_environment()


@functools.cache
def _path_from_environment() -> tuple[bool, str]:  # cache_clear() after changing ENV
    setting = native_extension.disabled()
    if setting is not None:
        return False, f"off ({ENV}={setting}): pure-JAX dequantize + matmul"
    available, description = native_status()
    if not available:
        return False, f"{description}: pure-JAX dequantize + matmul"
    return True, (f"native {description} for ≤ {MAX_ROWS} rows (quantized, float32, "
                  "bfloat16 and N:M sparse kernels); XLA above")


path_in_use.cache_clear = _path_from_environment.cache_clear  # type: ignore[attr-defined]


def supports(w: object, rows: int) -> bool:
    """Whether `native_matmul` (a kernel) or `native_attend` (a table) runs natively.

    Only the weight's static properties and the default backend are looked at, so this
    works on traced weights too; the extension itself is checked by `native_status`.

    Args:
        w: a weight leaf (anything else is not supported).
        rows: rows (tokens) of the input, M of x (M, K).

    Returns:
        True for weight-only 4-bit (even group sizes) and 8-bit kernels (axis 0) and
        tables (axis 1) in float32 with float32/float16/bfloat16 scales,
        1 ≤ rows ≤ `MAX_ROWS`, on a CPU default backend.

    Example:
        >>> from jaxopt_llm.weights import QuantSpec, quantize_weight
        >>> w4 = quantize_weight(jnp.ones((64, 8)), QuantSpec(bits=4, granularity="group",
        ...                                                   group_size=32))
        >>> supports(w4, 1), supports(w4, 64)
        (True, False)
        >>> supports(quantize_weight(jnp.ones((64, 8)), QuantSpec(bits=3)), 1)
        False
    """
    if type(w).__name__ != "QuantizedWeight" or not 1 <= rows <= MAX_ROWS:
        return False  # (by name: quantized.py imports this module, not the reverse)
    if w.axis not in (0, 1) or w.act_bits is not None or w.act_group is not None:
        return False
    if w.bits not in (4, 8) or w.dtype != "float32":
        return False
    if w.bits == 8 and (w.symmetric != (w.zero_point is None)):
        return False
    k = w.shape2d[w.axis]  # the contraction length: K of a kernel, D of a table
    if w.bits == 4 and w.granularity == "group" and w.group_size % 2 and w.group_size < k:
        return False
    if jnp.dtype(w.scale.dtype) not in _SCALE_DTYPES:
        return False
    if w.zero == "float" and jnp.dtype(w.zero_point.dtype) not in _SCALE_DTYPES:
        return False
    return jax.default_backend() == "cpu"


def _kernel_float(values: jax.Array, columns: int) -> jax.Array:
    """Scales / float offsets as the kernel reads them: float32 or float16, (G, N)."""
    if values.dtype == jnp.bfloat16:
        values = values.astype(jnp.float32)
    if values.shape[-1] != columns:  # per tensor: (1, 1) → (1, N)
        values = jnp.broadcast_to(values, (values.shape[0], columns))
    return values


def _table_per_row(values: jax.Array, rows: int) -> jax.Array:
    """A table's scales / zeros as the table kernel reads them: (V, G); (1, 1) → (V, 1)."""
    if values.dtype == jnp.bfloat16:
        values = values.astype(jnp.float32)
    if values.shape[0] != rows:
        values = jnp.broadcast_to(values, (rows, values.shape[1]))
    return values


def native_matmul(x2: jax.Array, w: Any, *, variant: str = "auto",
                  tasks: int = 0) -> jax.Array | None:
    """x2 (M, K) float32 @ the dequantized weight, by the native kernel; None if not handled.

    Equal to `x2 @ w.materialize().reshape(w.shape2d)` up to float32 rounding (the order
    of the sums differs), without materializing the weight. Works under `jit` and `vmap`.

    Args:
        x2: float32 or bfloat16 activations (M, K), M ≤ `MAX_ROWS` (bfloat16 is widened:
            the kernel multiplies float32, exactly the widened values).
        w: a weight-only `QuantizedWeight` of a kernel (axis 0) with `w.shape2d[0] == K`.
        variant: "auto" (the best kernel for this CPU), "scalar", "avx2" or "avx512"
            (`VARIANTS`; tables run their AVX2 code under "avx512").
        tasks: column chunks to split the work into (0: by size and XLA's pool threads).

    Returns:
        The float32 (M, N) product, or None when `supports(w, M)` is false, x2 is not a
        float32 / bfloat16 (M, K) matrix, or the extension is not available.

    Raises:
        ValueError: for an unknown `variant`.

    Example:
        >>> from jaxopt_llm.weights import QuantSpec, quantize_weight
        >>> w = quantize_weight(jnp.array([[7.0, -14.0], [-3.0, 2.0]]), QuantSpec(bits=4))
        >>> native_matmul(jnp.array([[1.0, 1.0]]), w).tolist()  # doctest: +SKIP
        [[4.0, -12.0]]
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if x2.ndim != 2 or jnp.dtype(x2.dtype) not in _ACTIVATIONS:
        return None
    if not supports(w, x2.shape[0]) or w.axis != 0:
        return None
    k, n = w.shape2d
    if x2.shape[1] != k or _load()[0] is None:
        return None
    return _differentiable_call(x2.astype(jnp.float32), w, variant, tasks)


def native_attend(x2: jax.Array, table: Any, *, variant: str = "auto",
                  tasks: int = 0) -> jax.Array | None:
    """x2 (M, D) float32 against a quantized (V, D) table → logits (M, V); None if not handled.

    The tied LM head: equal to `x2 @ table.materialize().T` up to float32 rounding, one
    dot product per table row along D (groups along D), without materializing the table.
    Works under `jit` and `vmap`; its derivative is the pure-JAX product's.

    Args:
        x2: float32 or bfloat16 hidden states (M, D), M ≤ `MAX_ROWS` (bfloat16 widened).
        table: a weight-only `QuantizedWeight` of a table (axis 1) with `table.shape[1] == D`.
        variant: "auto" (the best kernel for this CPU), "scalar", "avx2" or "avx512"
            (`VARIANTS`; tables run their AVX2 code under "avx512").
        tasks: chunks of table rows to split the work into (0: by size and XLA's pool).

    Returns:
        The float32 (M, V) logits, or None when `supports(table, M)` is false, the table
        is a kernel (axis 0), x2 is not a float32 / bfloat16 (M, D) matrix, or the extension
        is not available.

    Raises:
        ValueError: for an unknown `variant`.

    Example:
        >>> from jaxopt_llm.weights import QuantSpec, quantize_weight
        >>> t = quantize_weight(jnp.array([[1.0, -2.0, 7.0], [0.5, -3.5, 1.0]]),
        ...                     QuantSpec(bits=4), axis=1)
        >>> native_attend(jnp.array([[0.0, 0.0, 1.0]]), t).tolist()  # doctest: +SKIP
        [[7.0, 1.0]]
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if x2.ndim != 2 or jnp.dtype(x2.dtype) not in _ACTIVATIONS:
        return None
    if not supports(table, x2.shape[0]):
        return None
    if table.axis != 1 or x2.shape[1] != table.shape[1] or _load()[0] is None:
        return None
    return _differentiable_call(x2.astype(jnp.float32), table, variant, tasks)


_DENSE_BITS = {jnp.dtype(jnp.float32): 32, jnp.dtype(jnp.bfloat16): 16}


def supports_dense(w: object, rows: int) -> bool:
    """Whether `native_dense_matmul` runs a plain float kernel natively.

    Args:
        w: a weight (only a 2-D float32 or bfloat16 array is supported).
        rows: rows (tokens) of the input, M of x (M, K).

    Returns:
        True for a (K, N) float32 / bfloat16 array, 1 ≤ rows ≤ `MAX_ROWS`, on a CPU
        default backend.

    Example:
        >>> supports_dense(jnp.ones((64, 8)), 1), supports_dense(jnp.ones((64, 8)), 64)
        (True, False)
    """
    if isinstance(w, WeightLeaf) or not hasattr(w, "dtype") or getattr(w, "ndim", 0) != 2:
        return False
    if jnp.dtype(w.dtype) not in _DENSE_BITS or not 1 <= rows <= MAX_ROWS:
        return False
    return jax.default_backend() == "cpu"


def native_dense_matmul(x2: jax.Array, w: jax.Array, *, variant: str = "auto",
                        tasks: int = 0) -> jax.Array | None:
    """x2 (M, K) @ a float32 or bfloat16 weight (K, N) by the native kernel; None if not handled.

    The same streaming panels as the quantized kernels with the weight read as stored (a
    bfloat16 weight at half the bytes, widened exactly in registers), products and sums in
    float32: XLA's CPU GEMV read SmolLM2's float32 projections at ~16 GB/s, these ~25 GB/s.
    Equal to `x2.astype(float32) @ w.astype(float32)` up to float32 rounding (the order of
    the sums differs); the result is in x2's dtype. Works under `jit` and `vmap`; its
    derivative is the pure-JAX product's.

    Args:
        x2: float32 or bfloat16 activations (M, K), M ≤ `MAX_ROWS`.
        w: the kernel (K, N), float32 or bfloat16.
        variant: "auto" (the best kernel for this CPU), "scalar", "avx2" or "avx512"
            (`VARIANTS`).
        tasks: column chunks to split the work into (0: by size and XLA's pool threads).

    Returns:
        The (M, N) product in x2's dtype, or None when `supports_dense(w, M)` is false, x2
        is not a float32 / bfloat16 (M, K) matrix, or the extension is not available.

    Raises:
        ValueError: for an unknown `variant`.

    Example:
        >>> w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
        >>> native_dense_matmul(jnp.ones((1, 2)), w).tolist()  # doctest: +SKIP
        [[4.0, 6.0]]
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if x2.ndim != 2 or jnp.dtype(x2.dtype) not in _DENSE_BITS or not supports_dense(w, x2.shape[0]):
        return None
    if x2.shape[1] != w.shape[0] or _load()[0] is None:
        return None
    return _dense_call(x2.astype(jnp.float32), w, variant, tasks).astype(x2.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _dense_call(x2: jax.Array, w: jax.Array, variant: str, tasks: int) -> jax.Array:
    """The dense kernel call; its derivative is the pure-JAX product's."""
    k, n = w.shape
    attrs = dict(bits=np.int64(_DENSE_BITS[jnp.dtype(w.dtype)]), group_size=np.int64(k),
                 variant=np.int64(VARIANTS[variant]), tasks=np.int64(tasks))
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                            vmap_method="expand_dims")
    return call(x2, w, jnp.ones((1, n), jnp.float32), **attrs)


@_dense_call.defjvp
def _dense_jvp(variant, tasks, primals, tangents):
    _, tangent = jax.jvp(lambda x2, w: x2 @ w.astype(jnp.float32), primals, tangents)
    return _dense_call(*primals, variant, tasks), tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _differentiable_call(x2: jax.Array, w: Any, variant: str, tasks: int) -> jax.Array:
    """The kernel call; its derivative is the pure-JAX product's (the kernel has none)."""
    return _call(x2, w, variant, tasks)


@_differentiable_call.defjvp
def _jvp(variant, tasks, primals, tangents):
    def pure(x2, w):
        dense = w.materialize().reshape(w.shape2d).astype(jnp.float32)
        return x2 @ (dense if w.axis == 0 else dense.T)

    _, tangent = jax.jvp(pure, primals, tangents)
    return _call(*primals, variant, tasks), tangent


def _call(x2: jax.Array, w: Any, variant: str, tasks: int) -> jax.Array:
    if w.axis == 1:
        return _table_call(x2, w, variant, tasks)
    k, n = w.shape2d
    group = w.group_size if w.granularity == "group" else k
    attrs = dict(bits=np.int64(w.bits), group_size=np.int64(min(group, k)),
                 variant=np.int64(VARIANTS[variant]), tasks=np.int64(tasks))
    out = jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32)
    codes = w.qvalue.reshape(-1, n)
    scale = _kernel_float(w.scale, n)
    if w.zero_point is None:
        call = jax.ffi.ffi_call(_TARGET, out, vmap_method="expand_dims")
        return call(x2, codes, scale, **attrs)
    if w.zero == "float":
        zero, kind = _kernel_float(w.zero_point, n), 2
    else:
        zero, kind = w.zero_point, 1
        if zero.shape[-1] != n:
            zero = jnp.broadcast_to(zero, (zero.shape[0], n))
    call = jax.ffi.ffi_call(_TARGET_ZERO, out, vmap_method="expand_dims")
    return call(x2, codes, scale, zero, zero_kind=np.int64(kind), **attrs)


def _table_call(x2: jax.Array, table: Any, variant: str, tasks: int) -> jax.Array:
    v, d = table.shape2d
    group = table.group_size if table.granularity == "group" else d
    attrs = dict(bits=np.int64(table.bits), group_size=np.int64(min(group, d)),
                 variant=np.int64(VARIANTS[variant]), tasks=np.int64(tasks))
    out = jax.ShapeDtypeStruct((x2.shape[0], v), jnp.float32)
    scale = _table_per_row(table.scale, v)
    if table.zero_point is None:
        call = jax.ffi.ffi_call(_TABLE_TARGET, out, vmap_method="expand_dims")
        return call(x2, table.qvalue, scale, **attrs)
    kind = 2 if table.zero == "float" else 1
    zero = _table_per_row(table.zero_point, v)
    call = jax.ffi.ffi_call(_TABLE_TARGET_ZERO, out, vmap_method="expand_dims")
    return call(x2, table.qvalue, scale, zero, zero_kind=np.int64(kind), **attrs)
