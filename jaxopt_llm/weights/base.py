"""`WeightLeaf`: the base class every weight representation derives from.

A representation is one class in one file. It is a frozen pytree dataclass
(`flax.struct.dataclass`): arrays are children, its recipe (bits, group size, rank, …)
is static metadata. The class owns everything the rest of the project asks of a weight:

* `linear(x)`: x (..., K) against the kernel (K, N...) → (..., N...);
* `embed(ids)` / `attend(x)`: lookups in an embedding table (V, D) and a tied head;
* `materialize()`: the dense float weight it stands for;
* `describe()`: its name in `plan` (wrappers name what they wrap);
* `nbytes`: bytes really stored (every array child, nested leaves included);
* `partition_specs(rows, cols, mesh)`: how its arrays shard when the dense weight's rows
  and columns go on mesh axes `rows` / `cols` (None: replicated) — the project's sharding
  layouts (column / row / vocab / replicated) are expressed this way;
* `viewed_as(shape)`: a kernel (K, A, B) seen as (K, A·B) without copying;
* `add_dense(delta)`: the same kind of weight holding `self + delta` as closely as it can
  (merging a LoRA adapter into its base).

The defaults below run through `materialize()`; a representation overrides what it can do
better (e.g. integer matmuls). Subclasses register themselves by class name, which is only
used to rebuild them when an artifact is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

_BY_NAME: dict[str, type] = {}


class WeightLeaf:
    """Base of every typed weight representation (subclass it with `flax.struct.dataclass`).

    Subclassing registers the class by its name (`leaf_classes`), which artifacts use to
    rebuild it; `materialize()` is the one method a subclass must define.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import struct
        >>> @struct.dataclass
        ... class Doubled(WeightLeaf):
        ...     half: jnp.ndarray
        ...     def materialize(self):
        ...         return self.half * 2
        >>> Doubled(half=jnp.ones((3, 2))).linear(jnp.ones((1, 3))).tolist()
        [[6.0, 6.0]]
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _BY_NAME[cls.__name__] = cls  # a re-imported module re-registers its class

    def materialize(self) -> jax.Array:
        """The dense float weight this leaf stands for."""
        raise TypeError(f"{type(self).__name__} must define materialize()")

    def describe(self) -> str:
        """What `plan` and reports call this representation; default: the class name.

        Returns:
            e.g. "QuantizedWeight", or for a wrapper "ScaledInputWeight(QuantizedWeight)".
        """
        return type(self).__name__

    def linear(self, x: jax.Array) -> jax.Array:
        """x (..., K) @ kernel (K, N...) → (..., N...), through the dense weight."""
        dense = self.materialize()
        out = dense_matmul(x, dense.reshape(dense.shape[0], -1))
        return out.reshape(*x.shape[:-1], *dense.shape[1:])

    def embed(self, ids: jax.Array) -> jax.Array:
        """Rows of the (V, D) table for ids (...,) → (..., D)."""
        return jnp.take(self.materialize(), ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x (..., D) against the (V, D) table → logits (..., V)
        (`dense_logits`)."""
        return dense_logits(x, self.materialize())

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array (nested leaves included)."""
        return sum(int(math.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in jax.tree_util.tree_leaves(self))

    def partition_specs(self, rows: str | None, cols: str | None, mesh: Mesh) -> Any:
        """PartitionSpecs of this leaf's arrays (same tree structure as the leaf).

        Default: every 2-D+ array is (rows', cols') like the dense weight (codes, values,
        masks, group scales), a 1-D array follows the columns.

        Args:
            rows: mesh axis of the dense weight's rows (K of a kernel, V of a table), or None.
            cols: mesh axis of its columns (N, D), or None.
            mesh: the mesh (a dimension its axis does not divide stays replicated).

        Returns:
            This leaf's class holding a `PartitionSpec` in place of each array.
        """
        return jax.tree_util.tree_map(
            lambda a: axis_spec(a.shape, {0: rows, 1: cols} if a.ndim >= 2 else {0: cols}, mesh),
            self)

    def viewed_as(self, shape: tuple[int, ...]) -> Any:
        """This kernel seen with another logical shape of the same leading dim and size
        (e.g. a DenseGeneral kernel (K, H, D) as (K, H·D)); default: unchanged.

        Args:
            shape: the logical shape wanted.

        Returns:
            A leaf whose `linear` computes with that shape.
        """
        return self

    def add_dense(self, delta: jax.Array) -> Any:
        """This weight plus a dense delta of its shape; default: a plain dense array.

        Args:
            delta: a dense array of the weight's shape (e.g. a LoRA adapter's a·b·scale).

        Returns:
            The sum, as closely as the representation holds it (subclasses say whether their
            result is exact or re-rounded).
        """
        dense = self.materialize()
        return dense + delta.astype(dense.dtype)


def _accumulation(dtype: Any) -> Any:
    """float32 for inputs narrower than float32 (bfloat16, float16), else None (x's own)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) @ a plain (K, N) weight in x's dtype, accumulated in float32.

    A bfloat16 (or float16) product sums in float32 and rounds once, as torch does: more
    accurate, and on XLA's CPU backend ~5x faster than a bfloat16 result (that dot takes
    its bf16 GEMM library path; 512 × 576 × 1536 measured 1.5 ms against 7.5 ms).

    Args:
        x: the activations (..., K).
        w: the kernel (K, N), any float dtype (cast to x's).

    Returns:
        (..., N) in x's dtype.

    Example:
        >>> dense_matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4))).dtype
        dtype(bfloat16)
    """
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=_accumulation(x.dtype)
                      ).astype(x.dtype)


def dense_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """A tied output head on a plain (V, D) table: x (..., D) · tableᵀ → logits (..., V).

    Logits are float32 whatever the activations (bfloat16 ones are multiplied as bfloat16
    and accumulated in float32): softmax, sampling and perplexity want them unrounded, and
    a bf16 copy of (tokens × vocab) would cost a pass to write and another to widen.

    Args:
        x: the hidden states (..., D).
        table: the embedding table (V, D), cast to x's dtype.

    Returns:
        (..., V) logits, float32 for float32 or narrower x (x's dtype if wider).

    Example:
        >>> dense_logits(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((5, 3))).dtype
        dtype('float32')
    """
    return as_logits(jnp.einsum("...d,vd->...v", x, table.astype(x.dtype),
                                preferred_element_type=_accumulation(x.dtype)))


def as_logits(y: jax.Array) -> jax.Array:
    """Logits as every output head gives them: float32 (or wider), narrow ones widened.

    Args:
        y: logits in any float dtype.

    Returns:
        y as float32 if it was narrower (bfloat16, float16), else y itself.

    Example:
        >>> as_logits(jnp.ones(2, jnp.bfloat16)).dtype
        dtype('float32')
    """
    return y if jnp.dtype(y.dtype).itemsize >= 4 else y.astype(jnp.float32)


def axis_spec(shape: tuple[int, ...], dims: Mapping[int, str | None], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose dim d goes on mesh axis dims[d].

    A dim the axis does not divide (or of size 1, e.g. one group of scales) is replicated.

    Args:
        shape: the array's shape.
        dims: dimension → mesh axis name (None: replicated).
        mesh: the mesh whose axis sizes decide divisibility.

    Returns:
        The `PartitionSpec` (trailing replicated dims left out).

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> axis_spec((8, 4), {1: "model"}, mesh)
        P(None, 'model')
    """
    parts: list[str | None] = [None] * len(shape)
    for dim, axis in dims.items():
        if axis is not None and dim < len(shape) and shape[dim] > 1 \
                and shape[dim] % mesh.shape[axis] == 0:
            parts[dim] = axis
    while parts and parts[-1] is None:
        parts.pop()
    return PartitionSpec(*parts)


def specs_of(weight: Any, rows: str | None, cols: str | None, mesh: Mesh) -> Any:
    """Specs of a weight that may be a leaf or a plain 2-D array (e.g. a low-rank factor).

    Args:
        weight: a `WeightLeaf` or an array.
        rows: mesh axis of the dense weight's rows, or None.
        cols: mesh axis of its columns, or None.
        mesh: the mesh.

    Returns:
        The leaf's `partition_specs(rows, cols, mesh)`, or one `PartitionSpec` for an array.

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> specs_of(np.zeros((8, 4)), "model", None, mesh)
        P('model',)
    """
    if isinstance(weight, WeightLeaf):
        return weight.partition_specs(rows, cols, mesh)
    return axis_spec(weight.shape, {0: rows, 1: cols}, mesh)


def leaf_classes() -> dict[str, type]:
    """Every weight representation defined so far, by class name (artifacts use the name).

    Returns:
        A copy of the registry: class name → class.

    Example:
        >>> import jaxopt_llm.weights
        >>> "QuantizedWeight" in leaf_classes()
        True
    """
    return dict(_BY_NAME)


__all__ = ["WeightLeaf", "axis_spec", "leaf_classes", "specs_of"]
