"""Weight leaves and the single projection entry point every model calls.

Models never know how a weight is stored: they call `linear(x, w)` for every
projection, `embed(table, ids)` for lookups and `attend(x, table)` for a tied
output head. A plain weight is a `jax.Array`; transformed representations
(quantized, low-rank, sparse) register their own implementation with
`register_linear` / `register_embedding`, so adding a representation never
touches a model.

Shapes: a linear kernel is stored Flax-style, (d_in, d_out); an embedding
table is (vocab, d_model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LinearFn = Callable[[jax.Array, Any], jax.Array]

_LINEAR: dict[type, LinearFn] = {}
_EMBED: dict[type, Callable[[Any, jax.Array], jax.Array]] = {}
_ATTEND: dict[type, LinearFn] = {}
_NBYTES: dict[type, Callable[[Any], int]] = {}


def register_linear(
    leaf_type: type,
    *,
    linear_fn: LinearFn,
    embed_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
    attend_fn: LinearFn | None = None,
    nbytes_fn: Callable[[Any], int] | None = None,
) -> None:
    """Teach `linear` (and optionally `embed`, `attend`, `nbytes`) a new weight type."""
    _LINEAR[leaf_type] = linear_fn
    if embed_fn is not None:
        _EMBED[leaf_type] = embed_fn
    if attend_fn is not None:
        _ATTEND[leaf_type] = attend_fn
    if nbytes_fn is not None:
        _NBYTES[leaf_type] = nbytes_fn


def _lookup(table: dict[type, Callable], w: Any, what: str) -> Callable | None:
    if isinstance(w, (jax.Array, np.ndarray)):
        return None
    for klass in type(w).__mro__:
        if klass in table:
            return table[klass]
    raise TypeError(f"{what}: no implementation registered for weight type {type(w).__name__}")


def linear(x: jax.Array, w: Any) -> jax.Array:
    """x (..., d_in) @ w (d_in, d_out) -> (..., d_out), whatever w's representation."""
    fn = _lookup(_LINEAR, w, "linear")
    if fn is None:
        return jnp.matmul(x, w.astype(x.dtype))
    return fn(x, w)


def embed(table: Any, ids: jax.Array) -> jax.Array:
    """Rows of a (vocab, d) table for integer ids (...,) -> (..., d)."""
    fn = _lookup(_EMBED, table, "embed")
    if fn is None:
        return jnp.take(table, ids, axis=0)
    return fn(table, ids)


def attend(x: jax.Array, table: Any) -> jax.Array:
    """Tied output head: x (..., d) against a (vocab, d) table -> logits (..., vocab)."""
    fn = _lookup(_ATTEND, table, "attend")
    if fn is None:
        return jnp.einsum("...d,vd->...v", x, table.astype(x.dtype))
    return fn(x, table)


def materialize(tree: Any) -> Any:
    """Dense float arrays in place of every typed leaf (plain arrays pass through)."""

    def dense(node: Any) -> Any:
        return node.materialize() if is_weight_leaf(node) else node

    return jax.tree_util.tree_map(dense, tree, is_leaf=is_weight_leaf)


def registered_leaf_types() -> dict[str, type]:
    """Every registered weight representation by class name (artifacts serialize by this name)."""
    return {klass.__name__: klass for klass in _LINEAR}


def is_weight_leaf(node: Any) -> bool:
    """True for an instance of a registered representation (treated as one weight)."""
    return any(klass in _LINEAR for klass in type(node).__mro__)


def param_bytes(tree: Any) -> int:
    """Bytes the parameter tree really stores (registered leaves report their own size)."""
    total = 0

    def visit(node: Any) -> Any:
        nonlocal total
        for klass in type(node).__mro__:
            if klass in _NBYTES:
                total += _NBYTES[klass](node)
                return None
        if hasattr(node, "shape") and hasattr(node, "dtype"):  # arrays and ShapeDtypeStructs
            total += int(np.prod(node.shape, dtype=np.int64)) * np.dtype(node.dtype).itemsize
        return None

    jax.tree_util.tree_map(visit, tree, is_leaf=is_weight_leaf)
    return total
