"""Built-in recipes on the real SmolLM2: artifacts, CLI, and the w8 accuracy target."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import cli
from jaxopt_llm.data import pydoc_text
from jaxopt_llm.io import loader
from jaxopt_llm.io.artifact import WEIGHTS_FILE
from jaxopt_llm.models import build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.recipes import BUILTIN_RECIPES
from jaxopt_llm.weights import QuantizedWeight, param_bytes

pytestmark = pytest.mark.slow


@pytest.fixture
def cached_model(smollm2, monkeypatch):
    """Reuse the session's loaded SmolLM2 for the registry name; other paths load for real."""
    real = loader.load_model
    monkeypatch.setattr(loader, "load_model",
                        lambda spec: smollm2 if spec == "smollm2-135m" else real(spec))
    return smollm2


@pytest.fixture(scope="module")
def eval_ids(smollm2):
    return smollm2.tokenizer.encode(pydoc_text())


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _logits(config, params, ids):
    length = ids.shape[1]
    mask = attention_mask(jnp.ones((1, length), bool), 0, length)
    apply = jax.jit(build_model(config).apply)
    return np.asarray(apply({"params": params}, ids, jnp.arange(length)[None], mask)[0])


def test_optimize_artifact_roundtrip_is_bit_identical(capsys, cached_model, tmp_path, eval_ids):
    out_dir = tmp_path / "w4g128"
    code, out, err = _run(capsys, "optimize", "--model", "smollm2-135m", "--recipe", "w4g128",
                          "--out", str(out_dir), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["recipe"] == "w4g128"
    # On disk ≈ nbytes: the safetensors data section is exactly param_bytes (header aside).
    file_bytes = (out_dir / WEIGHTS_FILE).stat().st_size
    assert result["param_bytes"] <= file_bytes <= result["param_bytes"] * 1.001
    config, params = BUILTIN_RECIPES["w4g128"](cached_model.config, cached_model.params)
    assert param_bytes(params) == result["param_bytes"]
    loaded = loader.load_model(str(out_dir))
    assert loaded.recipe["name"] == "w4g128"
    kernel = loaded.params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and kernel.bits == 4
    assert kernel.qvalue.dtype == jnp.uint8
    ids = np.asarray(eval_ids[:128])[None]
    np.testing.assert_array_equal(_logits(loaded.config, loaded.params, ids),
                                  _logits(config, params, ids))
    # The artifact is a model like any other for eval and generate.
    code, out, err = _run(capsys, "eval", "--model", str(out_dir), "--tokens", "1024", "--json")
    assert code == 0, err
    evaluation = json.loads(out)
    assert evaluation["recipe"] == "w4g128"
    assert evaluation["dense_param_bytes"] == 4 * 134_515_008
    assert evaluation["param_bytes"] == result["param_bytes"]
    code, out, err = _run(capsys, "generate", "--model", str(out_dir), "--prompt",
                          "The capital of France is", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["recipe"] == "w4g128"


def test_eval_recipe_json(capsys, cached_model):
    code, out, err = _run(capsys, "eval", "--model", "smollm2-135m", "--recipe", "w8a8",
                          "--tokens", "1024", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["recipe"] == "w8a8" and result["dense_param_bytes"] == 4 * 134_515_008
    assert result["param_bytes"] < result["dense_param_bytes"] * 0.5
    # w8's accuracy target (within 0.5% of float32 on 4,096 tokens) is checked next to the
    # float model's perplexity in tests/real/test_smollm2.py.


def test_structured_recipe_shrinks_the_real_model(cached_model):
    config, params = BUILTIN_RECIPES["heads-25"](cached_model.config, cached_model.params)
    assert (config.num_heads, config.num_kv_heads) == (6, 3)  # one of 3 query heads per group
    assert params["layers_0"]["attn"]["q_proj"]["kernel"].shape == (576, 6 * 64)
    config, params = BUILTIN_RECIPES["mlp-25"](cached_model.config, cached_model.params)
    assert config.intermediate_size == 1536 - 384


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["eval", "--model", "smollm2-135m", "--recipe", "w5"],
      "unknown recipe 'w5'; built-in recipes: fp32, w8, w8a8"),
     (["optimize", "--model", "smollm2-135m", "--recipe", "w8", "--out", "{file}"],
      "exists and is not a directory"),
     (["eval", "--model", "smollm2-135m", "--recipe", "{bad_recipe}"],
      "stages[0].rules[0]: missing key(s) ['op']")],
)
def test_recipe_errors(capsys, tmp_path, argv, message):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages:\n  - name: q\n    rules:\n      - match: '.*kernel'\n")
    argv = [a.format(file=tmp_path / "file", bad_recipe=bad) for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err, err


def test_artifact_with_newer_format_version_is_refused(capsys, tmp_path, cached_model):
    out_dir = tmp_path / "art"
    code, _, err = _run(capsys, "optimize", "--model", "smollm2-135m", "--recipe", "mlp-25",
                        "--out", str(out_dir))
    assert code == 0, err
    meta = json.loads((out_dir / "artifact.json").read_text())
    meta["format_version"] = 99
    (out_dir / "artifact.json").write_text(json.dumps(meta))
    code, _, err = _run(capsys, "eval", "--model", str(out_dir), "--tokens", "512")
    assert code == 2 and "newer" in err


def test_recipes_and_plan_commands(capsys, cached_model):
    code, out, _ = _run(capsys, "recipes", "--json")
    assert code == 0
    names = list(json.loads(out)["recipes"])
    assert names == ["fp32", "w8", "w8a8", "w4", "w4g128", "w3g128", "w4g128-gptq",
                     "w3g128-gptq", "w4-gptq", "w4g128-awq", "w3g128-awq", "w4-awq",
                     "w8a8-smoothquant", "w4g32-float", "magnitude-50", "nm-2:4",
                     "wanda-50", "wanda-2:4", "sparsegpt-50", "sparsegpt-2:4",
                     "sparsegpt-2:4+w4g128-gptq",
                     "heads-25", "mlp-25", "heads-25-act", "mlp-25-act", "svd-20",
                     "asvd-20", "svdllm-20", "svdllm-40"]
    code, out, _ = _run(capsys, "plan", "--model", "smollm2-135m", "--recipe", "w4g128",
                        "--json")
    assert code == 0
    plan = json.loads(out)
    rows = {r["path"]: r for r in plan["parameters"]}
    table = rows["embed_tokens/embedding"]  # int8 per row: a float32 scale per token
    assert table["op"] == "quantize(bits=8)"
    assert table["bytes_after"] == 49152 * 576 + 49152 * 4
    gate = rows["layers_0/mlp/gate_proj/kernel"]
    assert gate["bytes_before"] == 576 * 1536 * 4
    # 4-bit codes + per group of 128 (5 groups, the last of 64) a float16 scale and uint8 zero
    assert gate["bytes_after"] == 576 * 1536 // 2 + 5 * 1536 * 3
