"""The demo: one model, a few recipes, and what each costs and keeps.

For every recipe the demo applies it to the float model and measures perplexity on
the first tokens of the pydoc evaluation text, the bytes the weights really store,
prefill and decode speed, and a short greedy continuation of one prompt — so the
trade-off of each recipe (smaller weights vs. quality and speed) is on one table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from jaxopt_llm.data import pydoc_text, text_sha256
from jaxopt_llm.io import loader

if TYPE_CHECKING:
    from jaxopt_llm.pipeline import Recipe

# The JAX-heavy modules are imported where the demo runs, not here: the command line
# reads this module's defaults before it checks its arguments.

# fp32 is the baseline, w8 the safe 8-bit choice, and w4g128 the best built-in 4-bit
# recipe: per-group scales keep far more quality than per-channel int4 (README table,
# SmolLM2-135M on 65,536 pydoc tokens: w4g128 ppl 19.07 vs w4 26.33).
DEMO_RECIPES = ("fp32", "w8", "w4g128")
DEMO_PROMPT = "The three most important Python data structures are"
DEMO_WINDOW = 512  # the evaluation protocol's window
# Small enough that a cold run of all three recipes on 2 CPU cores stays well under
# 3 minutes (most of it is compiling one evaluation and one generation program per recipe).
DEMO_TOKENS = 2048
DEMO_NEW_TOKENS = 24


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_recipes(recipes: Sequence[str]) -> list[Recipe]:
    """The Recipe objects for `recipes` (built-in names or recipe files), checked up front
    so that a typo fails before the model is loaded."""
    if isinstance(recipes, str) or not isinstance(recipes, Sequence) or not recipes:
        raise ValueError(f"recipes must be a non-empty sequence of recipe names, "
                         f"got {recipes!r}")
    from jaxopt_llm.recipes import load_recipe

    loaded = []
    for spec in recipes:
        try:
            recipe = load_recipe(spec)
        except ValueError as err:
            raise ValueError(f"recipes: {err}") from None
        if any(recipe.name == other.name for other in loaded):
            raise ValueError(f"recipes: {recipe.name!r} is listed twice")
        loaded.append(recipe)
    return loaded


def run_demo(
    model: str = "smollm2-135m",
    *,
    recipes: Sequence[str] = DEMO_RECIPES,
    num_tokens: int = DEMO_TOKENS,
    prompt: str = DEMO_PROMPT,
    max_new_tokens: int = DEMO_NEW_TOKENS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load `model` once and measure each recipe applied to it.

    Args:
        model: registry name, .gguf file, HF checkpoint or artifact directory.
        recipes: built-in recipe names (or recipe files), measured in this order.
        num_tokens: how many leading pydoc tokens to score (floored to windows of 512;
            at least one window).
        prompt: the text each recipe continues greedily.
        max_new_tokens: the most tokens each greedy sample generates (it stops early at
            the tokenizer's end-of-sequence token, which is kept).
        progress: called with one line per step ("w8: generating"), before the step.

    Returns:
        {"rows": [{"recipe", "ppl", "param_bytes", "prefill_tok_s", "decode_tok_s",
        "text"}, ...] in the order of `recipes`, "model", "tokens" (tokens scored in
        windows, after flooring), "window", "prompt", "text_sha256" (of the eval text)}.

    Example:
        >>> out = run_demo(recipes=("fp32", "w8"))  # doctest: +SKIP
        >>> [row["recipe"] for row in out["rows"]]  # doctest: +SKIP
        ['fp32', 'w8']
    """
    _check_positive_int("num_tokens", num_tokens)
    _check_positive_int("max_new_tokens", max_new_tokens)
    if num_tokens < DEMO_WINDOW:
        raise ValueError(f"num_tokens must be at least one window of {DEMO_WINDOW} tokens, "
                         f"got {num_tokens}")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    chosen = _check_recipes(recipes)
    say = progress or (lambda line: None)

    say("loading model")
    from jaxopt_llm.evaluate import perplexity
    from jaxopt_llm.generation import generate
    from jaxopt_llm.weights import param_bytes

    loaded = loader.load_model(model)  # through the module: tests reuse one loaded model
    text = pydoc_text()
    eval_ids = loaded.tokenizer.encode(text)
    prompt_ids = loaded.tokenizer.encode(prompt)
    used = min(num_tokens, len(eval_ids)) // DEMO_WINDOW * DEMO_WINDOW
    eos = loaded.tokenizer.eos_token_ids or None

    rows = []
    for recipe in chosen:
        say(f"{recipe.name}: applying recipe")
        config, params = recipe(loaded.config, loaded.params)
        say(f"{recipe.name}: perplexity on {used} tokens")
        scored = perplexity(config, params, eval_ids, num_tokens=num_tokens,
                            window=DEMO_WINDOW)
        say(f"{recipe.name}: generating")
        sample = generate(config, params, [prompt_ids], max_new_tokens=max_new_tokens,
                          eos_token_ids=eos)
        rows.append({
            "recipe": recipe.name,
            "ppl": scored.ppl,
            "param_bytes": param_bytes(params),
            "prefill_tok_s": sample.prefill_tok_s,
            "decode_tok_s": sample.decode_tok_s,
            "text": loaded.tokenizer.decode(sample.new_ids[0]),
        })
        del params  # one recipe's weights alive at a time, besides the float model
    return {"rows": rows, "model": model, "tokens": used, "window": DEMO_WINDOW,
            "prompt": prompt, "text_sha256": text_sha256(text)}


__all__ = ["DEMO_PROMPT", "DEMO_RECIPES", "run_demo"]
