"""What every calibrated, block-by-block op checks before it runs, and how it groups work.

GPTQ, AWQ and SmoothQuant (and the calibrated pruning / low-rank ops) run the model block
by block on calibration data (`calibration.layer_sequential`), so they transform the
float linear kernels inside the blocks and nothing else. `block_selection` checks that
before any work — a compressed leaf, a parameter outside the blocks or a config that is
not a built-in family is one clear error — and maps each block index to its selected
parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from jaxopt_llm import tree
from jaxopt_llm.calibration import layer_sequential
from jaxopt_llm.models import ModelConfig, family_spec
from jaxopt_llm.weights import is_weight_leaf


def block_selection(flat: Mapping[str, Any], paths: list[str], config: Any,
                    op: str) -> dict[int, list[str]]:
    """Block index → the selected kernels in it ("layers_3/attn/q_proj/kernel", …).

    Args:
      flat: the flat parameters (arrays or shapes).
      paths: the parameters the rule selected.
      config: the model config (must be a built-in family's `ModelConfig`).
      op: the op's name, for errors.

    Returns:
      {block index: [paths]} in block order.

    Raises:
      ValueError: no ModelConfig; a selected parameter is already a compressed leaf (say
        what to do: apply the recipe to the float model); one outside the blocks; one that
        is not a 2-D kernel.

    Example:
      >>> block_selection(flat, ["layers_1/mlp/up_proj/kernel"], config, "awq")  # doctest: +SKIP
      {1: ['layers_1/mlp/up_proj/kernel']}
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"{op} needs the ModelConfig of a built-in family (it runs the model "
                         "block by block on calibration data)")
    spec = family_spec(config)
    by_block: dict[int, list[str]] = {}
    for path in paths:
        leaf = flat[path]
        if is_weight_leaf(leaf):
            raise ValueError(f"{path} is already a {type(leaf).__name__}: {op} starts from "
                             "the float weights; apply the recipe to the original model, not "
                             "to a compressed artifact")
        found = re.match(rf"{re.escape(spec.block_prefix)}_(\d+)/", path)
        if found is None:
            raise ValueError(f"{op} transforms the linears of the model's blocks; {path} is "
                             "outside them (exclude it with a keep rule or narrow the match)")
        if not path.endswith("/kernel") or getattr(leaf, "ndim", 0) != 2:
            raise ValueError(f"{path}: {op} transforms 2-D linear kernels only, got "
                             f"{type(leaf).__name__} {getattr(leaf, 'shape', '')}")
        by_block.setdefault(int(found.group(1)), []).append(path)
    return dict(sorted(by_block.items()))


def inside(path: str, block_path: str) -> str:
    """A parameter's path inside its block: ("layers_3/attn/q_proj/kernel", "layers_3") →
    "attn/q_proj/kernel".

    Args:
      path: the full path.
      block_path: the block's path (a prefix of `path`).

    Returns:
      The rest of the path.

    Example:
      >>> inside("layers_3/attn/q_proj/kernel", "layers_3")
      'attn/q_proj/kernel'
    """
    return path[len(block_path) + 1:]


__all__ = ["block_selection", "inside"]


def each_linear_sequentially(flat: Mapping[str, Any], by_block: Mapping[int, list[str]],
                             config: Any, calibration: Any,
                             transform: Callable[[Any, str, Any], Any]) -> dict[str, Any]:
    """Replace every selected kernel by `transform(leaf, path, stats)`, blocks in order,
    each block's statistics taken from the outputs of the blocks already transformed.

    Args:
        flat: the parameters by path.
        by_block: `block_selection`'s result.
        config: the model config.
        calibration: the `calibration.Calibration` windows.
        transform: (kernel, its path, its inputs' `calibration.LinearStats`) → new leaf.

    Returns:
        The new parameters by path.

    Example:
        >>> each_linear_sequentially(flat, by_block, config, calibration,
        ...                          lambda w, path, stats: w)  # doctest: +SKIP
    """
    def compress(context: Any) -> Any:
        block = tree.flatten(context.params)
        for path in by_block[context.index]:
            name = inside(path, context.path)
            block[name] = transform(block[name], path,
                                    context.stats[name.rsplit("/", 1)[0]])
        return tree.unflatten(block)

    params = layer_sequential(config, tree.unflatten(dict(flat)), calibration, compress,
                              blocks=list(by_block))
    return tree.flatten(params)
