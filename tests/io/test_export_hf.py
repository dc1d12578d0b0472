"""HF export: transformers loads the directory on its own and gives our logits, our HF
loader reads it back to the same config and numbers, compressed weights are widened as
`plan_hf` says (or refused with strict), and a foreign directory is never replaced."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxopt_llm.io.export_hf import MARKER, export_hf, plan_hf
from jaxopt_llm.io.hf import load_hf_directory
from jaxopt_llm.models import ModelConfig, forward, init_params
from jaxopt_llm.recipes import load_recipe

VARIANTS = {
    "llama": dict(family="llama", model_type="llama"),
    "qwen2": dict(family="llama", model_type="qwen2", qkv_bias=True),
    "mistral-tied": dict(family="llama", model_type="mistral", tie_word_embeddings=True),
    "gpt2": dict(family="gpt2", model_type="gpt2"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("recipe", ["fp32", "w4g128"])
def test_transformers_loads_the_export_and_gives_our_logits(tmp_path, variant, recipe):
    config = ModelConfig.tiny(**VARIANTS[variant])
    _, params = load_recipe(recipe)(config, init_params(config, jax.random.key(0)))
    out, rows = export_hf(config, params, None, tmp_path / "hf")
    assert {r.how for r in rows} == ({"float"} if recipe == "fp32" else {"float", "widened"})
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 10))
    ours = np.asarray(forward(config, params, jnp.asarray(ids, jnp.int32))[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    back_config, back = load_hf_directory(out)
    assert back_config == config
    np.testing.assert_array_equal(
        np.asarray(forward(back_config, back, jnp.asarray(ids, jnp.int32))[0]), ours)


def test_tokenizer_and_chat_template_are_written(tmp_path):
    from jaxopt_llm.io.gguf_file import open_gguf
    from jaxopt_llm.io.loader import resolve_model_path
    from jaxopt_llm.io.tokenizer import tokenizer_from_gguf

    shipped = resolve_model_path("smollm2-135m")
    tokenizer = tokenizer_from_gguf(open_gguf(shipped), str(shipped))
    config = dataclasses.replace(ModelConfig.tiny(), vocab_size=tokenizer.vocab_size,
                                 bos_token_id=1, eos_token_ids=(2,))
    out, _ = export_hf(config, init_params(config, jax.random.key(0)), tokenizer,
                       tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "def f(x):\n    return x ** 2  # héllo 12345"
    assert theirs(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert theirs.eos_token == "<|im_end|>" and theirs.bos_token == "<|im_start|>"
    chat = theirs.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat


def test_strict_and_foreign_directories(tmp_path):
    config = ModelConfig.tiny()
    _, params = load_recipe("w8")(config, init_params(config, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"--strict: (embed_tokens/embedding|layers_0/\S+) "
                                         r"\(QuantizedWeight\) would be widened to float32"):
        plan_hf(config, params, strict=True)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a previous export"):
        export_hf(config, params, None, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out, _ = export_hf(config, params, None, tmp_path / "hf")
    assert json.loads((out / MARKER).read_text())["format"] == "hf"
    export_hf(config, params, None, out)  # a previous export is replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mine"]  # no leftovers
    with pytest.raises(ValueError, match="supports model types"):
        plan_hf(dataclasses.replace(config, model_type="phi"), params)


def test_cli_export_round_trip(tmp_path, capsys):
    """`jaxopt-llm export` from an HF directory (a tiny model with SmolLM2's tokenizer):
    w4g32-float to GGUF Q4_1 (codes copied), and back to an HF directory (widened)."""
    from jaxopt_llm.cli import main
    from jaxopt_llm.io.gguf_file import load_gguf, open_gguf
    from jaxopt_llm.io.loader import load_model, resolve_model_path
    from jaxopt_llm.io.tokenizer import tokenizer_from_gguf

    shipped = resolve_model_path("smollm2-135m")
    tokenizer = tokenizer_from_gguf(open_gguf(shipped), str(shipped))
    config = dataclasses.replace(ModelConfig.tiny(hidden_size=64, intermediate_size=128),
                                 vocab_size=tokenizer.vocab_size)
    source, _ = export_hf(config, init_params(config, jax.random.key(0)), tokenizer,
                          tmp_path / "src")
    code = main(["export", "--model", str(source), "--recipe", "w4g32-float", "--format",
                 "gguf", "--type", "q4_1", "--floats", "f32", "--out",
                 str(tmp_path / "m.gguf"), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["summary"]["exact → Q4_1"] == 7 * config.num_layers
    # the int8 token table and untied head stay 8-bit (requantized to Q8_0's blocks)
    assert record["summary"]["requantized → Q8_0"] == 2
    _, quantized = load_recipe("w4g32-float")(config, load_model(str(source)).params)
    back_config, back, _ = load_gguf(tmp_path / "m.gguf")
    for table in ("embed_tokens", "lm_head"):  # the block linears are compared exactly
        quantized[table] = back[table]
    ids = jnp.asarray(np.arange(12)[None] * 97 % config.vocab_size, jnp.int32)
    np.testing.assert_array_equal(np.asarray(forward(back_config, back, ids)[0]),
                                  np.asarray(forward(config, quantized, ids)[0]))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    code = main(["export", "--model", str(source), "--format", "hf", "--out", str(foreign)])
    assert code == 2 and "exists and is not a previous hf export" in capsys.readouterr().err
    code = main(["export", "--model", str(source), "--recipe", "w8", "--format", "hf",
                 "--strict", "--out", str(tmp_path / "hf2")])
    assert code == 2 and "would be widened to float32" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()
