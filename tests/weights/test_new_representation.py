"""A new weight representation is one class in one file: this one is defined here, in the
test alone, and runs through evaluation, generation, a (data=2, model=2) mesh and an
artifact round trip without any library module knowing about it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxopt_llm import tree
from jaxopt_llm.evaluate import perplexity
from jaxopt_llm.generation import generate
from jaxopt_llm.io.artifact import load_artifact, save_artifact
from jaxopt_llm.models import ModelConfig, build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.parallel import make_mesh, param_specs, shard_params
from jaxopt_llm.weights import WeightLeaf, materialize, param_bytes

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=32,
                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, max_position_embeddings=64, bos_token_id=1, eos_token_ids=(2,))


@struct.dataclass
class HalfColumnWeight(WeightLeaf):
    """Test-only representation: float16 values (K, N) times float32 column scales (1, N)."""

    values: jax.Array
    column_scale: jax.Array

    def materialize(self) -> jax.Array:
        return self.values.astype(jnp.float32) * self.column_scale


def _to_half_column(w: jax.Array) -> HalfColumnWeight:
    scale = jnp.max(jnp.abs(w), axis=0, keepdims=True)  # (1, N)
    return HalfColumnWeight(values=(w / scale).astype(jnp.float16), column_scale=scale)


@pytest.fixture(scope="module")
def models():
    tokens = jnp.zeros((1, 4), jnp.int32)
    mask = attention_mask(jnp.ones((1, 4), bool), 0, 4)
    params = build_model(CONFIG).init(jax.random.key(0), tokens, tokens, mask)["params"]
    params = jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim == 2 else a, params)
    typed = tree.map_flat(
        lambda path, leaf: _to_half_column(leaf)
        if re.fullmatch(r"layers_\d+/.*/kernel", path) else leaf, params)
    return typed, materialize(typed)


def test_bytes_are_the_leafs_own(models):
    typed, dense = models
    k, n = CONFIG.hidden_size, CONFIG.num_heads * CONFIG.head_dim
    q = tree.flatten(typed)["layers_0/attn/q_proj/kernel"]
    assert param_bytes(q) == k * n * 2 + n * 4
    assert param_bytes(typed) < param_bytes(dense)


def test_eval_and_generate_equal_the_materialized_model(models):
    typed, dense = models
    ids = np.asarray(jax.random.randint(jax.random.key(1), (256,), 0, CONFIG.vocab_size))
    got = perplexity(CONFIG, typed, ids, num_tokens=256, window=32)
    want = perplexity(CONFIG, dense, ids, num_tokens=256, window=32)
    np.testing.assert_allclose(got.ppl, want.ppl, rtol=1e-6)
    prompts = [[5, 9, 3, 7], [11, 4]]
    a = generate(CONFIG, typed, prompts, max_new_tokens=6, eos_token_ids=())
    b = generate(CONFIG, dense, prompts, max_new_tokens=6, eos_token_ids=())
    assert a.new_ids == b.new_ids


def test_runs_sharded_on_a_data2_model2_mesh(models):
    typed, _ = models
    mesh = make_mesh("data=2,model=2")
    specs = tree.flatten(param_specs(CONFIG, typed, mesh))
    # the default layout of a leaf: (rows, cols) arrays like the dense weight; the (1, N)
    # scales of a column-parallel kernel shard their N, a row-parallel one's stay whole
    q, o = specs["layers_0/attn/q_proj/kernel"], specs["layers_0/attn/o_proj/kernel"]
    assert q.values == jax.sharding.PartitionSpec(None, "model")
    assert q.column_scale == jax.sharding.PartitionSpec(None, "model")
    assert o.values == jax.sharding.PartitionSpec("model")
    assert o.column_scale == jax.sharding.PartitionSpec()
    sharded = shard_params(CONFIG, typed, mesh)
    ids = np.asarray(jax.random.randint(jax.random.key(2), (256,), 0, CONFIG.vocab_size))
    single = perplexity(CONFIG, typed, ids, num_tokens=256, window=32, batch_size=2)
    on_mesh = perplexity(CONFIG, sharded, ids, num_tokens=256, window=32, batch_size=2,
                         mesh=mesh)
    np.testing.assert_allclose(on_mesh.ppl, single.ppl, rtol=1e-6)
    prompts = [[5, 9, 3, 7], [11, 4]]
    assert generate(CONFIG, sharded, prompts, max_new_tokens=5, eos_token_ids=(),
                    mesh=mesh).new_ids == generate(CONFIG, typed, prompts, max_new_tokens=5,
                                                   eos_token_ids=()).new_ids


def test_artifact_round_trip(models, tmp_path):
    typed, _ = models
    save_artifact(tmp_path / "art", config=CONFIG, params=typed, tokenizer=None, recipe=None)
    params = load_artifact(tmp_path / "art").params
    leaf = tree.flatten(params)["layers_1/mlp/down_proj/kernel"]
    assert type(leaf) is HalfColumnWeight
    original = tree.flatten(typed)["layers_1/mlp/down_proj/kernel"]
    assert leaf.values.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(leaf.values), np.asarray(original.values))
    np.testing.assert_array_equal(np.asarray(leaf.column_scale),
                                  np.asarray(original.column_scale))
    assert param_bytes(params) == param_bytes(typed)
