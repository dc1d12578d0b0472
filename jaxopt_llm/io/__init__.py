"""Loading checkpoints (HF directories, GGUF files) and their tokenizers."""

from jaxopt_llm.io.loader import REGISTRY, LoadedModel, load_model, resolve_model_path

__all__ = ["REGISTRY", "LoadedModel", "load_model", "resolve_model_path"]
