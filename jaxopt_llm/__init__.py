"""jaxopt-llm: a compiler for LLM weights in JAX.

Load a real LLM into Flax, rewrite its parameters with pure transforms, run it under
jit on one device or a mesh, and measure what was gained and lost.

Everything a user script needs is importable from here (`import jaxopt_llm as jl`):
loading and saving (`load_model`, `save_artifact`, `load_artifact`), recipes (`Recipe`,
`Stage`, `rule`, `load_recipe`, `apply_recipe`, `plan`), running (`forward`,
`perplexity`, `generate`, `Placement`, `make_mesh`), weights (`linear`, `param_bytes`,
the `WeightLeaf` representations, LoRA), calibration and training (`train_recipe`,
`TrainSettings`, and the lower-level `make_trainer` / `run_training`), encoders
(`sentence_embeddings`, `evaluate_encoder`) and exports (`export_gguf`, `export_hf`,
`export_onnx`, `export_tflite`).


Names are imported on first use (PEP 562), so `import jaxopt_llm` and the command line's
argument checks do not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name -> the module that defines it.
_SOURCES = {
    "add_lora": "jaxopt_llm.weights",
    "apply_recipe": "jaxopt_llm.recipes",
    "attend": "jaxopt_llm.weights",
    "available_ops": "jaxopt_llm.transforms",
    "BLOCK_LINEARS": "jaxopt_llm.rules",
    "build_model": "jaxopt_llm.models",
    "BUILTIN_RECIPES": "jaxopt_llm.recipes",
    "Calibration": "jaxopt_llm.calibration",
    "chain": "jaxopt_llm.pipeline",
    "convert": "jaxopt_llm.train",
    "default_calibration": "jaxopt_llm.calibration",
    "embed": "jaxopt_llm.weights",
    "ensure_cpu_devices": "jaxopt_llm.placement",
    "evaluate_encoder": "jaxopt_llm.encoders",
    "export_gguf": "jaxopt_llm.io.export_gguf",
    "export_hf": "jaxopt_llm.io.export_hf",
    "export_onnx": "jaxopt_llm.io.export_onnx",
    "export_tflite": "jaxopt_llm.io.export_tflite",
    "FakeQuantWeight": "jaxopt_llm.weights",
    "family_spec": "jaxopt_llm.models",
    "FamilySpec": "jaxopt_llm.models",
    "forward": "jaxopt_llm.models",
    "generate": "jaxopt_llm.generation",
    "GenerationResult": "jaxopt_llm.generation",
    "gradual_recipe": "jaxopt_llm.train",
    "init_params": "jaxopt_llm.models",
    "KEEP": "jaxopt_llm.rules",
    "layer_sequential": "jaxopt_llm.calibration",
    "linear": "jaxopt_llm.weights",
    "linear_statistics": "jaxopt_llm.calibration",
    "load_artifact": "jaxopt_llm.io.artifact",
    "load_model": "jaxopt_llm.io.loader",
    "load_recipe": "jaxopt_llm.recipes",
    "LoadedModel": "jaxopt_llm.io.loaded",
    "LoRAWeight": "jaxopt_llm.weights",
    "LowRankWeight": "jaxopt_llm.weights",
    "make_mesh": "jaxopt_llm.parallel",
    "make_trainer": "jaxopt_llm.train",
    "MaskedWeight": "jaxopt_llm.weights",
    "materialize": "jaxopt_llm.weights",
    "merge_lora": "jaxopt_llm.weights",
    "ModelConfig": "jaxopt_llm.models",
    "named_chain": "jaxopt_llm.pipeline",
    "nbytes": "jaxopt_llm.weights",
    "NMSparseWeight": "jaxopt_llm.weights",
    "Op": "jaxopt_llm.transforms",
    "OpOptions": "jaxopt_llm.transforms",
    "param_bytes": "jaxopt_llm.weights",
    "param_specs": "jaxopt_llm.parallel",
    "ParameterError": "jaxopt_llm.errors",
    "perplexity": "jaxopt_llm.evaluate",
    "PerplexityResult": "jaxopt_llm.evaluate",
    "Placement": "jaxopt_llm.placement",
    "Plan": "jaxopt_llm.plan",
    "plan": "jaxopt_llm.plan",
    "pydoc_text": "jaxopt_llm.data",
    "qat_recipe": "jaxopt_llm.train",
    "quantize_weight": "jaxopt_llm.weights",
    "with_activation_blocks": "jaxopt_llm.transforms.quantize",
    "compute_in": "jaxopt_llm.transforms.precision",
    "QuantizedWeight": "jaxopt_llm.weights",
    "QuantSpec": "jaxopt_llm.weights",
    "read_recipe_file": "jaxopt_llm.pipeline",
    "Recipe": "jaxopt_llm.pipeline",
    "register_op": "jaxopt_llm.transforms",
    "Rule": "jaxopt_llm.rules",
    "rule": "jaxopt_llm.rules",
    "run_demo": "jaxopt_llm.demo",
    "run_training": "jaxopt_llm.train",
    "sentence_embeddings": "jaxopt_llm.encoders",
    "Sampling": "jaxopt_llm.generation",
    "save_artifact": "jaxopt_llm.io.artifact",
    "save_recipe": "jaxopt_llm.pipeline",
    "shard_params": "jaxopt_llm.parallel",
    "Stage": "jaxopt_llm.pipeline",
    "text_sha256": "jaxopt_llm.data",
    "train_recipe": "jaxopt_llm.train",
    "TrainedModel": "jaxopt_llm.train",
    "training_ids": "jaxopt_llm.train",
    "TrainOptions": "jaxopt_llm.train",
    "TrainSettings": "jaxopt_llm.train",
    "WeightLeaf": "jaxopt_llm.weights",
}

__all__ = sorted(_SOURCES)



def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxopt_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
