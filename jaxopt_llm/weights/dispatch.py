"""The single projection entry point every model calls, and tree-wide weight helpers.

Models never know how a weight is stored: they call `linear(x, w)` for every
projection, `embed(table, ids)` for lookups and `attend(x, table)` for a tied output
head. A plain weight is an array; a typed one (`WeightLeaf`) runs its own method, so
adding a representation never touches a model.

Shapes: a linear kernel is stored Flax-style, (d_in, d_out); an embedding table is
(vocab, d_model).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.weights import native
from jaxopt_llm.weights.base import WeightLeaf, dense_logits, dense_matmul


def _check_weight(w: Any, what: str) -> None:
    if not isinstance(w, (jax.Array, np.ndarray)):
        raise TypeError(f"{what}: weight of type {type(w).__name__} is neither an array nor a "
                        "WeightLeaf")


def linear(x: jax.Array, w: Any) -> jax.Array:
    """x (..., d_in) @ w (d_in, d_out) → (..., d_out), whatever w's representation.

    Args:
        x: the activations (..., d_in).
        w: a kernel (d_in, d_out): a plain array or a `WeightLeaf` (which runs its own
            `linear`).

    Returns:
        The projection (..., d_out), in x's dtype (bfloat16 inputs accumulate in float32).

    Example:
        >>> linear(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
        (2, 4)
    """
    if isinstance(w, WeightLeaf):
        return w.linear(x)
    _check_weight(w, "linear")
    if native.path_in_use()[0]:  # None: not handled (rows, dtype, backend)
        rows = math.prod(x.shape[:-1])
        y = native.native_dense_matmul(x.reshape(rows, x.shape[-1]), w)
        if y is not None:
            return y.reshape(*x.shape[:-1], w.shape[1])
    return dense_matmul(x, w)


def embed(table: Any, ids: jax.Array) -> jax.Array:
    """Rows of a (vocab, d) table for integer ids (...,) → (..., d).

    Args:
        table: the embedding table (vocab, d): a plain array or a `WeightLeaf`.
        ids: integer token ids of any shape.

    Returns:
        The rows, shape ids.shape + (d,).

    Example:
        >>> embed(jnp.eye(4), jnp.array([1, 3])).shape
        (2, 4)
    """
    if isinstance(table, WeightLeaf):
        return table.embed(ids)
    _check_weight(table, "embed")
    return jnp.take(table, ids, axis=0)


def attend(x: jax.Array, table: Any) -> jax.Array:
    """Tied output head: x (..., d) against a (vocab, d) table → logits (..., vocab).

    Args:
        x: the hidden states (..., d).
        table: the embedding table (vocab, d): a plain array or a `WeightLeaf`.

    Returns:
        The logits x · tableᵀ, shape (..., vocab), float32 (also for bfloat16 x).

    Example:
        >>> attend(jnp.ones((2, 3)), jnp.ones((5, 3))).shape
        (2, 5)
    """
    if isinstance(table, WeightLeaf):
        return table.attend(x)
    _check_weight(table, "attend")
    return dense_logits(x, table)


def is_weight_leaf(node: Any) -> bool:
    """True for a typed weight representation (treated as one parameter).

    Args:
        node: anything found in a parameter tree.

    Returns:
        Whether `node` is a `WeightLeaf` (use as `is_leaf=` in `jax.tree_util` calls).

    Example:
        >>> is_weight_leaf(jnp.ones(2))
        False
    """
    return isinstance(node, WeightLeaf)


def materialize(tree: Any) -> Any:
    """Dense float arrays in place of every typed leaf (plain arrays pass through).

    Args:
        tree: a parameter tree (or a single weight).

    Returns:
        The same tree with each `WeightLeaf` replaced by its `materialize()`.

    Example:
        >>> materialize({"w": jnp.ones(2)})["w"].shape
        (2,)
    """
    return jax.tree_util.tree_map(
        lambda node: node.materialize() if isinstance(node, WeightLeaf) else node,
        tree, is_leaf=is_weight_leaf)


def param_bytes(tree: Any) -> int:
    """Bytes the parameter tree really stores (packed codes, scales and masks included).

    Args:
        tree: a parameter tree, a single weight, or their `jax.ShapeDtypeStruct`s.

    Returns:
        The total bytes: each typed leaf's `nbytes`, each array's size × itemsize.

    Example:
        >>> param_bytes({"w": jnp.ones((2, 3), jnp.float32)})
        24
    """
    total = 0
    for node in jax.tree_util.tree_leaves(tree, is_leaf=is_weight_leaf):
        if isinstance(node, WeightLeaf):
            total += node.nbytes
        elif hasattr(node, "shape") and hasattr(node, "dtype"):  # arrays, ShapeDtypeStructs
            total += int(np.prod(node.shape, dtype=np.int64)) * np.dtype(node.dtype).itemsize
    return total
