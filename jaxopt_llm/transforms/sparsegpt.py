"""SparseGPT: pruning with the kept weights updated to cancel the removed ones' error.

"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (Frantar &
Alistarh, ICML 2023). For a kernel W (K inputs, N outputs) and H = XᵀX over the
calibration tokens (K, K), with U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), inputs
are visited in order, in blocks of `block_size`:

  * mask selection, unstructured: at the start of each block, the scores w²/U_ii² of the
    block's weights (all outputs) are ranked and the lowest `sparsity` share of the block
    is removed (the reference's adaptive per-block mask);
    N:M: at every m-th input, per output, the n lowest w²/U_ii² of the next m inputs;
  * for input i: the removed weights become 0, e_i = (w_i − ŵ_i)/U_ii, and every later
    input is corrected, w_j −= e_i·U_ij (the OBS update, as in GPTQ);
  * errors within a block are applied input by input, to later blocks by one matmul.

Dead inputs (H_ii = 0) get H_ii = 1 and W_i = 0; dampening H += λ·mean(diag H)·I (λ
raised ×10 with a warning when the factorisation fails, as GPTQ does). The result is a
MaskedWeight (or NMSparseWeight, or zeros in a dense array) of the *updated* weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.calibration import Calibration
from jaxopt_llm.transforms.base import Op, check_finite_number
from jaxopt_llm.transforms.gptq import (
    group_grid,
    inverse_cholesky_upper,
    warn_dampening,
)
from jaxopt_llm.transforms.prune import dense_kernel, lowest_mask
from jaxopt_llm.transforms.quantize import GridOptions, check_scale_dtype
from jaxopt_llm.transforms.wanda import (
    SparsityOptions,
    _plan,
    calibrated_prune,
    check_selection,
    store,
)
from jaxopt_llm.weights.quant_math import (
    QuantSpec,
    dequantize_codes,
    group_range,
    grouped,
    quantize_codes,
    scale_and_zero,
)
from jaxopt_llm.weights.quantized import assemble_codes
from jaxopt_llm.weights.sparse import NMSparseWeight, nm_sparse_weight


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPTOptions(SparsityOptions):
    """SparseGPT's pattern (sparsity, or n zeroed of every m) and solver settings.

    Example:
        >>> SparseGPTOptions(sparsity=0.5).block_size
        128
    """

    block_size: int = 128  # inputs per mask block and lazy update
    dampening: float = 0.01  # relative to mean(diag H)

    def validate(self) -> None:
        """The pattern's checks, a positive block size (a multiple of m for N:M), and a
        positive dampening."""
        super().validate()
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {size!r}")
        if self.pattern == "nm" and size % self.m:
            raise ValueError(f"block_size {size} must be a multiple of m={self.m}")
        check_finite_number("dampening", self.dampening, low=0.0, open_low=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPTQuantizeOptions(SparseGPTOptions, GridOptions):
    """SparseGPT N:M pruning and quantization of the kept weights in the same sweep: the
    pattern (n zeroed of every m), the solver, and the grid (bits, symmetric, group_size
    counted in *dense* inputs, partial_groups, zero, scale_dtype).

    The result is an `NMSparseWeight` whose values are a `QuantizedWeight` (K·(m-n)/m, N):
    a group of g dense inputs holds g·(m-n)/m stored values sharing one scale, so a 2:4
    weight with group_size 128 has one scale per 64 stored codes, the same per dense
    input as `w4g128`. Unstructured sparsity is refused: a 1-bit mask next to every
    dense code is larger than the codes saved.

    Example:
        >>> o = SparseGPTQuantizeOptions(n=2, m=4, bits=4, symmetric=False, group_size=128)
        >>> o.stored_spec.group_size
        64
    """

    zero: str = "integer"  # asymmetric grids: uint8 zero point, or "float" offset
    scale_dtype: str | None = None  # float16 for group scales, float32 otherwise

    @property
    def spec(self) -> QuantSpec:
        """The grid over dense inputs (validated)."""
        return self._spec(self.zero)

    @property
    def stored_spec(self) -> QuantSpec:
        """The grid of the stored values: groups of group_size·(m-n)/m."""
        spec = self.spec
        if spec.granularity != "group":
            return spec
        return dataclasses.replace(spec, group_size=spec.group_size * (self.m - self.n)
                                   // self.m)

    @property
    def resolved_scale_dtype(self) -> str:
        """float16 for group scales, float32 otherwise, unless scale_dtype says."""
        if self.scale_dtype is not None:
            return self.scale_dtype
        return "float16" if self.spec.granularity == "group" else "float32"

    def validate(self) -> None:
        """The pattern (N:M only, compressed), the solver, the grid; groups of whole
        N:M groups."""
        super().validate()
        if self.pattern != "nm":
            raise ValueError("sparsegpt_quantize needs an N:M pattern (n, m): unstructured "
                             "sparsity with a 1-bit mask per dense code stores more than "
                             "the quantized weight alone")
        if self.storage != "compressed":
            raise ValueError(f"sparsegpt_quantize stores NMSparseWeight values as codes: "
                             f"format must be 'compressed', got {self.format!r}")
        spec = self.spec  # validates bits, granularity, group size and zero
        check_scale_dtype(self.scale_dtype)
        if spec.granularity == "tensor":
            raise ValueError("sparsegpt_quantize supports channel or group grids, got "
                             "granularity 'tensor'")
        if spec.granularity == "group" and spec.group_size % self.m:
            raise ValueError(f"group_size {spec.group_size} must be a multiple of m={self.m} "
                             "(a scale covers whole N:M groups)")


def sparsegpt_prune(w: jax.Array, hessian: jax.Array, options: SparseGPTOptions
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """SparseGPT on one kernel (traceable).

    Args:
        w: the kernel (K, N), float32.
        hessian: XᵀX of its inputs (K, K) (any positive multiple).
        options: the pattern and solver settings.

    Returns:
        (updated weights (K, N) with the removed ones 0, keep-mask (K, N), dampening used,
        outcome: 0 factorised, 1 with raised dampening, 2 not at all: plain pruning).

    Example:
        >>> w = jnp.array([[1.0], [0.9], [0.1], [2.0]])
        >>> out, keep, _, _ = sparsegpt_prune(w, jnp.eye(4), SparseGPTOptions(sparsity=0.5))
        >>> keep[:, 0].tolist()  # H = I: no updates, the smallest |w| go
        [True, False, False, True]
    """
    out, keep, _, _, damp_used, outcome = _sparsegpt_core(w, hessian, options)
    return out, keep, damp_used, outcome


def _sparsegpt_core(w, hessian, options, spec: QuantSpec | None = None,
                    scale_dtype: str = "float32"):
    """The sweep; with a grid `spec`, each kept weight is also rounded when visited and
    its rounding error joins the pruning error in the OBS update (SparseGPT §3.5).

    Returns (W', keep, scale, zero, dampening used, outcome). Without a grid W' holds the
    updated weights (removed ones 0) and scale/zero are None; with one, W' holds each kept
    weight as it was when rounded, so rounding W' on (scale, zero) (G, 1, N) gives
    exactly the codes the sweep chose. Group grids come from the group's weights as
    updated when the sweep reaches the group (blocks are aligned to groups).
    """
    k, n_out = w.shape
    h = hessian.astype(jnp.float32)
    w = w.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    block = options.block_size
    per_group = spec is not None and spec.granularity == "group"
    size = spec.group_size if per_group else k
    if per_group:  # a group's grid never straddles two blocks
        block = size * max(1, block // size)
    if spec is not None:
        dtype = jnp.dtype(scale_dtype)
        if per_group:
            scales = jnp.ones((spec.num_groups(k), n_out), dtype)
            zeros = jnp.zeros((spec.num_groups(k), n_out),
                              dtype if spec.float_zero else jnp.uint8)
        else:  # per channel / tensor: from the whole W (dead inputs zeroed)
            lo, hi = group_range(grouped(w, spec), spec,
                                 "absmax" if spec.symmetric else "minmax")
            scale, zero = scale_and_zero(lo, hi, spec, dtype)
            zero = jnp.zeros(scale.shape, jnp.uint8) if zero is None else zero
            scales, zeros = scale[:, 0, :], zero[:, 0, :]
    else:
        scales = zeros = jnp.zeros((1, 1), jnp.float32)  # unused
    upper, damp_used, outcome = inverse_cholesky_upper(h, jnp.float32(options.dampening))
    padded = -(-k // block) * block
    w = jnp.pad(w, ((0, padded - k), (0, 0)))
    upper = jnp.pad(upper, ((0, padded - k), (0, padded - k)))
    upper = upper + jnp.diag(jnp.arange(padded) >= k).astype(jnp.float32)
    real = jnp.arange(padded) < k
    nm = options.pattern == "nm"

    def prune_block(b, carry):
        w, w_out, keep_all, scales, zeros = carry
        start = b * block
        w_block = jax.lax.dynamic_slice(w, (start, 0), (block, n_out))
        u_block = jax.lax.dynamic_slice(upper, (start, start), (block, block))
        diag = jnp.diag(u_block)
        if nm:
            keep_block = jnp.ones((block, n_out), jnp.bool_)
        else:  # the block's lowest w²/U_ii² (padding rows never count)
            rows = jnp.sum(jax.lax.dynamic_slice(real, (start,), (block,))).astype(jnp.float32)
            scores = w_block ** 2 / (diag ** 2)[:, None]
            valid = jax.lax.dynamic_slice(real, (start,), (block,))[:, None]
            scores = jnp.where(valid, scores, jnp.inf)
            count = jnp.round(options.sparsity * rows).astype(jnp.int32) * n_out
            order = jnp.argsort(scores.reshape(-1), stable=True)
            ranks = jnp.zeros(block * n_out, jnp.int32).at[order].set(
                jnp.arange(block * n_out, dtype=jnp.int32))
            keep_block = (ranks >= count).reshape(block, n_out)

        def prune_input(i, state):
            w_block, errors, out_block, keep_block, scales, zeros = state
            index = start + i
            if nm:
                def choose(keep_block):
                    group = jax.lax.dynamic_slice(w_block, (i, 0), (options.m, n_out))
                    d = jax.lax.dynamic_slice(diag, (i,), (options.m,))
                    mask = lowest_mask(group ** 2 / (d ** 2)[:, None], options.n, axis=0)
                    return jax.lax.dynamic_update_slice(keep_block, mask, (i, 0))

                keep_block = jax.lax.cond(i % options.m == 0, choose, lambda kb: kb,
                                          keep_block)
            row = w_block[i]
            if spec is None:
                kept = jnp.where(keep_block[i], row, 0.0)
                out_row = kept
            else:
                if per_group:
                    def new_grid(grids):
                        scales, zeros = grids
                        rows = jax.lax.dynamic_slice(w_block, (i, 0), (size, n_out))
                        scale, zero = group_grid(rows, index + jnp.arange(size) < k, spec,
                                                 scale_dtype)
                        return (scales.at[index // size].set(scale),
                                zeros.at[index // size].set(zero))

                    scales, zeros = jax.lax.cond(index % size == 0, new_grid, lambda g: g,
                                                 (scales, zeros))
                group = jnp.minimum(index // size, scales.shape[0] - 1)
                zero = None if spec.symmetric else zeros[group]
                rounded = dequantize_codes(quantize_codes(row, scales[group], zero, spec),
                                           scales[group], zero)
                kept = jnp.where(keep_block[i], rounded, 0.0)
                out_row = jnp.where(keep_block[i], row, 0.0)
            error = (row - kept) / u_block[i, i]
            w_block = w_block - u_block[i][:, None] * error[None, :]  # rows < i get 0
            w_block = w_block.at[i].set(kept)
            return (w_block, errors.at[i].set(error), out_block.at[i].set(out_row),
                    keep_block, scales, zeros)

        init = (w_block, jnp.zeros((block, n_out), jnp.float32),
                jnp.zeros((block, n_out), jnp.float32), keep_block, scales, zeros)
        _, errors, out_block, keep_block, scales, zeros = jax.lax.fori_loop(
            0, block, prune_input, init)
        u_rows = jax.lax.dynamic_slice(upper, (start, 0), (block, padded))
        w = w - u_rows.T @ errors  # later inputs (earlier rows get 0 · error)
        w_out = jax.lax.dynamic_update_slice(w_out, out_block, (start, 0))
        keep_all = jax.lax.dynamic_update_slice(keep_all, keep_block, (start, 0))
        return w, w_out, keep_all, scales, zeros

    init = (w, jnp.zeros((padded, n_out), jnp.float32), jnp.ones((padded, n_out), jnp.bool_),
            scales, zeros)
    _, w_out, keep, scales, zeros = jax.lax.fori_loop(0, padded // block, prune_block, init)
    if spec is None:
        return w_out[:k], keep[:k], None, None, damp_used, outcome
    zero = None if spec.symmetric else zeros[:, None, :]
    return w_out[:k], keep[:k], scales[:, None, :], zero, damp_used, outcome


@partial(jax.jit, static_argnames=("options",))
def _sparsegpt_one(w, hessian, options):
    pruned, keep, damp, outcome = sparsegpt_prune(w, hessian, options)
    return store(pruned.astype(w.dtype), keep, options), damp, outcome


def sparsegpt_leaf(leaf: Any, path: str, options: SparseGPTOptions, gram: jax.Array) -> Any:
    """SparseGPT-prune one kernel given its inputs' Gram matrix XᵀX (K, K).

    Args:
        leaf: the float kernel (K, N).
        path: its parameter path (for errors and warnings).
        options: the `SparseGPTOptions`.
        gram: XᵀX of its calibration inputs.

    Returns:
        The pruned (and updated) kernel in the options' format.

    Example:
        >>> x = jnp.array([[1.0, 1.0], [1.0, 0.9], [1.0, 1.1]])  # correlated inputs
        >>> out = sparsegpt_leaf(jnp.array([[1.0], [0.5]]), "w",
        ...                      SparseGPTOptions(sparsity=0.5, format="dense"), x.T @ x)
        >>> [round(v, 2) for v in out[:, 0].tolist()]  # one input carries both: 1·x₀ + 0.5·x₁
        [0.0, 1.48]
    """
    w = dense_kernel(leaf, path)
    options.check_kernel(path, w.shape)
    out, damp, outcome = _sparsegpt_one(w, gram, options)
    warn_dampening(path, options.dampening, float(damp), int(np.asarray(outcome)),
                   fallback="pruned with H = I (magnitude within each block, no updates)")
    return out


def sparse_quantized(w: jax.Array, keep: jax.Array, scale: jax.Array, zero: jax.Array | None,
                     options: SparseGPTQuantizeOptions, dtype: str = "float32"
                     ) -> NMSparseWeight:
    """The sparse quantized weight: an `NMSparseWeight` whose kept values are rounded on
    the dense groups' grid (traceable).

    Args:
        w: the kernel (K, N), kept weights at the values to round.
        keep: its N:M keep-mask (K, N).
        scale: the grid's steps (G, 1, N), G groups of dense inputs (or 1 per channel).
        zero: its zeros (same shape), None when symmetric.
        options: the pattern and the grid.
        dtype: the dense weight's dtype name.

    Returns:
        The NMSparseWeight with `values` a QuantizedWeight (K·(m-n)/m, N).

    Example:
        >>> o = SparseGPTQuantizeOptions(n=1, m=2, bits=8, granularity="channel")
        >>> w = jnp.array([[2.0], [-1.0]])
        >>> leaf = sparse_quantized(w, w > 0, jnp.full((1, 1, 1), 0.5), None, o)
        >>> leaf.describe(), leaf.materialize().ravel().tolist()
        ('NMSparseWeight(QuantizedWeight)', [2.0, 0.0])
    """
    sparse = nm_sparse_weight(w, keep, options.m - options.n, options.m)
    spec = options.stored_spec
    values = assemble_codes(grouped(sparse.values, spec), scale, zero, spec, axis=0,
                            shape=tuple(sparse.values.shape), dtype=dtype, act_bits=None,
                            compute="float32")
    return sparse.replace(values=values)


@partial(jax.jit, static_argnames=("options", "dtype"))
def _sparsegpt_quantize_one(w, hessian, options, dtype):
    w_out, keep, scale, zero, damp, outcome = _sparsegpt_core(
        w, hessian, options, options.spec, options.resolved_scale_dtype)
    return sparse_quantized(w_out, keep, scale, zero, options, dtype), damp, outcome


def sparsegpt_quantize_leaf(leaf: Any, path: str, options: SparseGPTQuantizeOptions,
                            gram: jax.Array) -> NMSparseWeight:
    """Prune one kernel to N:M and quantize its kept weights in one SparseGPT sweep.

    Args:
        leaf: the float kernel (K, N).
        path: its parameter path (for errors and warnings).
        options: the `SparseGPTQuantizeOptions`.
        gram: XᵀX of its calibration inputs (K, K).

    Returns:
        The sparse quantized weight (`sparse_quantized`'s layout).

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (64, 8))
        >>> w = jax.random.normal(jax.random.key(1), (8, 3))
        >>> o = SparseGPTQuantizeOptions(n=2, m=4, bits=4, group_size=8)
        >>> leaf = sparsegpt_quantize_leaf(w, "w", o, x.T @ x)
        >>> leaf.values.bits, int((leaf.materialize() == 0).sum())  # 2 of every 4 zeroed
        (4, 12)
    """
    w = dense_kernel(leaf, path)
    options.check_kernel(path, w.shape)
    options.spec.num_groups(w.shape[0], where=f"{path} {tuple(w.shape)}")
    out, damp, outcome = _sparsegpt_quantize_one(
        w.astype(jnp.float32), gram, options, jnp.dtype(w.dtype).name)
    warn_dampening(path, options.dampening, float(damp), int(np.asarray(outcome)),
                   fallback="pruned and rounded with H = I (no updates)")
    return out


def _apply(flat: Mapping[str, Any], paths: list[str], config: Any, options: SparseGPTOptions,
           *, calibration: Calibration) -> tuple[Any, dict[str, Any]]:
    return calibrated_prune(flat, paths, config, calibration, "sparsegpt", options,
                            sparsegpt_leaf)


def _sparsegpt_plan(flat, paths, config, options):
    return _plan(flat, paths, config, options, op="sparsegpt")


def _quantize_apply(flat: Mapping[str, Any], paths: list[str], config: Any,
                    options: SparseGPTQuantizeOptions, *, calibration: Calibration
                    ) -> tuple[Any, dict[str, Any]]:
    _quantize_plan(flat, paths, config, options)  # every check before any work
    return calibrated_prune(flat, paths, config, calibration, "sparsegpt_quantize", options,
                            sparsegpt_quantize_leaf)


def _quantize_plan(flat, paths, config, options):
    check_selection(flat, paths, config, "sparsegpt_quantize", options)
    for path in paths:
        shape = tuple(flat[path].shape)
        options.spec.num_groups(shape[0], where=f"{path} {shape}")

    def shapes(f):
        out = dict(f)
        for path in paths:
            w = jnp.zeros(f[path].shape, jnp.float32)
            spec = options.spec
            groups = spec.num_groups(w.shape[0]) if spec.granularity == "group" else 1
            scale = jnp.ones((groups, 1, w.shape[1]), options.resolved_scale_dtype)
            zero = None if spec.symmetric else jnp.zeros(
                scale.shape, scale.dtype if spec.float_zero else jnp.uint8)
            out[path] = sparse_quantized(w, _nm_keep(w.shape, options), scale, zero, options,
                                         jnp.dtype(f[path].dtype).name)
        return out

    return config, jax.eval_shape(shapes, dict(flat))


def _nm_keep(shape: tuple[int, int], options: SparsityOptions) -> jax.Array:
    """A valid N:M keep-mask of a kernel shape (the first m-n of every m kept), for plans."""
    k, cols = shape
    slot = jnp.arange(k) % options.m
    return jnp.broadcast_to((slot < options.m - options.n)[:, None], (k, cols))


OPS = (
    Op(name="sparsegpt", options=SparseGPTOptions, apply=_apply, plan=_sparsegpt_plan,
       traceable=False, needs_calibration=True,
       doc="SparseGPT: prune (unstructured or N:M) and update the kept weights (OBS)"),
    Op(name="sparsegpt_quantize", options=SparseGPTQuantizeOptions, apply=_quantize_apply,
       plan=_quantize_plan, traceable=False, needs_calibration=True,
       doc="SparseGPT N:M pruning and quantization of the kept weights in one sweep "
           "(NMSparseWeight of a QuantizedWeight)"),
)

__all__ = ["OPS", "SparseGPTOptions", "SparseGPTQuantizeOptions", "sparse_quantized",
           "sparsegpt_leaf", "sparsegpt_prune", "sparsegpt_quantize_leaf"]
