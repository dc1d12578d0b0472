"""Built-in recipes (a public interface: keep the names) and recipe lookup.

What each touches by default: every linear kernel of every block (`rules.BLOCK_LINEARS`:
all `kernel`s except an untied `lm_head`), never norms or biases. The weight-quantizing
built-ins (w8 … w4g32-float and sparsegpt-2:4+w4g128-gptq below) also store the token
table of our model families, and an untied `lm_head`, as int8 per row (an optional
rule: models without them are quantized as before), as llama.cpp's Q8_0 and Q4_1 files
do; a tied head then reads the same int8 table (+0.16% perplexity on SmolLM2 for 85 MB
less and a faster head). Other embeddings (positions, token types, users' own tables)
stay float32: write a rule for them. Structured recipes touch the attention or MLP
blocks of Llama-family, GPT-2 and BERT models.

  fp32          no-op baseline
  w8            int8 symmetric, per output channel, weight-only
  w8a8          w8 + dynamic per-token int8 activations (int8×int8→int32 matmuls)
  w4            int4 asymmetric (min-max), per output channel
  w4g128        int4 asymmetric, groups of 128 inputs (float16 scales, uint8 zero points);
                where 128 does not divide the input (SmolLM2: 576 = 4·128 + 64) the last
                group is shorter, as GPTQ does
  w3g128        int3 asymmetric, groups of 128 inputs (same layout)
  w4g128-gptq   w4g128's grid by GPTQ (act order, static groups), calibrated
  w3g128-gptq   w3g128's grid by GPTQ; w4-gptq: w4's grid by GPTQ
  w4g128-awq    w4g128's grid by AWQ (scales searched on block outputs, folded; clipping)
  w3g128-awq    w3g128's grid by AWQ; w4-awq: w4's grid by AWQ
  w8a8-smoothquant  SmoothQuant smoothing (α 0.5, folded into the norms) then w8a8
  w4g32-float   int4 groups of 32 with float offsets (w = q·d + m, llama.cpp Q4_1's grid)
  magnitude-50  50% unstructured magnitude pruning per layer (MaskedWeight)
  nm-2:4        2:4 semi-structured pruning (compressed NMSparseWeight)
  wanda-50, wanda-2:4, sparsegpt-50, sparsegpt-2:4   calibrated pruning (Wanda, SparseGPT)
  sparsegpt-2:4+w4g128-gptq  2:4 SparseGPT and int4 codes of the kept weights (groups of
                128 inputs) in one sweep: an NMSparseWeight of a QuantizedWeight
  heads-25      25% of query heads per kv group removed (rounded; physically)
  mlp-25        25% of MLP neurons removed (physically)
  heads-25-act, mlp-25-act   structured, scored by output energy on calibration data
  svd-20        truncated SVD removing 20% of each block linear's parameters
  asvd-20, svdllm-20, svdllm-40   calibrated low-rank (ASVD, SVD-LLM)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxopt_llm.io.loaded import LoadedModel
from jaxopt_llm.models.family import blocks_regex, token_tables_regex
from jaxopt_llm.pipeline import Recipe, Stage, read_recipe_file
from jaxopt_llm.rules import BLOCK_LINEARS, HEAD, Rule, rule

# Every block's attention / MLP parameters, in every family (a built-in recipe is
# family-independent)
ATTENTION = blocks_regex("attention")
MLP = blocks_regex("mlp")
# The token table (which a tied head reads) and an untied head: int8 per row in every
# weight-quantizing built-in, optional because a user's model may have neither.
TABLES_INT8 = rule(f"{token_tables_regex()}|{HEAD}", "quantize", bits=8, optional=True)


def _one(name: str, description: str, stage: str, match: str, op: str, *,
         also: tuple[Rule, ...] = (), **options) -> Recipe:
    return Recipe(name=name, description=description,
                  stages=(Stage(name=stage, rules=(rule(match, op, **options), *also)),))


def _quantized(name: str, description: str, op: str, **options) -> Recipe:
    """A weight-quantizing built-in: `op` on the block linears, the token table int8."""
    return _one(name, f"{description}; token table int8 per row", "quantize", BLOCK_LINEARS,
                op, also=(TABLES_INT8,), **options)


BUILTIN_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(name="fp32", description="no-op baseline (float32 weights)"),
        _quantized("w8", "int8 symmetric per-channel weight-only", "quantize", bits=8),
        _quantized("w8a8", "int8 per-channel weights, dynamic per-token int8 activations",
                   "quantize", bits=8, act_bits=8),
        _quantized("w4", "int4 asymmetric per-channel weight-only", "quantize", bits=4,
                   symmetric=False),
        _quantized("w4g128", "int4 asymmetric, groups of 128 inputs", "quantize", bits=4,
                   symmetric=False, group_size=128, partial_groups=True),
        _quantized("w3g128", "int3 asymmetric, groups of 128 inputs", "quantize", bits=3,
                   symmetric=False, group_size=128, partial_groups=True),
        _quantized("w4g128-gptq", "int4 asymmetric, groups of 128, GPTQ (act order, static "
                   "groups)", "gptq", bits=4, symmetric=False, group_size=128,
                   partial_groups=True, act_order=True),
        _quantized("w3g128-gptq", "int3 asymmetric, groups of 128, GPTQ (act order, static "
                   "groups)", "gptq", bits=3, symmetric=False, group_size=128,
                   partial_groups=True, act_order=True),
        _quantized("w4-gptq", "int4 asymmetric per-channel, GPTQ (act order)", "gptq", bits=4,
                   symmetric=False, act_order=True),
        _quantized("w4g128-awq", "int4 asymmetric, groups of 128, AWQ (searched scales, "
                   "clipping)", "awq", bits=4, symmetric=False, group_size=128,
                   partial_groups=True),
        _quantized("w3g128-awq", "int3 asymmetric, groups of 128, AWQ (searched scales, "
                   "clipping)", "awq", bits=3, symmetric=False, group_size=128,
                   partial_groups=True),
        _quantized("w4-awq", "int4 asymmetric per-channel, AWQ (searched scales, clipping)",
                   "awq", bits=4, symmetric=False),
        Recipe(name="w8a8-smoothquant",
               description="SmoothQuant (α 0.5) then int8 per-channel weights with dynamic "
                           "per-token int8 activations; token table int8 per row",
               stages=(Stage(name="smooth", rules=(rule(BLOCK_LINEARS, "smoothquant",
                                                        alpha=0.5),)),
                       Stage(name="quantize", rules=(rule(BLOCK_LINEARS, "quantize", bits=8,
                                                          act_bits=8), TABLES_INT8)))),
        _quantized("w4g32-float", "int4 groups of 32 with float offsets (w = q·d + m, "
                   "llama.cpp Q4_1's grid)", "quantize", bits=4, symmetric=False,
                   group_size=32, zero="float"),
        _one("magnitude-50", "50% unstructured magnitude pruning per layer", "prune",
             BLOCK_LINEARS, "prune", sparsity=0.5, scope="layer"),
        _one("nm-2:4", "2:4 semi-structured magnitude pruning", "prune", BLOCK_LINEARS, "nm",
             n=2, m=4),
        _one("wanda-50", "50% unstructured Wanda pruning (|W|·‖X‖ per output, calibrated)",
             "prune", BLOCK_LINEARS, "wanda", sparsity=0.5),
        _one("wanda-2:4", "2:4 semi-structured Wanda pruning (calibrated)", "prune",
             BLOCK_LINEARS, "wanda", n=2, m=4),
        _one("sparsegpt-50", "50% unstructured SparseGPT pruning (OBS updates, calibrated)",
             "prune", BLOCK_LINEARS, "sparsegpt", sparsity=0.5),
        _one("sparsegpt-2:4", "2:4 semi-structured SparseGPT pruning (calibrated)", "prune",
             BLOCK_LINEARS, "sparsegpt", n=2, m=4),
        _one("sparsegpt-2:4+w4g128-gptq", "2:4 SparseGPT pruning and int4 asymmetric codes "
             "of the kept weights (groups of 128 inputs) in one sweep (calibrated); token "
             "table int8 per row", "prune", BLOCK_LINEARS, "sparsegpt_quantize",
             also=(TABLES_INT8,), n=2, m=4, bits=4, symmetric=False, group_size=128,
             partial_groups=True),
        _one("heads-25", "remove 25% of attention heads (per kv group, L2 scores)", "prune",
             ATTENTION, "prune_heads", fraction=0.25),
        _one("mlp-25", "remove 25% of MLP neurons (L2 scores)", "prune", MLP,
             "prune_neurons", fraction=0.25),
        _one("heads-25-act", "remove 25% of attention heads (per kv group, by their output "
             "energy on calibration data)", "prune", ATTENTION, "prune_heads", fraction=0.25,
             score="act"),
        _one("mlp-25-act", "remove 25% of MLP neurons (by their output energy on calibration "
             "data)", "prune", MLP, "prune_neurons", fraction=0.25, score="act"),
        _one("svd-20", "truncated SVD removing 20% of each block linear's parameters",
             "factorize", BLOCK_LINEARS, "svd", ratio=0.2),
        _one("asvd-20", "ASVD (activation-scaled SVD, α 0.5) removing 20% of the block "
             "linears' parameters, ranks per linear by output-error sensitivity", "factorize",
             BLOCK_LINEARS, "asvd", ratio=0.2, allocation="global"),
        _one("svdllm-20", "SVD-LLM (whitened SVD) removing 20% of each block linear's "
             "parameters", "factorize", BLOCK_LINEARS, "svdllm", ratio=0.2),
        _one("svdllm-40", "SVD-LLM (whitened SVD) removing 40% of each block linear's "
             "parameters", "factorize", BLOCK_LINEARS, "svdllm", ratio=0.4),
    )
}


def load_recipe(spec: str | Path | Recipe) -> Recipe:
    """A built-in name, a path to a .yaml/.yml/.json recipe file, or a Recipe.

    Args:
        spec: the recipe.

    Returns:
        The checked `Recipe`.

    Raises:
        ValueError: an unknown name (listing the built-ins) or a bad file.

    Example:
        >>> load_recipe("w4g128").stages[0].rules[0].describe()
        'quantize(bits=4, group_size=128, partial_groups=True, symmetric=False)'
    """
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


def apply_recipe(loaded: LoadedModel, recipe: Recipe | None, *,
                 calibration: Any = None) -> LoadedModel:
    """`loaded` with `recipe` applied (None: unchanged), remembering its float32 size in
    `extra["dense_param_bytes"]` (an artifact keeps the size of the model it came from) and,
    for a calibrated recipe, the calibration tokens' source in `extra["calibration"]`.

    A recipe with calibrated ops (GPTQ, …) runs on `calibration`
    (`jaxopt_llm.calibration.Calibration`), by default the embedded text after the
    evaluation tokens, tokenized with the model's tokenizer.

    On an artifact the recipe continues the one the artifact was made with: the result's
    recipe is both, stage after stage, named "before+recipe".

    Args:
        loaded: the model (from `load_model`).
        recipe: the recipe (see `load_recipe`), or None.
        calibration: calibration data for calibrated ops (default: the embedded text).

    Returns:
        A new `LoadedModel` (config, params and recipe replaced; `loaded` is unchanged).

    Example:
        >>> from jaxopt_llm import load_model
        >>> m = apply_recipe(load_model("smollm2-135m"), load_recipe("w8"))  # doctest: +SKIP
        >>> m.recipe["name"], m.extra["dense_param_bytes"]  # doctest: +SKIP
        ('w8', 538060032)
    """
    import dataclasses

    from jaxopt_llm.plan import dense_param_bytes

    extra = dict(loaded.extra or {})
    extra["dense_param_bytes"] = extra.get("dense_param_bytes") or dense_param_bytes(
        loaded.params)
    if recipe is None:
        return dataclasses.replace(loaded, extra=extra)
    if calibration is None and recipe.needs_calibration:
        from jaxopt_llm.calibration import default_calibration

        calibration = default_calibration(loaded.tokenizer)
    if recipe.needs_calibration:  # the artifact records which tokens calibrated it
        extra["calibration"] = getattr(calibration, "source", str(calibration))
    config, params = recipe(loaded.config, loaded.params, calibration=calibration)
    applied = recipe
    if loaded.recipe:
        before = Recipe.from_dict(loaded.recipe)
        taken = {stage.name for stage in before.stages}
        added = []
        for stage in recipe.stages:  # stage names stay unique: "prune" again → "prune-2"
            name, k = stage.name, 2
            while name in taken:
                name, k = f"{stage.name}-{k}", k + 1
            taken.add(name)
            added.append(dataclasses.replace(stage, name=name))
        applied = Recipe(name=f"{before.name}+{recipe.name}",
                         description=f"{before.description}; then {recipe.description}",
                         stages=before.stages + tuple(added))
    return dataclasses.replace(loaded, config=config, params=params, recipe=applied.to_dict(),
                               extra=extra)
