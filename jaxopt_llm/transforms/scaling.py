"""Per-input-channel scaling of a block's linears, folded into the layer before them.

The rewrite behind AWQ (Lin et al., MLSys 2024) and SmoothQuant (Xiao et al., ICML 2023):
for the linears that read the same input x (K channels) and a positive s (K,),

    x · W  =  (x / s) · (diag(s) · W)

and x / s costs nothing when the layer producing x absorbs it — a norm (weight and bias
divided by s) or a linear whose output columns reach x through channel-wise linear steps
(v_proj → attention → o_proj, up_proj → act(gate)·up → down_proj); `FamilySpec.scaling_groups`
says which. Where nothing can absorb it (a nonlinearity between, grouped-query heads, a
producer that is already compressed) the selected linears become `ScaledInputWeight`s that
keep s and divide at run time; `plan` shows them as such.

Everything here is float and exact: `apply_scales` changes no output of the block beyond
float rounding (tested to 1e-5), so the quantizer that follows sees better-conditioned
weights without the model having changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.models import ModelConfig, family_spec
from jaxopt_llm.models.family import ScalingGroup
from jaxopt_llm.weights.scaled_input import ScaledInputWeight


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """A `ScalingGroup` as found in one block.

    Attributes:
      linears: every linear of the group present in the block ("attn/q_proj", …).
      selected: those the op transforms (a subset, in the same order).
      source: the producer's path in the block, or None.
      source_kind: "norm", "linear" or None.
      columns: for a linear source, the [start, stop) of its columns that feed the group.
      foldable: whether 1/s folds into the source.
      why: when not foldable, the reason (for `plan` and errors).
    """

    linears: tuple[str, ...]
    selected: tuple[str, ...]
    source: str | None
    source_kind: str | None
    columns: tuple[int, int] | None
    foldable: bool
    why: str


def _is_float_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) \
        and jnp.issubdtype(value.dtype, jnp.floating)


def _part_columns(config: ModelConfig, source: str, part: str | None,
                  width: int) -> tuple[int, int]:
    """Columns of `part` ("v") in a fused qkv projection named like `source`."""
    if part is None:
        return 0, width
    name = source.rsplit("/", 1)[-1]
    for projection in family_spec(config).qkv:
        if projection.name == name and part in projection.parts:
            return projection.columns(config)[part]
    raise ValueError(f"scaling source {source!r} has no {part!r} columns in family "
                     f"{config.family!r}")


def _foldability(config: ModelConfig, block: Mapping[str, Any], group: ScalingGroup,
                 present: tuple[str, ...]) -> tuple[bool, str, tuple[int, int] | None]:
    kernels = [block[f"{name}/kernel"] for name in present]
    if not all(_is_float_array(k) and k.ndim == 2 for k in kernels):
        return False, "a linear of its group is already compressed", None
    inputs = kernels[0].shape[0]
    if group.source is None:
        return False, "a nonlinearity sits between it and the layer before", None
    if group.source_kind == "norm":
        scale = block.get(f"{group.source}/scale")
        if not (_is_float_array(scale) and scale.shape == (inputs,)):
            return False, f"{group.source} has no ({inputs},) float weight", None
        bias = block.get(f"{group.source}/bias")
        if bias is not None and not _is_float_array(bias):
            return False, f"{group.source}/bias is not a float array", None
        return True, "", None
    kernel = block.get(f"{group.source}/kernel")
    if not (_is_float_array(kernel) and kernel.ndim == 2):
        return False, f"{group.source} is not a float kernel", None
    columns = _part_columns(config, group.source, group.source_part, kernel.shape[1])
    width = columns[1] - columns[0]
    if width != inputs:
        return False, (f"{group.source} has {width} output columns for {inputs} inputs "
                       "(grouped-query attention)"), None
    return True, "", columns


def block_groups(config: ModelConfig, block: Mapping[str, Any],
                 selected: Iterable[str]) -> list[BlockGroup]:
    """The scaling groups of one block that hold a selected linear, in execution order.

    Args:
      config: the model's config (its family's `scaling_groups`).
      block: the block's flat parameters ("attn/q_proj/kernel": …; arrays or shapes).
      selected: linears the op transforms, by their path in the block ("attn/q_proj").

    Returns:
      One `BlockGroup` per group with a selected linear.

    Raises:
      ValueError: a selected linear belongs to no scaling group of the family.

    Example:
      >>> groups = block_groups(config, block, ["mlp/down_proj"])  # doctest: +SKIP
      >>> groups[0].source, groups[0].foldable  # doctest: +SKIP
      ('mlp/up_proj', True)
    """
    wanted = list(dict.fromkeys(selected))
    found, covered = [], set()
    for group in family_spec(config).scaling_groups:
        present = tuple(name for name in group.linears if f"{name}/kernel" in block)
        chosen = tuple(name for name in present if name in wanted)
        if not chosen:
            continue
        covered.update(chosen)
        foldable, why, columns = _foldability(config, block, group, present)
        found.append(BlockGroup(linears=present, selected=chosen, source=group.source,
                                source_kind=group.source_kind, columns=columns,
                                foldable=foldable, why=why))
    missing = [name for name in wanted if name not in covered]
    if missing:
        raise ValueError(f"{missing}: not in any scaling group of family {config.family!r} "
                         "(activation-aware scaling covers the block linears of "
                         "FamilySpec.scaling_groups)")
    return found


def _rows(scale: jax.Array, ndim: int) -> jax.Array:
    return scale.reshape(-1, *([1] * (ndim - 1)))


def apply_scales(block: Mapping[str, Any], group: BlockGroup, scale: jax.Array) -> dict[str, Any]:
    """The block with x·W rewritten as (x/s)·(diag(s)·W) for `group` (float, exact).

    Foldable: every linear of the group gets diag(s)·W and the source absorbs 1/s (a norm's
    weight and bias, or the source linear's feeding columns and their bias). Not foldable:
    each selected linear becomes `ScaledInputWeight(diag(s)·W, s)`; the others stay.

    Args:
      block: the block's flat parameters (float arrays where they are scaled).
      group: from `block_groups`.
      scale: s (K,), positive.

    Returns:
      A new flat dict (the input is not modified).

    Example:
      >>> new = apply_scales(block, groups[0], jnp.full((576,), 2.0))  # doctest: +SKIP
    """
    out = dict(block)
    scale = jnp.asarray(scale, jnp.float32)
    if not group.foldable:
        for name in group.selected:
            kernel = out[f"{name}/kernel"]
            out[f"{name}/kernel"] = ScaledInputWeight(
                weight=(kernel * _rows(scale, kernel.ndim)).astype(kernel.dtype),
                input_scale=scale)
        return out
    for name in group.linears:
        kernel = out[f"{name}/kernel"]
        out[f"{name}/kernel"] = (kernel * _rows(scale, kernel.ndim)).astype(kernel.dtype)
    inverse = 1.0 / scale
    if group.source_kind == "norm":
        for key in ("scale", "bias"):
            path = f"{group.source}/{key}"
            if path in out:
                out[path] = (out[path] * inverse).astype(out[path].dtype)
        return out
    start, stop = group.columns
    source = out[f"{group.source}/kernel"]
    # An earlier group of the block may have wrapped the source as ScaledInputWeight (BERT's
    # value projection): its output columns are its weight's, so they take 1/s there.
    wrapped = source if isinstance(source, ScaledInputWeight) else None
    kernel = jnp.asarray(source.weight if wrapped is not None else source)
    kernel = kernel.at[:, start:stop].multiply(inverse.astype(kernel.dtype))
    out[f"{group.source}/kernel"] = (kernel if wrapped is None else
                                     dataclasses.replace(wrapped, weight=kernel))
    bias_path = f"{group.source}/bias"
    if bias_path in out and out[bias_path] is not None:
        bias = jnp.asarray(out[bias_path])
        out[bias_path] = bias.at[start:stop].multiply(inverse.astype(bias.dtype))
    return out


def block_views(flat: Mapping[str, Any], by_block: Mapping[int, list[str]]
                ) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(block path, the block's flat parameters, the selected linears in it) per block.

    Args:
      flat: the model's flat parameters.
      by_block: from `layerwise.block_selection`.

    Returns:
      e.g. [("layers_0", {"attn/q_proj/kernel": …}, ["attn/q_proj", …]), …].

    Example:
      >>> block_views(flat, {0: ["layers_0/mlp/up_proj/kernel"]})[0][2]  # doctest: +SKIP
      ['mlp/up_proj']
    """
    views = []
    for block_paths in by_block.values():
        prefix = block_paths[0][:block_paths[0].index("/")]
        block = {p[len(prefix) + 1:]: v for p, v in flat.items() if p.startswith(prefix + "/")}
        names = [p[len(prefix) + 1:].rsplit("/", 1)[0] for p in block_paths]
        views.append((prefix, block, names))
    return views


def with_unit_scales(config: ModelConfig, flat: Mapping[str, Any],
                     by_block: Mapping[int, list[str]]) -> dict[str, Any]:
    """`flat` with every selected group scaled by s = 1: the structure (which linears keep
    their scales in a `ScaledInputWeight`) a scaling op produces, for shape-only plans.

    Args:
      config: the model config; flat: its flat parameters (arrays or tracers);
      by_block: from `layerwise.block_selection`.

    Returns:
      The new flat parameters (values unchanged).

    Example:
      >>> jax.eval_shape(lambda f: with_unit_scales(config, f, by_block), flat)  # doctest: +SKIP
    """
    out = dict(flat)
    for prefix, block, names in block_views(flat, by_block):
        for group in block_groups(config, block, names):
            inputs = block[f"{group.selected[0]}/kernel"].shape[0]
            block = apply_scales(block, group, jnp.ones((inputs,), jnp.float32))
        out.update({f"{prefix}/{key}": value for key, value in block.items()})
    return out


__all__ = ["BlockGroup", "apply_scales", "block_groups", "block_views", "with_unit_scales"]
