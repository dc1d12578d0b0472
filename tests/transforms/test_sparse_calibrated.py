"""Wanda and SparseGPT: masks and updates against plain numpy implementations, the exact
pattern after each, their output error against magnitude pruning's at the same sparsity,
the ops on a model (layer-sequential, checked before work), and bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import tree
from jaxopt_llm.calibration import Calibration, linear_statistics
from jaxopt_llm.models import ModelConfig, forward, init_params
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.plan import plan
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.transforms.sparsegpt import (
    SparseGPTOptions,
    SparseGPTQuantizeOptions,
    sparsegpt_leaf,
    sparsegpt_prune,
    sparsegpt_quantize_leaf,
)
from jaxopt_llm.transforms.wanda import SparsityOptions, wanda_leaf
from jaxopt_llm.weights import (
    MaskedWeight,
    NMSparseWeight,
    QuantizedWeight,
    QuantSpec,
    materialize,
    quantize_weight,
)


def _inputs(seed, tokens, k, outliers=True):
    """Correlated inputs with a few large channels, as LLM activations have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    if outliers:
        x[:, rng.choice(k, max(1, k // 16), replace=False)] *= 20.0
    return x.astype(np.float32)


def _weights(seed, k, n):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


# ---------------------------------------------------------------- numpy references


def numpy_wanda(w, x, sparsity=None, n=None, m=None):
    """Wanda's keep-mask written out: scores |W|·‖X_j‖, per output (column) or per group."""
    scores = np.abs(w.astype(np.float64)) * np.linalg.norm(x.astype(np.float64), axis=0)[:, None]
    keep = np.ones(w.shape, bool)
    k, cols = w.shape
    for col in range(cols):
        if m is None:
            drop = np.argsort(scores[:, col], kind="stable")[:round(sparsity * k)]
            keep[drop, col] = False
        else:
            for start in range(0, k, m):
                drop = np.argsort(scores[start:start + m, col], kind="stable")[:n]
                keep[start + drop, col] = False
    return keep


def numpy_sparsegpt(w, h, *, sparsity=None, n=None, m=None, block=128, damp=0.01):
    """SparseGPT as the authors' loop reads, in float64 and the (outputs, inputs) layout:
    H⁻¹ by an explicit inverse, then its upper Cholesky factor. Returns (W', keep) in the
    (K, N) layout."""
    wt = w.T.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    cols, k = wt.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = UᵀU
    pruned = np.zeros(wt.shape, bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hinv1 = wt[:, i1:i2].copy(), hinv[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        mask1 = np.zeros(w1.shape, bool)
        if m is None:
            scores = w1 ** 2 / np.diag(hinv1)[None, :] ** 2
            count = round(sparsity * (i2 - i1)) * cols
            order = np.argsort(scores.T.reshape(-1), kind="stable")[:count]  # input-major
            flat = np.zeros((i2 - i1) * cols, bool)
            flat[order] = True
            mask1 = flat.reshape(i2 - i1, cols).T
        for i in range(i2 - i1):
            if m is not None and i % m == 0:
                scores = w1[:, i:i + m] ** 2 / np.diag(hinv1)[i:i + m][None, :] ** 2
                for row in range(cols):
                    mask1[row, i + np.argsort(scores[row], kind="stable")[:n]] = True
            q = np.where(mask1[:, i], 0.0, w1[:, i])
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= np.outer(err, hinv1[i, i:])
            w1[:, i] = q
            err1[:, i] = err
        wt[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return wt.T, ~pruned.T


def numpy_sparsegpt_quantized(w, h, *, n, m, bits, group, block, damp=0.01):
    """SparseGPT's joint sweep (§3.5) with an asymmetric min-max integer grid per group of
    `group` inputs, computed when the sweep reaches the group; float64, (outputs, inputs).
    Returns (dequantized W' with the pruned 0, keep)."""
    wt = w.T.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    cols, k = wt.shape
    qmax = 2 ** bits - 1
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    pruned = np.zeros(wt.shape, bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hinv1 = wt[:, i1:i2].copy(), hinv[i1:i2, i1:i2]
        err1, mask1 = np.zeros_like(w1), np.zeros(w1.shape, bool)
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:
                rows = w1[:, i:i + group]
                lo, hi = np.minimum(rows.min(1), 0), np.maximum(rows.max(1), 0)
                scale = np.maximum((hi - lo) / qmax, np.finfo(np.float32).tiny)
                scale = scale.astype(np.float32).astype(np.float64)
                zero = np.clip(np.round(-lo / scale), 0, qmax)
            if i % m == 0:
                scores = w1[:, i:i + m] ** 2 / np.diag(hinv1)[i:i + m][None, :] ** 2
                for row in range(cols):
                    mask1[row, i + np.argsort(scores[row], kind="stable")[:n]] = True
            rounded = (np.clip(np.round(w1[:, i] / scale) + zero, 0, qmax) - zero) * scale
            q = np.where(mask1[:, i], 0.0, rounded)
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= np.outer(err, hinv1[i, i:])
            w1[:, i] = q
            err1[:, i] = err
        wt[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return wt.T, ~pruned.T


# ---------------------------------------------------------------- kernels

PATTERNS = [dict(sparsity=0.5), dict(sparsity=0.25), dict(n=2, m=4), dict(n=4, m=8)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_wanda_mask_equals_numpy(pattern):
    w, x = _weights(0, 64, 24), _inputs(1, 200, 64)
    gram = jnp.asarray(x.T.astype(np.float64) @ x, jnp.float32)
    options = SparsityOptions(**pattern, format="masked")
    leaf = wanda_leaf(jnp.asarray(w), "w", options, gram)
    keep = np.asarray(materialize(leaf)) != 0
    np.testing.assert_array_equal(keep, numpy_wanda(w, x, **pattern))
    np.testing.assert_array_equal(np.asarray(materialize(leaf)), np.where(keep, w, 0.0))


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("block", [16, 128])
def test_sparsegpt_equals_numpy(pattern, block):
    w, x = _weights(2, 48, 12), _inputs(3, 300, 48)
    h = x.T.astype(np.float64) @ x
    options = SparseGPTOptions(**pattern, block_size=block)
    got, keep, _, outcome = jax.jit(sparsegpt_prune, static_argnums=2)(
        jnp.asarray(w), jnp.asarray(h, jnp.float32), options)
    want, want_keep = numpy_sparsegpt(w, h, block=block, **pattern)
    assert int(outcome) == 0
    np.testing.assert_array_equal(np.asarray(keep), want_keep)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3)
    assert np.all(np.asarray(got)[~np.asarray(keep)] == 0.0)


def _pattern_holds(keep, pattern):
    k, cols = keep.shape
    if "m" in pattern:
        per_group = keep.reshape(k // pattern["m"], pattern["m"], cols).sum(axis=1)
        return np.all(per_group == pattern["m"] - pattern["n"])
    return keep.sum() == k * cols - round(pattern["sparsity"] * k) * cols


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_exact_pattern_and_less_output_error_than_magnitude(pattern):
    """Same sparsity, same pattern: ‖XW − XŴ‖ of Wanda and SparseGPT below magnitude's."""
    k, n = 128, 64
    w, x = _weights(4, k, n), _inputs(5, 512, k)
    gram = jnp.asarray(x.T.astype(np.float64) @ x, jnp.float32)
    held_out = _inputs(5, 512, k)[256:]  # same channel statistics, tokens reused is fine

    def error(w_hat):
        return np.linalg.norm(held_out @ w - held_out @ np.asarray(w_hat))

    magnitude = numpy_wanda(w, np.ones((1, k)), **pattern)  # unit norms: plain |W|
    assert _pattern_holds(magnitude, pattern)
    results = {}
    for name, leaf_fn, options in (
            ("wanda", wanda_leaf, SparsityOptions(**pattern, format="masked")),
            ("sparsegpt", sparsegpt_leaf, SparseGPTOptions(**pattern, format="masked"))):
        leaf = leaf_fn(jnp.asarray(w), "w", options, gram)
        assert isinstance(leaf, MaskedWeight)
        assert _pattern_holds(np.asarray(materialize(leaf)) != 0, pattern)
        results[name] = error(materialize(leaf))
    base = error(np.where(magnitude, w, 0.0))
    assert results["wanda"] < 0.9 * base, (results, base)
    assert results["sparsegpt"] < results["wanda"], (results, base)


JOINT = dict(n=2, m=4, bits=4, symmetric=False, group_size=16, scale_dtype="float32")


@pytest.mark.parametrize("block", [16, 32])
def test_joint_sparse_quantized_sweep_equals_numpy(block):
    """Pruning and rounding in one sweep equals the numpy transcription: same N:M
    positions, same dequantized weights (up to float32 vs float64 rounding ties)."""
    w, x = _weights(12, 64, 10), _inputs(13, 400, 64)
    h = x.T.astype(np.float64) @ x
    options = SparseGPTQuantizeOptions(**JOINT, block_size=block)
    leaf = sparsegpt_quantize_leaf(jnp.asarray(w), "w", options, jnp.asarray(h, jnp.float32))
    want, want_keep = numpy_sparsegpt_quantized(w, h, n=2, m=4, bits=4, group=16, block=block)
    assert isinstance(leaf, NMSparseWeight) and isinstance(leaf.values, QuantizedWeight)
    assert leaf.values.group_size == 8 and leaf.values.bits == 4  # 16 dense inputs, 8 kept
    got = np.asarray(leaf.materialize())
    keep = np.zeros(w.shape, bool)
    positions = np.asarray(leaf.positions()).reshape(16, 2, 10)
    for g in range(16):
        for j in range(2):
            keep[4 * g + positions[g, j], np.arange(10)] = True
    assert np.mean(keep == want_keep) > 0.98
    assert np.mean(np.isclose(got, want, rtol=1e-3, atol=1e-4)) > 0.97
    np.testing.assert_allclose(x @ got, x @ want, rtol=0.05, atol=0.05 * np.abs(x @ want).max())


def test_joint_sweep_beats_pruning_then_rounding():
    """Rounding inside the sweep lets later inputs absorb the rounding error too: the
    output error is below SparseGPT followed by round-to-nearest of the kept values, and
    the weight is smaller than the same grid without sparsity."""
    w, x = _weights(14, 128, 32), _inputs(15, 600, 128)
    gram = jnp.asarray(x.T @ x)
    spec = dict(bits=4, symmetric=False, group_size=32)
    joint = sparsegpt_quantize_leaf(jnp.asarray(w), "w",
                                    SparseGPTQuantizeOptions(n=2, m=4, **spec), gram)
    pruned = sparsegpt_leaf(jnp.asarray(w), "w", SparseGPTOptions(n=2, m=4), gram)
    grid = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    then_rounded = pruned.replace(values=quantize_weight(pruned.values, grid))

    def error(leaf):
        return float(np.linalg.norm(x @ w - x @ np.asarray(materialize(leaf))))

    assert error(joint) < 0.9 * error(then_rounded)
    dense_int4 = quantize_weight(jnp.asarray(w), QuantSpec(**spec, granularity="group"))
    # 2:4 int4: 64·32 codes of 4 bits + 2-bit positions + float16 scale and uint8 zero
    # per group of 16 stored codes
    assert joint.nbytes == 64 * 32 // 2 + 64 * 32 * 2 // 8 + 4 * 32 * 3
    assert joint.nbytes < 0.8 * dense_int4.nbytes


def test_nm_compressed_storage_and_dense_format():
    w, x = _weights(6, 32, 8), _inputs(7, 64, 32)
    gram = jnp.asarray(x.T @ x)
    compressed = sparsegpt_leaf(jnp.asarray(w), "w", SparseGPTOptions(n=2, m=4), gram)
    dense = sparsegpt_leaf(jnp.asarray(w), "w", SparseGPTOptions(n=2, m=4, format="dense"), gram)
    assert isinstance(compressed, NMSparseWeight) and isinstance(dense, jax.Array)
    np.testing.assert_array_equal(np.asarray(compressed.materialize()), np.asarray(dense))
    assert compressed.nbytes < w.nbytes * 0.7


def test_rank_deficient_statistics_stay_finite():
    """Fewer tokens than inputs and a dead channel: a singular H is dampened; outputs finite."""
    w = _weights(8, 64, 16)
    x = _inputs(9, 8, 64, outliers=False)
    x[:, 3] = 0.0
    gram = jnp.asarray(x.T @ x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dampening 0.01 suffices: no warning expected
        out = sparsegpt_leaf(jnp.asarray(w), "w", SparseGPTOptions(sparsity=0.5), gram)
    dense = np.asarray(materialize(out))
    assert np.all(np.isfinite(dense)) and dense[3].tolist() == [0.0] * 16
    broken = jnp.asarray(-np.eye(64, dtype=np.float32))  # not positive definite at all
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        out = sparsegpt_leaf(jnp.asarray(w), "w", SparseGPTOptions(sparsity=0.5), broken)
    assert np.all(np.isfinite(np.asarray(materialize(out))))


# ---------------------------------------------------------------- ops on a model

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, max_position_embeddings=64)
WINDOWS = np.random.default_rng(0).integers(0, 64, (8, 32)).astype(np.int32)


def _recipe(op, **options):
    return Recipe(name=op, stages=(Stage(name="p", rules=(rule(BLOCK_LINEARS, op, **options),)),))


@pytest.fixture(scope="module")
def params():
    """Random weights whose norms have a spread of channel gains (log-normal), so inputs
    have the uneven channel magnitudes real LLM activations have."""
    flat = tree.flatten(init_params(CONFIG, jax.random.key(0)))
    rng = np.random.default_rng(3)
    for path, value in flat.items():
        if "norm" in path:
            gains = np.exp(1.5 * rng.standard_normal(value.shape)).astype(np.float32)
            flat[path] = value * gains
    return tree.unflatten(flat)


@pytest.mark.parametrize("op,leaf_fn", [("wanda", wanda_leaf), ("sparsegpt", sparsegpt_leaf)])
def test_first_block_uses_the_float_models_statistics(params, op, leaf_fn):
    options = dict(sparsity=0.5)
    model = _recipe(op, **options)(CONFIG, params, calibration=Calibration(windows=WINDOWS))[1]
    stats = linear_statistics(CONFIG, params, Calibration(windows=WINDOWS))
    klass = SparsityOptions if op == "wanda" else SparseGPTOptions
    for name in ("attn/q_proj", "mlp/down_proj"):
        path = f"layers_0/{name}/kernel"
        want = leaf_fn(tree.flatten(params)[path], path, klass(**options),
                       stats[f"layers_0/{name}"].gram)
        got = tree.flatten(model)[path]
        np.testing.assert_array_equal(np.asarray(materialize(got)),
                                      np.asarray(materialize(want)))


@pytest.mark.parametrize("recipe", ["wanda-50", "wanda-2:4", "sparsegpt-50", "sparsegpt-2:4",
                                    "sparsegpt-2:4+w4g128-gptq"])
def test_recipes_beat_magnitude_on_the_model(params, recipe):
    magnitude = load_recipe("nm-2:4" if "2:4" in recipe else "magnitude-50")(CONFIG, params)[1]
    pruned = load_recipe(recipe)(CONFIG, params, calibration=Calibration(windows=WINDOWS))[1]
    held_out = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 32)), jnp.int32)
    want = forward(CONFIG, params, held_out)[0]

    def error(p):
        return float(jnp.mean((forward(CONFIG, p, held_out)[0] - want) ** 2))

    assert error(pruned) < error(magnitude)
    planned = plan(load_recipe(recipe), CONFIG, params)
    kinds = {row.representation for row in planned.rows if "layers_" in row.path
             and row.path.endswith("kernel")}
    want = "NMSparseWeight" if "2:4" in recipe else "MaskedWeight"
    assert kinds == {f"{want}(QuantizedWeight)" if "w4" in recipe else want}


@pytest.mark.parametrize("op,options,message", [
    ("wanda", {}, "give either sparsity"),
    ("wanda", {"sparsity": 0.5, "n": 2, "m": 4}, "give either sparsity"),
    ("wanda", {"sparsity": 1.0}, r"sparsity must be a number in \(0, 1\), got 1.0"),
    ("wanda", {"sparsity": 0.0}, r"sparsity must be a number in \(0, 1\), got 0.0"),
    ("sparsegpt", {"n": 4, "m": 4}, "n:m needs 0 < n < m"),
    ("sparsegpt", {"n": 2, "m": 4, "block_size": 6}, "block_size 6 must be a multiple of m=4"),
    ("sparsegpt", {"sparsity": 0.5, "format": "compressed"}, "needs an N:M pattern"),
    ("sparsegpt", {"sparsity": 0.5, "dampening": -1.0}, "dampening"),
    ("wanda", {"n": 2, "m": 48}, r"m=48 does not divide the input dimension 64"),
    ("wanda", {"sparsity": 0.001}, "removes nothing or everything"),
    ("sparsegpt_quantize", {"sparsity": 0.5, "bits": 4}, "needs an N:M pattern"),
    ("sparsegpt_quantize", {"n": 2, "m": 4, "bits": 4, "format": "masked"},
     "format must be 'compressed'"),
    ("sparsegpt_quantize", {"n": 2, "m": 4, "bits": 4, "group_size": 6},
     "group_size 6 must be a multiple of m=4"),
    ("sparsegpt_quantize", {"n": 2, "m": 4, "bits": 9}, "bits must be an integer in 2..8"),
    ("sparsegpt_quantize", {"n": 2, "m": 4, "bits": 4, "granularity": "tensor"},
     "channel or group grids"),
    ("sparsegpt_quantize", {"n": 2, "m": 4, "bits": 4, "group_size": 48},
     "group_size=48 does not divide the input dimension 64"),
])
def test_bad_options_fail_before_any_work(params, op, options, message):
    with pytest.raises(ValueError, match=message):
        plan(_recipe(op, **options), CONFIG, params)


def test_calibrated_pruning_needs_float_kernels(params):
    quantized = load_recipe("w8")(CONFIG, params)[1]
    with pytest.raises(ValueError, match="is already a QuantizedWeight: wanda starts from the "
                                         "float weights"):
        load_recipe("wanda-50")(CONFIG, quantized, calibration=Calibration(windows=WINDOWS))
