"""Sparse kernels: `MaskedWeight` (any pattern) and `NMSparseWeight` (compressed N:M).

MaskedWeight keeps the dense float kernel, zero where pruned, plus a 1-bit mask (packed 8
per byte); the forward multiplies the stored kernel as it is (the dense product's speed,
no mask expanded per call) and the derivative is masked, so pruned entries stay exactly
zero while the weight trains (training also projects them back after each update).
NMSparseWeight stores only the values kept in every group of M consecutive inputs plus their
positions in ⌈log2 M⌉ bits — the layout of 2:4 sparse tensor cores ("Accelerating Sparse
Deep Neural Networks", Mishra et al., 2021); on CPU a native kernel reads them as stored at
decode sizes (`native_nm`), longer inputs expand them to dense before the matmul. Its
`values` may themselves be a `QuantizedWeight` (K·kept/m, N): a sparse quantized weight
("SparseGPT", Frantar & Alistarh, 2023, §3.5: pruning and quantization in one sweep), whose
bytes are the kept values' codes, their
scales and the positions.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxopt_llm.weights import native_nm, packing
from jaxopt_llm.weights.base import WeightLeaf, dense_matmul
from jaxopt_llm.weights.dispatch import linear
from jaxopt_llm.weights.dispatch import materialize as dense_of


@struct.dataclass
class MaskedWeight(WeightLeaf):
    """A kernel (K, N) with any sparsity pattern: the dense values plus a 1-bit keep-mask.

    Fields: `w` (K, N) float, zero where masked; `mask` (⌈K/8⌉, N) uint8, one bit per
    entry packed along K. Build it with `masked_weight`, which zeroes `w` where masked:
    `linear` multiplies `w` as stored and relies on it (a hand-built instance whose `w` is
    not zero there computes with those entries; `materialize` drops them).

    Example:
        >>> w = jnp.arange(8.0).reshape(4, 2)
        >>> masked_weight(w, w > 3).materialize().tolist()
        [[0.0, 0.0], [0.0, 0.0], [4.0, 5.0], [6.0, 7.0]]
    """
    w: jax.Array  # (K, N) float, zero where masked
    mask: jax.Array  # (⌈K/8⌉, N) uint8, 1 bit per entry packed along K

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense weight's shape (K, N)."""
        return tuple(self.w.shape)

    def dense_mask(self) -> jax.Array:
        """The keep-mask unpacked to booleans (K, N).

        Returns:
            True where the weight is kept.
        """
        return packing.unpack(self.mask, 1, self.w.shape[0], axis=0).astype(jnp.bool_)

    def materialize(self) -> jax.Array:
        return jnp.where(self.dense_mask(), self.w, jnp.zeros((), self.w.dtype))

    def linear(self, x: jax.Array) -> jax.Array:
        """x (..., K) @ this kernel, with `w` as stored: no mask is expanded per call, so
        the product is the dense one's (the native GEMV at decode sizes on CPU).

        It relies on `w` being zero where masked: `masked_weight` zeroes it, training
        projects it back after every update, and the derivative for `w` is masked, so
        pruned entries receive no gradient. Build instances with `masked_weight`."""
        return _masked_linear(x, self)

    def add_dense(self, delta: jax.Array) -> MaskedWeight:
        """Keeps the sparsity pattern: the delta lands on kept entries only."""
        return masked_weight(self.w + delta, self.dense_mask())


@jax.custom_jvp
def _masked_linear(x: jax.Array, w: MaskedWeight) -> jax.Array:
    """x @ w.w (zero where masked); its derivative is the masked product's."""
    return linear(x, w.w)


@_masked_linear.defjvp
def _masked_linear_jvp(primals, tangents):
    _, tangent = jax.jvp(lambda x, w: dense_matmul(x, w.materialize()), primals, tangents)
    return _masked_linear(*primals), tangent


def masked_weight(w: jax.Array, keep: jax.Array) -> MaskedWeight:
    """Wrap a kernel and a boolean keep-mask of the same shape (masked entries set to 0).

    Args:
        w: the kernel (K, N).
        keep: booleans of w's shape, True where the weight is kept.

    Returns:
        A `MaskedWeight` storing w (zeros where masked) and the packed mask.

    Example:
        >>> from jaxopt_llm.weights import param_bytes
        >>> w = jnp.arange(8.0).reshape(4, 2)
        >>> param_bytes(masked_weight(w, w > 3))  # 32 bytes of float32 + 2 bytes of mask
        34
    """
    if keep.shape != w.shape:
        raise ValueError(f"mask shape {keep.shape} does not match weight shape {w.shape}")
    w = jnp.where(keep, w, jnp.zeros((), w.dtype))
    return MaskedWeight(w=w, mask=packing.pack(keep.astype(jnp.uint8), 1, axis=0))


@struct.dataclass
class NMSparseWeight(WeightLeaf):
    """A kernel (K, N) compressed to `kept` values in every group of `m` consecutive inputs.

    Fields: `values` (K·kept/m, N), the kept values in input order within each group (an
    array, or a `QuantizedWeight` of that shape: a sparse quantized weight);
    `index`, their positions 0..m-1 packed in ⌈log2 m⌉ bits each; static `kept`, `m` and
    the dense `shape`. Build it with `nm_sparse_weight` (then `replace(values=...)` to
    store the values quantized).

    Example:
        >>> w = jnp.arange(8.0).reshape(4, 2)
        >>> keep = jnp.array([[1, 0], [0, 1], [0, 1], [1, 0]], bool)
        >>> nm_sparse_weight(w, keep, 1, 2).materialize().tolist()
        [[0.0, 0.0], [0.0, 3.0], [0.0, 5.0], [6.0, 0.0]]
    """
    values: Any  # (K·n/m, N) kept values, in input order within each group of m (or a leaf)
    index: jax.Array  # packed positions (0..m-1) of the kept values, ⌈log2 m⌉ bits each
    kept: int = struct.field(pytree_node=False)  # values kept per group of m
    m: int = struct.field(pytree_node=False)
    shape: tuple[int, int] = struct.field(pytree_node=False)

    def __post_init__(self) -> None:
        for name, value in (("kept", self.kept), ("m", self.m)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NMSparseWeight {name} must be a positive integer, got "
                                 f"{value!r}")
        if self.kept > self.m:
            raise ValueError(f"NMSparseWeight keeps {self.kept} of every {self.m}; kept must "
                             "not exceed m")

    def describe(self) -> str:
        inner = self.values.describe() if isinstance(self.values, WeightLeaf) else ""
        return f"NMSparseWeight({inner})" if inner else "NMSparseWeight"

    @property
    def index_bits(self) -> int:
        """Bits per stored position: ⌈log2 m⌉ (at least 1)."""
        return max(1, math.ceil(math.log2(self.m)))

    def positions(self) -> jax.Array:
        """The position (0..m-1) of every kept value inside its group.

        Returns:
            uint8 (K·kept/m, N), aligned with `values`.
        """
        return packing.unpack(self.index, self.index_bits, self.shape[0] // self.m * self.kept,
                              axis=0)

    def materialize(self) -> jax.Array:
        k, cols = self.shape
        values = dense_of(self.values)
        values = values.reshape(k // self.m, self.kept, cols)
        where = self.positions().reshape(k // self.m, self.kept, cols).astype(jnp.int32)
        slots = jnp.arange(self.m, dtype=jnp.int32)[None, :, None]  # (1, m, 1)
        dense = jnp.zeros((k // self.m, self.m, cols), values.dtype)
        for j in range(self.kept):
            dense = dense + jnp.where(slots == where[:, j][:, None, :], values[:, j][:, None, :],
                                      jnp.zeros((), values.dtype))
        return dense.reshape(k, cols)

    def linear(self, x: jax.Array) -> jax.Array:
        """x (..., K) @ this kernel: at decode sizes on CPU the native kernel reads the
        kept values and positions as stored (`native_nm`); else the expanded kernel."""
        y = native_nm.native_nm_matmul(x, self)
        return y if y is not None else dense_matmul(x, self.materialize())


def nm_sparse_weight(w: jax.Array, keep: jax.Array, kept: int, m: int) -> NMSparseWeight:
    """Compress a kernel (K, N) whose keep-mask keeps exactly `kept` of every m along K.

    Args:
        w: the kernel (K, N), K a multiple of m.
        keep: booleans of w's shape keeping exactly `kept` entries of each group of m
            consecutive rows (e.g. from `transforms.prune.nm_keep_mask`).
        kept: values kept per group (N of "N:M").
        m: the group size (M of "N:M").

    Returns:
        The `NMSparseWeight`.

    Example:
        >>> w = jnp.arange(8.0).reshape(4, 2)
        >>> keep = jnp.array([[1, 0], [0, 1], [0, 1], [1, 0]], bool)
        >>> nm_sparse_weight(w, keep, 1, 2).values.tolist()
        [[0.0, 3.0], [6.0, 5.0]]
    """
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
