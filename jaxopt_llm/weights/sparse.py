"""Sparse kernels: `MaskedWeight` (any pattern) and `NMSparseWeight` (compressed N:M).

MaskedWeight keeps the dense float kernel plus a 1-bit mask (packed 8 per byte); the
forward multiplies by the mask, so pruned entries stay exactly zero even while the
weight trains. NMSparseWeight stores only the values kept in every group of M
consecutive inputs plus their positions in ⌈log2 M⌉ bits — the layout of 2:4 sparse tensor cores
("Accelerating Sparse Deep Neural Networks", Mishra et al., 2021); on CPU it is
expanded to dense before the matmul.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jaxopt_llm.weights import packing
from jaxopt_llm.weights.base import WeightLeaf


@struct.dataclass
class MaskedWeight(WeightLeaf):
    w: jax.Array  # (K, N) float, zero where masked
    mask: jax.Array  # (⌈K/8⌉, N) uint8, 1 bit per entry packed along K

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    def dense_mask(self) -> jax.Array:
        return packing.unpack(self.mask, 1, self.w.shape[0], axis=0).astype(jnp.bool_)

    def materialize(self) -> jax.Array:
        return jnp.where(self.dense_mask(), self.w, jnp.zeros((), self.w.dtype))

    def linear(self, x: jax.Array) -> jax.Array:
        return jnp.matmul(x, self.materialize().astype(x.dtype))

    def add_dense(self, delta: jax.Array) -> MaskedWeight:
        """Keeps the sparsity pattern: the delta lands on kept entries only."""
        return masked_weight(self.w + delta, self.dense_mask())


def masked_weight(w: jax.Array, keep: jax.Array) -> MaskedWeight:
    """Wrap a kernel and a boolean keep-mask of the same shape (masked entries set to 0)."""
    if keep.shape != w.shape:
        raise ValueError(f"mask shape {keep.shape} does not match weight shape {w.shape}")
    w = jnp.where(keep, w, jnp.zeros((), w.dtype))
    return MaskedWeight(w=w, mask=packing.pack(keep.astype(jnp.uint8), 1, axis=0))


@struct.dataclass
class NMSparseWeight(WeightLeaf):
    values: jax.Array  # (K·n/m, N) kept values, in input order within each group of m
    index: jax.Array  # packed positions (0..m-1) of the kept values, ⌈log2 m⌉ bits each
    kept: int = struct.field(pytree_node=False)  # values kept per group of m
    m: int = struct.field(pytree_node=False)
    shape: tuple[int, int] = struct.field(pytree_node=False)

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.m)))

    def positions(self) -> jax.Array:
        return packing.unpack(self.index, self.index_bits, self.values.shape[0], axis=0)

    def materialize(self) -> jax.Array:
        k, cols = self.shape
        values = self.values.reshape(k // self.m, self.kept, cols)
        where = self.positions().reshape(k // self.m, self.kept, cols).astype(jnp.int32)
        slots = jnp.arange(self.m, dtype=jnp.int32)[None, :, None]  # (1, m, 1)
        dense = jnp.zeros((k // self.m, self.m, cols), self.values.dtype)
        for j in range(self.kept):
            dense = dense + jnp.where(slots == where[:, j][:, None, :], values[:, j][:, None, :],
                                      jnp.zeros((), self.values.dtype))
        return dense.reshape(k, cols)

    def linear(self, x: jax.Array) -> jax.Array:
        return jnp.matmul(x, self.materialize().astype(x.dtype))


def nm_sparse_weight(w: jax.Array, keep: jax.Array, kept: int, m: int) -> NMSparseWeight:
    """Compress a kernel (K, N) whose keep-mask keeps exactly `kept` of every m along K."""
    k, cols = w.shape
    keep_g = keep.reshape(k // m, m, cols)
    # Stable order of kept slots: sort slot ids with dropped ones pushed to the end.
    order = jnp.argsort(jnp.where(keep_g, 0, 1) * m + jnp.arange(m)[None, :, None], axis=1)
    slots = order[:, :kept]  # (K/m, kept, N) slot ids, ascending
    values = jnp.take_along_axis(w.reshape(k // m, m, cols), slots, axis=1)
    index_bits = max(1, math.ceil(math.log2(m)))
    index = packing.pack(slots.reshape(-1, cols).astype(jnp.uint8), index_bits, axis=0)
    return NMSparseWeight(values=values.reshape(-1, cols), index=index, kept=kept, m=m,
                          shape=(int(k), int(cols)))
