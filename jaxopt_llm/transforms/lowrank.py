"""Low-rank factorization of a kernel by truncated SVD.

Eckart–Young–Mirsky ("The approximation of one matrix by another of lower
rank", Eckart & Young, 1936): the rank-k truncation W_k = U_k Σ_k V_kᵀ is the
best rank-k approximation of W in Frobenius norm, with error
‖W − W_k‖_F = sqrt(Σ_{i>k} σ_i²). The plain-SVD baseline of "SVD-LLM:
Truncation-aware Singular Value Decomposition for Large Language Model
Compression" (Wang et al., 2024); ASVD and SVD-LLM whiten W first.

A kernel w (m, n) (stored (d_in, d_out)) becomes LowRankWeight(u (m, k), v (k, n))
with u = U_k √Σ_k and v = √Σ_k V_kᵀ (√Σ split evenly, so both factors have
similar scale, which matters if they are quantized later). It stores k·(m + n)
numbers instead of m·n, so it saves parameters only when k < m·n / (m + n).

The rank is given one of three ways:
  rank    k itself
  ratio   the fraction of the matrix's parameters removed: k = ⌊(1 − ratio)·m·n/(m + n)⌋
  energy  the smallest k whose kept Σσ_i² is at least `energy` of the total
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.transforms.base import Op, OpOptions
from jaxopt_llm.weights import LowRankWeight


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"SVD factorization needs a 2-D kernel, got shape {tuple(shape)}")
    m, n = (int(d) for d in shape)
    if min(m, n) < 2:
        raise ValueError(f"kernel of shape {(m, n)} has rank at most 1; nothing to factorize")
    return m, n


def _check_options(rank: Any, ratio: Any, energy: Any) -> str:
    """Exactly one option, in range; returns it as "name=value" for messages."""
    given = [(name, value) for name, value in (("rank", rank), ("ratio", ratio),
                                                ("energy", energy)) if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of rank, ratio or energy for the SVD, got "
                         + (", ".join(name for name, _ in given) if given else "none"))
    name, value = given[0]
    if name == "rank" and (isinstance(rank, bool) or not isinstance(rank, int | np.integer)
                           or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if name == "ratio" and not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (the fraction of parameters removed), "
                         f"got {ratio!r}")
    if name == "energy" and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1] (the share of sum(sigma^2) kept), "
                         f"got {energy!r}")
    return f"{name}={value}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SVDOptions(OpOptions):
    """Truncated SVD: exactly one of a rank, a parameter ratio removed, or an energy kept."""

    rank: int | None = None
    ratio: float | None = None  # fraction of the kernel's parameters removed
    energy: float | None = None  # share of sum(sigma^2) kept

    def validate(self) -> None:
        _check_options(self.rank, self.ratio, self.energy)


def svd_rank(
    shape: Sequence[int],
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    singular_values: Any = None,
) -> int:
    """The rank k for a kernel of `shape` (m, n), from exactly one of rank / ratio / energy.

    `energy` needs `singular_values` (descending, as np.linalg.svd returns them).
    Raises ValueError for bad options, k = 0, or a k that would not save
    parameters (k·(m + n) >= m·n).
    """
    option = _check_options(rank, ratio, energy)
    m, n = _check_shape(shape)
    if rank is not None:
        if rank >= min(m, n):
            raise ValueError(f"rank {rank} is full rank (or more) for a kernel of shape {(m, n)}; "
                             f"use rank < {min(m, n)}")
        k = int(rank)
    elif ratio is not None:
        k = math.floor((1.0 - ratio) * m * n / (m + n))
    else:
        if singular_values is None:
            raise ValueError("energy needs the kernel's singular_values")
        sigma2 = np.square(np.asarray(singular_values, np.float64))
        cumulative = np.cumsum(sigma2)
        if cumulative.size == 0 or cumulative[-1] <= 0.0:
            raise ValueError(f"kernel of shape {(m, n)} is all zeros; energy is undefined")
        # Dividing by the last cumulative sum makes the final entry exactly 1.0.
        fractions = cumulative / cumulative[-1]
        k = min(int(np.searchsorted(fractions, energy, side="left")) + 1, fractions.size)
    if k <= 0:
        raise ValueError(f"{option} gives rank 0 for a kernel of shape {(m, n)}; keep more")
    if k * (m + n) >= m * n:
        largest = (m * n - 1) // (m + n)
        hint = (f"the largest rank that saves parameters is {largest}" if largest > 0
                else "no rank saves parameters for this shape")
        raise ValueError(f"{option} gives rank {k}, which does not save parameters for a kernel "
                         f"of shape {(m, n)}: {k}·({m}+{n}) = {k * (m + n)} >= {m * n}; {hint}")
    return k


def _svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD in float64: w (m, n) = U (m, r) diag(S) (r,) Vt (r, n), r = min(m, n)."""
    return np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)


def _factors(
    svd: tuple[np.ndarray, np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    u, s, vt = svd
    root = np.sqrt(s[:k])
    return u[:, :k] * root, root[:, None] * vt[:k]  # (m, k), (k, n)


def factorize_svd(
    w: Any,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
) -> LowRankWeight:
    """Truncated-SVD factorization of a 2-D kernel w (m, n) into LowRankWeight(u, v).

    Exactly one of rank / ratio / energy (see `svd_rank`). The SVD runs in
    float64 on the host; the factors come back as jax arrays in w's dtype.
    """
    if not isinstance(w, np.ndarray | jax.Array):
        raise ValueError(f"factorize_svd needs a plain array kernel, got {type(w).__name__}")
    _check_options(rank, ratio, energy)
    _check_shape(w.shape)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"factorize_svd needs a floating-point kernel, got dtype {w.dtype}")
    if energy is None:  # validate before the (expensive) SVD
        k = svd_rank(w.shape, rank=rank, ratio=ratio)
        decomposition = _svd(w)
    else:
        decomposition = _svd(w)
        k = svd_rank(w.shape, rank=rank, ratio=ratio, energy=energy,
                     singular_values=decomposition[1])
    u, v = _factors(decomposition, k)
    return LowRankWeight(u=jnp.asarray(u, w.dtype), v=jnp.asarray(v, w.dtype))


def _svd_kernels(flat, paths):
    for path in paths:
        leaf = flat[path]
        if not isinstance(leaf, np.ndarray | jax.Array | jax.ShapeDtypeStruct):
            raise ValueError(f"{path}: svd needs a plain float kernel, got "
                             f"{type(leaf).__name__} (factorize before quantizing)")
        if len(leaf.shape) != 2:
            raise ValueError(f"{path} has shape {leaf.shape}: svd selects 2-D kernels only")
    return [flat[p] for p in paths]


def _svd_apply(flat, paths, config, options):
    kernels = _svd_kernels(flat, paths)
    flat = dict(flat)
    if options.energy is None:  # every rank first: a bad shape fails before any SVD
        for path, w in zip(paths, kernels, strict=True):
            try:
                svd_rank(w.shape, rank=options.rank, ratio=options.ratio)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
    for path, w in zip(paths, kernels, strict=True):
        try:
            flat[path] = factorize_svd(w, **options.to_dict())
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return config, flat


def _svd_plan(flat, paths, config, options):
    flat = dict(flat)
    if options.energy is not None:  # the rank depends on the values: compute it
        return _svd_apply(flat, paths, config, options)
    for path, w in zip(paths, _svd_kernels(flat, paths), strict=True):
        try:
            k = svd_rank(w.shape, rank=options.rank, ratio=options.ratio)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        m, n = w.shape
        flat[path] = LowRankWeight(u=jax.ShapeDtypeStruct((m, k), w.dtype),
                                   v=jax.ShapeDtypeStruct((k, n), w.dtype))
    return config, flat


OPS = (
    Op(name="svd", options=SVDOptions, apply=_svd_apply, plan=_svd_plan, traceable=False,
       doc="truncated SVD into LowRankWeight (by rank, parameter ratio removed, or energy)"),
)

__all__ = ["factorize_svd", "svd_rank"]
