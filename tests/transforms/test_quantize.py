"""The quantize op in recipes against hand-written round-to-nearest references: kernels,
embedding tables (a tied one inside a model) and partial groups."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_helpers import KERNELS, jit_run, make_recipe, make_stage, mini_tree, rtn_reference

from jaxopt_llm.models import build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.tree import flatten
from jaxopt_llm.weights import QuantizedWeight, materialize, param_bytes


def test_partial_groups_opt_in_against_reference():
    """group_size 5 divides none of 16, 8, 12: the last group of each kernel is shorter."""
    params = mini_tree()
    ((after, dense),) = jit_run(make_stage(rule(BLOCK_LINEARS, "quantize", bits=4, symmetric=False,
                                                group_size=5, partial_groups=True)), params=params)
    before = flatten(params)
    for path in KERNELS:
        leaf, w = after[path], np.asarray(before[path])
        assert isinstance(leaf, QuantizedWeight)
        assert leaf.scale.shape == (-(-w.shape[0] // 5), w.shape[1])
        assert leaf.scale.dtype == jnp.float16  # group scales default to float16
        reference = np.concatenate([
            rtn_reference(w[start:start + 5], 4, False, 0, scale_dtype=np.float16)
            for start in range(0, w.shape[0], 5)])
        np.testing.assert_allclose(dense[path], reference, rtol=0, atol=1e-6)


def test_quantize_kernels_and_embeddings_against_reference():
    """Kernels along their inputs (axis 0), tables (path ending 'embedding') along D (axis 1)."""
    params = mini_tree()
    variants = [(8, True), (4, False)]
    stages = [make_stage(rule(BLOCK_LINEARS, "quantize", bits=b, symmetric=sym),
                         rule(r"(.*/)?embedding", "quantize", bits=b, symmetric=sym))
              for b, sym in variants]
    before = flatten(params)
    for (bits, symmetric), (after, dense) in zip(variants, jit_run(*stages, params=params),
                                                 strict=True):
        for path in [*KERNELS, "embed_tokens/embedding"]:
            leaf, w = after[path], np.asarray(before[path])
            axis = 1 if path.endswith("embedding") else 0
            assert isinstance(leaf, QuantizedWeight) and (leaf.axis, leaf.bits) == (axis, bits)
            # one scale per output channel (kernel) / per table row (embedding)
            assert leaf.scale.shape == ((w.shape[0], 1) if axis else (1, w.shape[1]))
            np.testing.assert_allclose(dense[path], rtn_reference(w, bits, symmetric, axis),
                                       rtol=0, atol=1e-6)
        for path in ("layers_0/input_norm/scale", "layers_0/mlp/up_proj/bias", "norm/scale"):
            np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]))


@pytest.fixture(scope="module")
def tiny_llama(tiny_config):
    """A one-layer Llama with a tied (48, 32) embedding table."""
    return tiny_config(vocab_size=48, intermediate_size=64, num_layers=1,
                       max_position_embeddings=32, tie_word_embeddings=True)


def _model_inputs(batch=2, length=6, vocab=48):
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, vocab, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return tokens, positions, attention_mask(jnp.ones((batch, length), bool), 0, length)


def test_quantized_tied_embedding_equals_materialized_table(tiny_llama, random_params):
    params = jax.tree.map(jnp.asarray, random_params(tiny_llama, std=0.2))
    recipe = make_recipe(make_stage(rule(r"(.*/)?embedding", "quantize", bits=4, symmetric=False,
                                         group_size=8)))
    config, out = recipe(tiny_llama, params)
    assert config == tiny_llama
    table = out["embed_tokens"]["embedding"]
    assert isinstance(table, QuantizedWeight) and table.axis == 1
    assert table.scale.shape == (48, 4)  # (V, D/8) groups along the feature dim
    assert param_bytes(table) < param_bytes(params["embed_tokens"]["embedding"]) / 4
    model = build_model(config)

    @jax.jit
    def both(p, dense_table):
        dense = {**p, "embed_tokens": {"embedding": dense_table}}
        return (model.apply({"params": p}, *_model_inputs())[0],
                model.apply({"params": dense}, *_model_inputs())[0])

    dense_table = materialize(table)
    assert dense_table.shape == (48, 32)
    assert not np.array_equal(np.asarray(dense_table),
                              np.asarray(params["embed_tokens"]["embedding"]))
    ours, ref = both(out, dense_table)
    assert ours.shape == (2, 6, 48)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
