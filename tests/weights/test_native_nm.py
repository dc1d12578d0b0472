"""The native N:M sparse GEMV (`native_nm`, csrc/nm_gemv.cc) against numpy: every
supported pattern, rows 1–8, both kernel forms, under jit, vmap and grad; what it declines
and the kernel's own refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.weights import QuantSpec, native, native_nm, quantize_weight
from jaxopt_llm.weights.sparse import NMSparseWeight, nm_sparse_weight


def require_native() -> None:
    """Skip only when the extension was genuinely not built; any other failure fails."""
    available, status = native.native_status()
    if not available and status.startswith("extension not built"):
        pytest.skip(status)
    assert available, status


def sparse_case(k: int, n: int, kept: int, m: int, seed: int = 0):
    """A random (k, n) kernel keeping `kept` random entries of every m rows, with the
    numpy dense kernel it stands for (w · keep)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(k, n)).astype(np.float32)
    order = rng.random((k // m, m, n)).argsort(axis=1)
    keep = (order < kept).reshape(k, n)
    return nm_sparse_weight(jnp.asarray(w), jnp.asarray(keep), kept, m), w * keep


def assert_product(got, x, dense):
    want = x.astype(np.float64) @ dense.astype(np.float64)
    slack = 1e-6 * (np.abs(x) @ np.abs(dense))  # float32 sums in another order
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - want), slack + 1e-6)


@pytest.mark.parametrize("kept,m", [(2, 4), (1, 2), (1, 4), (3, 4)])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("variant", ["scalar", "avx2"])
def test_matches_numpy_for_every_pattern(kept, m, rows, variant):
    require_native()
    if variant == "avx2" and native.native_status()[1].startswith("scalar"):
        pytest.skip("this CPU has no AVX2: only the portable kernel runs here")
    w, dense = sparse_case(96, 2100 if rows == 1 else 37, kept, m, seed=rows)  # 2100: 2 panels
    x = np.random.default_rng(5).normal(size=(rows, 96)).astype(np.float32)
    got = jax.jit(lambda a: native_nm.native_nm_matmul(a, w, variant=variant))(jnp.asarray(x))
    assert got.shape == (rows, dense.shape[1])
    assert_product(got, x, dense)


@pytest.mark.parametrize("tasks", [1, 3, 7])
def test_any_column_split_gives_the_same_product(tasks):
    require_native()
    w, dense = sparse_case(64, 333, 2, 4, seed=1)
    x = np.random.default_rng(2).normal(size=(2, 64)).astype(np.float32)
    got = native_nm.native_nm_matmul(jnp.asarray(x), w, tasks=tasks)
    assert_product(got, x, dense)


def test_linear_runs_the_kernel_at_decode_sizes_under_jit_vmap_and_grad(monkeypatch):
    require_native()
    w, dense = sparse_case(64, 40, 2, 4, seed=3)

    def jaxpr(rows):
        return str(jax.make_jaxpr(lambda a: w.linear(a))(jnp.ones((rows, 64), jnp.float32)))

    assert "jaxopt_llm_nm_gemv" in jaxpr(1) and "jaxopt_llm_nm_gemv" in jaxpr(8)
    assert "jaxopt_llm_nm_gemv" not in jaxpr(9)  # prefill: the expanded kernel
    x = np.random.default_rng(4).normal(size=(5, 2, 64)).astype(np.float32)
    got = jax.jit(jax.vmap(w.linear))(jnp.asarray(x))  # batch folded into the rows
    assert_product(got.reshape(10, 40), x.reshape(10, 64), dense)
    c = np.random.default_rng(6).normal(size=(2, 40)).astype(np.float32)
    def loss(a, values, product):
        return jnp.sum(product(a, w.replace(values=values)) * c)

    native_grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
        jnp.asarray(x[0]), w.values, lambda a, ww: ww.linear(a))
    pure_grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x[0]), w.values,
                                                lambda a, ww: a @ ww.materialize())
    np.testing.assert_allclose(np.asarray(native_grads[0]), c @ dense.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(native_grads[1]), np.asarray(pure_grads[1]),
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(native, "path_in_use", lambda: (False, "off"))
    assert "jaxopt_llm_nm_gemv" not in jaxpr(1)
    assert_product(jax.jit(w.linear)(jnp.asarray(x[0])), x[0], dense)


def test_declines_what_it_does_not_handle():
    require_native()
    w, _ = sparse_case(64, 8, 2, 4)
    x = jnp.ones((1, 64), jnp.float32)
    assert native_nm.native_nm_matmul(jnp.ones((9, 64)), w) is None  # prefill sizes
    assert native_nm.native_nm_matmul(x.astype(jnp.bfloat16), w) is None
    assert native_nm.native_nm_matmul(jnp.ones((1, 63)), w) is None  # K mismatch
    eight, _ = sparse_case(64, 8, 2, 8)  # 3-bit positions (bit planes)
    assert not native_nm.supports_nm(eight, 1) and native_nm.native_nm_matmul(x, eight) is None
    quantized = w.replace(values=quantize_weight(w.values, QuantSpec(bits=8)))
    assert not native_nm.supports_nm(quantized, 1)
    assert not native_nm.supports_nm(jnp.ones((64, 8)), 1)
    with pytest.raises(ValueError, match="variant must be one of auto, scalar, avx2"):
        native_nm.native_nm_matmul(x, w, variant="avx512")


def test_the_kernel_refuses_inconsistent_operands():
    require_native()
    w, _ = sparse_case(64, 8, 2, 4)
    bad = NMSparseWeight(values=w.values[:-4], index=w.index, kept=2, m=4, shape=(64, 8))
    with pytest.raises(Exception, match=r"jaxopt_llm_nm_gemv: values \(28, 8\) do not hold 2 of 4"):
        jax.block_until_ready(native_nm._call(jnp.ones((1, 64)), bad, "auto", 0))
    bad = w.replace(index=w.index[:, :4])
    with pytest.raises(Exception, match=r"positions \(8, 4\) do not match values \(32, 8\)"):
        jax.block_until_ready(native_nm._call(jnp.ones((1, 64)), bad, "auto", 0))


def test_masked_weight_multiplies_the_stored_kernel_with_a_masked_derivative(monkeypatch):
    """MaskedWeight.linear runs the dense product of its stored (zeroed) kernel, the native
    GEMV at decode sizes, and pruned entries get no gradient."""
    from jaxopt_llm.weights.sparse import masked_weight

    rng = np.random.default_rng(11)
    w = rng.normal(size=(64, 24)).astype(np.float32)
    keep = rng.random((64, 24)) < 0.5
    masked = masked_weight(jnp.asarray(w), jnp.asarray(keep))
    dense = w * keep
    for rows in (1, 8, 33):
        x = rng.normal(size=(rows, 64)).astype(np.float32)
        assert_product(jax.jit(masked.linear)(jnp.asarray(x)), x, dense)
    if native.path_in_use()[0]:
        text = str(jax.make_jaxpr(masked.linear)(jnp.ones((1, 64), jnp.float32)))
        assert "jaxopt_llm_weight_gemv" in text and "unpack" not in text
    x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(3, 24)), jnp.float32)
    grad = jax.grad(lambda values: jnp.sum(masked.replace(w=values).linear(x) * c))(masked.w)
    want = (np.asarray(x).T @ np.asarray(c)) * keep  # d/dw of Σ c·(x @ (w·keep))
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(grad)[~keep].any()
