"""Model configuration shared by every architecture family.

One frozen, hashable dataclass so it can be a static argument of `jax.jit`.
Loaders (HF config.json, GGUF metadata) translate their formats into it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxopt_llm.models.kv_cache import check_kv_cache
from jaxopt_llm.tree import freeze

SUPPORTED_FAMILIES = ("llama", "gpt2", "bert")
ENCODER_FAMILIES = ("bert",)
# HF `model_type` values and the family that implements them.
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "smollm2": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A model's architecture: frozen and hashable, so it is a static argument of `jax.jit`.

    `family` picks the implementation ("llama" for Llama 2/3, Mistral, Qwen2 and SmolLM2;
    "gpt2"; "bert" for BERT encoders such as all-MiniLM-L6-v2); `model_type` keeps the
    checkpoint's own name for artifacts. Loaders fill it
    from an HF config.json or GGUF metadata; structured pruning returns a new one.

    Example:
        >>> config = ModelConfig.tiny()
        >>> config.num_heads // config.num_kv_heads  # query heads per kv head
        2
    """
    family: str  # "llama" (Llama 2/3, Mistral, Qwen2, SmolLM2), "gpt2" or "bert" (encoder)
    model_type: str  # the original HF model_type (or GGUF architecture), kept for artifacts
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hashable form of HF's rope_scaling / rope_parameters (minus rope_theta); None = plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias): q/k/v carry a bias
    o_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj; Qwen2's does not
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: keys further back than this are masked
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    type_vocab_size: int = 0  # BERT: rows of the token-type (segment) table; 0 elsewhere
    # KV cache storage (models/kv_cache.py): "float" (the activation dtype) or "int8" (per
    # token and head scales; prefill and evaluation round keys and values the same way)
    kv_cache: str = "float"

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"model family {self.family!r} is not supported; supported: {SUPPORTED_FAMILIES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
                raise ValueError(f"config {name} must be a positive integer up to 2147483647, got "
                                 f"{value!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"config {name} must be a finite positive number, got {value!r}")
            object.__setattr__(self, name, float(value))  # an int here would overflow int32
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config {name} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.sliding_window is not None and (
                isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
                or not 0 < self.sliding_window < 2**31):
            raise ValueError(f"config sliding_window must be null or a positive integer up to "
                             f"2147483647, got "
                             f"{self.sliding_window!r}")
        for token in (self.bos_token_id, *self.eos_token_ids):
            if token is not None and (isinstance(token, bool) or not isinstance(token, int)
                                      or not 0 <= token < 2**31):
                raise ValueError(f"config token ids must be non-negative integers up to "
                                 f"2147483647, got "
                                 f"{token!r}")
        if isinstance(self.type_vocab_size, bool) or not isinstance(self.type_vocab_size, int) \
                or not 0 <= self.type_vocab_size < 2**31:
            raise ValueError(f"config type_vocab_size must be a non-negative integer, got "
                             f"{self.type_vocab_size!r}")
        if self.family == "bert" and self.type_vocab_size < 1:
            raise ValueError("config type_vocab_size must be at least 1 for a bert model "
                             f"(its token-type table), got {self.type_vocab_size}")
        check_kv_cache(self.kv_cache, "config kv_cache")
        _check_rope_scaling(self.rope_scaling)
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"config head_dim={self.head_dim} must be even: rotary embeddings "
                             "turn pairs of dimensions")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def tiny(cls, family: str = "llama", **overrides: Any) -> ModelConfig:
        """A tiny config of `family` (vocab 64, width 32, 2 layers, 4 heads of 8) for examples
        and tests.

        Args:
          family: "llama" (2 kv heads), "gpt2" (4 kv heads, tied embeddings) or "bert"
            (an encoder: 4 kv heads, 2 token types, eps 1e-12).
          **overrides: any other field.

        Returns:
          The config.

        Example:
          >>> ModelConfig.tiny(num_layers=1).num_layers
          1
        """
        fields = {"family": family, "model_type": family, "vocab_size": 64, "hidden_size": 32,
                  "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "head_dim": 8,
                  "max_position_embeddings": 64, "tie_word_embeddings": family == "gpt2"}
        if family != "llama":
            fields["num_kv_heads"] = 4
        if family == "bert":
            fields.update(type_vocab_size=2, norm_eps=1e-12)
        return cls(**{**fields, **overrides})

    @property
    def is_encoder(self) -> bool:
        """True for an encoder (bidirectional attention, hidden states out, no generation)."""
        return self.family in ENCODER_FAMILIES

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """HF's rope_scaling as a dict, or None for plain RoPE."""
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON data (rope_scaling as a dict, eos ids as a list), as artifacts store it.

        Returns:
            {field: value} for every field.
        """
        out = dataclasses.asdict(self)
        out["rope_scaling"] = self.rope_scaling_dict
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`.

        Args:
            data: a dict of config fields (unknown keys are an error).

        Returns:
            The `ModelConfig`.
        """
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = freeze(data["rope_scaling"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids") or ())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown model config keys {sorted(unknown)}; expected {sorted(known)}"
            )
        return cls(**data)


# rope_scaling kinds → the numbers each needs (finite and positive).
ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                "original_max_position_embeddings"),
                     "freq_factors": ()}


def _positive_number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and value > 0)


def _check_rope_scaling(scaling: Any) -> None:
    """rope_scaling (frozen pairs) names a supported kind with the finite positive numbers
    it needs; anything else is a ValueError naming the field."""
    if scaling is None:
        return
    try:
        data = dict(scaling)
    except (TypeError, ValueError):
        raise ValueError(f"config rope_scaling must be null or an object, got {scaling!r}"
                         ) from None
    kind = data.get("rope_type", data.get("type", "default"))
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"config rope_scaling type {kind!r} is not supported; supported: "
                         f"{', '.join(ROPE_SCALING_KEYS)}")
    for key in ROPE_SCALING_KEYS[kind]:
        if not _positive_number(data.get(key)):
            raise ValueError(f"config rope_scaling {key} must be a finite positive number for "
                             f"{kind} scaling, got {data.get(key)!r}")
    if kind == "llama3" and not data["high_freq_factor"] > data["low_freq_factor"]:
        raise ValueError("config rope_scaling high_freq_factor must exceed low_freq_factor")
    if kind == "freq_factors":
        factors = data.get("factors")
        if not isinstance(factors, (list, tuple)) or not factors or not all(
                _positive_number(f) for f in factors):
            raise ValueError("config rope_scaling factors must be a non-empty list of finite "
                             "positive numbers")
