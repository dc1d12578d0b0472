"""Data and tensor parallelism on a ("data", "model") device mesh, for every weight form.

Tensor parallelism follows Megatron-LM ("Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism", Shoeybi et al., 2019): q/k/v/gate/up are
column-parallel (their output dim on `model`, so each device holds whole heads and
whole MLP neurons), o/down are row-parallel (their input dim on `model`; XLA adds one
all-reduce after each), the embedding table is vocab-parallel, norms are replicated.
Data parallelism puts the batch on `data`; parameters are replicated across it.

A layout names the axes of the *dense* weight (kernel (K, N), table (V, D)); each typed
leaf maps it onto its own arrays (`WeightLeaf.partition_specs`, defined next to each
representation's math: packed codes and group scales like the kernel, low-rank factors
so that column-parallel needs no collective, …), so a new representation needs no change
here.

Rules are (regex, layout) pairs matched with re.fullmatch on "/"-joined parameter paths,
the first match winning; user rules go first, then the family's defaults
(`models.FamilySpec.shard_rules`). A user rule that selects no parameter is an error.
Nothing here changes a computation: XLA's SPMD partitioner inserts the collectives, so
sharded results equal single-device ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxopt_llm import tree
from jaxopt_llm.errors import ParameterError
from jaxopt_llm.models import ModelConfig, family_spec
from jaxopt_llm.rules import Rule, assign
from jaxopt_llm.weights import is_weight_leaf
from jaxopt_llm.weights.base import axis_spec, specs_of

MESH_AXES = ("data", "model")
LAYOUTS = ("column", "row", "vocab", "replicated")


def default_rules(config: ModelConfig) -> tuple[tuple[str, str], ...]:
    """The family's tensor-parallel rules (`FamilySpec.shard_rules`).

    Args:
        config: the model's config.

    Returns:
        (regex, layout) pairs, first match wins.

    Example:
        >>> from jaxopt_llm.models import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> default_rules(config)[0]
        ('(.*/)?attn/(q_proj|k_proj|v_proj)/kernel', 'column')
    """
    return family_spec(config).shard_rules


def parse_mesh(spec: str | dict[str, int]) -> dict[str, int]:
    """"data=2,model=4" → {"data": 2, "model": 4}; an axis left out has size 1.

    Args:
        spec: the text (the CLI's --mesh), or a dict of axis sizes.

    Returns:
        {"data": A, "model": B}.

    Raises:
        ParameterError: on `spec`: malformed text, an unknown axis, a size that is not a
            positive integer.

    Example:
        >>> parse_mesh("model=3")
        {'data': 1, 'model': 3}
    """
    if isinstance(spec, dict):
        sizes = dict(spec)
    else:
        sizes = {}
        for part in filter(None, (p.strip() for p in str(spec).split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit():
                raise ParameterError("spec", spec, f"expected axis=size pairs like "
                                                   f"'data=2,model=4', got {part!r}")
            if name.strip() in sizes:
                raise ParameterError("spec", spec, f"axis {name.strip()!r} given twice")
            sizes[name.strip()] = int(value)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ParameterError("spec", spec, f"unknown axis {sorted(unknown)}; the axes are "
                                           f"{MESH_AXES}")
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ParameterError("spec", spec, f"{name} must be a positive integer, "
                                               f"got {size!r}")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec: str | dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "model") mesh on the first data·model devices (model varies fastest,
    so a model group stays within one host when hosts own consecutive devices).

    Args:
        spec: "data=A,model=B" or {"data": A, "model": B} (see `parse_mesh`).
        devices: the devices to use (default `jax.devices()`).

    Returns:
        The `jax.sharding.Mesh`.

    Raises:
        ParameterError: on `spec`, when it needs more devices than there are (with the
            XLA flag that makes fake CPU devices).

    Example:
        >>> dict(make_mesh("data=1").shape)
        {'data': 1, 'model': 1}
    """
    sizes = parse_mesh(spec)
    devices = list(jax.devices() if devices is None else devices)
    needed = sizes["data"] * sizes["model"]
    if needed > len(devices):
        raise ParameterError(
            "spec", spec, f"needs {needed} devices, {len(devices)} available (on CPU, start "
                          f"Python with XLA_FLAGS=--xla_force_host_platform_device_count={needed})")
    grid = np.array(devices[:needed], dtype=object).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, MESH_AXES)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_mesh(config: ModelConfig, mesh: Mesh, *, batch: int | None = None,
               rules: Sequence[tuple[str, str]] = ()) -> None:
    """Raise an actionable ValueError when the model (or batch) cannot use this mesh.

    Args:
        config: the model's config (heads, kv heads, MLP width and, for a vocab-parallel
            table, the vocabulary must divide `model`).
        mesh: the mesh.
        batch: a batch size that must divide over `data`, or None.
        rules: user shard rules (they decide whether the table is vocab-parallel).

    Raises:
        ValueError: naming the size that does not divide and the `model` sizes that would.

    Example:
        >>> check_mesh(config, make_mesh("model=2"))  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: num_kv_heads=3 is not divisible by model=2; use model=1 or 3
    """
    model = mesh.shape["model"]
    sizes = {"num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads,
             "intermediate_size": config.intermediate_size}
    table = family_spec(config).embedding
    if _layout(table, rules, config) == "vocab":
        sizes["vocab_size"] = config.vocab_size
    if model > 1:
        valid = _divisors(math.gcd(*sizes.values()))
        for name, size in sizes.items():
            if size % model:
                hint = f"use model={' or '.join(str(v) for v in valid)}"
                if name == "vocab_size":
                    hint += f" (or replicate the table: --shard '{table}=replicated')"
                raise ValueError(f"{name}={size} is not divisible by model={model}; {hint}")
    if batch is not None:
        check_batch(batch, mesh)


def check_batch(batch: int, mesh: Mesh) -> None:
    """Raise an actionable ValueError when `batch` rows do not split evenly over `data`.

    Args:
        batch: the batch size.
        mesh: the mesh.

    Example:
        >>> mesh = make_mesh("data=1")
        >>> check_batch(3, mesh)  # any batch divides over data=1
    """
    if batch % mesh.shape["data"]:
        raise ValueError(f"batch={batch} is not divisible by data={mesh.shape['data']}; "
                         f"use a batch that is a multiple of {mesh.shape['data']}")


def _layout(path: str, rules: Sequence[tuple[str, str]], config: ModelConfig) -> str:
    """The first rule (user rules, then the family's) that matches `path`, else replicated."""
    for pattern, layout in (*rules, *default_rules(config)):
        if re.fullmatch(pattern, path):
            return layout
    return "replicated"


def layouts(config: ModelConfig, paths: Sequence[str],
            rules: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """The layout of every path: the first user rule whose regex fullmatches it, else the
    first matching rule of the family's defaults, else "replicated".

    Args:
        config: the model's config (its family gives the default rules).
        paths: "/"-joined parameter paths.
        rules: user (regex, layout) rules, tried first.

    Returns:
        path → layout ("column", "row", "vocab" or "replicated").

    Raises:
        ValueError: a user rule is malformed or selects no parameter (it matches none, or
            every parameter it matches is taken by an earlier rule): a typo never silently
            leaves a weight replicated.

    Example:
        >>> from jaxopt_llm.models import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> layouts(config, ["layers_0/attn/o_proj/kernel", "norm/scale"])
        {'layers_0/attn/o_proj/kernel': 'row', 'norm/scale': 'replicated'}
    """
    check_rules(rules)
    user = tuple(Rule(match=pattern, op=layout) for pattern, layout in rules)
    chosen = {path: candidate.op
              for candidate, taken in zip(user, assign(user, list(paths), where="shard rules"),
                                          strict=True)
              for path in taken}
    return {path: chosen.get(path) or _layout(path, (), config) for path in paths}


def check_rules(rules: Sequence[tuple[str, str]]) -> None:
    """Raise a ValueError for a rule whose layout is unknown or whose regex does not compile.

    Args:
        rules: (regex, layout) pairs.

    Example:
        >>> check_rules([(".*", "diagonal")])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: shard rule '.*': layout must be one of (...), got 'diagonal'
    """
    for pattern, layout in rules:
        if layout not in LAYOUTS:
            raise ValueError(f"shard rule '{pattern}': layout must be one of {LAYOUTS}, "
                             f"got {layout!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"shard rule '{pattern}' is not a valid regex: {err}") from None


def parse_shard_rule(text: str) -> tuple[str, str]:
    """"REGEX=LAYOUT" (the CLI's --shard) → (regex, layout).

    Args:
        text: the rule (split at its last "=").

    Returns:
        (regex, layout).

    Raises:
        ParameterError / ValueError: malformed text, unknown layout or bad regex.

    Example:
        >>> parse_shard_rule("embed_tokens/embedding=replicated")
        ('embed_tokens/embedding', 'replicated')
    """
    pattern, sep, layout = text.rpartition("=")
    if not sep or not pattern:
        raise ParameterError("text", text, f"expected REGEX=LAYOUT with LAYOUT one of "
                                           f"{LAYOUTS}")
    check_rules([(pattern, layout)])
    return pattern, layout


def _dense_axes(layout: str) -> tuple[str | None, str | None]:
    """Mesh axis of the dense weight's (rows, cols): kernel (K, N), table (V, D)."""
    return {"column": (None, "model"), "row": ("model", None),
            "vocab": ("model", None), "replicated": (None, None)}[layout]


def leaf_specs(leaf: Any, layout: str, mesh: Mesh) -> Any:
    """The PartitionSpec of every array of `leaf` (same tree structure as the leaf): a typed
    weight lays out its own arrays; a plain 1-D array (a bias) follows the output dim
    (norm scales are replicated).

    Args:
        leaf: a parameter (array or typed leaf).
        layout: "column", "row", "vocab" or "replicated" (of the dense weight).
        mesh: the mesh.

    Returns:
        A PartitionSpec, or the leaf's class holding one per array.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh("data=1")
        >>> leaf_specs(jnp.zeros((4, 8)), "column", mesh)
        P(None, 'model')
    """
    rows, cols = _dense_axes(layout)
    if not is_weight_leaf(leaf) and leaf.ndim == 1:
        return axis_spec(leaf.shape, {0: cols if layout == "column" else None}, mesh)
    return specs_of(leaf, rows, cols, mesh)


def param_specs(config: ModelConfig, params: Any, mesh: Mesh,
                rules: Sequence[tuple[str, str]] = ()) -> Any:
    """PartitionSpec for every array of `params` from the rules (user rules first).

    Args:
        config: the model's config.
        params: the parameter tree.
        mesh: the mesh.
        rules: user (regex, layout) rules.

    Returns:
        A tree like `params` holding PartitionSpecs.

    Example:
        >>> import jax
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> config = ModelConfig.tiny()
        >>> specs = param_specs(config, init_params(config, jax.random.key(0)), make_mesh("data=1"))
        >>> specs["layers_0"]["mlp"]["down_proj"]["kernel"]
        P('model',)
    """
    flat = tree.flatten(params)
    layout = layouts(config, list(flat), rules)
    return tree.unflatten({path: leaf_specs(leaf, layout[path], mesh)
                          for path, leaf in flat.items()})


def param_shardings(config: ModelConfig, params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str]] = ()) -> Any:
    """`param_specs` as `NamedSharding`s on `mesh`.

    Args:
        config: the model's config.
        params: the parameter tree.
        mesh: the mesh.
        rules: user (regex, layout) rules.

    Returns:
        A tree like `params` holding NamedShardings.

    Example:
        >>> shardings = param_shardings(config, params, mesh)  # doctest: +SKIP
    """
    specs = param_specs(config, params, mesh, rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(config: ModelConfig, params: Any, mesh: Mesh,
                 rules: Sequence[tuple[str, str]] = ()) -> Any:
    """Place `params` on the mesh by the rules, after checking the model fits the mesh.

    Each array is built with `jax.make_array_from_callback`, so a process only transfers
    the slices its own devices hold (on many hosts: per-host loading of local shards).

    Args:
        config: the model's config.
        params: the parameter tree (host or device arrays, typed leaves included).
        mesh: the mesh.
        rules: user (regex, layout) rules, tried before the family's defaults.

    Returns:
        The placed tree.

    Example:
        >>> import jax
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> config = ModelConfig.tiny()
        >>> placed = shard_params(config, init_params(config, jax.random.key(0)),
        ...                       make_mesh("data=1"), rules=[("norm/scale", "replicated")])
        >>> placed["norm"]["scale"].sharding.spec
        P()
    """
    check_mesh(config, mesh, rules=rules)
    return place_tree(params, param_shardings(config, params, mesh, rules))


def place_tree(tree: Any, shardings: Any) -> Any:
    """Every array of `tree` placed by the matching sharding (same tree structure); a
    process transfers only the slices its own devices hold.

    Args:
        tree: a tree of arrays.
        shardings: a matching tree of shardings.

    Returns:
        The placed tree.

    Example:
        >>> placed = place_tree(params, param_shardings(config, params, mesh))  # doctest: +SKIP
    """

    def place(array, sharding):
        if isinstance(array, jax.Array) and sharding.is_fully_addressable:
            return jax.device_put(array, sharding)
        host = np.asarray(array)  # many processes: each builds only its devices' slices
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree, shardings)


def global_batch(array: Any, mesh: Mesh) -> jax.Array:
    """A host array (the same on every process) → a global array, batch on `data`; each
    process transfers only its devices' rows.

    Args:
        array: rows (leading axis the batch).
        mesh: the mesh.

    Returns:
        The sharded jax array.

    Example:
        >>> import numpy as np
        >>> mesh = make_mesh("data=1")
        >>> global_batch(np.zeros((2, 8), np.int32), mesh).shape
        (2, 8)
    """
    host = np.asarray(array)
    return jax.make_array_from_callback(host.shape, batch_sharding(mesh, host.ndim),
                                        lambda index: host[index])


def to_host(array: Any) -> np.ndarray:
    """The whole value of a (possibly multi-process) array as numpy, on every process.

    Args:
        array: any array.

    Returns:
        A numpy array.

    Example:
        >>> import jax.numpy as jnp
        >>> to_host(jnp.arange(3)).tolist()
        [0, 1, 2]
    """
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch (leading dim) on `data`, the rest replicated.

    Args:
        mesh: the mesh.
        ndim: the arrays' rank.

    Returns:
        The `NamedSharding`.

    Example:
        >>> mesh = make_mesh("data=1")
        >>> batch_sharding(mesh, 3).spec
        P('data', None, None)
    """
    return NamedSharding(mesh, PartitionSpec("data", *([None] * (ndim - 1))))


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """KV cache (B, S, Hkv, D): batch on `data`, kv heads on `model`.

    Args:
        mesh: the mesh.

    Returns:
        The `NamedSharding`.

    Example:
        >>> mesh = make_mesh("data=1")
        >>> cache_sharding(mesh).spec
        P('data', None, 'model', None)
    """
    return NamedSharding(mesh, PartitionSpec("data", None, "model", None))


__all__ = [
    "LAYOUTS", "MESH_AXES", "batch_sharding", "cache_sharding", "check_batch", "check_mesh",
    "default_rules", "global_batch", "layouts", "leaf_specs", "make_mesh", "param_shardings",
    "param_specs", "parse_mesh", "parse_shard_rule", "place_tree", "shard_params", "to_host",
]
