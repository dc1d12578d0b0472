"""Generation: sampling filters vs numpy, KV-cache decoding vs full forward, no recompiles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_llm.generation as gen
from jaxopt_llm.models import ModelConfig, build_model
from jaxopt_llm.models.attention import attention_mask

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=32,
                     intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     max_position_embeddings=256, eos_token_ids=(3,))


@pytest.fixture(scope="module")
def params():
    model = build_model(CONFIG)
    mask = attention_mask(jnp.ones((1, 4), bool), 0, 4)
    tokens = jnp.zeros((1, 4), jnp.int32)
    variables = model.init(jax.random.PRNGKey(1), tokens, tokens, mask)
    # scale up so logits are peaked and greedy choices are far from ties
    return jax.tree_util.tree_map(lambda p: p * 4.0, variables["params"])


def _full_logits(params, ids):
    length = len(ids)
    mask = attention_mask(jnp.ones((1, length), bool), 0, length)
    logits, _ = build_model(CONFIG).apply({"params": params}, jnp.asarray([ids]),
                                          jnp.arange(length)[None], mask)
    return np.asarray(logits[0])


def test_greedy_decode_equals_argmax_of_full_forward(params):
    prompt = [5, 9, 11, 2, 40]
    result = gen.generate(CONFIG, params, [prompt], max_new_tokens=10, eos_token_ids=[-1])
    sequence = prompt + result.new_ids[0]
    # reference: one cache-free forward over the whole sequence; greedy means every
    # generated token is the argmax given everything before it
    logits = _full_logits(params, sequence)
    expected = np.argmax(logits[len(prompt) - 1:-1], axis=-1).tolist()
    assert result.new_ids[0] == expected


def test_padded_batch_equals_single_prompts(params):
    prompts = [[5, 9, 11, 2, 40, 7, 8, 1, 30], [12], [33, 34]]
    batched = gen.generate(CONFIG, params, prompts, max_new_tokens=8, eos_token_ids=[-1])
    for prompt, ids in zip(prompts, batched.new_ids, strict=True):
        single = gen.generate(CONFIG, params, [prompt], max_new_tokens=8, eos_token_ids=[-1])
        assert ids == single.new_ids[0]


def test_eos_stops_each_row(params):
    prompt = [5, 9, 11]
    free = gen.generate(CONFIG, params, [prompt], max_new_tokens=6, eos_token_ids=[-1])
    eos = free.new_ids[0][2]  # pretend the third generated token is EOS
    stopped = gen.generate(CONFIG, params, [prompt], max_new_tokens=6, eos_token_ids=[eos])
    first = free.new_ids[0].index(eos)
    assert stopped.new_ids[0] == free.new_ids[0][: first + 1]


def test_no_recompilation_within_a_bucket(params):
    first = gen.generate(CONFIG, params, [[1, 2, 3]], max_new_tokens=5)
    count = gen.compiled_program_count()
    for prompt, new in (([4, 5, 6, 7, 8, 9], 20), ([10] * 16, 3), ([7], 64)):
        again = gen.generate(CONFIG, params, [prompt], max_new_tokens=new)
        assert again.compile_seconds == 0.0
    assert gen.compiled_program_count() == count
    # a new bucket compiles once, and its first call reports that compile time
    other = gen.generate(CONFIG, params, [[1] * 17], max_new_tokens=5)
    assert other.compile_seconds > 0.0 and gen.compiled_program_count() == count + 1
    assert first.new_ids  # the first call produced tokens too


def _numpy_filter(logits, temperature, top_k, top_p):
    """Reference: which tokens may be sampled."""
    z = logits / temperature
    allowed = np.ones_like(z, bool)
    if top_k:
        allowed &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1.0:
        order = np.argsort(-z)
        probs = np.exp(z[order] - z.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep = np.zeros_like(allowed)
        keep[order[before < top_p]] = True
        allowed &= keep
    return allowed


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (3, 1.0), (0, 0.6), (5, 0.8)])
def test_sampling_filters_match_numpy(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(1, 40)).astype(np.float32) * 2
    sampling = gen.Sampling(temperature=0.7, top_k=top_k, top_p=top_p)
    allowed = _numpy_filter(logits[0], 0.7, top_k, top_p)
    sample = jax.jit(lambda k: gen.sample_logits(jnp.asarray(logits), k, sampling))
    seen = {int(sample(key)[0]) for key in jax.random.split(jax.random.PRNGKey(0), 400)}
    assert seen <= set(np.flatnonzero(allowed))
    assert len(seen) >= min(3, allowed.sum())  # it really samples, not argmax


def test_sampling_is_reproducible_with_seed(params):
    sampling = gen.Sampling(temperature=1.0, top_k=20)
    a = gen.generate(CONFIG, params, [[1, 2]], max_new_tokens=12, sampling=sampling, seed=7)
    b = gen.generate(CONFIG, params, [[1, 2]], max_new_tokens=12, sampling=sampling, seed=7)
    assert a.new_ids == b.new_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"temperature": -1.0}, "temperature must be a finite number >= 0"),
     ({"top_k": -2}, "top_k must be >= 0"),
     ({"top_p": 0.0}, "top_p must be in")],
)
def test_bad_sampling(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gen.Sampling(**kwargs)


def test_bad_generate_inputs(params):
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        gen.generate(CONFIG, params, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        gen.generate(CONFIG, params, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate(CONFIG, params, [[]], max_new_tokens=1)
    small = dataclasses.replace(CONFIG, max_position_embeddings=8)
    with pytest.raises(ValueError, match="context of 8 tokens"):
        gen.generate(small, params, [[1] * 9], max_new_tokens=1)


def test_bfloat16_weights_decode_with_a_bfloat16_cache():
    """A bf16 model keeps its activations in bf16 through decode (a float32 cache would
    promote the residual stream, and every later matmul, to float32)."""
    from jaxopt_llm.generation import activation_dtype
    from tests.test_parallel import CONFIG as PCONFIG
    from tests.test_parallel import _params as parallel_params

    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), parallel_params())
    assert activation_dtype(PCONFIG, params) == jnp.bfloat16
    assert activation_dtype(PCONFIG, parallel_params()) == jnp.float32
    out = gen.generate(PCONFIG, params, [[5, 6, 7]], max_new_tokens=4, eos_token_ids=(-1,))
    assert len(out.new_ids[0]) == 4
