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
from jaxopt_llm.transforms.gptq import inverse_cholesky_upper, warn_dampening
from jaxopt_llm.transforms.prune import _dense_kernel, lowest_mask
from jaxopt_llm.transforms.wanda import SparsityOptions, _plan, calibrated_prune, store


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
    k, n_out = w.shape
    block = options.block_size
    h = hessian.astype(jnp.float32)
    w = w.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    upper, damp_used, outcome = inverse_cholesky_upper(h, jnp.float32(options.dampening))
    padded = -(-k // block) * block
    w = jnp.pad(w, ((0, padded - k), (0, 0)))
    upper = jnp.pad(upper, ((0, padded - k), (0, padded - k)))
    upper = upper + jnp.diag(jnp.arange(padded) >= k).astype(jnp.float32)
    real = jnp.arange(padded) < k
    nm = options.pattern == "nm"

    def prune_block(b, carry):
        w, keep_all = carry
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
            w_block, errors, keep_block = state
            if nm:
                def choose(keep_block):
                    group = jax.lax.dynamic_slice(w_block, (i, 0), (options.m, n_out))
                    d = jax.lax.dynamic_slice(diag, (i,), (options.m,))
                    mask = lowest_mask(group ** 2 / (d ** 2)[:, None], options.n, axis=0)
                    return jax.lax.dynamic_update_slice(keep_block, mask, (i, 0))

                keep_block = jax.lax.cond(i % options.m == 0, choose, lambda kb: kb,
                                          keep_block)
            row = w_block[i]
            kept = jnp.where(keep_block[i], row, 0.0)
            error = (row - kept) / u_block[i, i]
            w_block = w_block - u_block[i][:, None] * error[None, :]  # rows < i get 0
            w_block = w_block.at[i].set(kept)
            return w_block, errors.at[i].set(error), keep_block

        init = (w_block, jnp.zeros((block, n_out), jnp.float32), keep_block)
        w_block, errors, keep_block = jax.lax.fori_loop(0, block, prune_input, init)
        u_rows = jax.lax.dynamic_slice(upper, (start, 0), (block, padded))
        w = w - u_rows.T @ errors  # later inputs (earlier rows get 0 · error)
        w = jax.lax.dynamic_update_slice(w, w_block, (start, 0))
        keep_all = jax.lax.dynamic_update_slice(keep_all, keep_block, (start, 0))
        return w, keep_all

    keep = jnp.ones((padded, n_out), jnp.bool_)
    w, keep = jax.lax.fori_loop(0, padded // block, prune_block, (w, keep))
    return w[:k], keep[:k], damp_used, outcome


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
    w = _dense_kernel(leaf, path)
    options.check_kernel(path, w.shape)
    out, damp, outcome = _sparsegpt_one(w, gram, options)
    warn_dampening(path, options.dampening, float(damp), int(np.asarray(outcome)),
                   fallback="pruned with H = I (magnitude within each block, no updates)")
    return out


def _apply(flat: Mapping[str, Any], paths: list[str], config: Any, options: SparseGPTOptions,
           *, calibration: Calibration) -> tuple[Any, dict[str, Any]]:
    return calibrated_prune(flat, paths, config, calibration, "sparsegpt", options,
                            sparsegpt_leaf)


def _sparsegpt_plan(flat, paths, config, options):
    return _plan(flat, paths, config, options, op="sparsegpt")


OPS = (
    Op(name="sparsegpt", options=SparseGPTOptions, apply=_apply, plan=_sparsegpt_plan,
       traceable=False, needs_calibration=True,
       doc="SparseGPT: prune (unstructured or N:M) and update the kept weights (OBS)"),
)

__all__ = ["OPS", "SparseGPTOptions", "sparsegpt_leaf", "sparsegpt_prune"]
