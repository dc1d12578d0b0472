"""jaxopt-llm: a compiler for LLM weights in JAX.

Load a real LLM into Flax, rewrite its parameters with pure transforms, run it under
jit on one device or a mesh, and measure what was gained and lost.
"""

from jaxopt_llm.data import pydoc_text, text_sha256
from jaxopt_llm.evaluate import PerplexityResult, perplexity
from jaxopt_llm.generation import GenerationResult, Sampling, generate
from jaxopt_llm.io.artifact import load_artifact, save_artifact
from jaxopt_llm.io.loader import LoadedModel, load_model
from jaxopt_llm.models import ModelConfig, build_model
from jaxopt_llm.pipeline import (
    Recipe,
    Stage,
    chain,
    named_chain,
    read_recipe_file,
    save_recipe,
)
from jaxopt_llm.plan import Plan, plan
from jaxopt_llm.recipes import BUILTIN_RECIPES, load_recipe
from jaxopt_llm.rules import BLOCK_LINEARS, KEEP, Rule, rule
from jaxopt_llm.transforms import Op, OpOptions, available_ops, register_op
from jaxopt_llm.weights import (
    FakeQuantWeight,
    LowRankWeight,
    MaskedWeight,
    NMSparseWeight,
    QuantizedWeight,
    QuantSpec,
    WeightLeaf,
    attend,
    embed,
    linear,
    materialize,
    nbytes,
    param_bytes,
    quantize_weight,
)

__all__ = [
    "BLOCK_LINEARS",
    "BUILTIN_RECIPES",
    "FakeQuantWeight",
    "GenerationResult",
    "KEEP",
    "LoadedModel",
    "LowRankWeight",
    "MaskedWeight",
    "ModelConfig",
    "NMSparseWeight",
    "Op",
    "OpOptions",
    "PerplexityResult",
    "Plan",
    "QuantSpec",
    "QuantizedWeight",
    "Recipe",
    "Rule",
    "Sampling",
    "Stage",
    "WeightLeaf",
    "attend",
    "available_ops",
    "build_model",
    "chain",
    "embed",
    "generate",
    "linear",
    "load_artifact",
    "load_model",
    "load_recipe",
    "materialize",
    "named_chain",
    "nbytes",
    "param_bytes",
    "perplexity",
    "plan",
    "pydoc_text",
    "quantize_weight",
    "read_recipe_file",
    "register_op",
    "rule",
    "save_artifact",
    "save_recipe",
    "text_sha256",
]
