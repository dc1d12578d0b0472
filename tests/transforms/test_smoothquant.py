"""SmoothQuant: the smoothing is exact in float, balances activation and weight ranges as the
paper's formula says, and makes W8A8 closer to float than naive W8A8 where activations
have outlier channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import tree
from jaxopt_llm.calibration import Calibration, linear_statistics
from jaxopt_llm.models import forward
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.plan import plan
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.transforms.smoothquant import SmoothQuantOptions, smoothing_scales
from jaxopt_llm.weights import QuantizedWeight, ScaledInputWeight

WINDOWS = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
HELD_OUT = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 16)), jnp.int32)


def _smooth(alpha):
    return Recipe(name="smooth", stages=(
        Stage(name="smooth", rules=(rule(BLOCK_LINEARS, "smoothquant", alpha=alpha),)),))


@pytest.fixture(scope="module")
def models(tiny_config, tiny_params):
    out = {}
    for family in ("llama", "gpt2"):
        config = tiny_config(family, vocab_size=64)
        out[family] = (config, tiny_params(config, seed=2))
    return out


def test_scales_follow_the_papers_formula():
    act = np.array([16.0, 0.0, 3.0, 1e-12], np.float32)
    weight = np.array([1.0, 2.0, 0.0, 4.0], np.float32)
    got = np.asarray(smoothing_scales(jnp.asarray(act), jnp.asarray(weight), 0.75))
    want = np.array([16.0 ** 0.75 / 1.0 ** 0.25, 1.0, 1.0, 1e-5], np.float32)
    want[3] = max(1e-12 ** 0.75 / 4.0 ** 0.25, 1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 0.85])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_smoothing_leaves_float_outputs_unchanged(models, family, alpha):
    config, params = models[family]
    new_config, smoothed = _smooth(alpha)(config, params, calibration=Calibration(windows=WINDOWS))
    assert new_config == config
    run = jax.jit(lambda p: forward(config, p, HELD_OUT)[0])
    want, got = np.asarray(run(params)), np.asarray(run(smoothed))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    changed = [p for p, v in tree.flatten(smoothed).items()
               if isinstance(v, ScaledInputWeight) or not np.array_equal(
                   np.asarray(v), np.asarray(tree.flatten(params)[p]))]
    assert any(p.endswith("norm/scale") or "/ln_" in p for p in changed)  # folded into norms


def test_half_migration_balances_activation_and_weight_maxima(models):
    """α = 0.5: after smoothing, max|x_j| = max|W_j| for every input channel of a group
    (checked where no later fold rescales the group's kernels: gate/up's up_proj columns
    absorb down_proj's scales afterwards)."""
    config, params = models["llama"]
    calibration = Calibration(windows=WINDOWS)
    smoothed = _smooth(0.5)(config, params, calibration=calibration)[1]
    stats = linear_statistics(config, smoothed, calibration)
    flat = tree.flatten(smoothed)
    for group in (("attn/q_proj", "attn/k_proj", "attn/v_proj"), ("mlp/down_proj",)):
        act = np.asarray(stats[f"layers_1/{group[0]}"].abs_max)
        weight = np.max([np.abs(np.asarray(flat[f"layers_1/{n}/kernel"])).max(axis=1)
                         for n in group], axis=0)
        np.testing.assert_allclose(act, weight, rtol=1e-4)


def test_w8a8_with_smoothing_beats_naive_w8a8_on_outlier_channels(models):
    config, params = models["llama"]
    flat = tree.flatten(params)
    for i in range(config.num_layers):  # a few channels 40× larger, as in real LLMs
        norm = np.ones(config.hidden_size, np.float32)
        norm[[3, 17]] = 40.0
        flat[f"layers_{i}/input_norm/scale"] = jnp.asarray(norm)
        flat[f"layers_{i}/post_attention_norm/scale"] = jnp.asarray(norm)
    params = tree.unflatten(flat)
    calibration = Calibration(windows=WINDOWS)
    run = jax.jit(lambda p: forward(config, p, HELD_OUT)[0])
    want = run(params)

    def error(name):
        out = load_recipe(name)(config, params, calibration=calibration)[1]
        return float(jnp.mean((run(out) - want) ** 2))

    naive, smooth = error("w8a8"), error("w8a8-smoothquant")
    assert smooth < 0.5 * naive, (smooth, naive)


def test_plan_shows_the_scales_kept_in_leaves(models):
    config, params = models["llama"]
    result = plan(load_recipe("w8a8-smoothquant"), config, params)
    rows = {r.path: r for r in result.rows}
    assert rows["layers_0/attn/o_proj/kernel"].representation == \
        "ScaledInputWeight(QuantizedWeight)"
    assert rows["layers_0/attn/q_proj/kernel"].representation == "QuantizedWeight"
    real = load_recipe("w8a8-smoothquant")(config, params,
                                           calibration=Calibration(windows=WINDOWS))[1]
    o_proj = tree.flatten(real)["layers_0/attn/o_proj/kernel"]
    assert isinstance(o_proj.weight, QuantizedWeight) and o_proj.weight.act_bits == 8
    assert result.bytes_after == sum(r.bytes_after for r in result.rows)


@pytest.mark.parametrize("alpha, message", [
    (-0.1, r"alpha must be in \[0.0, 1.0\], got -0.1"),
    (1.5, r"alpha must be in \[0.0, 1.0\], got 1.5"),
    (float("nan"), r"alpha must be a finite number"),
    ("half", r"alpha must be a finite number"),
])
def test_bad_alpha_is_named(alpha, message):
    with pytest.raises(ValueError, match=message):
        SmoothQuantOptions(alpha=alpha)


def test_needs_calibration_and_float_weights(models):
    config, params = models["llama"]
    with pytest.raises(ValueError, match=r"op 'smoothquant' needs calibration data"):
        load_recipe("w8a8-smoothquant")(config, params)
    quantized = load_recipe("w8")(config, params)[1]
    with pytest.raises(ValueError, match=r"is already a QuantizedWeight: smoothquant starts "
                                         r"from the float weights"):
        load_recipe("w8a8-smoothquant")(config, quantized,
                                        calibration=Calibration(windows=WINDOWS))
