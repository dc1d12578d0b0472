"""The one place that flattens and rebuilds parameter trees, and freezes values for hashing.

A parameter tree is a nested dict of arrays and typed weight leaves
(`jaxopt_llm.weights.base.WeightLeaf`). Every selection in the project — recipe rules,
shard rules, trainable-parameter rules, artifacts — addresses a parameter by its path:
the dict keys from the root, joined with "/" (e.g. "layers_0/attn/q_proj/kernel"). A
typed leaf is one parameter: it is never descended into.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxopt_llm.weights.base import WeightLeaf

SEPARATOR = "/"


def flatten_keys(tree: Any, *, strict: bool = False) -> dict[tuple, Any]:
    """Nested mapping → {(key, key, …): leaf} in tree order, keys as they are (e.g. NNX's
    int list indices), typed weight leaves kept whole.

    Args:
      tree: a nested mapping of arrays and weight leaves.
      strict: also require every key to be a non-empty string without "/" (what an
        artifact can store).

    Returns:
      A dict from key tuple to leaf.

    Example:
      >>> flatten_keys({"layers": {0: {"kernel": 1}}})
      {('layers', 0, 'kernel'): 1}
    """
    if strict and not isinstance(tree, Mapping):
        raise ValueError(f"params must be a nested dict, got {type(tree).__name__}")
    out: dict[tuple, Any] = {}

    def visit(node: Any, prefix: tuple) -> None:
        if isinstance(node, Mapping) and not isinstance(node, WeightLeaf):
            for key, child in node.items():
                if strict and (not isinstance(key, str) or SEPARATOR in key or not key):
                    where = SEPARATOR.join(map(str, prefix)) or "the root"
                    raise ValueError(f"parameter key {key!r} under {where!r} must be a "
                                     "non-empty string without '/'")
                visit(child, (*prefix, key))
        else:
            out[prefix] = node

    visit(tree, ())
    return out


def path_of(keys: tuple) -> str:
    """("layers", 0, "kernel") → "layers/0/kernel".

    Args:
        keys: a key tuple from `flatten_keys` (any keys; each is str()-ed).

    Returns:
        The "/"-joined path.

    Example:
        >>> path_of(("layers", 0, "kernel"))
        'layers/0/kernel'
    """
    return SEPARATOR.join(map(str, keys))


def flatten(tree: Any, *, strict: bool = False) -> dict[str, Any]:
    """Nested mapping → {"a/b/kernel": leaf} in tree order, typed weight leaves kept whole.

    Args:
      tree: a nested mapping of arrays and weight leaves.
      strict: see `flatten_keys`.

    Returns:
      A dict from "/"-joined path to leaf.

    Example:
      >>> flatten({"a": {"kernel": 1}, "b": 2})
      {'a/kernel': 1, 'b': 2}
    """
    return {path_of(keys): leaf for keys, leaf in flatten_keys(tree, strict=strict).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`: {"a/b": leaf} → {"a": {"b": leaf}}.

    Args:
        flat: a mapping from "/"-joined path to leaf.

    Returns:
        The nested dict, in the order of `flat`.

    Example:
        >>> unflatten({"a/kernel": 1, "b": 2})
        {'a': {'kernel': 1}, 'b': 2}
    """
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(SEPARATOR)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def map_flat(fn: Any, tree: Any) -> dict[str, Any]:
    """`unflatten({path: fn(path, leaf)})` over `flatten(tree)`: a path-aware tree map.

    Args:
        fn: called as fn(path, leaf) for every parameter (a typed leaf is one parameter).
        tree: a nested mapping of arrays and weight leaves.

    Returns:
        A new nested dict holding fn's results.

    Example:
        >>> map_flat(lambda path, leaf: path, {"a": {"b": 0}})
        {'a': {'b': 'a/b'}}
    """
    return unflatten({path: fn(path, leaf) for path, leaf in flatten(tree).items()})


def freeze(value: Any) -> Any:
    """Hashable form of a JSON-like value: mappings → sorted item tuples, lists → tuples.

    Args:
        value: a JSON-like value (mappings, lists, tuples, scalars).

    Returns:
        The same data built from tuples only (so it can be a static jit argument or a
        frozen dataclass field).

    Example:
        >>> freeze({"b": [1, 2], "a": 0})
        (('a', 0), ('b', (1, 2)))
    """
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Inverse of `freeze` for data files: item tuples → dicts, other tuples → lists.

    Args:
        value: a value made by `freeze`.

    Returns:
        The JSON-like value (dicts and lists).

    Example:
        >>> thaw((("a", 0), ("b", (1, 2))))
        {'a': 0, 'b': [1, 2]}
    """
    if isinstance(value, tuple):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                         for v in value):
            return {k: thaw(v) for k, v in value}
        return [thaw(v) for v in value]
    return value


__all__ = ["SEPARATOR", "flatten", "flatten_keys", "freeze", "map_flat", "path_of", "thaw",
           "unflatten"]
