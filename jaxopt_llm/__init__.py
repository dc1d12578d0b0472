"""jaxopt-llm: a compiler for LLM weights in JAX.

Load a real LLM into Flax, rewrite its parameters with pure transforms, run it under
jit on one device or a mesh, and measure what was gained and lost.

Everything a user script needs is importable from here (`import jaxopt_llm as jl`):
loading and saving (`load_model`, `save_artifact`, `load_artifact`), recipes (`Recipe`,
`Stage`, `rule`, `load_recipe`, `apply_recipe`, `plan`), running (`forward`,
`perplexity`, `generate`, `Placement`, `make_mesh`), weights (`linear`, `param_bytes`,
the `WeightLeaf` representations, LoRA), calibration and training (`train_recipe`,
`TrainSettings`, and the lower-level `make_trainer` / `run_training`).
"""

from jaxopt_llm.calibration import (
    Calibration,
    default_calibration,
    layer_sequential,
    linear_statistics,
)
from jaxopt_llm.data import pydoc_text, text_sha256
from jaxopt_llm.demo import run_demo
from jaxopt_llm.errors import ParameterError
from jaxopt_llm.evaluate import PerplexityResult, perplexity
from jaxopt_llm.generation import GenerationResult, Sampling, generate
from jaxopt_llm.io.artifact import load_artifact, save_artifact
from jaxopt_llm.io.loaded import LoadedModel
from jaxopt_llm.io.loader import load_model
from jaxopt_llm.models import (
    FamilySpec,
    ModelConfig,
    build_model,
    family_spec,
    forward,
    init_params,
)
from jaxopt_llm.parallel import make_mesh, param_specs, shard_params
from jaxopt_llm.pipeline import (
    Recipe,
    Stage,
    chain,
    named_chain,
    read_recipe_file,
    save_recipe,
)
from jaxopt_llm.placement import Placement, ensure_cpu_devices
from jaxopt_llm.plan import Plan, plan
from jaxopt_llm.recipes import BUILTIN_RECIPES, apply_recipe, load_recipe
from jaxopt_llm.rules import BLOCK_LINEARS, KEEP, Rule, rule
from jaxopt_llm.train import (
    TrainedModel,
    TrainOptions,
    TrainSettings,
    convert,
    gradual_recipe,
    make_trainer,
    qat_recipe,
    run_training,
    train_recipe,
    training_ids,
)
from jaxopt_llm.transforms import Op, OpOptions, available_ops, register_op
from jaxopt_llm.weights import (
    FakeQuantWeight,
    LoRAWeight,
    LowRankWeight,
    MaskedWeight,
    NMSparseWeight,
    QuantizedWeight,
    QuantSpec,
    WeightLeaf,
    add_lora,
    attend,
    embed,
    linear,
    materialize,
    merge_lora,
    nbytes,
    param_bytes,
    quantize_weight,
)

__all__ = [
    "BLOCK_LINEARS",
    "BUILTIN_RECIPES",
    "Calibration",
    "FakeQuantWeight",
    "FamilySpec",
    "GenerationResult",
    "KEEP",
    "LoRAWeight",
    "LoadedModel",
    "LowRankWeight",
    "MaskedWeight",
    "ModelConfig",
    "NMSparseWeight",
    "Op",
    "OpOptions",
    "ParameterError",
    "PerplexityResult",
    "Placement",
    "Plan",
    "QuantSpec",
    "QuantizedWeight",
    "Recipe",
    "Rule",
    "Sampling",
    "Stage",
    "TrainOptions",
    "TrainSettings",
    "TrainedModel",
    "WeightLeaf",
    "add_lora",
    "apply_recipe",
    "attend",
    "available_ops",
    "build_model",
    "chain",
    "convert",
    "default_calibration",
    "embed",
    "ensure_cpu_devices",
    "family_spec",
    "forward",
    "generate",
    "gradual_recipe",
    "init_params",
    "layer_sequential",
    "linear",
    "linear_statistics",
    "load_artifact",
    "load_model",
    "load_recipe",
    "make_mesh",
    "make_trainer",
    "materialize",
    "merge_lora",
    "named_chain",
    "nbytes",
    "param_bytes",
    "param_specs",
    "perplexity",
    "plan",
    "pydoc_text",
    "qat_recipe",
    "quantize_weight",
    "read_recipe_file",
    "register_op",
    "rule",
    "run_demo",
    "run_training",
    "save_artifact",
    "save_recipe",
    "shard_params",
    "text_sha256",
    "train_recipe",
    "training_ids",
]
