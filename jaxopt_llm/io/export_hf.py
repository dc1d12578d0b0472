"""Export to a Hugging Face checkpoint directory transformers loads on its own.

The inverse of `hf.load_hf_directory`: `config.json` (the model's family as
transformers spells it), `model.safetensors` with HF tensor names and layouts (Llama
kernels stored (out, in), GPT-2's Conv1D (in, out)), `generation_config.json`, and the
tokenizer (`tokenizer.json` with a `tokenizer_config.json` naming its special tokens).
Weights are written as float32: a quantized, pruned or low-rank weight is widened to the
dense weight it stands for (transformers has no equivalent of our leaves that it loads
without extra packages); `plan_hf` lists those, and `strict` refuses instead. Written
into a temporary sibling directory and swapped in atomically (`atomic.replace_dir`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from jaxopt_llm import tree
from jaxopt_llm.io import atomic
from jaxopt_llm.io.hf import hf_to_ours
from jaxopt_llm.io.tokenizer import Tokenizer
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.weights import WeightLeaf, materialize

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}
MARKER = "jaxopt_llm_export.json"  # names a directory as a previous export


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One parameter: its HF name, what it is here, and how it is written ("float", or
    "widened": a compressed leaf written as its dense float32 weight)."""

    path: str
    name: str
    stored_as: str
    how: str
    written_as: str = "F32"  # always float32 (named as export_gguf's rows name types)


def _hf_names(config: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our path → (HF name, transpose?) for every tensor this config has."""
    if config.family == "gpt2":
        names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                 "transformer.ln_f.bias"]
        for i in range(config.num_layers):
            names += [f"transformer.h.{i}.{ln}.{p}" for ln in ("ln_1", "ln_2")
                      for p in ("weight", "bias")]
            names += [f"transformer.h.{i}.{part}.{p}" for part in (
                "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") for p in ("weight",
                                                                                 "bias")]
    elif config.family == "bert":
        names = [f"embeddings.{e}_embeddings.weight" for e in ("word", "position", "token_type")]
        names += ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
        for i in range(config.num_layers):
            names += [f"encoder.layer.{i}.{part}.{p}" for part in (
                "attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                "output.dense", "output.LayerNorm") for p in ("weight", "bias")]
    else:
        names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        for i in range(config.num_layers):
            names += [f"model.layers.{i}.{n}.weight" for n in ("input_layernorm",
                                                                 "post_attention_layernorm")]
            names += [f"model.layers.{i}.self_attn.{p}_proj.{k}" for p in "qkvo"
                      for k in ("weight", "bias")]
            names += [f"model.layers.{i}.mlp.{p}_proj.{k}" for p in ("gate", "up", "down")
                      for k in ("weight", "bias")]
    out = {}
    for name in names:
        path, transpose = hf_to_ours(name, config)
        out[path] = (name, transpose)
    return out


def plan_hf(config: ModelConfig, params: Any, *, strict: bool = False) -> list[HFTensor]:
    """What `export_hf` writes for each parameter, before any work.

    Args:
        config: the model config (a family transformers knows: llama, mistral, qwen2, gpt2,
            bert).
        params: the parameters (any representation).
        strict: refuse (ValueError) where a compressed weight would be widened.

    Returns:
        One `HFTensor` per parameter.

    Example:
        >>> rows = plan_hf(config, params)  # doctest: +SKIP
    """
    if config.model_type not in _ARCHITECTURES:
        raise ValueError(f"HF export supports model types {list(_ARCHITECTURES)}, got "
                         f"{config.model_type!r}")
    names = _hf_names(config)
    rows = []
    for path, leaf in tree.flatten(params).items():
        if path not in names:
            raise ValueError(f"HF export: parameter {path!r} has no transformers name")
        compressed = isinstance(leaf, WeightLeaf)
        stored = leaf.describe() if compressed else str(np.dtype(leaf.dtype))
        if strict and compressed:
            raise ValueError(f"HF export --strict: {path} ({stored}) would be widened to "
                             "float32; transformers loads plain float weights")
        rows.append(HFTensor(path, names[path][0], stored, "widened" if compressed else "float"))
    return rows


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The transformers `config.json` of a model config.

    Args:
        config: the model config.

    Returns:
        The JSON dict (`hf.config_from_hf` reads it back to `config`).

    Example:
        >>> from jaxopt_llm.models import ModelConfig
        >>> hf_config(ModelConfig.tiny())["architectures"]
        ['LlamaForCausalLM']
    """
    common = {"architectures": [_ARCHITECTURES[config.model_type]],
              "model_type": config.model_type, "vocab_size": config.vocab_size,
              "bos_token_id": config.bos_token_id,
              "eos_token_id": (list(config.eos_token_ids) if len(config.eos_token_ids) > 1
                               else (config.eos_token_ids[0] if config.eos_token_ids else None)),
              "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": "float32"}
    if config.family == "bert":
        if config.num_heads * config.head_dim != config.hidden_size:
            raise ValueError(f"HF export: transformers' BERT needs num_heads·head_dim = "
                             f"hidden_size; this model has {config.num_heads}·"
                             f"{config.head_dim} ≠ {config.hidden_size} (attention heads were "
                             "pruned)")
        return {**common, "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size,
                "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
                "max_position_embeddings": config.max_position_embeddings,
                "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.norm_eps,
                "hidden_act": "gelu", "position_embedding_type": "absolute"}
    if config.family == "gpt2":
        return {**common, "n_embd": config.hidden_size, "n_inner": config.intermediate_size,
                "n_layer": config.num_layers, "n_head": config.num_heads,
                "n_positions": config.max_position_embeddings,
                "layer_norm_epsilon": config.norm_eps, "activation_function": "gelu_new"}
    out = {**common, "hidden_size": config.hidden_size,
           "intermediate_size": config.intermediate_size,
           "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
           "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
           "max_position_embeddings": config.max_position_embeddings,
           "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
           "hidden_act": "silu", "attention_bias": config.qkv_bias,
           "mlp_bias": config.mlp_bias}
    if config.o_bias != config.qkv_bias and config.model_type != "qwen2":
        raise ValueError("HF export: transformers' Llama has one attention_bias for q/k/v and "
                         f"o; this model has qkv_bias={config.qkv_bias}, o_bias={config.o_bias}")
    if config.rope_scaling is not None:
        scaling = dict(config.rope_scaling)
        if scaling.get("rope_type") == "freq_factors":
            raise ValueError("HF export: per-frequency rope factors (from a GGUF file) have "
                             "no transformers config field")
        out["rope_scaling"] = {k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in scaling.items()}
    if config.sliding_window is not None:
        out["sliding_window"] = config.sliding_window
    if config.model_type == "qwen2":
        out["use_sliding_window"] = config.sliding_window is not None
    return out


def export_hf(config: ModelConfig, params: Any, tokenizer: Tokenizer | None,
              out: str | Path, *, strict: bool = False) -> tuple[Path, list[HFTensor]]:
    """Write an HF checkpoint directory (atomically).

    Args:
        config: the model config.
        params: the parameters (compressed leaves are widened; see the module doc).
        tokenizer: the tokenizer, written as tokenizer.json + tokenizer_config.json; None
            writes none.
        out: the directory: new, or a previous export (replaced whole).
        strict: refuse instead of widening a compressed weight.

    Returns:
        (the directory, `plan_hf`'s rows).

    Example:
        >>> export_hf(m.config, params, m.tokenizer, "smol-hf")  # doctest: +SKIP
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / MARKER).is_file())):
        raise ValueError(f"HF export: {str(out)!r} exists and is not a previous export; "
                         "refusing to replace it")
    rows = plan_hf(config, params, strict=strict)
    hf = hf_config(config)
    names = _hf_names(config)
    flat = tree.flatten(params)
    tensors = {}
    for row in rows:
        dense = np.asarray(materialize(flat[row.path]), np.float32)
        tensors[row.name] = np.ascontiguousarray(dense.T if names[row.path][1] else dense)
    with atomic.staged_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        generation = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
        (tmp / MARKER).write_text(json.dumps({"format": "hf", "tensors": len(rows)}) + "\n")
    return out, rows


def _write_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    tokenizer.backend.save(str(directory / "tokenizer.json"))

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.backend.id_to_token(token_id)

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces":
              False, "bos_token": text(tokenizer.bos_token_id),
              "eos_token": text(tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None),
              "pad_token": text(tokenizer.pad_token_id), "model_max_length": 1 << 30}
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


__all__ = ["HFTensor", "MARKER", "export_hf", "hf_config", "plan_hf"]
