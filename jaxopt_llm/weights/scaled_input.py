"""`ScaledInputWeight`: a kernel that divides its input by per-channel scales first.

Activation-aware scaling ("AWQ", Lin et al., MLSys 2024; "SmoothQuant", Xiao et al., ICML
2023) rewrites x·W as (x / s)·(diag(s)·W): the scaled kernel quantizes better (AWQ: the
salient input channels get finer steps; SmoothQuant: activation outliers move into the
weights). Where the division folds into the layer before (a norm's weight, the output
columns of a linear) the scales cost nothing at run time; where it cannot (a nonlinearity
or grouped-query heads in between), this leaf keeps s and divides x by it, a (…, K)
elementwise multiply ahead of the inner kernel's own matmul.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxopt_llm.weights.base import WeightLeaf, axis_spec, specs_of
from jaxopt_llm.weights.dispatch import linear, materialize


@struct.dataclass
class ScaledInputWeight(WeightLeaf):
    """The kernel W (K, N) stored as `weight` = diag(s)·W (any representation) and s (K,).

    `linear(x)` = linear(x · (1/s), weight); `materialize()` = weight / s (rows).

    Example:
        >>> import jax.numpy as jnp
        >>> w = ScaledInputWeight(weight=jnp.array([[2.0], [3.0]]),
        ...                       input_scale=jnp.array([2.0, 1.0]))
        >>> w.materialize().ravel().tolist(), w.linear(jnp.array([[1.0, 1.0]])).tolist()
        ([1.0, 3.0], [[4.0]])
    """

    weight: Any  # diag(s)·W, (K, N): an array or a WeightLeaf
    input_scale: jax.Array  # s (K,), float32, positive

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense kernel's shape."""
        shape = getattr(self.weight, "shape", None)  # every array and built-in leaf has one
        return tuple(materialize(self.weight).shape if shape is None else shape)

    def describe(self) -> str:
        inner = self.weight.describe() if isinstance(self.weight, WeightLeaf) else "array"
        return f"ScaledInputWeight({inner})"

    def materialize(self) -> jax.Array:
        dense = materialize(self.weight)
        inverse = (1.0 / self.input_scale).astype(jnp.float32)
        return (dense.astype(jnp.float32) * inverse.reshape(-1, *([1] * (dense.ndim - 1)))
                ).astype(dense.dtype)

    def linear(self, x: jax.Array) -> jax.Array:
        inverse = (1.0 / self.input_scale).astype(x.dtype)
        return linear(x * inverse.reshape((1,) * (x.ndim - 1) + (-1,)), self.weight)

    def partition_specs(self, rows: str | None, cols: str | None, mesh: Mesh) -> Any:
        """The inner kernel as a dense one; s follows the rows (a row-parallel layer's
        input shards along K, and so does its scale)."""
        return ScaledInputWeight(weight=specs_of(self.weight, rows, cols, mesh),
                                 input_scale=axis_spec(self.input_scale.shape, {0: rows}, mesh))

    def viewed_as(self, shape: tuple[int, ...]) -> Any:
        inner = self.weight.viewed_as(shape) if isinstance(self.weight, WeightLeaf) \
            else self.weight.reshape(shape)
        return ScaledInputWeight(weight=inner, input_scale=self.input_scale)

    def add_dense(self, delta: jax.Array) -> Any:
        """W + delta, keeping the scales: the inner kernel gets diag(s)·delta (re-rounded
        if it is quantized, as the inner representation's `add_dense` says)."""
        scaled = delta.astype(jnp.float32) * self.input_scale.reshape(
            -1, *([1] * (delta.ndim - 1)))
        inner = self.weight.add_dense(scaled) if isinstance(self.weight, WeightLeaf) \
            else self.weight + scaled.astype(self.weight.dtype)
        return ScaledInputWeight(weight=inner, input_scale=self.input_scale)


__all__ = ["ScaledInputWeight"]
