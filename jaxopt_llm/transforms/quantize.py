"""Round-to-nearest quantization ops: real integer weights (`quantize`) and QAT (`fake_quant`).

RTN with range calibration (absmax, min-max, percentile, MSE clip search) — the
baseline of "GPTQ" (Frantar et al., 2023) and "AWQ" (Lin et al., 2024). Kernels
(paths ending in anything but `embedding`) are quantized along their input dim,
embedding tables along their feature dim, so a tied head reads the same table.
Already-transformed leaves compose: masked / N:M weights are quantized dense (zeros
stay exactly zero: 0 is always on the grid), low-rank factors are quantized each.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax

from jaxopt_llm.transforms.base import Op, OpOptions, check_finite_number, per_parameter
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class _GridOptions(OpOptions):
    """The integer grid shared by `quantize` and `fake_quant`."""

    bits: int = 8
    symmetric: bool = True
    granularity: str | None = None  # "tensor" | "channel" | "group"; default: group if group_size
    group_size: int | None = None
    partial_groups: bool = False  # allow a shorter last group where group_size does not divide
    method: str | None = None  # absmax (symmetric) / minmax (asymmetric) | percentile | mse

    @property
    def spec(self) -> QuantSpec:
        granularity = self.granularity or ("group" if self.group_size is not None else "channel")
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity=granularity,
                         group_size=self.group_size, partial_groups=bool(self.partial_groups))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeOptions(_GridOptions):
    """Round-to-nearest integer weights (`QuantizedWeight`)."""

    percentile: float = 99.9
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.0
    act_bits: int | None = None  # 8: W8A8 (dynamic per-token int8 activations)
    scale_dtype: str | None = None  # float16 for group scales, float32 otherwise
    compute: str = "auto"  # auto: bf16 matmuls (f32 accumulation) for ≥128 rows; or float32

    def validate(self) -> None:
        self.spec  # noqa: B018  (validates bits, granularity and group size)
        if self.method not in (None, *RANGE_METHODS):
            raise ValueError(f"method must be one of {RANGE_METHODS}, got {self.method!r}")
        if self.act_bits not in (None, 8):
            raise ValueError(f"act_bits must be 8 or null, got {self.act_bits!r}")
        if self.act_bits and self.bits == 8 and not self.symmetric:
            raise ValueError("asymmetric 8-bit weights do not fit int8 for W8A8; use symmetric")
        if self.compute not in ("auto", "float32"):
            raise ValueError(f"compute must be 'auto' or 'float32', got {self.compute!r}")
        if self.scale_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError("scale_dtype must be float32, float16 or bfloat16")
        check_finite_number("percentile", self.percentile, low=0.0, high=100.0, open_low=True)
        check_finite_number("mse_max_shrink", self.mse_max_shrink, low=0.0, high=1.0,
                            open_high=True)
        check_finite_number("mse_norm", self.mse_norm, low=0.0, open_low=True)
        if isinstance(self.mse_grid, bool) or not isinstance(self.mse_grid, int) \
                or self.mse_grid < 1:
            raise ValueError(f"mse_grid must be a positive integer, got {self.mse_grid!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeQuantOptions(_GridOptions):
    """Quantize-dequantize in the forward pass, straight-through gradient (QAT)."""

    ste: str = "identity"
    clip_ratio: float = 1.0
    learn_scale: bool = False  # LSQ: trainable step sizes initialised from the range

    def validate(self) -> None:
        self.spec  # noqa: B018
        if self.method not in (None, "absmax", "minmax"):
            raise ValueError(f"fake_quant method must be absmax or minmax, got {self.method!r}")
        if self.ste not in STE_MODES:
            raise ValueError(f"ste must be one of {STE_MODES}, got {self.ste!r}")
        check_finite_number("clip_ratio", self.clip_ratio, low=0.0, high=1.0, open_low=True)
        if not isinstance(self.learn_scale, bool):
            raise ValueError(f"learn_scale must be true or false, got {self.learn_scale!r}")


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


def quantize_leaf(leaf: Any, path: str, options: QuantizeOptions) -> Any:
    """One parameter → its quantized form (see module docstring for composition)."""
    spec = options.spec
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
        leaf, spec, axis, options.method, options.act_bits, options.scale_dtype,
        float(options.percentile), int(options.mse_grid), float(options.mse_max_shrink),
        float(options.mse_norm), options.compute)


def fake_quant_leaf(leaf: Any, path: str, options: FakeQuantOptions) -> FakeQuantWeight:
    """One kernel or table → its fake-quant (QAT) form."""
    spec = options.spec
    if not hasattr(leaf, "ndim") or leaf.ndim < 2:
        raise ValueError(f"{path}: fake_quant needs a float kernel or table, got "
                         f"{type(leaf).__name__} {getattr(leaf, 'shape', '')}")
    axis = table_axis(path)
    spec.num_groups(leaf.shape[1] if axis == 1 else leaf.shape[0], where=f"{path} {leaf.shape}")
    fake = FakeQuantWeight(
        w=leaf, bits=spec.bits, symmetric=spec.symmetric, granularity=spec.granularity,
        group_size=spec.group_size, partial_groups=spec.partial_groups, axis=axis,
        method=options.method or ("absmax" if spec.symmetric else "minmax"),
        ste=options.ste, clip_ratio=float(options.clip_ratio))
    return fake.with_learned_scale() if options.learn_scale else fake


OPS = (
    Op(name="quantize", options=QuantizeOptions, apply=per_parameter(quantize_leaf),
       doc="round-to-nearest integer weights (QuantizedWeight)"),
    Op(name="fake_quant", options=FakeQuantOptions, apply=per_parameter(fake_quant_leaf),
       doc="quantize-dequantize in the forward pass with a straight-through gradient"),
)
