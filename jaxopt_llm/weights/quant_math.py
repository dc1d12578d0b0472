"""Uniform integer quantization math shared by real and fake quantization.

Round-to-nearest with a calibrated range (docs/algorithms.md, "RTN"):
  symmetric   scale = m / (2^(b-1) - 1), q = clamp(round(w/scale), -2^(b-1), 2^(b-1) - 1)
  asymmetric  scale = (hi - lo) / (2^b - 1), zero = clamp(round(-lo/scale), 0, 2^b - 1),
              u = clamp(round(w/scale) + zero, 0, 2^b - 1),  w ≈ (u - zero)·scale
  float offset (zero="float", llama.cpp's Q4_1/Q5_1, many GPTQ/AWQ checkpoints)
              d = (hi - lo) / (2^b - 1), m = lo, u = clamp(round((w - m)/d), 0, 2^b - 1),
              w ≈ u·d + m  (d and m both stored in the scale dtype)
where (lo, hi) or m come from the weights of one quantization group: absmax, min-max,
a percentile, or the clip ratio minimising the group's quantization error (MSE search,
as in GPTQ's reference quantizer). Integer-zero ranges always include 0 so 0 stays
exact; a float offset spends no code on 0, its range is the group's own [min, max].

Everything works on a canonical grouped view (G, g, N): the contraction axis (K, the one
groups run along) is split into G groups of g, N counts output channels. Per-tensor is
G=1 reduced over (g, N); per-channel is G=1 reduced over g; per-group is G = K/g.
Scales and zero points come back as (G, 1, N) (per-tensor (1, 1, 1)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

GRANULARITIES = ("tensor", "channel", "group")
RANGE_METHODS = ("absmax", "minmax", "percentile", "mse")
ZERO_KINDS = ("integer", "float")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How a weight is quantized: width, symmetry and the groups that share a scale.

    Invalid combinations are a ValueError at construction, so a spec that exists is usable.

    Example:
        >>> QuantSpec(bits=4, granularity="group", group_size=128).num_groups(512)
        4
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"  # "tensor" | "channel" (per output) | "group" (along input)
    group_size: int | None = None  # only for granularity="group"
    # A shorter last group where group_size does not divide the input (as GPTQ allows);
    # off by default so a mistyped group size is an error, not a silent ragged layout.
    partial_groups: bool = False
    # Asymmetric grids only: "integer" zero point (uint8) or "float" offset w = u·d + m.
    zero: str = "integer"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not (
            2 <= self.bits <= 8
        ):
            raise ValueError(f"quantization bits must be an integer in 2..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"quantization granularity must be one of {GRANULARITIES}, "
                f"got {self.granularity!r}"
            )
        if self.granularity == "group":
            if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                    or self.group_size <= 0):
                raise ValueError(
                    f"granularity 'group' needs a positive integer group_size, "
                    f"got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only valid with granularity 'group' "
                f"(got granularity {self.granularity!r})"
            )
        if self.zero not in ZERO_KINDS:
            raise ValueError(f"zero must be one of {ZERO_KINDS}, got {self.zero!r}")
        if self.zero == "float" and self.symmetric:
            raise ValueError("zero='float' (a float offset w = u·d + m) needs an asymmetric "
                             "grid: set symmetric to false")

    @property
    def float_zero(self) -> bool:
        """True when the grid's zero is a float offset (w = u·d + m).

        Returns:
            Whether `zero` is "float" (llama.cpp's Q4_1/Q5_1 layout), not an integer zero point.

        Example:
            >>> QuantSpec(bits=4, symmetric=False, zero="float").float_zero
            True
        """
        return self.zero == "float"

    @property
    def qmin(self) -> int:
        """The smallest integer code: -2^(b-1) when symmetric, 0 otherwise.

        Returns:
            The lower clamp bound of `quantize_codes`.

        Example:
            >>> QuantSpec(bits=4).qmin, QuantSpec(bits=4, symmetric=False).qmin
            (-8, 0)
        """
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """The largest integer code: 2^(b-1) - 1 when symmetric, 2^b - 1 otherwise.

        It is also the divisor of the range in `scale_and_zero`: a symmetric grid spends
        its extra negative code (-2^(b-1)) on nothing, so [-m, m] maps onto ±qmax.

        Returns:
            The upper clamp bound of `quantize_codes`.

        Example:
            >>> QuantSpec(bits=4).qmax, QuantSpec(bits=4, symmetric=False).qmax
            (7, 15)
        """
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def num_groups(self, length: int, where: str = "weight") -> int:
        """Groups along a contraction axis of `length`; a group size must divide it.

        Args:
            length: the contraction axis' length (K of a kernel, D of a table).
            where: what is quantized, for the error message.

        Returns:
            1 per tensor or per channel; K / g per group, rounded up with `partial_groups`.

        Raises:
            ValueError: when `group_size` does not divide `length` and `partial_groups` is off.

        Example:
            >>> spec = QuantSpec(granularity="group", group_size=4, partial_groups=True)
            >>> spec.num_groups(8), spec.num_groups(10)
            (2, 3)
        """
        if self.granularity != "group":
            return 1
        if length % self.group_size:
            if self.partial_groups:
                return -(-length // self.group_size)
            raise ValueError(
                f"{where}: group_size={self.group_size} does not divide the input "
                f"dimension {length}; use a divisor of {length}, or partial_groups: true "
                f"for a shorter last group"
            )
        return length // self.group_size


def grouped(w2: jax.Array, spec: QuantSpec) -> jax.Array:
    """(K, N) → (G, g, N) canonical view; a partial last group is padded.

    Integer zeros: zero padding never moves a range (every range includes 0) and pads
    quantize to exactly 0. A float offset's range need not include 0, so its pads repeat
    the last row, which lies in the same group and leaves its min and max unchanged.
    Either way `ungrouped` drops the pads.

    Args:
        w2: the weight as a (K, N) matrix, K the contraction axis groups run along.
        spec: the grid (its granularity and group size set G and g).

    Returns:
        The (G, g, N) view: (1, K, N) per tensor or per channel, (⌈K/g⌉, g, N) per group.

    Example:
        >>> spec = QuantSpec(granularity="group", group_size=2, partial_groups=True)
        >>> wg = grouped(jnp.arange(6.0).reshape(3, 2), spec)
        >>> wg.shape, wg[1].tolist()
        ((2, 2, 2), [[4.0, 5.0], [0.0, 0.0]])
    """
    k, n = w2.shape
    groups = spec.num_groups(k)
    size = spec.group_size if spec.granularity == "group" else k
    if groups * size > k:
        pad = groups * size - k
        if spec.float_zero:
            filler = jnp.broadcast_to(w2[-1:], (pad, n))
        else:
            filler = jnp.zeros((pad, n), w2.dtype)
        w2 = jnp.concatenate([w2, filler], axis=0)
    return w2.reshape(groups, size, n)


def ungrouped(wg: jax.Array, length: int) -> jax.Array:
    """(G, g, N) → (K, N), dropping the padding of a partial last group.

    Args:
        wg: a grouped view (G, g, N), e.g. from `grouped` or `dequantize_codes`.
        length: K, the contraction axis' real length.

    Returns:
        The (K, N) matrix.

    Example:
        >>> spec = QuantSpec(granularity="group", group_size=2, partial_groups=True)
        >>> ungrouped(grouped(jnp.ones((3, 2)), spec), 3).shape
        (3, 2)
    """
    return wg.reshape(-1, wg.shape[-1])[:length]


def _reduce_axes(spec: QuantSpec) -> tuple[int, ...]:
    return (1, 2) if spec.granularity == "tensor" else (1,)


def group_range(
    wg: jax.Array,
    spec: QuantSpec,
    method: str = "absmax",
    *,
    percentile: float = 99.9,
    mse_grid: int = 100,
    mse_max_shrink: float = 0.8,
    mse_norm: float = 2.0,
) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) per group, shapes (G, 1, N) or (1, 1, 1).

    lo = -hi when symmetric; lo ≤ 0 ≤ hi with an integer zero; a float offset's range is
    the group's own (not widened to include 0). The range-setting methods are those of
    Nagel et al., "A White Paper on Neural Network Quantization" (2021); "mse" searches a
    clip ratio per group as GPTQ's reference quantizer does (docs/algorithms.md, "RTN").

    Args:
        wg: the grouped view (G, g, N) (see `grouped`).
        spec: the grid (symmetry, zero kind and granularity choose the reduction).
        method: "absmax" ([-max|w|, max|w|] in any scheme), "minmax", "percentile" or
            "mse".
        percentile: for "percentile", the percentile p in (0, 100] of |w| (symmetric),
            or the (100 - p)-th and p-th percentiles of w (asymmetric).
        mse_grid: for "mse", how many clip ratios are tried.
        mse_max_shrink: for "mse", the largest shrink: ratios run over [1 - shrink, 1].
        mse_norm: for "mse", the exponent p of the error Σ|w - q(w)|^p.

    Returns:
        (lo, hi), float32 arrays of shape (G, 1, N) ((1, 1, 1) per tensor).

    Raises:
        ValueError: for an unknown `method` or an out-of-range `percentile` or MSE option.

    Example:
        >>> w = jnp.array([[1.0, -2.0], [-3.0, 0.5]])  # per channel: columns [1, -3], [-2, 0.5]
        >>> lo, hi = group_range(grouped(w, QuantSpec()), QuantSpec())
        >>> lo.shape, lo.ravel().tolist(), hi.ravel().tolist()
        ((1, 1, 2), [-3.0, -2.0], [3.0, 2.0])
        >>> spec = QuantSpec(symmetric=False)
        >>> lo, hi = group_range(grouped(w, spec), spec, "minmax")
        >>> lo.ravel().tolist(), hi.ravel().tolist()
        ([-3.0, -2.0], [1.0, 0.5])
    """
    axes = _reduce_axes(spec)
    wg = wg.astype(jnp.float32)
    if method in ("absmax", "minmax", "mse"):
        if spec.symmetric or method == "absmax":  # absmax: [-max|w|, max|w|] in any scheme
            hi = jnp.max(jnp.abs(wg), axis=axes, keepdims=True)
            lo = -hi
        elif spec.float_zero:
            lo = jnp.min(wg, axis=axes, keepdims=True)
            hi = jnp.max(wg, axis=axes, keepdims=True)
        else:
            lo = jnp.minimum(jnp.min(wg, axis=axes, keepdims=True), 0.0)
            hi = jnp.maximum(jnp.max(wg, axis=axes, keepdims=True), 0.0)
        if method == "mse":
            lo, hi = _mse_search(wg, lo, hi, spec, mse_grid, mse_max_shrink, mse_norm)
        return lo, hi
    if method == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if spec.symmetric:
            hi = jnp.percentile(jnp.abs(wg), percentile, axis=axes, keepdims=True)
            return -hi, hi
        lo = jnp.percentile(wg, 100.0 - percentile, axis=axes, keepdims=True)
        hi = jnp.percentile(wg, percentile, axis=axes, keepdims=True)
        if spec.float_zero:
            return lo, hi
        return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    raise ValueError(f"range method must be one of {RANGE_METHODS}, got {method!r}")


def scale_and_zero(
    lo: jax.Array, hi: jax.Array, spec: QuantSpec, scale_dtype: jnp.dtype = jnp.float32
) -> tuple[jax.Array, jax.Array | None]:
    """Scale (in `scale_dtype`, never 0) and zero: a uint8 zero point, the float offset m = lo
    (in `scale_dtype`) when spec.zero is "float", None when symmetric.

    The scale is floored at the dtype's smallest normal number, so an all-zero group
    divides safely (its codes are 0). The integer zero point is computed against the
    scale as stored (after the cast), so dequantization reproduces what was rounded.

    Args:
        lo: the lower end of each group's range, e.g. (G, 1, N) from `group_range`.
        hi: the upper end, same shape.
        spec: the grid: symmetric uses hi / qmax, asymmetric (hi - lo) / qmax.
        scale_dtype: the dtype the scale (and a float offset) is stored in.

    Returns:
        (scale, zero): scale in `scale_dtype`; zero uint8, or in `scale_dtype` for a
        float offset, or None when symmetric. Both have lo's shape.

    Example:
        >>> spec = QuantSpec(bits=4, symmetric=False)  # 16 codes over [-1, 14]: step 1
        >>> scale, zero = scale_and_zero(jnp.array(-1.0), jnp.array(14.0), spec)
        >>> float(scale), int(zero), zero.dtype
        (1.0, 1, dtype('uint8'))
        >>> scale_and_zero(jnp.array(-7.0), jnp.array(7.0), QuantSpec(bits=4))[1] is None
        True
    """
    tiny = jnp.float32(jnp.finfo(scale_dtype).tiny)
    if spec.symmetric:
        scale = hi / spec.qmax
    else:
        scale = (hi - lo) / spec.qmax
    scale = jnp.maximum(scale, tiny).astype(scale_dtype)
    if spec.symmetric:
        return scale, None
    if spec.float_zero:
        return scale, lo.astype(scale_dtype)
    zero = jnp.clip(jnp.round(-lo / scale.astype(jnp.float32)), 0, spec.qmax)
    return scale, zero.astype(jnp.uint8)


def quantize_codes(
    wg: jax.Array, scale: jax.Array, zero: jax.Array | None, spec: QuantSpec
) -> jax.Array:
    """Integer codes in [qmin, qmax] as int32 (symmetric: signed q; asymmetric: unsigned u).

    Against the stored (rounded) scale and zero; a float offset m: u = round((w - m)/d).
    Rounding is jnp.round (half to even); values beyond the grid clamp to its ends.

    Args:
        wg: the weights, grouped view (G, g, N) (or anything broadcasting with the grid).
        scale: the step per group, (G, 1, N).
        zero: the uint8 zero point or float offset per group (same shape), None when
            symmetric.
        spec: the grid (its zero kind and code range).

    Returns:
        int32 codes of wg's shape.

    Example:
        >>> w = jnp.array([-9.0, -0.4, 2.6, 20.0])
        >>> quantize_codes(w, jnp.float32(1.0), None, QuantSpec(bits=4)).tolist()
        [-8, 0, 3, 7]
    """
    if spec.float_zero:
        shifted = wg.astype(jnp.float32) - zero.astype(jnp.float32)
        q = jnp.round(shifted / scale.astype(jnp.float32))
        return jnp.clip(q, spec.qmin, spec.qmax).astype(jnp.int32)
    q = jnp.round(wg.astype(jnp.float32) / scale.astype(jnp.float32))
    if zero is not None:
        q = q + zero.astype(jnp.float32)
    return jnp.clip(q, spec.qmin, spec.qmax).astype(jnp.int32)


def is_float_offset(zero: jax.Array | None) -> bool:
    """A float zero is an offset m (w = u·d + m); an integer one a zero point (u - z)·d.

    Args:
        zero: a stored zero (uint8 zero point or float offset), or None (symmetric).

    Returns:
        True only for a floating-point `zero`.

    Example:
        >>> is_float_offset(jnp.zeros(2, jnp.uint8)), is_float_offset(jnp.zeros(2, jnp.float16))
        (False, True)
    """
    return zero is not None and jnp.issubdtype(zero.dtype, jnp.floating)


def dequantize_codes(
    codes: jax.Array, scale: jax.Array, zero: jax.Array | None
) -> jax.Array:
    """Codes (G, g, N) → float32 values; `zero` is told apart by dtype (`is_float_offset`).

    Args:
        codes: integer codes, e.g. from `quantize_codes`.
        scale: the step per group, broadcasting with `codes` ((G, 1, N)).
        zero: a uint8 zero point ((u - z)·d), a float offset (u·d + m), or None (q·d).

    Returns:
        float32 values of codes' shape.

    Example:
        >>> codes = jnp.array([0, 3, 15])
        >>> dequantize_codes(codes, jnp.float32(0.5), jnp.uint8(1)).tolist()
        [-0.5, 1.0, 7.0]
        >>> dequantize_codes(codes, jnp.float32(0.5), jnp.float16(-1.0)).tolist()
        [-1.0, 0.5, 6.5]
    """
    if is_float_offset(zero):
        return codes.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)
    centered = codes.astype(jnp.int32)
    if zero is not None:
        centered = centered - zero.astype(jnp.int32)
    return centered.astype(jnp.float32) * scale.astype(jnp.float32)


def quantize_dequantize_grouped(
    wg: jax.Array, lo: jax.Array, hi: jax.Array, spec: QuantSpec,
    scale_dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Float32 round trip of a grouped view through the integer grid given by (lo, hi).

    With the default float32 scale this is the error model of the MSE range search; with
    the stored `scale_dtype` it is exactly what storage would give (AWQ's searches).

    Args:
        wg: the weights, grouped view (G, g, N).
        lo: the lower end of each group's range, (G, 1, N).
        hi: the upper end, same shape.
        spec: the grid.
        scale_dtype: the dtype the scale (and a float offset) is rounded to first.

    Returns:
        float32 dequantized weights of wg's shape.

    Example:
        >>> wg = jnp.array([0.4, 1.6, -3.0]).reshape(1, 3, 1)  # 3 bits over [-3, 3]: step 1
        >>> out = quantize_dequantize_grouped(wg, jnp.float32(-3.0), jnp.float32(3.0),
        ...                                   QuantSpec(bits=3))
        >>> out.ravel().tolist()
        [0.0, 2.0, -3.0]
    """
    scale, zero = scale_and_zero(lo, hi, spec, scale_dtype)
    return dequantize_codes(quantize_codes(wg, scale, zero, spec), scale, zero)


def shrunk_range(lo: jax.Array, hi: jax.Array, ratio: jax.Array,
                 spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """A range clipped by `ratio` ∈ (0, 1]: toward 0 with an integer zero (0 stays in it),
    toward its midpoint for a float offset (it stays inside the group's [min, max]).

    Args:
        lo: the lower ends, e.g. (G, 1, N).
        hi: the upper ends, same shape.
        ratio: the shrink factor (1: unchanged).
        spec: the grid (its zero kind picks the center).

    Returns:
        (lo', hi').

    Example:
        >>> lo, hi = shrunk_range(jnp.float32(-2.0), jnp.float32(4.0), 0.5, QuantSpec())
        >>> float(lo), float(hi)
        (-1.0, 2.0)
    """
    if spec.float_zero:
        center = (lo + hi) / 2
        return center + (lo - center) * ratio, center + (hi - center) * ratio
    return lo * ratio, hi * ratio


def _mse_search(wg, lo, hi, spec, grid, max_shrink, norm):
    """Per group, the clip ratio in [1 - max_shrink, 1] with the smallest Σ|w - q(w)|^norm."""
    if not (isinstance(grid, int) and grid >= 1):
        raise ValueError(f"mse_grid must be a positive integer, got {grid!r}")
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"mse_max_shrink must be in [0, 1), got {max_shrink}")
    axes = _reduce_axes(spec)
    ratios = 1.0 - max_shrink * jnp.arange(grid, dtype=jnp.float32) / grid

    def step(carry, ratio):
        best_err, best_lo, best_hi = carry
        lo_r, hi_r = shrunk_range(lo, hi, ratio, spec)
        err = jnp.sum(
            jnp.abs(quantize_dequantize_grouped(wg, lo_r, hi_r, spec) - wg) ** norm,
            axis=axes,
            keepdims=True,
        )
        better = err < best_err
        return (
            jnp.where(better, err, best_err),
            jnp.where(better, lo_r, best_lo),
            jnp.where(better, hi_r, best_hi),
        ), None

    init = (jnp.full(lo.shape, jnp.inf, jnp.float32), lo, hi)
    (_, best_lo, best_hi), _ = jax.lax.scan(step, init, ratios)
    return best_lo, best_hi
