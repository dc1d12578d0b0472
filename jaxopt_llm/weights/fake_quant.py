"""`FakeQuantWeight`: quantization-aware training's float master weight.

The forward pass uses dequantize(quantize(w)) (ranges recomputed from the current
weight, absmax or min-max, treated as constants); the backward pass is the
straight-through estimator (Bengio et al., 2013, "Estimating or Propagating
Gradients Through Stochastic Neurons"): identity, or with `ste="clipped"` zero
for weights the integer grid cannot represent (outside the range shrunk by
`clip_ratio`, as in PACT/LSQ-style training).

With learned scales ("Learned Step Size Quantization", Esser et al., ICLR 2020) the
leaf also holds `scale` (float32, the grouped view's (G, 1, N)) and, when asymmetric,
a fixed integer `zero` (uint8, same shape), both initialised from the range above:
forward s·(round_ste(clip(w/s + z, qmin, qmax)) − z); the gradient reaches `w` inside
the grid (zero outside, as LSQ) and `s` (LSQ's step-size gradient, scaled by
1/sqrt(g·qmax) for g weights per scale, as the paper recommends).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxopt_llm.weights.base import WeightLeaf, axis_spec
from jaxopt_llm.weights.quant_math import (
    QuantSpec,
    group_range,
    grouped,
    quantize_dequantize_grouped,
    scale_and_zero,
    ungrouped,
)

STE_MODES = ("identity", "clipped")
_MIN_STEP = 1e-8


@struct.dataclass
class FakeQuantWeight(WeightLeaf):
    """Float weight `w` (kernel (K, ...) for axis 0, table (V, D) for axis 1) seen quantized.

    The static fields (bits, symmetric, granularity, group_size, partial_groups, method)
    describe the integer grid as `QuantSpec` does; `ste` ("identity" or "clipped") and
    `clip_ratio` shape the straight-through gradient; `scale` / `zero` hold LSQ's learned
    step sizes when `with_learned_scale()` was called. `jaxopt_llm.train.convert` turns it
    into the `QuantizedWeight` that computes the same thing.

    Example:
        >>> import jax.numpy as jnp
        >>> w = FakeQuantWeight(w=jnp.array([[0.2, -2.0], [1.0, 1.0]]), bits=2)
        >>> w.materialize().tolist()  # per column, steps of absmax / qmax; ties to even
        [[0.0, -2.0], [1.0, 0.0]]
    """

    w: jax.Array
    bits: int = struct.field(pytree_node=False)
    symmetric: bool = struct.field(pytree_node=False, default=True)
    granularity: str = struct.field(pytree_node=False, default="channel")
    group_size: int | None = struct.field(pytree_node=False, default=None)
    partial_groups: bool = struct.field(pytree_node=False, default=False)
    axis: int = struct.field(pytree_node=False, default=0)
    method: str = struct.field(pytree_node=False, default="absmax")  # or "minmax"
    ste: str = struct.field(pytree_node=False, default="identity")
    clip_ratio: float = struct.field(pytree_node=False, default=1.0)  # range shrink, in (0, 1]
    scale: jax.Array | None = None  # learned step sizes (G, 1, N) float32, or None (LSQ off)
    zero: jax.Array | None = None  # fixed zero points (G, 1, N) uint8 with learned asym scales

    def __post_init__(self) -> None:
        self.spec  # noqa: B018  (validates bits/granularity/group size)
        if self.ste not in STE_MODES:
            raise ValueError(f"ste must be one of {STE_MODES}, got {self.ste!r}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.method not in ("absmax", "minmax"):
            raise ValueError(f"fake quantization ranges are 'absmax' or 'minmax', "
                             f"got {self.method!r}")

    @property
    def spec(self) -> QuantSpec:
        """The integer grid as a `QuantSpec` (bits, symmetry, granularity, groups)."""
        return QuantSpec(bits=self.bits, symmetric=self.symmetric,
                         granularity=self.granularity, group_size=self.group_size,
                         partial_groups=self.partial_groups)

    @property
    def learned(self) -> bool:
        """True when the leaf holds learned step sizes (LSQ)."""
        return self.scale is not None

    def canonical(self) -> jax.Array:
        """The weight as the (K, N) matrix whose columns are quantized along K."""
        w = self.w
        return w.reshape(w.shape[0], -1) if self.axis == 0 else w.T

    def initial_scale(self) -> tuple[jax.Array, jax.Array | None]:
        """(scale, zero) of the current range, as LSQ's initialisation."""
        wg = grouped(self.canonical().astype(jnp.float32), self.spec)
        lo, hi = group_range(wg, self.spec, self.method)
        return scale_and_zero(lo * self.clip_ratio, hi * self.clip_ratio, self.spec)

    def with_learned_scale(self) -> FakeQuantWeight:
        """This weight with LSQ step sizes (and fixed zero points when asymmetric) initialised
        from its current range.

        Returns:
            A `FakeQuantWeight` whose `scale` (and `zero`) are set.
        """
        scale, zero = self.initial_scale()
        return self.replace(scale=scale, zero=zero)

    def step_sizes(self) -> jax.Array:
        """The learned scales as used: positive (a step size trained to ≤ 0 is clamped)."""
        return jnp.maximum(self.scale.astype(jnp.float32), _MIN_STEP)

    def _learned_materialize(self, wg: jax.Array) -> jax.Array:
        spec = self.spec
        per_scale = wg.size // self.scale.size
        gradient_scale = 1.0 / math.sqrt(per_scale * spec.qmax)
        s = self.step_sizes()
        s = s * gradient_scale + jax.lax.stop_gradient(s - s * gradient_scale)
        x = wg / s  # clipped to the grid in centred units, then rounded (integer bounds)
        low, high = float(spec.qmin), float(spec.qmax)
        if self.zero is not None:
            zero = self.zero.astype(jnp.float32)
            low, high = low - zero, high - zero
        x = jnp.clip(x, low, high)  # before rounding: an exact 0/1 clip gradient
        q = x + jax.lax.stop_gradient(jnp.round(x) - x)
        return q * s

    def materialize(self) -> jax.Array:
        w = self.w
        shape = w.shape
        canonical = self.canonical()  # (K, N)
        wg = grouped(canonical.astype(jnp.float32), self.spec)
        if self.learned:
            out = ungrouped(self._learned_materialize(wg), canonical.shape[0])
            out = out.T if self.axis == 1 else out
            return out.reshape(shape).astype(w.dtype)
        lo, hi = group_range(jax.lax.stop_gradient(wg), self.spec, self.method)
        lo, hi = lo * self.clip_ratio, hi * self.clip_ratio
        qdq = quantize_dequantize_grouped(jax.lax.stop_gradient(wg), lo, hi, self.spec)
        if self.ste == "identity":
            out = wg + jax.lax.stop_gradient(qdq - wg)
        else:
            # The representable interval: codes qmin..qmax, plus half a step of rounding.
            if self.symmetric:
                scale = hi / self.spec.qmax
                low, high = scale * (self.spec.qmin - 0.5), scale * (self.spec.qmax + 0.5)
            else:
                scale = (hi - lo) / self.spec.qmax
                low, high = lo - scale / 2, hi + scale / 2
            inside = ((wg >= low) & (wg <= high)).astype(wg.dtype)
            out = jax.lax.stop_gradient(qdq) + (wg - jax.lax.stop_gradient(wg)) * inside
        out = ungrouped(out, canonical.shape[0])
        if self.axis == 1:
            out = out.T
        return out.reshape(shape).astype(w.dtype)

    def partition_specs(self, rows: str | None, cols: str | None, mesh: Mesh) -> FakeQuantWeight:
        """w like the dense weight; learned scales / zeros (G, 1, N) like their groups."""
        grouped_dims = {0: rows, 2: cols} if self.axis == 0 else {0: cols, 2: rows}
        return self.replace(
            w=axis_spec(self.w.shape, {0: rows, 1: cols}, mesh),
            scale=None if self.scale is None else axis_spec(self.scale.shape, grouped_dims, mesh),
            zero=None if self.zero is None else axis_spec(self.zero.shape, grouped_dims, mesh))

    def add_dense(self, delta: jax.Array) -> FakeQuantWeight:
        """The master weight plus `delta` (exact: the weight is float until converted).

        Args:
            delta: a dense array of w's shape.

        Returns:
            The same fake-quant settings on w + delta.
        """
        return self.replace(w=self.w + delta)
