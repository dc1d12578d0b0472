"""Round-to-nearest quantization ops: real integer weights (`quantize`) and QAT (`fake_quant`).

RTN with range calibration (absmax, min-max, percentile, MSE clip search) — the
baseline of "GPTQ" (Frantar et al., 2023) and "AWQ" (Lin et al., 2024). Kernels
(paths ending in anything but `embedding`) are quantized along their input dim,
embedding tables along their feature dim, so a tied head reads the same table.
Already-transformed leaves compose: masked / N:M weights are quantized dense (zeros
stay exactly zero: 0 is always on the grid), low-rank factors are quantized each.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax

from jaxopt_llm.pipeline import Op, register_op
from jaxopt_llm.weights import (
    FakeQuantWeight,
    LowRankWeight,
    MaskedWeight,
    NMSparseWeight,
    QuantizedWeight,
    QuantSpec,
    quantize_weight,
)
from jaxopt_llm.weights.fake_quant import STE_MODES
from jaxopt_llm.weights.quant_math import RANGE_METHODS

QUANTIZE_DEFAULTS = {
    "bits": 8,
    "symmetric": True,
    "granularity": None,  # "tensor" | "channel" | "group"; default: group if group_size
    "group_size": None,
    "partial_groups": False,  # allow a shorter last group where group_size does not divide
    "method": None,  # absmax (symmetric) / minmax (asymmetric) | percentile | mse
    "percentile": 99.9,
    "mse_grid": 100,
    "mse_max_shrink": 0.8,
    "mse_norm": 2.0,
    "act_bits": None,  # 8: W8A8 (dynamic per-token int8 activations)
    "scale_dtype": None,  # float16 for group scales, float32 otherwise
    "compute": "auto",  # auto: bf16 matmuls (f32 accumulation) for ≥128 rows; or float32
}
FAKE_QUANT_DEFAULTS = {
    "bits": 8, "symmetric": True, "granularity": None, "group_size": None,
    "partial_groups": False, "method": None,
    "ste": "identity", "clip_ratio": 1.0,
    "learn_scale": False,  # LSQ: trainable step sizes initialised from the range
}


def quant_spec(options: dict[str, Any]) -> QuantSpec:
    granularity = options["granularity"] or (
        "group" if options["group_size"] is not None else "channel")
    return QuantSpec(bits=options["bits"], symmetric=options["symmetric"],
                     granularity=granularity, group_size=options["group_size"],
                     partial_groups=bool(options["partial_groups"]))


def _check_quantize(options: dict[str, Any]) -> None:
    quant_spec(options)
    if options["method"] not in (None, *RANGE_METHODS):
        raise ValueError(f"method must be one of {RANGE_METHODS}, got {options['method']!r}")
    if options["act_bits"] not in (None, 8):
        raise ValueError(f"act_bits must be 8 or null, got {options['act_bits']!r}")
    if options["act_bits"] and options["bits"] == 8 and not options["symmetric"]:
        raise ValueError("asymmetric 8-bit weights do not fit int8 for W8A8; use symmetric")
    if options["compute"] not in ("auto", "float32"):
        raise ValueError(f"compute must be 'auto' or 'float32', got {options['compute']!r}")
    if options["scale_dtype"] not in (None, "float32", "float16", "bfloat16"):
        raise ValueError("scale_dtype must be float32, float16 or bfloat16")
    if not 0.0 < float(options["percentile"]) <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {options['percentile']}")


def _check_fake_quant(options: dict[str, Any]) -> None:
    quant_spec(options)
    if options["method"] not in (None, "absmax", "minmax"):
        raise ValueError(f"fake_quant method must be absmax or minmax, got {options['method']!r}")
    if options["ste"] not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES}, got {options['ste']!r}")
    if not 0.0 < float(options["clip_ratio"]) <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {options['clip_ratio']}")
    if not isinstance(options["learn_scale"], bool):
        raise ValueError(f"learn_scale must be true or false, got {options['learn_scale']!r}")


def table_axis(path: str) -> int:
    """Embedding tables (…/embedding, (V, D)) contract along D; kernels along their input."""
    return 1 if path.rsplit("/", 1)[-1] == "embedding" else 0


@partial(jax.jit, static_argnames=("spec", "axis", "method", "act_bits", "scale_dtype",
                                   "percentile", "mse_grid", "mse_max_shrink", "mse_norm",
                                   "compute"))
def _quantize_jit(w, spec, axis, method, act_bits, scale_dtype, percentile, mse_grid,
                  mse_max_shrink, mse_norm, compute):
    return quantize_weight(w, spec, axis=axis, method=method, act_bits=act_bits,
                           scale_dtype=scale_dtype, percentile=percentile, mse_grid=mse_grid,
                           mse_max_shrink=mse_max_shrink, mse_norm=mse_norm, compute=compute)


def quantize_leaf(leaf: Any, path: str, options: dict[str, Any]) -> Any:
    """One parameter → its quantized form (see module docstring for composition)."""
    spec = quant_spec(options)
    if isinstance(leaf, LowRankWeight):
        return LowRankWeight(u=quantize_leaf(leaf.u, f"{path}/u", options),
                             v=quantize_leaf(leaf.v, f"{path}/v", options))
    if isinstance(leaf, (MaskedWeight, NMSparseWeight)):
        leaf = leaf.materialize()
    elif isinstance(leaf, FakeQuantWeight):
        leaf = leaf.w
    elif isinstance(leaf, QuantizedWeight):
        raise ValueError(f"{path} is already quantized ({leaf.bits}-bit); quantize it once")
    if getattr(leaf, "ndim", 0) < 2:
        raise ValueError(f"{path} has shape {getattr(leaf, 'shape', None)}: quantize selects "
                         f"kernels and embedding tables only (narrow the rule's match)")
    axis = table_axis(path)
    spec.num_groups(leaf.shape[1] if axis == 1 else leaf.shape[0], where=f"{path} {leaf.shape}")
    return _quantize_jit(
        leaf, spec, axis, options["method"], options["act_bits"], options["scale_dtype"],
        float(options["percentile"]), int(options["mse_grid"]), float(options["mse_max_shrink"]),
        float(options["mse_norm"]), options["compute"])


def fake_quant_leaf(leaf: Any, path: str, options: dict[str, Any]) -> FakeQuantWeight:
    spec = quant_spec(options)
    if not hasattr(leaf, "ndim") or leaf.ndim < 2:
        raise ValueError(f"{path}: fake_quant needs a float kernel or table, got "
                         f"{type(leaf).__name__} {getattr(leaf, 'shape', '')}")
    axis = table_axis(path)
    spec.num_groups(leaf.shape[1] if axis == 1 else leaf.shape[0], where=f"{path} {leaf.shape}")
    fake = FakeQuantWeight(
        w=leaf, bits=spec.bits, symmetric=spec.symmetric, granularity=spec.granularity,
        group_size=spec.group_size, partial_groups=spec.partial_groups, axis=axis,
        method=options["method"] or ("absmax" if spec.symmetric else "minmax"),
        ste=options["ste"], clip_ratio=float(options["clip_ratio"]))
    return fake.with_learned_scale() if options["learn_scale"] else fake


def per_parameter(fn):
    """Lift `fn(leaf, path, options)` to an op over the selected parameters.

    Shapes are checked for every selected parameter (in a dry run under eval_shape)
    before any of them is transformed, so a bad option fails before work starts.
    """

    def apply(flat, paths, config, options):
        jax.eval_shape(lambda leaves: [fn(leaf, p, options) for p, leaf in zip(
            paths, leaves, strict=True)], [flat[p] for p in paths])
        for path in paths:
            flat[path] = fn(flat[path], path, options)
        return config, flat

    return apply


register_op(Op(name="quantize", apply=per_parameter(quantize_leaf), defaults=QUANTIZE_DEFAULTS,
               check=_check_quantize, doc="round-to-nearest integer weights (QuantizedWeight)"))
register_op(Op(name="fake_quant", apply=per_parameter(fake_quant_leaf),
               defaults=FAKE_QUANT_DEFAULTS, check=_check_fake_quant,
               doc="quantize-dequantize in the forward pass with a straight-through gradient"))
