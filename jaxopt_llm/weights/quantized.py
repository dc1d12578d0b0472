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
- weight-only at decode sizes (≤ 8 rows, float32, CPU): the native kernel of
  `jaxopt_llm.weights.native` where it is built and handles the form (int8 and 4-bit,
  per channel or grouped, any zero kind), reading the codes without materializing the
  float weight; a table's tied head (`attend`, axis=1) likewise through `native_attend`;
  otherwise, and for more rows:
- weight-only: dequantize, then one float32 matmul (compute="float32", the default: the
  result does not depend on how the model is sharded beyond float32 rounding). With
  compute="bfloat16", inputs of ≥ 128 rows (prefill, evaluation) run a bfloat16 matmul
  with float32 accumulation instead; compute="auto" does so only where bf16 runs
  natively (`hardware.bf16_prefill_pays`: GPU/TPU, or AVX-512 BF16 / AMX CPUs, where
  XLA's bf16 GEMM measured ~1.4-1.8× float32; 0.69× on an AVX2-only host). Rounding
  activations to bf16 makes results move ~1e-3 between mesh layouts: a 1-ulp float32
  difference from a differently ordered reduction flips bf16 roundings;
- `act_bits=8` (W8A8, "SmoothQuant", Xiao et al., 2023, and LLM.int8()'s per-token
  activation scales): activations are quantized per token (dynamic absmax) to int8,
  `lax.dot_general` contracts int8 × int8 into int32 (per group when grouped), and
  the product is rescaled by activation and weight scales (integer zeros only);
- `act_bits=8, act_group=n`: activations are quantized in blocks of n inputs instead, each
  block's absmax/127 stored as float16, and each block's int32 dot product is rescaled
  separately: what llama.cpp's CPU backend computes for Q8_0/Q4_0 (Q8_0 activation
  blocks) and Q4_1 (Q8_1 blocks, whose stored d·Σq pairs with the float offset), n = 32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxopt_llm import hardware
from jaxopt_llm.weights import native, packing
from jaxopt_llm.weights.base import WeightLeaf, as_logits, dense_logits, dense_matmul
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

    Build one with `quantize_weight` (RTN), `quantize_with_scale` (a given grid, e.g.
    LSQ's) or GPTQ; all of them go through `assemble_codes`.

    Example:
        >>> qw = quantize_weight(jnp.array([[7.0, -14.0], [-3.0, 2.0]]), QuantSpec(bits=4))
        >>> qw.qvalue.dtype, qw.scale.tolist(), qw.materialize().tolist()
        (dtype('uint8'), [[1.0, 2.0]], [[7.0, -14.0], [-3.0, 2.0]])
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
    # W8A8 activation rounding: None = one scale per token; n = one float16 scale per
    # block of n inputs (llama.cpp's Q8_0/Q8_1 activation blocks, n = 32)
    act_group: int | None = struct.field(pytree_node=False, default=None)
    compute: str = struct.field(pytree_node=False, default="float32")  # COMPUTE_MODES
    zero: str = struct.field(pytree_node=False, default="integer")  # or "float" (offset)

    @property
    def spec(self) -> QuantSpec:
        """The integer grid as a `QuantSpec` (bits, symmetry, granularity, groups, zero kind).

        Returns:
            A QuantSpec equal to the one the weight was quantized with.

        Example:
            >>> qw = quantize_weight(jnp.ones((4, 2)), QuantSpec(bits=4, granularity="tensor"))
            >>> qw.spec.bits, qw.spec.granularity
            (4, 'tensor')
        """
        return QuantSpec(bits=self.bits, symmetric=self.symmetric,
                         granularity=self.granularity, group_size=self.group_size,
                         partial_groups=self.partial_groups, zero=self.zero)

    @property
    def shape2d(self) -> tuple[int, int]:
        """The logical weight as a matrix: (K, prod(rest)) for a kernel, (V, D) for a table.

        Returns:
            (rows, columns) of the 2-D view the codes are stored in.

        Example:
            >>> quantize_weight(jnp.ones((2, 3, 4)), QuantSpec()).shape2d
            (2, 12)
        """
        if self.axis == 0:
            return self.shape[0], math.prod(self.shape[1:])
        return self.shape[0], self.shape[1]

    @property
    def stored_as_int8(self) -> bool:
        """True for symmetric 8-bit codes, kept as plain int8 rather than packed.

        The W8A8 path contracts such codes directly, with no unpacking pass.

        Returns:
            Whether `qvalue` holds int8 codes (otherwise packed unsigned uint8).

        Example:
            >>> quantize_weight(jnp.ones((2, 2)), QuantSpec(bits=8)).stored_as_int8
            True
            >>> quantize_weight(jnp.ones((2, 2)), QuantSpec(bits=4)).stored_as_int8
            False
        """
        return self.bits == 8 and self.symmetric

    @property
    def is_int8_row_table(self) -> bool:
        """True for a (V, D) table of symmetric int8 codes with one scale per row, weight
        only: what the built-in recipes make of a token table, and what exporters keep.

        Returns:
            Whether this leaf is such a table.

        Example:
            >>> table = quantize_weight(jnp.ones((3, 4)), QuantSpec(bits=8), axis=1)
            >>> table.is_int8_row_table
            True
        """
        return (self.axis == 1 and len(self.shape) == 2 and self.stored_as_int8
                and self.granularity == "channel" and self.act_bits is None)

    def codes(self) -> jax.Array:
        """Signed integer codes (K, N) canonical layout (axis 0 is the contraction axis), int32.

        Unpacked and, for symmetric grids narrower than 8 bits, shifted back from the
        stored unsigned offset; asymmetric codes stay unsigned (u, not u - z).

        Returns:
            int32 codes of shape `codes_shape_canonical`.

        Example:
            >>> qw = quantize_weight(jnp.array([[7.0, -14.0], [-3.0, 2.0]]), QuantSpec(bits=4))
            >>> qw.codes().tolist()
            [[7, -7], [-3, 1]]
        """
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
        """Dequantized float weight of shape `shape`.

        Returns:
            The weight in its original dtype (`dtype`).

        Example:
            >>> qw = quantize_weight(jnp.array([[7.0, -14.0], [-3.0, 2.0]]), QuantSpec(bits=4))
            >>> qw.materialize().tolist()
            [[7.0, -14.0], [-3.0, 2.0]]
        """
        scale, zero = self._canonical_scale_zero()
        codes = grouped(self.codes(), self.spec)
        values = ungrouped(dequantize_codes(codes, scale, zero), self.codes_shape_canonical[0])
        if self.axis == 1:
            values = values.T
        return values.reshape(self.shape).astype(self.dtype)

    @property
    def codes_shape_canonical(self) -> tuple[int, int]:
        """(K, N) of the canonical codes: `shape2d` for a kernel, transposed for a table.

        Returns:
            (contraction length, output count).

        Example:
            >>> table = quantize_weight(jnp.ones((5, 4)), QuantSpec(), axis=1)
            >>> table.shape2d, table.codes_shape_canonical
            ((5, 4), (4, 5))
        """
        k, n = self.shape2d
        return (k, n) if self.axis == 0 else (n, k)

    def linear(self, x: jax.Array) -> jax.Array:
        """x (..., K) @ this kernel → (..., *shape[1:]), weight-only or W8A8.

        Weight-only dequantizes and runs one matmul (bfloat16 with float32 accumulation
        for ≥ `BF16_MIN_ROWS` float32 rows under compute="bfloat16", and under "auto"
        where bf16 runs natively); act_bits=8 quantizes x
        per token and contracts int8 × int8 into int32 (SmoothQuant's W8A8 scheme, Xiao
        et al., 2023).

        Args:
            x: the activations (..., K).

        Returns:
            The projection, in x's dtype.

        Raises:
            ValueError: for a table (axis=1), which is not a kernel.

        Example:
            >>> qw = quantize_weight(jnp.array([[7.0, -14.0], [-3.0, 2.0]]), QuantSpec(bits=4))
            >>> qw.linear(jnp.array([[1.0, 1.0]])).tolist()
            [[4.0, -12.0]]
        """
        return _linear(x, self)

    def embed(self, ids: jax.Array) -> jax.Array:
        """Rows of this table for integer ids; only the looked-up rows are dequantized.

        Args:
            ids: integer token ids of any shape.

        Returns:
            The rows, shape ids.shape + (D,), in the table's dtype; bfloat16 under
            compute="bfloat16" (a model's activations follow its token table).

        Raises:
            ValueError: for a kernel (axis=0).

        Example:
            >>> table = jnp.array([[1.0, -2.0, 7.0], [0.5, -3.5, 1.0]])
            >>> qt = quantize_weight(table, QuantSpec(bits=4), axis=1)
            >>> qt.embed(jnp.array([1])).tolist()
            [[0.5, -3.5, 1.0]]
        """
        rows = _embed(self, ids)
        return rows.astype(jnp.bfloat16) if self.compute == "bfloat16" else rows

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x (..., D) against this (V, D) table → logits (..., V).

        Args:
            x: the hidden states (..., D).

        Returns:
            The logits x · tableᵀ, float32 (also for bfloat16 x).

        Raises:
            ValueError: for a kernel (axis=0).

        Example:
            >>> table = jnp.array([[1.0, -2.0, 7.0], [0.5, -3.5, 1.0]])
            >>> qt = quantize_weight(table, QuantSpec(bits=4), axis=1)
            >>> qt.attend(jnp.array([[0.0, 0.0, 1.0]])).tolist()
            [[7.0, 1.0]]
        """
        if self.axis != 1:
            raise ValueError("a tied head needs a table quantized along its rows (axis=1)")
        if self.act_group is not None:  # llama.cpp's tied head: activation blocks too
            return as_logits(_blockwise_int8_matmul(x, self))
        if native.path_in_use()[0]:  # None: not handled (rows, dtype, form)
            rows = math.prod(x.shape[:-1])
            y = native.native_attend(x.reshape(rows, x.shape[-1]), self)
            if y is not None:
                return y.reshape(*x.shape[:-1], self.shape[0])
        return dense_logits(x, self.materialize())

    def viewed_as(self, shape: tuple[int, ...]) -> QuantizedWeight:
        """Codes are stored as the 2-D view (K, prod(rest)) already: only the shape changes.

        Args:
            shape: the new logical shape; same first dim and size (kernels only).

        Returns:
            The same codes and scales under the new `shape`.

        Raises:
            ValueError: when `shape` changes K or the size, or for a table.

        Example:
            >>> qw = quantize_weight(jnp.ones((2, 6)), QuantSpec())
            >>> qw.viewed_as((2, 2, 3)).materialize().shape
            (2, 2, 3)
        """
        if self.axis != 0 or shape[0] != self.shape[0] or math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot view a QuantizedWeight of shape {self.shape} as {shape}")
        return self.replace(shape=tuple(shape))

    def add_dense(self, delta: jax.Array) -> QuantizedWeight:
        """Re-quantized with its own settings (the grid cannot hold the delta exactly).

        Used to merge a LoRA delta; the range is recalibrated from the sum.

        Args:
            delta: a dense update of the weight's shape.

        Returns:
            A new QuantizedWeight of materialize() + delta, same grid, scale dtype and
            execution settings.

        Example:
            >>> qw = quantize_weight(jnp.array([[7.0, -14.0], [-3.0, 2.0]]), QuantSpec(bits=4))
            >>> qw.add_dense(jnp.array([[0.0, 0.0], [1.0, 0.0]])).materialize().tolist()
            [[7.0, -14.0], [-2.0, 2.0]]
        """
        return quantize_weight(self.materialize() + delta, self.spec, axis=self.axis,
                               act_bits=self.act_bits, act_group=self.act_group,
                               compute=self.compute,
                               scale_dtype=jnp.dtype(self.scale.dtype).name)


def quantize_weight(
    w: jax.Array,
    spec: QuantSpec,
    *,
    axis: int = 0,
    method: str | None = None,
    act_bits: int | None = None,
    act_group: int | None = None,
    scale_dtype: str | None = None,
    percentile: float = 99.9,
    mse_grid: int = 100,
    mse_max_shrink: float = 0.8,
    mse_norm: float = 2.0,
    compute: str = "float32",
    clip_ratio: float = 1.0,
    name: str = "weight",
) -> QuantizedWeight:
    """Round-to-nearest quantization of a kernel (axis=0) or an embedding table (axis=1).

    `method` (range calibration) defaults to absmax when symmetric, min-max otherwise.
    `scale_dtype` defaults to float16 for group scales (as GPTQ/llama.cpp store them) and
    float32 otherwise; codes are computed against the stored (rounded) scale. RTN is the
    baseline of GPTQ (Frantar et al., 2023) and AWQ (Lin et al., 2024); the math is in
    docs/algorithms.md, "RTN".

    Args:
        w: the weight: a kernel (K, ...) (trailing dims flattened to N) or a table (V, D).
        spec: the grid (bits, symmetry, granularity, group size, zero kind).
        axis: 0 for a kernel (contracted along K), 1 for a table (quantized along D).
        method: range calibration, one of `quant_math.RANGE_METHODS`, or None (default).
        act_bits: 8 for W8A8 (dynamic per-token int8 activations), None for weight-only.
        act_group: with act_bits=8, quantize activations in blocks of this many inputs
            (float16 block scales, llama.cpp's Q8_0/Q8_1 activations) instead of per
            token; see `check_activation_grid`.
        scale_dtype: "float32", "float16" or "bfloat16", or None (default).
        percentile: see `group_range`.
        mse_grid: see `group_range`.
        mse_max_shrink: see `group_range`.
        mse_norm: see `group_range`.
        compute: one of `COMPUTE_MODES`: "float32" (default), "bfloat16" (bf16 matmuls
            for ≥ `BF16_MIN_ROWS` rows) or "auto" (bfloat16 where it runs natively).
        clip_ratio: a fixed shrink of the calibrated range in (0, 1] (what a
            `FakeQuantWeight` trained with).
        name: what is quantized, for error messages.

    Returns:
        The QuantizedWeight.

    Raises:
        ValueError: naming the bad argument (shape, axis, act_bits, compute, scale dtype,
            clip ratio, a group size that does not divide K, or a grid W8A8 cannot run).

    Example:
        >>> qw = quantize_weight(jnp.array([[7.0, -14.0], [-3.0, 2.0]]), QuantSpec(bits=4))
        >>> qw.codes().tolist(), qw.scale.tolist()
        ([[7, -7], [-3, 1]], [[1.0, 2.0]])
        >>> w4 = quantize_weight(jnp.ones((256, 8)), QuantSpec(bits=4, granularity="group",
        ...                                                   group_size=128))
        >>> w4.scale.shape, w4.scale.dtype
        ((2, 8), dtype('float16'))
    """
    w = jnp.asarray(w)
    if w.ndim < 2 or (axis == 1 and w.ndim != 2):
        raise ValueError(f"{name}: expected a 2-D (or higher, for kernels) weight, got {w.shape}")
    if axis not in (0, 1):
        raise ValueError(f"{name}: axis must be 0 (kernel) or 1 (embedding table), got {axis}")
    check_activation_grid(spec, act_bits, act_group, w.shape[0] if axis == 0 else w.shape[1],
                          name)
    if method is None:
        method = "absmax" if spec.symmetric else "minmax"
    if scale_dtype is None:
        scale_dtype = "float16" if spec.granularity == "group" else "float32"
    check_compute(compute, name)
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
    qw = assemble_codes(wg, scale, zero, spec, axis=axis, shape=shape,
                        dtype=jnp.dtype(w.dtype).name, act_bits=act_bits, compute=compute)
    return qw if act_group is None else qw.replace(act_group=act_group)


def check_activation_grid(spec: QuantSpec, act_bits: int | None, act_group: int | None,
                          length: int, name: str = "weight") -> None:
    """Raise a ValueError naming `name` unless weights on `spec` can run these activations.

    W8A8 (act_bits=8) contracts int8 × int8, so the weight's codes must fit int8: not
    asymmetric 8-bit. Per-token activations (act_group=None) need integer zero points;
    activation blocks (act_group=n) also run a float offset (≤ 7 bits, the Q4_1 × Q8_1
    case), need n to divide the contraction length `length`, and a group size that is a
    multiple of n (one weight scale per activation block).

    Args:
        spec: the weight's grid.
        act_bits: 8 or None.
        act_group: None, or the activation block size (needs act_bits=8).
        length: the contraction length K (0 to skip the divisibility check).
        name: what is quantized, for the message.

    Example:
        >>> check_activation_grid(QuantSpec(bits=4, granularity="group", group_size=32), 8, 32, 64)
        >>> check_activation_grid(QuantSpec(bits=8), None, 32, 64)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: weight: act_group 32 needs act_bits 8 ...
    """
    if act_bits not in (None, 8):
        raise ValueError(f"{name}: act_bits must be 8 (W8A8) or None (weight-only), got {act_bits}")
    if act_group is not None:
        if isinstance(act_group, bool) or not isinstance(act_group, int) or act_group < 1:
            raise ValueError(f"{name}: act_group must be a positive integer (the activation "
                             f"block size) or None, got {act_group!r}")
        if act_bits != 8:
            raise ValueError(f"{name}: act_group {act_group} needs act_bits 8 (activation "
                             f"blocks are int8), got act_bits {act_bits}")
        if length and length % act_group:
            raise ValueError(f"{name}: act_group {act_group} does not divide the contraction "
                             f"length {length}")
        if spec.granularity == "group" and spec.group_size % act_group:
            raise ValueError(f"{name}: act_group {act_group} must divide the weight's "
                             f"group_size {spec.group_size} (one weight scale per block)")
    if act_bits and spec.bits == 8 and not spec.symmetric:
        raise ValueError(
            f"{name}: asymmetric 8-bit weights do not fit int8 for W8A8; use symmetric: true"
        )
    if act_bits and spec.float_zero and act_group is None:
        raise ValueError(f"{name}: W8A8 (act_bits=8) with per-token activations runs integer "
                         f"zero points only; use zero: integer, act_group: 32 (llama.cpp's "
                         f"Q4_1 × Q8_1), or act_bits: null with zero: float")


def quantize_with_scale(w: jax.Array, spec: QuantSpec, scale: jax.Array,
                        zero: jax.Array | None, *, axis: int = 0) -> QuantizedWeight:
    """Round-to-nearest onto a given grid: `scale` (and `zero` when asymmetric: uint8, or
    the float offset when spec.zero is "float") in the grouped view's (G, 1, N) layout,
    e.g. step sizes learned by QAT (LSQ, Esser et al., "Learned Step Size Quantization",
    ICLR 2020). The scale is stored as float32.

    Args:
        w: the weight: a kernel (K, ...) or, with axis=1, a table (V, D).
        spec: the grid the scale belongs to.
        scale: the step per group, (G, 1, N) in the canonical grouped view.
        zero: the zero per group (same shape) when asymmetric, None when symmetric.
        axis: 0 for a kernel, 1 for a table.

    Returns:
        The QuantizedWeight (weight-only, compute="float32").

    Raises:
        ValueError: when `scale` has the wrong shape, or `zero` does not match the symmetry.

    Example:
        >>> w = jnp.array([[1.0, 4.0], [-2.0, 3.0]])
        >>> qw = quantize_with_scale(w, QuantSpec(bits=4), jnp.full((1, 1, 2), 0.5), None)
        >>> qw.codes().tolist()  # 4 / 0.5 = 8 clamps to qmax = 7
        [[2, 7], [-4, 6]]
    """
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
                     dtype=jnp.dtype(w.dtype).name, act_bits=None, compute="float32")


def assemble_codes(wg: jax.Array, scale: jax.Array, zero: jax.Array | None, spec: QuantSpec, *,
              axis: int, shape: tuple[int, ...], dtype: str, act_bits: int | None,
              compute: str) -> QuantizedWeight:
    """Codes of the grouped view `wg` on (scale, zero), packed into a QuantizedWeight.

    The one assembly every quantizer (RTN, LSQ's learned grids, GPTQ) goes through, so
    codes, packing and scale layout are the same whichever chose the grid.

    Args:
        wg: the weights to round, canonical grouped view (G, g, N) (see `grouped`).
        scale: the step per group, (G, 1, N) (`scale_and_zero`'s layout).
        zero: the zero per group (same shape), None when symmetric.
        spec: the grid's settings.
        axis: 0 for a kernel, 1 for a table (codes and scales are then transposed).
        shape: the weight's logical shape.
        dtype: the weight's dtype name, restored by `materialize`.
        act_bits: 8 for W8A8, None for weight-only (stored on the leaf).
        compute: one of `COMPUTE_MODES` (stored on the leaf).

    Returns:
        The QuantizedWeight.

    Example:
        >>> spec = QuantSpec(bits=4)
        >>> wg = grouped(jnp.array([[3.0], [-1.0]]), spec)
        >>> qw = assemble_codes(wg, jnp.ones((1, 1, 1)), None, spec, axis=0, shape=(2, 1),
        ...                     dtype="float32", act_bits=None, compute="float32")
        >>> qw.codes().tolist()
        [[3], [-1]]
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
    """Dynamic symmetric int8 per token: x (..., K) → (int8 codes, float32 scales (..., 1)).

    Each token's scale is max|x| / 127 (LLM.int8()'s per-token activation scales, as
    SmoothQuant's W8A8 uses them); codes stay in [-127, 127], so negating one never
    overflows int8.

    Args:
        x: the activations (..., K), any float dtype.

    Returns:
        (codes, scale): int8 codes (..., K) and float32 scales (..., 1), never 0.

    Example:
        >>> codes, scale = quantize_activations_per_token(jnp.array([[254.0, -126.0, 4.0]]))
        >>> codes.tolist(), scale.tolist()
        ([[127, -63, 2]], [[2.0]])
    """
    x = x.astype(jnp.float32)
    absmax = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True),
                         jnp.finfo(jnp.float32).tiny * 127.0)
    # Codes from x times one per-token reciprocal, an explicit multiply: XLA may compile a
    # division by a broadcast scale as a multiply by its reciprocal in one program and not
    # in another, and a last-ulp difference at a .5 tie flips a code (sharded and
    # single-device runs then differ by ~1e-3).
    inverse = 127.0 / absmax
    return jnp.clip(jnp.round(x * inverse), -127, 127).astype(jnp.int8), absmax / 127.0


def quantize_absmax_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 along the last axis: x (..., n) → (codes (..., n), scales (..., 1)).

    Scale max|x|/127 (float32, 0 for an all-zero vector), codes round(x · 127/max|x|)
    (ties to even) in [-127, 127]: the rounding of llama.cpp's Q8_0 activation blocks and
    of the int8 KV cache's per-token, per-head vectors.

    Args:
        x: the values (..., n).

    Returns:
        (codes, scale).

    Example:
        >>> codes, scale = quantize_absmax_int8(jnp.array([[254.0, -127.0, 1.0], [0, 0, 0]]))
        >>> codes.tolist(), scale.tolist()
        ([[127, -64, 0], [0, 0, 0]], [[2.0], [0.0]])
    """
    x32 = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    inverse = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    codes = jnp.clip(jnp.round(x32 * inverse), -127, 127).astype(jnp.int8)
    return codes, absmax / 127.0


def quantize_activations_blockwise(x: jax.Array, block: int
                                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dynamic symmetric int8 per block of `block` inputs, as llama.cpp's Q8_0/Q8_1 rows.

    Each block's codes are round(x · 127/absmax) (ties to even), its scale absmax/127
    rounded to float16 (as a Q8_0 block stores it), and its sum the float16 rounding of
    (absmax/127)·Σcodes (what a Q8_1 block stores, paired with Q4_1's float offset).

    Args:
        x: the activations (..., K), K a multiple of `block`.
        block: the block length (32 for llama.cpp).

    Returns:
        (codes, scale, block_sum): int8 codes (..., K/block, block); float32 scales and
        sums (..., K/block, 1). An all-zero block has scale 0 and codes 0.

    Example:
        >>> codes, scale, total = quantize_activations_blockwise(
        ...     jnp.array([[254.0, -127.0, 0.0, 0.5]]), 2)
        >>> codes.tolist(), scale[..., 0].tolist(), total[..., 0].tolist()
        ([[[127, -64], [0, 127]]], [[2.0, 0.003936767578125]], [[126.0, 0.5]])
    """
    x = x.astype(jnp.float32)
    codes, scale = quantize_absmax_int8(x.reshape(*x.shape[:-1], x.shape[-1] // block, block))
    block_sum = scale * jnp.sum(codes.astype(jnp.int32), axis=-1, keepdims=True).astype(
        jnp.float32)
    to_half = lambda v: v.astype(jnp.float16).astype(jnp.float32)  # noqa: E731
    return codes, to_half(scale), to_half(block_sum)


def _blockwise_int8_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x (..., K) in int8 blocks of `act_group` against the codes: llama.cpp's numerics.

    y[m, n] = Σ_b d_x[m, b]·d_w[b, n]·(q_x[m, b] · q_w[b, n]) (+ m_w[b, n]·s_x[m, b] for a
    float offset), evaluated as one float32 product of the dequantized blocks.
    """
    block = w.act_group
    k, n = w.codes_shape_canonical
    blocks = k // block
    # int8 codes (K, N): centered (u - z) for integer zero points, u for a float offset
    codes = w.codes() if w.zero == "float" else ungrouped(_int8_codes(w), k)
    codes = codes.astype(jnp.int8).reshape(blocks, block, n)
    scale, zero = w._canonical_scale_zero()  # (G, 1, N)
    # the weight group of each activation block (a group is a whole number of blocks)
    group_of_block = [b * block // w.group_size if scale.shape[0] > 1 else 0
                      for b in range(blocks)]
    w_scale = jnp.take(scale.astype(jnp.float32), jnp.asarray(group_of_block), axis=0)
    lead = x.shape[:-1]
    xq, x_scale, x_sum = quantize_activations_blockwise(x.reshape(-1, k), block)  # (M, B, ·)
    # Σ_b d_x·d_w·(q_x · q_w) as one float GEMM of the dequantized values: d·q is exact
    # in float32 for float16 scales (the activations' always, GGUF blocks' too) times
    # codes of ≤ 8 bits, so only the order of the float additions differs from a
    # per-block int32 dot, as llama.cpp's own kernels differ among themselves. A batched
    # per-block dot would materialize (blocks, M, N): 1.8 GB for a 512-token window
    # against a 49k-row tied head.
    x_hat = (xq.astype(jnp.float32) * x_scale).reshape(-1, k)
    w_hat = (codes.astype(jnp.float32) * w_scale).reshape(k, n)
    y = jnp.dot(x_hat, w_hat, precision=jax.lax.Precision.HIGHEST)
    if w.zero == "float":
        offset = jnp.take(zero.astype(jnp.float32), jnp.asarray(group_of_block), axis=0)
        y = y + jnp.dot(x_sum[..., 0], offset.reshape(blocks, n),
                        precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*lead, n).astype(x.dtype)


def _kernel_codes(w: QuantizedWeight) -> jax.Array:
    """Codes (K, N) of a kernel: the stored int8 array itself for symmetric 8-bit (no
    conversion pass; XLA on GPU materializes an int8 -> int32 -> float chain), else
    `codes()` (int32, signed for symmetric, unsigned for asymmetric grids)."""
    if w.stored_as_int8 and w.axis == 0:
        return w.qvalue.reshape(w.shape2d)
    return w.codes()


def _int8_codes(w: QuantizedWeight) -> jax.Array:
    """Centered int8 codes in the grouped view (G, g, N)."""
    codes = grouped(_kernel_codes(w), w.spec)
    if w.zero_point is not None:
        _, zero = w._canonical_scale_zero()
        codes = codes - zero.astype(jnp.int32)  # |u - z| ≤ 2^b - 1 ≤ 127 for b ≤ 7
    return codes.astype(jnp.int8)


def _int8_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x (..., K) against int8 codes with int32 accumulation; per group when grouped."""
    if w.act_group is not None:
        return _blockwise_int8_matmul(x, w)
    if w.zero == "float":
        raise ValueError("W8A8 (act_bits=8) runs integer zero points only, not a float offset")
    xq, x_scale = quantize_activations_per_token(x)
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if rows <= native.MAX_ROWS and native.path_in_use()[0]:
        # Decode-sized: the weight-only kernel on the rounded activations (integers held in
        # float32). Its per-group sums of integer products are exact below 2^24, so the
        # result is the int32 path's up to float32 rounding; XLA's int8 GEMV is slower
        # than float32 at these sizes (0.7x decode on SmolLM2).
        y = native.native_matmul(xq.reshape(rows, x.shape[-1]).astype(jnp.float32),
                                 w.replace(act_bits=None))
        if y is not None:
            return (y.reshape(*lead, w.shape2d[1]) * x_scale).astype(x.dtype)
    codes = _int8_codes(w)  # (G, g, N)
    scale, _ = w._canonical_scale_zero()  # (G, 1, N)
    groups, size, n = codes.shape
    xq = xq.reshape(-1, x.shape[-1])
    if groups * size > x.shape[-1]:  # partial last group: pad with zeros like the codes
        xq = jnp.pad(xq, ((0, 0), (0, groups * size - x.shape[-1])))
    if groups == 1:  # per channel / per tensor (or one partial group): one 2-D matmul
        acc = jax.lax.dot_general(xq, codes[0], (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)  # (M, N)
        y = acc.astype(jnp.float32) * scale[0].astype(jnp.float32)
    else:
        xq = xq.reshape(-1, groups, size)  # (M, G, g)
        acc = jax.lax.dot_general(
            xq, codes, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32
        )  # (G, M, N)
        y = jnp.sum(acc.astype(jnp.float32) * scale.astype(jnp.float32), axis=0)  # (M, N)
    return (y.reshape(*lead, n) * x_scale).astype(x.dtype)


# Rows (tokens) from which weight-only matmuls run in bfloat16 with float32 accumulation
# under compute="bfloat16" (or "auto" where bf16 is native): XLA's CPU bf16 GEMM is ~1.8×
# its f32 GEMM at 512 rows on an AVX-512-BF16 host, but bf16 GEMV is ~10× slower than f32
# GEMV, so decode-sized inputs stay float32.
BF16_MIN_ROWS = 128

# How weight-only matmuls compute: "float32" (default), "bfloat16" (prefill-sized inputs
# in bf16 with f32 accumulation), "auto" (bfloat16 where `hardware.bf16_prefill_pays`).
COMPUTE_MODES = ("float32", "bfloat16", "auto")


def check_compute(compute: str, name: str = "compute") -> None:
    """Raise a ValueError naming `name` unless `compute` is one of `COMPUTE_MODES`.

    Args:
        compute: the mode to check.
        name: what it belongs to, for the message.

    Example:
        >>> check_compute("bfloat16")
    """
    if compute not in COMPUTE_MODES:
        raise ValueError(f"{name}: compute must be one of {', '.join(COMPUTE_MODES)}, "
                         f"got {compute!r}")


def _bf16_compute(compute: str) -> bool:
    if compute == "auto":
        return hardware.bf16_prefill_pays(jax.default_backend())
    return compute == "bfloat16"


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
        codes = _kernel_codes(w)
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
    if native.path_in_use()[0]:  # None: not handled (rows, dtype, form)
        y = native.native_matmul(x.reshape(rows, x.shape[-1]), w)
        if y is not None:
            return y.astype(x.dtype).reshape(out_shape)
    # bfloat16 activations (bf16 params, or --compute bfloat16) take the same product: the
    # exact codes go into the dot and the scale follows it, which is more accurate than a
    # bf16-rounded dequantized weight and lets XLA on GPU read the int8 codes directly
    # (2x the bytes/s of dequantize-then-matmul on an H200, benchmarks/bench_gpu_decode.py).
    if x.dtype == jnp.bfloat16 or (rows >= BF16_MIN_ROWS and x.dtype == jnp.float32
                                   and _bf16_compute(w.compute)):
        y = _bf16_matmul(x.reshape(rows, x.shape[-1]), w)
        return y.astype(x.dtype).reshape(out_shape)
    return dense_matmul(x, w.materialize().reshape(w.shape2d)).reshape(out_shape)


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
