"""Quantization-aware training: the trainable form of a recipe, and the conversion back
to integers.

`qat_recipe` rewrites a recipe for training: `quantize` rules become `fake_quant` on the
same grid (straight-through gradients to a float master weight); other rules are kept as
they are (an N:M rule's compressed leaf trains its kept values at fixed positions, so the
trained artifact keeps the recipe's storage).

`convert` turns every `FakeQuantWeight` into the `QuantizedWeight` that computes exactly
what the fake-quantized forward computed (same grid: ranges recomputed
from the trained master weight, or the learned LSQ step sizes; float32 scales), so a QAT
model can be saved as a real integer artifact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxopt_llm import tree
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.weights import (
    FakeQuantWeight,
    QuantizedWeight,
    quantize_weight,
    quantize_with_scale,
)

_FAKE_QUANT_KEYS = ("bits", "symmetric", "granularity", "group_size", "partial_groups")


def convert_leaf(leaf: FakeQuantWeight) -> QuantizedWeight:
    """The integer weight on the grid `leaf` was trained on.

    Args:
        leaf: a trained `FakeQuantWeight` (learned step sizes are used as they are; else
            the grid is recomputed from the weight's range, as in training).

    Returns:
        The `QuantizedWeight` computing what the fake-quantized forward computed.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.weights import FakeQuantWeight
        >>> fake = FakeQuantWeight(w=jnp.array([[0.2, -2.0], [1.0, 1.0]]), bits=8)
        >>> bool(jnp.allclose(convert_leaf(fake).materialize(), fake.materialize()))
        True
    """
    if leaf.learned:  # the learned step sizes define the grid
        return quantize_with_scale(leaf.w, leaf.spec, leaf.step_sizes(), leaf.zero,
                                   axis=leaf.axis)
    return quantize_weight(leaf.w, leaf.spec, axis=leaf.axis, method=leaf.method,
                           clip_ratio=leaf.clip_ratio, scale_dtype="float32")


def convert(params: Any) -> Any:
    """Every FakeQuantWeight → QuantizedWeight (other leaves unchanged; wrappers such as a
    `ScaledInputWeight` keep their fake-quantized kernel converted inside).

    Args:
        params: a parameter tree after quantization-aware training.

    Returns:
        The tree with integer weights.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.weights import FakeQuantWeight
        >>> out = convert({"kernel": FakeQuantWeight(w=jnp.ones((4, 2)), bits=4), "b": jnp.ones(2)})
        >>> type(out["kernel"]).__name__
        'QuantizedWeight'
    """
    return jax.tree_util.tree_map(
        lambda leaf: convert_leaf(leaf) if isinstance(leaf, FakeQuantWeight) else leaf,
        params, is_leaf=lambda node: isinstance(node, FakeQuantWeight))


def with_activation_bits(recipe: Recipe, params: Any) -> Any:
    """The recipe's W8A8 back on the converted weights: QAT trains the weights only
    (`fake_quant` has no activation rounding), so a `quantize` rule with `act_bits: 8`
    gets its per-token int8 activations again after `convert` — the artifact computes what
    its recipe says.

    Args:
        recipe: the recipe trained towards (first matching rule per stage, as applied).
        params: the converted parameter tree.

    Returns:
        The tree with `act_bits=8` on the QuantizedWeights (inside wrappers too) whose path
        a W8A8 `quantize` rule selects.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.recipes import load_recipe
        >>> from jaxopt_llm.weights import QuantSpec, quantize_weight
        >>> params = {"layers_0": {"mlp": {"up_proj": {"kernel": quantize_weight(
        ...     jnp.ones((8, 4)), QuantSpec(bits=8))}}}}
        >>> out = with_activation_bits(load_recipe("w8a8"), params)
        >>> out["layers_0"]["mlp"]["up_proj"]["kernel"].act_bits
        8
    """
    flat = tree.flatten(params)
    w8a8 = set()
    for stage in recipe.stages:
        for path in flat:
            rule = next((r for r in stage.rules if r.matches(path)), None)
            if rule is not None and rule.op == "quantize" and rule.option_dict.get("act_bits"):
                w8a8.add(path)
    for path in w8a8:
        flat[path] = jax.tree_util.tree_map(
            lambda leaf: leaf.replace(act_bits=8) if isinstance(leaf, QuantizedWeight) else leaf,
            flat[path], is_leaf=lambda node: isinstance(node, QuantizedWeight))
    return tree.unflatten(flat)


def trainable_leaf(leaf: QuantizedWeight) -> FakeQuantWeight:
    """A calibrated integer weight as the start of QAT: the fake-quantized float weight
    holding exactly its dequantized values, with its step sizes (and zero points) as
    LSQ's learned scales, so training starts from the calibrated model itself.

    Args:
        leaf: a QuantizedWeight with an integer zero point or none (float offsets have no
            LSQ form).

    Returns:
        A FakeQuantWeight whose forward equals `leaf.materialize()`.

    Raises:
        ValueError: for a float-offset grid.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.weights import QuantSpec, quantize_weight
        >>> q = quantize_weight(jnp.array([[0.3, -1.0], [2.0, 0.5]]), QuantSpec(bits=4))
        >>> bool(jnp.allclose(trainable_leaf(q).materialize(), q.materialize()))
        True
    """
    if leaf.zero == "float":
        raise ValueError("QAT cannot start from a float-offset grid (zero: float has no "
                         "learned-scale form); use a recipe with integer zero points")
    scale, zero = leaf._canonical_scale_zero()
    return FakeQuantWeight(
        w=leaf.materialize(), bits=leaf.bits, symmetric=leaf.symmetric,
        granularity=leaf.granularity, group_size=leaf.group_size,
        partial_groups=leaf.partial_groups, axis=leaf.axis,
        method="absmax" if leaf.symmetric else "minmax",
        scale=scale.astype(jax.numpy.float32), zero=zero)


def trainable_quantized(params: Any) -> Any:
    """Every QuantizedWeight (inside wrappers too) → `trainable_leaf`'s FakeQuantWeight.

    Args:
        params: a parameter tree after a calibrated recipe.

    Returns:
        The tree ready for QAT (its forward pass unchanged).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.weights import QuantSpec, quantize_weight
        >>> params = {"k": quantize_weight(jnp.ones((4, 2)), QuantSpec(bits=4))}
        >>> type(trainable_quantized(params)["k"]).__name__
        'FakeQuantWeight'
    """
    return jax.tree_util.tree_map(
        lambda leaf: trainable_leaf(leaf) if isinstance(leaf, QuantizedWeight) else leaf,
        params, is_leaf=lambda node: isinstance(node, QuantizedWeight))


def qat_recipe(recipe: Recipe, *, learn_scale: bool = False) -> Recipe:
    """The trainable form of a recipe: quantize → fake_quant (same grid; with LSQ step
    sizes if `learn_scale`); every other rule unchanged.

    Args:
        recipe: the recipe to train towards.
        learn_scale: also learn the quantization step sizes (LSQ).

    Returns:
        A new recipe named "<name>-qat".

    Example:
        >>> from jaxopt_llm.recipes import load_recipe
        >>> qat_recipe(load_recipe("w4")).stages[0].rules[0].describe()
        'fake_quant(bits=4, symmetric=False)'
    """
    stages = []
    for stage in recipe.stages:
        rules = []
        for rule in stage.rules:
            options = rule.option_dict
            if rule.op == "quantize":
                fake = {k: v for k, v in options.items() if k in _FAKE_QUANT_KEYS}
                if options.get("method") in ("absmax", "minmax"):
                    fake["method"] = options["method"]
                if learn_scale:
                    fake["learn_scale"] = True
                rule = dataclasses.replace(rule, op="fake_quant", options=tuple(fake.items()))
            rules.append(rule)
        stages.append(Stage(name=stage.name, rules=tuple(rules)))
    return Recipe(name=f"{recipe.name}-qat", description=recipe.description,
                  stages=tuple(stages))
