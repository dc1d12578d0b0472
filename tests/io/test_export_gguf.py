"""GGUF export: matching grids are copied code for code (the file's blocks, decoded by the
`gguf` package, equal our weights; loaded back the logits are identical), transformers'
own GGUF loader gives our logits, the tokenizer's metadata survives a round trip, the
plan says what is widened or requantized, and bad input is refused before any work."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxopt_llm import tree
from jaxopt_llm.cli import main
from jaxopt_llm.io.export_gguf import export_gguf, plan_gguf
from jaxopt_llm.io.gguf_file import load_gguf, open_gguf
from jaxopt_llm.io.tokenizer import Tokenizer, load_tokenizer_dir, tokenizer_from_gguf
from jaxopt_llm.models import ModelConfig, forward, init_params
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.weights import materialize

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=96, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, max_position_embeddings=64)
IDS = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
# Grids that are GGUF block types, and the type each is.
EXACT = {
    "q8_0": dict(bits=8, group_size=32, scale_dtype="float16"),
    "q4_0": dict(bits=4, group_size=32, scale_dtype="float16"),
    "q4_1": dict(bits=4, symmetric=False, zero="float", group_size=32),
}


def _quantized(params, **options):
    recipe = Recipe(name="q", stages=(Stage(name="q", rules=(
        rule(BLOCK_LINEARS, "quantize", **options),)),))
    return recipe(CONFIG, params)[1]


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.mark.parametrize("qtype", list(EXACT))
def test_matching_grids_are_copied_code_for_code(tmp_path, params, qtype):
    model = _quantized(params, **EXACT[qtype])
    path, rows = export_gguf(CONFIG, model, None, tmp_path / "m.gguf", qtype=qtype,
                             floats="f32")
    hows = {row.path: row.how for row in rows}
    assert {hows[p] for p in tree.flatten(model) if "layers_" in p and "kernel" in p} == \
        {"exact"}
    reader = open_gguf(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == qtype.upper()
    assert types["token_embd.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    # the gguf package's own decoder reads our blocks as our weights
    import gguf

    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    decoded = gguf.quants.dequantize(np.asarray(down.data), down.tensor_type)
    ours = np.asarray(materialize(tree.flatten(model)["layers_1/mlp/down_proj/kernel"]))
    np.testing.assert_array_equal(decoded.reshape(ours.T.shape), ours.T)
    # loaded back, the whole model is the same numbers
    config, back, _ = load_gguf(path)
    assert np.float32(config.norm_eps) == np.float32(CONFIG.norm_eps)  # GGUF holds float32
    assert dataclasses.replace(config, norm_eps=CONFIG.norm_eps) == CONFIG
    flat, dense = tree.flatten(back), tree.flatten(materialize(model))
    for name, value in dense.items():
        np.testing.assert_array_equal(np.asarray(flat[name]), np.asarray(value), err_msg=name)
    want = forward(CONFIG, model, jnp.asarray(IDS))[0]
    np.testing.assert_array_equal(np.asarray(forward(config, back, jnp.asarray(IDS))[0]),
                                  np.asarray(want))
    assert path.stat().st_size < 0.5 * sum(np.asarray(v).nbytes for v in dense.values())


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_1"])
def test_transformers_gguf_loader_gives_our_logits(tmp_path, params, qtype):
    model = params if qtype == "f32" else _quantized(params, **EXACT[qtype])
    export_gguf(CONFIG, model, None, tmp_path / "m.gguf", qtype=qtype, floats="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                           dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(CONFIG, model, jnp.asarray(IDS))[0])
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert np.array_equal(theirs.argmax(-1), ours.argmax(-1))


def test_float_types_and_requantization(tmp_path, params):
    """A float model to Q8_0 is rounded by gguf.quants (close, not equal); to F16 within
    half-precision rounding."""
    for qtype, tol in (("q8_0", 2e-2), ("f16", 1e-3)):
        path, rows = export_gguf(CONFIG, params, None, tmp_path / f"{qtype}.gguf", qtype=qtype)
        assert {r.how for r in rows} == ({"float", "quantized"} if qtype == "q8_0" else
                                         {"float"})
        config, back, _ = load_gguf(path)
        diff = np.abs(np.asarray(forward(config, back, jnp.asarray(IDS))[0])
                      - np.asarray(forward(CONFIG, params, jnp.asarray(IDS))[0]))
        assert 0 < diff.max() < tol


def test_plan_names_what_is_widened_or_requantized(params):
    w4g128_like = _quantized(params, bits=4, symmetric=False, group_size=64)
    rows = {r.path: r for r in plan_gguf(CONFIG, w4g128_like, "q4_1")}
    assert rows["layers_0/mlp/up_proj/kernel"].how == "requantized"  # groups of 64
    assert rows["layers_0/mlp/up_proj/kernel"].stored_as == "QuantizedWeight"
    assert rows["embed_tokens/embedding"].how == "quantized"
    assert rows["norm/scale"].how == "float" and rows["norm/scale"].written_as == "F32"
    assert plan_gguf(CONFIG, w4g128_like, "f16")[5].how in ("float", "widened")
    with pytest.raises(ValueError, match=r"--strict: layers_0/attn/q_proj/kernel "
                                         r"\(QuantizedWeight\) would be requantized to Q4_1"):
        plan_gguf(CONFIG, w4g128_like, "q4_1", strict=True)
    with pytest.raises(ValueError, match="would be widened to F32"):
        plan_gguf(CONFIG, w4g128_like, "f32", strict=True)


@pytest.mark.parametrize("source", ["gguf", "tokenizer.json"])
def test_tokenizer_metadata_round_trips(tmp_path, source):
    """SmolLM2's real tokenizer, as read from its GGUF file (pre-tokenizer name and chat
    template kept) or from a tokenizer.json (pre-tokenizer recognised by its pattern)."""
    from jaxopt_llm.io.loader import resolve_model_path

    shipped = resolve_model_path("smollm2-135m")
    tokenizer = tokenizer_from_gguf(open_gguf(shipped), str(shipped))
    assert tokenizer.gguf_pre == "smollm" and "im_start" in tokenizer.chat_template
    if source == "tokenizer.json":
        tokenizer.save(tmp_path / "tok")
        (tmp_path / "tok" / "tokenizer_meta.json").unlink()
        tokenizer = load_tokenizer_dir(tmp_path / "tok")
        assert tokenizer.gguf_pre is None and tokenizer.chat_template is None
    config = dataclasses.replace(CONFIG, vocab_size=tokenizer.vocab_size)
    path, _ = export_gguf(config, init_params(config, jax.random.key(1)), tokenizer,
                          tmp_path / "t.gguf", qtype="f16")
    back = tokenizer_from_gguf(open_gguf(path), str(path))
    text = "def f(x):\n    return x ** 2  # <|im_start|> héllo 12345"
    assert back.encode(text) == tokenizer.encode(text)
    assert (back.bos_token_id, back.eos_token_ids, back.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_ids[:1], tokenizer.pad_token_id)
    assert back.chat_template == tokenizer.chat_template
    assert back.gguf_pre == ("smollm" if source == "gguf" else "gpt2")


def test_tokenizer_keeps_gguf_fields_when_saved(tmp_path):
    import tokenizers

    backend = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1, "ab": 2},
                                                         [("a", "b")]))
    Tokenizer(backend=backend, gguf_pre="smollm", chat_template="{{x}}").save(tmp_path)
    loaded = load_tokenizer_dir(tmp_path)
    assert (loaded.gguf_pre, loaded.chat_template) == ("smollm", "{{x}}")
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text())
    meta["chat_template"] = 3
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'chat_template' must be a string or null, got int"):
        load_tokenizer_dir(tmp_path)


def test_bad_input(tmp_path, params):
    gpt2 = dataclasses.replace(CONFIG, family="gpt2", model_type="gpt2")
    with pytest.raises(ValueError, match="supports Llama-family models .* got family 'gpt2'"):
        plan_gguf(gpt2, params)
    with pytest.raises(ValueError, match=r"qtype='q5_k': not a GGUF type this export writes"):
        plan_gguf(CONFIG, params, "q5_k")
    with pytest.raises(ValueError, match=r"floats='int8'"):
        plan_gguf(CONFIG, params, "q8_0", floats="int8")
    with pytest.raises(ValueError, match="must name a .gguf file"):
        export_gguf(CONFIG, params, None, tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_cli_refuses_before_loading(tmp_path, capsys):
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("my notes")
    cases = [
        (["--out", str(foreign)], "exists and is not a previous GGUF export"),
        (["--out", str(tmp_path / "x.bin")], "expected a .gguf file name"),
        (["--out", str(tmp_path / "missing" / "x.gguf")], "is not an existing directory"),
    ]
    for extra, message in cases:
        code = main(["export", "--model", "smollm2-135m", "--format", "gguf", *extra])
        assert code == 2 and message in capsys.readouterr().err
    assert foreign.read_text() == "my notes"


@pytest.mark.parametrize("qtype", list(EXACT))
def test_blocks_load_back_as_our_codes_for_llama_cpp_arithmetic(tmp_path, params, qtype):
    """`load_gguf_blocks` keeps Q8_0/Q4_0/Q4_1 tensors (the table too) as QuantizedWeight:
    the same codes and scales we exported, so with activation blocks the model computes
    what llama.cpp computes."""
    from jaxopt_llm.io.gguf_blocks import load_gguf_blocks
    from jaxopt_llm.transforms.quantize import with_activation_blocks
    from jaxopt_llm.weights import QuantizedWeight

    model = _quantized(params, **EXACT[qtype])
    path, _ = export_gguf(CONFIG, model, None, tmp_path / "m.gguf", qtype=qtype)
    config, blocks = load_gguf_blocks(path)
    flat, ours = tree.flatten(blocks), tree.flatten(model)
    table = flat["embed_tokens/embedding"]
    assert isinstance(table, QuantizedWeight) and table.axis == 1 and table.group_size == 32
    for name in ("layers_0/attn/q_proj/kernel", "layers_1/mlp/down_proj/kernel"):
        leaf = flat[name]
        assert isinstance(leaf, QuantizedWeight) and leaf.bits == ours[name].bits
        np.testing.assert_array_equal(np.asarray(leaf.codes()), np.asarray(ours[name].codes()))
        np.testing.assert_array_equal(np.asarray(leaf.scale), np.asarray(ours[name].scale))
    floats = dataclasses.replace(config, norm_eps=CONFIG.norm_eps)
    np.testing.assert_allclose(np.asarray(forward(floats, blocks, jnp.asarray(IDS))[0]),
                               np.asarray(forward(floats, load_gguf(path)[1],
                                                  jnp.asarray(IDS))[0]), rtol=1e-5, atol=1e-5)
    rounded = with_activation_blocks(blocks)
    assert tree.flatten(rounded)["layers_0/mlp/up_proj/kernel"].act_group == 32
