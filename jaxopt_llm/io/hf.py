"""Load a Hugging Face checkpoint directory: config.json + *.safetensors (sharded or not)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxopt_llm.io.params import assemble_params
from jaxopt_llm.io.safetensors_file import read_safetensors
from jaxopt_llm.models.config import HF_MODEL_TYPES, ModelConfig
from jaxopt_llm.tree import freeze

# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(.*\.)?(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias"
                      r"|embeddings\.position_ids|embeddings\.token_type_ids)$")
# BERT heads a sentence encoder does not use: the CLS pooler (mean pooling is used instead)
# and pre-training heads (masked-LM, next-sentence).
_BERT_IGNORED = re.compile(r"(bert\.)?pooler\..*|cls\..*")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """Translate an HF config.json dict into our ModelConfig.

    Args:
        hf: the parsed config.json.
        source: the file's name, for error messages.

    Returns:
        The config (family from `HF_MODEL_TYPES`).

    Raises:
        ValueError: an unsupported model_type or option, naming `source`.

    Example:
        >>> hf = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
        ...           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ...           max_position_embeddings=64)
        >>> config_from_hf(hf, "config.json").head_dim
        8
    """
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"supported: {sorted(HF_MODEL_TYPES)}"
        )
    family = HF_MODEL_TYPES[model_type]
    _check_positive_ints(hf, source, {"gpt2": _GPT2_INTS, "bert": _BERT_INTS}.get(family,
                                                                                _LLAMA_INTS))
    try:
        if family == "gpt2":
            return _gpt2_config(hf, model_type)
        if family == "bert":
            return _bert_config(hf, model_type, source)
        return _llama_config(hf, model_type, source)
    except KeyError as err:
        raise ValueError(f"{source}: config.json lacks the required key {err}") from None
    except ValueError as err:  # ModelConfig's own checks (ranges, divisibility)
        raise ValueError(f"{source}: {err}") from None
    except (TypeError, AttributeError, OverflowError) as err:  # e.g. a list where a dict goes
        raise ValueError(f"{source}: a config.json value has the wrong type ({err})") from None


# config.json keys that must be positive integers when present (False: optional)
_LLAMA_INTS = {"vocab_size": True, "hidden_size": True, "intermediate_size": True,
               "num_hidden_layers": True, "num_attention_heads": True,
               "num_key_value_heads": False, "head_dim": False,
               "max_position_embeddings": False, "sliding_window": False}
_BERT_INTS = {"vocab_size": True, "hidden_size": True, "intermediate_size": True,
              "num_hidden_layers": True, "num_attention_heads": True,
              "max_position_embeddings": True, "type_vocab_size": False}
_GPT2_INTS = {"vocab_size": True, "n_embd": True, "n_head": True, "n_layer": True,
              "n_positions": True, "n_inner": False}


def _check_positive_ints(hf: dict[str, Any], source: str, keys: dict[str, bool]) -> None:
    """Each key a positive integer (not a bool, a string or a float), or absent/null if
    optional; a missing required key is left to the KeyError above."""
    for key, required in keys.items():
        if key not in hf or (hf[key] is None and not required):
            continue
        value = hf[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _llama_config(hf: dict[str, Any], model_type: str, source: str) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported; supported: ['silu']")
    heads = hf["num_attention_heads"]
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    sliding = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        sliding = None
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="llama",
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta) if _is_number(theta) else theta,  # else ModelConfig says so
        rope_scaling=None if kind == "default" else freeze(rope),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=sliding,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
    )


def _bert_config(hf: dict[str, Any], model_type: str, source: str) -> ModelConfig:
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported for bert; "
                         "supported: ['gelu'] (exact GELU)")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"{source}: position_embedding_type {position!r} is not supported; "
                         "supported: ['absolute']")
    if hf.get("is_decoder"):
        raise ValueError(f"{source}: is_decoder=true (a causal BERT) is not supported; "
                         "bert models are read as encoders")
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    if width % heads:
        raise ValueError(f"{source}: hidden_size={width} is not a multiple of "
                         f"num_attention_heads={heads}")
    return ModelConfig(
        family="bert",
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=width,
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=width // heads,
        max_position_embeddings=hf["max_position_embeddings"],
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        type_vocab_size=hf.get("type_vocab_size") or 2,
    )


# BERT tensors under encoder.layer.{i}. → ours under layer_{i}/
_BERT_LAYER = {"attention.self.query": "attn/query", "attention.self.key": "attn/key",
               "attention.self.value": "attn/value", "attention.output.dense": "attn/output",
               "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "mlp/intermediate",
               "output.dense": "mlp/output", "output.LayerNorm": "mlp_norm"}
_BERT_EMBEDDINGS = {"word_embeddings": "word_embeddings", "position_embeddings":
                    "position_embeddings", "token_type_embeddings": "token_type_embeddings"}


def _bert_to_ours(name: str) -> tuple[str, bool] | None:
    name = name.removeprefix("bert.")
    if m := re.fullmatch(r"embeddings\.(\w+)\.weight", name):
        if m[1] in _BERT_EMBEDDINGS:
            return f"{_BERT_EMBEDDINGS[m[1]]}/embedding", False
    if m := re.fullmatch(r"embeddings\.LayerNorm\.(weight|bias|gamma|beta)", name):
        return f"embeddings_norm/{'scale' if m[1] in ('weight', 'gamma') else 'bias'}", False
    if m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)", name):
        target = _BERT_LAYER.get(m[2])
        if target is None:
            return None
        if target.endswith("norm"):
            return f"layer_{m[1]}/{target}/{'scale' if m[3] in ('weight', 'gamma') else 'bias'}", \
                False
        leaf = "kernel" if m[3] == "weight" else "bias"
        return f"layer_{m[1]}/{target}/{leaf}", leaf == "kernel"
    return None


def _gpt2_config(hf: dict[str, Any], model_type: str) -> ModelConfig:
    width, heads = hf["n_embd"], hf["n_head"]
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"GPT-2 option {flag}=true is not supported")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 option scale_attn_weights=false is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation_function {act!r} is not supported; "
                         "supported: ['gelu_new', 'gelu_pytorch_tanh']")
    return ModelConfig(
        family="gpt2",
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=width,
        intermediate_size=hf.get("n_inner") or 4 * width,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=width // heads,
        max_position_embeddings=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=True,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
    )


def hf_to_ours(name: str, config: ModelConfig) -> tuple[str, bool] | None:
    """HF tensor name -> (our path, transpose?) or None for an unknown name.

    Args:
        name: the checkpoint's tensor name.
        config: the model's config (its family decides the mapping).

    Returns:
        (our "/"-joined path, whether the tensor is stored (d_out, d_in)), or None.

    Example:
        >>> from jaxopt_llm.models import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> hf_to_ours("model.layers.0.self_attn.q_proj.weight", config)
        ('layers_0/attn/q_proj/kernel', True)
    """
    if config.family == "bert":
        return _bert_to_ours(name)
    if config.family == "gpt2":
        name = name.removeprefix("transformer.")
        if m := re.fullmatch(r"(wte|wpe)\.weight", name):
            return f"{m[1]}/embedding", False
        if m := re.fullmatch(r"ln_f\.(weight|bias)", name):
            return f"ln_f/{'scale' if m[1] == 'weight' else 'bias'}", False
        if m := re.fullmatch(r"h\.(\d+)\.(ln_1|ln_2)\.(weight|bias)", name):
            return f"h_{m[1]}/{m[2]}/{'scale' if m[3] == 'weight' else 'bias'}", False
        if m := re.fullmatch(r"h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)\.(weight|bias)", name):
            leaf = "kernel" if m[4] == "weight" else "bias"
            return f"h_{m[1]}/{m[2]}/{m[3]}/{leaf}", False  # Conv1D is already (in, out)
        return None
    name = name.removeprefix("model.")
    if name == "embed_tokens.weight":
        return "embed_tokens/embedding", False
    if name == "norm.weight":
        return "norm/scale", False
    if name == "lm_head.weight":
        return "lm_head/kernel", True
    if m := re.fullmatch(r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
                         name):
        norm = "input_norm" if m[2] == "input_layernorm" else "post_attention_norm"
        return f"layers_{m[1]}/{norm}/scale", False
    if m := re.fullmatch(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)", name):
        block = "attn" if m[2] == "self_attn" else "mlp"
        leaf = "kernel" if m[4] == "weight" else "bias"
        return f"layers_{m[1]}/{block}/{m[3]}/{leaf}", leaf == "kernel"
    return None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ValueError(f"{index}: lists shard {f.name!r}, which is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{directory}: no *.safetensors weights found (expected model.safetensors or a "
            "model.safetensors.index.json with shards)"
        )
    return files


def load_hf_directory(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from an HF checkpoint directory; weights become float32.

    Args:
        directory: holds config.json and *.safetensors (sharded with an index or not).

    Returns:
        (ModelConfig, parameter tree).

    Raises:
        ValueError: missing files, unknown or missing tensors, or shapes that disagree
            with the config, naming the file.

    Example:
        >>> config, params = load_hf_directory("path/to/hf_dir")  # doctest: +SKIP
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ValueError(f"{directory}: not an HF checkpoint directory (no config.json)")
    config = config_from_hf(_read_json(config_path), str(config_path))
    flat: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    transposed: set[str] = set()
    for file in _safetensors_files(directory):
        for name, array in read_safetensors(file).items():
            if _IGNORED.fullmatch(name) or (config.family == "bert"
                                            and _BERT_IGNORED.fullmatch(name)):
                continue
            target = hf_to_ours(name, config)
            if target is None:
                raise ValueError(f"{file}: unexpected tensor {name!r} for a {config.model_type} "
                                 "model")
            path, transpose = target
            flat[path] = array.T if transpose else array
            origin[path] = f"{file.name}:{name}"
            if transpose:
                transposed.add(path)
    if config.tie_word_embeddings and config.family == "llama":
        flat.pop("lm_head/kernel", None)  # some tied checkpoints store the shared head too
    return config, assemble_params(config, flat, str(directory), origin,
                                   frozenset(transposed))
