"""Transform families and the ops recipes can name.

The built-in ops are registered here, from an explicit list (no import side effects
elsewhere); `register_op` adds a user's own op under a new name.
"""

from jaxopt_llm.transforms import (
    awq,
    gptq,
    lowrank,
    prune,
    quantize,
    smoothquant,
    sparsegpt,
    structured,
    wanda,
    whitened_svd,
)
from jaxopt_llm.transforms.base import (
    Op,
    OpOptions,
    per_parameter,
    register_op,
    registered_ops,
)

BUILTIN_OPS: tuple[Op, ...] = (*quantize.OPS, *gptq.OPS, *awq.OPS, *smoothquant.OPS,
                               *prune.OPS, *wanda.OPS, *sparsegpt.OPS, *lowrank.OPS,
                               *whitened_svd.OPS,
                               *structured.OPS)
for _op in BUILTIN_OPS:
    register_op(_op)


def available_ops() -> dict[str, Op]:
    """Every op a recipe rule can name (built-ins and registered ones), by name.

    Returns:
        name → `Op` (its `options.describe()` lists the options with their defaults).

    Example:
        >>> ops = available_ops()
        >>> "quantize" in ops, ops["nm"].options.describe()
        (True, "n=2, m=4, format='compressed'")
    """
    return registered_ops()


__all__ = ["BUILTIN_OPS", "Op", "OpOptions", "available_ops", "per_parameter", "register_op"]
