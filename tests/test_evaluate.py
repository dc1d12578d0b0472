"""Perplexity protocol vs a hand computation from HF torch logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxopt_llm.evaluate import perplexity, row_logsumexp  # noqa: E402
from jaxopt_llm.io.hf import load_hf_directory  # noqa: E402
from jaxopt_llm.weights import param_bytes  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    config, params = load_hf_directory(directory)
    return model, config, params


@pytest.mark.parametrize(("num_tokens", "window", "batch_size"),
                         [(100, 16, 1), (64, 32, 2), (1000, 20, 3)])
def test_perplexity_matches_hand_computation(tiny, num_tokens, window, batch_size):
    model, config, params = tiny
    ids = np.random.default_rng(1).integers(0, 50, 300)
    result = perplexity(config, params, ids, num_tokens=num_tokens, window=window,
                        batch_size=batch_size)
    windows = min(num_tokens, len(ids)) // window  # floored to whole windows
    nll, scored = 0.0, 0
    for w in range(windows):
        chunk = torch.tensor(ids[w * window:(w + 1) * window])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk).logits[0, :-1].double(), dim=-1)
        nll -= logp[torch.arange(window - 1), chunk[0, 1:]].sum().item()
        scored += window - 1
    assert result.windows == windows and result.tokens_scored == scored
    assert result.tokens_used == windows * window
    assert result.ppl == pytest.approx(math.exp(nll / scored), rel=1e-5)


def test_param_bytes_counts_float32(tiny):
    model, _, params = tiny
    expected = sum(p.numel() * 4 for p in model.parameters())  # tied head counted once
    assert param_bytes(params) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_tokens": 0}, "num_tokens=0: must be positive"),
     ({"num_tokens": -5}, "num_tokens=-5: must be positive"),
     ({"window": 0}, "window=0: must be at least 2"),
     ({"window": 1000}, "window=1000: exceeds the model's context of 64"),
     ({"window": 40}, "window=40: the text has 30 tokens, fewer than one window")],
)
def test_bad_eval_arguments(tiny, kwargs, message):
    _, config, params = tiny
    ids = np.arange(30) % 50
    with pytest.raises(ValueError, match=message):
        perplexity(config, params, ids, **kwargs)


@pytest.mark.parametrize("rows", [1, 7, 8, 13])
def test_row_logsumexp_matches_numpy(rows):
    """Row-chunked logsumexp (any row count, not only multiples of its chunk) against a
    float64 numpy reference, with logits large enough to overflow an unshifted exp."""
    x = np.random.default_rng(rows).normal(size=(rows, 1000)) * 30 + 500
    peak = x.max(-1, keepdims=True)
    want = np.log(np.exp(x - peak).sum(-1)) + peak[:, 0]
    got = jax.jit(row_logsumexp)(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    hidden = jnp.full((rows, 5), -jnp.inf).at[0, 1].set(2.0)  # all -inf rows stay -inf
    got = np.asarray(jax.jit(row_logsumexp)(hidden))
    assert got[0] == np.float32(2.0) and np.all(got[1:] == -np.inf)


def test_window_nll_is_the_same_with_and_without_row_chunks(tmp_path):
    """The CPU row-chunked logsumexp and the one-shot one give the same window NLLs."""
    from jaxopt_llm.evaluate import window_nll
    from jaxopt_llm.models import ModelConfig, init_params

    config = ModelConfig.tiny()
    params = init_params(config, jax.random.PRNGKey(0))
    windows = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (3, 17)),
                          jnp.int32)
    chunked = window_nll(params, windows, config=config, row_chunks=True)
    plain = window_nll(params, windows, config=config)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), rtol=1e-6)
