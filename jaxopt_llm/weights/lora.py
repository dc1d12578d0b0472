"""`LoRAWeight`: a frozen base weight (any representation) plus a trainable low-rank delta.

"LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021); on quantized or
pruned bases as in "QLoRA" (Dettmers et al., 2023): y = linear(x, base) + (x @ a) @ b ·
scale, with a (K, r) random and b (r, N) zero so training starts from the base model.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from jaxopt_llm import tree
from jaxopt_llm.weights.base import WeightLeaf, axis_spec, specs_of
from jaxopt_llm.weights.dispatch import is_weight_leaf, linear, materialize


@struct.dataclass
class LoRAWeight(WeightLeaf):
    base: Any  # (K, N) in any representation; frozen in training by the trainable rule
    a: jax.Array  # (K, r)
    b: jax.Array  # (r, N)
    scale: float = struct.field(pytree_node=False, default=1.0)  # alpha / r

    def materialize(self) -> jax.Array:
        dense = materialize(self.base)
        return dense + (self.a @ self.b * self.scale).astype(dense.dtype)

    def linear(self, x: jax.Array) -> jax.Array:
        return linear(x, self.base) + (x @ self.a.astype(x.dtype)) @ (
            self.b.astype(x.dtype) * jnp.asarray(self.scale, x.dtype))

    def partition_specs(self, rows: str | None, cols: str | None, mesh: Mesh) -> LoRAWeight:
        """The base as its own weight, a like a column factor u and b like v."""
        return self.replace(base=specs_of(self.base, rows, cols, mesh),
                            a=axis_spec(self.a.shape, {0: rows}, mesh),
                            b=axis_spec(self.b.shape, {1: cols}, mesh))


def add_lora(params: Any, match: str, *, rank: int, alpha: float | None = None,
             seed: int = 0) -> Any:
    """Wrap every 2-D kernel whose path fully matches `match` in a LoRAWeight of `rank`."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    flat = tree.flatten(params)
    chosen = [p for p in flat if re.fullmatch(match, p)]
    if not chosen:
        raise ValueError(f"LoRA match {match!r} selects no parameter")
    key = jax.random.key(seed)
    for index, path in enumerate(chosen):
        leaf = flat[path]
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) != 2:
            raise ValueError(f"{path}: LoRA wraps 2-D kernels, got shape {shape}")
        k, n = shape
        if rank >= min(k, n):
            raise ValueError(f"{path}: LoRA rank {rank} must be below min{shape} = {min(k, n)}")
        a = jax.random.normal(jax.random.fold_in(key, index), (k, rank), jnp.float32)
        flat[path] = LoRAWeight(base=leaf, a=a / math.sqrt(k), b=jnp.zeros((rank, n)),
                                scale=(alpha if alpha is not None else rank) / rank)
    return tree.unflatten(flat)


def merge_lora(params: Any) -> Any:
    """Fold every LoRAWeight into its base with the base's own `add_dense`: float bases
    become base + a·b·scale, a quantized base is re-quantized with its own settings (its
    grid cannot hold the delta exactly), a masked base keeps its sparsity pattern."""

    def fold(leaf: Any) -> Any:
        if not isinstance(leaf, LoRAWeight):
            return leaf
        delta = leaf.a @ leaf.b * leaf.scale
        if is_weight_leaf(leaf.base):
            return leaf.base.add_dense(delta)
        return leaf.base + delta.astype(leaf.base.dtype)

    return jax.tree_util.tree_map(fold, params, is_leaf=is_weight_leaf)
