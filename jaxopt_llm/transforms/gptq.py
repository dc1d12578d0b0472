"""GPTQ: quantization that corrects each rounding error with the inputs not yet quantized.

"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(Frantar et al., ICLR 2023). For a kernel W (K inputs, N outputs) and the Hessian of the
layer's squared output error H = Σ x xᵀ over calibration tokens (K, K), inputs are
quantized one at a time; the error of input i, scaled by the upper Cholesky factor U of
H⁻¹ (H⁻¹ = UᵀU), is subtracted from every later input:

    q_i = quant(w_i),   e_i = (w_i - q_i) / U_ii,   w_j -= e_i · U_ij  (j > i)

which is the optimal (OBS) update of the remaining weights for ‖XW - XŴ‖². Details as in
the authors' reference implementation:
  * dead inputs (H_ii = 0: never active in the calibration data) get H_ii = 1, W_i = 0;
  * dampening: H += dampening · mean(diag H) · I, raised ×10 (up to 4 times, with a
    warning) when the Cholesky factorisation still fails, then H = I (plain rounding);
  * lazy batch updates: errors within a block of `block_size` inputs are applied to the
    block input by input, and to all later inputs at once (one matmul) after the block;
  * act_order: inputs in descending diag(H) (the most active first); with groups this
    needs static groups, whose grids come up front from the original W (dead inputs
    zeroed), so group g still holds inputs g·size … (g+1)·size - 1 and the result is an
    ordinary QuantizedWeight in the original input order;
  * grids: per channel (or tensor) from the whole original W; per group, when the loop
    reaches the group's first input, from the group's weights as updated so far.
    The reference reads a group's weights before the updates of earlier inputs of the
    same block when groups are smaller than blocks; here blocks are aligned to groups
    (block_size rounded down to a multiple of the group size, or one group when larger)
    so a group's grid always sees every earlier update, and the result does not depend
    on block_size.

H may be the sum Σ x xᵀ or its mean (or any positive multiple): dampening is relative to
mean(diag H) and the updates use ratios of H⁻¹'s Cholesky factor, so scaling H changes
nothing. Grids are `QuantSpec`'s (symmetric, integer zero point or float offset) and the
output is assembled exactly like round-to-nearest's (`quantize_weight`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import tree
from jaxopt_llm.calibration import BlockContext, Calibration, layer_sequential
from jaxopt_llm.transforms.base import Op, check_finite_number, per_parameter
from jaxopt_llm.transforms.layerwise import block_selection, inside
from jaxopt_llm.transforms.quantize import (
    GridOptions,
    check_scale_dtype,
    quantize_leaf,
    rtn_options,
    table_axis,
)
from jaxopt_llm.weights.quant_math import (
    QuantSpec,
    dequantize_codes,
    group_range,
    grouped,
    quantize_codes,
    scale_and_zero,
)
from jaxopt_llm.weights.quantized import QuantizedWeight, assemble_codes

# How often a failed Cholesky factorisation raises the dampening ×10 before H = I.
DAMPENING_RETRIES = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQOptions(GridOptions):
    """GPTQ onto the `quantize` op's grid (bits, symmetric, granularity, group_size,
    partial_groups, zero, scale_dtype), plus the solver's settings."""

    zero: str = "integer"  # asymmetric grids: uint8 zero point, or "float" offset w = u·d + m
    scale_dtype: str | None = None  # float16 for group scales, float32 otherwise
    block_size: int = 128  # inputs per lazy batch update (speed only, see the module doc)
    dampening: float = 0.01  # relative to mean(diag H)
    act_order: bool = False  # inputs in descending diag(H); static groups with groups

    @property
    def spec(self) -> QuantSpec:
        """The grid these options describe (validated)."""
        return self._spec(self.zero)

    def validate(self) -> None:
        """Raise a ValueError naming the first bad option."""
        self.spec  # noqa: B018  (validates bits, granularity, group size and zero)
        check_scale_dtype(self.scale_dtype)
        _check_block_size(self.block_size)
        check_finite_number("dampening", self.dampening, low=0.0, open_low=True)
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be true or false, got {self.act_order!r}")


def _check_block_size(block_size: Any) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def gptq_quantize(
    w: jax.Array,
    hessian: jax.Array,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    static_groups: bool | None = None,
    scale_dtype: str | None = None,
    axis: int = 0,
    name: str = "weight",
) -> QuantizedWeight:
    """GPTQ-quantize a kernel (axis=0) or an embedding table used as a tied head (axis=1).

    Traceable (runs under `jax.jit` / `jax.eval_shape`); the dampening warning is only
    given when called with concrete arrays.

    Args:
      w: a Flax kernel (K, ...) contracted along K, or a table (V, K) for axis=1.
      hessian: (K, K), Σ x xᵀ over the calibration tokens x (K,) of this layer's input,
        or its mean (any positive multiple gives the same result).
      spec: the grid (bits 2–8; tensor, channel or group; symmetric, integer zero point
        or float offset; partial last group when spec.partial_groups).
      block_size: inputs per lazy batch update (a positive int; see the module doc).
      dampening: H += dampening · mean(diag H) · I before factorising (finite, > 0).
      act_order: quantize inputs in descending diag(H) order.
      static_groups: group grids from the original W up front instead of as the loop
        reaches each group; None: True with act_order and groups (where it is required),
        else False.
      scale_dtype: "float32", "float16" or "bfloat16"; None: float16 for group scales,
        float32 otherwise (as `quantize_weight`).
      axis: 0 for a kernel, 1 for an embedding table (quantized along its rows).
      name: what warnings and errors call this weight (e.g. its parameter path).

    Returns:
      A QuantizedWeight laid out exactly as `quantize_weight`'s (codes in the original
      input order).

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (256, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> leaf = gptq_quantize(w, x.T @ x, QuantSpec(bits=4))
      >>> leaf.bits, leaf.shape
      (4, (16, 8))
    """
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"{name}: spec must be a QuantSpec, got {type(spec).__name__}")
    if axis not in (0, 1):
        raise ValueError(f"{name}: axis must be 0 (kernel) or 1 (embedding table), got {axis!r}")
    w = jnp.asarray(w)
    if w.ndim < 2 or (axis == 1 and w.ndim != 2):
        raise ValueError(f"{name}: expected a 2-D (or higher, for kernels) weight, got {w.shape}")
    _check_block_size(block_size)
    check_finite_number("dampening", dampening, low=0.0, open_low=True)
    if not isinstance(act_order, bool):
        raise ValueError(f"act_order must be True or False, got {act_order!r}")
    grouped_spec = spec.granularity == "group"
    if static_groups is None:
        static_groups = act_order and grouped_spec
    elif not isinstance(static_groups, bool):
        raise ValueError(f"static_groups must be True, False or None, got {static_groups!r}")
    if act_order and grouped_spec and not static_groups:
        raise ValueError("static_groups=False cannot be combined with act_order and groups: "
                         "the groups would no longer be contiguous inputs")
    check_scale_dtype(scale_dtype)
    if scale_dtype is None:
        scale_dtype = "float16" if grouped_spec else "float32"

    shape = tuple(int(d) for d in w.shape)
    canonical = w.reshape(shape[0], -1) if axis == 0 else w.T  # (K, N)
    k = canonical.shape[0]
    spec.num_groups(k, where=f"{name} {shape}")
    hessian = jnp.asarray(hessian)
    if hessian.shape != (k, k):
        raise ValueError(f"{name}: hessian must be ({k}, {k}) for a weight {shape} contracted "
                         f"along {k} inputs, got {hessian.shape}")
    if not isinstance(hessian, jax.core.Tracer) and not bool(np.isfinite(hessian).all()):
        raise ValueError(f"{name}: hessian has NaN or infinite entries")

    block = _aligned_block(block_size, k, spec, static_groups)
    leaf, damp_used, outcome = _gptq_jit(
        canonical.astype(jnp.float32), hessian.astype(jnp.float32), jnp.float32(dampening),
        spec=spec, block=block, act_order=act_order, static_groups=static_groups,
        scale_dtype=scale_dtype, axis=axis, shape=shape, dtype=jnp.dtype(w.dtype).name)
    if not isinstance(outcome, jax.core.Tracer):
        warn_dampening(name, dampening, float(damp_used), int(outcome))
    return leaf


def gptq_leaf(leaf: Any, path: str, options: GPTQOptions, hessian: jax.Array) -> QuantizedWeight:
    """One float kernel (or embedding table, by its path) → GPTQ's QuantizedWeight.

    Args:
      leaf: the float weight; path: its parameter path (names warnings, picks the axis);
      options: the grid and solver settings; hessian: (K, K) of the weight's input.

    Returns:
      The QuantizedWeight.

    Example:
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> gptq_leaf(w, "layers_0/mlp/up_proj/kernel", GPTQOptions(bits=4),
      ...           jnp.eye(16)).bits
      4
    """
    if not hasattr(leaf, "ndim") or leaf.ndim < 2:
        raise ValueError(f"{path}: gptq needs a float kernel or table, got "
                         f"{type(leaf).__name__} {getattr(leaf, 'shape', '')}")
    return gptq_quantize(leaf, hessian, options.spec, block_size=options.block_size,
                         dampening=float(options.dampening), act_order=options.act_order,
                         scale_dtype=options.scale_dtype, axis=table_axis(path), name=path)


def _aligned_block(block_size: int, k: int, spec: QuantSpec, static_groups: bool) -> int:
    """Inputs per block: groups whose grid the loop computes never straddle two blocks."""
    if spec.granularity != "group" or static_groups:
        return min(block_size, k)
    size = spec.group_size
    block = size * max(1, block_size // size)
    return min(block, size * spec.num_groups(k))


def warn_dampening(name: str, dampening: float, used: float, outcome: int,
                   fallback: str = "quantized with H = I (round-to-nearest with GPTQ's grids)"
                   ) -> None:
    """Warn when `inverse_cholesky_upper` raised the dampening (1) or gave up (2).

    Args:
        name: the parameter, named in the warning.
        dampening: the dampening asked for.
        used: the dampening the factorisation needed.
        outcome: 0 (nothing to say), 1 (raised) or 2 (none worked).
        fallback: what was done instead when none worked.

    Example:
        >>> warn_dampening("w", 0.01, 0.01, 0)  # factorised first try: no warning
    """
    if outcome == 1:
        warnings.warn(f"{name}: the Hessian is not positive definite with dampening "
                      f"{dampening:g}; used dampening {used:g}", RuntimeWarning, stacklevel=3)
    elif outcome == 2:
        warnings.warn(f"{name}: the Hessian is not positive definite even with dampening "
                      f"{used:g}; {fallback}", RuntimeWarning, stacklevel=3)


def inverse_cholesky_upper(h: jax.Array, dampening: jax.Array) -> tuple[jax.Array, ...]:
    """Upper U with (H + λ·mean|diag H|·I)⁻¹ = UᵀU, λ raised ×10 while factorising fails.

    Args:
        h: the Hessian XᵀX (K, K), float32.
        dampening: λ, relative to mean |diag H|.

    Returns:
        (U (K, K), λ used, outcome): 0 first try, 1 raised dampening, 2 none worked
        (U = I).

    Example:
        >>> u, used, outcome = inverse_cholesky_upper(4.0 * jnp.eye(2), jnp.float32(0.0))
        >>> u.tolist(), int(outcome)
        ([[0.5, 0.0], [0.0, 0.5]], 0)
    """
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.float32)
    # mean(diag H) for a real Σ x xᵀ; the absolute value keeps λ > 0 for broken inputs.
    base = jnp.mean(jnp.abs(jnp.diag(h)))

    def factor(damp):
        # With J the order reversal, JHJ = LLᵀ gives H = RRᵀ for the upper R = JLJ, so
        # H⁻¹ = (R⁻¹)ᵀR⁻¹ and U = R⁻¹ = J L⁻¹ J: one factorisation and one triangular
        # inverse (the reference's inverse-then-factorise costs ~3× more and is less exact).
        lower = jnp.linalg.cholesky((h + damp * base * eye)[::-1, ::-1])
        lower_inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
        upper = lower_inv[::-1, ::-1]
        return upper, jnp.all(jnp.isfinite(upper))

    def retry(state):
        damp, _, _, tries = state
        damp = damp * 10
        upper, ok = factor(damp)
        return damp, upper, ok, tries + 1

    upper, ok = factor(dampening)
    damp, upper, ok, tries = jax.lax.while_loop(
        lambda s: jnp.logical_and(jnp.logical_not(s[2]), s[3] < DAMPENING_RETRIES),
        retry, (dampening, upper, ok, jnp.int32(0)))
    outcome = jnp.where(ok, jnp.where(tries > 0, 1, 0), 2)
    return jnp.where(ok, upper, eye), damp, outcome


def group_grid(rows: jax.Array, valid: jax.Array, spec: QuantSpec, scale_dtype: str
               ) -> tuple[jax.Array, jax.Array]:
    """(scale, zero) rows (N,) of one group from its rows (g, N), invalid rows ignored
    (row 0 must be valid); symmetric grids get a zero row of uint8 zeros.

    Args:
        rows: the group's weights (g, N), as updated so far.
        valid: booleans (g,): False for padding past the weight's last input.
        spec: the grid (absmax range when symmetric, min-max otherwise).
        scale_dtype: the dtype scales (and float offsets) are stored in.

    Returns:
        (scale (N,), zero (N,)).

    Example:
        >>> spec = QuantSpec(bits=4, granularity="group", group_size=2)
        >>> scale, _ = group_grid(jnp.array([[7.0], [99.0]]), jnp.array([True, False]),
        ...                       spec, "float32")
        >>> scale.tolist()
        [1.0]
    """
    rows = jnp.where(valid[:, None], rows, rows[:1])  # row 0 of a group is always valid
    method = "absmax" if spec.symmetric else "minmax"
    lo, hi = group_range(rows[None], spec, method)
    scale, zero = scale_and_zero(lo, hi, spec, jnp.dtype(scale_dtype))
    return scale[0, 0], _zero_or_dummy(zero, scale)[0, 0]


def _zero_or_dummy(zero: jax.Array | None, scale: jax.Array) -> jax.Array:
    """Loops carry a zero array even for symmetric grids (dropped at the end)."""
    return jnp.zeros(scale.shape, jnp.uint8) if zero is None else zero


@partial(jax.jit, static_argnames=("spec", "block", "act_order", "static_groups",
                                   "scale_dtype", "axis", "shape", "dtype"))
def _gptq_jit(w, h, dampening, *, spec, block, act_order, static_groups, scale_dtype,
              axis, shape, dtype):
    """The solver, then the same assembly as round-to-nearest's, in one compiled call."""
    w_q, scale, zero, damp_used, outcome = _gptq_core(
        w, h, dampening, spec=spec, block=block, act_order=act_order,
        static_groups=static_groups, scale_dtype=scale_dtype)
    leaf = assemble_codes(grouped(w_q, spec), scale, zero, spec, axis=axis, shape=shape,
                          dtype=dtype, act_bits=None, compute="float32")
    return leaf, damp_used, outcome


def _gptq_core(w, h, dampening, *, spec, block, act_order, static_groups, scale_dtype):
    """The solver on a canonical kernel (K, N) in float32.

    Returns (W_q, scale, zero, dampening used, outcome): W_q (K, N) holds each input's
    weights at the moment it was rounded, in the original order, so rounding W_q on
    (scale, zero) (G, 1, N) gives exactly the codes the loop chose.
    """
    k, n = w.shape
    dtype = jnp.dtype(scale_dtype)
    per_group_loop = spec.granularity == "group" and not static_groups
    size = spec.group_size if spec.granularity == "group" else k
    groups = spec.num_groups(k)
    method = "absmax" if spec.symmetric else "minmax"

    if spec.granularity != "group":  # per channel / tensor: from the whole original W
        lo, hi = group_range(grouped(w, spec), spec, method)
        fixed_scale, fixed_zero = scale_and_zero(lo, hi, spec, dtype)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    if spec.granularity == "group" and static_groups:  # up front, from W (dead rows zeroed)
        lo, hi = group_range(grouped(w, spec), spec, method)
        fixed_scale, fixed_zero = scale_and_zero(lo, hi, spec, dtype)
    if per_group_loop:  # filled in as the loop reaches each group
        fixed_scale = jnp.ones((groups, 1, n), dtype)
        fixed_zero = None if spec.symmetric else jnp.zeros(
            (groups, 1, n), dtype if spec.float_zero else jnp.uint8)

    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
    w = w[perm]
    h = h[perm][:, perm]
    upper, damp_used, outcome = inverse_cholesky_upper(h, dampening)

    padded = -(-k // block) * block  # pads: zero weights, decoupled (identity) Hessian
    w = jnp.pad(w, ((0, padded - k), (0, 0)))
    upper = jnp.pad(upper, ((0, padded - k), (0, padded - k)))
    upper = upper + jnp.diag(jnp.arange(padded) >= k).astype(jnp.float32)
    order = jnp.pad(perm, (0, padded - k), constant_values=k - 1)  # original input index

    scales = fixed_scale[:, 0, :]  # (G, N) or (1, 1) per tensor
    zeros = _zero_or_dummy(fixed_zero, fixed_scale)[:, 0, :]

    def quantize_block(b, carry):
        w, w_q, scales, zeros = carry
        start = b * block
        w_block = jax.lax.dynamic_slice(w, (start, 0), (block, n))
        u_block = jax.lax.dynamic_slice(upper, (start, start), (block, block))

        def quantize_input(i, state):
            w_block, errors, w_q_block, scales, zeros = state
            index = start + i
            if per_group_loop:
                def new_grid(grids):
                    scales, zeros = grids
                    rows = jax.lax.dynamic_slice(w_block, (i, 0), (size, n))
                    scale, zero = group_grid(rows, index + jnp.arange(size) < k, spec,
                                            scale_dtype)
                    group = index // size
                    return scales.at[group].set(scale), zeros.at[group].set(zero)

                scales, zeros = jax.lax.cond(index % size == 0, new_grid, lambda g: g,
                                             (scales, zeros))
            group = jnp.minimum(order[index] // size, scales.shape[0] - 1)
            scale = scales[group]
            zero = None if spec.symmetric else zeros[group]
            row = w_block[i]
            q = dequantize_codes(quantize_codes(row, scale, zero, spec), scale, zero)
            error = (row - q) / u_block[i, i]
            # U is upper triangular: rows before i get error · 0.
            w_block = w_block - u_block[i][:, None] * error[None, :]
            return (w_block, errors.at[i].set(error), w_q_block.at[i].set(row), scales, zeros)

        init = (w_block, jnp.zeros((block, n), jnp.float32),
                jnp.zeros((block, n), jnp.float32), scales, zeros)
        _, errors, w_q_block, scales, zeros = jax.lax.fori_loop(0, block, quantize_input, init)
        # Every later input at once (rows up to this block's get 0 or are already done).
        u_rows = jax.lax.dynamic_slice(upper, (start, 0), (block, padded))
        w = w - u_rows.T @ errors
        w_q = jax.lax.dynamic_update_slice(w_q, w_q_block, (start, 0))
        return w, w_q, scales, zeros

    carry = (w, jnp.zeros((padded, n), jnp.float32), scales, zeros)
    _, w_q, scales, zeros = jax.lax.fori_loop(0, padded // block, quantize_block, carry)
    w_q = w_q[:k][jnp.argsort(perm)]
    zero = None if spec.symmetric else zeros[:, None, :]
    return w_q, scales[:, None, :], zero, damp_used, outcome


__all__ = ["DAMPENING_RETRIES", "GPTQOptions", "gptq_leaf", "gptq_quantize", "group_grid",
           "inverse_cholesky_upper", "warn_dampening"]



# ------------------------------------------------------------------------------------ op


def _gptq_plan(flat: Mapping[str, Any], paths: list[str], config: Any,
               options: GPTQOptions) -> tuple[Any, dict[str, Any]]:
    """Shapes of the result (those of round-to-nearest on the same grid), and every check
    that needs no calibration: block membership, float weights, group sizes."""
    block_selection(flat, paths, config, "gptq")
    rtn = per_parameter(quantize_leaf)
    return config, jax.eval_shape(lambda f: rtn(f, paths, config, rtn_options(options))[1],
                                  dict(flat))


def _gptq_apply(flat: Mapping[str, Any], paths: list[str], config: Any, options: GPTQOptions,
                *, calibration: Calibration) -> tuple[Any, dict[str, Any]]:
    """GPTQ on every selected block linear, blocks in order (layer-sequential)."""
    _gptq_plan(flat, paths, config, options)  # every check before any work
    by_block = block_selection(flat, paths, config, "gptq")

    def compress(context: BlockContext) -> Any:
        block = tree.flatten(context.params)
        for path in by_block[context.index]:
            name = inside(path, context.path)  # "attn/q_proj/kernel"
            block[name] = gptq_leaf(block[name], path, options,
                                    context.stats[name.rsplit("/", 1)[0]].gram)
        return tree.unflatten(block)

    params = layer_sequential(config, tree.unflatten(flat), calibration, compress,
                              blocks=list(by_block))
    return config, tree.flatten(params)


OPS = (
    Op(name="gptq", options=GPTQOptions, apply=_gptq_apply, plan=_gptq_plan, traceable=False,
       needs_calibration=True,
       doc="GPTQ: integer weights with rounding errors corrected from calibration inputs"),
)
