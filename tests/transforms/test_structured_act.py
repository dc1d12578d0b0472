"""Activation-aware structured pruning (score "act"): the units kept are those with the
largest output energy computed in numpy from the calibration statistics, the result is
closer to the float model than L2 scores on a model with uneven activations, and the
op asks for calibration data only with this score."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import tree
from jaxopt_llm.calibration import Calibration, linear_statistics
from jaxopt_llm.models import ModelConfig, forward, init_params
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.transforms.structured import prune_attention_heads, prune_mlp_neurons

CONFIGS = {
    "gqa": ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=64,
                       intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=2,
                       head_dim=8, max_position_embeddings=64),
    "gpt2": ModelConfig(family="gpt2", model_type="gpt2", vocab_size=64, hidden_size=64,
                        intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=8,
                        head_dim=8, max_position_embeddings=64, tie_word_embeddings=True),
}
WINDOWS = np.random.default_rng(0).integers(0, 64, (16, 32)).astype(np.int32)


def _params(config):
    """Random weights, reparametrized without changing the function so that weight norms
    mislead: GPT-2 head h's v columns ×c_h and its c_proj rows ÷c_h; Llama neuron j's
    up_proj column ×c_j and down_proj row ÷c_j (SwiGLU is linear in up). Norm gains are
    log-normal, so activations are uneven too."""
    flat = tree.flatten(init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(5)
    for path, value in flat.items():
        if "norm" in path or "ln_" in path:
            flat[path] = value * np.exp(1.5 * rng.standard_normal(value.shape)).astype(
                np.float32)
    hd, d = config.head_dim, config.hidden_size
    for layer in range(config.num_layers):
        if config.family == "gpt2":
            c = np.repeat(np.exp(2.0 * rng.standard_normal(config.num_heads)), hd)
            qkv = np.array(flat[f"h_{layer}/attn/c_attn/kernel"])
            qkv[:, 2 * d:] *= c
            flat[f"h_{layer}/attn/c_attn/kernel"] = jnp.asarray(qkv)
            bias = np.array(flat[f"h_{layer}/attn/c_attn/bias"])
            bias[2 * d:] *= c
            flat[f"h_{layer}/attn/c_attn/bias"] = jnp.asarray(bias)
            out = f"h_{layer}/attn/c_proj/kernel"
            flat[out] = jnp.asarray(np.asarray(flat[out]) / c[:, None])
        else:
            c = np.exp(2.0 * rng.standard_normal(config.intermediate_size))
            up, down = f"layers_{layer}/mlp/up_proj/kernel", f"layers_{layer}/mlp/down_proj/kernel"
            flat[up] = jnp.asarray((np.asarray(flat[up]) * c).astype(np.float32))
            flat[down] = jnp.asarray((np.asarray(flat[down]) / c[:, None]).astype(np.float32))
    return tree.unflatten(flat)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    config = CONFIGS[request.param]
    params = _params(config)
    return config, params, linear_statistics(config, params, Calibration(windows=WINDOWS))


def _names(config):
    if config.family == "gpt2":
        return "h_{}/attn", "c_proj", "h_{}/mlp", "c_proj"
    return "layers_{}/attn", "o_proj", "layers_{}/mlp", "down_proj"


def test_kept_neurons_have_the_largest_output_energy(model):
    config, params, stats = model
    _, _, mlp, down = _names(config)
    _, pruned = prune_mlp_neurons(config, params, fraction=0.25, score="act", stats=stats)
    flat, new = tree.flatten(params), tree.flatten(pruned)
    for layer in range(config.num_layers):
        name = f"{mlp.format(layer)}/{down}"
        w = np.asarray(flat[f"{name}/kernel"], np.float64)
        energy = np.diag(np.asarray(stats[name].gram, np.float64)) * (w ** 2).sum(1)
        kept = np.sort(np.argsort(energy, kind="stable")[24:])
        np.testing.assert_array_equal(np.asarray(new[f"{name}/kernel"]), w[kept].astype(
            np.float32))


def test_kept_heads_have_the_largest_output_energy(model):
    config, params, stats = model
    attn, out, _, _ = _names(config)
    hd, heads, kv = config.head_dim, config.num_heads, config.num_kv_heads
    _, pruned = prune_attention_heads(config, params, fraction=0.25, score="act", stats=stats)
    flat, new = tree.flatten(params), tree.flatten(pruned)
    for layer in range(config.num_layers):
        name = f"{attn.format(layer)}/{out}"
        o = np.asarray(flat[f"{name}/kernel"], np.float64)
        gram = np.asarray(stats[name].gram, np.float64)
        energy = np.array([np.trace(o[h * hd:(h + 1) * hd].T @ gram[h * hd:(h + 1) * hd,
                                                                      h * hd:(h + 1) * hd]
                                    @ o[h * hd:(h + 1) * hd]) for h in range(heads)])
        group = heads // kv
        removed = round(0.25 * group) if group > 1 else round(0.25 * heads)
        if group > 1:
            kept = np.concatenate([g * group + np.sort(np.argsort(energy[g * group:(g + 1)
                                   * group], kind="stable")[removed:]) for g in range(kv)])
        else:
            kept = np.sort(np.argsort(energy, kind="stable")[removed:])
        rows = (kept[:, None] * hd + np.arange(hd)).reshape(-1)
        np.testing.assert_array_equal(np.asarray(new[f"{name}/kernel"]),
                                      o[rows].astype(np.float32))


def test_activation_aware_beats_l2_on_held_out_tokens(model):
    """Where the weights were rescaled without changing the function (GPT-2 heads, Llama
    neurons), L2 scores are misled and output energy is not."""
    config, params, _ = model
    kind = "heads" if config.family == "gpt2" else "mlp"
    held_out = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 32)), jnp.int32)
    want = forward(config, params, held_out)[0]
    calibration = Calibration(windows=WINDOWS)

    def error(name):
        recipe = load_recipe(name)
        new_config, new = recipe(config, params,
                                 calibration=calibration if recipe.needs_calibration else None)
        return float(jnp.mean((forward(new_config, new, held_out)[0] - want) ** 2))

    assert error(f"{kind}-25-act") < error(f"{kind}-25")


def test_act_score_needs_calibration_and_l2_does_not(model):
    config, params, _ = model
    assert load_recipe("mlp-25-act").needs_calibration
    assert not load_recipe("mlp-25").needs_calibration
    with pytest.raises(ValueError, match="op 'prune_neurons' needs calibration data"):
        load_recipe("mlp-25-act")(config, params)
    with pytest.raises(ValueError, match="score 'act' needs calibration statistics"):
        prune_mlp_neurons(config, params, fraction=0.25, score="act")
