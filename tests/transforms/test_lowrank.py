"""Truncated-SVD factorization vs numpy references (Eckart–Young error, hand-computed ranks)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.transforms.lowrank import factorize_svd, svd_rank
from jaxopt_llm.weights import LowRankWeight, linear


def _matrix(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (40, 40)])
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_error_is_discarded_singular_values(shape, rank):
    w = _matrix(shape, seed=rank)
    leaf = factorize_svd(jnp.asarray(w), rank=rank)
    assert isinstance(leaf, LowRankWeight)
    assert leaf.u.shape == (shape[0], rank) and leaf.v.shape == (rank, shape[1])
    assert leaf.u.dtype == jnp.float32 and leaf.v.dtype == jnp.float32
    sigma = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    expected = math.sqrt(np.sum(sigma[rank:] ** 2))
    approx = np.asarray(leaf.u, np.float64) @ np.asarray(leaf.v, np.float64)
    assert np.linalg.norm(w - approx) == pytest.approx(expected, rel=1e-5)
    # sqrt(Sigma) is split evenly: both factors carry the same singular values.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(leaf.u), axis=0),
                               np.sqrt(sigma[:rank]), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(leaf.v), axis=1),
                               np.sqrt(sigma[:rank]), rtol=1e-5)


def test_exact_low_rank_matrix_is_recovered_and_runs_under_jit():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 3)) @ rng.standard_normal((3, 40))).astype(np.float32)
    leaf = factorize_svd(w, energy=1 - 1e-9)  # float32 rounding adds tiny sigmas; numpy in
    assert leaf.rank == 3 and isinstance(leaf.u, jax.Array)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    y = jax.jit(linear)(x, leaf)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ w, rtol=1e-4, atol=1e-4)


def test_dtype_is_kept():
    w = jnp.asarray(_matrix((32, 32)), jnp.bfloat16)
    leaf = factorize_svd(w, rank=4)
    assert leaf.u.dtype == jnp.bfloat16 and leaf.v.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("shape", "ratio", "expected"),
    [((100, 100), 0.2, 40),  # 0.8 * 10000 / 200
     ((64, 192), 0.5, 24),  # 0.5 * 12288 / 256
     ((30, 70), 0.25, 15),  # floor(0.75 * 2100 / 100 = 15.75)
     ((576, 1536), 0.2, 335)],  # floor(0.8 * 884736 / 2112 = 335.1)
)
def test_ratio_rank(shape, ratio, expected):
    assert svd_rank(shape, ratio=ratio) == expected
    m, n = shape
    assert expected * (m + n) <= (1 - ratio) * m * n  # at least `ratio` of the parameters go


@pytest.mark.parametrize(
    ("energy", "expected"),
    # sigma^2 = 16, 9, 4, 1 (total 30): cumulative shares 0.533, 0.833, 0.967, 1
    [(0.5, 1), (0.55, 2), (0.8333, 2), (0.9, 3), (0.97, 4), (1.0, 4)],
)
def test_energy_rank(energy, expected):
    sigma = np.array([4.0, 3.0, 2.0, 1.0, 0.0, 0.0])
    assert svd_rank((20, 30), energy=energy, singular_values=sigma) == expected


def test_energy_rank_from_factorize_matches_singular_values():
    w = np.diag([5.0, 4.0, 3.0, 0.5] + [0.0] * 12).astype(np.float32)  # sigma^2 total 50.25
    assert factorize_svd(w, energy=0.8).rank == 2  # (25 + 16) / 50.25 = 0.816
    assert factorize_svd(w, energy=0.99).rank == 3  # 50 / 50.25 = 0.995


def test_rank_option_passes_through():
    assert svd_rank((32, 48), rank=7) == 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({}, "exactly one of rank, ratio or energy for the SVD, got none"),
     ({"rank": 2, "ratio": 0.5}, "exactly one of rank, ratio or energy .* got rank, ratio"),
     ({"rank": 0}, r"rank must be a positive integer, got 0"),
     ({"rank": -3}, r"rank must be a positive integer, got -3"),
     ({"rank": 2.5}, r"rank must be a positive integer, got 2.5"),
     ({"rank": 16}, r"rank 16 is full rank \(or more\) for a kernel of shape \(16, 24\); "
                    r"use rank < 16"),
     ({"rank": 40}, r"rank 40 is full rank"),
     ({"rank": 10}, r"rank=10 gives rank 10, which does not save parameters for a kernel of "
                    r"shape \(16, 24\): 10·\(16\+24\) = 400 >= 384; the largest rank that saves "
                    r"parameters is 9"),
     ({"ratio": 0.0}, r"ratio must be in \(0, 1\)"),
     ({"ratio": 1.0}, r"ratio must be in \(0, 1\)"),
     ({"ratio": -0.2}, r"ratio must be in \(0, 1\)"),
     ({"ratio": 0.99}, r"ratio=0.99 gives rank 0 for a kernel of shape \(16, 24\)"),
     ({"energy": 0.0}, r"energy must be in \(0, 1\]"),
     ({"energy": 1.5}, r"energy must be in \(0, 1\]"),
     ({"energy": 1.0}, r"energy=1.0 gives rank 16, which does not save parameters"),
     ],
)
def test_bad_options(kwargs, message):
    w = _matrix((16, 24))
    with pytest.raises(ValueError, match=message):
        factorize_svd(w, **kwargs)


@pytest.mark.parametrize(
    ("w", "message"),
    [(np.ones((4, 4, 4), np.float32), r"needs a 2-D kernel, got shape \(4, 4, 4\)"),
     (np.ones(8, np.float32), r"needs a 2-D kernel, got shape \(8,\)"),
     (np.ones((1, 8), np.float32), r"shape \(1, 8\) has rank at most 1"),
     (np.ones((8, 8), np.int8), "needs a floating-point kernel, got dtype int8"),
     ([[1.0, 2.0], [3.0, 4.0]], "needs a plain array kernel, got list"),
     (LowRankWeight(u=jnp.ones((8, 2)), v=jnp.ones((2, 8))), "got LowRankWeight")],
)
def test_bad_kernels(w, message):
    with pytest.raises(ValueError, match=message):
        factorize_svd(w, rank=1)


def test_energy_needs_singular_values_and_a_nonzero_kernel():
    with pytest.raises(ValueError, match="energy needs the kernel's singular_values"):
        svd_rank((8, 8), energy=0.5)
    with pytest.raises(ValueError, match=r"shape \(8, 8\) is all zeros"):
        factorize_svd(np.zeros((8, 8), np.float32), energy=0.5)
