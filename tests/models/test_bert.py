"""The BERT encoder family against HF transformers (torch): tiny random checkpoints read by
our HF loader, the real all-MiniLM-L6-v2, every built-in recipe, HF export, sharding."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxopt_llm import cli  # noqa: E402
from jaxopt_llm.calibration import Calibration  # noqa: E402
from jaxopt_llm.encoders import embed  # noqa: E402
from jaxopt_llm.io.export_hf import export_hf  # noqa: E402
from jaxopt_llm.io.hf import config_from_hf, load_hf_directory  # noqa: E402
from jaxopt_llm.models import forward  # noqa: E402
from jaxopt_llm.recipes import BUILTIN_RECIPES  # noqa: E402
from jaxopt_llm.tree import flatten  # noqa: E402
from jaxopt_llm.weights import WeightLeaf, param_bytes  # noqa: E402

VOCAB = 80


def _hf_bert(directory, **overrides):
    torch.manual_seed(0)
    config = transformers.BertConfig(**{
        "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 64,
        **overrides})
    model = transformers.BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():  # non-trivial norms and biases (HF initialises them to 1 and 0)
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def _padded_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (3, 11)).astype(np.int32)
    valid = np.ones((3, 11), bool)
    valid[1, 7:] = False
    valid[2, 3:] = False
    return np.where(valid, ids, 0).astype(np.int32), valid


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    model = _hf_bert(directory)
    config, params = load_hf_directory(directory)
    return model, config, params


def test_hidden_states_equal_transformers_with_padding_under_jit(tiny_bert):
    model, config, params = tiny_bert
    ids, valid = _padded_batch()
    run = jax.jit(lambda p, t, v: forward(config, p, t, key_valid=v)[0])
    ours = np.asarray(run(params, jnp.asarray(ids), jnp.asarray(valid)))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(valid, dtype=torch.long)
                         ).last_hidden_state.numpy()
    assert config.family == "bert" and config.is_encoder
    np.testing.assert_allclose(ours[valid], expected[valid], rtol=1e-5, atol=2e-5)


def test_the_mask_is_bidirectional_and_hides_padding(tiny_bert):
    _, config, params = tiny_bert
    ids, valid = _padded_batch()
    base = np.asarray(forward(config, params, jnp.asarray(ids), key_valid=jnp.asarray(valid))[0])
    later = ids.copy()
    later[0, -1] = (later[0, -1] % (VOCAB - 1)) + 1  # a later token changes position 0
    padding = ids.copy()
    padding[2, 5] = 7  # a padding token changes nothing
    a = np.asarray(forward(config, params, jnp.asarray(later), key_valid=jnp.asarray(valid))[0])
    b = np.asarray(forward(config, params, jnp.asarray(padding), key_valid=jnp.asarray(valid))[0])
    assert not np.allclose(a[0, 0], base[0, 0])
    np.testing.assert_array_equal(b[2, :3], base[2, :3])


def _masked_mean(hidden, valid):
    w = valid[..., None].astype(np.float64)
    mean = (hidden * w).sum(1) / w.sum(1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


@pytest.mark.slow
def test_minilm_embeddings_equal_transformers(minilm):
    """The real model, sentence-transformers' recipe (mean pooling over the attention mask,
    then L2 normalisation) computed here in torch from transformers' hidden states."""
    from jaxopt_llm.data import pydoc_text
    from jaxopt_llm.encoders import sentences
    from jaxopt_llm.io.loader import resolve_model_path

    texts = sentences(pydoc_text(), 24) + ["Short.", "naïve café – ünïcode text"]
    ours = embed(minilm.config, minilm.params, minilm.tokenizer, texts, batch_size=8)
    path = str(resolve_model_path("minilm-l6"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()
    expected = _masked_mean(hidden, batch["attention_mask"].numpy().astype(bool))
    assert ours.shape == (26, 384)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert [minilm.tokenizer.encode_with_special_tokens(t) for t in texts[-2:]] == [
        tokenizer(t)["input_ids"] for t in texts[-2:]]


def test_a_long_text_is_not_cut_by_the_tokenizer_json_settings(minilm):
    """all-MiniLM-L6-v2's tokenizer.json truncates and pads to 128; loading turns that off."""
    text = " ".join(["word"] * 300)
    assert len(minilm.tokenizer.encode(text)) == 300
    assert len(minilm.tokenizer.encode_with_special_tokens(text, 100)) == 100


@pytest.fixture(scope="module")
def calibration():
    return Calibration(windows=np.random.default_rng(1).integers(1, VOCAB, (4, 32))
                       .astype(np.int32))


@pytest.mark.parametrize("name", sorted(BUILTIN_RECIPES))
def test_every_builtin_recipe_compresses_the_encoder(tiny_bert, calibration, name):
    _, config, params = tiny_bert
    recipe = BUILTIN_RECIPES[name]
    kwargs = {"calibration": calibration} if recipe.needs_calibration else {}
    new_config, out = recipe(config, params, **kwargs)
    ids, valid = _padded_batch()
    run = jax.jit(lambda p: forward(new_config, p, jnp.asarray(ids),
                                    key_valid=jnp.asarray(valid))[0])
    hidden = np.asarray(run(out))
    base = np.asarray(forward(config, params, jnp.asarray(ids), key_valid=jnp.asarray(valid))[0])
    assert hidden.shape == base.shape and np.isfinite(hidden).all()
    if name == "fp32":  # jit and eager differ by float rounding only
        np.testing.assert_allclose(hidden, base, rtol=1e-5, atol=1e-6)
        return
    assert not np.allclose(hidden, base)
    # post-LayerNorm outputs have unit scale: every recipe stays near the float model
    # (the loosest, low-rank at 40% on random weights, moves them by ~0.1 on average)
    assert np.abs(hidden - base)[valid].mean() < 0.25, name
    changed = [p for p, leaf in flatten(out).items() if isinstance(leaf, WeightLeaf)]
    structured = name.startswith(("heads", "mlp"))
    assert structured or changed
    # the weight-quantizing recipes store the word table int8; positions, token types and
    # norms stay float
    tables = {"word_embeddings/embedding"} if "quantize" in {
        r.op for s in recipe.stages for r in s.rules} else set()
    assert all(p.startswith("layer_") or p in tables for p in changed)
    if not name.startswith(("magnitude", "nm", "wanda", "sparsegpt")) and name != "w8a8":
        assert param_bytes(out) < param_bytes(params)


@pytest.mark.parametrize("name", ["fp32", "w8", "heads-25"])
def test_hf_export_is_read_by_transformers(tiny_bert, tmp_path, name):
    """A BertModel directory: transformers' hidden states equal ours (compressed weights
    widened to float32); pruned heads cannot be expressed and are refused."""
    _, config, params = tiny_bert
    new_config, out = BUILTIN_RECIPES[name](config, params)
    if name == "heads-25":
        with pytest.raises(ValueError, match="needs num_heads·head_dim = hidden_size"):
            export_hf(new_config, out, None, tmp_path / "hf")
        return
    export_hf(new_config, out, None, tmp_path / "hf")
    assert config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()),
                          "config.json") == new_config
    model = transformers.BertModel.from_pretrained(tmp_path / "hf").eval()
    ids, valid = _padded_batch()
    ours = np.asarray(forward(new_config, out, jnp.asarray(ids), key_valid=jnp.asarray(valid))[0])
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(valid, dtype=torch.long)
                       ).last_hidden_state.numpy()
    np.testing.assert_allclose(theirs[valid], ours[valid], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("mesh_spec", ["data=2", "model=2", "data=2,model=2"])
def test_embeddings_on_a_mesh_equal_one_device(tiny_bert, mesh_spec):
    from jaxopt_llm.parallel import make_mesh
    from jaxopt_llm.placement import Placement

    _, config, params = tiny_bert
    config_w8, w8 = BUILTIN_RECIPES["w8"](config, params)

    class Words:  # a stand-in tokenizer: ids from the words' lengths
        pad_token_id = 0

        def encode_with_special_tokens(self, text, max_length=None):
            return [1] + [len(w) % (VOCAB - 2) + 2 for w in text.split()][:max_length - 2] + [1]

    texts = ["a bb ccc", "dddd e", "ff ggg hhhh iiiii j", "k"]
    single = embed(config_w8, w8, Words(), texts, batch_size=2)
    placement = Placement.on_mesh(make_mesh(mesh_spec))
    sharded = embed(config_w8, placement.place_params(config_w8, w8), Words(), texts,
                    batch_size=2, placement=placement)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(single, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported for bert"),
    ({"position_embedding_type": "relative_key"},
     "position_embedding_type 'relative_key' is not supported"),
    ({"is_decoder": True}, "is_decoder=true (a causal BERT) is not supported"),
    ({"hidden_size": 30}, "hidden_size=30 is not a multiple of num_attention_heads=4"),
    ({"type_vocab_size": 0}, "type_vocab_size must be a positive integer"),
])
def test_unsupported_bert_configs_are_refused(overrides, message):
    hf = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
          "max_position_embeddings": 64, **overrides}
    with pytest.raises(ValueError, match=f"config.json: {__import__('re').escape(message)}"):
        config_from_hf(hf, "config.json")


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_cli_embed_and_eval_on_minilm(capsys, minilm, tmp_path):
    code, out, err = _run(capsys, "embed", "--model", "minilm-l6", "--text", "A cat sat.",
                          "--text", "The dog ran home.", "--json")
    assert code == 0, err
    record = json.loads(out)
    vectors = np.asarray(record["embeddings"], np.float32)
    assert record["dim"] == 384 and vectors.shape == (2, 384)
    np.testing.assert_allclose(vectors, embed(minilm.config, minilm.params, minilm.tokenizer,
                                              ["A cat sat.", "The dog ran home."]), atol=1e-6)
    code, out, err = _run(capsys, "eval", "--model", "minilm-l6", "--recipe", "w8",
                          "--texts", "48", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["recipe"] == "w8" and result["texts"] == 48
    assert {"cosine", "spearman", "top1_agreement", "param_bytes"} <= set(result)
    assert result["param_bytes"] < 0.7 * result["dense_param_bytes"]
    assert 0.999 < result["cosine"] < 1 and result["spearman"] > 0.999


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--model", "minilm-l6", "--prompt", "Hi"],
     "is an encoder; `generate` needs a decoder"),
    (["export", "--model", "minilm-l6", "--format", "gguf", "--out", "{tmp}/m.gguf"],
     "GGUF export supports Llama-family models"),
    (["embed", "--model", "minilm-l6"], "give at least one --text or a --file"),
    (["embed", "--model", "minilm-l6", "--text", " "], "--text must not be empty"),
    (["embed", "--model", "minilm-l6", "--file", "{tmp}/none.txt"], "--file"),
    (["embed", "--model", "minilm-l6", "--text", "x", "--max-length", "1"],
     "--max-length 1: expected an integer in [2, 512]"),
    (["eval", "--model", "minilm-l6", "--texts", "2"], "--texts 2: expected an integer of at "
                                                       "least 3"),
])
def test_encoder_bad_input(capsys, minilm, monkeypatch, tmp_path, argv, message):
    from jaxopt_llm.io import loader

    monkeypatch.setattr(loader, "load_model", lambda spec: minilm)
    code, _, err = _run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2 and message in err, err


def test_library_refuses_decoder_work_on_an_encoder(tiny_bert):
    from jaxopt_llm.evaluate import perplexity
    from jaxopt_llm.generation import generate

    _, config, params = tiny_bert
    with pytest.raises(ValueError, match="is an encoder: perplexity needs a decoder"):
        perplexity(config, params, list(range(1, 70)), num_tokens=64, window=32)
    with pytest.raises(ValueError, match="is an encoder: it does not generate"):
        generate(config, params, [[1, 2]], max_new_tokens=2)


def test_encoder_qat_distills_the_teachers_hidden_states(tiny_bert):
    """QAT of a 4-bit BERT with the hidden-state loss: the loss falls, and on held-out
    token windows the converted int4 student is closer to the float teacher (numpy MSE)
    than the round-to-nearest start; without a teacher, training refuses in one line."""
    from jaxopt_llm.train import TrainOptions, convert, run_training
    from jaxopt_llm.train.qat import qat_recipe

    _, config, params = tiny_bert
    w4 = BUILTIN_RECIPES["w4"]  # its block linears (the int8 word table is a floor here)
    blocks_only = dataclasses.replace(w4, stages=(dataclasses.replace(
        w4.stages[0], rules=w4.stages[0].rules[:1]),))
    config, student = qat_recipe(blocks_only)(config, params)
    ids = np.random.default_rng(5).integers(1, VOCAB, 4000)
    held_out = jnp.asarray(np.random.default_rng(6).integers(1, VOCAB, (4, 32)), jnp.int32)

    def mse(p):
        ours = np.asarray(forward(config, p, held_out)[0], np.float64)
        teacher = np.asarray(forward(config, params, held_out)[0], np.float64)
        return float(np.mean((ours - teacher) ** 2))

    before = mse(convert(student))
    result = run_training(config, student, TrainOptions(steps=30, learning_rate=1e-4),
                          ids, batch=4, seq=32, teacher=params)
    losses = [r["hidden_mse"] for r in result.history]
    assert losses[0] > 0 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert [r["loss"] for r in result.history] == losses
    after = mse(convert(result.params))
    assert after < 0.3 * before, (before, after)
    with pytest.raises(ValueError, match=r"teacher=None: a bert model is an encoder; it "
                                         r"trains by distilling a teacher's hidden states"):
        run_training(config, student, TrainOptions(steps=2), ids, batch=2, seq=16)


@pytest.mark.slow
def test_cli_train_distils_an_encoder_into_a_working_artifact(capsys, minilm, monkeypatch,
                                                               tmp_path):
    """`train` on MiniLM: the hidden-state MSE to the float model falls, the int4 artifact
    loads back, and its embeddings stay close to the float model's (numpy cosine)."""
    from jaxopt_llm.io import loader
    from jaxopt_llm.io.artifact import load_artifact

    monkeypatch.setattr(loader, "load_model", lambda spec: minilm)
    out_dir = tmp_path / "minilm-w4"
    code, out, err = _run(capsys, "train", "--model", "minilm-l6", "--recipe", "w4g128",
                          "--steps", "12", "--batch", "2", "--seq", "32", "--lr", "5e-5",
                          "--out", str(out_dir), "--json")
    assert code == 0, err
    result = json.loads(out)
    log = [json.loads(line) for line in open(result["log"])]
    assert len(log) == 12 and all("hidden_mse" in r for r in log)
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]])
    trained = load_artifact(out_dir)
    assert trained.config.is_encoder
    texts = ["The cat sat on the mat.", "Functions return values.", "A dog barked loudly."]
    ours = embed(trained.config, trained.params, minilm.tokenizer, texts)
    ref = embed(minilm.config, minilm.params, minilm.tokenizer, texts)
    cosine = np.sum(np.asarray(ours) * np.asarray(ref), axis=-1)
    assert cosine.min() > 0.9
    from jaxopt_llm.weights import QuantizedWeight

    four_bit = [leaf for leaf in flatten(trained.params).values()
                if isinstance(leaf, QuantizedWeight) and leaf.bits == 4]
    assert len(four_bit) == 6 * 6  # q, k, v, o, up, down in each of the 6 layers
    assert param_bytes(trained.params) < param_bytes(minilm.params) - 15e6
