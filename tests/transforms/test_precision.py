"""`compute_in` (bfloat16 weights and activations): every built-in recipe's leaves run in
bf16 under jit within bf16 rounding of float32, codes untouched; `--compute` on eval and
generate; "auto" from the backend and the CPU's flags; bad values named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import cli, hardware
from jaxopt_llm.calibration import Calibration
from jaxopt_llm.errors import ParameterError
from jaxopt_llm.models import forward
from jaxopt_llm.recipes import BUILTIN_RECIPES
from jaxopt_llm.transforms.precision import compute_in, resolve_compute
from jaxopt_llm.weights import QuantizedWeight
from tests.test_train_cli import CONFIG, TEXT

# one recipe per leaf kind: float, int8 per channel, W8A8, grouped 4-bit, AWQ's kept
# scales, float offsets, masked, N:M, structured, low-rank, N:M with quantized values
RECIPES = ["fp32", "w8", "w8a8", "w4g128", "w4g128-awq", "w4g32-float", "magnitude-50",
           "nm-2:4", "mlp-25", "svd-20", "sparsegpt-2:4+w4g128-gptq"]


@pytest.fixture(scope="module")
def tiny(tiny_config, tiny_params):
    config = tiny_config("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    return config, tiny_params(config, scale=2.0)


@pytest.mark.parametrize("name", RECIPES)
def test_every_leaf_kind_runs_in_bfloat16_close_to_float32(tiny, name):
    config, params = tiny
    windows = np.random.default_rng(1).integers(3, 64, (2, 32))
    config, compressed = BUILTIN_RECIPES[name](config, params,
                                               calibration=Calibration(windows=windows))
    bf16 = compute_in(compressed, "bfloat16")
    is_quantized = lambda node: isinstance(node, QuantizedWeight)  # noqa: E731
    olds, _ = jax.tree_util.tree_flatten_with_path(compressed, is_leaf=is_quantized)
    news = jax.tree_util.tree_leaves(bf16, is_leaf=is_quantized)
    for (path, old), new in zip(olds, news, strict=True):
        name = jax.tree_util.keystr(path)
        if isinstance(old, QuantizedWeight):  # codes and scales kept, bf16 matmuls
            assert new.compute == "bfloat16", name
            for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new),
                            strict=True):
                assert a.dtype == b.dtype, name
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        elif not jnp.issubdtype(old.dtype, jnp.floating):
            assert new.dtype == old.dtype, name  # masks, N:M positions untouched
        elif name.rstrip("']").endswith("scale"):
            assert new.dtype == jnp.float32, name  # norm scales, AWQ input scales
        else:
            assert new.dtype == jnp.bfloat16, name
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old.astype(jnp.bfloat16)))
    tokens = np.random.default_rng(2).integers(3, 64, (2, 24))
    run = jax.jit(lambda p: forward(config, p, tokens)[0])
    expected = np.asarray(run(compressed))
    got = run(bf16)
    assert got.dtype == jnp.float32  # bf16 activations, float32 logits
    got = np.asarray(got)
    # bf16 keeps 8 significant bits: two layers of rounding stay within a few percent
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 0.03 * scale
    assert np.abs(got - expected).mean() <= 0.005 * scale


def test_float32_is_the_identity_and_auto_follows_the_hardware(monkeypatch):
    tree = {"kernel": jnp.ones((2, 2))}
    assert compute_in(tree, "float32") is tree
    assert resolve_compute("auto", backend="gpu") == "bfloat16"
    assert resolve_compute("auto", backend="tpu") == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_flags", lambda *a, **k: frozenset({"avx2"}))
    assert resolve_compute("auto", backend="cpu") == "float32"
    monkeypatch.setattr(hardware, "cpu_flags",
                        lambda *a, **k: frozenset({"avx2", "avx512_bf16"}))
    assert resolve_compute("auto", backend="cpu") == "bfloat16"


@pytest.mark.parametrize("bad", ["float16", "bf16", None])
def test_bad_compute_names_the_parameter(bad):
    with pytest.raises(ParameterError, match=r"^compute=.*must be one of float32, bfloat16, "
                                             r"auto$"):
        compute_in({"kernel": jnp.ones(2)}, bad)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir(CONFIG, TEXT, seed=1, scale=2.0)


def _run(capsys, *argv):
    code = cli.main([*map(str, argv), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_cli_eval_and_generate_in_bfloat16(model_dir, capsys):
    directory, text = model_dir
    evals = ["eval", "--model", directory, "--text", text, "--tokens", "256", "--window",
             "32"]
    f32 = _run(capsys, *evals)
    bf16 = _run(capsys, *evals, "--compute", "bfloat16")
    assert (f32["compute"], bf16["compute"]) == ("float32", "bfloat16")
    assert bf16["ppl"] != f32["ppl"] and bf16["ppl"] == pytest.approx(f32["ppl"], rel=0.02)
    gen = _run(capsys, "generate", "--model", directory, "--recipe", "w8", "--prompt",
               "hello world", "--max-new-tokens", "4", "--compute", "bfloat16")
    assert gen["compute"] == "bfloat16" and len(gen["new_ids"]) == 4


def test_cli_refuses_an_unknown_compute(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(model_dir[0]), "--compute", "float16"])
    assert exit_info.value.code == 2
    assert "--compute: invalid choice: 'float16'" in capsys.readouterr().err
