"""Selecting parameters: ordered rules, regex on `/`-joined paths, first match wins.

A rule names an operation (`op`) and its options; `assign` maps every parameter of a
tree to the first rule whose pattern `re.fullmatch`es its path (as in Qwix's rule
lists). A rule that selects nothing — its pattern matches no path, or every path it
matches was taken by an earlier rule — is an error, so a typo never silently
leaves a model uncompressed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from jaxopt_llm import tree
from jaxopt_llm.tree import freeze, thaw  # noqa: F401  (re-exported for recipes)

KEEP = "keep"  # the op that leaves a parameter as it is (an exclusion rule)

# Every kernel except an untied output head: the linears of every block, in our models and
# in users' models built from nn.Dense / nnx.Linear (their weights are all named "kernel").
BLOCK_LINEARS = r"(?!lm_head/)(.*/)?kernel"
EMBEDDINGS = r"(.*/)?embedding"
HEAD = r"lm_head/kernel"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """`op` (with `options`) for every parameter whose path fully matches `match`."""

    match: str
    op: str
    options: tuple[tuple[str, Any], ...] = ()
    # An optional rule may select nothing (a built-in recipe's rule for parts some models
    # lack, such as a family's token table); every other rule that selects nothing is an error.
    optional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            raise ValueError(f"rule match must be a non-empty regex string, got {self.match!r}")
        try:
            re.compile(self.match)
        except re.error as err:
            raise ValueError(f"rule match '{self.match}' is not a valid regex: {err}") from None
        if not isinstance(self.op, str) or not self.op:
            raise ValueError(f"rule op must be a non-empty string, got {self.op!r}")
        if not isinstance(self.optional, bool):
            raise ValueError(f"rule optional must be true or false, got {self.optional!r}")
        object.__setattr__(self, "options", freeze(dict(self.options)))

    @property
    def option_dict(self) -> dict[str, Any]:
        """The options as a dict (values in their frozen, hashable form)."""
        return dict(self.options)

    def matches(self, path: str) -> bool:
        """Whether `path` fully matches the rule's regex.

        Args:
            path: a "/"-joined parameter path.

        Returns:
            True on a `re.fullmatch`.
        """
        return re.fullmatch(self.match, path) is not None

    def describe(self) -> str:
        """"op(option=value, …)" for plans and listings.

        Returns:
            The text.
        """
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.op}({opts})" if opts else self.op


def rule(match: str, op: str, *, optional: bool = False, **options: Any) -> Rule:
    """A `Rule` from keyword options: rule(match, op, **options).

    Args:
        match: a regex `re.fullmatch`ed against "/"-joined parameter paths.
        op: the op's name (or "keep").
        optional: the rule may select nothing (otherwise that is an error).
        **options: the op's options.

    Returns:
        The `Rule`.

    Example:
        >>> rule(".*kernel", "quantize", bits=8).describe()
        'quantize(bits=8)'
    """
    return Rule(match=match, op=op, options=tuple(options.items()), optional=optional)


def assign(rules: tuple[Rule, ...], paths: list[str], *, where: str = "recipe") -> list[list[str]]:
    """For each rule, the paths it takes (first match wins); error on a rule that takes none
    (unless it is `optional`).

    Args:
        rules: the ordered rules.
        paths: every parameter path.
        where: prefixed to error messages (e.g. "stage 'quantize'").

    Returns:
        Per rule, the list of paths it takes.

    Raises:
        ValueError: a rule matches no path, or every path it matches is taken earlier.

    Example:
        >>> assign((rule("a/.*", "keep"), rule(".*", "quantize")), ["a/k", "b/k"])
        [['a/k'], ['b/k']]
    """
    taken: list[list[str]] = [[] for _ in rules]
    for path in paths:
        for index, candidate in enumerate(rules):
            if candidate.matches(path):
                taken[index].append(path)
                break
    for index, candidate in enumerate(rules):
        if taken[index] or candidate.optional:
            continue
        shadowed = [p for p in paths if candidate.matches(p)]
        if shadowed:
            raise ValueError(
                f"{where}: rule {index} (match '{candidate.match}', op {candidate.op!r}) selects "
                f"nothing: every parameter it matches ({_preview(shadowed)}) is taken by an "
                f"earlier rule"
            )
        raise ValueError(
            f"{where}: rule {index} (match '{candidate.match}', op {candidate.op!r}) matches no "
            f"parameter; paths look like {_preview(paths)}"
        )
    return taken


def _preview(paths: list[str], limit: int = 4) -> str:
    head = ", ".join(paths[:limit])
    return head + (f", … ({len(paths)} in all)" if len(paths) > limit else "")


def iter_selected(params: Any, rules: tuple[Rule, ...]) -> Iterator[tuple[Rule, str, Any]]:
    """(rule, path, leaf) for every parameter a rule takes, in rule order.

    Args:
        params: the parameter tree.
        rules: the ordered rules.

    Returns:
        An iterator of (rule, path, leaf).

    Example:
        >>> [path for _, path, _ in iter_selected({"a": {"k": 1}, "b": 2}, (rule(".*", "keep"),))]
        ['a/k', 'b']
    """
    flat = tree.flatten(params)
    for candidate, paths in zip(rules, assign(rules, list(flat)), strict=True):
        for path in paths:
            yield candidate, path, flat[path]
