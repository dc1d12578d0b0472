"""Unstructured magnitude pruning and N:M semi-structured pruning.

Magnitude pruning ("Learning both Weights and Connections for Efficient Neural
Networks", Han et al., 2015): score |w| and zero the lowest-scoring fraction —
exactly round(sparsity·count) entries — per layer, per output row (each output
channel loses the same number of inputs, as Wanda compares), or globally over every
selected parameter at once. N:M ("Accelerating Sparse Deep Neural Networks",
Mishra et al., 2021; the SparseGPT/Wanda convention): in every group of M consecutive
inputs of each output, the N smallest |w| are zeroed (2:4 keeps 2 of 4).

Kernels are (d_in, d_out): "rows" (outputs) are columns of the stored kernel, and
N:M groups run along d_in. Results are `MaskedWeight` (dense + 1-bit mask, so the
zeros survive training) or, for N:M, the compressed `NMSparseWeight`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.transforms.base import Op, OpOptions, per_parameter
from jaxopt_llm.weights import MaskedWeight, masked_weight, nm_sparse_weight

SCOPES = ("layer", "row", "global")
FORMATS = ("masked", "dense")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MagnitudeOptions(OpOptions):
    """Magnitude pruning: the fraction zeroed, where it is counted, how it is stored.

    Example:
        >>> MagnitudeOptions(sparsity=0.5).scope
        'layer'
    """

    sparsity: float = 0.5
    scope: str = "layer"  # layer | row (each output loses the same count) | global
    format: str = "masked"  # MaskedWeight, or a dense array with zeros

    def validate(self) -> None:
        """sparsity a number in [0, 1); scope "layer", "row" or "global"; format "masked" or
        "dense"."""
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NMOptions(OpOptions):
    """N:M pruning: n of every m consecutive inputs are zeroed.

    Example:
        >>> NMOptions(n=2, m=4).format
        'compressed'
    """

    n: int = 2
    m: int = 4
    format: str = "compressed"  # NMSparseWeight, or "masked" (MaskedWeight)

    def validate(self) -> None:
        """Integers 0 < n < m <= 256; format 'compressed' or 'masked'."""
        n, m = self.n, self.m
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)):
            raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
        if not 0 < n < m:
            raise ValueError(f"n:m needs 0 < n < m (n of every m inputs are zeroed), got {n}:{m}")
        if m > 256:
            raise ValueError(f"m must be at most 256, got {m}")
        if self.format not in ("compressed", "masked"):
            raise ValueError(f"format must be 'compressed' or 'masked', got {self.format!r}")


def dense_kernel(leaf: Any, path: str) -> jax.Array:
    """The float kernel a pruning op starts from: a plain 2-D array, or a `MaskedWeight`'s
    dense values (pruning further, as gradual schedules do).

    Args:
        leaf: the parameter.
        path: its path, for errors.

    Returns:
        The (K, N) float kernel.

    Raises:
        ValueError: a quantized or factorized leaf, or not a 2-D kernel, naming `path`.

    Example:
        >>> dense_kernel(jnp.ones((4, 2)), "w").shape
        (4, 2)
    """
    if isinstance(leaf, MaskedWeight):  # re-pruning (gradual schedules): the masked weight
        return _materialize(leaf)
    if not isinstance(leaf, jax.Array) and not hasattr(leaf, "__array__"):
        raise ValueError(f"{path}: pruning needs a float kernel, got {type(leaf).__name__} "
                         f"(prune before quantizing or factorizing)")
    if leaf.ndim != 2:
        raise ValueError(f"{path} has shape {leaf.shape}: pruning selects 2-D kernels only "
                         f"(narrow the rule's match)")
    return jnp.asarray(leaf)


@jax.jit
def _materialize(leaf: MaskedWeight) -> jax.Array:
    return leaf.materialize()


def lowest_mask(scores: jax.Array, count: int, axis: int | None = None) -> jax.Array:
    """Keep-mask that drops exactly `count` lowest scores (over all, or along `axis`).

    Ties are broken by position (the earlier one goes first), so exactly `count`
    entries are dropped whatever the scores.

    Args:
        scores: the importance of each entry (e.g. |w|).
        count: how many to drop (over the whole array, or per slice along `axis`).
        axis: None to rank all entries together, else rank within each slice along it.

    Returns:
        A boolean mask of scores' shape, False where dropped.

    Example:
        >>> import jax.numpy as jnp
        >>> lowest_mask(jnp.array([3.0, 1.0, 2.0, 0.0]), 2).tolist()
        [True, False, True, False]
    """
    if axis is None:
        if count == 0:
            return jnp.ones(scores.shape, jnp.bool_)
        if not isinstance(scores, jax.core.Tracer):  # concrete: O(n) selection on the host
            flat = np.asarray(scores).reshape(-1)
            keep = np.ones(flat.size, bool)
            keep[np.argpartition(flat, count - 1)[:count]] = False
            return jnp.asarray(keep.reshape(scores.shape))
        order = jnp.argsort(scores.reshape(-1), stable=True)
        keep = jnp.ones(scores.size, jnp.bool_).at[order[:count]].set(False)
        return keep.reshape(scores.shape)
    ranks = jnp.argsort(jnp.argsort(scores, axis=axis, stable=True), axis=axis, stable=True)
    return ranks >= count


def _finish(w: jax.Array, keep: jax.Array, fmt: str) -> Any:
    if fmt == "dense":
        return jnp.where(keep, w, jnp.zeros((), w.dtype))
    return masked_weight(w, keep)


def magnitude_prune(flat: Mapping[str, Any], paths: list[str], config: Any,
                    options: MagnitudeOptions) -> tuple[Any, dict[str, Any]]:
    """Magnitude-prune `paths` of a flat parameter mapping (the `prune` op's apply).

    Args:
        flat: the parameters, {"a/b/kernel": leaf} (read only).
        paths: the paths to prune.
        config: the model config, passed through.
        options: the `MagnitudeOptions`.

    Returns:
        (config, new mapping) with the selected weights pruned (`MaskedWeight`s, or dense
        arrays with zeros for format="dense").

    Example:
        >>> import jax.numpy as jnp
        >>> _, out = magnitude_prune({"w": jnp.array([[1.0, -4.0], [3.0, 0.5]])}, ["w"], None,
        ...                          MagnitudeOptions(sparsity=0.5, format="dense"))
        >>> out["w"].tolist()
        [[0.0, -4.0], [3.0, 0.0]]
    """
    sparsity, scope, fmt = options.sparsity, options.scope, options.format
    kernels = {p: dense_kernel(flat[p], p) for p in paths}
    flat = dict(flat)
    if scope == "global":
        scores = jnp.concatenate([jnp.abs(w).reshape(-1) for w in kernels.values()])
        keep_all = lowest_mask(scores, round(sparsity * scores.size))
        offset = 0
        for path, w in kernels.items():
            keep = keep_all[offset:offset + w.size].reshape(w.shape)
            offset += w.size
            flat[path] = _finish(w, keep, fmt)
        return config, flat
    for path, w in kernels.items():
        count = round(sparsity * (w.size if scope == "layer" else w.shape[0]))
        if scope == "layer" and not isinstance(w, jax.core.Tracer):
            # concrete weights: an O(n) host selection beats a full sort on device
            flat[path] = _finish_jit(w, lowest_mask(jnp.abs(w), count), fmt)
        else:
            flat[path] = _prune_one(w, count, scope, fmt)
    return config, flat


@partial(jax.jit, static_argnames=("fmt",))
def _finish_jit(w: jax.Array, keep: jax.Array, fmt: str) -> Any:
    return _finish(w, keep, fmt)


@partial(jax.jit, static_argnames=("count", "scope", "fmt"))
def _prune_one(w: jax.Array, count: int, scope: str, fmt: str) -> Any:
    keep = lowest_mask(jnp.abs(w), count, axis=None if scope == "layer" else 0)
    return _finish(w, keep, fmt)


def nm_keep_mask(w: jax.Array, n: int, m: int) -> jax.Array:
    """Keep-mask zeroing the n smallest |w| of every m consecutive inputs (along axis 0).

    Args:
        w: the kernel (K, N), K a multiple of m.
        n: entries zeroed per group.
        m: the group size.

    Returns:
        A boolean mask of w's shape keeping m − n entries of every group.

    Example:
        >>> import jax.numpy as jnp
        >>> nm_keep_mask(jnp.array([[1.0], [-3.0], [2.0], [0.5]]), 2, 4)[:, 0].tolist()
        [False, True, True, False]
    """
    k, cols = w.shape
    groups = jnp.abs(w).reshape(k // m, m, cols)
    return lowest_mask(groups, n, axis=1).reshape(k, cols)


def _nm_leaf(leaf: Any, path: str, options: NMOptions) -> Any:
    n, m = options.n, options.m
    w = dense_kernel(leaf, path)
    if w.shape[0] % m:
        raise ValueError(f"{path} {w.shape}: m={m} does not divide the input dimension "
                         f"{w.shape[0]}")
    return _nm_one(w, n, m, options.format)


@partial(jax.jit, static_argnames=("n", "m", "fmt"))
def _nm_one(w: jax.Array, n: int, m: int, fmt: str) -> Any:
    keep = nm_keep_mask(w, n, m)
    if fmt == "masked":
        return masked_weight(w, keep)
    return nm_sparse_weight(w, keep, m - n, m)


def _magnitude_apply(flat, paths, config, options):
    for path in paths:  # shapes first: no work on a bad selection
        if not isinstance(flat[path], MaskedWeight):
            dense_kernel(flat[path], path)
    return magnitude_prune(flat, paths, config, options)


OPS = (
    Op(name="prune", options=MagnitudeOptions, apply=_magnitude_apply,
       doc="magnitude pruning (per layer, per row or global)"),
    Op(name="nm", options=NMOptions, apply=per_parameter(_nm_leaf),
       doc="N:M pruning: zero the n smallest |w| of every m consecutive inputs"),
)
