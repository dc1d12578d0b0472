"""Bring-your-own Flax models run typed weight leaves without being edited (jaxopt_llm.byo)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from jaxopt_llm.byo import (
    DispatchEmbed,
    DispatchLinear,
    linen_apply,
    nnx_params,
    nnx_transform,
    nnx_with_params,
)
from jaxopt_llm.weights import LowRankWeight, WeightLeaf

VOCAB, D = 11, 8


@struct.dataclass
class ScaledWeight(WeightLeaf):
    """Test-only representation: the weight is w * factor (factor static)."""

    w: jax.Array
    factor: float = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    def materialize(self) -> jax.Array:
        return self.w * self.factor

    def embed(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.w, ids, axis=0) * self.factor


@struct.dataclass
class FactoredTable(WeightLeaf):
    """Test-only embedding table u (V, k) @ v (k, d): its children's shapes differ from (V, d)."""

    u: jax.Array
    v: jax.Array

    def materialize(self) -> jax.Array:
        return self.u @ self.v

    def linear(self, x: jax.Array) -> jax.Array:
        return (x @ self.u) @ self.v

    def embed(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.u, ids, axis=0) @ self.v

    def attend(self, x: jax.Array) -> jax.Array:
        return (x @ self.v.T) @ self.u.T


def _materialize(tree):
    """Every typed leaf replaced by its dense array."""
    typed = (ScaledWeight, FactoredTable, LowRankWeight)
    return jax.tree.map(lambda n: n.materialize() if isinstance(n, typed) else n, tree,
                        is_leaf=lambda n: isinstance(n, typed))


def _ids() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (2, 5), 0, VOCAB)  # (B, T)


# --------------------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------------------


class LinenNet(nn.Module):
    """Embed -> DenseGeneral (features (2, 6)) -> Dense -> tied head (Embed.attend)."""

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:  # (B, T) -> (B, T, V)
        emb = nn.Embed(VOCAB, D, name="embed")
        x = emb(ids)  # (B, T, D)
        h = nn.DenseGeneral(features=(2, 6), name="heads")(x)  # (B, T, 2, 6)
        h = jnp.reshape(h, h.shape[:-2] + (12,))  # (B, T, 12)
        x = x + nn.Dense(D, name="out")(jax.nn.gelu(h))  # (B, T, D)
        return emb.attend(x)


@pytest.fixture(scope="module")
def linen_setup():
    model = LinenNet()
    params = model.init(jax.random.key(0), _ids())["params"]
    return model, params


def test_linen_plain_params_bit_identical(linen_setup):
    model, params = linen_setup
    ours = jax.jit(lambda p, ids: linen_apply(model, {"params": p}, ids))(params, _ids())
    ref = jax.jit(lambda p, ids: model.apply({"params": p}, ids))(params, _ids())
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_linen_typed_leaves_match_materialized(linen_setup):
    model, params = linen_setup
    typed = {
        "embed": {"embedding": ScaledWeight(params["embed"]["embedding"], 0.5)},
        # DenseGeneral's typed kernel is the 2-D view (d_in, prod(features)).
        "heads": {"kernel": ScaledWeight(jnp.reshape(params["heads"]["kernel"], (D, 12)), 0.5),
                  "bias": params["heads"]["bias"]},
        "out": {"kernel": ScaledWeight(params["out"]["kernel"], 2.0),
                "bias": params["out"]["bias"]},
    }
    dense = _materialize(typed)
    dense["heads"]["kernel"] = jnp.reshape(dense["heads"]["kernel"], (D, 2, 6))
    ours = jax.jit(lambda p, ids: linen_apply(model, {"params": p}, ids))(typed, _ids())
    ref = model.apply({"params": dense}, _ids())
    assert ours.shape == (2, 5, VOCAB) and ours.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_linen_lowrank_weights_and_factored_table(linen_setup):
    """Leaves whose children have other shapes than the kernel (Flax's param shape check)."""
    model, params = linen_setup
    keys = jax.random.split(jax.random.key(2), 6)
    rank = 3
    typed = {
        "embed": {"embedding": FactoredTable(jax.random.normal(keys[0], (VOCAB, rank)),
                                             jax.random.normal(keys[1], (rank, D)))},
        "heads": {"kernel": LowRankWeight(jax.random.normal(keys[2], (D, rank)),
                                          jax.random.normal(keys[3], (rank, 12))),
                  "bias": params["heads"]["bias"]},
        "out": {"kernel": LowRankWeight(jax.random.normal(keys[4], (12, rank)),
                                        jax.random.normal(keys[5], (rank, D))),
                "bias": params["out"]["bias"]},
    }
    dense = _materialize(typed)
    dense["heads"]["kernel"] = jnp.reshape(dense["heads"]["kernel"], (D, 2, 6))
    ours = jax.jit(lambda p, ids: linen_apply(model, {"params": p}, ids))(typed, _ids())
    ref = model.apply({"params": dense}, _ids())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-3)
    # Without the dispatch, Flax itself rejects the factored table in Embed.setup.
    with pytest.raises(Exception, match="shape"):
        model.apply({"params": typed}, _ids())


def test_linen_compute_dtype_is_respected():
    model = nn.Dense(4, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(3), (3, 6))  # float32 input
    params = model.init(jax.random.key(0), x)["params"]
    typed = {"kernel": ScaledWeight(params["kernel"], 0.5), "bias": params["bias"]}
    ours = linen_apply(model, {"params": typed}, x)
    ref = model.apply({"params": _materialize(typed)}, x)
    assert ours.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "layer, x_shape, kernel_shape",
    [
        (nn.DenseGeneral(features=4, axis=(-2, -1)), (3, 2, 5), (2, 5, 4)),
        (nn.DenseGeneral(features=4, batch_dims=(0,)), (3, 5), (3, 5, 4)),
    ],
    ids=["two-input-axes", "batch-dims"],
)
def test_linen_dense_general_unsupported_typed_kernel_raises(layer, x_shape, kernel_shape):
    x = jnp.ones(x_shape)
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["kernel"].shape == kernel_shape
    typed = {"kernel": ScaledWeight(params["kernel"], 0.5), "bias": params["bias"]}
    with pytest.raises(ValueError, match="axis=-1 without batch_dims"):
        linen_apply(layer, {"params": typed}, x)
    # Plain arrays still take Flax's own path for these configurations.
    np.testing.assert_array_equal(np.asarray(linen_apply(layer, {"params": params}, x)),
                                  np.asarray(layer.apply({"params": params}, x)))


def test_linen_dense_general_needs_2d_view():
    layer = nn.DenseGeneral(features=(2, 3))
    x = jnp.ones((4, 5))
    params = layer.init(jax.random.key(0), x)["params"]  # kernel (5, 2, 3)
    typed = {"kernel": ScaledWeight(params["kernel"], 0.5), "bias": params["bias"]}
    with pytest.raises(ValueError, match=r"2-D kernel \(5, 6\)"):
        linen_apply(layer, {"params": typed}, x)


# --------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------


class NnxNet(nnx.Module):
    """Embed -> Linear -> Linear (no bias) -> tied head (Embed.attend)."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(D, 12, rngs=rngs),
                                nnx.Linear(12, D, use_bias=False, rngs=rngs)])

    def __call__(self, ids: jax.Array) -> jax.Array:  # (B, T) -> (B, T, V)
        x = self.embed(ids)  # (B, T, D)
        h = jax.nn.gelu(self.layers[0](x))  # (B, T, 12)
        x = x + self.layers[1](h)
        return self.embed.attend(x)


def _scale_all(params):
    """A pass: every kernel and embedding becomes a ScaledWeight (biases stay arrays)."""
    def visit(tree):
        return {k: visit(v) if isinstance(v, dict)
                else ScaledWeight(v, 0.5) if k in ("kernel", "embedding") else v
                for k, v in tree.items()}
    return visit(params)


def test_nnx_params_paths():
    params = nnx_params(NnxNet(nnx.Rngs(0)))
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {"embed": {"embedding": (VOCAB, D)},
                      "layers": {0: {"kernel": (D, 12), "bias": (12,)}, 1: {"kernel": (12, D)}}}


def test_nnx_plain_params_bit_identical():
    model = NnxNet(nnx.Rngs(0))
    new = nnx_with_params(model, nnx_params(model))
    assert new is not model and isinstance(new.layers[0], nnx.Linear)
    np.testing.assert_array_equal(np.asarray(new(_ids())), np.asarray(model(_ids())))


def test_nnx_typed_leaves_match_materialized_and_leave_model_alone():
    model = NnxNet(nnx.Rngs(0))
    before = model(_ids())
    new = nnx_transform(model, _scale_all)
    assert isinstance(new.embed, DispatchEmbed)
    assert isinstance(new.layers[0], DispatchLinear) and isinstance(new.layers[1], DispatchLinear)
    assert new.layers[0].bias is not None and new.layers[1].bias is None
    ref = nnx_with_params(model, _materialize(_scale_all(nnx_params(model))))(_ids())

    ours = nnx.jit(lambda m, ids: m(ids))(new, _ids())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
    graphdef, state = nnx.split(new)
    ours = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, _ids())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)

    # The user's model is untouched.
    assert isinstance(model.embed, nnx.Embed) and isinstance(model.layers[0], nnx.Linear)
    np.testing.assert_array_equal(np.asarray(model(_ids())), np.asarray(before))
    # Round trip: the new model's params hold the typed leaves.
    assert isinstance(nnx_params(new)["layers"][0]["kernel"], ScaledWeight)


def test_nnx_lowrank_kernels():
    model = NnxNet(nnx.Rngs(0))
    params = nnx_params(model)
    keys = jax.random.split(jax.random.key(4), 4)
    params["layers"][0]["kernel"] = LowRankWeight(jax.random.normal(keys[0], (D, 2)),
                                                  jax.random.normal(keys[1], (2, 12)))
    params["layers"][1]["kernel"] = LowRankWeight(jax.random.normal(keys[2], (12, 2)),
                                                  jax.random.normal(keys[3], (2, D)))
    new = nnx_with_params(model, params)
    ref = nnx_with_params(model, _materialize(params))(_ids())
    ours = nnx.jit(lambda m, ids: m(ids))(new, _ids())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-3)


def test_nnx_shared_layer_is_replaced_everywhere():
    class Shared(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.a = nnx.Linear(D, D, rngs=rngs)
            self.b = self.a  # the same layer, referenced twice

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.b(self.a(x))

    model = Shared(nnx.Rngs(0))
    new = nnx_transform(model, _scale_all)
    assert isinstance(new.a, DispatchLinear) and new.b is new.a
    x = jax.random.normal(jax.random.key(5), (3, D))
    ref = nnx_with_params(model, _materialize(_scale_all(nnx_params(model))))(x)
    np.testing.assert_allclose(np.asarray(new(x)), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_nnx_errors():
    model = NnxNet(nnx.Rngs(0))
    params = nnx_params(model)
    params["layers"][0]["bias"] = ScaledWeight(params["layers"][0]["bias"], 0.5)
    with pytest.raises(ValueError, match="layers/0/bias"):
        nnx_with_params(model, params)
    params = nnx_params(model)
    del params["layers"][1]
    with pytest.raises(ValueError, match="missing"):
        nnx_with_params(model, params)


@pytest.mark.parametrize("recipe", ["w8", "w4", "w8a8"])
def test_linen_builtin_quantization_recipes_in_flax_layout(linen_setup, recipe):
    """Built-in recipes on a user's linen model; DenseGeneral's (d_in, 2, 6) kernel included."""
    from jaxopt_llm.recipes import BUILTIN_RECIPES
    from jaxopt_llm.weights import QuantizedWeight, materialize

    model, params = linen_setup
    _, quantized = BUILTIN_RECIPES[recipe](None, params)
    assert isinstance(quantized["heads"]["kernel"], QuantizedWeight)
    assert quantized["heads"]["kernel"].shape == (D, 2, 6)
    assert not isinstance(quantized["embed"]["embedding"], QuantizedWeight)  # tables: opt-in
    ours = jax.jit(lambda p, ids: linen_apply(model, {"params": p}, ids))(quantized, _ids())
    ref = model.apply({"params": materialize(quantized)}, _ids())
    tolerance = 0.05 if recipe == "w8a8" else 1e-5  # w8a8 also quantizes activations
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=tolerance,
                               atol=tolerance)
