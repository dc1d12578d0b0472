"""Per-input-channel scaling (the rewrite under AWQ and SmoothQuant) is exact in float: the
model's logits do not change, whichever producer absorbs 1/s, in every family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import tree
from jaxopt_llm.models import forward
from jaxopt_llm.transforms.scaling import apply_scales, block_groups, with_unit_scales
from jaxopt_llm.weights import ScaledInputWeight

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)

# (family, config overrides, {first linear of a group: foldable?})
CASES = {
    "llama-gqa": ("llama", {}, {"attn/q_proj": True, "attn/o_proj": False,
                               "mlp/gate_proj": True, "mlp/down_proj": True}),
    "llama-mha-biases": ("llama", {"num_kv_heads": 4, "qkv_bias": True, "o_bias": True,
                                   "mlp_bias": True},
                         {"attn/q_proj": True, "attn/o_proj": True, "mlp/gate_proj": True,
                          "mlp/down_proj": True}),
    "gpt2": ("gpt2", {}, {"attn/c_attn": True, "attn/c_proj": True, "mlp/c_fc": True,
                          "mlp/c_proj": False}),
}


@pytest.fixture(scope="module")
def models(tiny_config, random_params):
    out = {}
    for name, (family, overrides, _) in CASES.items():
        config = tiny_config(family, vocab_size=64, **overrides)
        out[name] = (config, random_params(config, seed=3, std=0.2))
    return out


def _block_flat(params, path):
    return {k[len(path) + 1:]: v for k, v in tree.flatten(params).items()
            if k.startswith(path + "/")}


@pytest.mark.parametrize("case", list(CASES))
def test_scaling_every_group_leaves_the_logits_unchanged(models, case):
    config, params = models[case]
    expected_foldable = CASES[case][2]
    reference = jax.jit(lambda p: forward(config, p, TOKENS)[0])(params)
    flat = tree.flatten(params)
    prefix = "layers_0" if config.family == "llama" else "h_0"
    block = _block_flat(params, prefix)
    names = sorted({k.rsplit("/", 1)[0] for k in block if k.endswith("/kernel")})
    groups = block_groups(config, block, names)
    assert {g.selected[0]: g.foldable for g in groups} == expected_foldable
    rng = np.random.default_rng(1)
    for group in groups:
        inputs = block[f"{group.selected[0]}/kernel"].shape[0]
        scale = jnp.asarray(np.exp(rng.uniform(-2.3, 2.3, inputs)), jnp.float32)  # 0.1 … 10
        block = apply_scales(block, group, scale)
        for name in group.selected:
            leaf = block[f"{name}/kernel"]
            assert isinstance(leaf, ScaledInputWeight) != group.foldable
    scaled = dict(flat)
    scaled.update({f"{prefix}/{k}": v for k, v in block.items()})
    assert not np.allclose(np.asarray(scaled[f"{prefix}/{names[0]}/kernel"]),
                           np.asarray(flat[f"{prefix}/{names[0]}/kernel"]))
    got = jax.jit(lambda p: forward(config, p, TOKENS)[0])(tree.unflatten(scaled))
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference), rtol=1e-5, atol=1e-5)


def test_unit_scales_give_the_plans_structure(models):
    config, params = models["llama-gqa"]
    flat = tree.flatten(params)
    paths = [p for p in flat if p.startswith("layers_1/") and p.endswith("kernel")]
    by_block = {1: paths}
    out = jax.eval_shape(lambda f: with_unit_scales(config, f, by_block), flat)
    assert isinstance(out["layers_1/attn/o_proj/kernel"], ScaledInputWeight)
    assert not isinstance(out["layers_0/attn/o_proj/kernel"], ScaledInputWeight)
    assert out["layers_1/attn/q_proj/kernel"].shape == flat["layers_1/attn/q_proj/kernel"].shape


def test_a_linear_outside_every_group_is_named(models):
    config, params = models["llama-gqa"]
    block = _block_flat(params, "layers_0")
    block["attn/extra/kernel"] = block["attn/q_proj/kernel"]
    with pytest.raises(ValueError, match=r"\['attn/extra'\]: not in any scaling group"):
        block_groups(config, block, ["attn/q_proj", "attn/extra"])


def test_scaled_input_weight_math_against_numpy():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    leaf = ScaledInputWeight(weight=jnp.asarray(w * s[:, None]), input_scale=jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(leaf.materialize()), w, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda w, x: w.linear(x))(leaf, x)), x @ w,
                               rtol=1e-5, atol=1e-6)
    delta = rng.normal(size=(6, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(leaf.add_dense(jnp.asarray(delta)).materialize()),
                               w + delta, rtol=1e-5, atol=1e-6)
