"""FamilySpec against the real parameter trees of tiny models, and the shared forward
against a hand-built call of the Flax module."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.models import ModelConfig, build_model, family_spec, forward, init_params
from jaxopt_llm.models.family import FAMILIES, blocks_regex
from jaxopt_llm.recipes import ATTENTION, MLP
from jaxopt_llm.tree import flatten

CONFIGS = {
    "llama": ModelConfig(family="llama", model_type="llama", vocab_size=40, hidden_size=16,
                         intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=4, max_position_embeddings=32, qkv_bias=True,
                         mlp_bias=True, sliding_window=5),
    "gpt2": ModelConfig(family="gpt2", model_type="gpt2", vocab_size=40, hidden_size=16,
                        intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=4,
                        head_dim=4, max_position_embeddings=32),
    "bert": ModelConfig(family="bert", model_type="bert", vocab_size=40, hidden_size=16,
                        intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=4,
                        head_dim=4, max_position_embeddings=32, type_vocab_size=2),
}
DECODERS = [family for family in CONFIGS if not CONFIGS[family].is_encoder]


def test_every_family_has_a_test_config():
    assert set(FAMILIES) == set(CONFIGS)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_spec_paths_exist_with_the_shapes_the_spec_implies(family):
    config = CONFIGS[family]
    spec = family_spec(config)
    flat = flatten(init_params(config, jax.random.key(0)))
    hidden, heads, kv_heads, hd = (config.hidden_size, config.num_heads, config.num_kv_heads,
                                   config.head_dim)
    assert flat[spec.embedding].shape == (config.vocab_size, hidden)
    if spec.position_table is not None:
        assert flat[spec.position_table].shape == (config.max_position_embeddings, hidden)
    widths = {"q": heads * hd, "k": kv_heads * hd, "v": kv_heads * hd}
    for i in range(config.num_layers):
        attn = f"{spec.block(i)}/{spec.attention}"
        assert re.fullmatch(spec.block_regex, spec.block(i))
        for projection in spec.qkv:
            width = sum(widths[p] for p in projection.parts)
            assert flat[f"{attn}/{projection.name}/kernel"].shape == (hidden, width)
        assert flat[f"{attn}/{spec.attn_out}/kernel"].shape == (heads * hd, hidden)
        mlp = f"{spec.block(i)}/{spec.mlp}"
        for name in spec.mlp_in:
            assert flat[f"{mlp}/{name}/kernel"].shape == (hidden, config.intermediate_size)
        assert flat[f"{mlp}/{spec.mlp_out}/kernel"].shape == (config.intermediate_size, hidden)
    # every default shard rule lays out at least one parameter
    for pattern, _ in spec.shard_rules:
        if pattern == "lm_head/kernel" and config.tie_word_embeddings:
            continue
        assert any(re.fullmatch(pattern, path) for path in flat), pattern


@pytest.mark.parametrize("family", list(CONFIGS))
def test_recipe_regexes_select_exactly_the_attention_and_mlp_blocks(family):
    config = CONFIGS[family]
    spec = family_spec(config)
    paths = list(flatten(init_params(config, jax.random.key(0))))
    for regex, scope in ((ATTENTION, spec.attention), (MLP, spec.mlp)):
        expected = {p for p in paths for i in range(config.num_layers)
                    if p.startswith(f"{spec.block(i)}/{scope}/")}
        assert expected and {p for p in paths if re.fullmatch(regex, p)} == expected
    assert ATTENTION == blocks_regex("attention") == r"(layers|h|layer)_\d+/attn/.*"


@pytest.mark.parametrize("family", list(CONFIGS))
def test_activation_dtype_is_the_token_tables(family):
    config = CONFIGS[family]
    spec = family_spec(config)
    params = init_params(config, jax.random.key(0))
    assert spec.activation_dtype(params) == jnp.float32
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    assert spec.activation_dtype(bf16) == jnp.bfloat16
    if spec.position_table is not None:  # a bf16 position table alone changes nothing
        table, leaf = spec.position_table.split("/")
        only_positions = {**params, table: {leaf: bf16[table][leaf]}}
        assert spec.activation_dtype(only_positions) == jnp.float32
    assert spec.activation_dtype({}) == jnp.float32


def test_unknown_family_is_a_clear_error():
    import copy

    other = copy.copy(CONFIGS["llama"])
    object.__setattr__(other, "family", "t5")  # ModelConfig itself refuses unknown families
    with pytest.raises(ValueError,
                       match=r"unknown family 't5'; supported: \('llama', 'gpt2', 'bert'\)"):
        family_spec(other)


@pytest.mark.parametrize("family", DECODERS)
def test_forward_equals_the_module_called_by_hand(family):
    """Default positions 0..T-1 and a causal (sliding-window) mask, built here with numpy;
    with a cache, the given key_valid and cache_index."""
    config = CONFIGS[family]
    params = jax.tree_util.tree_map(lambda a: a * 3.0, init_params(config, jax.random.key(1)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 9)), jnp.int32)
    query, key = np.arange(9)[:, None], np.arange(9)[None, :]
    allowed = key <= query
    if config.sliding_window is not None:
        allowed &= query - key < config.sliding_window
    mask = jnp.asarray(np.broadcast_to(allowed, (2, 9, 9)))
    positions = jnp.asarray(np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9)))
    expected, _ = build_model(config).apply({"params": params}, tokens, positions, mask)
    got, cache = forward(config, params, tokens)
    assert cache is None
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    last, _ = forward(config, params, tokens, last_only=True)
    # the head of 2 rows runs the native decode GEMV on CPU, the full one XLA's matmul: the
    # same products summed in another order
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(expected[:, -1]),
                               rtol=1e-5, atol=1e-5)
    # one decode step at slot 9 of a 12-slot cache after prefilling 9 tokens
    from jaxopt_llm.models import init_cache

    key_valid = jnp.asarray(np.arange(12)[None, :].repeat(2, 0) < 9)
    _, cache = forward(config, params, tokens, key_valid=key_valid,
                       cache=init_cache(config, 2, 12))
    step_valid = key_valid.at[:, 9].set(True)
    nxt = tokens[:, :1]
    step, _ = forward(config, params, nxt, positions=jnp.full((2, 1), 9, jnp.int32),
                      key_valid=step_valid, cache=cache, cache_index=9)
    whole, _ = forward(config, params, jnp.concatenate([tokens, nxt], axis=1))
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(whole[:, -1]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key_valid is required with a cache"):
        forward(config, params, nxt, cache=cache, cache_index=9)


@pytest.mark.parametrize("layers", [1, 3, 12])
@pytest.mark.parametrize(("family", "overrides"), [
    ("llama", {}), ("llama", {"tie_word_embeddings": True, "qkv_bias": True, "o_bias": True}),
    ("gpt2", {}), ("bert", {}), ("llama", {"model_type": "qwen2", "qkv_bias": True}),
    ("llama", {"mlp_bias": True}),
])
def test_param_shapes_equal_tracing_every_layer(family, overrides, layers):
    """`param_shapes` traces one layer and repeats it; tracing all of them gives the same
    tree (paths, order, shapes, dtypes), and callers get their own containers."""
    from jaxopt_llm.models import param_shapes

    config = ModelConfig.tiny(family, num_layers=layers, **overrides)
    traced = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    got = param_shapes(config)
    assert list(got) == list(traced)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(traced)
    assert jax.tree_util.tree_leaves(got) == jax.tree_util.tree_leaves(traced)
    first, second = family_spec(config).block(0), family_spec(config).block(1)
    got[first]["extra"] = 1
    assert "extra" not in param_shapes(config)[first]
    if layers > 1:
        assert "extra" not in got[second]
