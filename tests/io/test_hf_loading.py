"""HF checkpoint directories: each kind of bad input fails with one clear message."""

import json
import shutil

import numpy as np
import pytest

from jaxopt_llm.io.hf import load_hf_directory
from jaxopt_llm.io.safetensors_file import read_safetensors, write_safetensors

CONFIG = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "tie_word_embeddings": True}


def _tensors(config):
    rng = np.random.default_rng(0)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "model.layers.0.input_layernorm.weight": (d,),
              "model.layers.0.post_attention_layernorm.weight": (d,),
              "model.layers.0.self_attn.q_proj.weight": (d, d),
              "model.layers.0.self_attn.k_proj.weight": (kv, d),
              "model.layers.0.self_attn.v_proj.weight": (kv, d),
              "model.layers.0.self_attn.o_proj.weight": (d, d),
              "model.layers.0.mlp.gate_proj.weight": (f, d),
              "model.layers.0.mlp.up_proj.weight": (f, d),
              "model.layers.0.mlp.down_proj.weight": (d, f)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    write_safetensors(tmp_path / "model.safetensors", _tensors(CONFIG))
    return tmp_path


def test_loads_and_transposes(checkpoint):
    config, params = load_hf_directory(checkpoint)
    tensors = _tensors(CONFIG)
    assert config.num_kv_heads == 1 and config.tie_word_embeddings
    np.testing.assert_array_equal(params["layers_0"]["attn"]["k_proj"]["kernel"],
                                  tensors["model.layers.0.self_attn.k_proj.weight"].T)


def test_safetensors_round_trip_bf16(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    data = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
            "b": np.arange(4, dtype=np.int8)}
    write_safetensors(tmp_path / "x.safetensors", data)
    back = read_safetensors(tmp_path / "x.safetensors")
    for key in data:
        assert back[key].dtype == data[key].dtype
        np.testing.assert_array_equal(back[key], data[key])


def test_truncated_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: tensor .* is truncated or corrupt"):
        load_hf_directory(checkpoint)


def test_corrupted_safetensors_header(checkpoint):
    path = checkpoint / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\xff\xfe{{"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted safetensors header"):
        load_hf_directory(checkpoint)


def test_tiny_file_is_not_safetensors(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_hf_directory(checkpoint)


def test_unsupported_model_type(checkpoint):
    (checkpoint / "config.json").write_text(json.dumps({**CONFIG, "model_type": "falcon"}))
    with pytest.raises(ValueError, match=r"model_type 'falcon' is not supported; supported: "
                                         r"\['bert', 'gpt2', 'llama', 'mistral', 'qwen2'"):
        load_hf_directory(checkpoint)


def test_shape_disagrees_with_config(checkpoint):
    (checkpoint / "config.json").write_text(json.dumps({**CONFIG, "intermediate_size": 10}))
    with pytest.raises(ValueError, match=r"down_proj.weight' has shape \(8, 12\) but the config "
                                         r"expects \(8, 10\)"):
        load_hf_directory(checkpoint)


def test_missing_tensor(checkpoint):
    tensors = _tensors(CONFIG)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    write_safetensors(checkpoint / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"1 tensors the config needs are missing.*up_proj"):
        load_hf_directory(checkpoint)


def test_more_layers_in_weights_than_config(checkpoint):
    (checkpoint / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="tensors the config needs are missing"):
        load_hf_directory(checkpoint)


def test_missing_config_and_weights(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_directory(tmp_path / "nothing")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors weights found"):
        load_hf_directory(checkpoint)


def test_index_lists_missing_shard(checkpoint):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lists shard 'model-00002-of-00002.safetensors'"):
        load_hf_directory(checkpoint)


def test_write_is_atomic(tmp_path):
    target = tmp_path / "w.safetensors"
    write_safetensors(target, {"a": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="cannot be saved"):
        write_safetensors(target, {"a": np.ones(3, np.float32), "b": np.array(["x"])})
    np.testing.assert_array_equal(read_safetensors(target)["a"], np.ones(3, np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize(("edit", "message"), [
    ({"num_attention_heads": 0}, r"config.json: num_attention_heads must be a positive integer, "
                                 r"got 0"),
    ({"hidden_size": "64"}, r"config.json: hidden_size must be a positive integer, got '64'"),
    ({"num_hidden_layers": 1.0}, r"num_hidden_layers must be a positive integer, got 1.0"),
    ({"num_key_value_heads": True}, r"num_key_value_heads must be a positive integer, got True"),
    ({"vocab_size": -16}, r"vocab_size must be a positive integer, got -16"),
    ({"num_key_value_heads": 3}, r"config.json: config num_heads=2 must be a multiple of "
                                 r"num_kv_heads=3"),
    ({"rms_norm_eps": "tiny"}, r"config.json: config norm_eps must be a finite positive number"),
    ({"tie_word_embeddings": "yes"}, None),  # HF reads truthiness: bool("yes")
])
def test_config_values_are_checked_by_type_and_range(checkpoint, edit, message):
    (checkpoint / "config.json").write_text(json.dumps({**CONFIG, **edit}))
    if message is None:
        load_hf_directory(checkpoint)
        return
    with pytest.raises(ValueError, match=message):
        load_hf_directory(checkpoint)


def test_model_config_checks_every_field():
    from jaxopt_llm.models import ModelConfig

    for field, value, message in [
        ("hidden_size", "576",
         "config hidden_size must be a positive integer up to 2147483647, got '576'"),
        ("num_layers", 0, "config num_layers must be a positive integer up to 2147483647, got 0"),
        ("norm_eps", float("nan"), "config norm_eps must be a finite positive number"),
        ("qkv_bias", 1, "config qkv_bias must be true or false, got 1"),
        ("sliding_window", 0, "config sliding_window must be null or a positive integer"),
        ("eos_token_ids", (2, -1),
         "config token ids must be non-negative integers up to 2147483647, got -1"),
        ("head_dim", 3, "config head_dim=3 must be even: rotary embeddings turn pairs"),
        ("type_vocab_size", -1, "config type_vocab_size must be a non-negative integer, got -1"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ModelConfig.tiny(**{field: value})
    with pytest.raises(ValueError, match="type_vocab_size must be at least 1 for a bert model"):
        ModelConfig.tiny("bert", type_vocab_size=0)
