"""The int8 KV cache (ModelConfig.kv_cache="int8"): codes against numpy, decoding over the
cache equals the full forward with the same rounding (so perplexity under int8 measures
what decoding sees), storage, sharded generation, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import cli
from jaxopt_llm.generation import generate
from jaxopt_llm.models import ModelConfig, forward, init_cache, init_params
from jaxopt_llm.models.kv_cache import Int8Slots, cache_bytes, quantize
from jaxopt_llm.parallel import make_mesh, shard_params


def _config(family, kv_cache="int8"):
    return ModelConfig.tiny(family, vocab_size=96, num_layers=2, kv_cache=kv_cache,
                            max_position_embeddings=64, head_dim=16)


def _params(config):
    params = init_params(config, jax.random.key(0))
    return jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim == 2 else a, params)


def test_codes_and_scales_equal_numpy():
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 16)).astype(np.float32)
    x[0, 1, 2] = 0.0  # a zero vector: scale 0, codes 0
    codes, scale = quantize(jnp.asarray(x))
    absmax = np.abs(x).max(-1, keepdims=True)
    ref_scale = absmax / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref_codes = np.where(absmax > 0, np.rint(x * (np.float32(127) / absmax)), 0)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes.astype(np.int8))
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=3e-7)
    # dequantized within half a step of the original
    back = np.asarray(codes, np.float32) * np.asarray(scale)
    assert np.all(np.abs(back - x) <= 0.5 * ref_scale + 1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoding_over_the_int8_cache_equals_the_full_forward(family):
    """Prefill 7 tokens, then decode 4 one at a time over the int8 cache: each step's
    logits equal the no-cache forward of the whole sequence under kv_cache="int8", and
    differ from the float model's (the rounding is real)."""
    config = _config(family)
    params = _params(config)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 96, (2, 11)), jnp.int32)
    full = np.asarray(jax.jit(lambda p, t: forward(config, p, t)[0])(params, ids))
    float_full = np.asarray(forward(dataclasses.replace(config, kv_cache="float"), params,
                                    ids)[0])
    cache = init_cache(config, 2, 16)
    assert isinstance(cache[0][0], Int8Slots)
    valid = jnp.zeros((2, 16), bool).at[:, :7].set(True)
    step = jax.jit(lambda p, t, pos, v, c, i: forward(config, p, t, positions=pos,
                                                      key_valid=v, cache=c, cache_index=i))
    logits, cache = jax.jit(lambda p, t, v, c: forward(config, p, t, key_valid=v, cache=c)
                            )(params, ids[:, :7], valid, cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :7], rtol=1e-5, atol=1e-5)
    for t in range(7, 11):
        valid = valid.at[:, t].set(True)
        logits, cache = step(params, ids[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), valid,
                             cache, jnp.int32(t))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert np.abs(full - float_full).max() > 1e-4
    assert np.abs(full - float_full).max() < 0.05 * np.abs(float_full).max()


def test_storage_is_codes_plus_one_scale_per_token_and_head():
    config = _config("llama")
    cache = init_cache(config, 3, 40)
    per_side = 3 * 40 * config.num_kv_heads * (config.head_dim + 4)  # int8 codes + f32 scale
    assert cache_bytes(cache) == config.num_layers * 2 * per_side
    float_cache = init_cache(dataclasses.replace(config, kv_cache="float"), 3, 40)
    assert cache_bytes(float_cache) == config.num_layers * 2 * 3 * 40 * 2 * 16 * 4
    result = generate(config, _params(config), [[1, 2, 3]], max_new_tokens=3,
                      eos_token_ids=(-1,))
    assert result.kv_cache_bytes > 0 and len(result.new_ids[0]) == 3


def test_sharded_generation_with_an_int8_cache_equals_one_device():
    config = ModelConfig(family="llama", model_type="llama", vocab_size=128, hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
                         head_dim=8, max_position_embeddings=64, kv_cache="int8")
    params = _params(config)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [3, 4, 5, 6, 7]]
    single = generate(config, params, prompts, max_new_tokens=5, eos_token_ids=(-1,))
    mesh = make_mesh("data=2,model=4")
    on_mesh = generate(config, shard_params(config, params, mesh), prompts, max_new_tokens=5,
                       eos_token_ids=(-1,), mesh=mesh)
    assert on_mesh.new_ids == single.new_ids


def test_bad_kv_cache_is_one_clear_error(capsys):
    with pytest.raises(ValueError, match="config kv_cache must be one of float, int8, got "
                                         "'int4'"):
        ModelConfig.tiny(kv_cache="int4")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", "smollm2-135m", "--prompt", "x", "--kv-cache", "int4"])
    assert "argument --kv-cache: invalid choice: 'int4'" in capsys.readouterr().err
