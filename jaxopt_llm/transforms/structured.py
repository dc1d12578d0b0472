"""Structured pruning: remove whole attention heads or MLP neurons, physically.

Magnitude-based structured pruning in the spirit of "Are Sixteen Heads Really
Better than One?" (Michel et al., 2019) and "Pruning Filters for Efficient
ConvNets" (Li et al., 2017): each head / neuron is scored by the norm of the
weights that belong only to it, the lowest-scoring ones are cut out of the
matrices, and the model config shrinks to match (fewer heads, smaller
intermediate size). Unlike unstructured masks, the result is a smaller dense
model that runs faster with no special kernels.

What belongs to one unit comes from the family's `models.FamilySpec` (kernels
are stored (d_in, d_out)):
  query head h   columns h*hd:(h+1)*hd of the q part of the attention input
                 projections (+ bias), rows h*hd:(h+1)*hd of the output projection
  whole head h   the above plus the k and v columns of kv head h (MHA)
  MLP neuron j   column j of every MLP input projection (+ bias), row j of the output
A fused q/k/v projection is cut into its q, k and v column blocks first.

Grouped-query attention: query head h reads kv head h // (H / Hkv). With
Hkv < H every kv head is kept and the same number r of query heads is removed
from every kv group, so groups stay uniform (H' = H - r * Hkv). With Hkv == H
whole heads (q, k, v columns and o rows) go. Scores use the kernels only.

Activation-aware scores (score "act", needs calibration): a unit's share of its block's
output energy on calibration inputs. Removing query head h adds A_h·O_h to the attention
output (A_h: the head's outputs, the o-projection's input columns h·hd…; O_h: its rows of
the o-projection), whose squared norm over the tokens is tr(O_hᵀ (A_hᵀA_h) O_h); for MLP
neuron j it is (Σ_t h_tj²)·‖W_out[j, :]‖². Cross terms between units are ignored. This is
FLAP's output-based criterion ("Fluctuation-based Adaptive Structured Pruning", An et
al., AAAI 2024) with the second moment in place of the variance: FLAP adds the removed
units' mean output to a bias, and these models' output projections have no bias to
absorb it, so the mean is part of the error. Statistics come from one pass of the model
as it is (a pruned block changes the config, which a layer-sequential pass cannot mix).

Every layer removes the same count (a config holds one num_heads and one
intermediate_size) but picks its own lowest-scoring units. Per-layer
selection (a `layers` regex) is therefore not offered: it would need a
non-uniform config. Prune before quantizing or factorizing: typed weight
leaves are rejected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import tree
from jaxopt_llm.calibration import linear_statistics
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.models.family import FAMILIES as FAMILY_SPECS
from jaxopt_llm.models.family import FamilySpec, family_spec
from jaxopt_llm.transforms.base import Op, OpOptions

SCORES = ("l2", "l1", "act")  # act: output energy on calibration data
KINDS = ("heads", "neurons")
FAMILIES = tuple(FAMILY_SPECS)


def _removed_count(fraction: float, total: int, unit: str) -> int:
    """round(fraction * total), halves up, checked to remove something and keep something."""
    if not isinstance(fraction, int | float) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1) (the share of {unit} removed), "
                         f"got {fraction!r}")
    if total < 2:
        raise ValueError(f"cannot prune {unit}: there is only {total}")
    removed = math.floor(fraction * total + 0.5)
    if removed == 0:
        lowest = math.ceil(0.5 / total * 1e4) / 1e4
        raise ValueError(f"fraction {fraction} removes 0 of {total} {unit}; "
                         f"use fraction >= {lowest:g}")
    if removed >= total:
        highest = math.floor((total - 0.5) / total * 1e4) / 1e4
        raise ValueError(f"fraction {fraction} removes all {total} {unit}; "
                         f"use a fraction below {highest:g}")
    return removed


def _validate(config: ModelConfig, kind: str, fraction: float, score: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if config.family not in FAMILIES:
        raise ValueError(f"structured pruning supports families {FAMILIES}, "
                         f"not {config.family!r}")
    if kind == "neurons":
        return _removed_count(fraction, config.intermediate_size, "MLP neurons")
    group = config.num_heads // config.num_kv_heads
    if group == 1:
        return _removed_count(fraction, config.num_heads, "attention heads")
    return _removed_count(fraction, group, "query heads per kv group")


def structured_config(
    config: ModelConfig, kind: str, fraction: float, *, score: str = "l2"
) -> ModelConfig:
    """The config after pruning `fraction` of heads ("heads") or MLP neurons ("neurons").

    Cheap (no weights touched), for dry-run plans; raises the same ValueErrors as the
    pruning functions.

    Args:
        config: the model's config.
        kind: "heads" or "neurons".
        fraction: the share of units removed (rounded per kv group / per layer).
        score: "l2" or "l1" (validated, not used: the count does not depend on it).

    Returns:
        The new `ModelConfig`.

    Example:
        >>> from jaxopt_llm.models import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> structured_config(config, "neurons", 0.25).intermediate_size
        48
    """
    return _shrunk_config(config, kind, _validate(config, kind, fraction, score))


def _shrunk_config(config: ModelConfig, kind: str, removed: int) -> ModelConfig:
    if kind == "neurons":
        return dataclasses.replace(config, intermediate_size=config.intermediate_size - removed)
    if config.num_heads == config.num_kv_heads:
        heads = config.num_heads - removed
        return dataclasses.replace(config, num_heads=heads, num_kv_heads=heads)
    return dataclasses.replace(config, num_heads=config.num_heads - removed * config.num_kv_heads)


# ---------------------------------------------------------------------------- helpers


def _copy_tree(tree: Any) -> Any:
    """Fresh nested dicts (so the input is never mutated); numpy leaves become jax arrays."""
    if isinstance(tree, Mapping):
        return {key: _copy_tree(value) for key, value in tree.items()}
    if isinstance(tree, np.ndarray):
        return jnp.asarray(tree)
    return tree


def _array(module: Mapping[str, Any], name: str, path: str) -> np.ndarray:
    if name not in module:
        raise ValueError(f"parameter {path}/{name} is missing; params do not match the config")
    leaf = module[name]
    if not isinstance(leaf, np.ndarray | jax.Array):
        raise ValueError(f"structured pruning needs plain array weights, but {path}/{name} is a "
                         f"{type(leaf).__name__}; prune before quantizing or factorizing")
    return np.asarray(leaf)


def _unit_mass(blocks: list[np.ndarray], score: str) -> np.ndarray:
    """Blocks of shape (units, ...) -> per-unit L2 or L1 norm of all their entries together."""
    total = 0.0
    for block in blocks:
        flat = block.reshape(block.shape[0], -1).astype(np.float64)
        total = total + (np.sum(flat * flat, axis=1) if score == "l2"
                         else np.sum(np.abs(flat), axis=1))
    return np.sqrt(total) if score == "l2" else total


def _heads_of(columns: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """(D, heads*hd) kernel columns -> (heads, D, hd)."""
    return columns.reshape(columns.shape[0], heads, head_dim).transpose(1, 0, 2)


def _lowest(scores: np.ndarray, removed: int) -> np.ndarray:
    """Sorted indices kept after dropping the `removed` lowest scores (ties: lower index goes)."""
    order = np.argsort(scores, kind="stable")
    return np.sort(order[removed:])


def _columns(heads: np.ndarray, head_dim: int, offset: int = 0) -> np.ndarray:
    return (offset + heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def _take(module: dict[str, Any], name: str, index: np.ndarray, axis: int) -> None:
    module[name] = jnp.asarray(np.take(np.asarray(module[name]), index, axis=axis))


def _kept_heads(config: ModelConfig, q, k, v, o, removed: int, score: str,
                act: np.ndarray | None = None):
    """Scores and selection for one layer. q/k/v (D, *) columns, o (H*hd, D) rows; `act`:
    the activation-aware score per query head (score "act").

    Returns (kept query heads, kept kv heads), each sorted.
    """
    heads, kv_heads, hd = config.num_heads, config.num_kv_heads, config.head_dim
    q_h, o_h = _heads_of(q, heads, hd), o.reshape(heads, hd, -1)
    if heads == kv_heads:
        mass = act if act is not None else _unit_mass(
            [q_h, _heads_of(k, heads, hd), _heads_of(v, heads, hd), o_h], score)
        kept = _lowest(mass, removed)
        return kept, kept
    group = heads // kv_heads
    mass = (act if act is not None else _unit_mass([q_h, o_h], score)).reshape(kv_heads, group)
    kept = np.concatenate([g * group + _lowest(mass[g], removed) for g in range(kv_heads)])
    return kept, np.arange(kv_heads)


def _gram(stats: Mapping[str, Any] | None, linear: str, width: int) -> np.ndarray:
    """The Gram matrix of `linear`'s inputs (width, width), float64."""
    if stats is None or linear not in stats:
        raise ValueError(f"score 'act' needs calibration statistics of {linear}")
    gram = np.asarray(stats[linear].gram, np.float64)
    if gram.shape != (width, width):
        raise ValueError(f"statistics of {linear} are {gram.shape}, expected {(width, width)}")
    return gram


def _output_energy(gram: np.ndarray, rows: np.ndarray) -> float:
    """tr(Wᵀ G W): the squared output norm a unit's inputs (Gram G) send through rows W."""
    rows = rows.astype(np.float64)
    return float(np.sum(rows * (gram @ rows)))


def _check_width(array: np.ndarray, axis: int, expected: int, path: str) -> None:
    if array.ndim != 2 or array.shape[axis] != expected:
        raise ValueError(f"{path} has shape {array.shape}, expected {expected} along axis {axis} "
                         "from the config; params do not match the config")


# ---------------------------------------------------------------------------- passes


def _scope(params: dict[str, Any], spec: FamilySpec, layer: int,
           scope: str) -> tuple[dict[str, Any], str]:
    """(the `scope` dict of block `layer`, its path); an empty dict when absent."""
    block = spec.block(layer)
    return params.get(block, {}).get(scope, {}), f"{block}/{scope}"


def prune_attention_heads(
    config: ModelConfig, params: Mapping[str, Any], *, fraction: float, score: str = "l2",
    stats: Mapping[str, Any] | None = None,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Remove the lowest-scoring `fraction` of attention heads in every layer.

    The columns of the removed heads leave every attention input projection (kernel and
    bias; k/v only with MHA), their rows leave the output projection; which linears
    those are is the family's (`FamilySpec.qkv` / `attn_out`).

    Args:
        config: the model's config.
        params: the parameter tree (not modified).
        fraction: the share of query heads removed per kv group.
        score: "l2" or "l1" norm of a head's weights, or "act" (output energy, needs
            `stats`).
        stats: `calibration.linear_statistics` of the model, for score "act".

    Returns:
        (new config, new params).

    Example:
        >>> import jax
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> config = ModelConfig.tiny()
        >>> new, _ = prune_attention_heads(config, init_params(config, jax.random.key(0)),
        ...                                fraction=0.5)
        >>> new.num_heads
        2
    """
    removed = _validate(config, "heads", fraction, score)
    new_config = _shrunk_config(config, "heads", removed)
    spec = family_spec(config)
    out = _copy_tree(params)
    hd = config.head_dim
    for i in range(config.num_layers):
        attn, path = _scope(out, spec, i, spec.attention)
        kernels = [_array(attn.get(p.name, {}), "kernel", f"{path}/{p.name}") for p in spec.qkv]
        o = _array(attn.get(spec.attn_out, {}), "kernel", f"{path}/{spec.attn_out}")
        spans = {projection.name: projection.columns(config) for projection in spec.qkv}
        for projection, kernel in zip(spec.qkv, kernels, strict=True):
            _check_width(kernel, 1, max(stop for _, stop in spans[projection.name].values()),
                         f"{path}/{projection.name}/kernel")
        _check_width(o, 0, config.num_heads * hd, f"{path}/{spec.attn_out}/kernel")
        columns = {}  # part -> its (D, width) column block
        for projection, kernel in zip(spec.qkv, kernels, strict=True):
            for part, (start, stop) in spans[projection.name].items():
                columns[part] = kernel[:, start:stop]
        act = None
        if score == "act":
            gram = _gram(stats, f"{path}/{spec.attn_out}", config.num_heads * hd)
            act = np.array([_output_energy(gram[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd],
                                           o[h * hd:(h + 1) * hd])
                            for h in range(config.num_heads)])
        kept_q, kept_kv = _kept_heads(config, columns["q"], columns["k"], columns["v"], o,
                                      removed, score, act)
        kept = {"q": kept_q, "k": kept_kv, "v": kept_kv}
        for projection in spec.qkv:
            cols = [_columns(kept[part], hd, start)
                    for part, (start, _) in spans[projection.name].items()]
            for leaf in ("kernel", "bias"):
                if leaf in attn[projection.name]:
                    _take(attn[projection.name], leaf, np.concatenate(cols), axis=-1)
        _take(attn[spec.attn_out], "kernel", _columns(kept_q, hd), axis=0)
    return new_config, out


def prune_mlp_neurons(
    config: ModelConfig, params: Mapping[str, Any], *, fraction: float, score: str = "l2",
    stats: Mapping[str, Any] | None = None,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Remove the lowest-scoring `fraction` of MLP neurons in every layer.

    Their columns leave every MLP input projection (kernel and bias), their rows the
    output projection (`FamilySpec.mlp_in` / `mlp_out`); the output bias is untouched.

    Args:
        config: the model's config.
        params: the parameter tree (not modified).
        fraction: the share of neurons removed.
        score: "l2" or "l1" norm of a neuron's weights, or "act" (output energy, needs
            `stats`).
        stats: `calibration.linear_statistics` of the model, for score "act".

    Returns:
        (new config, new params).

    Example:
        >>> import jax
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> config = ModelConfig.tiny()
        >>> new, params = prune_mlp_neurons(config, init_params(config, jax.random.key(0)),
        ...                                 fraction=0.25)
        >>> new.intermediate_size, params["layers_0"]["mlp"]["down_proj"]["kernel"].shape
        (48, (48, 32))
    """
    removed = _validate(config, "neurons", fraction, score)
    new_config = _shrunk_config(config, "neurons", removed)
    spec = family_spec(config)
    inputs, output = spec.mlp_in, spec.mlp_out
    out = _copy_tree(params)
    size = config.intermediate_size
    for i in range(config.num_layers):
        mlp, path = _scope(out, spec, i, spec.mlp)
        ins = [_array(mlp.get(n, {}), "kernel", f"{path}/{n}") for n in inputs]
        down = _array(mlp.get(output, {}), "kernel", f"{path}/{output}")
        for name, kernel in zip(inputs, ins, strict=True):
            _check_width(kernel, 1, size, f"{path}/{name}/kernel")
        _check_width(down, 0, size, f"{path}/{output}/kernel")
        if score == "act":
            energy = np.diag(_gram(stats, f"{path}/{output}", size))
            scores = energy * np.sum(down.astype(np.float64) ** 2, axis=1)
        else:
            scores = _unit_mass([w.T for w in ins] + [down], score)
        kept = _lowest(scores, removed)
        for name in inputs:
            for leaf in ("kernel", "bias"):
                if leaf in mlp[name]:
                    _take(mlp[name], leaf, kept, axis=-1)
        _take(mlp[output], "kernel", kept, axis=0)
    return new_config, out


__all__ = ["prune_attention_heads", "prune_mlp_neurons", "structured_config"]


# ---------------------------------------------------------------------------- pipeline ops


@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredOptions(OpOptions):
    """Structured pruning: the share of units removed and how units are scored.

    Example:
        >>> StructuredOptions(fraction=0.25).score
        'l2'
    """

    fraction: float = 0.25
    score: str = "l2"  # l2 | l1 norm of a unit's weights | act: output energy (calibrated)

    def validate(self) -> None:
        """fraction in (0, 1); score 'l2', 'l1' or 'act'."""
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
                0.0 < fraction < 1.0):
            raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")


def _structured_op(kind: str) -> Op:
    prune = prune_attention_heads if kind == "heads" else prune_mlp_neurons

    def changed(flat, paths, config, options):
        """New config and the parameters whose shapes change; all must be selected."""
        from jaxopt_llm.io.params import expected_shapes

        if not isinstance(config, ModelConfig):
            raise ValueError(f"pruning {kind} needs the ModelConfig of a built-in family "
                             f"{FAMILIES} (not available for a user's own model)")
        new = structured_config(config, kind, options.fraction, score=options.score)
        old_shapes, new_shapes = expected_shapes(config), expected_shapes(new)
        moving = {p: s for p, s in new_shapes.items() if old_shapes.get(p) != s and p in flat}
        missing = sorted(set(moving) - set(paths))
        if missing:
            more = "…" if len(missing) > 3 else ""
            raise ValueError(f"pruning {kind} changes {missing[:3]}{more}, which the rule does "
                             f"not select; widen its match")
        return new, moving

    def apply(flat, paths, config, options, calibration=None):
        changed(flat, paths, config, options)
        params = tree.unflatten(flat)
        stats = None
        if options.score == "act":
            stats = linear_statistics(config, params, calibration)
        config, params = prune(config, params, fraction=options.fraction,
                               score=options.score, stats=stats)
        return config, tree.flatten(params)

    def plan(flat, paths, config, options):
        new, moving = changed(flat, paths, config, options)
        flat = dict(flat)
        for path, shape in moving.items():
            flat[path] = jax.ShapeDtypeStruct(shape, flat[path].dtype)
        return new, flat

    return Op(name=f"prune_{kind}", options=StructuredOptions, apply=apply, plan=plan,
              traceable=False, needs_calibration=lambda options: options.score == "act",
              doc=f"structured pruning of {'attention heads' if kind == 'heads' else 'MLP neurons'}"
                  " (physically smaller matrices, config updated)")


OPS = (_structured_op("heads"), _structured_op("neurons"))
