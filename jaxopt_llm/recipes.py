"""Built-in recipes (a public interface: keep the names) and recipe lookup.

What each touches by default: every linear kernel of every block (`rules.BLOCK_LINEARS`:
all `kernel`s except an untied `lm_head`), never norms or biases. Embeddings and the
output head stay float32 unless a recipe says otherwise (none of the built-ins do; write
a rule for `.*embedding` or `lm_head/kernel` to include them — a tied head then reads
the same quantized table). Structured recipes touch the attention or MLP blocks of
Llama-family and GPT-2 models only.

  fp32          no-op baseline
  w8            int8 symmetric, per output channel, weight-only
  w8a8          w8 + dynamic per-token int8 activations (int8×int8→int32 matmuls)
  w4            int4 asymmetric (min-max), per output channel
  w4g128        int4 asymmetric, groups of 128 inputs (float16 scales, uint8 zero points);
                where 128 does not divide the input (SmolLM2: 576 = 4·128 + 64) the last
                group is shorter, as GPTQ does
  w3g128        int3 asymmetric, groups of 128 inputs (same layout)
  magnitude-50  50% unstructured magnitude pruning per layer (MaskedWeight)
  nm-2:4        2:4 semi-structured pruning (compressed NMSparseWeight)
  heads-25      25% of query heads per kv group removed (rounded; physically)
  mlp-25        25% of MLP neurons removed (physically)
  svd-20        truncated SVD removing 20% of each block linear's parameters
"""

from __future__ import annotations

from pathlib import Path

from jaxopt_llm.models.family import blocks_regex
from jaxopt_llm.pipeline import Recipe, Stage, read_recipe_file
from jaxopt_llm.rules import BLOCK_LINEARS, rule

# Every block's attention / MLP parameters, in every family (a built-in recipe is
# family-independent)
ATTENTION = blocks_regex("attention")
MLP = blocks_regex("mlp")


def _one(name: str, description: str, stage: str, match: str, op: str, **options) -> Recipe:
    return Recipe(name=name, description=description,
                  stages=(Stage(name=stage, rules=(rule(match, op, **options),)),))


BUILTIN_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(name="fp32", description="no-op baseline (float32 weights)"),
        _one("w8", "int8 symmetric per-channel weight-only", "quantize", BLOCK_LINEARS,
             "quantize", bits=8),
        _one("w8a8", "int8 per-channel weights, dynamic per-token int8 activations",
             "quantize", BLOCK_LINEARS, "quantize", bits=8, act_bits=8),
        _one("w4", "int4 asymmetric per-channel weight-only", "quantize", BLOCK_LINEARS,
             "quantize", bits=4, symmetric=False),
        _one("w4g128", "int4 asymmetric, groups of 128 inputs", "quantize", BLOCK_LINEARS,
             "quantize", bits=4, symmetric=False, group_size=128, partial_groups=True),
        _one("w3g128", "int3 asymmetric, groups of 128 inputs", "quantize", BLOCK_LINEARS,
             "quantize", bits=3, symmetric=False, group_size=128, partial_groups=True),
        _one("magnitude-50", "50% unstructured magnitude pruning per layer", "prune",
             BLOCK_LINEARS, "prune", sparsity=0.5, scope="layer"),
        _one("nm-2:4", "2:4 semi-structured magnitude pruning", "prune", BLOCK_LINEARS, "nm",
             n=2, m=4),
        _one("heads-25", "remove 25% of attention heads (per kv group, L2 scores)", "prune",
             ATTENTION, "prune_heads", fraction=0.25),
        _one("mlp-25", "remove 25% of MLP neurons (L2 scores)", "prune", MLP,
             "prune_neurons", fraction=0.25),
        _one("svd-20", "truncated SVD removing 20% of each block linear's parameters",
             "factorize", BLOCK_LINEARS, "svd", ratio=0.2),
    )
}


def load_recipe(spec: str | Path | Recipe) -> Recipe:
    """A built-in name, a path to a .yaml/.yml/.json recipe file, or a Recipe."""
    if isinstance(spec, Recipe):
        spec.check()
        return spec
    text = str(spec)
    if text in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[text]
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return read_recipe_file(path)
    raise ValueError(f"unknown recipe {text!r}; built-in recipes: {', '.join(BUILTIN_RECIPES)} "
                     f"(or give a path to a .yaml/.json recipe file)")
