"""ASVD and SVD-LLM against numpy: SVD-LLM's output error equals the tail of the whitened
spectrum and is below plain SVD's (and ASVD's) at the same rank; ranks meet the budget
exactly; rank-deficient statistics warn and stay finite; the ops on a model; bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import tree
from jaxopt_llm.calibration import Calibration
from jaxopt_llm.models import ModelConfig, forward, init_params
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.plan import plan
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.transforms.lowrank import SVDOptions, factorize_svd, svd_rank
from jaxopt_llm.transforms.whitened_svd import (
    ASVDOptions,
    allocate_ranks,
    asvd_factorize,
    svdllm_factorize,
)
from jaxopt_llm.weights import LowRankWeight, is_weight_leaf


def _inputs(seed, tokens, k):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)) @ (np.eye(k) + 0.4 * rng.standard_normal((k, k)))
    x[:, rng.choice(k, max(1, k // 8), replace=False)] *= 15.0
    return x


def _output_error(x, w, low):
    return np.linalg.norm(x @ w - x @ np.asarray(low.materialize(), np.float64))


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_svdllm_error_is_the_whitened_tail_and_beats_svd_and_asvd(rank):
    x = _inputs(0, 400, 48)
    w = np.random.default_rng(1).standard_normal((48, 32))
    gram = x.T @ x
    low = svdllm_factorize(w.astype(np.float32), gram, SVDOptions(rank=rank))
    assert isinstance(low, LowRankWeight) and low.rank == rank
    # Independent check: whitening by the symmetric square root gives the same spectrum
    # (any factor with F Fᵀ = AᵀA does: Fᵀ W and Lᵀ W differ by an orthogonal factor).
    vals, vecs = np.linalg.eigh(gram)
    root = vecs @ np.diag(np.sqrt(vals)) @ vecs.T
    sigma = np.linalg.svd(root @ w, compute_uv=False)
    tail = np.sqrt(np.sum(sigma[rank:] ** 2))
    error = _output_error(x, w, low)
    np.testing.assert_allclose(error, tail, rtol=1e-4)
    plain = factorize_svd(w.astype(np.float32), rank=rank)
    asvd = asvd_factorize(w.astype(np.float32), np.abs(x).mean(0), ASVDOptions(rank=rank))
    assert error < _output_error(x, w, asvd) < _output_error(x, w, plain)


def test_asvd_equals_numpy():
    x = _inputs(2, 200, 24)
    w = np.random.default_rng(3).standard_normal((24, 16))
    s = np.abs(x).mean(0) ** 0.5
    u, sig, vt = np.linalg.svd(s[:, None] * w, full_matrices=False)
    want = (u[:, :4] * sig[:4]) @ vt[:4] / s[:, None]
    low = asvd_factorize(w.astype(np.float32), np.abs(x).mean(0), ASVDOptions(rank=4))
    np.testing.assert_allclose(np.asarray(low.materialize()), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_ranks_meet_the_parameter_budget_exactly(ratio):
    x = _inputs(4, 300, 64)
    w = np.random.default_rng(5).standard_normal((64, 96)).astype(np.float32)
    low = svdllm_factorize(w, x.T @ x, SVDOptions(ratio=ratio))
    k = svd_rank((64, 96), ratio=ratio)
    assert low.rank == k and k * (64 + 96) <= (1 - ratio) * 64 * 96 < (k + 1) * (64 + 96)


def test_rank_deficient_statistics_warn_and_stay_finite():
    x = _inputs(6, 10, 64)  # 10 tokens, 64 inputs: AᵀA has rank 10
    x[:, 5] = 0.0
    w = np.random.default_rng(7).standard_normal((64, 32)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        low = svdllm_factorize(w, x.T @ x, SVDOptions(ratio=0.2), "layers_0/q")
    dense = np.asarray(low.materialize())
    assert np.all(np.isfinite(dense))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svdllm_factorize(w, _inputs(8, 300, 64).T @ _inputs(8, 300, 64), SVDOptions(ratio=0.2))
    with pytest.raises(ValueError, match="layers_0/q: the inputs' Gram matrix has non-finite"):
        svdllm_factorize(w, np.full((64, 64), np.nan), SVDOptions(ratio=0.2), "layers_0/q")


CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, max_position_embeddings=64)
WINDOWS = np.random.default_rng(0).integers(0, 64, (16, 32)).astype(np.int32)


@pytest.fixture(scope="module")
def params():
    """Random weights with log-normal channel gains in the norms (uneven activations)."""
    flat = tree.flatten(init_params(CONFIG, jax.random.key(0)))
    rng = np.random.default_rng(3)
    for path, value in flat.items():
        if "norm" in path:
            flat[path] = value * np.exp(1.5 * rng.standard_normal(value.shape)).astype(
                np.float32)
    return tree.unflatten(flat)


def test_recipes_order_on_a_model(params):
    """At 20% removed: SVD-LLM closer to the float model than ASVD, ASVD than plain SVD."""
    held_out = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 32)), jnp.int32)
    want = forward(CONFIG, params, held_out)[0]
    calibration = Calibration(windows=WINDOWS)
    errors = {}
    for name in ("svd-20", "asvd-20", "svdllm-20"):
        recipe = load_recipe(name)
        _, out = recipe(CONFIG, params,
                        calibration=calibration if recipe.needs_calibration else None)
        errors[name] = float(jnp.mean((forward(CONFIG, out, held_out)[0] - want) ** 2))
        planned = plan(recipe, CONFIG, params)
        shapes = {r.path: r for r in planned.rows}
        flat = tree.flatten(out)
        kinds = {type(v).__name__ for p, v in flat.items()
                 if p.startswith("layers_") and p.endswith("kernel")}
        if name == "asvd-20":  # ranks per linear from data (some may stay dense): the
            # budget holds in total
            assert "LowRankWeight" in kinds and kinds <= {"LowRankWeight", "ArrayImpl"}
            kernels = [p for p in flat if p.startswith("layers_") and p.endswith("kernel")]
            assert sum(flat[p].nbytes for p in kernels) <= sum(
                shapes[p].bytes_before for p in kernels) * 0.8
        else:
            assert kinds == {"LowRankWeight"}
            got = flat["layers_0/mlp/up_proj/kernel"]
            assert shapes["layers_0/mlp/up_proj/kernel"].bytes_after == got.nbytes
    assert errors["asvd-20"] < errors["svd-20"], errors


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_svdllm_beats_asvd_beats_svd_at_the_same_allocation(params, allocation):
    """The algorithms' order at 20% removed, each allocation compared with itself."""
    held_out = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 32)), jnp.int32)
    want = forward(CONFIG, params, held_out)[0]
    calibration = Calibration(windows=WINDOWS)
    errors = {}
    for op in ("svd", "asvd", "svdllm"):
        options = {"ratio": 0.2} if op == "svd" else {"ratio": 0.2, "allocation": allocation}
        _, out = _recipe(op, **options)(CONFIG, params,
                                        calibration=None if op == "svd" else calibration)
        errors[op] = float(jnp.mean((forward(CONFIG, out, held_out)[0] - want) ** 2))
    assert errors["svdllm"] < errors["asvd"] < errors["svd"], errors


def _recipe(op, **options):
    return Recipe(name=op, stages=(Stage(name="f", rules=(rule(BLOCK_LINEARS, op, **options),)),))


@pytest.mark.parametrize("op,options,message", [
    ("svdllm", {}, "give exactly one of rank, ratio or energy"),
    ("svdllm", {"ratio": 1.0}, r"ratio must be in \(0, 1\)"),
    ("svdllm", {"ratio": 0.999}, "gives rank 0"),
    ("svdllm", {"rank": 40}, "does not save parameters"),
    ("asvd", {"ratio": 0.2, "alpha": 0.0}, "alpha"),
    ("asvd", {"energy": 0.9}, "ranks depend on calibration data"),
])
def test_bad_options_fail_before_any_work(params, op, options, message):
    with pytest.raises(ValueError, match=message):
        plan(_recipe(op, **options), CONFIG, params)


def test_needs_float_kernels(params):
    quantized = load_recipe("w8")(CONFIG, params)[1]
    with pytest.raises(ValueError, match="is already a QuantizedWeight"):
        load_recipe("svdllm-20")(CONFIG, quantized, calibration=Calibration(windows=WINDOWS))


def _cost(spectra, ranks):
    """Total normalized dropped energy; a rank of None (dense) drops nothing."""
    return sum(0.0 if r is None else np.sum(spectra[k][r:] ** 2) / np.sum(spectra[k] ** 2)
               for k, r in ranks.items())


def _size(shapes, ranks):
    return sum(shapes[k][0] * shapes[k][1] if r is None else r * sum(shapes[k])
               for k, r in ranks.items())


def _brute_force_ranks(spectra, shapes, ratio, keep_dense):
    """The rank choice with the least total normalized dropped energy within the budget."""
    import itertools

    budget = (1 - ratio) * sum(m * n for m, n in shapes.values())
    names = list(spectra)
    best = None
    options = [[*range(1, (shapes[k][0] * shapes[k][1] - 1) // sum(shapes[k]) + 1)]
               + ([None] if keep_dense else []) for k in names]
    for ranks in itertools.product(*options):
        choice = dict(zip(names, ranks, strict=True))
        if _size(shapes, choice) > budget:
            continue
        cost = _cost(spectra, choice)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, choice)
    return best


@pytest.mark.parametrize("keep_dense", [False, True])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("seed", range(4))
def test_global_allocation_meets_the_budget_and_nears_brute_force(seed, ratio, keep_dense):
    rng = np.random.default_rng(seed)
    shapes = {"a": (12, 10), "b": (12, 12), "c": (10, 14)}
    spectra = {k: np.sort(rng.exponential(size=min(s)) ** rng.uniform(0.5, 3))[::-1]
               for k, s in shapes.items()}
    ranks = allocate_ranks(spectra, shapes, ratio, keep_dense=keep_dense)
    budget = (1 - ratio) * sum(m * n for m, n in shapes.values())
    assert _size(shapes, ranks) <= budget
    assert keep_dense or None not in ranks.values()
    best_cost, _ = _brute_force_ranks(spectra, shapes, ratio, keep_dense)
    # steps along each linear's convex hull, cheapest first: optimal when the budget
    # falls on a hull point, otherwise within the one step it stops inside
    assert _cost(spectra, ranks) <= best_cost * 1.25 + 1e-9
    uniform = {k: svd_rank(s, ratio=ratio) for k, s in shapes.items()}
    assert _cost(spectra, ranks) <= _cost(spectra, uniform) + 1e-9


def test_global_allocation_keeps_dense_the_linear_whose_spectrum_is_flat():
    """A flat spectrum loses half its energy at the largest rank that saves parameters; a
    steep one loses almost nothing at a small rank, so the budget goes there."""
    shapes = {"flat": (16, 16), "steep": (16, 16)}
    spectra = {"flat": np.ones(16), "steep": 0.3 ** np.arange(16)}
    ranks = allocate_ranks(spectra, shapes, 0.3)
    assert ranks["flat"] is None and ranks["steep"] is not None
    assert _size(shapes, ranks) <= 0.7 * 512
    assert allocate_ranks(spectra, shapes, 0.3, keep_dense=False)["flat"] == 7


def test_global_allocation_beats_uniform_on_mixed_spectra():
    x = _inputs(10, 400, 48)
    gram = x.T @ x
    rng = np.random.default_rng(11)
    low_rank = (rng.standard_normal((48, 3)) @ rng.standard_normal((3, 48))).astype(np.float32)
    full = rng.standard_normal((48, 48)).astype(np.float32)
    kernels = {"low": low_rank, "full": full}
    lower = np.linalg.cholesky(gram)
    spectra = {k: np.linalg.svd(lower.T @ w, compute_uv=False) for k, w in kernels.items()}
    ranks = allocate_ranks(spectra, {k: (48, 48) for k in kernels}, 0.4, keep_dense=False)
    uniform = svd_rank((48, 48), ratio=0.4)
    assert ranks["low"] < uniform < ranks["full"]

    def share(k, rank):
        low = svdllm_factorize(kernels[k], gram, SVDOptions(rank=rank))
        return _output_error(x, kernels[k], low) ** 2 / np.linalg.norm(x @ kernels[k]) ** 2

    assert sum(share(k, r) for k, r in ranks.items()) < sum(share(k, uniform) for k in kernels)


def test_global_budget_that_cannot_be_met_says_by_how_much():
    with pytest.raises(ValueError, match=r"ratio 0.99: rank 1 in every linear keeps 40 "
                                         r"parameters, 36 more than the budget of 4; use a "
                                         r"ratio of at most 0.9000"):
        allocate_ranks({"a": np.ones(10)}, {"a": (20, 20)}, 0.99)


def test_global_allocation_on_a_model(params):
    recipe = _recipe("svdllm", ratio=0.3, allocation="global")
    planned = plan(recipe, CONFIG, params)  # the uniform split of the same budget
    _, out = recipe(CONFIG, params, calibration=Calibration(windows=WINDOWS))
    flat, params_flat = tree.flatten(out), tree.flatten(params)
    selected = [p for p in flat if p.startswith("layers_") and p.endswith("kernel")]
    dense = sum(row.bytes_before for row in planned.rows if row.path in selected)
    factored = [p for p in selected if isinstance(flat[p], LowRankWeight)]
    assert factored and all(flat[p].shape == params_flat[p].shape and not
                            is_weight_leaf(flat[p]) for p in selected if p not in factored)
    assert sum(flat[p].nbytes for p in selected) <= 0.7 * dense
    assert len({flat[p].rank for p in factored}) > 1  # ranks differ between linears
    with pytest.raises(ValueError, match="allocation 'global' spreads a parameter ratio"):
        plan(_recipe("svdllm", rank=4, allocation="global"), CONFIG, params)
