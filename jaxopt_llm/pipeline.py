"""Passes, stages, recipes: composing parameter transforms like compiler passes.

A pass is a pure function `(config, params) -> (config, params)` (config may be None
for a user's own model; only structural passes need it). A `Stage` is a pass built
from ordered rules (jaxopt_llm.rules): each rule sends the parameters it selects to
one registered op with its options. A `Recipe` is a named chain of stages and is
data: it loads from and saves to YAML or JSON, exactly round-tripping, and travels
with every artifact so a result can be rebuilt from the artifact alone.

Ops and their typed options are defined in jaxopt_llm.transforms (the op contract is in
transforms/base.py): an op gets a read-only view of the parameters and returns new ones.
Options are validated for every rule of a recipe before any work starts, and stage names
within a recipe are unique (errors name the stage).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxopt_llm import tree
from jaxopt_llm.rules import KEEP, Rule, assign
from jaxopt_llm.transforms import Op, OpOptions, available_ops
from jaxopt_llm.tree import thaw

Pass = Callable[[Any, Any], tuple[Any, Any]]


def get_op(name: str) -> Op:
    """The op a rule names; an unknown name is an error listing the ops.

    Args:
        name: the op's registered name.

    Returns:
        The `Op`.

    Example:
        >>> get_op("svd").traceable
        False
    """
    ops = available_ops()
    if name not in ops:
        raise ValueError(f"unknown op {name!r}; available ops: {sorted([KEEP, *ops])}")
    return ops[name]


def resolved_options(candidate: Rule, where: str) -> OpOptions:
    """The rule's options as the op's typed options (defaults filled in), validated.

    Args:
        candidate: the rule.
        where: the rule's place, prefixed to error messages (e.g. "stage 'q' rule 0").

    Returns:
        The op's `OpOptions` instance.

    Raises:
        ValueError: unknown op, unknown option names or bad values, naming `where`.

    Example:
        >>> from jaxopt_llm.rules import rule
        >>> resolved_options(rule(".*", "prune", sparsity=0.25), "stage 's' rule 0")
        MagnitudeOptions(sparsity=0.25, scope='layer', format='masked')
    """
    try:
        op = get_op(candidate.op)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    given = {k: thaw(v) for k, v in candidate.option_dict.items()}
    unknown = sorted(set(given) - set(op.options.names()))
    if unknown:
        raise ValueError(f"{where}: op {candidate.op!r} has no option(s) {unknown}; "
                         f"options: {op.options.names()}")
    try:
        return op.options(**given)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: op {candidate.op!r}: {err}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One pass: ordered rules (first match wins), each applying its op to what it selects.

    Calling a stage, `stage(config, params, calibration=None)`, returns the new
    (config, params); every rule must select at least one parameter.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.rules import rule
        >>> stage = Stage(name="prune", rules=(rule(".*", "prune", sparsity=0.5, format="dense"),))
        >>> stage(None, {"w": jnp.array([[1.0, -4.0], [3.0, 0.5]])})[1]["w"].tolist()
        [[0.0, -4.0], [3.0, 0.0]]
    """

    name: str
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if not self.rules:
            raise ValueError(f"stage {self.name!r} has no rules")

    def check(self) -> list[OpOptions | None]:
        """Validate every rule's op and options up front; returns the typed options.

        Returns:
            Per rule, its `OpOptions` (None for a `keep` rule).
        """
        return [
            None if r.op == KEEP else resolved_options(r, f"stage {self.name!r} rule {i}")
            for i, r in enumerate(self.rules)
        ]

    def selections(self, flat: Mapping[str, Any]) -> list[tuple[Rule, Op, list[str], OpOptions]]:
        """(rule, op, selected paths, typed options) for each rule that transforms.

        Args:
            flat: the flat parameters ({"a/b/kernel": leaf}).

        Returns:
            One tuple per rule that is not `keep`, in rule order.

        Raises:
            ValueError: a rule selects nothing, or bad options.
        """
        options = self.check()
        selection = assign(self.rules, list(flat), where=f"stage {self.name!r}")
        return [(candidate, get_op(candidate.op), paths, opts)
                for candidate, paths, opts in zip(self.rules, selection, options, strict=True)
                if candidate.op != KEEP]

    def __call__(self, config: Any, params: Any, *, calibration: Any = None) -> tuple[Any, Any]:
        flat = tree.flatten(params)
        for candidate, op, paths, opts in self.selections(flat):
            view = types.MappingProxyType(flat)  # ops return new parameters, never edit these
            if op.calibrated(opts):
                if calibration is None:
                    raise ValueError(f"stage {self.name!r}: op {candidate.op!r} needs "
                                     "calibration data; pass calibration=")
                config, flat = op.apply(view, paths, config, opts, calibration=calibration)
            else:
                config, flat = op.apply(view, paths, config, opts)
        return config, tree.unflatten(flat)


def chain(*passes: Pass) -> Pass:
    """Apply passes in order; the result is again a pass.

    Args:
        *passes: functions (config, params) -> (config, params).

    Returns:
        The composed pass.

    Example:
        >>> twice = chain(lambda c, p: (c, p * 2), lambda c, p: (c, p + 1))
        >>> twice(None, 3)
        (None, 7)
    """

    def chained(config: Any, params: Any) -> tuple[Any, Any]:
        for p in passes:
            config, params = p(config, params)
        return config, params

    return chained


def named_chain(*named: tuple[str, Pass]) -> Pass:
    """`chain` whose errors say which named pass failed.

    Args:
        *named: (name, pass) pairs.

    Returns:
        The composed pass; a ValueError from a pass is re-raised as "pass 'name': …".

    Example:
        >>> def fails(config, params):
        ...     raise ValueError("bad")
        >>> named_chain(("first", fails))(None, {})
        Traceback (most recent call last):
        ...
        ValueError: pass 'first': bad
    """

    def chained(config: Any, params: Any) -> tuple[Any, Any]:
        for name, p in named:
            try:
                config, params = p(config, params)
            except ValueError as err:
                raise ValueError(f"pass {name!r}: {err}") from None
        return config, params

    return chained


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named, serializable chain of stages.

    Calling it, `recipe(config, params, calibration=None)`, checks every stage's options,
    then runs the stages in order (errors name the stage). `to_dict` / `from_dict` and
    `save_recipe` / `read_recipe_file` round-trip it exactly; artifacts store it.

    Example:
        >>> from jaxopt_llm.rules import rule
        >>> recipe = Recipe(name="w8", stages=(
        ...     Stage(name="quantize", rules=(rule(".*kernel", "quantize", bits=8),)),))
        >>> recipe.to_dict()["stages"][0]["rules"]
        [{'match': '.*kernel', 'op': 'quantize', 'options': {'bits': 8}}]
    """

    name: str
    stages: tuple[Stage, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        seen: set[str] = set()
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"recipe {self.name!r}: stage name {stage.name!r} is used "
                                 "twice; stage names must be unique")
            seen.add(stage.name)

    def check(self) -> None:
        """Validate every stage's rules and options (no parameters needed).

        Raises:
            ValueError: naming the stage and rule.
        """
        for stage in self.stages:
            stage.check()

    @property
    def needs_calibration(self) -> bool:
        """True when an op of the recipe needs calibration data (`calibration=`)."""
        return any(get_op(r.op).calibrated(options) for stage in self.stages
                   for r, options in zip(stage.rules, stage.check(), strict=True)
                   if r.op != KEEP)

    def __call__(self, config: Any, params: Any, *, calibration: Any = None) -> tuple[Any, Any]:
        self.check()
        return named_chain(*((s.name, functools.partial(s, calibration=calibration))
                             for s in self.stages))(config, params)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML data: name, description, stages with their rules and options.

        Returns:
            The dict `from_dict` reads back.
        """
        return {
            "name": self.name,
            "description": self.description,
            "stages": [
                {"name": s.name,
                 "rules": [{"match": r.match, "op": r.op, "options": thaw(r.options) or {},
                            **({"optional": True} if r.optional else {})}
                           for r in s.rules]}
                for s in self.stages
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        """A recipe from the data `to_dict` writes (the YAML / JSON file format).

        Args:
            data: the mapping.
            source: where it came from, prefixed to error messages.

        Returns:
            The `Recipe`.

        Raises:
            ValueError: missing or unknown keys, naming where.
        """
        return _recipe_from_dict(data, source)


def _expect_keys(data: Any, where: str, required: Sequence[str], optional: Sequence[str]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected "
                         f"{sorted([*required, *optional])}")


def _recipe_from_dict(data: Any, source: str) -> Recipe:
    _expect_keys(data, source, ["name", "stages"], ["description"])
    if not isinstance(data["name"], str) or not data["name"]:
        raise ValueError(f"{source}: name must be a non-empty string")
    if not isinstance(data.get("description", ""), str):
        raise ValueError(f"{source}: description must be a string")
    if not isinstance(data["stages"], list):
        raise ValueError(f"{source}: stages must be a list")
    stages = []
    for i, stage in enumerate(data["stages"]):
        where = f"{source}: stages[{i}]"
        _expect_keys(stage, where, ["name", "rules"], [])
        if not isinstance(stage["rules"], list) or not stage["rules"]:
            raise ValueError(f"{where}.rules: expected a non-empty list of rules")
        rules = []
        for j, item in enumerate(stage["rules"]):
            at = f"{where}.rules[{j}]"
            _expect_keys(item, at, ["match", "op"], ["options", "optional"])
            options = item.get("options") or {}
            if not isinstance(options, Mapping):
                raise ValueError(f"{at}.options: expected a mapping of option names to values")
            try:
                rules.append(Rule(match=item["match"], op=item["op"],
                                  options=tuple(options.items()),
                                  optional=item.get("optional", False)))
            except ValueError as err:
                raise ValueError(f"{at}: {err}") from None
        stages.append(Stage(name=str(stage["name"]), rules=tuple(rules)))
    return Recipe(name=data["name"], description=data.get("description", ""),
                  stages=tuple(stages))


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write a recipe as YAML (.yaml/.yml) or JSON (.json).

    Args:
        recipe: the recipe.
        path: the file to write (replaced atomically).

    Returns:
        The path.

    Example:
        >>> import pathlib, tempfile
        >>> from jaxopt_llm.rules import rule
        >>> recipe = Recipe(name="w8", stages=(
        ...     Stage(name="quantize", rules=(rule(".*kernel", "quantize", bits=8),)),))
        >>> path = save_recipe(recipe, pathlib.Path(tempfile.mkdtemp()) / "w8.yaml")
        >>> read_recipe_file(path) == recipe
        True
    """
    import yaml

    path = Path(path)
    data = recipe.to_dict()
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    elif path.suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        raise ValueError(f"recipe file {path}: expected a .yaml, .yml or .json name")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_recipe_file(path: str | Path) -> Recipe:
    """Read a recipe from a .yaml/.yml or .json file, checking every rule's options.

    Args:
        path: the file.

    Returns:
        The `Recipe`.

    Raises:
        ValueError: a missing file, bad YAML / JSON (with line and column), or a bad
            recipe, naming the file and the place in it.

    Example:
        >>> read_recipe_file("my_recipe.yaml")  # doctest: +SKIP
        Recipe(name='mixed', stages=(...), description='...')
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"recipe file {path}: not UTF-8 text (byte {err.start}); a recipe is "
                         "a .yaml or .json text file") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise ValueError(f"recipe file {path}: expected a .yaml, .yml or .json file")
    except json.JSONDecodeError as err:
        raise ValueError(f"recipe file {path}: invalid JSON at line {err.lineno} column "
                         f"{err.colno}: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ValueError(f"recipe file {path}: invalid YAML{at}: "
                         f"{getattr(err, 'problem', err)}") from None
    recipe = Recipe.from_dict(data, source=f"recipe file {path}")
    for i, stage in enumerate(recipe.stages):
        for j, candidate in enumerate(stage.rules):
            if candidate.op != KEEP:
                resolved_options(candidate, f"recipe file {path}: stages[{i}].rules[{j}]")
    return recipe
