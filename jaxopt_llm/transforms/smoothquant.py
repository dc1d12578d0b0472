"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

"SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models"
(Xiao et al., ICML 2023). A few input channels of a linear carry activations far larger
than the rest, so per-token int8 activations lose the small ones. For each group of
linears reading the same input x (K channels; `FamilySpec.scaling_groups`), with
max|x_j| over the calibration tokens and max|W_j| over the group's kernels' row j,

    s_j = max|x_j|^α / max|W_j|^(1-α)      (α = 0.5 by default, the paper's choice)

and x·W = (x/s)·(diag(s)·W) is applied exactly (`scaling.apply_scales`: folded into the
norm or linear before, or kept in a `ScaledInputWeight`). The `smoothquant` op only
smooths — the model's float outputs do not change — so a recipe follows it with the W8A8
`quantize` stage (int8 per-channel weights, dynamic per-token int8 activations). Channels
that never activated on the calibration data (or whose weights are all zero) keep s = 1.

Smoothing does not change the float model, so the statistics of every block come from
one float pass; the blocks are still visited in order by `layer_sequential`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_llm import tree
from jaxopt_llm.calibration import BlockContext, Calibration, layer_sequential
from jaxopt_llm.transforms.base import Op, OpOptions, check_finite_number
from jaxopt_llm.transforms.layerwise import block_selection, inside
from jaxopt_llm.transforms.scaling import apply_scales, block_groups, with_unit_scales

SCALE_FLOOR = 1e-5  # the paper's clamp on s


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuantOptions(OpOptions):
    """How much of the activations' range moves into the weights.

    Example:
        >>> SmoothQuantOptions(alpha=0.8).alpha
        0.8
    """

    alpha: float = 0.5  # migration strength in [0, 1]: 0 leaves x, 1 moves it all into W

    def validate(self) -> None:
        """Raise a ValueError naming the bad option.

        Example:
            >>> SmoothQuantOptions(alpha=-0.1)
            Traceback (most recent call last):
            ...
            ValueError: alpha must be in [0.0, 1.0], got -0.1
        """
        check_finite_number("alpha", self.alpha, low=0.0, high=1.0)


def smoothing_scales(act_max: jax.Array, weight_max: jax.Array, alpha: float) -> jax.Array:
    """s_j = max|x_j|^α / max|W_j|^(1-α), floored at 1e-5; 1 where either maximum is 0.

    Args:
      act_max: max |x_j| per input channel over the calibration tokens (K,).
      weight_max: max |W_jn| over the group's outputs n, per input channel (K,).
      alpha: migration strength in [0, 1].

    Returns:
      s (K,) float32, positive.

    Example:
      >>> smoothing_scales(jnp.array([16.0, 0.0]), jnp.array([1.0, 2.0]), 0.5).tolist()
      [4.0, 1.0]
    """
    act_max = jnp.asarray(act_max, jnp.float32)
    weight_max = jnp.asarray(weight_max, jnp.float32)
    live = (act_max > 0) & (weight_max > 0)
    s = jnp.power(jnp.where(live, act_max, 1.0), alpha) / jnp.power(
        jnp.where(live, weight_max, 1.0), 1.0 - alpha)
    return jnp.where(live, jnp.maximum(s, SCALE_FLOOR), 1.0)


def _group_weight_max(block: Mapping[str, Any], names: tuple[str, ...]) -> jax.Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(block[f"{name}/kernel"]), axis=1)
                              for name in names]), axis=0)


def _smooth_plan(flat: Mapping[str, Any], paths: list[str], config: Any,
                 options: SmoothQuantOptions) -> tuple[Any, dict[str, Any]]:
    """Shapes of the result (ones stand in for the scales); every check before work."""
    by_block = block_selection(flat, paths, config, "smoothquant")
    return config, jax.eval_shape(lambda f: with_unit_scales(config, f, by_block), dict(flat))


def _smooth_apply(flat: Mapping[str, Any], paths: list[str], config: Any,
                  options: SmoothQuantOptions, *,
                  calibration: Calibration) -> tuple[Any, dict[str, Any]]:
    """Smooth every group holding a selected linear (float; outputs unchanged)."""
    _smooth_plan(flat, paths, config, options)
    by_block = block_selection(flat, paths, config, "smoothquant")

    def compress(context: BlockContext) -> Any:
        block = tree.flatten(context.params)
        names = [inside(p, context.path).rsplit("/", 1)[0] for p in by_block[context.index]]
        for group in block_groups(config, block, names):
            act_max = context.stats[group.selected[0]].abs_max
            scaled = group.linears if group.foldable else group.selected
            scale = smoothing_scales(act_max, _group_weight_max(block, scaled),
                                     float(options.alpha))
            block = apply_scales(block, group, scale)
        return tree.unflatten(block)

    params = layer_sequential(config, tree.unflatten(flat), calibration, compress,
                              blocks=list(by_block))
    return config, tree.flatten(params)


OPS = (
    Op(name="smoothquant", options=SmoothQuantOptions, apply=_smooth_apply,
       plan=_smooth_plan, traceable=False, needs_calibration=True,
       doc="SmoothQuant: migrate activation outliers into the weights (float, exact); "
           "follow with W8A8 quantize"),
)

__all__ = ["SmoothQuantOptions", "smoothing_scales"]
