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

from jaxopt_llm.weights.dispatch import (
    is_weight_leaf,
    linear,
    materialize,
    param_bytes,
    register_linear,
)


@struct.dataclass
class LoRAWeight:
    base: Any  # (K, N) in any representation; frozen in training by the trainable rule
    a: jax.Array  # (K, r)
    b: jax.Array  # (r, N)
    scale: float = struct.field(pytree_node=False, default=1.0)  # alpha / r

    def materialize(self) -> jax.Array:
        dense = materialize(self.base)
        return dense + (self.a @ self.b * self.scale).astype(dense.dtype)


register_linear(
    LoRAWeight,
    linear_fn=lambda x, w: linear(x, w.base) + (x @ w.a.astype(x.dtype)) @ (
        w.b.astype(x.dtype) * jnp.asarray(w.scale, x.dtype)),
    nbytes_fn=lambda w: param_bytes(w.base) + param_bytes(w.a) + param_bytes(w.b),
)


def add_lora(params: Any, match: str, *, rank: int, alpha: float | None = None,
             seed: int = 0) -> Any:
    """Wrap every 2-D kernel whose path fully matches `match` in a LoRAWeight of `rank`."""
    from jaxopt_llm.rules import flat_params, nested_params

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    flat = flat_params(params)
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
    return nested_params(flat)


def merge_lora(params: Any) -> Any:
    """Fold every LoRAWeight into its base: float bases become base + a·b·scale; a quantized
    base is re-quantized with its own settings (its grid cannot hold the delta exactly)."""
    from jaxopt_llm.weights.fake_quant import FakeQuantWeight
    from jaxopt_llm.weights.quantized import QuantizedWeight, quantize_weight
    from jaxopt_llm.weights.sparse import MaskedWeight, masked_weight

    def fold(leaf: Any) -> Any:
        if not isinstance(leaf, LoRAWeight):
            return leaf
        delta = leaf.a @ leaf.b * leaf.scale
        base = leaf.base
        if isinstance(base, QuantizedWeight):
            return quantize_weight(base.materialize() + delta, base.spec, axis=base.axis,
                                   act_bits=base.act_bits, compute=base.compute,
                                   scale_dtype=jnp.dtype(base.scale.dtype).name)
        if isinstance(base, MaskedWeight):  # keep the sparsity pattern
            return masked_weight(base.w + delta, base.dense_mask())
        if isinstance(base, FakeQuantWeight):
            return base.replace(w=base.w + delta)
        if is_weight_leaf(base):
            return base.materialize() + delta
        return base + delta.astype(base.dtype)

    return jax.tree_util.tree_map(fold, params, is_leaf=is_weight_leaf)
