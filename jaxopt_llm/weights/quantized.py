"""Real integer weights: `QuantizedWeight`, weight-only and W8A8 execution.

Storage: codes packed along the contraction axis (jaxopt_llm.weights.packing), except
symmetric 8-bit codes which are plain int8 (the W8A8 path contracts them directly).
Symmetric narrower codes are stored offset by 2^(b-1) so they are unsigned.
Scales keep the weight's rank so one PartitionSpec shards codes and scales alike:
a kernel (K, N) has scales (G, N); an embedding table (V, D), quantized along D, has
scales (V, G); per-tensor scales are (1, 1). The zero has the scales' shape: a uint8
zero point (w = (u - z)·d), or with zero="float" a float offset in the scales' dtype
(w = u·d + m, llama.cpp's Q4_1/Q5_1).

Execution:
- weight-only: dequantize, then one float32 matmul; with compute="auto" (default) inputs
  of ≥ 128 rows (prefill, evaluation) instead run a bfloat16 matmul with float32
  accumulation, which XLA's CPU backend runs ~1.8× faster than float32;
- `act_bits=8` (W8A8, "SmoothQuant", Xiao et al., 2023, and LLM.int8()'s per-token
  activation scales): activations are quantized per token (dynamic absmax) to int8,
  `lax.dot_general` contracts int8 × int8 into int32 (per group when grouped), and
  the product is rescaled by activation and weight scales (integer zeros only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxopt_llm.weights import packing
from jaxopt_llm.weights.base import WeightLeaf
from jaxopt_llm.weights.quant_math import (
    QuantSpec,
    dequantize_codes,
    group_range,
    grouped,
    quantize_codes,
    scale_and_zero,
    ungrouped,
)


@struct.dataclass
class QuantizedWeight(WeightLeaf):
    """Integer codes + scales (+ zero points) of a weight of logical shape `shape`.

    axis 0: a kernel (K, ...) contracted along K (trailing dims flattened to N);
    axis 1: an embedding table (V, D) contracted along D (a tied head).
    """

    qvalue: jax.Array  # packed uint8 codes, or int8 codes for symmetric 8-bit
    scale: jax.Array  # (G, N) for axis 0, (V, G) for axis 1; (1, 1) per tensor
    # Same shape as scale: uint8 zero point, or the float offset (scale dtype) when
    # zero == "float"; None when symmetric.
    zero_point: jax.Array | None
    bits: int = struct.field(pytree_node=False)
    symmetric: bool = struct.field(pytree_node=False)
    granularity: str = struct.field(pytree_node=False)
    group_size: int | None = struct.field(pytree_node=False)
    partial_groups: bool = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False, default="float32")
    act_bits: int | None = struct.field(pytree_node=False, default=None)
    compute: str = struct.field(pytree_node=False, default="auto")  # or "float32"
    zero: str = struct.field(pytree_node=False, default="integer")  # or "float" (offset)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, symmetric=self.symmetric,
                         granularity=self.granularity, group_size=self.group_size,
                         partial_groups=self.partial_groups, zero=self.zero)

    @property
    def shape2d(self) -> tuple[int, int]:
        if self.axis == 0:
            return self.shape[0], math.prod(self.shape[1:])
        return self.shape[0], self.shape[1]

    @property
    def stored_as_int8(self) -> bool:
        return self.bits == 8 and self.symmetric

    def codes(self) -> jax.Array:
        """Signed integer codes (K, N) canonical layout (axis 0 is the contraction axis), int32."""
        k_axis_len = self.shape2d[self.axis]
        codes = packing.unpack(self.qvalue, self.bits, k_axis_len, axis=self.axis)
        codes = codes.astype(jnp.int32)
        if self.symmetric and not self.stored_as_int8:
            codes = codes - (1 << (self.bits - 1))
        return codes if self.axis == 0 else codes.T

    def _canonical_scale_zero(self) -> tuple[jax.Array, jax.Array | None]:
        scale, zero = self.scale, self.zero_point
        if self.axis == 1:
            scale = scale.T
            zero = None if zero is None else zero.T
        return scale[:, None, :], (None if zero is None else zero[:, None, :])  # (G, 1, N)

    def materialize(self) -> jax.Array:
        """Dequantized float weight of shape `shape`."""
        scale, zero = self._canonical_scale_zero()
        codes = grouped(self.codes(), self.spec)
        values = ungrouped(dequantize_codes(codes, scale, zero), self.codes_shape_canonical[0])
        if self.axis == 1:
            values = values.T
        return values.reshape(self.shape).astype(self.dtype)

    @property
    def codes_shape_canonical(self) -> tuple[int, int]:
        k, n = self.shape2d
        return (k, n) if self.axis == 0 else (n, k)

    def linear(self, x: jax.Array) -> jax.Array:
        return _linear(x, self)

    def embed(self, ids: jax.Array) -> jax.Array:
        return _embed(self, ids)

    def attend(self, x: jax.Array) -> jax.Array:
        if self.axis != 1:
            raise ValueError("a tied head needs a table quantized along its rows (axis=1)")
        return jnp.einsum("...d,vd->...v", x, self.materialize().astype(x.dtype))

    def viewed_as(self, shape: tuple[int, ...]) -> QuantizedWeight:
        """Codes are stored as the 2-D view (K, prod(rest)) already: only the shape changes."""
        if self.axis != 0 or shape[0] != self.shape[0] or math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot view a QuantizedWeight of shape {self.shape} as {shape}")
        return self.replace(shape=tuple(shape))

    def add_dense(self, delta: jax.Array) -> QuantizedWeight:
        """Re-quantized with its own settings (the grid cannot hold the delta exactly)."""
        return quantize_weight(self.materialize() + delta, self.spec, axis=self.axis,
                               act_bits=self.act_bits, compute=self.compute,
                               scale_dtype=jnp.dtype(self.scale.dtype).name)


def quantize_weight(
    w: jax.Array,
    spec: QuantSpec,
    *,
    axis: int = 0,
    method: str | None = None,
    act_bits: int | None = None,
    scale_dtype: str | None = None,
    percentile: float = 99.9,
    mse_grid: int = 100,
    mse_max_shrink: float = 0.8,
    mse_norm: float = 2.0,
    compute: str = "auto",
    clip_ratio: float = 1.0,
    name: str = "weight",
) -> QuantizedWeight:
    """Round-to-nearest quantization of a kernel (axis=0) or an embedding table (axis=1).

    `method` (range calibration) defaults to absmax when symmetric, min-max otherwise.
    `scale_dtype` defaults to float16 for group scales (as GPTQ/llama.cpp store them) and
    float32 otherwise; codes are computed against the stored (rounded) scale.
    """
    w = jnp.asarray(w)
    if w.ndim < 2 or (axis == 1 and w.ndim != 2):
        raise ValueError(f"{name}: expected a 2-D (or higher, for kernels) weight, got {w.shape}")
    if axis not in (0, 1):
        raise ValueError(f"{name}: axis must be 0 (kernel) or 1 (embedding table), got {axis}")
    if act_bits not in (None, 8):
        raise ValueError(f"{name}: act_bits must be 8 (W8A8) or None (weight-only), got {act_bits}")
    if act_bits and spec.bits == 8 and not spec.symmetric:
        raise ValueError(
            f"{name}: asymmetric 8-bit weights do not fit int8 for W8A8; use symmetric: true"
        )
    if act_bits and spec.float_zero:
        raise ValueError(f"{name}: W8A8 (act_bits=8) runs integer zero points only; "
                         f"use zero: integer, or act_bits: null with zero: float")
    if method is None:
        method = "absmax" if spec.symmetric else "minmax"
    if scale_dtype is None:
        scale_dtype = "float16" if spec.granularity == "group" else "float32"
    if compute not in ("auto", "float32"):
        raise ValueError(f"{name}: compute must be 'auto' or 'float32', got {compute!r}")
    if scale_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"{name}: scale_dtype must be float32, float16 or bfloat16")
    shape = tuple(int(d) for d in w.shape)
    w2 = w.reshape(shape[0], -1) if axis == 0 else w
    canonical = w2 if axis == 0 else w2.T  # (K, N)
    spec.num_groups(canonical.shape[0], where=f"{name} {shape}")
    wg = grouped(canonical.astype(jnp.float32), spec)
    lo, hi = group_range(wg, spec, method, percentile=percentile, mse_grid=mse_grid,
                         mse_max_shrink=mse_max_shrink, mse_norm=mse_norm)
    if clip_ratio != 1.0:  # a fixed shrink of the range (what FakeQuantWeight trained with)
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"{name}: clip_ratio must be in (0, 1], got {clip_ratio}")
        lo, hi = lo * clip_ratio, hi * clip_ratio
    scale, zero = scale_and_zero(lo, hi, spec, jnp.dtype(scale_dtype))
    return assemble_codes(wg, scale, zero, spec, axis=axis, shape=shape,
                     dtype=jnp.dtype(w.dtype).name, act_bits=act_bits, compute=compute)


def quantize_with_scale(w: jax.Array, spec: QuantSpec, scale: jax.Array,
                        zero: jax.Array | None, *, axis: int = 0) -> QuantizedWeight:
    """Round-to-nearest onto a given grid: `scale` (and `zero` when asymmetric: uint8, or
    the float offset when spec.zero is "float") in the grouped view's (G, 1, N) layout,
    e.g. step sizes learned by QAT (LSQ)."""
    w = jnp.asarray(w)
    shape = tuple(int(d) for d in w.shape)
    w2 = w.reshape(shape[0], -1) if axis == 0 else w
    canonical = w2 if axis == 0 else w2.T
    wg = grouped(canonical.astype(jnp.float32), spec)
    if scale.shape != (wg.shape[0], 1, wg.shape[2]):
        raise ValueError(f"scale has shape {scale.shape}, expected "
                         f"{(wg.shape[0], 1, wg.shape[2])} for weight {shape}")
    if (zero is None) != spec.symmetric:
        raise ValueError("a zero point is needed exactly when the grid is asymmetric")
    return assemble_codes(wg, scale.astype(jnp.float32), zero, spec, axis=axis, shape=shape,
                     dtype=jnp.dtype(w.dtype).name, act_bits=None, compute="auto")


def assemble_codes(wg: jax.Array, scale: jax.Array, zero: jax.Array | None, spec: QuantSpec, *,
              axis: int, shape: tuple[int, ...], dtype: str, act_bits: int | None,
              compute: str) -> QuantizedWeight:
    """Codes of the grouped view `wg` on (scale, zero), packed into a QuantizedWeight.

    The one assembly every quantizer (RTN, LSQ's learned grids, GPTQ) goes through, so
    codes, packing and scale layout are the same whichever chose the grid.

    Args:
      wg: the weights to round, canonical grouped view (G, g, N) (see `grouped`).
      scale, zero: the grid in the (G, 1, N) layout (`scale_and_zero`'s output).
      spec: the grid's settings; axis, shape, dtype: the weight's (axis 1: a table).
      act_bits, compute: execution settings stored on the leaf.

    Returns:
      The QuantizedWeight.
    """
    length = shape[0] if axis == 0 else shape[1]
    codes = ungrouped(quantize_codes(wg, scale, zero, spec), length)
    scale2, zero2 = scale[:, 0, :], (None if zero is None else zero[:, 0, :])
    if axis == 1:
        codes, scale2 = codes.T, scale2.T
        zero2 = None if zero2 is None else zero2.T
    if spec.bits == 8 and spec.symmetric:
        qvalue = codes.astype(jnp.int8)
    else:
        unsigned = codes + (1 << (spec.bits - 1)) if spec.symmetric else codes
        qvalue = packing.pack(unsigned, spec.bits, axis=axis)
    return QuantizedWeight(
        qvalue=qvalue, scale=scale2, zero_point=zero2, bits=spec.bits,
        symmetric=spec.symmetric, granularity=spec.granularity, group_size=spec.group_size,
        partial_groups=spec.partial_groups, axis=axis, shape=shape,
        dtype=dtype, act_bits=act_bits, compute=compute, zero=spec.zero,
    )


def quantize_activations_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic symmetric int8 per token: x (..., K) → (int8 codes, float32 scales (..., 1))."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    scale = jnp.maximum(scale, jnp.finfo(jnp.float32).tiny)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _int8_codes(w: QuantizedWeight) -> jax.Array:
    """Centered int8 codes in the grouped view (G, g, N)."""
    if w.stored_as_int8 and w.axis == 0:  # already int8 and in place: no conversion pass
        return grouped(w.qvalue.reshape(w.shape2d), w.spec)
    codes = grouped(w.codes(), w.spec)  # int32, signed (symmetric) or unsigned (asymmetric)
    if w.zero_point is not None:
        _, zero = w._canonical_scale_zero()
        codes = codes - zero.astype(jnp.int32)  # |u - z| ≤ 2^b - 1 ≤ 127 for b ≤ 7
    return codes.astype(jnp.int8)


def _int8_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x (..., K) against int8 codes with int32 accumulation; per group when grouped."""
    if w.zero == "float":
        raise ValueError("W8A8 (act_bits=8) runs integer zero points only, not a float offset")
    codes = _int8_codes(w)  # (G, g, N)
    scale, _ = w._canonical_scale_zero()  # (G, 1, N)
    xq, x_scale = quantize_activations_per_token(x)
    lead = x.shape[:-1]
    groups, size, n = codes.shape
    xq = xq.reshape(-1, x.shape[-1])
    if groups == 1:  # per channel / per tensor: one plain 2-D integer matmul
        acc = jax.lax.dot_general(xq, codes[0], (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)  # (M, N)
        y = acc.astype(jnp.float32) * scale[0].astype(jnp.float32)
    else:
        if groups * size > x.shape[-1]:  # partial last group: pad with zeros like the codes
            xq = jnp.pad(xq, ((0, 0), (0, groups * size - x.shape[-1])))
        xq = xq.reshape(-1, groups, size)  # (M, G, g)
        acc = jax.lax.dot_general(
            xq, codes, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32
        )  # (G, M, N)
        y = jnp.sum(acc.astype(jnp.float32) * scale.astype(jnp.float32), axis=0)  # (M, N)
    return (y.reshape(*lead, n) * x_scale).astype(x.dtype)


# Rows (tokens) from which weight-only matmuls run in bfloat16 with float32 accumulation
# under compute="auto": XLA's CPU bf16 GEMM is ~1.8× its f32 GEMM at 512 rows, but bf16
# GEMV is ~10× slower than f32 GEMV, so decode-sized inputs stay float32.
BF16_MIN_ROWS = 128


def _bf16_matmul(x2: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x (M, K) @ weight in bf16 with f32 accumulation.

    Per channel / per tensor the centered codes are exact in bf16 (|code| ≤ 255) and the
    scale is applied to the f32 product, so only x is rounded (a float offset m adds
    (Σ_k x_k)·m, summed from x in float32); with groups the dequantized weight is rounded
    to bf16 (relative error ≤ 2^-9).
    """
    x16 = x2.astype(jnp.bfloat16)
    scale, zero = w._canonical_scale_zero()  # (G, 1, N)
    if scale.shape[0] == 1:
        codes = w.codes()
        offset = w.zero == "float"
        if zero is not None and not offset:
            codes = codes - zero[0].astype(jnp.int32)
        y = jnp.dot(x16, codes.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        y = y * scale[0].astype(jnp.float32)
        if offset:
            row_sums = jnp.sum(x2.astype(jnp.float32), axis=-1, keepdims=True)  # (M, 1)
            y = y + row_sums * zero[0].astype(jnp.float32)
        return y
    weight = w.materialize().reshape(w.shape2d).astype(jnp.bfloat16)
    return jnp.dot(x16, weight, preferred_element_type=jnp.float32)


def _linear(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    if w.axis != 0:
        raise ValueError("a QuantizedWeight of an embedding table (axis=1) is not a kernel")
    out_shape = (*x.shape[:-1], *w.shape[1:])
    if w.act_bits == 8:
        return _int8_matmul(x, w).reshape(out_shape)
    rows = math.prod(x.shape[:-1])
    if w.compute == "auto" and rows >= BF16_MIN_ROWS and x.dtype == jnp.float32:
        y = _bf16_matmul(x.reshape(rows, x.shape[-1]), w)
        return y.astype(x.dtype).reshape(out_shape)
    w2 = w.materialize().reshape(w.shape2d).astype(x.dtype)
    return jnp.matmul(x, w2).reshape(out_shape)


def _embed(table: QuantizedWeight, ids: jax.Array) -> jax.Array:
    if table.axis != 1:
        raise ValueError("embedding lookup needs a table quantized along its rows (axis=1)")
    flat = ids.reshape(-1)

    def take(rows_or_one: jax.Array) -> jax.Array:  # per-tensor scales (1, 1) are shared
        if rows_or_one.shape[0] == 1:
            return rows_or_one
        return jnp.take(rows_or_one, flat, axis=0)

    rows = table.replace(
        qvalue=jnp.take(table.qvalue, flat, axis=0),
        scale=take(table.scale),
        zero_point=None if table.zero_point is None else take(table.zero_point),
        shape=(flat.shape[0], table.shape[1]),
    )
    return rows.materialize().reshape(*ids.shape, table.shape[1])
