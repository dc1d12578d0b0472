"""Dry run of a recipe: per parameter, the op it gets and its bytes before → after.

Nothing heavy runs: traceable ops are evaluated with `jax.eval_shape` on shape-only
parameters, other ops (SVD, structured pruning) supply a shape-only `plan` function.
Every check a real run makes (rules that select nothing, bad options, shapes that
do not divide) fails here the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_llm import tree
from jaxopt_llm.pipeline import Recipe
from jaxopt_llm.rules import KEEP
from jaxopt_llm.weights import is_weight_leaf, materialize, param_bytes


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One parameter of a `Plan`: its path, the stages and ops that transform it, its dense
    shape, bytes before → after and its representation afterwards (class or dtype).
    """
    stage: str  # stages that transformed it, " → "-joined ("-" if none)
    path: str
    op: str  # ops in order, " → "-joined; "keep" for parameters no rule transforms
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    representation: str  # type of the leaf afterwards


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `plan` returns: a row per parameter, the byte totals and the config after the
    recipe. `str(plan)` is the table the CLI prints; `to_dict()` its JSON.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.pipeline import Recipe, Stage
        >>> from jaxopt_llm.rules import rule
        >>> recipe = Recipe(name="w8", stages=(
        ...     Stage(name="quantize", rules=(rule(".*kernel", "quantize", bits=8),)),))
        >>> print(plan(recipe, None, {"dense": {"kernel": jnp.ones((256, 128))}}))
        recipe w8
        parameter     stage:op                        before        after  as
        dense/kernel  quantize:quantize(bits=8)      131,072       33,280  QuantizedWeight
        total 131,072 → 33,280 bytes (0.254×)
    """
    recipe: str
    rows: tuple[PlanRow, ...]
    bytes_before: int
    bytes_after: int
    config_after: Any

    def to_dict(self) -> dict[str, Any]:
        """JSON data: recipe, total bytes, and per parameter its path, stage, op, shape,
        bytes before/after and representation."""
        return {
            "recipe": self.recipe,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "parameters": [dict(path=r.path, stage=r.stage, op=r.op, shape=list(r.shape),
                                bytes_before=r.bytes_before, bytes_after=r.bytes_after,
                                representation=r.representation) for r in self.rows],
        }

    def __str__(self) -> str:
        width = max([len(r.path) for r in self.rows] + [9])
        op_width = max([len(r.stage) + len(r.op) + 1 for r in self.rows] + [8])
        lines = [f"recipe {self.recipe}",
                 f"{'parameter':<{width}}  {'stage:op':<{op_width}} {'before':>12} "
                 f"{'after':>12}  as"]
        for r in self.rows:
            lines.append(f"{r.path:<{width}}  {r.stage + ':' + r.op:<{op_width}} "
                         f"{r.bytes_before:>12,} {r.bytes_after:>12,}  {r.representation}")
        ratio = self.bytes_after / max(self.bytes_before, 1)
        lines.append(f"total {self.bytes_before:,} → {self.bytes_after:,} bytes ({ratio:.3f}×)")
        return "\n".join(lines)


def dense_param_bytes(params: Any) -> int:
    """Bytes of the same weights stored densely in float32 (what a recipe's savings are
    measured against), from shapes only.

    Args:
        params: a parameter tree (typed leaves count as their dense shape).

    Returns:
        4 bytes per dense weight entry.

    Example:
        >>> import jax.numpy as jnp
        >>> dense_param_bytes({"w": jnp.ones((4, 4), jnp.bfloat16)})
        64
    """
    shapes = jax.eval_shape(materialize, params)
    return param_bytes(jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), shapes))


def _shapes(params: Any) -> Any:
    """Shape-only copy in the tree's own key order (tree_map would sort dict keys)."""
    return tree.unflatten({
        path: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), leaf)
        for path, leaf in tree.flatten(params).items()})


def _shape_of(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else ()


def planned_params(recipe: Recipe, config: Any, params: Any,
                   touched: dict[str, list[tuple[str, str]]] | None = None
                   ) -> tuple[Any, Any]:
    """The config and the parameters' shapes after `recipe`, computed from shapes only
    (typed leaves hold `jax.ShapeDtypeStruct`s): what an exporter checks before any work.

    Args:
        recipe: the recipe.
        config: the model's config.
        params: the parameter tree (arrays or shapes).
        touched: if given, filled with path → [(stage, op description)].

    Returns:
        (config after, parameter tree of shapes after).

    Raises:
        ValueError: every error a real run would raise.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.pipeline import Recipe, Stage
        >>> from jaxopt_llm.rules import rule
        >>> recipe = Recipe(name="w8", stages=(
        ...     Stage(name="quantize", rules=(rule(".*kernel", "quantize", bits=8),)),))
        >>> _, after = planned_params(recipe, None, {"w": {"kernel": jnp.ones((256, 128))}})
        >>> after["w"]["kernel"].describe(), after["w"]["kernel"].qvalue.dtype
        ('QuantizedWeight', dtype('int8'))
    """
    recipe.check()
    touched = {} if touched is None else touched
    current = _shapes(params)
    for stage in recipe.stages:
        flat = tree.flatten(current)
        for candidate, op, paths, opts in stage.selections(flat):
            if op.traceable:
                box: dict[str, Any] = {}

                def run(leaves, op=op, paths=paths, opts=opts, box=box, config=config):
                    cfg, out = op.apply(dict(leaves), paths, config, opts)
                    box["config"] = cfg
                    return out

                flat = jax.eval_shape(run, flat)
                config = box["config"]
            else:
                config, flat = op.plan(dict(flat), paths, config, opts)
            for path in paths:
                touched.setdefault(path, []).append((stage.name, candidate.describe()))
        current = tree.unflatten(flat)
    return config, current


def plan(recipe: Recipe, config: Any, params: Any) -> Plan:
    """Per-parameter plan of `recipe` on (config, params), computed from shapes only.

    Args:
        recipe: the recipe.
        config: the model's config (None for a user's own model; structural ops need it).
        params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).

    Returns:
        The `Plan`.

    Raises:
        ValueError: every error a real run would raise (a rule that selects nothing, bad
            options, shapes that do not divide).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.pipeline import Recipe, Stage
        >>> from jaxopt_llm.rules import rule
        >>> recipe = Recipe(name="w8", stages=(
        ...     Stage(name="quantize", rules=(rule(".*kernel", "quantize", bits=8),)),))
        >>> plan(recipe, None, {"w": {"kernel": jnp.ones((256, 128))}}).bytes_after
        33280
    """
    current = _shapes(params)
    before_total = param_bytes(current)
    origin = {path: param_bytes(leaf) for path, leaf in tree.flatten(current).items()}
    shape0 = {path: _shape_of(leaf) for path, leaf in tree.flatten(current).items()}
    touched: dict[str, list[tuple[str, str]]] = {}
    config, current = planned_params(recipe, config, current, touched)
    rows = []
    for path, leaf in tree.flatten(current).items():
        steps = touched.get(path, [("-", KEEP)])
        stage = " → ".join(step[0] for step in steps)
        op = " → ".join(step[1] for step in steps)
        rows.append(PlanRow(stage=stage, path=path, op=op, shape=shape0.get(path, ()),
                            bytes_before=origin.get(path, 0), bytes_after=param_bytes(leaf),
                            representation=leaf.describe() if is_weight_leaf(leaf)
                            else str(leaf.dtype)))
    return Plan(recipe=recipe.name, rows=tuple(rows), bytes_before=before_total,
                bytes_after=param_bytes(current), config_after=config)
