"""jaxopt-llm: a compiler for LLM weights in JAX.

Load a real LLM into Flax, rewrite its parameters with pure transforms, run it
under jit on one device or a mesh, and measure what was gained and lost.
"""

from jaxopt_llm.data import pydoc_text, text_sha256
from jaxopt_llm.evaluate import PerplexityResult, perplexity
from jaxopt_llm.generation import GenerationResult, Sampling, generate
from jaxopt_llm.io.loader import LoadedModel, load_model
from jaxopt_llm.models import ModelConfig, build_model
from jaxopt_llm.weights import attend, embed, linear, param_bytes, register_linear

__all__ = [
    "GenerationResult",
    "LoadedModel",
    "ModelConfig",
    "PerplexityResult",
    "Sampling",
    "attend",
    "build_model",
    "embed",
    "generate",
    "linear",
    "load_model",
    "param_bytes",
    "perplexity",
    "pydoc_text",
    "register_linear",
    "text_sha256",
]
