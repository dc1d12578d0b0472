"""FakeQuantWeight (STE), sparse and low-rank leaves against numpy references, under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.weights import (
    FakeQuantWeight,
    LowRankWeight,
    QuantSpec,
    embed,
    linear,
    masked_weight,
    materialize,
    nm_sparse_weight,
    param_bytes,
    quantize_weight,
)


@pytest.mark.parametrize("symmetric,method", [(True, "absmax"), (False, "minmax")])
@pytest.mark.parametrize("granularity,group_size", [("channel", None), ("group", 16)])
def test_fake_quant_forward_equals_real_quantization(symmetric, method, granularity, group_size):
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=granularity, group_size=group_size)
    real = quantize_weight(w, spec, method=method, scale_dtype="float32").materialize()
    fake = FakeQuantWeight(w=jnp.asarray(w), bits=4, symmetric=symmetric,
                           granularity=granularity, group_size=group_size, method=method)
    np.testing.assert_allclose(np.asarray(jax.jit(materialize)(fake)), np.asarray(real),
                               rtol=1e-6, atol=1e-7)


def test_ste_gradient_is_identity_inside_range():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32))
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((32, 4)).astype(np.float32))

    def loss(weight, ste):
        return jnp.sum(FakeQuantWeight(w=weight, bits=3, ste=ste).materialize() * cotangent)

    grad = jax.jit(jax.grad(loss), static_argnums=1)(w, "identity")
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(cotangent))
    # Clipped STE with the full absmax range: every weight is representable.
    grad_clipped = jax.jit(jax.grad(loss), static_argnums=1)(w, "clipped")
    np.testing.assert_array_equal(np.asarray(grad_clipped), np.asarray(cotangent))
    # Through a matmul the gradient w.r.t. the master weight is x^T g, as for a float weight.
    x = jnp.ones((5, 32), jnp.float32)
    g = jax.grad(lambda weight: jnp.sum(linear(x, FakeQuantWeight(w=weight, bits=4))))(w)
    np.testing.assert_allclose(np.asarray(g), np.full((32, 4), 5.0), rtol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipped_ste_zeroes_gradient_outside_range(symmetric):
    w = np.random.default_rng(6).standard_normal((64, 3)).astype(np.float32)
    leaf = FakeQuantWeight(w=jnp.asarray(w), bits=4, symmetric=symmetric, method=(
        "absmax" if symmetric else "minmax"), ste="clipped", clip_ratio=0.5)
    grad = jax.jit(jax.grad(lambda weight: jnp.sum(leaf.replace(w=weight).materialize())))(
        jnp.asarray(w))
    if symmetric:  # codes -8..7 at scale 0.5·max|w|/7, plus half a step of rounding
        scale = np.float32(0.5) * np.abs(w).max(0) / np.float32(7)
        inside = (w >= scale * -8.5) & (w <= scale * 7.5)
    else:
        lo, hi = np.minimum(w.min(0), 0) * np.float32(0.5), np.maximum(w.max(0), 0) * 0.5
        scale = (hi - lo) / np.float32(15)
        inside = (w >= lo - scale / 2) & (w <= hi + scale / 2)
    assert 0 < (~inside).sum() < inside.sum()  # some weights really are clipped
    np.testing.assert_array_equal(np.asarray(grad), inside.astype(np.float32))


def test_bad_fake_quant_options():
    with pytest.raises(ValueError, match="ste must be one of"):
        FakeQuantWeight(w=jnp.ones((8, 2)), bits=4, ste="sometimes")
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        FakeQuantWeight(w=jnp.ones((8, 2)), bits=12)


def test_masked_weight_exact_zeros_and_bytes():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((20, 6)).astype(np.float32)
    keep = rng.random((20, 6)) > 0.5
    leaf = masked_weight(jnp.asarray(w), jnp.asarray(keep))
    np.testing.assert_array_equal(np.asarray(jax.jit(materialize)(leaf)), np.where(keep, w, 0))
    x = rng.standard_normal((3, 20)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(x, leaf)), x @ np.where(keep, w, 0),
                               rtol=1e-5, atol=1e-6)
    assert param_bytes(leaf) == 20 * 6 * 4 + 3 * 6  # 1 bit per entry, 20 rows -> 3 bytes


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_sparse_weight_roundtrip(n, m):
    rng = np.random.default_rng(n * 10 + m)
    w = rng.standard_normal((4 * m, 5)).astype(np.float32)
    keep = np.zeros_like(w, bool)
    for g in range(4):
        for c in range(5):
            keep[g * m + rng.choice(m, n, replace=False), c] = True
    leaf = jax.jit(nm_sparse_weight, static_argnums=(2, 3))(w, keep, n, m)
    np.testing.assert_array_equal(np.asarray(materialize(leaf)), np.where(keep, w, 0))
    index_bits = max(1, int(np.ceil(np.log2(m))))
    kept = 4 * n  # kept values per column
    index_bytes = -(-kept // 8) * index_bits if 8 % index_bits else -(-kept * index_bits // 8)
    assert leaf.values.shape == (kept, 5)
    assert param_bytes(leaf) == kept * 5 * 4 + index_bytes * 5


def test_low_rank_weight_linear_and_nested_quantized_factors():
    rng = np.random.default_rng(4)
    u = rng.standard_normal((16, 3)).astype(np.float32)
    v = rng.standard_normal((3, 10)).astype(np.float32)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    leaf = LowRankWeight(u=jnp.asarray(u), v=jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(x, leaf)), x @ u @ v, rtol=1e-5)
    assert param_bytes(leaf) == (16 * 3 + 3 * 10) * 4
    qu = quantize_weight(u, QuantSpec(bits=8))
    qv = quantize_weight(v, QuantSpec(bits=8))
    nested = LowRankWeight(u=qu, v=qv)
    ref = x @ np.asarray(qu.materialize()) @ np.asarray(qv.materialize())
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(x, nested)), ref, rtol=1e-5)
    assert param_bytes(nested) == param_bytes(qu) + param_bytes(qv)


def test_fake_quant_embedding_lookup():
    table = jnp.asarray(np.random.default_rng(5).standard_normal((10, 8)).astype(np.float32))
    leaf = FakeQuantWeight(w=table, bits=4, axis=1)
    ids = jnp.asarray([[1, 9]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(embed(leaf, ids)),
                                  np.asarray(leaf.materialize())[np.asarray(ids)])
