"""Learned step sizes (LSQ, Esser et al. 2020): forward, gradients against numpy, conversion."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.train import TrainOptions, convert, convert_leaf
from jaxopt_llm.tree import flatten
from jaxopt_llm.weights import FakeQuantWeight, QuantizedWeight
from tests.test_train import CONFIG, _batches, _params, _recipe, _train

SPECS = [dict(bits=4), dict(bits=3, symmetric=False),
         dict(bits=4, granularity="group", group_size=4),
         dict(bits=4, symmetric=False, granularity="group", group_size=8)]


def _numpy_lsq(w, scale, zero, bits, symmetric, group):
    """Reference forward and LSQ gradients for L = Σ c·ŵ, w (K, N), groups along K."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    k, n = w.shape
    wg = w.reshape(k // group, group, n).astype(np.float64)
    s = scale.astype(np.float64)
    z = 0.0 if zero is None else zero.astype(np.float64)
    x = wg / s + z
    q = np.clip(np.round(x), qmin, qmax)
    out = ((q - z) * s).reshape(k, n)
    inside = (x >= qmin) & (x <= qmax)
    # d ŵ / d s: (round(x) − x) inside; (q − z) where clipped; times LSQ's gradient scale
    ds = np.where(inside, np.round(x) - x, q - z) / math.sqrt(group * qmax)
    return out, inside.reshape(k, n), ds


@pytest.mark.parametrize("spec", SPECS)
def test_forward_and_gradients_match_numpy(spec):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 6)).astype(np.float32)
    c = rng.standard_normal((16, 6)).astype(np.float32)
    fake = FakeQuantWeight(w=jnp.asarray(w), **spec).with_learned_scale()
    # move the step sizes off their initial values so some weights fall outside the grid
    fake = fake.replace(scale=fake.scale * jnp.asarray(
        rng.uniform(0.6, 1.1, fake.scale.shape), jnp.float32))
    group = spec.get("group_size", 16)
    expected, inside, ds = _numpy_lsq(w, np.asarray(fake.scale),
                                      None if fake.zero is None else np.asarray(fake.zero),
                                      spec["bits"], spec.get("symmetric", True), group)
    assert (~inside).any()  # the clipped branch is exercised
    np.testing.assert_allclose(np.asarray(jax.jit(lambda f: f.materialize())(fake)), expected,
                               rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(lambda f: jnp.sum(f.materialize() * c), allow_int=True))(fake)
    np.testing.assert_allclose(np.asarray(grads.w), c * inside, rtol=1e-6)
    cg = c.reshape(16 // group, group, 6)
    np.testing.assert_allclose(np.asarray(grads.scale), np.sum(cg * ds, axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
def test_initial_step_sizes_reproduce_the_range_based_grid(spec):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 6)), jnp.float32)
    plain = FakeQuantWeight(w=w, **spec)
    np.testing.assert_allclose(np.asarray(plain.with_learned_scale().materialize()),
                               np.asarray(plain.materialize()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
def test_converted_leaf_uses_the_learned_grid(spec):
    rng = np.random.default_rng(2)
    fake = FakeQuantWeight(w=jnp.asarray(rng.standard_normal((16, 6)), jnp.float32),
                           **spec).with_learned_scale()
    fake = fake.replace(scale=fake.scale * 0.8)
    real = convert_leaf(fake)
    assert isinstance(real, QuantizedWeight) and real.bits == spec["bits"]
    np.testing.assert_allclose(np.asarray(real.materialize()), np.asarray(fake.materialize()),
                               rtol=1e-6, atol=1e-6)


def test_training_moves_the_step_sizes_and_conversion_is_exact(count_compiles):
    _, fake = _recipe("fake_quant", bits=3, learn_scale=True)(CONFIG, _params())
    leaf = fake["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert leaf.learned and leaf.scale.dtype == jnp.float32
    with count_compiles() as compiles:
        trainer, state, frozen, history = _train(
            fake, TrainOptions(steps=30, learning_rate=3e-3), _batches(30))
    assert history[-1] < history[0]
    assert compiles["step"] == 1
    trained = trainer.params(state, frozen)
    moved = trained["layers_0"]["mlp"]["up_proj"]["kernel"].scale
    assert not np.allclose(np.asarray(moved), np.asarray(leaf.scale))
    real = convert(trained)
    for path, value in flatten(real).items():
        if path.endswith("kernel") and not path.startswith("lm_head"):
            assert isinstance(value, QuantizedWeight), path
            np.testing.assert_allclose(np.asarray(value.materialize()),
                                       np.asarray(flatten(trained)[path].materialize()),
                                       rtol=1e-6, atol=1e-6)


def test_learn_scale_must_be_a_boolean():
    with pytest.raises(ValueError, match="learn_scale must be true or false"):
        _recipe("fake_quant", bits=4, learn_scale="yes")(CONFIG, _params())


def test_gradients_off_the_straight_through_path_match_finite_differences():
    """Where the forward is smooth or flat, the autodiff gradient is the true derivative:
    norm scales of a fake-quantized model (central differences), and clipped weights under
    the clipped STE (moving one does not change the output: derivative 0)."""
    from jaxopt_llm.train import lm_loss
    from tests.test_qat import _logits

    _, fake = _recipe("fake_quant", bits=4, ste="clipped", clip_ratio=0.7)(CONFIG, _params())
    tokens = jnp.asarray(_batches(1, batch=2)[0], jnp.int32)

    def loss(params):
        return lm_loss(jnp.asarray(_logits(CONFIG, params, tokens)), tokens)

    def loss_traced(params):
        from jaxopt_llm.models import build_model
        from jaxopt_llm.models.attention import attention_mask

        length = tokens.shape[1]
        logits = build_model(CONFIG).apply(
            {"params": params}, tokens, jnp.broadcast_to(jnp.arange(length), tokens.shape),
            attention_mask(jnp.ones(tokens.shape, bool), 0, length))[0]
        return lm_loss(logits, tokens)

    grads = jax.jit(jax.grad(loss_traced, allow_int=True))(fake)
    eps = 1e-2
    for index in (0, 5, 17):
        def shifted(delta, index=index):
            scale = fake["norm"]["scale"].at[index].add(delta)
            return loss({**fake, "norm": {"scale": scale}})
        numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
        np.testing.assert_allclose(float(grads["norm"]["scale"][index]), numeric,
                                   rtol=2e-2, atol=1e-4)
    leaf = fake["layers_0"]["mlp"]["up_proj"]["kernel"]
    w = np.asarray(leaf.w)
    step = 0.7 * np.abs(w).max(0) / 7  # codes −8..7 at the clipped scale, ± half a step
    outside = np.argwhere(((w > 7.5 * step) | (w < -8.5 * step)) & (np.abs(w) < np.abs(w).max(0)))
    assert len(outside)
    row, col = outside[0]
    bumped = {**fake, "layers_0": {**fake["layers_0"], "mlp": {
        **fake["layers_0"]["mlp"], "up_proj": {"kernel": leaf.replace(
            w=leaf.w.at[row, col].add(np.sign(w[row, col]) * 1e-3))}}}}
    assert loss(bumped) == loss(fake)  # flat: the true derivative is 0
    assert float(grads["layers_0"]["mlp"]["up_proj"]["kernel"].w[row, col]) == 0.0
