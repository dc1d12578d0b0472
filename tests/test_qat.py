"""QAT conversion, the gradual pruning schedule, LoRA on frozen compressed weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.rules import BLOCK_LINEARS
from jaxopt_llm.train import (
    TrainOptions,
    convert,
    make_trainer,
    polynomial_sparsity,
    reprune,
    split,
    trainable_mask,
)
from jaxopt_llm.tree import flatten
from jaxopt_llm.weights import (
    LoRAWeight,
    MaskedWeight,
    QuantizedWeight,
    add_lora,
    materialize,
    merge_lora,
)
from tests.test_train import CONFIG, _batches, _params, _recipe, _train


def _logits(config, params, tokens):
    from jaxopt_llm.models import build_model
    from jaxopt_llm.models.attention import attention_mask

    length = tokens.shape[1]
    mask = attention_mask(jnp.ones(tokens.shape, bool), 0, length)
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    return np.asarray(jax.jit(build_model(config).apply)({"params": params}, tokens,
                                                          positions, mask)[0])


@pytest.mark.parametrize("options", [dict(bits=4), dict(bits=4, symmetric=False),
                                     dict(bits=3, group_size=16),
                                     dict(bits=4, clip_ratio=0.8, ste="clipped")])
def test_converted_model_computes_what_the_fake_quant_model_computed(options):
    _, fake = _recipe("fake_quant", **options)(CONFIG, _params())
    trainer, state, frozen, _ = _train(fake, TrainOptions(steps=5, learning_rate=1e-2),
                                       _batches(5))
    trained = trainer.params(state, frozen)
    real = convert(trained)
    kernels = [leaf for path, leaf in flatten(real).items() if path.endswith("kernel")]
    assert kernels and all(isinstance(k, QuantizedWeight) for k in kernels)
    tokens = jnp.asarray(_batches(1, batch=2, length=16)[0], jnp.int32)  # < 128 rows: f32 path
    np.testing.assert_allclose(_logits(CONFIG, real, tokens), _logits(CONFIG, trained, tokens),
                               rtol=1e-5, atol=1e-5)


def test_polynomial_schedule_hand_computed():
    assert polynomial_sparsity(0, 0.5, 10, 110) == 0.0
    assert polynomial_sparsity(10, 0.5, 10, 110) == 0.0
    assert polynomial_sparsity(60, 0.5, 10, 110) == pytest.approx(0.5 * (1 - 0.5**3))
    assert polynomial_sparsity(110, 0.5, 10, 110) == 0.5
    assert polynomial_sparsity(500, 0.5, 10, 110) == 0.5
    with pytest.raises(ValueError, match=r"final sparsity must be in \[0, 1\)"):
        polynomial_sparsity(1, 1.0, 0, 10)
    with pytest.raises(ValueError, match="need 0 <= start < end"):
        polynomial_sparsity(1, 0.5, 10, 10)


def test_gradual_pruning_keeps_pruned_weights_exactly_zero(count_compiles):
    _, params = _recipe("prune", sparsity=0.0)(CONFIG, _params())  # masks, nothing pruned yet
    paths = [p for p in flatten(params) if isinstance(flatten(params)[p], MaskedWeight)]
    options = TrainOptions(steps=40, learning_rate=1e-2)
    trainer, frozen = make_trainer(CONFIG, params, options)
    state = trainer.init(params)
    mask = trainable_mask(params, options.trainable)
    with count_compiles() as compiles:
        for step, tokens in enumerate(_batches(40)):
            if step % 10 == 0:  # recompute masks on the schedule, keep the optimizer state
                target = polynomial_sparsity(step, 0.5, 0, 30)
                current = reprune(trainer.params(state, frozen), paths, target)
                trainable, frozen = split(current, mask)
                state = state._replace(trainable=trainable)
            state, _ = trainer.step(state, frozen, jnp.asarray(tokens, jnp.int32))
    final = flatten(trainer.params(state, frozen))
    for path in paths:
        w, keep = np.asarray(final[path].w), np.asarray(final[path].dense_mask())
        assert (~keep).sum() == round(polynomial_sparsity(30, 0.5, 0, 30) * keep.size)
        assert np.all(w[~keep] == 0.0)  # after 10 more Adam steps with live momentum
    assert compiles["step"] == 1


def test_lora_on_a_quantized_base_trains_only_the_adapter():
    _, quantized = _recipe("quantize", bits=4, symmetric=False)(CONFIG, _params())
    params = add_lora(quantized, BLOCK_LINEARS, rank=2, alpha=4.0)
    leaf = params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(leaf, LoRAWeight) and leaf.scale == 2.0
    tokens = jnp.asarray(_batches(1, batch=2)[0], jnp.int32)
    # b starts at zero: the wrapped model computes what the quantized model computed
    np.testing.assert_allclose(_logits(CONFIG, params, tokens),
                               _logits(CONFIG, quantized, tokens), rtol=1e-6, atol=1e-6)
    options = TrainOptions(steps=30, learning_rate=1e-2, trainable=r".*/kernel/(a|b)")
    trainer, state, frozen, history = _train(params, options, _batches(30))
    assert history[-1] < history[0]
    trained = trainer.params(state, frozen)
    base = trained["layers_0"]["mlp"]["up_proj"]["kernel"].base
    np.testing.assert_array_equal(np.asarray(base.qvalue),
                                  np.asarray(quantized["layers_0"]["mlp"]["up_proj"]["kernel"]
                                             .qvalue))
    merged = merge_lora(trained)
    assert isinstance(merged["layers_0"]["mlp"]["up_proj"]["kernel"], QuantizedWeight)
    # the separate form equals its own dense materialization
    np.testing.assert_allclose(_logits(CONFIG, trained, tokens),
                               _logits(CONFIG, materialize(trained), tokens), rtol=1e-5,
                               atol=1e-5)


def test_lora_merge_into_float_weights_is_exact():
    params = add_lora(_params(), BLOCK_LINEARS, rank=2)
    params = jax.tree_util.tree_map(lambda x: x + 0.01, params)  # make b non-zero
    merged = merge_lora(params)
    tokens = jnp.asarray(_batches(1, batch=2)[0], jnp.int32)
    np.testing.assert_allclose(_logits(CONFIG, merged, tokens), _logits(CONFIG, params, tokens),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"),
                         [(dict(match=BLOCK_LINEARS, rank=0), "rank must be a positive integer"),
                          (dict(match="nothing", rank=2), "selects no parameter"),
                          (dict(match=BLOCK_LINEARS, rank=32), "must be below")])
def test_bad_lora_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_lora(_params(), **kwargs)


def _loss(config, params, batches):
    from jaxopt_llm.train import lm_loss

    return float(np.mean([lm_loss(jnp.asarray(_logits(config, params, jnp.asarray(t))),
                                  jnp.asarray(t)) for t in batches]))


def test_qat_closes_most_of_the_ptq_gap():
    """Float model → RTN int2 per channel (PTQ) loses; QAT from the float weights, converted
    to integers, wins most of it back, on held-out batches of the synthetic language."""
    trainer, state, frozen, _ = _train(_params(), TrainOptions(steps=200, learning_rate=3e-3),
                                       _batches(200, seed=2))
    float_params = trainer.params(state, frozen)
    held_out = _batches(4, seed=99)
    _, ptq = _recipe("quantize", bits=2)(CONFIG, float_params)
    _, fake = _recipe("fake_quant", bits=2)(CONFIG, float_params)
    trainer, state, frozen, _ = _train(fake, TrainOptions(steps=100, learning_rate=1e-3),
                                       _batches(100, seed=3))
    qat = convert(trainer.params(state, frozen))
    base, before, after = (_loss(CONFIG, p, held_out) for p in (float_params, ptq, qat))
    assert before > base + 0.05, (base, before)  # PTQ really hurts
    assert after - base < 0.5 * (before - base), (base, before, after)  # QAT recovers > half
