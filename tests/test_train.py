"""The jit train step: QAT leaves, masked weights, distillation, accumulation, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.models import ModelConfig, build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.train import TrainOptions, lm_loss, make_trainer, trainable_mask
from jaxopt_llm.weights import FakeQuantWeight, MaskedWeight, materialize

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=32, hidden_size=32,
                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)


def _params():
    tokens = jnp.zeros((1, 8), jnp.int32)
    mask = attention_mask(jnp.ones((1, 8), bool), 0, 8)
    return build_model(CONFIG).init(jax.random.key(0), tokens, tokens, mask)["params"]


def _batches(count, batch=4, length=16, seed=0):
    """A learnable synthetic language: token t+1 = (token t + 3) mod vocab."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, CONFIG.vocab_size, (count, batch, 1))
    return (starts + 3 * np.arange(length)) % CONFIG.vocab_size


def _recipe(op, **options):
    return Recipe(name=op, stages=(Stage(name=op, rules=(rule(BLOCK_LINEARS, op, **options),)),))


def _train(params, options, batches, teacher=None):
    trainer, frozen = make_trainer(CONFIG, params, options)
    state = trainer.init(params)
    history = []
    for tokens in batches:
        state, metrics = trainer.step(state, frozen, jnp.asarray(tokens, jnp.int32), teacher)
        history.append(float(metrics["loss"]))
    return trainer, state, frozen, history


def test_lm_loss_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    shifted = logits[:, :-1]
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(log_probs, tokens[:, 1:, None], -1))
    np.testing.assert_allclose(float(lm_loss(jnp.asarray(logits), jnp.asarray(tokens))),
                               expected, rtol=1e-6)


def test_fake_quant_training_learns_without_recompiling(count_compiles):
    _, params = _recipe("fake_quant", bits=4)(CONFIG, _params())
    with count_compiles() as compiles:
        trainer, state, frozen, history = _train(
            params, TrainOptions(steps=60, learning_rate=3e-3), _batches(60))
    assert history[-1] < 0.5 * history[0]
    assert compiles["step"] == 1  # one compilation for all 60 steps
    trained = trainer.params(state, frozen)
    kernel = trained["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, FakeQuantWeight)  # still a QAT leaf, with a trained master
    assert not np.array_equal(np.asarray(kernel.w),
                              np.asarray(params["layers_0"]["mlp"]["up_proj"]["kernel"].w))


def test_pruned_weights_stay_exactly_zero():
    _, params = _recipe("prune", sparsity=0.5)(CONFIG, _params())
    trainer, state, frozen, _ = _train(
        params, TrainOptions(steps=40, learning_rate=1e-2, weight_decay=0.1), _batches(40))
    trained = trainer.params(state, frozen)
    for path in ("layers_0/attn/q_proj/kernel", "layers_1/mlp/down_proj/kernel"):
        before, after = params, trained
        for key in path.split("/"):
            before, after = before[key], after[key]
        assert isinstance(after, MaskedWeight)
        mask = np.asarray(before.dense_mask())
        assert np.all(np.asarray(after.w)[~mask] == 0.0)  # the stored weights, not a mask
        assert not np.array_equal(np.asarray(after.w)[mask], np.asarray(before.w)[mask])


def test_trainable_rule_freezes_the_rest_and_integer_arrays_never_train():
    _, params = _recipe("quantize", bits=8)(CONFIG, _params())
    mask = trainable_mask(params, ".*")
    flags = jax.tree_util.tree_leaves(mask)
    assert any(flags) and not all(flags)  # int8 codes are never trainable
    options = TrainOptions(steps=5, trainable=r".*norm/scale")
    trainer, state, frozen, _ = _train(params, options, _batches(5))
    trained = trainer.params(state, frozen)
    np.testing.assert_array_equal(np.asarray(trained["embed_tokens"]["embedding"]),
                                  np.asarray(params["embed_tokens"]["embedding"]))
    assert not np.array_equal(np.asarray(trained["norm"]["scale"]),
                              np.asarray(params["norm"]["scale"]))


def test_distillation_toward_the_teacher():
    float_params = _params()
    trainer, state, frozen, _ = _train(float_params, TrainOptions(steps=60, learning_rate=3e-3),
                                       _batches(60))
    teacher = trainer.params(state, frozen)  # a trained float teacher
    _, student = _recipe("fake_quant", bits=3)(CONFIG, teacher)
    options = TrainOptions(steps=30, learning_rate=1e-3, distill_weight=1.0)
    _, _, _, history = _train(student, options, _batches(30, seed=1), teacher=teacher)
    assert history[0] > 1e-3  # 3-bit fake quantization really moved the logits
    assert history[-1] < 0.5 * history[0]  # and the KL to the teacher goes down


def test_accumulation_updates_every_k_micro_batches():
    params = _params()
    options = TrainOptions(steps=4, learning_rate=1e-2, accumulation=2)
    trainer, frozen = make_trainer(CONFIG, params, options)
    state = trainer.init(params)
    tokens = jnp.asarray(_batches(1)[0], jnp.int32)
    state, _ = trainer.step(state, frozen, tokens)
    np.testing.assert_array_equal(np.asarray(trainer.params(state, frozen)["norm"]["scale"]),
                                  np.asarray(params["norm"]["scale"]))  # not yet
    state, _ = trainer.step(state, frozen, tokens)
    assert not np.array_equal(np.asarray(trainer.params(state, frozen)["norm"]["scale"]),
                              np.asarray(params["norm"]["scale"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(steps=0), "steps must be a positive integer"),
     (dict(steps=5, learning_rate=0.0), "learning_rate must be positive"),
     (dict(steps=5, accumulation=0), "accumulation must be a positive integer"),
     (dict(steps=5, warmup_steps=5), r"warmup_steps must be in \[0, steps=5\)"),
     (dict(steps=5, distill_weight=1.5), r"distill_weight must be in \[0, 1\]"),
     (dict(steps=5, trainable="("), "is not a valid regex")],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainOptions(**kwargs)


def test_nothing_trainable_is_an_error():
    with pytest.raises(ValueError, match="selects no floating-point parameter"):
        make_trainer(CONFIG, _params(), TrainOptions(steps=3, trainable="no/such/.*"))


def test_materialized_params_after_training_run():
    _, params = _recipe("fake_quant", bits=8)(CONFIG, _params())
    trainer, state, frozen, _ = _train(params, TrainOptions(steps=2), _batches(2))
    dense = materialize(trainer.params(state, frozen))
    assert jax.tree_util.tree_structure(dense) == jax.tree_util.tree_structure(
        materialize(params))


def test_bfloat16_compute_trains_float32_master_weights_close_to_float32():
    _, params = _recipe("fake_quant", bits=4)(CONFIG, _params())
    tokens = jnp.asarray(_batches(1)[0], jnp.int32)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        options = TrainOptions(steps=3, learning_rate=1e-3, compute_dtype=dtype)
        trainer, frozen = make_trainer(CONFIG, params, options)
        state = trainer.init(params)
        state, metrics = trainer.step(state, frozen, tokens)
        losses[dtype] = float(metrics["loss"])
        trained = trainer.params(state, frozen)
        assert trained["layers_0"]["mlp"]["up_proj"]["kernel"].w.dtype == jnp.float32
        assert trained["norm"]["scale"].dtype == jnp.float32
    assert losses["bfloat16"] != losses["float32"]  # really computed in another precision
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.02 * losses["float32"]


def test_bad_compute_dtype():
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        TrainOptions(steps=3, compute_dtype="float16")
