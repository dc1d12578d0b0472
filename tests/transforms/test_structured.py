"""Structured pruning: a physically shrunk model equals the unpruned model with those units masked.

The references are independent: per-unit scores are recomputed here with plain
numpy loops, and the masked model zeroes the output rows (o_proj / c_proj /
down_proj) of the removed units instead of cutting anything.
"""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.generation import generate
from jaxopt_llm.models import build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.transforms.structured import (
    prune_attention_heads,
    prune_mlp_neurons,
    structured_config,
)
from jaxopt_llm.weights import LowRankWeight

VOCAB, LENGTH = 64, 12


@pytest.fixture(scope="module")
def configs(tiny_config):
    """Llama with MHA, GQA, GQA with every bias, MQA with tied embeddings (MLP 40), GPT-2."""

    def llama(heads, kv_heads, **extra):
        return tiny_config("llama", vocab_size=VOCAB, intermediate_size=40, num_heads=heads,
                           num_kv_heads=kv_heads, **extra)

    return {
        "llama-mha": llama(4, 4),
        "llama-gqa-2x4": llama(8, 2),
        "llama-gqa-3x3-bias": llama(9, 3, qkv_bias=True, o_bias=True, mlp_bias=True),
        "llama-mqa": llama(4, 1, tie_word_embeddings=True),
        "gpt2": tiny_config("gpt2", vocab_size=VOCAB),
    }


def _inputs(batch=2):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (batch, LENGTH)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (batch, LENGTH))
    return tokens, positions, attention_mask(jnp.ones((batch, LENGTH), bool), 0, LENGTH)


@pytest.fixture(scope="module")
def params_of(random_params):
    """params_of(config, seed=0): random numpy params (biases and norms too, so a dropped bias
    cannot hide)."""
    return lambda config, seed=0: random_params(config, seed=seed, std=0.3)


def _logits(config, params):
    apply = jax.jit(build_model(config).apply)
    return np.asarray(apply({"params": params}, *_inputs())[0])


def _score(blocks):
    return np.sqrt(sum(np.sum(np.asarray(b, np.float64) ** 2) for b in blocks))


def _attn_blocks(config, layer):
    """(q, k, v, o, o-path) numpy kernels of one layer; q/k/v (D, *), o (H*hd, D)."""
    if config.family == "gpt2":
        attn = layer["attn"]
        q, k, v = np.split(attn["c_attn"]["kernel"], 3, axis=1)
        return q, k, v, attn["c_proj"]["kernel"], ("attn", "c_proj")
    attn = layer["attn"]
    return (attn["q_proj"]["kernel"], attn["k_proj"]["kernel"], attn["v_proj"]["kernel"],
            attn["o_proj"]["kernel"], ("attn", "o_proj"))


def _removed_heads(config, layer, fraction):
    """Reference selection: per kv group (or globally for MHA), the lowest L2 scores."""
    q, k, v, o, _ = _attn_blocks(config, layer)
    hd, heads, kv_heads = config.head_dim, config.num_heads, config.num_kv_heads
    cut = lambda a, h, axis: a[:, h * hd:(h + 1) * hd] if axis else a[h * hd:(h + 1) * hd]  # noqa: E731
    if heads == kv_heads:
        scores = [_score([cut(q, h, 1), cut(k, h, 1), cut(v, h, 1), cut(o, h, 0)])
                  for h in range(heads)]
        return sorted(np.argsort(scores)[:round(fraction * heads)].tolist())
    group = heads // kv_heads
    removed = []
    for g in range(kv_heads):
        members = range(g * group, (g + 1) * group)
        scores = {h: _score([cut(q, h, 1), cut(o, h, 0)]) for h in members}
        removed += sorted(members, key=scores.get)[:round(fraction * group)]
    return sorted(removed)


def _layers(config, params):
    prefix = "h" if config.family == "gpt2" else "layers"
    return [params[f"{prefix}_{i}"] for i in range(config.num_layers)]


HEAD_CASES = [("llama-mha", 0.5), ("llama-gqa-2x4", 0.25), ("llama-gqa-3x3-bias", 0.34),
              ("llama-mqa", 0.5), ("gpt2", 0.5)]


@pytest.mark.parametrize(("name", "fraction"), HEAD_CASES)
def test_pruned_heads_equal_masked_heads(name, fraction, configs, params_of):
    config = configs[name]
    params = params_of(config)
    new_config, pruned = prune_attention_heads(config, params, fraction=fraction)
    assert new_config == structured_config(config, "heads", fraction)

    masked = copy.deepcopy(params)
    hd = config.head_dim
    for layer, masked_layer in zip(_layers(config, params), _layers(config, masked), strict=True):
        removed = _removed_heads(config, layer, fraction)
        *_, (attn, out) = _attn_blocks(config, layer)
        for h in removed:
            masked_layer[attn][out]["kernel"][h * hd:(h + 1) * hd] = 0.0
    # Shapes shrank as the config says.
    kv = new_config.num_kv_heads
    for layer in _layers(config, pruned):
        q, k, v, o, _ = _attn_blocks(new_config, jax.tree.map(np.asarray, layer))
        assert q.shape[1] == o.shape[0] == new_config.num_heads * hd
        assert k.shape[1] == v.shape[1] == kv * hd
    np.testing.assert_allclose(_logits(new_config, pruned), _logits(config, masked),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "fraction", "heads", "kv_heads"),
                         [("llama-mha", 0.25, 3, 3), ("llama-gqa-2x4", 0.5, 4, 2),
                          ("llama-gqa-3x3-bias", 0.34, 6, 3), ("llama-mqa", 0.75, 1, 1),
                          ("gpt2", 0.5, 2, 2)])
def test_kept_slices_are_the_highest_scoring(name, fraction, heads, kv_heads, configs, params_of):
    """Pruned kernels are exactly the reference-kept slices (checks selection and slicing)."""
    config = configs[name]
    params = params_of(config, seed=5)
    new_config, pruned = prune_attention_heads(config, params, fraction=fraction)
    assert (new_config.num_heads, new_config.num_kv_heads) == (heads, kv_heads)
    hd = config.head_dim
    for layer, new_layer in zip(_layers(config, params), _layers(config, pruned), strict=True):
        removed = set(_removed_heads(config, layer, fraction))
        kept = [h for h in range(config.num_heads) if h not in removed]
        cols = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in kept])
        q, _, _, o, _ = _attn_blocks(config, layer)
        new_q, _, _, new_o, _ = _attn_blocks(new_config, jax.tree.map(np.asarray, new_layer))
        np.testing.assert_array_equal(new_q, q[:, cols])
        np.testing.assert_array_equal(new_o, o[cols])
        if config.qkv_bias:
            np.testing.assert_array_equal(new_layer["attn"]["q_proj"]["bias"],
                                          layer["attn"]["q_proj"]["bias"][cols])
            np.testing.assert_array_equal(new_layer["attn"]["o_proj"]["bias"],
                                          layer["attn"]["o_proj"]["bias"])


def test_each_layer_picks_its_own_heads(configs, params_of):
    config = configs["llama-gqa-2x4"]
    params = params_of(config)
    planted = {0: [1, 6], 1: [3, 4]}  # one weak head per kv group, different per layer
    for i, heads in planted.items():
        attn = params[f"layers_{i}"]["attn"]
        for h in heads:
            attn["q_proj"]["kernel"][:, h * 8:(h + 1) * 8] *= 0.01
            attn["o_proj"]["kernel"][h * 8:(h + 1) * 8] *= 0.01
    _, pruned = prune_attention_heads(config, params, fraction=0.25)
    for i, heads in planted.items():
        kept = [h for h in range(8) if h not in heads]
        cols = np.concatenate([np.arange(h * 8, (h + 1) * 8) for h in kept])
        np.testing.assert_array_equal(pruned[f"layers_{i}"]["attn"]["q_proj"]["kernel"],
                                      params[f"layers_{i}"]["attn"]["q_proj"]["kernel"][:, cols])


def _mlp_blocks(config, layer):
    mlp = layer["mlp"]
    if config.family == "gpt2":
        return [mlp["c_fc"]["kernel"]], mlp["c_proj"]["kernel"], "c_proj"
    return [mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]], mlp["down_proj"]["kernel"], \
        "down_proj"


@pytest.mark.parametrize(("name", "fraction"),
                         [("llama-gqa-2x4", 0.6), ("llama-gqa-3x3-bias", 0.25), ("gpt2", 0.25)])
def test_pruned_neurons_equal_masked_neurons(name, fraction, configs, params_of):
    config = configs[name]
    params = params_of(config, seed=2)
    new_config, pruned = prune_mlp_neurons(config, params, fraction=fraction)
    size = config.intermediate_size
    removed_count = round(fraction * size)
    assert new_config == dataclasses.replace(config, intermediate_size=size - removed_count)
    masked = copy.deepcopy(params)
    for layer, masked_layer, new_layer in zip(_layers(config, params), _layers(config, masked),
                                              _layers(config, pruned), strict=True):
        ins, down, out = _mlp_blocks(config, layer)
        scores = [_score([w[:, j] for w in ins] + [down[j]]) for j in range(size)]
        removed = np.argsort(scores)[:removed_count]
        kept = np.setdiff1d(np.arange(size), removed)
        masked_layer["mlp"][out]["kernel"][removed] = 0.0
        new_ins, new_down, _ = _mlp_blocks(config, new_layer)
        np.testing.assert_array_equal(new_down, down[kept])
        for w, new_w in zip(ins, new_ins, strict=True):
            np.testing.assert_array_equal(new_w, w[:, kept])
    np.testing.assert_allclose(_logits(new_config, pruned), _logits(config, masked),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "kinds"),
                         [("llama-gqa-3x3-bias", ("heads", "neurons")), ("gpt2", ("neurons",)),
                          ("gpt2", ("heads",))])
def test_pruned_model_generates(name, kinds, configs, params_of):
    config, params = configs[name], params_of(configs[name])
    for kind in kinds:
        prune = prune_attention_heads if kind == "heads" else prune_mlp_neurons
        config, params = prune(config, params, fraction=0.5)
    result = generate(config, params, [[1, 2, 3], [4, 5]], max_new_tokens=4)
    assert [len(ids) for ids in result.new_ids] == [4, 4]


def test_pure_dtype_kept_and_jax_arrays_out(configs, params_of):
    config = configs["llama-gqa-3x3-bias"]
    params = params_of(config)
    before = copy.deepcopy(params)
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    for prune in (prune_attention_heads, prune_mlp_neurons):
        _, out = prune(config, params, fraction=0.5)
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(out))
        _, out16 = prune(config, bf16, fraction=0.5)
        assert {x.dtype for x in jax.tree.leaves(out16)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(np.testing.assert_array_equal, params, before)  # input untouched


def test_l1_score_selects_by_absolute_sum(configs, params_of):
    config = configs["llama-mha"]
    params = params_of(config)
    q = params["layers_0"]["attn"]["q_proj"]["kernel"]
    q[:, 0:8] = 0.0  # head 0: large L2 but small L1 (one spike)
    q[0, 0] = 30.0
    l2 = prune_attention_heads(config, params, fraction=0.25)[1]
    l1 = prune_attention_heads(config, params, fraction=0.25, score="l1")[1]
    assert np.asarray(l2["layers_0"]["attn"]["q_proj"]["kernel"])[0, 0] == 30.0  # kept by L2
    assert 30.0 not in np.asarray(l1["layers_0"]["attn"]["q_proj"]["kernel"])  # cut by L1


@pytest.mark.parametrize(
    ("name", "kind", "kwargs", "message"),
    [("llama-mha", "heads", {"fraction": 0.0}, r"fraction must be in \(0, 1\)"),
     ("llama-mha", "heads", {"fraction": 1.0}, r"fraction must be in \(0, 1\)"),
     ("llama-mha", "neurons", {"fraction": -0.5}, r"fraction must be in \(0, 1\)"),
     ("llama-gqa-3x3-bias", "heads", {"fraction": 0.1},
      r"fraction 0.1 removes 0 of 3 query heads per kv group; use fraction >= 0.1667"),
     ("llama-gqa-3x3-bias", "heads", {"fraction": 0.9},
      r"fraction 0.9 removes all 3 query heads per kv group; use a fraction below 0.8333"),
     ("llama-mha", "heads", {"fraction": 0.1},
      r"fraction 0.1 removes 0 of 4 attention heads; use fraction >= 0.125"),
     ("llama-mha", "heads", {"fraction": 0.9}, r"removes all 4 attention heads"),
     ("gpt2", "neurons", {"fraction": 0.01},
      r"fraction 0.01 removes 0 of 48 MLP neurons; use fraction >= 0.0105"),
     ("llama-mha", "heads", {"fraction": 0.5, "score": "taylor"},
      r"score must be one of \('l2', 'l1', 'act'\), got 'taylor'")],
)
def test_bad_options(name, kind, kwargs, message, configs):
    config = configs[name]
    prune = prune_attention_heads if kind == "heads" else prune_mlp_neurons
    with pytest.raises(ValueError, match=message):
        prune(config, {}, **kwargs)  # options are checked before the params are looked at
    with pytest.raises(ValueError, match=message):
        structured_config(config, kind, **kwargs)


def test_bad_kind_family_and_params(configs, params_of):
    config = configs["llama-mha"]
    with pytest.raises(ValueError, match=r"kind must be one of \('heads', 'neurons'\)"):
        structured_config(config, "layers", 0.5)
    other = copy.copy(config)
    object.__setattr__(other, "family", "t5")  # ModelConfig itself refuses unknown families
    with pytest.raises(ValueError,
                       match=r"supports families \('llama', 'gpt2', 'bert'\), not 't5'"):
        prune_attention_heads(other, {}, fraction=0.5)
    params = params_of(config)
    params["layers_1"]["attn"]["q_proj"]["kernel"] = LowRankWeight(u=jnp.ones((32, 2)),
                                                                  v=jnp.ones((2, 32)))
    with pytest.raises(ValueError, match="layers_1/attn/q_proj/kernel is a LowRankWeight; "
                                         "prune before quantizing"):
        prune_attention_heads(config, params, fraction=0.5)
    with pytest.raises(ValueError, match="layers_0/mlp/down_proj/kernel is missing"):
        prune_mlp_neurons(config, {"layers_0": {"mlp": {"gate_proj": {"kernel": np.ones((32, 40))},
                                                        "up_proj": {"kernel": np.ones((32, 40))}}}},
                          fraction=0.5)
    wrong = params_of(dataclasses.replace(config, num_heads=2, num_kv_heads=2))
    with pytest.raises(ValueError, match=r"layers_0/attn/q_proj/kernel has shape \(32, 16\), "
                                         r"expected 32 along axis 1"):
        prune_attention_heads(config, wrong, fraction=0.5)
