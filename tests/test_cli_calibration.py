"""Calibrated recipes from the command line: one clear error per bad calibration input,
before any work; a tiny model quantized with GPTQ end to end."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import cli
from jaxopt_llm.calibration import default_calibration
from jaxopt_llm.io.artifact import load_artifact
from jaxopt_llm.io.loader import load_model
from jaxopt_llm.models import ModelConfig, forward
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.weights import QuantizedWeight, ScaledInputWeight

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=8, hidden_size=32,
                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, max_position_embeddings=1024, bos_token_id=1,
                     eos_token_ids=(2,))
TEXT = " ".join(["hello world jax weights ."] * 300)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir(CONFIG, TEXT)


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_calibration_inputs_are_one_line_errors(tiny, tmp_path, capsys):
    model, text = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    cases = [
        (["--calib-text", tmp_path / "missing.txt"], "--calib-text", "does not exist"),
        (["--calib-text", empty], "--calib-text", "is empty"),
        (["--calib-text", short], "calibration text has 2; give more calibration text", ""),
        (["--calib-text", text, "--calib-tokens", "100"],
         "--calib-tokens 100: calibration needs at least one window of 512 tokens", ""),
    ]
    for extra, first, second in cases:
        code, out, err = _run(capsys, "optimize", "--model", model, "--recipe", "w4g128-gptq",
                              "--out", tmp_path / "never", *extra)
        assert code == 2, err
        assert first in err and second in err and "Traceback" not in err
        assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("name, bits", [("w3g128-awq", 3), ("w8a8-smoothquant", 8)])
def test_optimize_calibrated_recipes_on_a_tiny_model(tiny, tmp_path, capsys, name, bits):
    model, text = tiny
    code, out, err = _run(capsys, "optimize", "--model", model, "--recipe", name,
                          "--calib-text", text, "--calib-tokens", "1024", "--out",
                          tmp_path / "art", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["recipe"] == name
    loaded = load_artifact(tmp_path / "art")
    assert loaded.extra["calibration"].startswith("calibration text (sha256 ")
    assert loaded.extra["calibration"].endswith(", 1024 tokens)")
    kernel = loaded.params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and kernel.bits == bits
    o_proj = loaded.params["layers_1"]["attn"]["o_proj"]["kernel"]  # GQA: scales kept
    assert isinstance(o_proj, ScaledInputWeight)  # GQA: the scales stay in the leaf
    tokens = jnp.asarray([[3, 4, 5, 6, 7, 1]])
    original = load_model(str(model))  # the artifact computes what the recipe computed
    calibration = default_calibration(original.tokenizer, num_tokens=1024,
                                      text=open(text, encoding="utf-8").read())
    fresh = load_recipe(name)(original.config, original.params, calibration=calibration)[1]
    np.testing.assert_allclose(np.asarray(forward(loaded.config, loaded.params, tokens)[0]),
                               np.asarray(forward(loaded.config, fresh, tokens)[0]),
                               rtol=1e-5, atol=1e-5)
    code, out, err = _run(capsys, "eval", "--model", tmp_path / "art", "--text", text,
                          "--tokens", "1024", "--window", "256", "--json")
    assert code == 0, err
    assert json.loads(out)["ppl"] > 1.0


def test_train_from_a_calibrated_recipe(tiny, tmp_path, capsys):
    model, text = tiny
    code, out, err = _run(capsys, "train", "--model", model, "--recipe", "w4g128-gptq",
                          "--calib-text", text, "--calib-tokens", "1024", "--text", text,
                          "--steps", "2", "--batch", "2", "--seq", "32", "--out",
                          tmp_path / "qat", "--json")
    assert code == 0, err
    loaded = load_artifact(tmp_path / "qat")
    assert isinstance(loaded.params["layers_0"]["attn"]["q_proj"]["kernel"], QuantizedWeight)
