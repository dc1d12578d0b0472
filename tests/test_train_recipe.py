"""`train_recipe` from Python: the same model as composing the loop by hand, resume equals
uninterrupted, the artifact it saves, errors that name Python parameters."""

import json
import re

import jax
import numpy as np
import pytest

from jaxopt_llm.io.loader import load_model
from jaxopt_llm.recipes import BUILTIN_RECIPES, TABLES_INT8
from jaxopt_llm.train import (
    EVAL_TOKENS,
    TrainOptions,
    TrainSettings,
    convert,
    qat_recipe,
    run_training,
    train_recipe,
    training_ids,
)
from jaxopt_llm.weights import FakeQuantWeight, QuantizedWeight
from tests.test_train_cli import CONFIG, TEXT

SETTINGS = TrainSettings(steps=6, batch=2, seq=16, learning_rate=1e-2, distill_weight=0.5)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir(CONFIG, TEXT)[0]))


def _assert_same_leaves(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_recipe_equals_the_loop_composed_by_hand(loaded):
    ids = training_ids(loaded.tokenizer, TEXT)
    trained = train_recipe(loaded, "w4", ids, SETTINGS)
    assert trained.finished and trained.resumed_from == 0
    assert [h["step"] for h in trained.history] == list(range(1, 7))
    assert trained.loss_last < trained.loss_first and "distill_kl" in trained.history[0]
    kernel = trained.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and not isinstance(kernel, FakeQuantWeight)
    # by hand: the QAT form, the loop with the float model as teacher, then integers
    config, params = qat_recipe(BUILTIN_RECIPES["w4"])(loaded.config, loaded.params)
    options = TrainOptions(steps=6, learning_rate=1e-2, warmup_steps=0, distill_weight=0.5)
    by_hand = run_training(config, params, options, ids, batch=2, seq=16,
                           teacher=loaded.params)
    _assert_same_leaves(trained.params, convert(by_hand.params))
    assert [h["loss"] for h in trained.history] == [h["loss"] for h in by_hand.history]


def test_resume_equals_uninterrupted_and_save_writes_the_artifact(loaded, tmp_path):
    ids = training_ids(loaded.tokenizer, TEXT)
    straight = train_recipe(loaded, "w4", ids, SETTINGS)
    ckpt, log = tmp_path / "run.checkpoint", tmp_path / "run.jsonl"
    common = dict(checkpoint_dir=ckpt, checkpoint_every=2, log_path=log)
    first = train_recipe(loaded, "w4", ids, SETTINGS, stop_after=3, **common)
    assert not first.finished and first.steps_done == 3
    assert isinstance(first.params["layers_0"]["mlp"]["up_proj"]["kernel"], FakeQuantWeight)
    with pytest.raises(ValueError, match="stopped at step 3 of 6; resume it"):
        first.save(tmp_path / "early")
    idle = train_recipe(loaded, "w4", ids, SETTINGS, stop_after=2, **common)
    assert not idle.finished and idle.steps_done == 2  # no step ran
    assert [h["step"] for h in idle.history] == [1, 2]  # the log up to the checkpoint
    resumed = train_recipe(loaded, "w4", ids, SETTINGS, **common)
    assert resumed.finished and resumed.resumed_from == 2  # the checkpoint of step 2
    _assert_same_leaves(straight.params, resumed.params)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # one record per step
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert resumed.loss_first == straight.loss_first  # step 1's loss, not the resumed one's
    assert [r["loss"] for r in records] == [h["loss"] for h in straight.history]
    path = resumed.save(tmp_path / "model")
    assert not ckpt.exists()  # the run is complete
    saved = load_model(str(path))
    assert saved.recipe["name"] == "w4" and saved.extra["trained"]["steps"] == 6
    assert saved.extra["trained"]["distill"] == 0.5 and saved.extra["source"] == loaded.source
    _assert_same_leaves(saved.params, straight.params)


def test_default_training_tokens_skip_the_evaluation_tokens(word_tokenizer):
    from jaxopt_llm.data import pydoc_text

    everything = np.asarray(word_tokenizer.encode(pydoc_text()))
    assert len(everything) > EVAL_TOKENS
    np.testing.assert_array_equal(training_ids(word_tokenizer), everything[EVAL_TOKENS:])


@pytest.mark.parametrize(("recipe", "settings", "message"), [
    ("w4", dict(seq=100), "seq=100: longer than the model's context of 64 tokens"),
    (None, dict(gradual=True), "recipe=None: gradual pruning and learned scales need a recipe"),
    ("w4", dict(lora_rank=4, learn_scale=True), "lora_rank=4: does not combine with gradual"),
    ("w4", dict(lora_rank=0), "lora_rank=0: must be a positive integer"),
    ("w4", dict(merge_lora=True), "merge_lora=True: needs a lora_rank"),
    ("w4", dict(batch=0), "batch=0: must be a positive integer"),
    ("w4", dict(distill_weight=2.0), r"distill_weight must be in \[0, 1\]"),
])
def test_errors_name_python_parameters(loaded, recipe, settings, message):
    with pytest.raises(ValueError, match=message):
        train_recipe(loaded, recipe, training_ids(loaded.tokenizer, TEXT),
                     TrainSettings(**{"steps": 2, "batch": 2, "seq": 16, **settings}))


@pytest.mark.parametrize("name", ["w4-gptq", "w4-awq", "w8a8-smoothquant"])
def test_qat_starts_from_the_calibrated_weights(loaded, name):
    """Step 0 of QAT holds the calibrated recipe's weights (and, weight-only, computes what
    it computes; QAT does not simulate W8A8's activation rounding); training then moves
    them and the result is integer again (inside scale wrappers too)."""
    from jaxopt_llm.calibration import Calibration
    from jaxopt_llm.models import forward
    from jaxopt_llm.train import trainable_quantized
    from jaxopt_llm.tree import flatten
    from jaxopt_llm.weights import ScaledInputWeight, materialize

    ids = training_ids(loaded.tokenizer, TEXT)
    calibration = Calibration(windows=np.asarray(ids[:256]).reshape(4, 64))
    recipe = BUILTIN_RECIPES[name]
    config, calibrated = recipe(loaded.config, loaded.params, calibration=calibration)
    start = trainable_quantized(qat_recipe(recipe)(loaded.config, loaded.params,
                                                   calibration=calibration)[1])
    for path, leaf in flatten(calibrated).items():
        np.testing.assert_allclose(np.asarray(materialize(flatten(start)[path])),
                                   np.asarray(materialize(leaf)), rtol=1e-6, atol=1e-7)
    if name != "w8a8-smoothquant":
        tokens = np.asarray(ids[:32]).reshape(2, 16)
        np.testing.assert_allclose(np.asarray(forward(config, start, tokens)[0]),
                                   np.asarray(forward(config, calibrated, tokens)[0]),
                                   rtol=1e-5, atol=1e-5)
    trained = train_recipe(loaded, name, ids, TrainSettings(steps=3, batch=2, seq=16,
                                                            learning_rate=1e-3),
                           calibration=calibration)
    assert trained.finished and np.isfinite(trained.loss_last)
    typed = lambda n: isinstance(n, (QuantizedWeight, FakeQuantWeight))  # noqa: E731
    kernels = [leaf for leaf in jax.tree_util.tree_leaves(trained.params, is_leaf=typed)
               if typed(leaf)]
    assert kernels and all(type(k) is QuantizedWeight for k in kernels)
    tables = re.compile(TABLES_INT8.match)  # the token table and an untied head
    o_proj = trained.params["layers_0"]["attn"]["o_proj"]["kernel"]
    assert isinstance(o_proj, ScaledInputWeight) == (name != "w4-gptq")
    # the artifact computes what its recipe says: W8A8 keeps per-token int8 activations
    # (the int8 token table, weight-only in every recipe, is read by gathers and the head)
    flat = flatten(trained.params)
    assert {leaf.act_bits for path, leaf in flat.items() if isinstance(leaf, QuantizedWeight)
            and not tables.fullmatch(path)} == ({8} if name == "w8a8-smoothquant" else {None})
    assert {flat[p].act_bits for p in flat if tables.fullmatch(p)} == {None}


def test_qat_from_a_float_offset_grid_is_refused():
    import jax.numpy as jnp

    from jaxopt_llm.train import trainable_quantized
    from jaxopt_llm.weights import QuantSpec, quantize_weight

    leaf = quantize_weight(jnp.ones((8, 4)), QuantSpec(bits=4, symmetric=False, zero="float"))
    with pytest.raises(ValueError, match=r"QAT cannot start from a float-offset grid"):
        trainable_quantized({"k": leaf})


# Float N:M values from nm-2:4 (how the pattern was chosen does not matter to training; the
# combined recipe's are SparseGPT's, with quantized values).
@pytest.mark.parametrize("name", ["nm-2:4", "wanda-50", "svdllm-20", "mlp-25-act",
                                  "sparsegpt-2:4+w4g128-gptq"])
def test_recovery_training_keeps_the_pattern_and_the_shapes(loaded, name):
    """Recovery fine-tuning from a calibrated pruning / low-rank recipe: the pattern
    (masks, N:M positions), the factors' ranks, the codes' grid of a sparse quantized
    weight and the shrunk config survive training."""
    from jaxopt_llm.calibration import Calibration
    from jaxopt_llm.tree import flatten
    from jaxopt_llm.weights import (
        LowRankWeight,
        MaskedWeight,
        NMSparseWeight,
        QuantizedWeight,
        materialize,
    )

    ids = training_ids(loaded.tokenizer, TEXT)
    calibration = Calibration(windows=np.asarray(ids[:256]).reshape(4, 64))
    config, start = BUILTIN_RECIPES[name](loaded.config, loaded.params, calibration=calibration)
    trained = train_recipe(loaded, name, ids, TrainSettings(steps=3, batch=2, seq=16,
                                                            learning_rate=1e-3),
                           calibration=calibration)
    assert trained.finished and np.isfinite(trained.loss_last)
    assert trained.config == config
    before, after = flatten(start), flatten(trained.params)
    moved = False
    for path, leaf in before.items():
        new = after[path]
        if isinstance(leaf, (MaskedWeight, NMSparseWeight, LowRankWeight)):
            assert type(new) is type(leaf), path
        if isinstance(leaf, MaskedWeight):
            zeros = np.asarray(materialize(leaf)) == 0
            assert np.all(np.asarray(materialize(new))[zeros] == 0), path
        if isinstance(leaf, NMSparseWeight):  # the same positions, the same kind of values
            np.testing.assert_array_equal(np.asarray(new.index), np.asarray(leaf.index))
            assert isinstance(new.values, QuantizedWeight) == isinstance(leaf.values,
                                                                    QuantizedWeight), path
            if isinstance(leaf.values, QuantizedWeight):
                assert new.values.spec == leaf.values.spec, path
        if isinstance(leaf, LowRankWeight):
            assert new.rank == leaf.rank
        moved |= not np.array_equal(np.asarray(materialize(new)), np.asarray(materialize(leaf)))
    assert moved
