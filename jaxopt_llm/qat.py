"""Quantization-aware training helpers: convert fake-quant leaves to integers, and the
gradual pruning schedule.

`convert` turns every `FakeQuantWeight` into the `QuantizedWeight` that computes exactly
what the fake-quantized forward computed (same grid: ranges recomputed from the trained
master weight, or the learned LSQ step sizes; float32 scales), so a QAT model can be
saved as a real integer artifact.

Gradual magnitude pruning ("To prune, or not to prune", Zhu & Gupta, 2017): sparsity
s_t = s_f·(1 − (1 − (t − t₀)/(T − t₀))³) for t₀ ≤ t ≤ T, masks recomputed every
`every` steps; masked weights stay exactly zero between recomputations (MaskedWeight).
"""

from __future__ import annotations

from typing import Any

import jax

from jaxopt_llm.rules import flat_params, nested_params
from jaxopt_llm.transforms.prune import MagnitudeOptions, magnitude_prune
from jaxopt_llm.weights import (
    FakeQuantWeight,
    QuantizedWeight,
    is_weight_leaf,
    quantize_weight,
    quantize_with_scale,
)


def convert_leaf(leaf: FakeQuantWeight) -> QuantizedWeight:
    if leaf.learned:  # the learned step sizes define the grid
        return quantize_with_scale(leaf.w, leaf.spec, leaf.step_sizes(), leaf.zero,
                                   axis=leaf.axis)
    return quantize_weight(leaf.w, leaf.spec, axis=leaf.axis, method=leaf.method,
                           clip_ratio=leaf.clip_ratio, scale_dtype="float32")


def convert(params: Any) -> Any:
    """Every FakeQuantWeight → QuantizedWeight (other leaves unchanged)."""
    return jax.tree_util.tree_map(
        lambda leaf: convert_leaf(leaf) if isinstance(leaf, FakeQuantWeight) else leaf,
        params, is_leaf=is_weight_leaf)


def polynomial_sparsity(step: int, final: float, start: int, end: int) -> float:
    """s_t = s_f·(1 − (1 − (t − t₀)/(T − t₀))³), 0 before t₀ and s_f after T."""
    if not 0.0 <= final < 1.0:
        raise ValueError(f"final sparsity must be in [0, 1), got {final}")
    if not 0 <= start < end:
        raise ValueError(f"need 0 <= start < end, got start={start}, end={end}")
    if step <= start:
        return 0.0
    progress = min(1.0, (step - start) / (end - start))
    return final * (1.0 - (1.0 - progress) ** 3)


def reprune(params: Any, paths: list[str], sparsity: float, scope: str = "layer") -> Any:
    """Recompute magnitude masks of `paths` at `sparsity` (already-pruned zeros stay pruned:
    they are the smallest magnitudes)."""
    flat = flat_params(params)
    _, flat = magnitude_prune(flat, paths, None,
                              MagnitudeOptions(sparsity=sparsity, scope=scope, format="masked"))
    return nested_params(flat)
