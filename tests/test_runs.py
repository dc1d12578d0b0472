"""The commands' records as library calls (runs.py) and recipe continuation on artifacts."""

import math

import pytest

from jaxopt_llm.data import text_sha256
from jaxopt_llm.evaluate import perplexity
from jaxopt_llm.generation import generate
from jaxopt_llm.io.loader import load_model
from jaxopt_llm.plan import dense_param_bytes
from jaxopt_llm.recipes import BUILTIN_RECIPES, apply_recipe
from jaxopt_llm.runs import evaluate_text, generate_text, optimize_model
from jaxopt_llm.weights import QuantizedWeight, param_bytes
from tests.test_train_cli import CONFIG, TEXT


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir(CONFIG, TEXT)[0]))


def _float_count(config):
    """Hand count of the tiny Llama's float32 weights (no biases)."""
    d, f, heads, kv, hd = (config.hidden_size, config.intermediate_size, config.num_heads,
                           config.num_kv_heads, config.head_dim)
    block = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * f + 2 * d
    head = 0 if config.tie_word_embeddings else d * config.vocab_size
    return config.vocab_size * d + config.num_layers * block + d + head


def test_evaluate_text_is_perplexity_with_sizes_and_progress(loaded):
    seen = []
    out = evaluate_text(apply_recipe(loaded, None), TEXT, num_tokens=200, window=32,
                        progress=lambda done, total: seen.append((done, total)))
    ids = loaded.tokenizer.encode(TEXT)
    reference = perplexity(loaded.config, loaded.params, ids, num_tokens=200, window=32)
    assert out["ppl"] == reference.ppl and out["windows"] == 200 // 32
    assert seen[0] == (0, 6) and seen[-1] == (6, 6)
    assert out["param_bytes"] == out["dense_param_bytes"] == 4 * _float_count(loaded.config)
    assert out["text_sha256"] == text_sha256(TEXT) and out["text_tokens"] == len(ids)
    assert out["recipe"] == "fp32" and out["mesh"] is None
    assert math.isclose(out["eval_tok_s"], out["tokens_used"] / out["seconds"])


def test_generate_text_is_generate_decoded(loaded):
    out = generate_text(loaded, "hello world", max_new_tokens=5)
    ids = loaded.tokenizer.encode("hello world")
    reference = generate(loaded.config, loaded.params, [ids], max_new_tokens=5,
                         eos_token_ids=loaded.tokenizer.eos_token_ids)
    assert out["prompt_ids"] == ids and out["new_ids"] == reference.new_ids[0]
    assert out["text"] == loaded.tokenizer.decode(reference.new_ids[0])


def test_dense_param_bytes_counts_what_quantized_weights_stand_for(loaded):
    _, params = BUILTIN_RECIPES["w8"](loaded.config, loaded.params)
    assert param_bytes(params) < dense_param_bytes(params) == 4 * _float_count(loaded.config)


def test_optimize_then_continue_the_artifacts_recipe(loaded, tmp_path):
    out = optimize_model(loaded, BUILTIN_RECIPES["mlp-25"], tmp_path / "mlp")
    dense = 4 * _float_count(loaded.config)
    config, params = BUILTIN_RECIPES["mlp-25"](loaded.config, loaded.params)
    assert out["dense_param_bytes"] == dense and out["recipe"] == "mlp-25"
    assert out["param_bytes"] == param_bytes(params) == 4 * _float_count(config) < dense
    artifact = load_model(out["out"])
    assert artifact.recipe["name"] == "mlp-25" and artifact.extra["source"] == loaded.source
    more = apply_recipe(artifact, BUILTIN_RECIPES["w8"])
    assert more.recipe["name"] == "mlp-25+w8"
    assert [s["name"] for s in more.recipe["stages"]] == ["prune", "quantize"]
    # the float32 size of the model the artifact came from, not of the shrunk artifact
    assert more.extra["dense_param_bytes"] == dense > dense_param_bytes(artifact.params)
    kernel = more.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and kernel.shape == (32, config.intermediate_size)
