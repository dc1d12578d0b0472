"""Where a model runs: one device, or a ("data", "model") mesh with tensor-parallel rules.

Evaluation, generation and training ask a `Placement` to place parameters, batches and
the KV cache and to bring results back to the host, so none of them branches on "is
there a mesh". On one device every method is the identity (or `jnp.asarray` /
`np.asarray`), so single-device runs compute exactly what they did before; on a mesh
the layouts are those of `jaxopt_llm.parallel`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxopt_llm import parallel
from jaxopt_llm.models import ModelConfig, init_cache


class Placement:
    """One device (`Placement.single()`) or a mesh with shard rules (`Placement.on_mesh`).

    The model is checked against the mesh once per config (`check`), however many
    times parameters are placed or programs run.
    """

    def __init__(self, mesh: Mesh | None = None,
                 rules: Sequence[tuple[str, str]] = ()) -> None:
        """Prefer `single()` / `on_mesh()`.

        Raises:
            ValueError: `rules` without a mesh, a mesh whose axes are not
                ("data", "model"), or a malformed rule.
        """
        rules = tuple((pattern, layout) for pattern, layout in rules)
        if mesh is None and rules:
            raise ValueError("shard rules lay parameters out on a mesh; give mesh= too")
        if mesh is not None:
            if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != parallel.MESH_AXES:
                raise ValueError(f"mesh= must be a jax Mesh with axes {parallel.MESH_AXES} "
                                 f"(see parallel.make_mesh), got {mesh!r}")
            parallel.check_rules(rules)
        self._mesh = mesh
        self._rules = rules
        self._checked: set[ModelConfig] = set()

    @classmethod
    def single(cls) -> Placement:
        """Everything on the default device."""
        return cls()

    @classmethod
    def on_mesh(cls, mesh: Mesh, rules: Sequence[tuple[str, str]] = ()) -> Placement:
        """Batch on `data`, weights by `rules` (first) and the family's default rules.

        Args:
            mesh: a ("data", "model") mesh, e.g. from `parallel.make_mesh`.
            rules: user (regex, layout) shard rules, tried before the family's defaults.
        """
        if mesh is None:
            raise ValueError("mesh= is required (use Placement.single() for one device)")
        return cls(mesh, rules)

    @classmethod
    def resolve(cls, placement: Placement | None = None, *, mesh: Mesh | None = None,
                rules: Sequence[tuple[str, str]] = ()) -> Placement:
        """The placement of a function that accepts `placement=` or (older) `mesh=`/`rules=`.

        Raises:
            ValueError: both `placement=` and `mesh=` (or rules) were given.
        """
        if placement is None:
            return cls(mesh, rules)
        if mesh is not None or tuple(rules):
            raise ValueError("give placement= or mesh= (with its rules), not both")
        if not isinstance(placement, Placement):
            raise ValueError(f"placement= must be a Placement, got {type(placement).__name__}")
        return placement

    @property
    def is_mesh(self) -> bool:
        return self._mesh is not None

    @property
    def mesh(self) -> Mesh | None:
        return self._mesh

    @property
    def rules(self) -> tuple[tuple[str, str], ...]:
        return self._rules

    @property
    def data_size(self) -> int:
        """How many ways a batch is split (1 on one device)."""
        return 1 if self._mesh is None else int(self._mesh.shape["data"])

    def round_batch(self, size: int) -> int:
        """`size` rounded up to a multiple of `data_size`."""
        return -(-size // self.data_size) * self.data_size

    def check(self, config: ModelConfig, batch: int | None = None) -> None:
        """Raise an actionable ValueError when the model (or a batch of `batch` rows)
        cannot use the mesh; the model is checked once per config."""
        if self._mesh is None:
            return
        if config not in self._checked:
            parallel.check_mesh(config, self._mesh, rules=self._rules)
            self._checked.add(config)
        if batch is not None:
            parallel.check_batch(batch, self._mesh)

    def place_params(self, config: ModelConfig, params: Any) -> Any:
        """`params` where the model runs: unchanged on one device, on a mesh laid out by
        the rules (each process transfers only its own devices' slices)."""
        if self._mesh is None:
            return params
        self.check(config)
        return parallel.place_tree(
            params, parallel.param_shardings(config, params, self._mesh, self._rules))

    def place_batch(self, array: Any) -> jax.Array:
        """A host array of rows (the same on every process), rows split over `data`."""
        if self._mesh is None:
            return jnp.asarray(array)
        return parallel.global_batch(array, self._mesh)

    def replicate(self, tree: Any) -> Any:
        """Arrays every device holds whole (PRNG keys, scalars)."""
        if self._mesh is None:
            return jax.tree_util.tree_map(jnp.asarray, tree)
        replicated = NamedSharding(self._mesh, PartitionSpec())
        return jax.device_put(jax.tree_util.tree_map(
            lambda a: a if isinstance(a, jax.Array) else np.asarray(a), tree), replicated)

    def gather(self, array: Any) -> np.ndarray:
        """The whole value of `array` as numpy, on every process."""
        return parallel.to_host(array)

    def cache_sharding(self) -> NamedSharding | None:
        """KV cache (B, S, Hkv, D) layout: batch on `data`, kv heads on `model`; None on
        one device."""
        return None if self._mesh is None else parallel.cache_sharding(self._mesh)

    def new_cache(self, config: ModelConfig, batch: int, length: int,
                  dtype: Any = jnp.float32) -> Any:
        """A zeroed KV cache (`models.init_cache`) on `cache_sharding()`; on a mesh each
        device builds its own slices (works across processes too)."""
        cache = init_cache(config, batch, length, dtype)
        sharding = self.cache_sharding()
        if sharding is None:
            return cache
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_callback(
                a.shape, sharding, lambda index, a=a: np.zeros(a.shape, a.dtype)[index]),
            cache)

    def put(self, tree: Any, shardings: Any) -> Any:
        """On a mesh, `tree` moved to `shardings` (e.g. a compiled program's input
        shardings); on one device `tree` as it is."""
        if self._mesh is None:
            return tree
        return jax.device_put(tree, shardings)

    def like(self, tree: Any, reference: Any) -> Any:
        """On a mesh, `tree` moved to the shardings of `reference` (same structure); on
        one device `tree` as it is."""
        if self._mesh is None:
            return tree
        return jax.device_put(tree, jax.tree_util.tree_map(lambda a: a.sharding, reference))

    def settle(self, jitted: Any, state: Any, *args: Any) -> Any:
        """`state` in the layouts `jitted(state, *args)` returns its first output in, so a
        loop feeding that output back compiles once. On one device `state` as it is
        (compiling ahead there would compile twice)."""
        if self._mesh is None:
            return state
        compiled = jitted.lower(state, *args).compile()
        return jax.device_put(state, compiled.output_shardings[0])

    def __repr__(self) -> str:
        if self._mesh is None:
            return "Placement.single()"
        shape = {k: int(v) for k, v in self._mesh.shape.items()}
        return f"Placement.on_mesh({shape}, rules={list(self._rules)})"


def ensure_cpu_devices(count: int) -> None:
    """Ask JAX for `count` CPU devices (fake devices on one host, e.g. for a CPU mesh).

    Call it before JAX starts its backends (any computation, `jax.devices()`, ...). When
    XLA_FLAGS already sets --xla_force_host_platform_device_count, that choice is kept.

    Args:
        count: the number of CPU devices wanted on this process (1 or less: nothing to do).

    Raises:
        ValueError: `count` is not an integer, or JAX has already started with fewer
            than `count` local devices.
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"count must be an integer, got {count!r}")
    if count <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX refuses once its backends exist
        available = jax.local_device_count()
        if available < count:
            raise ValueError(
                f"JAX has already started with {available} devices, fewer than the {count} "
                f"asked for; call ensure_cpu_devices({count}) before any JAX computation, or "
                f"start Python with XLA_FLAGS=--xla_force_host_platform_device_count={count}"
            ) from None


__all__ = ["Placement", "ensure_cpu_devices"]
