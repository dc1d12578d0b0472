"""The commands' work as library calls: each takes a loaded model and returns the record
`jaxopt-llm … --json` prints.

- `evaluate_text`: perplexity of a text (`evaluate.perplexity`) with sizes and speed;
- `generate_text`: a continuation of a prompt (`generation.generate`) with speeds;
- `optimize_model`: a recipe applied and saved as an artifact, with the bytes saved.

Training is `train.train_recipe`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxopt_llm import native_extension
from jaxopt_llm.evaluate import DEFAULT_TOKENS, DEFAULT_WINDOW, check_eval_args, perplexity
from jaxopt_llm.generation import Sampling, generate
from jaxopt_llm.io.loaded import LoadedModel
from jaxopt_llm.pipeline import Recipe
from jaxopt_llm.placement import Placement
from jaxopt_llm.weights import param_bytes
from jaxopt_llm.weights.native import path_in_use


def _decode_path(placement: Placement | None) -> str:
    """The matmul path decode runs: `path_in_use`, or the pure path on several devices."""
    shape = mesh_shape(placement)
    if shape is not None and shape["data"] * shape["model"] > 1:
        with native_extension.sharded_program():
            return path_in_use()[1]
    return path_in_use()[1]


def mesh_shape(placement: Placement | None) -> dict[str, int] | None:
    """{"data": A, "model": B} of a placement on a mesh; None on one device.

    Args:
        placement: a Placement, or None.

    Returns:
        The axis sizes, or None.

    Example:
        >>> from jaxopt_llm.placement import Placement
        >>> mesh_shape(Placement.single()) is None
        True
    """
    if placement is None or not placement.is_mesh:
        return None
    return {k: int(v) for k, v in placement.mesh.shape.items()}


def recipe_name(loaded: LoadedModel) -> str:
    """The name of the recipe `loaded` went through.

    Args:
        loaded: a model (an artifact or one `apply_recipe` returned carries its recipe).

    Returns:
        The recipe's name, "fp32" for none.

    Example:
        >>> recipe_name(load_model("smollm2-135m"))  # doctest: +SKIP
        'fp32'
    """
    return (loaded.recipe or {}).get("name", "fp32")


def evaluate_text(loaded: LoadedModel, text: str, *, num_tokens: int = DEFAULT_TOKENS,
                  window: int = DEFAULT_WINDOW, batch_size: int = 1,
                  placement: Placement | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Perplexity of `text` under `loaded` (the protocol of `evaluate.perplexity`).

    Args:
        loaded: the model (params already placed by `placement`).
        text: the text to score.
        num_tokens, window, batch_size, placement: as in `evaluate.perplexity`.
        progress: called with (windows done, windows in all), first with 0 done.

    Returns:
        The perplexity result's fields plus model, param_bytes, dense_param_bytes (float32
        size, when known), recipe, text_sha256, text_tokens, seconds, eval_tok_s, mesh.

    Example:
        >>> from jaxopt_llm import load_model, pydoc_text
        >>> record = evaluate_text(load_model("smollm2-135m"), pydoc_text())  # doctest: +SKIP
        >>> round(record["ppl"], 4)  # doctest: +SKIP
        14.2858
    """
    from jaxopt_llm.data import text_sha256

    check_eval_args(num_tokens, window)
    ids = loaded.tokenizer.encode(text)
    windows = min(num_tokens, len(ids)) // window
    on_window = None
    if progress is not None:
        done = [0]

        def on_window(count: int) -> None:
            done[0] += count
            progress(done[0], windows)

        progress(0, windows)
    start = time.perf_counter()
    result = perplexity(loaded.config, loaded.params, ids, num_tokens=num_tokens,
                        window=window, batch_size=batch_size, placement=placement,
                        on_window=on_window)
    seconds = time.perf_counter() - start
    return {
        "model": loaded.source,
        **result.to_dict(),
        "param_bytes": param_bytes(loaded.params),
        "dense_param_bytes": (loaded.extra or {}).get("dense_param_bytes"),
        "recipe": recipe_name(loaded),
        "text_sha256": text_sha256(text),
        "text_tokens": len(ids),
        "seconds": seconds,
        "eval_tok_s": result.tokens_used / seconds,
        "mesh": mesh_shape(placement),
    }


def evaluate_encoder_text(reference: LoadedModel, loaded: LoadedModel, text: str, *,
                          num_texts: int = 256, batch_size: int = 32,
                          placement: Placement | None = None) -> dict[str, Any]:
    """An encoder after a recipe (`loaded`) against the float model (`reference`): the
    embeddings of the first `num_texts` sentences of `text` and of the paraphrase set
    (`encoders.evaluate_encoder`).

    Args:
        reference: the float model (params placed by `placement`).
        loaded: the compressed model.
        text: where the sentences come from (`encoders.sentences`).
        num_texts: how many sentences.
        batch_size: texts per forward pass.
        placement: where both run.

    Returns:
        The comparison's fields plus model, recipe, param_bytes, dense_param_bytes,
        text_sha256, seconds and mesh.

    Example:
        >>> from jaxopt_llm import load_model, pydoc_text
        >>> m = load_model("minilm-l6")  # doctest: +SKIP
        >>> evaluate_encoder_text(m, m, pydoc_text())["cosine"]  # doctest: +SKIP
        1.0
    """
    from jaxopt_llm.data import text_sha256
    from jaxopt_llm.encoders import evaluate_encoder, sentences

    texts = sentences(text, num_texts)
    if len(texts) < 3:
        raise ValueError(f"the text has {len(texts)} usable sentence(s) (8–40 words, plain "
                         "ASCII); encoder evaluation needs at least 3")
    start = time.perf_counter()
    result = evaluate_encoder(reference.config, reference.params, loaded.config, loaded.params,
                              loaded.tokenizer, texts, batch_size=batch_size,
                              placement=placement)
    return {
        "model": loaded.source,
        **result,
        "param_bytes": param_bytes(loaded.params),
        "dense_param_bytes": param_bytes(reference.params),
        "recipe": recipe_name(loaded),
        "text_sha256": text_sha256(text),
        "seconds": time.perf_counter() - start,
        "mesh": mesh_shape(placement),
    }


def generate_text(loaded: LoadedModel, prompt: str, *, max_new_tokens: int,
                  sampling: Sampling | None = None, seed: int = 0,
                  placement: Placement | None = None) -> dict[str, Any]:
    """Up to `max_new_tokens` after `prompt`, stopping at the tokenizer's end tokens.

    Args:
        loaded: the model (params already placed by `placement`).
        prompt: the text to continue.
        max_new_tokens: the most tokens to generate.
        sampling: greedy by default.
        seed: the sampling seed.
        placement: where to run (default one device).

    Returns:
        model, recipe, prompt, prompt_ids, new_ids, text (the decoded new tokens), the
        prefill and decode speeds (tok/s) and seconds, compile_seconds, programs (where
        the compiled programs came from), kv_cache (its
        storage) and kv_cache_bytes, mesh.

    Example:
        >>> record = generate_text(load_model("smollm2-135m"), "def add(a, b):",  # doctest: +SKIP
        ...                        max_new_tokens=16)
    """
    ids = loaded.tokenizer.encode(prompt)
    result = generate(loaded.config, loaded.params, [ids], max_new_tokens=max_new_tokens,
                      sampling=sampling or Sampling(), seed=seed,
                      eos_token_ids=loaded.tokenizer.eos_token_ids or None,
                      placement=placement)
    new_ids = result.new_ids[0]
    return {
        "model": loaded.source,
        "recipe": recipe_name(loaded),
        "prompt": prompt,
        "prompt_ids": ids,
        "new_ids": new_ids,
        "text": loaded.tokenizer.decode(new_ids),
        "prefill_tok_s": result.prefill_tok_s,
        "decode_tok_s": result.decode_tok_s,
        "prefill_seconds": result.prefill_seconds,
        "compile_seconds": result.compile_seconds,
        "programs": result.programs,
        "decode_seconds": result.decode_seconds,
        "kv_cache": loaded.config.kv_cache,
        "quantized_decode": _decode_path(placement),
        "kv_cache_bytes": result.kv_cache_bytes,
        "mesh": mesh_shape(placement),
    }


def optimize_model(loaded: LoadedModel, recipe: Recipe, out_dir: str | Path, *,
                   calibration: Any = None) -> dict[str, Any]:
    """Apply `recipe` to `loaded` (continuing an artifact's own recipe; calibrated ops run on
    `calibration`, see `recipes.apply_recipe`) and save the result as an artifact in
    `out_dir`.

    Args:
        loaded: the model.
        recipe: the recipe.
        out_dir: the artifact directory to write.

    Returns:
        model, recipe (the applied name), out, param_bytes, dense_param_bytes,
        weights_file_bytes, transform_seconds.

    Example:
        >>> from jaxopt_llm import load_model, load_recipe
        >>> record = optimize_model(load_model("smollm2-135m"), load_recipe("w8"),  # doctest: +SKIP
        ...                         "smol-w8")
    """
    from jaxopt_llm.io.artifact import WEIGHTS_FILE, save_artifact
    from jaxopt_llm.recipes import apply_recipe

    start = time.perf_counter()
    optimized = apply_recipe(loaded, recipe, calibration=calibration)
    seconds = time.perf_counter() - start
    extra = {**(optimized.extra or {}),
             "source": (loaded.extra or {}).get("source", loaded.source)}
    path = save_artifact(out_dir, config=optimized.config, params=optimized.params,
                         tokenizer=optimized.tokenizer, recipe=optimized.recipe, extra=extra)
    return {
        "model": loaded.source,
        "recipe": optimized.recipe["name"],
        "out": str(path),
        "param_bytes": param_bytes(optimized.params),
        "dense_param_bytes": extra["dense_param_bytes"],
        "weights_file_bytes": (path / WEIGHTS_FILE).stat().st_size,
        "transform_seconds": seconds,
    }


__all__ = ["evaluate_encoder_text", "evaluate_text", "generate_text", "mesh_shape",
           "optimize_model", "recipe_name"]
