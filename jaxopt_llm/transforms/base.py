"""The op contract: what a recipe rule can name, and the registry of ops.

An op transforms the parameters a rule selects. It is pure: it gets a read-only flat view
of the parameters ({"a/b/kernel": leaf}), the selected paths, the model config (None for a
user's own model) and its typed options, and returns the (possibly new) config and a new
flat mapping; its input is never modified.

    op.apply(flat, paths, config, options) -> (config, new_flat)
    op.apply(flat, paths, config, options, calibration=stats)   # needs_calibration ops

Each op's options are a frozen, keyword-only dataclass (a subclass of `OpOptions`): the
defaults, the validation (in `validate`, run on construction) and the text `available_ops`
shows all live in that one class. Ops that need statistics of the model's activations
(GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT, ASVD, SVD-LLM) set `needs_calibration=True`
and receive them as `calibration=`; a stage refuses to run such an op without them.

The built-in ops are listed explicitly in `jaxopt_llm.transforms`; `register_op` adds a
user's own and rejects a name that is already taken.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax

Flat = Mapping[str, Any]
ApplyFn = Callable[..., tuple[Any, dict[str, Any]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpOptions:
    """Base of an op's options: subclass as a frozen kw-only dataclass with defaults."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad option; the default accepts everything."""

    @classmethod
    def names(cls) -> list[str]:
        """The option names, sorted.

        Returns:
            The dataclass's field names.
        """
        return sorted(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, given: Mapping[str, Any], *, op: str = "op") -> OpOptions:
        """Options from a recipe's mapping; unknown names are an error listing the valid ones."""
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise ValueError(f"op {op!r} has no option(s) {unknown}; options: {cls.names()}")
        return cls(**given)

    def to_dict(self) -> dict[str, Any]:
        """The options as a dict (every field, defaults included).

        Returns:
            {option name: value}.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> str:
        """"name=default, …" for listings (`available_ops`, the CLI's `recipes`)."""
        return ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))


def check_finite_number(name: str, value: Any, *, low: float | None = None,
                        high: float | None = None, open_low: bool = False,
                        open_high: bool = False) -> float:
    """A real, finite number (not a bool) inside [low, high] (ends open where asked).

    Args:
        name: the option's name, for the error message.
        value: the value to check.
        low / high: the bounds (None: unbounded on that side).
        open_low / open_high: exclude the bound itself.

    Returns:
        The value as a float.

    Raises:
        ValueError: naming `name`, the accepted interval and the value.

    Example:
        >>> check_finite_number("sparsity", 0.5, low=0.0, high=1.0, open_high=True)
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Op:
    """A transform a recipe rule can name.

    Attributes:
        name: what rules call it.
        options: its `OpOptions` class (a frozen kw-only dataclass).
        apply: the pure transform `apply(flat, paths, config, options) -> (config, flat)`
            (module docstring).
        doc: one line for listings.
        traceable: `plan` may run `apply` under `jax.eval_shape`; else `plan` (same
            signature) computes the shapes.
        plan: the shape-only version of a non-traceable op.
        needs_calibration: `apply` takes `calibration=`: True, or a function of the
            options for an op that needs it only for some (`calibrated`).

    Example:
        >>> op = Op(name="scale_by_two", options=OpOptions,
        ...         apply=per_parameter(lambda leaf, path, options: leaf * 2))
        >>> op.apply({"w": 1.0}, ["w"], None, OpOptions())
        (None, {'w': 2.0})
    """

    name: str
    options: type[OpOptions]
    apply: ApplyFn
    doc: str = ""
    traceable: bool = True
    plan: ApplyFn | None = None
    needs_calibration: bool | Callable[[Any], bool] = False

    def calibrated(self, options: Any) -> bool:
        """Whether `apply` with these options takes (and needs) `calibration=`.

        Args:
            options: the op's validated `OpOptions`.

        Returns:
            `needs_calibration`, or its value for these options.

        Example:
            >>> Op(name="x", options=OpOptions, apply=lambda *a: a).calibrated(OpOptions())
            False
        """
        if callable(self.needs_calibration):
            return bool(self.needs_calibration(options))
        return bool(self.needs_calibration)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"op name must be a non-empty string, got {self.name!r}")
        if not (isinstance(self.options, type) and issubclass(self.options, OpOptions)):
            raise ValueError(f"op {self.name!r}: options must be an OpOptions subclass")
        if not self.traceable and self.plan is None:
            raise ValueError(f"op {self.name!r}: an op that is not traceable needs `plan`")

    @property
    def defaults(self) -> dict[str, Any]:
        """Every option with its default (not validated: some ops require a choice)."""
        return {f.name: f.default for f in dataclasses.fields(self.options)}


_OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    """Make `op` nameable by recipe rules; a name can be registered once.

    Args:
        op: the `Op` to add.

    Returns:
        `op` itself.

    Raises:
        ValueError: the name is taken (a built-in, "keep", or an op registered before).

    Example:
        >>> register_op(Op(name="my_op", options=OpOptions, apply=my_apply))  # doctest: +SKIP
    """
    if op.name in _OPS or op.name == "keep":
        raise ValueError(f"an op named {op.name!r} is already registered; choose another name")
    _OPS[op.name] = op
    return op


def registered_ops() -> dict[str, Op]:
    """The ops registered so far, by name (the built-ins once jaxopt_llm.transforms is
    imported).

    Returns:
        A copy of the registry: name → `Op`.

    Example:
        >>> import jaxopt_llm.transforms
        >>> "quantize" in registered_ops()
        True
    """
    return dict(_OPS)


def per_parameter(fn: Callable[[Any, str, Any], Any]) -> ApplyFn:
    """Lift `fn(leaf, path, options)` to an op's `apply` over the selected parameters.

    Shapes are checked for every selected parameter (a dry run under eval_shape) before any
    of them is transformed, so a bad option fails before work starts.

    Args:
        fn: maps one parameter (its leaf, its path, the op's options) to its new leaf.

    Returns:
        An `apply(flat, paths, config, options) -> (config, new_flat)`.

    Example:
        >>> apply = per_parameter(lambda leaf, path, options: -leaf)
        >>> apply({"a": 1.0, "b": 2.0}, ["b"], None, OpOptions())
        (None, {'a': 1.0, 'b': -2.0})
    """

    def apply(flat: Flat, paths: list[str], config: Any, options: Any) -> tuple[Any, dict]:
        jax.eval_shape(lambda leaves: [fn(leaf, p, options) for p, leaf in zip(
            paths, leaves, strict=True)], [flat[p] for p in paths])
        out = dict(flat)
        for path in paths:
            out[path] = fn(flat[path], path, options)
        return config, out

    return apply


__all__ = ["Op", "OpOptions", "check_finite_number", "per_parameter", "register_op",
           "registered_ops"]
