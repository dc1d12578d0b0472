"""Calibration statistics: block-by-block execution equals the whole model, the sums equal
numpy's, layer-sequential statistics see the compressed blocks before them, and a mesh
gives what one device gives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.calibration import (
    Calibration,
    calibration_windows,
    default_calibration,
    layer_sequential,
    linear_statistics,
)
from jaxopt_llm.models import ModelConfig, forward, init_params
from jaxopt_llm.models.layers import Linear
from jaxopt_llm.parallel import make_mesh
from jaxopt_llm.placement import Placement

LLAMA = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=32,
                    intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_position_embeddings=64, qkv_bias=True)
GPT2 = ModelConfig(family="gpt2", model_type="gpt2", vocab_size=64, hidden_size=32,
                   intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                   max_position_embeddings=64, tie_word_embeddings=True, qkv_bias=True,
                   o_bias=True, mlp_bias=True)
WINDOWS = np.random.default_rng(0).integers(0, 64, (6, 16)).astype(np.int32)


def _params(config, seed=0):
    params = init_params(config, jax.random.key(seed))
    return jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim == 2 else a, params)


def _inputs_from_the_whole_model(config, params, windows):
    """Every Linear's input while running the full model (a different code path)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear):
            seen["/".join(context.module.path)] = np.asarray(args[0], np.float64)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        forward(config, params, jnp.asarray(windows))
    return seen


def _numpy_stats(x):
    x2 = x.reshape(-1, x.shape[-1])
    return {"gram": x2.T @ x2, "total": x2.sum(0), "abs_total": np.abs(x2).sum(0),
            "abs_max": np.abs(x2).max(0)}


def _assert_stats(stats, x, rtol=2e-5):
    want = _numpy_stats(x)
    assert stats.tokens == x.shape[0] * x.shape[1]
    scale = np.abs(want["gram"]).max()
    np.testing.assert_allclose(np.asarray(stats.gram), want["gram"], atol=rtol * scale)
    for name in ("total", "abs_total", "abs_max"):
        np.testing.assert_allclose(np.asarray(getattr(stats, name)), want[name], rtol=rtol,
                                   atol=rtol * np.abs(want[name]).max())
    x2 = x.reshape(-1, x.shape[-1])
    np.testing.assert_allclose(np.asarray(stats.norm), np.linalg.norm(x2, axis=0), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(stats.variance), x2.var(0, ddof=1), rtol=1e-3,
                               atol=1e-4 * x2.var(0).max())


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_statistics_equal_numpy_over_the_whole_models_inputs(config):
    params = _params(config)
    stats = linear_statistics(config, params, Calibration(windows=WINDOWS, batch_size=4))
    expected = _inputs_from_the_whole_model(config, params, WINDOWS)
    block_linears = {k: v for k, v in expected.items() if "/" in k and k.split("/")[0] != "lm_head"}
    assert set(stats) == set(block_linears)
    for name, x in block_linears.items():
        _assert_stats(stats[name], x)


def test_layer_sequential_blocks_see_the_compressed_blocks_before_them():
    params = _params(LLAMA)
    seen = {}

    def halve_every_kernel(context):
        seen[context.index] = context.stats
        return jax.tree_util.tree_map(lambda a: a * 0.5 if a.ndim == 2 else a, context.params)

    new = layer_sequential(LLAMA, params, Calibration(windows=WINDOWS, batch_size=4),
                           halve_every_kernel)
    for i in range(LLAMA.num_layers):  # what the compressed model feeds block i
        model = dict(params)
        for j in range(i):
            model[f"layers_{j}"] = new[f"layers_{j}"]
        expected = _inputs_from_the_whole_model(LLAMA, model, WINDOWS)
        for name in ("attn/q_proj", "attn/o_proj", "mlp/up_proj", "mlp/down_proj"):
            _assert_stats(seen[i][name], expected[f"layers_{i}/{name}"])
    np.testing.assert_array_equal(np.asarray(new["layers_2"]["mlp"]["down_proj"]["kernel"]),
                                  np.asarray(params["layers_2"]["mlp"]["down_proj"]["kernel"])
                                  * 0.5)


def test_mesh_statistics_equal_one_device():
    params = _params(LLAMA)
    single = linear_statistics(LLAMA, params, Calibration(windows=WINDOWS, batch_size=2))
    placement = Placement.on_mesh(make_mesh("data=2,model=1"))
    sharded = linear_statistics(LLAMA, params, Calibration(windows=WINDOWS, batch_size=2,
                                                            placement=placement))
    for name, stats in single.items():
        np.testing.assert_allclose(np.asarray(sharded[name].gram), np.asarray(stats.gram),
                                   rtol=1e-5, atol=1e-5 * float(jnp.abs(stats.gram).max()))
        np.testing.assert_allclose(np.asarray(sharded[name].abs_max), np.asarray(stats.abs_max),
                                   rtol=1e-6)
    with pytest.raises(ValueError, match=r"5 windows cannot be spread evenly over data=2"):
        linear_statistics(LLAMA, params, Calibration(windows=WINDOWS[:5], placement=placement))


def test_windows_and_bad_input(word_tokenizer):
    ids = np.arange(100)
    np.testing.assert_array_equal(calibration_windows(ids, window=16, skip=10, max_windows=3),
                                  np.arange(10, 58).reshape(3, 16))
    assert calibration_windows(ids, window=16, num_tokens=40).shape == (2, 16)
    with pytest.raises(ValueError, match=r"at least one window of 512 tokens, the "
                                         r"calibration text has 100"):
        calibration_windows(ids)
    with pytest.raises(ValueError, match=r"num_tokens=0: must be a positive integer"):
        calibration_windows(ids, num_tokens=0)
    with pytest.raises(ValueError, match=r"num_tokens=100: calibration needs at least one "
                                         r"window of 512 tokens"):
        calibration_windows(np.arange(2000), num_tokens=100)
    with pytest.raises(ValueError, match=r"window=-1: must be a positive integer"):
        calibration_windows(ids, window=-1)
    with pytest.raises(ValueError, match=r"text: calibration text is empty"):
        default_calibration(word_tokenizer, text="  \n")
    with pytest.raises(ValueError, match=r"the calibration text has 2; give more"):
        default_calibration(word_tokenizer, text="hello world")
    with pytest.raises(ValueError, match=r"calibration windows must be a \(windows, tokens\)"):
        Calibration(windows=np.zeros((0, 16), np.int32))
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        Calibration(windows=WINDOWS, batch_size=0)
