"""The `gptq` op: layer-sequential on calibration data, same leaves as round-to-nearest,
closer to the float model than round-to-nearest, checked before any work."""

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
from jaxopt_llm.transforms.gptq import GPTQOptions, gptq_leaf
from jaxopt_llm.weights import QuantizedWeight

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, max_position_embeddings=64)
GRID = {"bits": 3, "symmetric": False, "group_size": 32}
WINDOWS = np.random.default_rng(0).integers(0, 64, (8, 32)).astype(np.int32)


def _recipe(op, **options):
    return Recipe(name=op, stages=(Stage(name="q", rules=(rule(BLOCK_LINEARS, op, **options),)),))


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def gptq_model(params):
    return _recipe("gptq", **GRID)(CONFIG, params, calibration=Calibration(windows=WINDOWS))[1]


def test_first_block_equals_gptq_on_the_float_models_statistics(params, gptq_model):
    stats = linear_statistics(CONFIG, params, Calibration(windows=WINDOWS))
    for name in ("attn/q_proj", "mlp/down_proj"):
        path = f"layers_0/{name}/kernel"
        want = gptq_leaf(tree.flatten(params)[path], path, GPTQOptions(**GRID),
                         stats[f"layers_0/{name}"].gram)
        got = tree.flatten(gptq_model)[path]
        assert isinstance(got, QuantizedWeight)
        np.testing.assert_array_equal(np.asarray(got.qvalue), np.asarray(want.qvalue))
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))


def test_closer_to_float_than_round_to_nearest_with_the_same_bytes(params, gptq_model):
    rtn = _recipe("quantize", **GRID)(CONFIG, params)[1]
    held_out = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 32)), jnp.int32)
    want = forward(CONFIG, params, held_out)[0]

    def error(p):
        return float(jnp.mean((forward(CONFIG, p, held_out)[0] - want) ** 2))

    assert error(gptq_model) < 0.9 * error(rtn)
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree.flatten(gptq_model))
    assert shapes == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree.flatten(rtn))


def test_plan_needs_no_calibration_and_bad_input_fails_before_work(params):
    planned = plan(load_recipe("w4g128-gptq"), CONFIG, params)
    assert {row.representation for row in planned.rows
            if row.path.startswith("layers_") and row.path.endswith("kernel")} == {
        "QuantizedWeight"}
    with pytest.raises(ValueError, match=r"op 'gptq' needs calibration data"):
        load_recipe("w4g128-gptq")(CONFIG, params)
    calibration = Calibration(windows=WINDOWS)
    quantized = load_recipe("w8")(CONFIG, params)[1]
    with pytest.raises(ValueError, match=r"is already a QuantizedWeight: gptq starts "
                                         r"from the float weights"):
        load_recipe("w4g128-gptq")(CONFIG, quantized, calibration=calibration)
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the input dimension"):
        _recipe("gptq", bits=4, symmetric=False, group_size=48)(CONFIG, params,
                                                                calibration=calibration)
    with pytest.raises(ValueError, match=r"dampening must be in \(0.0, None\]|dampening"):
        _recipe("gptq", dampening=0.0).check()
    embed = Recipe(name="e", stages=(Stage(name="q", rules=(
        rule(r"embed_tokens/embedding", "gptq", bits=4),)),))
    with pytest.raises(ValueError, match=r"embed_tokens/embedding is outside them"):
        embed(CONFIG, params, calibration=calibration)
