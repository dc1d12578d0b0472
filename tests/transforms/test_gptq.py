"""GPTQ against a plain-loop numpy implementation, its error against round-to-nearest's on
correlated inputs, dead inputs, broken Hessians, and its options."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.transforms.gptq import GPTQOptions, gptq_leaf, gptq_quantize
from jaxopt_llm.weights import QuantizedWeight, QuantSpec, linear, quantize_weight


def numpy_grid(rows, bits, symmetric, zero_kind, scale_dtype):
    """RTN grid of one group (rows (g, N), float32 math as stored): (scale, zero) rows."""
    rows = rows.astype(np.float32)
    if symmetric:
        hi = np.abs(rows).max(axis=0)
        scale = hi / np.float32(2 ** (bits - 1) - 1)
    else:
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        if zero_kind == "integer":
            lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        scale = (hi - lo) / np.float32(2 ** bits - 1)
    scale = np.maximum(scale, np.finfo(scale_dtype).tiny).astype(scale_dtype)
    if symmetric:
        return scale, None
    if zero_kind == "float":
        return scale, lo.astype(scale_dtype)
    zero = np.clip(np.round(-lo / scale.astype(np.float32)), 0, 2 ** bits - 1)
    return scale, zero.astype(np.uint8)


def numpy_round(row, scale, zero, bits, symmetric, zero_kind):
    """Codes of one input's row and their dequantized values (float64)."""
    row = row.astype(np.float32)
    s = scale.astype(np.float32)
    if symmetric:
        codes = np.clip(np.round(row / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return codes, codes * s.astype(np.float64)
    if zero_kind == "float":
        m = zero.astype(np.float32)
        codes = np.clip(np.round((row - m) / s), 0, 2 ** bits - 1)
        return codes, codes * s.astype(np.float64) + m
    codes = np.clip(np.round(row / s) + zero, 0, 2 ** bits - 1)
    return codes, (codes - zero.astype(np.float64)) * s


def numpy_gptq(w, h, *, bits, symmetric, zero_kind, group_size, act_order, damp=0.01,
               scale_dtype=np.float32, static_groups=None):
    """GPTQ written out input by input in float64, no blocking: returns codes (K, N) in the
    original input order."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    k, n = w.shape
    grid = (bits, symmetric, zero_kind)
    if group_size is None:  # per channel: from the original weights
        channel_grid = numpy_grid(w, *grid, scale_dtype)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    if static_groups is None:
        static_groups = act_order
    if group_size is not None and static_groups:  # up front, from W with dead rows zeroed
        static = [numpy_grid(w[s:s + group_size], *grid, scale_dtype)
                  for s in range(0, k, group_size)]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[perm], h[perm][:, perm]
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H⁻¹ = UᵀU
    codes = np.zeros((k, n))
    current = None
    for i in range(k):
        original = perm[i]
        if group_size is None:
            current = channel_grid
        elif static_groups:
            current = static[original // group_size]
        elif i % group_size == 0:  # from the group's weights as updated so far
            current = numpy_grid(w[i:i + group_size], *grid, scale_dtype)
        q, deq = numpy_round(w[i], *current, *grid)
        codes[original] = q
        error = (w[i] - deq) / upper[i, i]
        w[i + 1:] -= np.outer(upper[i, i + 1:], error)
    return codes


def correlated_inputs(seed, tokens, k):
    """X = Z·A (a random mixing) with uneven input scales: GPTQ has errors to correct."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) * 0.4 + np.eye(k)
    x = rng.standard_normal((tokens, k)) @ mixing * rng.uniform(0.2, 3.0, size=k)
    return x.astype(np.float32)


def signed_codes(q):
    """Codes as the grid's integers (signed when symmetric, unsigned otherwise)."""
    return np.asarray(q.codes())


GRIDS = [(True, "integer"), (False, "integer"), (False, "float")]


# Every grid × grouping × order at 4 bits; 3 and 8 bits on two of the layouts each.
GPTQ_CASES = [
    *itertools.product((4,), GRIDS, (None, 8, 32), (False, True)),
    *[(bits, grid, group_size, act_order) for bits, grid, (group_size, act_order)
      in itertools.product((3, 8), GRIDS, ((None, False), (8, True)))],
]


@pytest.mark.parametrize("bits,grid,group_size,act_order", GPTQ_CASES)
def test_matches_numpy_gptq(bits, grid, group_size, act_order):
    symmetric, zero_kind = grid
    k, n = 64, 12
    rng = np.random.default_rng(bits * 10 + group_size_seed(group_size))
    w = (rng.standard_normal((k, n)) * rng.uniform(0.5, 2, size=n)).astype(np.float32)
    x = correlated_inputs(bits, 256, k)
    h = x.T @ x
    if group_size is None:
        spec = QuantSpec(bits=bits, symmetric=symmetric, zero=zero_kind)
    else:
        spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="group",
                         group_size=group_size, zero=zero_kind)
    # block_size 16: several blocks, groups of 8 inside one, groups of 32 over two.
    q = gptq_quantize(jnp.asarray(w), jnp.asarray(h), spec, block_size=16, act_order=act_order,
                      scale_dtype="float32")
    expected = numpy_gptq(w, h, bits=bits, symmetric=symmetric, zero_kind=zero_kind,
                          group_size=group_size, act_order=act_order)
    assert isinstance(q, QuantizedWeight) and q.spec == spec
    np.testing.assert_array_equal(signed_codes(q), expected)


def group_size_seed(group_size):
    return 0 if group_size is None else group_size


@pytest.mark.parametrize("zero_kind", ["integer", "float"])
def test_partial_last_group_and_block_size_invariance(zero_kind):
    k, n = 72, 10  # groups of 32: 32 + 32 + 8
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = correlated_inputs(2, 300, k)
    h = x.T @ x
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32,
                     partial_groups=True, zero=zero_kind)
    expected = numpy_gptq(w, h, bits=4, symmetric=False, zero_kind=zero_kind, group_size=32,
                          act_order=False)
    for block_size in (8, 32, 128):  # blocks of one group / groups over blocks / one block
        q = gptq_quantize(w, h, spec, block_size=block_size, scale_dtype="float32")
        assert q.scale.shape == (3, n)
        np.testing.assert_array_equal(signed_codes(q), expected, err_msg=f"block {block_size}")


def test_static_groups_without_act_order():
    k = 64
    x = correlated_inputs(21, 256, k)
    w = np.random.default_rng(22).standard_normal((k, 12)).astype(np.float32)
    spec = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16)
    q = gptq_quantize(w, x.T @ x, spec, static_groups=True, scale_dtype="float32")
    expected = numpy_gptq(w, x.T @ x, bits=3, symmetric=False, zero_kind="integer",
                          group_size=16, act_order=False, static_groups=True)
    np.testing.assert_array_equal(signed_codes(q), expected)


def test_layout_and_scales_match_round_to_nearest():
    """Same grid, same assembly: with H = I there is nothing to correct and GPTQ is RTN."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 20)).astype(np.float32)
    for spec in (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16),
                 QuantSpec(bits=3, symmetric=True),
                 QuantSpec(bits=8, symmetric=True, granularity="group", group_size=32),
                 QuantSpec(bits=5, symmetric=False, granularity="group", group_size=16,
                           zero="float"),
                 QuantSpec(bits=2, symmetric=False, granularity="tensor"),
                 QuantSpec(bits=6, symmetric=False, zero="float")):
        q = gptq_quantize(w, np.eye(64, dtype=np.float32), spec, dampening=1e-6)
        rtn = quantize_weight(w, spec)
        for field in ("qvalue", "scale", "zero_point"):
            a, b = getattr(q, field), getattr(rtn, field)
            if a is None:
                assert b is None
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, field
            if field == "scale":  # XLA may divide by a constant as a multiply: 1 ulp
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                           rtol=float(np.finfo(a.dtype).eps), atol=0)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)
        assert jax.tree_util.tree_structure(q) == jax.tree_util.tree_structure(rtn)


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4, symmetric=False),
    QuantSpec(bits=3, symmetric=True, granularity="group", group_size=16),
    QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16, zero="float"),
], ids=["w4-channel", "w3-sym-g16", "w4-float-g16"])
@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_below_round_to_nearest(spec, act_order):
    k, n = 128, 48
    x = correlated_inputs(5, 1024, k)
    w = np.random.default_rng(6).standard_normal((k, n)).astype(np.float32)
    q = gptq_quantize(w, x.T @ x / len(x), spec, act_order=act_order)  # mean: same result
    rtn = quantize_weight(w, spec)
    out = x @ w

    def error(leaf):
        return np.linalg.norm(out - x @ np.asarray(leaf.materialize(), np.float64))

    assert error(q) < 0.8 * error(rtn)
    # Running the leaf is running its dequantized weight.
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(jnp.asarray(x[:8]), q)),
                               x[:8] @ np.asarray(q.materialize()), rtol=1e-5, atol=1e-4)


def test_sum_or_mean_hessian_give_the_same_codes():
    k = 64
    x = correlated_inputs(7, 256, k)
    w = np.random.default_rng(8).standard_normal((k, 16)).astype(np.float32)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    a = gptq_quantize(w, x.T @ x, spec)
    b = gptq_quantize(w, (x.T @ x) / np.float32(256), spec)
    assert np.mean(signed_codes(a) == signed_codes(b)) > 0.99  # float rounding only


@pytest.mark.parametrize("zero_kind", ["integer", "float"])
def test_dead_inputs_give_zero_rows(zero_kind):
    k, n = 48, 8
    x = correlated_inputs(9, 200, k)
    dead = [0, 5, 6, 31, 47]
    x[:, dead] = 0.0  # never active in the calibration data
    w = np.random.default_rng(10).standard_normal((k, n)).astype(np.float32)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16,
                     zero=zero_kind)
    for act_order in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # dead inputs are expected: no warning
            q = gptq_quantize(w, x.T @ x, spec, act_order=act_order)
        deq = np.asarray(q.materialize())
        assert np.all(np.isfinite(deq))
        if zero_kind == "integer":  # 0 is on the grid
            np.testing.assert_array_equal(deq[dead], 0.0)
        else:  # a float offset's grid need not hold 0: the nearest point, within half a step
            step = np.asarray(q.scale, np.float32)[np.array(dead) // 16]
            assert np.all(np.abs(deq[dead]) <= step / 2 + 1e-6)
        expected = numpy_gptq(w, x.T @ x, bits=4, symmetric=False, zero_kind=zero_kind,
                              group_size=16, act_order=act_order, scale_dtype=np.float16)
        np.testing.assert_array_equal(signed_codes(q), expected)


@pytest.mark.parametrize("hessian", ["negative_identity", "huge_negative_rank_deficient"])
def test_broken_hessian_warns_and_stays_finite(hessian):
    k, n = 32, 8
    w = np.random.default_rng(11).standard_normal((k, n)).astype(np.float32)
    if hessian == "negative_identity":
        h = -np.eye(k, dtype=np.float32)
    else:
        x = correlated_inputs(12, 4, k)  # rank 4
        v = np.random.default_rng(13).standard_normal(k).astype(np.float32)
        h = x.T @ x - 1e6 * np.outer(v, v)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=8)
    with pytest.warns(RuntimeWarning, match=r"layers_3/mlp/up_proj/kernel: the Hessian is "
                                            r"not positive definite"):
        q = gptq_quantize(w, h, spec, name="layers_3/mlp/up_proj/kernel")
    assert np.all(np.isfinite(np.asarray(q.materialize())))
    codes = signed_codes(q)
    assert codes.min() >= 0 and codes.max() <= 15


def test_raised_dampening_is_reported_with_its_value():
    # Indefinite by a small margin: dampening 0.01 fails, 0.1 (×10) works.
    k = 16
    h = np.eye(k, dtype=np.float32)
    h[0, 0] = -0.05  # mean |diag| ≈ 0.94: +0.0094 is not enough, +0.094 is
    w = np.random.default_rng(14).standard_normal((k, 4)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match=r"q_proj: .*dampening 0\.01; used dampening 0\.1$"):
        q = gptq_quantize(w, h, QuantSpec(bits=4), name="q_proj")
    assert np.all(np.isfinite(np.asarray(q.materialize())))


def test_runs_under_jit_and_eval_shape():
    k = 32
    x = correlated_inputs(15, 128, k)
    w = np.random.default_rng(16).standard_normal((k, 3, 4)).astype(np.float32)  # (K, H, D)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=8)
    eager = gptq_quantize(w, x.T @ x, spec)
    jitted = jax.jit(lambda a, h: gptq_quantize(a, h, spec))(jnp.asarray(w), jnp.asarray(x.T @ x))
    shapes = jax.eval_shape(lambda a, h: gptq_quantize(a, h, spec), w, x.T @ x)
    assert eager.shape == (k, 3, 4) and shapes.qvalue.shape == eager.qvalue.shape
    np.testing.assert_array_equal(np.asarray(jitted.qvalue), np.asarray(eager.qvalue))
    np.testing.assert_array_equal(np.asarray(jitted.scale), np.asarray(eager.scale))


def test_embedding_table_along_its_rows():
    vocab, d = 40, 32
    x = correlated_inputs(17, 256, d)  # hidden states entering the tied head
    table = np.random.default_rng(18).standard_normal((vocab, d)).astype(np.float32)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    q = gptq_quantize(table, x.T @ x, spec, axis=1)
    kernel = gptq_quantize(table.T.copy(), x.T @ x, spec)
    assert q.axis == 1 and q.scale.shape == (vocab, 2)
    np.testing.assert_array_equal(np.asarray(q.materialize()), np.asarray(kernel.materialize()).T)


# ------------------------------------------------------------------ options and bad input


def test_options_spec_and_leaf():
    options = GPTQOptions(bits=4, symmetric=False, group_size=16, zero="float",
                          act_order=True, block_size=32)
    assert options.spec == QuantSpec(bits=4, symmetric=False, granularity="group",
                                     group_size=16, zero="float")
    x = correlated_inputs(19, 128, 32)
    w = np.random.default_rng(20).standard_normal((32, 8)).astype(np.float32)
    leaf = gptq_leaf(jnp.asarray(w), "layers_0/mlp/up_proj/kernel", options, x.T @ x)
    direct = gptq_quantize(w, x.T @ x, options.spec, act_order=True, block_size=32)
    np.testing.assert_array_equal(np.asarray(leaf.qvalue), np.asarray(direct.qvalue))
    assert leaf.zero_point.dtype == jnp.float16  # group default, as quantize_weight


@pytest.mark.parametrize("given,message", [
    ({"dampening": 0.0}, r"dampening must be in \(0\.0"),
    ({"dampening": -1.0}, r"dampening must be in"),
    ({"dampening": float("nan")}, r"dampening must be a finite number"),
    ({"block_size": 0}, r"block_size must be a positive integer"),
    ({"block_size": 12.5}, r"block_size must be a positive integer"),
    ({"block_size": True}, r"block_size must be a positive integer"),
    ({"act_order": "yes"}, r"act_order must be true or false"),
    ({"bits": 9}, r"bits must be an integer in 2\.\.8"),
    ({"zero": "float"}, r"zero='float'.*symmetric"),
    ({"symmetric": False, "zero": "half"}, r"zero must be one of"),
    ({"scale_dtype": "float64"}, r"scale_dtype must be one of"),
    ({"granularity": "group"}, r"group_size"),
])
def test_bad_options_name_the_option(given, message):
    with pytest.raises(ValueError, match=message):
        GPTQOptions(**given)


def test_bad_arguments_name_the_parameter():
    w = np.ones((24, 4), np.float32)
    h = np.eye(24, dtype=np.float32)
    spec16 = QuantSpec(bits=4, granularity="group", group_size=16)
    with pytest.raises(ValueError, match=r"up \(24, 4\): group_size=16 does not divide .* 24"):
        gptq_quantize(w, h, spec16, name="up")
    with pytest.raises(ValueError, match=r"hessian must be \(24, 24\)"):
        gptq_quantize(w, np.eye(23, dtype=np.float32), QuantSpec(bits=4))
    bad = h.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"hessian has NaN"):
        gptq_quantize(w, bad, QuantSpec(bits=4))
    with pytest.raises(ValueError, match=r"static_groups=False cannot be combined with "
                                         r"act_order"):
        gptq_quantize(w, h, QuantSpec(bits=4, granularity="group", group_size=8),
                      act_order=True, static_groups=False)
    with pytest.raises(ValueError, match=r"dampening must be in"):
        gptq_quantize(w, h, QuantSpec(bits=4), dampening=0.0)
    with pytest.raises(ValueError, match=r"block_size must be a positive integer"):
        gptq_quantize(w, h, QuantSpec(bits=4), block_size=-1)
    with pytest.raises(ValueError, match=r"axis must be 0"):
        gptq_quantize(w, h, QuantSpec(bits=4), axis=2)
    with pytest.raises(ValueError, match=r"gptq needs a float kernel"):
        gptq_leaf(jnp.ones(4), "norm/scale", GPTQOptions(bits=4), h)
