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
    """A frozen base weight (any representation) plus a trainable low-rank delta.

    y = linear(x, base) + (x @ a) @ b · scale, with `a` (K, r), `b` (r, N) and the static
    `scale` = alpha / r. Made by `add_lora`, folded into its base by `merge_lora`.

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoRAWeight(base=jnp.eye(2), a=jnp.ones((2, 1)), b=jnp.ones((1, 2)), scale=0.5)
        >>> w.materialize().tolist()
        [[1.5, 0.5], [0.5, 1.5]]
    """
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
    """Wrap every 2-D kernel whose path fully matches `match` in a LoRAWeight of `rank`.

    `a` starts random (normal / sqrt(K)), `b` zero, so the wrapped model computes exactly
    what it did before; the base weights stay as they are (any representation).

    Args:
        params: the parameter tree.
        match: a regex `re.fullmatch`ed against "/"-joined parameter paths (e.g.
            `rules.BLOCK_LINEARS`); it must select at least one parameter.
        rank: the adapters' rank r, below min(K, N) of every selected kernel.
        alpha: the LoRA scale numerator (scale = alpha / rank); default rank (scale 1).
        seed: seed of `a`'s initialisation.

    Returns:
        A new tree with `LoRAWeight`s at the selected paths.

    Example:
        >>> import jax.numpy as jnp
        >>> wrapped = add_lora({"dense": {"kernel": jnp.ones((4, 3))}}, ".*kernel", rank=2)
        >>> type(wrapped["dense"]["kernel"]).__name__
        'LoRAWeight'
    """
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
    grid cannot hold the delta exactly), a masked base keeps its sparsity pattern.

    Args:
        params: a parameter tree holding `LoRAWeight`s (other leaves pass through).

    Returns:
        A new tree without adapters.

    Example:
        >>> import jax.numpy as jnp
        >>> lora = LoRAWeight(base=jnp.eye(2), a=jnp.ones((2, 1)), b=jnp.ones((1, 2)), scale=0.5)
        >>> merge_lora({"kernel": lora})["kernel"].tolist()
        [[1.5, 0.5], [0.5, 1.5]]
    """

    def fold(leaf: Any) -> Any:
        if not isinstance(leaf, LoRAWeight):
            return leaf
        delta = leaf.a @ leaf.b * leaf.scale
        if is_weight_leaf(leaf.base):
            return leaf.base.add_dense(delta)
        return leaf.base + delta.astype(leaf.base.dtype)

    return jax.tree_util.tree_map(fold, params, is_leaf=is_weight_leaf)
