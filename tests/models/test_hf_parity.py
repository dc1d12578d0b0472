"""Logits of our Flax models vs HF transformers (torch) on tiny random checkpoints."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxopt_llm.generation import generate  # noqa: E402
from jaxopt_llm.io.hf import load_hf_directory  # noqa: E402
from jaxopt_llm.models import build_model  # noqa: E402
from jaxopt_llm.models.attention import attention_mask  # noqa: E402

VOCAB = 96
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _llama_family(kind, kv_heads=2, tied=False, rope=None, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                  max_position_embeddings=128, **extra)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_scaling=rope, **common))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    raise AssertionError(kind)


CASES = {
    "llama-kv1": lambda: _llama_family("llama", kv_heads=1),
    "llama-kv2-tied": lambda: _llama_family("llama", kv_heads=2, tied=True),
    "llama-kv4": lambda: _llama_family("llama", kv_heads=4),
    "llama-bias": lambda: _llama_family("llama", attention_bias=True, mlp_bias=True),
    "llama3-rope-scaling": lambda: _llama_family("llama", rope=LLAMA3_ROPE),
    "qwen2-bias": lambda: _llama_family("qwen2", kv_heads=2),
    "qwen2-tied": lambda: _llama_family("qwen2", kv_heads=1, tied=True),
    "mistral-sliding-window": lambda: _llama_family("mistral", kv_heads=2, sliding_window=8),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
}


def _save_random(make, directory, max_shard_size=None):
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # random norms and biases, so a missing one cannot hide
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return model


def _forward(config, params, ids):
    batch, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = attention_mask(jnp.ones((batch, length), bool), 0, length, config.sliding_window)
    apply = jax.jit(build_model(config).apply)
    return np.asarray(apply({"params": params}, jnp.asarray(ids), positions, mask)[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case, tmp_path):
    reference = _save_random(CASES[case], tmp_path)
    config, params = load_hf_directory(tmp_path)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_forward(config, params, ids), expected, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_with_index(tmp_path):
    reference = _save_random(CASES["llama-kv2-tied"], tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    config, params = load_hf_directory(tmp_path)
    ids = np.arange(20)[None] % VOCAB
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_forward(config, params, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama-kv1", "qwen2-bias", "gpt2"])
def test_batched_greedy_generation_matches_hf(case, tmp_path):
    """Left-padded prompts of different lengths, KV cache: token for token like HF."""
    reference = _save_random(CASES[case], tmp_path)
    config, params = load_hf_directory(tmp_path)
    prompts = [[5, 17, 3, 44, 9, 12, 30], [60, 2]]
    result = generate(config, params, prompts, max_new_tokens=12, eos_token_ids=[-1])
    for prompt, ours in zip(prompts, result.new_ids, strict=True):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
        assert ours == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("length", [129, 300, 1100])
def test_long_sequences_use_blocked_causal_attention(length, tmp_path):
    """Past 128 tokens prefill/eval attention runs in query blocks: still exactly HF."""
    make = lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(  # noqa: E731
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048))
    reference = _save_random(make, tmp_path)
    config, params = load_hf_directory(tmp_path)
    ids = np.random.default_rng(length).integers(0, VOCAB, (1, length))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_forward(config, params, ids), expected, atol=1e-4, rtol=1e-4)
    prompt = ids[0, :length - 5].tolist()
    ours = generate(config, params, [prompt, prompt[-7:]], max_new_tokens=5,
                    eos_token_ids=[-1])
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert ours.new_ids[0] == out[0, len(prompt):].tolist()
