"""Gradual magnitude pruning during training ("To prune, or not to prune", Zhu & Gupta,
2017): sparsity s_t = s_f·(1 − (1 − (t − t₀)/(T − t₀))³) for t₀ ≤ t ≤ T, masks recomputed
every `every` steps; masked weights stay exactly zero between recomputations
(`MaskedWeight`).

`gradual_recipe` turns a recipe's `prune` rules into a start at sparsity 0 plus the
targets, `prune_schedules` resolves them to parameter paths, and the training loop asks
each `PruneSchedule` before every step whether to recompute masks (`reprune`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxopt_llm import tree
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.transforms.prune import MagnitudeOptions, magnitude_prune


def polynomial_sparsity(step: int, final: float, start: int, end: int) -> float:
    """s_t = s_f·(1 − (1 − (t − t₀)/(T − t₀))³), 0 before t₀ and s_f after T.

    Args:
        step: t.
        final: s_f, in [0, 1).
        start: t₀.
        end: T (> t₀).

    Returns:
        The sparsity at `step`.

    Example:
        >>> polynomial_sparsity(50, 0.5, 0, 100)
        0.4375
    """
    if not 0.0 <= final < 1.0:
        raise ValueError(f"final sparsity must be in [0, 1), got {final}")
    if not 0 <= start < end:
        raise ValueError(f"need 0 <= start < end, got start={start}, end={end}")
    if step <= start:
        return 0.0
    progress = min(1.0, (step - start) / (end - start))
    return final * (1.0 - (1.0 - progress) ** 3)


def reprune(params: Any, paths: list[str], sparsity: float, scope: str = "layer") -> Any:
    """Recompute magnitude masks of `paths` at `sparsity` (already-pruned zeros stay pruned:
    they are the smallest magnitudes).

    Args:
        params: the parameter tree (the paths hold `MaskedWeight`s or arrays).
        paths: the parameters to re-mask.
        sparsity: the new sparsity.
        scope: "layer", "row" or "global", as the `prune` op.

    Returns:
        A new tree with `MaskedWeight`s at `paths`.

    Example:
        >>> import jax.numpy as jnp
        >>> out = reprune({"w": jnp.array([[1.0, -4.0], [3.0, 0.5]])}, ["w"], 0.5)
        >>> out["w"].materialize().tolist()
        [[0.0, -4.0], [3.0, 0.0]]
    """
    flat = tree.flatten(params)
    _, flat = magnitude_prune(flat, paths, None,
                              MagnitudeOptions(sparsity=sparsity, scope=scope, format="masked"))
    return tree.unflatten(flat)


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
    """Gradual magnitude pruning of `paths` (MaskedWeight leaves) to `final` sparsity:
    the schedule of `polynomial_sparsity` from step `start` to `end`,
    masks recomputed before every `every`-th step.

    Example:
        >>> schedule = PruneSchedule(paths=("w",), final=0.5, start=0, end=100, every=25)
        >>> schedule.target(50), schedule.target(51)
        (0.4375, None)
    """

    paths: tuple[str, ...]
    final: float
    start: int
    end: int
    every: int
    scope: str = "layer"

    def __post_init__(self) -> None:
        polynomial_sparsity(self.start, self.final, self.start, self.end)  # validates
        if self.every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {self.every}")

    def target(self, step: int) -> float | None:
        """The sparsity to impose before `step` (0-based), or None if not a mask step.

        Args:
            step: the step about to run.

        Returns:
            The sparsity, or None.
        """
        if not self.start <= step <= self.end:
            return None
        if (step - self.start) % self.every and step != self.end:
            return None
        return polynomial_sparsity(step, self.final, self.start, self.end)


def gradual_recipe(recipe: Recipe, steps: int) -> tuple[Recipe, list[dict[str, Any]]]:
    """Split a recipe's `prune` rules into a start at sparsity 0 (masks of all ones) and
    the schedules that reach each rule's sparsity by 3/4 of the run (Zhu & Gupta's
    shape, masks recomputed 20 times).

    Args:
        recipe: a recipe with at least one `prune` rule.
        steps: the run's steps.

    Returns:
        (the recipe "<name>-gradual" at sparsity 0, one target dict per prune rule for
        `prune_schedules`).

    Example:
        >>> from jaxopt_llm.recipes import load_recipe
        >>> form, targets = gradual_recipe(load_recipe("magnitude-50"), 100)
        >>> targets[0]["final"], targets[0]["end"], targets[0]["every"]
        (0.5, 75, 3)
    """
    stages, targets = [], []
    for stage in recipe.stages:
        rules = []
        for rule in stage.rules:
            if rule.op == "prune":
                options = {**rule.option_dict, "format": "masked"}
                targets.append({"match": rule.match, "stage": stage.name,
                                "final": float(options.get("sparsity", 0.5)),
                                "scope": options.get("scope", "layer")})
                rule = dataclasses.replace(
                    rule, options=tuple({**options, "sparsity": 0.0}.items()))
            rules.append(rule)
        stages.append(Stage(name=stage.name, rules=tuple(rules)))
    if not targets:
        raise ValueError(f"recipe {recipe.name!r} has no `prune` rule to make gradual")
    end = max(1, (3 * steps) // 4)
    for target in targets:
        target.update(start=0, end=end, every=max(1, end // 20))
    return Recipe(name=f"{recipe.name}-gradual", description=recipe.description,
                  stages=tuple(stages)), targets


def prune_schedules(recipe: Recipe, targets: list[dict[str, Any]], params: Any
                    ) -> list[PruneSchedule]:
    """The schedules of `gradual_recipe`'s targets on the parameters their rules select.

    Args:
        recipe: the gradual recipe `gradual_recipe` returned.
        targets: its targets.
        params: the parameters after that recipe was applied.

    Returns:
        One `PruneSchedule` per target.

    Example:
        >>> form, targets = gradual_recipe(load_recipe("magnitude-50"), 100)  # doctest: +SKIP
        >>> config, params = form(config, params)  # doctest: +SKIP
        >>> schedules = prune_schedules(form, targets, params)  # doctest: +SKIP
    """
    flat = tree.flatten(params)
    schedules = []
    for target in targets:
        stage = next(s for s in recipe.stages if s.name == target["stage"])
        paths = next(p for r, _, p, _ in stage.selections(flat) if r.match == target["match"])
        schedules.append(PruneSchedule(paths=tuple(paths), final=target["final"],
                                       start=target["start"], end=target["end"],
                                       every=target["every"], scope=target["scope"]))
    return schedules
