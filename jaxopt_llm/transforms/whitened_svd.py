"""Activation-aware low-rank factorization: ASVD and SVD-LLM.

Both factor a data-scaled kernel so that the truncation drops what matters least for the
layer's *outputs* on calibration inputs A (tokens × d_in), not for the weights:

* ASVD ("ASVD: Activation-aware Singular Value Decomposition for Compressing Large
  Language Models", Yuan et al., 2023): s_j = (mean_t |A_tj|)^α (α = 0.5), SVD of
  diag(s)·K = U Σ Vᵀ, then u = diag(s)⁻¹ U_k √Σ_k, v = √Σ_k V_kᵀ.
* SVD-LLM ("SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
  Model Compression", Wang et al., 2024): AᵀA = L Lᵀ (Cholesky, lower), SVD of
  Lᵀ·K = U Σ Vᵀ, then u = L⁻ᵀ U_k √Σ_k, v = √Σ_k V_kᵀ. Because A L⁻ᵀ has orthonormal
  columns, the output error ‖A(K − u v)‖_F equals √(Σ_{i>k} σ_i²) of the whitened
  spectrum, so this truncation is the best rank-k one for the outputs. A Gram matrix
  that is not positive definite (fewer tokens than inputs, dead channels) gets
  ε·mean(diag)·I added, ε from 1e-6 up ×10, with a warning.

Ranks come from `rank`, `ratio` or `energy` exactly as for plain SVD (`lowrank.svd_rank`;
energy is measured on the scaled spectrum), or with `allocation="global"` from one
parameter budget over all selected linears, each linear's cost of a rank being its
whitened output error (`allocate_ranks`; a linear may stay dense); the result is the
same `LowRankWeight`.
Kernels (d_in, d_out), input channel j = row j. SVDs run on the host in float64. Blocks
are factorized layer-sequentially (each block's statistics come from the outputs of
the blocks already factorized, as SVD-LLM's authors do).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxopt_llm import tree
from jaxopt_llm.calibration import Calibration, linear_statistics
from jaxopt_llm.transforms.base import Op, check_finite_number
from jaxopt_llm.transforms.layerwise import block_selection, each_linear_sequentially
from jaxopt_llm.transforms.lowrank import SVDOptions, _svd_plan, svd_rank
from jaxopt_llm.weights import LowRankWeight, is_weight_leaf

# How often the regularisation of a non-positive-definite Gram matrix is raised ×10.
REGULARISATION_TRIES = 8


ALLOCATIONS = ("uniform", "global")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SVDLLMOptions(SVDOptions):
    """The rank (rank / ratio / energy, as `svd`) and how a `ratio` is spread: "uniform"
    (every linear loses that share) or "global" (the selected linears together lose it,
    each keeping the rank that costs its outputs least, or staying dense:
    `allocate_ranks`; the ranks come from one pass over the model as it is, the factors
    layer-sequentially as for "uniform").

    Example:
        >>> SVDLLMOptions(ratio=0.2, allocation="global").allocation
        'global'
    """

    allocation: str = "uniform"

    def validate(self) -> None:
        """The rank option's checks; a known allocation, "global" only with a ratio."""
        super().validate()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got "
                             f"{self.allocation!r}")
        if self.allocation == "global" and self.ratio is None:
            raise ValueError("allocation 'global' spreads a parameter ratio over the "
                             "linears; give ratio (not rank or energy)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ASVDOptions(SVDLLMOptions):
    """ASVD: the rank options and allocation (as `svdllm`) and the scaling exponent α.

    Example:
        >>> ASVDOptions(ratio=0.2).alpha
        0.5
    """

    alpha: float = 0.5

    def validate(self) -> None:
        """The rank and allocation checks, and α a finite number in (0, 1]."""
        super().validate()
        check_finite_number("alpha", self.alpha, low=0.0, high=1.0, open_low=True)


def _factors(scaled: np.ndarray, unscale: Any, shape: tuple[int, int], options: SVDOptions
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of the scaled kernel, truncated; `unscale(x)` maps u's rows back to inputs."""
    u, s, vt = np.linalg.svd(scaled, full_matrices=False)
    k = svd_rank(shape, rank=options.rank, ratio=options.ratio, energy=options.energy,
                 singular_values=s)
    root = np.sqrt(s[:k])
    return unscale(u[:, :k] * root), root[:, None] * vt[:k], s


def asvd_factorize(w: Any, mean_abs: Any, options: ASVDOptions) -> LowRankWeight:
    """ASVD of one kernel w (d_in, d_out) from its inputs' mean |A_j| (d_in,).

    Args:
        w: the float kernel.
        mean_abs: mean absolute value of each input channel over the calibration tokens.
        options: rank (rank / ratio / energy) and α.

    Returns:
        The `LowRankWeight` (u (d_in, k), v (k, d_out)) in w's dtype.

    Example:
        >>> w = np.outer(np.arange(1.0, 5.0), np.arange(1.0, 4.0)).astype(np.float32)
        >>> low = asvd_factorize(w, np.ones(4), ASVDOptions(rank=1))
        >>> bool(np.allclose(low.materialize(), w, atol=1e-4))
        True
    """
    kernel = np.asarray(w, np.float64)
    s = np.power(np.maximum(np.asarray(mean_abs, np.float64), 1e-12), options.alpha)
    s = s / np.sqrt(s.max() * s.min())  # a common factor cancels; keeps numbers near 1
    u, v, _ = _factors(s[:, None] * kernel, lambda x: x / s[:, None], kernel.shape, options)
    return LowRankWeight(u=jnp.asarray(u, w.dtype), v=jnp.asarray(v, w.dtype))


def whitening(gram: Any, name: str = "weight") -> tuple[np.ndarray, float]:
    """Lower L with L Lᵀ = AᵀA (+ ε·mean(diag)·I when needed, with a warning).

    Args:
        gram: AᵀA (d_in, d_in).
        name: the parameter, named in the warning.

    Returns:
        (L (d_in, d_in) float64, ε used: 0 when none was needed).

    Example:
        >>> lower, eps = whitening(np.array([[4.0, 2.0], [2.0, 2.0]]))
        >>> lower.tolist(), eps
        ([[2.0, 0.0], [1.0, 1.0]], 0.0)
    """
    g = np.asarray(gram, np.float64)
    if not np.all(np.isfinite(g)):
        raise ValueError(f"{name}: the inputs' Gram matrix has non-finite entries (the "
                         "calibration activations overflowed or are NaN)")
    g = (g + g.T) / 2
    base = float(np.mean(np.abs(np.diag(g)))) or 1.0
    eps = 0.0
    for _ in range(REGULARISATION_TRIES + 1):
        try:
            lower = np.linalg.cholesky(g + eps * base * np.eye(g.shape[0]))
        except np.linalg.LinAlgError:
            eps = 1e-6 if eps == 0.0 else eps * 10
            continue
        if eps:
            warnings.warn(f"{name}: the inputs' Gram matrix is not positive definite (too "
                          f"few calibration tokens, or dead channels); whitened with "
                          f"{eps:g}·mean(diag)·I added", RuntimeWarning, stacklevel=2)
        return lower, eps
    raise ValueError(f"{name}: the inputs' Gram matrix cannot be factorised even with "
                     f"{eps:g}·mean(diag)·I added; it is not finite or far from positive "
                     "semi-definite")


def svdllm_factorize(w: Any, gram: Any, options: SVDOptions, name: str = "weight"
                     ) -> LowRankWeight:
    """SVD-LLM of one kernel w (d_in, d_out) from its inputs' Gram matrix AᵀA.

    Args:
        w: the float kernel.
        gram: AᵀA (d_in, d_in) over the calibration tokens.
        options: the rank (rank / ratio / energy, energy on the whitened spectrum).
        name: the parameter, for warnings.

    Returns:
        The `LowRankWeight` (u = L⁻ᵀ U_k √Σ_k, v = √Σ_k V_kᵀ) in w's dtype.

    Example:
        >>> a = np.random.default_rng(0).standard_normal((16, 4))
        >>> w = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
        >>> low = svdllm_factorize(w, a.T @ a, SVDOptions(rank=1))
        >>> low.u.shape, low.v.shape
        ((4, 1), (1, 4))
    """
    import scipy.linalg  # here: importing SciPy costs every CLI start ~0.15 s

    kernel = np.asarray(w, np.float64)
    lower, _ = whitening(gram, name)
    u, v, _ = _factors(
        lower.T @ kernel,
        lambda x: scipy.linalg.solve_triangular(lower.T, x, lower=False),
        kernel.shape, options)
    return LowRankWeight(u=jnp.asarray(u, w.dtype), v=jnp.asarray(v, w.dtype))


def _lower_hull(points: list[tuple[int, float, int | None]]
                ) -> list[tuple[int, float, int | None]]:
    """The lower convex hull of (parameters, error, rank) points, parameters descending:
    the choices worth taking one after another, each step the cheapest per parameter."""
    hull: list[tuple[int, float, int | None]] = []
    for point in sorted(points, key=lambda p: -p[0]):
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            # drop hull[-1] when it lies on or above the chord from hull[-2] to point
            if (y1 - y0) * (x0 - point[0]) >= (point[1] - y0) * (x0 - x1):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def allocate_ranks(spectra: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]],
                   ratio: float, *, keep_dense: bool = True) -> dict[str, int | None]:
    """Per-linear ranks that together remove `ratio` of the linears' parameters, spending
    the budget where dropping singular values costs the outputs least.

    With SVD-LLM's whitening, dropping σ_i of a linear adds σ_i² to its squared output
    error on the calibration inputs; divided by the linear's output energy Σσ² it is a
    share comparable across linears (the sensitivity measure). Each linear's choices are
    rank k (k·(m + n) parameters, error Σ_{i≥k} σ_i² / Σσ²) for 1 ≤ k with k·(m + n) <
    m·n, or, with `keep_dense`, its dense kernel (m·n parameters, no error): a square
    kernel factorized at all keeps at most half its spectrum, which can cost more than
    shrinking another linear further. Steps along each linear's lower convex hull of
    (parameters, error) are taken cheapest error per parameter first until the budget
    holds; the last step stops at the first rank within it that meets the budget.

    Args:
        spectra: per linear, its whitened singular values (descending).
        shapes: per linear, its kernel shape (m, n).
        ratio: the share of Σ m·n to remove, in (0, 1).
        keep_dense: whether a linear may stay dense (None in the result).

    Returns:
        {linear: rank, or None for a linear kept dense}, with Σ parameters ≤
        (1 − ratio)·Σ m·n.

    Raises:
        ValueError: a shape no rank saves parameters for; even rank 1 everywhere exceeds
            the budget (by how many parameters).

    Example:
        >>> spectra = {"a": np.array([4.0, 3.0, 0.1]), "b": np.array([5.0, 1.0, 1.0])}
        >>> allocate_ranks(spectra, {"a": (8, 8), "b": (8, 8)}, 0.6)  # a's 3.0 matters
        {'a': 2, 'b': 1}
    """
    dense = sum(m * n for m, n in shapes.values())
    budget = (1.0 - ratio) * dense
    top = {}
    for name, (m, n) in shapes.items():
        top[name] = min((m * n - 1) // (m + n), len(spectra[name]))
        if top[name] < 1:
            raise ValueError(f"{name} {(m, n)}: no rank saves parameters for this shape")
    floor = sum(m + n for m, n in shapes.values())
    if floor > budget:
        raise ValueError(f"ratio {ratio}: rank 1 in every linear keeps {floor:,} parameters, "
                         f"{floor - budget:,.0f} more than the budget of {budget:,.0f}; use "
                         f"a ratio of at most {1 - floor / dense:.4f}")
    steps = []  # (error per parameter saved, order, index, linear, from, to)
    choice: dict[str, int | None] = {}
    cost = 0
    for order, (name, sigma) in enumerate(spectra.items()):
        m, n = shapes[name]
        energy = np.square(np.asarray(sigma, np.float64))
        tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]]) / (float(energy.sum())
                                                                         or 1.0)
        points = [(k * (m + n), float(tail[k]), k) for k in range(1, top[name] + 1)]
        if keep_dense:
            points.append((m * n, 0.0, None))
        hull = _lower_hull(points)
        choice[name] = hull[0][2]
        cost += hull[0][0]
        slope = 0.0  # rises along a convex hull; the max keeps rounding from reordering
        for a, b in zip(hull, hull[1:], strict=False):
            slope = max(slope, (b[1] - a[1]) / (a[0] - b[0]))
            steps.append((slope, order, len(steps), name, a, b))
    steps.sort(key=lambda step: step[:3])
    for _, _, _, name, (size, _, _), (size_after, _, rank_after) in steps:
        if cost <= budget:
            break
        m, n = shapes[name]
        if cost - (size - size_after) <= budget:  # a rank inside this step is enough
            rank = max(min(int((size - (cost - budget)) // (m + n)), top[name]), rank_after)
            choice[name], cost = rank, cost - size + rank * (m + n)
            break
        choice[name], cost = rank_after, cost - size + size_after
    return choice


def _check(flat: Mapping[str, Any], paths: list[str], config: Any, op: str,
           options: SVDOptions) -> dict[int, list[str]]:
    by_block = block_selection(flat, paths, config, op)
    for path in paths:
        leaf = flat[path]
        if is_weight_leaf(leaf):
            raise ValueError(f"{path}: {op} needs a float kernel, got {type(leaf).__name__} "
                             "(factorize before quantizing)")
        if len(leaf.shape) != 2:
            raise ValueError(f"{path} has shape {leaf.shape}: {op} selects 2-D kernels only")
        if options.energy is None and options.allocation == "uniform":  # before any work
            try:
                svd_rank(leaf.shape, rank=options.rank, ratio=options.ratio)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
    if options.allocation == "global":  # the budget is reachable at all
        shapes = {p: tuple(flat[p].shape) for p in paths}
        allocate_ranks({p: np.ones(min(s)) for p, s in shapes.items()}, shapes,
                       options.ratio)
    return by_block


def _plan_for(op: str):
    def plan(flat, paths, config, options):
        _check(flat, paths, config, op, options)
        if options.energy is not None:
            raise ValueError(f"{op} with energy: the ranks depend on calibration data, so "
                             "`plan` cannot size them; give rank or ratio")
        # allocation "global" picks each linear's rank from calibration data; the plan
        # shows the uniform split of the same budget
        return _svd_plan(flat, paths, config, SVDOptions(rank=options.rank,
                                                        ratio=options.ratio))
    return plan


def _factorize_one(op: str, w: Any, path: str, stats: Any, options: SVDLLMOptions
                   ) -> LowRankWeight:
    if op == "asvd":
        return _named(path, asvd_factorize, w, stats.mean_abs, options)
    return _named(path, svdllm_factorize, w, stats.gram, options, path)


def _apply_for(op: str):
    def apply(flat, paths, config, options: SVDLLMOptions, *, calibration: Calibration):
        by_block = _check(flat, paths, config, op, options)
        if options.allocation == "uniform":
            return config, each_linear_sequentially(
                flat, by_block, config, calibration,
                lambda w, path, stats: _factorize_one(op, w, path, stats, options))
        # global: every linear's statistics first (one pass of the model as it is) give
        # the ranks; then the blocks are factorized in order with those ranks, each from
        # the inputs the blocks already factorized give it (a rank of None: stays dense)
        stats = linear_statistics(config, tree.unflatten(dict(flat)), calibration)
        spectra = {}
        for path in paths:
            lower, _ = whitening(stats[path.rsplit("/", 1)[0]].gram, path)
            spectra[path] = np.linalg.svd(lower.T @ np.asarray(flat[path], np.float64),
                                          compute_uv=False)
        ranks = allocate_ranks(spectra, {p: tuple(flat[p].shape) for p in paths},
                               options.ratio)

        def factorize(w: Any, path: str, linear_stats: Any) -> Any:
            if ranks[path] is None:
                return w
            fixed = dataclasses.replace(options, ratio=None, rank=ranks[path],
                                        allocation="uniform")
            with warnings.catch_warnings():  # whitening warned once above
                warnings.simplefilter("ignore", RuntimeWarning)
                return _factorize_one(op, w, path, linear_stats, fixed)

        return config, each_linear_sequentially(flat, by_block, config, calibration,
                                                factorize)

    return apply


def _named(path: str, factorize: Any, *args: Any) -> LowRankWeight:
    try:
        return factorize(*args)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


OPS = (
    Op(name="asvd", options=ASVDOptions, apply=_apply_for("asvd"), plan=_plan_for("asvd"),
       traceable=False, needs_calibration=True,
       doc="ASVD: SVD of the kernel scaled by mean |activation|^α, into LowRankWeight"),
    Op(name="svdllm", options=SVDLLMOptions, apply=_apply_for("svdllm"),
       plan=_plan_for("svdllm"),
       traceable=False, needs_calibration=True,
       doc="SVD-LLM: SVD of the kernel whitened by the Cholesky factor of AᵀA"),
)

__all__ = ["ALLOCATIONS", "OPS", "ASVDOptions", "SVDLLMOptions", "allocate_ranks",
           "asvd_factorize", "svdllm_factorize", "whitening"]
