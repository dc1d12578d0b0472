"""AWQ: activation-aware weight quantization.

"AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration" (Lin et
al., MLSys 2024). Weights that meet large activations matter most; scaling their input
channel up before rounding gives them finer steps. Per block (layer-sequential: each
block sees the outputs of the blocks already quantized), for each group of linears that
read the same input x (K channels; `FamilySpec.scaling_groups`):

  1. s_X = mean |x_j| over the calibration tokens (K,);
  2. for α in {0, 1/grid, …, (grid-1)/grid}: s = s_X^α / √(max · min) (floored at 1e-4
     before normalising), the group's selected kernels W (K, N) become Q(diag(s)·W)/s
     (round-to-nearest on the op's grid; the block's other linears stay float), and the
     block is run on `search_windows` calibration windows; the error is the mean squared
     difference to the float block's output on the same inputs;
  3. the α with the smallest error wins (α = 0, plain rounding, is always a candidate, so
     the chosen scales are never worse on this error), and x·W = (x/s)·(diag(s)·W) is
     applied exactly: 1/s folds into the norm or linear before (`scaling.apply_scales`),
     or, where nothing can absorb it, the leaf keeps s (`ScaledInputWeight`);
  4. clipping: per group of the grid (and output column), the range [lo, hi] shrinks by
     r ∈ {1, 1 - max_shrink/clip_grid, …} to minimise that group's share of the output
     error, e_gᵀ (X_gᵀX_g) e_g with e_g = w_g - Q_r(w_g), using the Gram matrix of the
     (scaled) inputs over all calibration tokens (the authors' code samples 512 tokens).

The result is the same `QuantizedWeight` round-to-nearest produces (with the searched
grid), wrapped in a `ScaledInputWeight` where the scales could not be folded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import tree
from jaxopt_llm.calibration import BlockContext, BlockRunner, Calibration, layer_sequential
from jaxopt_llm.transforms.base import Op, check_finite_number, per_parameter
from jaxopt_llm.transforms.layerwise import block_selection, inside
from jaxopt_llm.transforms.quantize import (
    GridOptions,
    check_scale_dtype,
    quantize_leaf,
    rtn_options,
)
from jaxopt_llm.transforms.scaling import (
    apply_scales,
    block_groups,
    with_unit_scales,
)
from jaxopt_llm.weights.quant_math import (
    QuantSpec,
    group_range,
    grouped,
    quantize_dequantize_grouped,
    scale_and_zero,
    shrunk_range,
    ungrouped,
)
from jaxopt_llm.weights.quantized import QuantizedWeight, assemble_codes
from jaxopt_llm.weights.scaled_input import ScaledInputWeight

SCALE_FLOOR = 1e-4  # activation magnitudes below this count as this (dead channels)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQOptions(GridOptions):
    """AWQ onto the `quantize` op's grid (bits, symmetric, granularity, group_size,
    partial_groups, zero, scale_dtype), plus the searches' settings.

    Example:
        >>> AWQOptions(bits=4, symmetric=False, group_size=128).grid
        20
    """

    zero: str = "integer"  # asymmetric grids: uint8 zero point, or "float" offset w = u·d + m
    scale_dtype: str | None = None  # float16 for group scales, float32 otherwise
    grid: int = 20  # α candidates 0, 1/grid, …, (grid-1)/grid
    alpha: float | None = None  # a fixed α in [0, 1] instead of the search
    search_windows: int = 2  # calibration windows the α search runs each block on
    clip: bool = True  # search a clipping ratio per group after scaling
    clip_grid: int = 20  # clip ratios tried: 1 - clip_max_shrink · i / clip_grid
    clip_max_shrink: float = 0.5

    @property
    def spec(self) -> QuantSpec:
        """The grid these options describe (validated)."""
        return self._spec(self.zero)

    def validate(self) -> None:
        """Raise a ValueError naming the first bad option.

        Example:
            >>> AWQOptions(alpha=1.5)
            Traceback (most recent call last):
            ...
            ValueError: alpha must be in [0.0, 1.0], got 1.5
        """
        self.spec  # noqa: B018  (validates bits, granularity, group size and zero)
        check_scale_dtype(self.scale_dtype)
        _positive_int("grid", self.grid)
        _positive_int("search_windows", self.search_windows)
        _positive_int("clip_grid", self.clip_grid)
        if self.alpha is not None:
            check_finite_number("alpha", self.alpha, low=0.0, high=1.0)
        if not isinstance(self.clip, bool):
            raise ValueError(f"clip must be true or false, got {self.clip!r}")
        check_finite_number("clip_max_shrink", self.clip_max_shrink, low=0.0, high=1.0,
                            open_high=True)

    @property
    def alphas(self) -> np.ndarray:
        """The α values the search tries (one when `alpha` is fixed)."""
        if self.alpha is not None:
            return np.array([self.alpha], np.float32)
        return np.arange(self.grid, dtype=np.float32) / self.grid

    @property
    def storage_dtype(self) -> str:
        """The scale dtype actually stored (float16 for groups by default)."""
        if self.scale_dtype is not None:
            return self.scale_dtype
        return "float16" if self.spec.granularity == "group" else "float32"


def awq_scales(mean_abs: jax.Array, alpha: jax.Array | float) -> jax.Array:
    """AWQ's per-input-channel scales s = s_X^α / √(max s · min s) for activation
    magnitudes s_X (floored at 1e-4; α = 0 gives all ones).

    Args:
      mean_abs: mean |x_j| per input channel (K,).
      alpha: the exponent in [0, 1].

    Returns:
      s (K,) float32, positive, with max·min = 1.

    Example:
      >>> awq_scales(jnp.array([1.0, 4.0]), 0.5).tolist()
      [0.7071067690849304, 1.4142135381698608]
    """
    s = jnp.power(jnp.maximum(jnp.asarray(mean_abs, jnp.float32), SCALE_FLOOR), alpha)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def _round_trip(w: jax.Array, spec: QuantSpec, scale_dtype: str) -> jax.Array:
    """Round-to-nearest quantize-dequantize of a kernel (K, N) on its own range."""
    wg = grouped(w.astype(jnp.float32), spec)
    lo, hi = group_range(wg, spec, "absmax" if spec.symmetric else "minmax")
    return ungrouped(quantize_dequantize_grouped(wg, lo, hi, spec, jnp.dtype(scale_dtype)),
                     w.shape[0])


@partial(jax.jit, static_argnames=("names", "spec", "scale_dtype", "runner"))
def _alpha_errors(block, mean_abs, alphas, x, args, mask, reference, *, names, spec,
                  scale_dtype, runner: BlockRunner):
    """Block-output MSE for each α: the group's kernels rounded as Q(diag(s)·W)/s."""

    def error(alpha):
        s = awq_scales(mean_abs, alpha)
        candidate = dict(block)
        for name in names:
            kernel = candidate[f"{name}/kernel"]
            rounded = _round_trip(kernel * s[:, None], spec, scale_dtype) / s[:, None]
            candidate[f"{name}/kernel"] = rounded.astype(kernel.dtype)
        out = runner.run(tree.unflatten(candidate), x, args, mask)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - reference.astype(jnp.float32)))

    return jax.lax.map(error, alphas)


@partial(jax.jit, static_argnames=("spec", "scale_dtype", "grid", "max_shrink", "dtype"))
def _clipped_leaf(w, gram, *, spec, scale_dtype, grid, max_shrink, dtype):
    """The kernel on its grid with each group's range shrunk to minimise e_gᵀ G_g e_g."""
    k, n = w.shape
    wg = grouped(w.astype(jnp.float32), spec)  # (G, g, N)
    groups, size = wg.shape[0], wg.shape[1]
    lo, hi = group_range(wg, spec, "absmax" if spec.symmetric else "minmax")
    storage = jnp.dtype(scale_dtype)
    if grid > 1:
        padded = groups * size
        g = jnp.pad(gram.astype(jnp.float32), ((0, padded - k), (0, padded - k)))
        diagonal_blocks = jnp.stack([g[i * size:(i + 1) * size, i * size:(i + 1) * size]
                                     for i in range(groups)])  # (G, g, g)
        ratios = 1.0 - max_shrink * jnp.arange(grid, dtype=jnp.float32) / grid

        def step(best, ratio):
            best_error, best_lo, best_hi = best
            lo_r, hi_r = shrunk_range(lo, hi, ratio, spec)
            e = wg - quantize_dequantize_grouped(wg, lo_r, hi_r, spec, storage)
            err = jnp.einsum("gin,gij,gjn->gn", e, diagonal_blocks, e,
                             precision=jax.lax.Precision.HIGHEST)[:, None, :]
            if spec.granularity == "tensor":
                err = jnp.sum(err, keepdims=True)
            better = err < best_error
            return (jnp.where(better, err, best_error), jnp.where(better, lo_r, best_lo),
                    jnp.where(better, hi_r, best_hi)), None

        init = (jnp.full(lo.shape, jnp.inf, jnp.float32), lo, hi)
        (_, lo, hi), _ = jax.lax.scan(step, init, ratios)
    scale, zero = scale_and_zero(lo, hi, spec, storage)
    return assemble_codes(wg, scale, zero, spec, axis=0, shape=(k, n), dtype=dtype,
                          act_bits=None, compute="float32")


def awq_clip_quantize(w: jax.Array, gram: jax.Array, spec: QuantSpec, *,
                      scale_dtype: str = "float16", grid: int = 20,
                      max_shrink: float = 0.5) -> QuantizedWeight:
    """A kernel on `spec`'s grid with AWQ's per-group clipping search.

    Args:
      w: the kernel (K, N) (already scaled, if scales were applied).
      gram: XᵀX (K, K) of its inputs (scaled the same way); any positive multiple.
      spec: the grid.
      scale_dtype: the stored scale dtype (the error is measured with it).
      grid: clip ratios tried (1: no clipping, plain round-to-nearest).
      max_shrink: the smallest ratio is 1 - max_shrink.

    Returns:
      The QuantizedWeight.

    Example:
      >>> w = jax.random.normal(jax.random.key(0), (8, 4))
      >>> awq_clip_quantize(w, jnp.eye(8), QuantSpec(bits=4)).bits
      4
    """
    w = jnp.asarray(w)
    if w.ndim != 2 or gram.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"awq: expected a kernel (K, N) and its (K, K) Gram matrix, got "
                         f"{w.shape} and {gram.shape}")
    spec.num_groups(w.shape[0], where=f"kernel {w.shape}")
    return _clipped_leaf(w, gram, spec=spec, scale_dtype=scale_dtype, grid=int(grid),
                         max_shrink=float(max_shrink), dtype=jnp.dtype(w.dtype).name)


def _awq_plan(flat: Mapping[str, Any], paths: list[str], config: Any,
              options: AWQOptions) -> tuple[Any, dict[str, Any]]:
    """Shapes of the result: round-to-nearest's leaves, wrapped in `ScaledInputWeight`
    where the scales cannot fold (ones stand in for them); every check before work."""
    by_block = block_selection(flat, paths, config, "awq")
    rtn = per_parameter(quantize_leaf)  # quantizes the kernel inside a ScaledInputWeight

    def shapes(flat):
        return rtn(with_unit_scales(config, flat, by_block), paths, config,
                   rtn_options(options))[1]

    return config, jax.eval_shape(shapes, dict(flat))


def _awq_apply(flat: Mapping[str, Any], paths: list[str], config: Any, options: AWQOptions,
               *, calibration: Calibration) -> tuple[Any, dict[str, Any]]:
    """AWQ on every selected block linear, blocks in order (layer-sequential)."""
    _awq_plan(flat, paths, config, options)  # every check before any work
    by_block = block_selection(flat, paths, config, "awq")
    spec, storage = options.spec, options.storage_dtype
    alphas = jnp.asarray(options.alphas)

    def compress(context: BlockContext) -> Any:
        block = tree.flatten(context.params)
        names = [inside(p, context.path).rsplit("/", 1)[0] for p in by_block[context.index]]
        groups = block_groups(config, block, names)
        x, args, mask = context.sample(options.search_windows)
        reference = context.runner.run(context.params, x, args, mask)
        scales: dict[str, jax.Array] = {}
        chosen = []
        for group in groups:
            mean_abs = context.stats[group.selected[0]].mean_abs
            errors = np.asarray(_alpha_errors(
                block, mean_abs, alphas, x, args, mask, reference, names=group.selected,
                spec=spec, scale_dtype=storage, runner=context.runner))
            if not np.isfinite(errors).any():
                raise ValueError(f"{context.path}: AWQ's search found no finite block error "
                                 "(non-finite weights or activations?)")
            best = int(np.nanargmin(errors))
            s = awq_scales(mean_abs, float(alphas[best]))
            block = apply_scales(block, group, s)
            for name in group.selected:
                scales[name] = s
            chosen.append(f"{'/'.join(n.rsplit('/', 1)[-1] for n in group.selected)} "
                          f"α={float(alphas[best]):.2f}")
        calibration._say(f"block {context.index + 1}/{config.num_layers}: "
                         + ", ".join(chosen))
        for name in names:
            kernel = block[f"{name}/kernel"]
            explicit = isinstance(kernel, ScaledInputWeight)
            w = kernel.weight if explicit else kernel
            s = scales[name]
            gram = context.stats[name].gram / (s[:, None] * s[None, :])
            leaf = awq_clip_quantize(w, gram, spec, scale_dtype=storage,
                                     grid=options.clip_grid if options.clip else 1,
                                     max_shrink=options.clip_max_shrink)
            block[f"{name}/kernel"] = ScaledInputWeight(weight=leaf, input_scale=s) \
                if explicit else leaf
        return tree.unflatten(block)

    params = layer_sequential(config, tree.unflatten(flat), calibration, compress,
                              blocks=list(by_block))
    return config, tree.flatten(params)


OPS = (
    Op(name="awq", options=AWQOptions, apply=_awq_apply, plan=_awq_plan, traceable=False,
       needs_calibration=True,
       doc="AWQ: activation-aware scales searched on block outputs, folded, then clipped "
           "integer weights"),
)

__all__ = ["AWQOptions", "awq_clip_quantize", "awq_scales"]
