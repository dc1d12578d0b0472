"""The shared test helpers of tests/conftest.py do what the tests rely on them for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.io.params import expected_shapes
from jaxopt_llm.tree import flatten


def test_count_compiles_counts_each_new_shape_once(count_compiles):
    @jax.jit
    def double(x):
        return x * 2

    with count_compiles() as compiles:
        double(jnp.ones(3, jnp.float32))
        double(jnp.ones(3, jnp.float32))  # same shape and dtype: the cached executable
    assert compiles["double"] == 1
    with count_compiles() as compiles:
        double(jnp.ones(3, jnp.float32))  # still cached: nothing to compile
    assert compiles["double"] == 0
    with count_compiles() as compiles:
        double(jnp.ones(4, jnp.float32))  # a new shape is a recompile
    assert compiles["double"] == 1


def test_count_compiles_two_shapes_inside_one_block(count_compiles):
    @jax.jit
    def triple(x):
        return x * 3

    with count_compiles() as compiles:
        triple(jnp.ones(5, jnp.float32))
        triple(jnp.ones(5, jnp.float32))
        assert compiles["triple"] == 1
        triple(jnp.ones(6, jnp.float32))
    assert compiles["triple"] == 2
    assert compiles["other"] == 0  # names are counted apart
    assert compiles.total >= 2


def test_count_compiles_stops_listening_after_the_block(count_compiles):
    @jax.jit
    def negate(x):
        return -x

    with count_compiles() as compiles:
        pass
    negate(jnp.ones(7, jnp.float32))
    assert compiles["negate"] == 0 and compiles.total == 0


def test_tiny_config_overrides_and_families(tiny_config, tiny_llama_config, tiny_gpt2_config):
    assert tiny_llama_config == tiny_config("llama")
    assert (tiny_llama_config.num_heads, tiny_llama_config.num_kv_heads) == (4, 2)
    assert tiny_gpt2_config.family == tiny_gpt2_config.model_type == "gpt2"
    assert tiny_gpt2_config.num_heads == tiny_gpt2_config.num_kv_heads
    config = tiny_config(vocab_size=48, tie_word_embeddings=True, eos_token_ids=(2,))
    assert (config.vocab_size, config.tie_word_embeddings, config.eos_token_ids) == \
        (48, True, (2,))
    assert config.hidden_size == tiny_llama_config.hidden_size
    with pytest.raises(ValueError, match="num_heads=4 must be a multiple of num_kv_heads=3"):
        tiny_config(num_kv_heads=3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_params_have_the_loader_shapes(family, tiny_config, tiny_params, random_params):
    config = tiny_config(family)
    expected = expected_shapes(config)
    # hand-computed: hidden 32, 4 heads of 8 (Llama: 2 kv heads), MLP 48, vocab 64
    hand = ({"embed_tokens/embedding": (64, 32), "layers_1/attn/k_proj/kernel": (32, 16),
             "layers_0/mlp/gate_proj/kernel": (32, 48)} if family == "llama" else
            {"wte/embedding": (64, 32), "wpe/embedding": (64, 32),
             "h_1/attn/c_attn/kernel": (32, 96), "h_0/mlp/c_fc/bias": (48,)})
    assert hand.items() <= expected.items()
    initialised = tiny_params(config)
    assert {k: tuple(v.shape) for k, v in flatten(initialised).items()} == expected
    random = random_params(config, seed=3, std=0.5)
    assert {k: v.shape for k, v in flatten(random).items()} == expected
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32
               for v in flatten(random).values())
    # scale multiplies the 2-D weights only; seeds give different draws
    scaled = flatten(tiny_params(config, scale=3.0))
    for path, value in flatten(initialised).items():
        factor = 3.0 if value.ndim == 2 else 1.0
        np.testing.assert_array_equal(np.asarray(scaled[path]), np.asarray(value) * factor)
    other = flatten(random_params(config, seed=4, std=0.5))
    assert all(not np.array_equal(other[k], v) for k, v in flatten(random).items())

