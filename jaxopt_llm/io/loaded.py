"""`LoadedModel`: what every loader returns (HF directory, GGUF file, artifact)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotation only: loading this module must not import JAX
    from jaxopt_llm.models import ModelConfig


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run.

    Attributes:
      config: the architecture.
      params: the parameter tree (typed weight leaves when loaded from an artifact).
      tokenizer: a `jaxopt_llm.io.tokenizer.Tokenizer`, or None (an artifact saved without).
      source: the file or directory it was read from.
      recipe: the recipe an artifact was made with (as a dict), else None.
      extra: an artifact's provenance (source model, dense bytes, …), else None.
      format_version / jaxopt_llm_version: an artifact's format and writer, else None.
    """

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Any
    source: str
    recipe: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None
    format_version: int | None = None
    jaxopt_llm_version: str | None = None
