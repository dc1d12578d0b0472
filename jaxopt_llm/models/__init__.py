"""Model families. `build_model(config)` returns the Flax module for a config, `forward`
runs it, and `family_spec(config)` says what the family calls its parameters."""

from __future__ import annotations

from jaxopt_llm.models.config import HF_MODEL_TYPES, SUPPORTED_FAMILIES, ModelConfig
from jaxopt_llm.models.family import FamilySpec, family_spec
from jaxopt_llm.models.forward import (
    build_model,
    forward,
    init_cache,
    init_params,
    model_mask,
    param_shapes,
)

__all__ = ["HF_MODEL_TYPES", "SUPPORTED_FAMILIES", "FamilySpec", "ModelConfig", "build_model",
           "family_spec", "forward", "init_cache", "init_params", "model_mask",
           "param_shapes"]
