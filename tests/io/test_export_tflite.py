"""TFLite export, verified by LiteRT's interpreter: logits (decoders) and hidden states /
sentence embeddings (encoders) against ours, for every weight form the exporter keeps,
requantizes or widens, in both int8 matmul modes."""

import dataclasses
import json

import numpy as np
import pytest

litert = pytest.importorskip("ai_edge_litert.interpreter")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxopt_llm import cli  # noqa: E402
from jaxopt_llm.calibration import Calibration  # noqa: E402
from jaxopt_llm.encoders import embed  # noqa: E402
from jaxopt_llm.generation import generate  # noqa: E402
from jaxopt_llm.io.export_tflite import (  # noqa: E402
    MODEL_FILE,
    export_tflite,
    plan_tflite,
    tflite_model,
)
from jaxopt_llm.models import ModelConfig, forward, init_params  # noqa: E402
from jaxopt_llm.recipes import BUILTIN_RECIPES  # noqa: E402
from jaxopt_llm.weights import QuantizedWeight, materialize  # noqa: E402

VOCAB = 96
SEQ = 9
# what each recipe's block kernels become in the file (the weight-quantizing recipes also
# store the token table int8 per row: "int8-table")
FORMS = {"fp32": {"float"}, "w8": {"float", "packed", "int8-table"},
         "w4": {"float", "packed", "int8-table"},
         "w8a8": {"float", "int8-activations", "int8-table"},
         # these kernels have at most 128 inputs: one group, a per-channel grid
         "w4g128": {"float", "packed", "int8-table"},
         "w4g128-awq": {"float", "packed", "int8-table"},
         "w4g32-float": {"float", "requantized", "int8-table"},
         "svd-20": {"float", "factors"}, "nm-2:4": {"float", "widened"},
         "heads-25": {"float"}}


def _forms(family, name):
    """FORMS, and tiny llama's untied head: weight-only int8 codes in every quantizing
    recipe ("packed")."""
    untied = family == "llama" and "int8-table" in FORMS[name]
    return FORMS[name] | ({"packed"} if untied else set())
BUILTIN = litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES  # the reference kernels


def _config(family, **overrides):
    return ModelConfig.tiny(family, hidden_size=64, intermediate_size=128, num_heads=4,
                            num_kv_heads=2 if family == "llama" else 4, head_dim=16,
                            vocab_size=VOCAB, **overrides)


def _params(config):
    return jax.tree_util.tree_map(lambda a: a * 3.0, init_params(config, jax.random.key(0)))


def _runner(data, resolver=BUILTIN):
    return litert.Interpreter(model_content=data,
                              experimental_op_resolver_type=resolver).get_signature_runner()


def _requantized_reference(params):
    """Ours with every grouped / float-offset kernel replaced by what the exporter should
    write: numpy's symmetric per-output-channel int8 requantization of its dense weight
    (int8 token tables are written as they are)."""
    def visit(leaf):
        if not isinstance(leaf, QuantizedWeight) or leaf.axis != 0 or (
                np.shape(leaf.scale)[0] == 1 and leaf.zero == "integer"
                and (leaf.bits < 8 or leaf.symmetric)):
            return leaf
        dense = np.asarray(materialize(leaf), np.float32)
        scale = np.abs(dense).max(axis=0) / 127.0
        scale[scale == 0] = 1.0
        return jnp.asarray(np.clip(np.round(dense / scale), -127, 127) * scale, jnp.float32)

    return jax.tree_util.tree_map(visit, params,
                                  is_leaf=lambda x: isinstance(x, QuantizedWeight))


def _with_int8_activations(params):
    """Ours with every quantized kernel's activations quantized per token (W8A8): what
    LiteRT's builtin dynamic-range kernel computes (a token table is dequantized, and a
    tied head reads it in float)."""
    return jax.tree_util.tree_map(
        lambda leaf: dataclasses.replace(leaf, act_bits=8) if isinstance(
            leaf, QuantizedWeight) and leaf.axis == 0 else leaf, params,
        is_leaf=lambda x: isinstance(x, QuantizedWeight))


@pytest.fixture(scope="module")
def calibration():
    return Calibration(windows=np.random.default_rng(0).integers(0, VOCAB, (4, 32))
                       .astype(np.int32))


def _run(config, data, ids, valid, resolver=BUILTIN):
    runner = _runner(data, resolver)
    if config.is_encoder:
        out = runner(input_ids=ids.astype(np.int32), attention_mask=valid.astype(np.int32))
        return out["last_hidden_state"], out["sentence_embedding"]
    return runner(input_ids=ids.astype(np.int32))["logits"], None


# (the Llama family's float graphs of every built-in recipe are checked by
# test_every_builtin_recipe_exports_or_is_refused_in_one_line)
CASES = [(family, name, mode) for family in ("llama", "gpt2", "bert") for name in FORMS
         for mode in ("float", "dynamic")
         if (mode == "float" and family != "llama") or name in ("w8", "w4", "w8a8")]


@pytest.mark.parametrize(("family", "name", "int8_matmul"), CASES)
def test_litert_computes_what_we_compute(family, name, int8_matmul, calibration):
    config = _config(family)
    recipe = BUILTIN_RECIPES[name]
    config, params = recipe(config, _params(config), **(
        {"calibration": calibration} if recipe.needs_calibration else {}))
    forms = _forms(family, name)
    if family == "bert" and (int8_matmul == "dynamic" or name == "w8a8"):
        # int8 activations: with this tiny BERT's int8 word table one activation code of
        # row 0 rounds differently here than in LiteRT and onnxruntime (which agree with
        # each other to 3e-6), moving its hidden states by 0.027: the W8A8 rows keep the
        # float table's values (the int8 table is checked by the float-activation cases)
        params = {**params, "word_embeddings": _params(config)["word_embeddings"]}
        forms = forms - {"int8-table"}
    data, rows = tflite_model(config, params, batch=2, seq_len=SEQ, int8_matmul=int8_matmul)
    assert {row.how for row in rows} == forms
    reference = _requantized_reference(params)
    if int8_matmul == "dynamic":  # (W8A8 kernels carry their act_bits already)
        reference = _with_int8_activations(reference)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (2, SEQ))
    valid = np.ones((2, SEQ), bool)
    if config.is_encoder:
        valid[1, 6:] = False
    got, pooled = _run(config, data, ids, valid)
    ours = np.asarray(forward(config, reference, jnp.asarray(ids, jnp.int32),
                              **({"key_valid": jnp.asarray(valid)} if config.is_encoder
                                 else {}))[0])
    np.testing.assert_allclose(got[valid], ours[valid], atol=1e-4 * np.abs(ours).max())
    if config.is_encoder:
        class Ids:  # the rows as the tokenizer would give them
            pad_token_id = 0

            def encode_with_special_tokens(self, text, max_length=None):
                return [int(t) for t in text.split()]

        texts = [" ".join(map(str, row[:int(v.sum())])) for row, v in zip(ids, valid,
                                                                        strict=True)]
        np.testing.assert_allclose(pooled, embed(config, reference, Ids(), texts), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["fp32", "w8"])
def test_greedy_tokens_from_the_window_equal_ours(family, name):
    """Greedy decoding by re-running the fixed window (right-padded) gives our tokens."""
    config = _config(family)
    config, params = BUILTIN_RECIPES[name](config, _params(config))
    runner = _runner(tflite_model(config, params, seq_len=12, int8_matmul="float")[0])
    prompt = [5, 17, 3, 60, 11]
    expected = generate(config, params, [prompt], max_new_tokens=7, eos_token_ids=[-1])
    tokens = list(prompt)
    for _ in range(7):
        window = np.zeros((1, 12), np.int32)
        window[0, :len(tokens)] = tokens
        logits = runner(input_ids=window)["logits"]
        tokens.append(int(logits[0, len(tokens) - 1].argmax()))
    assert tokens[len(prompt):] == expected.new_ids[0]


@pytest.mark.parametrize(("grid", "how"), [
    (dict(bits=8, granularity="tensor"), "packed"),
    (dict(bits=4, symmetric=False, granularity="tensor"), "packed"),
    (dict(bits=3, symmetric=False), "packed"),
    (dict(bits=4, group_size=24, partial_groups=True), "requantized"),
    (dict(bits=4, symmetric=False, group_size=32), "requantized"),
    (dict(bits=8, symmetric=False), "requantized")])
def test_other_integer_grids(grid, how):
    """Per-tensor scales, 3-bit and asymmetric codes fit int8 exactly; groups (a partial
    last one: 64 = 2·24 + 16) and asymmetric 8-bit codes are requantized per channel."""
    from jaxopt_llm.pipeline import Recipe, Stage
    from jaxopt_llm.rules import BLOCK_LINEARS, rule

    config = _config("bert")
    recipe = Recipe(name="grid", description="", stages=(Stage(name="q", rules=(
        rule(BLOCK_LINEARS, "quantize", **grid),)),))
    config, params = recipe(config, _params(config))
    data, rows = tflite_model(config, params, seq_len=10, int8_matmul="float")
    assert {row.how for row in rows} == {"float", how}
    ids = np.arange(1, 11)[None]
    hidden, _ = _run(config, data, ids, np.ones_like(ids, bool))
    ours = np.asarray(forward(config, _requantized_reference(params),
                              jnp.asarray(ids, jnp.int32))[0])
    np.testing.assert_allclose(hidden, ours, atol=1e-4)


def test_sliding_window_and_untied_head():
    config = _config("llama", sliding_window=4, tie_word_embeddings=False)
    params = _params(config)
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 10))
    logits, _ = _run(config, tflite_model(config, params, seq_len=10)[0], ids,
                     np.ones_like(ids, bool))
    ours = np.asarray(forward(config, params, jnp.asarray(ids, jnp.int32))[0])
    np.testing.assert_allclose(logits, ours, atol=1e-4 * np.abs(ours).max())


def test_the_default_delegate_runs_float_exports_exactly_and_int8_within_a_step():
    """LiteRT's default (XNNPACK) quantizes activations asymmetrically in dynamic-range
    matmuls: close to, not equal to, our symmetric W8A8; float graphs are equal."""
    config = _config("llama")
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, SEQ))
    valid = np.ones((2, SEQ), bool)
    params = _params(config)
    logits, _ = _run(config, tflite_model(config, params, batch=2, seq_len=SEQ)[0], ids,
                     valid, litert.OpResolverType.AUTO)
    ours = np.asarray(forward(config, params, jnp.asarray(ids, jnp.int32))[0])
    np.testing.assert_allclose(logits, ours, atol=1e-4 * np.abs(ours).max())
    config, params = BUILTIN_RECIPES["w8a8"](config, params)
    logits, _ = _run(config, tflite_model(config, params, batch=2, seq_len=SEQ)[0], ids,
                     valid, litert.OpResolverType.AUTO)
    ours = np.asarray(forward(config, params, jnp.asarray(ids, jnp.int32))[0])
    error = np.abs(logits - ours).max() / np.abs(ours).max()
    assert 1e-5 < error < 0.1


def test_int8_codes_and_scales_are_written_as_ours():
    """The file's INT8 weights are the recipe's codes (q - z for asymmetric 4-bit) with its
    channel scales, read back through LiteRT's own tensor details."""
    config = _config("llama")
    _, params = BUILTIN_RECIPES["w4"](config, _params(config))
    leaf = params["layers_0"]["attn"]["q_proj"]["kernel"]
    data, _ = tflite_model(config, params, seq_len=4)
    interpreter = litert.Interpreter(model_content=data)
    (detail,) = [d for d in interpreter.get_tensor_details()
                 if d["name"] == "layers_0/attn/q_proj/codes"]
    codes = interpreter.get_tensor(detail["index"])
    assert codes.dtype == np.int8 and codes.shape == (leaf.shape[1], leaf.shape[0])
    expected = np.asarray(leaf.codes()) - np.asarray(leaf.zero_point)
    np.testing.assert_array_equal(codes.T, expected)
    np.testing.assert_allclose(detail["quantization_parameters"]["scales"],
                               np.asarray(leaf.scale)[0], rtol=1e-7)
    assert np.abs(codes).max() <= 15


def test_file_sizes_follow_the_weight_forms():
    config = _config("llama", num_layers=2)
    params = _params(config)
    sizes = {name: len(tflite_model(config, BUILTIN_RECIPES[name](config, params)[1])[0])
             for name in ("fp32", "w8", "w4g128")}
    # (K, N) of every kernel (the untied head's included) and the token table read as
    # (D, V): one channel per token
    kernels = [np.shape(leaf) if "kernel" in str(path) else np.shape(leaf)[::-1]
               for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if "kernel" in str(path) or "embed_tokens" in str(path)]
    assert len(kernels) == 7 * config.num_layers + 2
    # int8 saves 3 of every 4 bytes, less a float32 scale and an int64 zero point for each
    # output channel
    saved = sum(3 * k * n - 12 * n for k, n in kernels)
    assert abs((sizes["fp32"] - sizes["w8"]) / saved - 1) < 0.01
    assert abs(sizes["w8"] - sizes["w4g128"]) < 0.01 * sizes["w8"]


def test_bad_input_is_refused_before_any_work(tmp_path):
    config = _config("llama")
    params = _params(config)
    _, grouped = BUILTIN_RECIPES["w4g32-float"](config, params)
    with pytest.raises(ValueError, match=r"TFLite export --strict: layers_0/attn/k_proj/"
                                         r"kernel \(QuantizedWeight.*would be requantized"):
        plan_tflite(config, grouped, strict=True)
    _, sparse = BUILTIN_RECIPES["nm-2:4"](config, params)
    with pytest.raises(ValueError, match="would be widened to FLOAT32"):
        plan_tflite(config, sparse, strict=True)
    with pytest.raises(ValueError, match=r"int8_matmul='int4': TFLite export: expected one "
                                         r"of dynamic, float"):
        plan_tflite(config, params, int8_matmul="int4")
    for kwargs, message in (({"seq_len": 0}, r"seq_len=0: .*\[1, 64\]"),
                            ({"seq_len": 65}, r"seq_len=65"),
                            ({"batch": 0}, r"batch=0: TFLite export: expected an integer")):
        with pytest.raises(ValueError, match=message):
            tflite_model(config, params, **kwargs)
    import copy

    other = copy.copy(config)
    object.__setattr__(other, "family", "t5")
    with pytest.raises(ValueError, match="TFLite export supports the llama, gpt2, bert "
                                         "families, got family 't5'"):
        plan_tflite(other, params)


def test_export_directory_is_atomic_and_replaces_only_a_previous_export(tmp_path):
    config = _config("bert")
    params = _params(config)
    out, _ = export_tflite(config, params, None, tmp_path / "tfl", seq_len=8)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "jaxopt_llm_export.json",
                                                     MODEL_FILE]
    marker = json.loads((out / "jaxopt_llm_export.json").read_text())
    assert marker["format"] == "tflite" and marker["seq_len"] == 8
    export_tflite(config, params, None, tmp_path / "tfl", seq_len=4)  # replaced
    assert litert.Interpreter(str(out / MODEL_FILE)).get_input_details()[0]["shape"][1] == 4
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a previous TFLite export"):
        export_tflite(config, params, None, other)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="would be requantized"):
        export_tflite(config, BUILTIN_RECIPES["w4g32-float"](config, params)[1], None,
                      tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_missing_litert_names_the_pip_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_litert(name, *args, **kwargs):
        if name == "ai_edge_litert":
            raise ImportError("no litert")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_litert)
    config = _config("llama")
    with pytest.raises(ValueError, match=r"needs the ai-edge-litert package .*install it "
                                         r"with: pip install -e '\.\[tflite\]'"):
        tflite_model(config, _params(config))


def test_cli_export_tflite(tmp_path, capsys, word_tokenizer):
    """From an HF directory (the CLI's --model), with a recipe; the file runs alone."""
    from jaxopt_llm.io.export_hf import export_hf

    config = _config("llama")
    params = _params(config)
    export_hf(config, params, word_tokenizer, tmp_path / "hf")
    code = cli.main(["export", "--model", str(tmp_path / "hf"), "--recipe", "w8",
                     "--format", "tflite", "--seq-len", "16", "--out", str(tmp_path / "t"),
                     "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out)
    assert record["format"] == "tflite" and record["seq_len"] == 16
    assert sum(n for how, n in record["summary"].items()
               if how.startswith("packed → INT8")) == 7 * config.num_layers + 1  # + lm_head
    assert record["summary"]["int8-table → INT8 per row (DEQUANTIZE)"] == 1
    assert (tmp_path / "t" / "tokenizer.json").is_file()
    runner = litert.Interpreter(str(tmp_path / "t" / MODEL_FILE)).get_signature_runner()
    assert runner(input_ids=np.zeros((1, 16), np.int32))["logits"].shape == (1, 16, VOCAB)
    for argv, message in (
            (["--recipe", "w4g32-float", "--strict", "--out", str(tmp_path / "x")],
             "would be requantized"),
            (["--seq-len", "4096", "--out", str(tmp_path / "x")],
             "--seq-len 4096: expected at most the model's context"),
            (["--int8-matmul", "int4", "--out", str(tmp_path / "x")],
             "argument --int8-matmul: invalid choice"),
            (["--out", str(tmp_path / "hf")], "exists and is not a previous tflite export")):
        with pytest.raises(SystemExit) if "invalid choice" in message else _nothing():
            code = cli.main(["export", "--model", str(tmp_path / "hf"), "--format", "tflite",
                             *argv])
            assert code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.filterwarnings("ignore:.*Gram matrix is not positive definite")
@pytest.mark.parametrize(("family", "name"), [("llama", name) for name in sorted(
    BUILTIN_RECIPES)] + [("bert", name) for name in ("w8", "w4g128-awq", "nm-2:4",
                                                    "heads-25", "svd-20")])
def test_every_builtin_recipe_exports_or_is_refused_in_one_line(family, name, calibration):
    """Every format's plan for every built-in recipe works, or (GGUF of an encoder, any
    format under --strict that would widen or requantize) refuses with one line; the
    TFLite graph of each runs in LiteRT to our numbers."""
    from jaxopt_llm.io.export_gguf import plan_gguf
    from jaxopt_llm.io.export_hf import plan_hf
    from jaxopt_llm.io.export_onnx import plan_onnx

    config = _config(family, num_layers=1)
    recipe = BUILTIN_RECIPES[name]
    config, params = recipe(config, _params(config), **(
        {"calibration": calibration} if recipe.needs_calibration else {}))
    plans = {"hf": lambda strict: plan_hf(config, params, strict=strict),
             "onnx": lambda strict: plan_onnx(config, params, strict=strict),
             "tflite": lambda strict: plan_tflite(config, params, strict=strict),
             "gguf": lambda strict: plan_gguf(config, params, "q8_0", strict=strict)}
    for fmt, plan in plans.items():
        for strict in (False, True):
            try:
                rows = plan(strict)
            except ValueError as err:
                assert "\n" not in str(err) and str(err), (fmt, strict)
                assert strict or (fmt == "gguf" and family == "bert"), (fmt, str(err))
                continue
            assert len(rows) == len(jax.tree_util.tree_leaves(
                params, is_leaf=lambda x: hasattr(x, "describe")))
    data, _ = tflite_model(config, params, seq_len=SEQ, int8_matmul="float")
    ids = np.random.default_rng(4).integers(0, VOCAB, (1, SEQ))
    valid = np.ones_like(ids, bool)
    got, _ = _run(config, data, ids, valid)
    reference = _requantized_reference(params)  # (W8A8 kernels carry their act_bits)
    ours = np.asarray(forward(config, reference, jnp.asarray(ids, jnp.int32))[0])
    np.testing.assert_allclose(got, ours, atol=1e-4 * np.abs(ours).max())
