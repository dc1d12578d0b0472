"""Model families. `build_model(config)` returns the Flax module for a config."""

from __future__ import annotations

import flax.linen as nn

from jaxopt_llm.models.config import HF_MODEL_TYPES, SUPPORTED_FAMILIES, ModelConfig
from jaxopt_llm.models.gpt2 import GPT2Model
from jaxopt_llm.models.llama import LlamaModel


def build_model(config: ModelConfig) -> nn.Module:
    if config.family == "llama":
        return LlamaModel(config)
    if config.family == "gpt2":
        return GPT2Model(config)
    raise ValueError(f"unknown family {config.family!r}; supported: {SUPPORTED_FAMILIES}")


__all__ = ["HF_MODEL_TYPES", "SUPPORTED_FAMILIES", "ModelConfig", "build_model"]
