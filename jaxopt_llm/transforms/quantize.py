"""Round-to-nearest quantization ops: real integer weights (`quantize`) and QAT (`fake_quant`).

RTN with range calibration (absmax, min-max, percentile, MSE clip search) — the
baseline of "GPTQ" (Frantar et al., 2023) and "AWQ" (Lin et al., 2024). Kernels
(paths ending in anything but `embedding`) are quantized along their input dim,
embedding tables along their feature dim, so a tied head reads the same table.
Already-transformed leaves compose: masked / N:M weights are quantized dense (zeros
stay exactly zero: 0 is always on the grid), low-rank factors are quantized each, a
smoothed `ScaledInputWeight` gets its scaled kernel quantized (its scales stay).
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
    ScaledInputWeight,
    quantize_weight,
)
from jaxopt_llm.weights.fake_quant import STE_MODES
from jaxopt_llm.weights.quant_math import RANGE_METHODS
from jaxopt_llm.weights.quantized import check_activation_grid, check_compute

SCALE_DTYPES = ("float32", "float16", "bfloat16")


def check_scale_dtype(value: Any) -> None:
    """`scale_dtype` is null (float16 for group scales, float32 otherwise) or a float name.

    Args:
        value: the option's value.

    Raises:
        ValueError: naming `scale_dtype` and the accepted names.

    Example:
        >>> check_scale_dtype("float16")
        >>> check_scale_dtype("int8")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: scale_dtype must be one of ('float32', ...) or null, got 'int8'
    """
    if value is not None and value not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES} or null, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridOptions(OpOptions):
    """The integer grid an op quantizes onto (`quantize`, `fake_quant`, GPTQ).

    Example:
        >>> GridOptions(bits=4, group_size=128).spec.granularity
        'group'
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str | None = None  # "tensor" | "channel" | "group"; default: group if group_size
    group_size: int | None = None
    partial_groups: bool = False  # allow a shorter last group where group_size does not divide

    @property
    def spec(self) -> QuantSpec:
        """The grid as a `QuantSpec`, with an integer zero point.

        The granularity defaults to "group" when a group size is given, else "channel".

        Returns:
            The QuantSpec (its construction validates bits, granularity and group size).

        Example:
            >>> GridOptions(bits=4).spec.granularity, GridOptions(bits=4).spec.qmax
            ('channel', 7)
        """
        return self._spec("integer")

    def _spec(self, zero: str) -> QuantSpec:
        granularity = self.granularity or ("group" if self.group_size is not None else "channel")
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity=granularity,
                         group_size=self.group_size, partial_groups=bool(self.partial_groups),
                         zero=zero)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _GridOptions(GridOptions):
    """The grid and its range calibration, shared by `quantize` and `fake_quant`."""

    method: str | None = None  # absmax (symmetric) / minmax (asymmetric) | percentile | mse


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeOptions(_GridOptions):
    """Round-to-nearest integer weights (`QuantizedWeight`).

    Example:
        >>> QuantizeOptions(bits=4, symmetric=False, zero="float", group_size=32).spec.zero
        'float'
    """

    percentile: float = 99.9
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.0
    act_bits: int | None = None  # 8: W8A8 (dynamic per-token int8 activations)
    # with act_bits 8: int8 activation blocks of this many inputs with float16 scales
    # (llama.cpp's Q8_0/Q8_1 numerics, 32) instead of one scale per token
    act_group: int | None = None
    scale_dtype: str | None = None  # float16 for group scales, float32 otherwise
    # float32 (default); bfloat16: bf16 matmuls (f32 accumulation) for ≥128 rows; auto:
    # bfloat16 where it runs natively (GPU/TPU, AVX-512 BF16 or AMX CPUs)
    compute: str = "float32"
    zero: str = "integer"  # asymmetric grids: uint8 zero point, or "float" offset w = u·d + m

    @property
    def spec(self) -> QuantSpec:
        """The grid as a `QuantSpec`, with this option's zero kind ("integer" or "float").

        Returns:
            The QuantSpec `quantize_weight` runs with.

        Example:
            >>> QuantizeOptions(bits=4, symmetric=False, zero="float").spec.float_zero
            True
        """
        return self._spec(self.zero)

    def validate(self) -> None:
        """Check every option (run at construction); a bad one is a ValueError naming it.

        Raises:
            ValueError: naming the bad option, or the combination W8A8 cannot run
                (act_bits 8 with asymmetric 8-bit weights or a float zero).

        Example:
            >>> QuantizeOptions(bits=4, act_bits=8).validate()
            >>> float_offset = dict(bits=4, symmetric=False, zero="float")
            >>> QuantizeOptions(**float_offset, act_bits=8)  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: zero 'float' cannot run W8A8 with per-token activations ...
        """
        self.spec  # noqa: B018  (validates bits, granularity, group size and zero)
        if self.method not in (None, *RANGE_METHODS):
            raise ValueError(f"method must be one of {RANGE_METHODS}, got {self.method!r}")
        if self.act_bits not in (None, 8):
            raise ValueError(f"act_bits must be 8 or null, got {self.act_bits!r}")
        if self.act_bits and self.bits == 8 and not self.symmetric:
            raise ValueError("asymmetric 8-bit weights do not fit int8 for W8A8; use symmetric")
        if self.act_bits and self.zero == "float" and self.act_group is None:
            raise ValueError("zero 'float' cannot run W8A8 with per-token activations "
                             "(act_bits: 8 needs integer zero points); use zero: integer, "
                             "act_group: 32, or act_bits: null")
        check_activation_grid(self.spec, self.act_bits, self.act_group, 0, "act_group")
        check_compute(self.compute)
        check_scale_dtype(self.scale_dtype)
        check_finite_number("percentile", self.percentile, low=0.0, high=100.0, open_low=True)
        check_finite_number("mse_max_shrink", self.mse_max_shrink, low=0.0, high=1.0,
                            open_high=True)
        check_finite_number("mse_norm", self.mse_norm, low=0.0, open_low=True)
        if isinstance(self.mse_grid, bool) or not isinstance(self.mse_grid, int) \
                or self.mse_grid < 1:
            raise ValueError(f"mse_grid must be a positive integer, got {self.mse_grid!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeQuantOptions(_GridOptions):
    """Quantize-dequantize in the forward pass, straight-through gradient (QAT).

    The straight-through estimator is Bengio et al. (2013); `learn_scale` trains the step
    sizes as in LSQ (Esser et al., ICLR 2020); see docs/algorithms.md.

    Example:
        >>> FakeQuantOptions(bits=4, ste="clipped").spec.bits
        4
    """

    ste: str = "identity"
    clip_ratio: float = 1.0
    learn_scale: bool = False  # LSQ: trainable step sizes initialised from the range

    def validate(self) -> None:
        """Check every option (run at construction); a bad one is a ValueError naming it.

        Range calibration is absmax or min-max only, the methods `FakeQuantWeight`
        runs (it recomputes the range from the weight at every forward pass).

        Raises:
            ValueError: naming the bad option.

        Example:
            >>> FakeQuantOptions(bits=4, clip_ratio=0.9).validate()
            >>> FakeQuantOptions(method="mse")
            Traceback (most recent call last):
            ...
            ValueError: fake_quant method must be absmax or minmax, got 'mse'
        """
        self.spec  # noqa: B018
        if self.method not in (None, "absmax", "minmax"):
            raise ValueError(f"fake_quant method must be absmax or minmax, got {self.method!r}")
        if self.ste not in STE_MODES:
            raise ValueError(f"ste must be one of {STE_MODES}, got {self.ste!r}")
        check_finite_number("clip_ratio", self.clip_ratio, low=0.0, high=1.0, open_low=True)
        if not isinstance(self.learn_scale, bool):
            raise ValueError(f"learn_scale must be true or false, got {self.learn_scale!r}")


def rtn_options(options: GridOptions) -> QuantizeOptions:
    """Round-to-nearest options on the grid of a calibrated op's options (GPTQ, AWQ): their
    results have RTN's shapes, which is how their plans are computed.

    Args:
        options: any GridOptions (its `zero` and `scale_dtype`, where present, carry over).

    Returns:
        The QuantizeOptions of the same grid.

    Example:
        >>> rtn_options(GridOptions(bits=4, group_size=32)).spec.group_size
        32
    """
    return QuantizeOptions(bits=options.bits, symmetric=options.symmetric,
                           granularity=options.granularity, group_size=options.group_size,
                           partial_groups=options.partial_groups,
                           zero=getattr(options, "zero", "integer"),
                           scale_dtype=getattr(options, "scale_dtype", None))


def table_axis(path: str) -> int:
    """Embedding tables (…/embedding, (V, D)) contract along D; kernels along their input.

    Quantizing a table along D keeps one scale row per token, so a lookup dequantizes
    only its rows and a tied head reads the same codes.

    Args:
        path: the parameter's "/"-joined path.

    Returns:
        1 when the last path component is "embedding", else 0.

    Example:
        >>> table_axis("embed_tokens/embedding"), table_axis("layers_0/mlp/up_proj/kernel")
        (1, 0)
    """
    return 1 if path.rsplit("/", 1)[-1] == "embedding" else 0


@partial(jax.jit, static_argnames=("spec", "axis", "method", "act_bits", "act_group",
                                   "scale_dtype", "percentile", "mse_grid", "mse_max_shrink",
                                   "mse_norm", "compute"))
def _quantize_jit(w, spec, axis, method, act_bits, act_group, scale_dtype, percentile,
                  mse_grid, mse_max_shrink, mse_norm, compute):
    return quantize_weight(w, spec, axis=axis, method=method, act_bits=act_bits,
                           act_group=act_group,
                           scale_dtype=scale_dtype, percentile=percentile, mse_grid=mse_grid,
                           mse_max_shrink=mse_max_shrink, mse_norm=mse_norm, compute=compute)


def quantize_leaf(leaf: Any, path: str, options: QuantizeOptions) -> Any:
    """One parameter → its quantized form (see module docstring for composition).

    Args:
        leaf: a float kernel or table, or a masked / N:M / low-rank / fake-quant leaf.
        path: the parameter's path (chooses the axis: see `table_axis`; names errors).
        options: the `quantize` op's options.

    Returns:
        A QuantizedWeight, or for a LowRankWeight one with both factors quantized.

    Raises:
        ValueError: for an already quantized leaf, one below 2-D, or a group size that
            does not divide its contraction axis.

    Example:
        >>> import jax.numpy as jnp
        >>> leaf = quantize_leaf(jnp.ones((4, 2)), "mlp/kernel", QuantizeOptions(bits=4))
        >>> type(leaf).__name__, leaf.bits, leaf.axis
        ('QuantizedWeight', 4, 0)
    """
    spec = options.spec
    if isinstance(leaf, LowRankWeight):
        return LowRankWeight(u=quantize_leaf(leaf.u, f"{path}/u", options),
                             v=quantize_leaf(leaf.v, f"{path}/v", options))
    if isinstance(leaf, ScaledInputWeight):  # smoothed: the scaled kernel is what rounds
        return ScaledInputWeight(weight=quantize_leaf(leaf.weight, path, options),
                                 input_scale=leaf.input_scale)
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
    check_activation_grid(spec, options.act_bits, options.act_group,
                          leaf.shape[1] if axis == 1 else leaf.shape[0], f"{path} {leaf.shape}")
    return _quantize_jit(
        leaf, spec, axis, options.method, options.act_bits, options.act_group,
        options.scale_dtype, float(options.percentile), int(options.mse_grid),
        float(options.mse_max_shrink), float(options.mse_norm), options.compute)


def fake_quant_leaf(leaf: Any, path: str, options: FakeQuantOptions) -> FakeQuantWeight:
    """One kernel or table → its fake-quant (QAT) form.

    Args:
        leaf: a float kernel or table (at least 2-D).
        path: the parameter's path (chooses the axis: see `table_axis`; names errors).
        options: the `fake_quant` op's options.

    Returns:
        A FakeQuantWeight on the options' grid, with learned step sizes when
        `learn_scale` is set.

    Raises:
        ValueError: for a non-array or 1-D leaf, or a group size that does not divide its
            contraction axis.

    Example:
        >>> import jax.numpy as jnp
        >>> fake = fake_quant_leaf(jnp.ones((6, 4)), "embed_tokens/embedding",
        ...                        FakeQuantOptions(bits=4))
        >>> type(fake).__name__, fake.axis, fake.method
        ('FakeQuantWeight', 1, 'absmax')
    """
    spec = options.spec
    if isinstance(leaf, ScaledInputWeight):  # smoothed: the scaled kernel is what rounds
        return ScaledInputWeight(weight=fake_quant_leaf(leaf.weight, path, options),
                                 input_scale=leaf.input_scale)
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


def with_activation_blocks(params: Any, act_group: int = 32) -> Any:
    """Every QuantizedWeight that can run them computes with int8 activation blocks.

    What llama.cpp's CPU backend does for Q8_0/Q4_0/Q4_1 tensors (activations rounded to
    Q8_0 or Q8_1 blocks of 32 with float16 scales, one int32 dot product per block), so a
    model loaded from a GGUF file reproduces llama.cpp's numerics rather than the
    weight-only product of the same codes. Weights whose grid cannot (asymmetric 8-bit,
    a group size that is not a multiple of `act_group`, a contraction length it does not
    divide) are left as they are.

    Args:
        params: a parameter tree.
        act_group: the activation block length (32 for llama.cpp).

    Returns:
        The tree with `act_bits=8, act_group=act_group` on those weights (inside wrappers
        too); the rest unchanged.

    Raises:
        ValueError: when `act_group` is not a positive integer.

    Example:
        >>> import jax.numpy as jnp
        >>> w = quantize_weight(jnp.ones((64, 4)), QuantSpec(bits=4, granularity="group",
        ...                                                 group_size=32))
        >>> with_activation_blocks({"kernel": w})["kernel"].act_group
        32
    """
    check_activation_grid(QuantSpec(), 8, act_group, 0, "with_activation_blocks")

    def convert(leaf: Any) -> Any:
        if not isinstance(leaf, QuantizedWeight):
            return leaf
        try:
            check_activation_grid(leaf.spec, 8, act_group, leaf.codes_shape_canonical[0])
        except ValueError:
            return leaf
        return leaf.replace(act_bits=8, act_group=act_group)

    return jax.tree_util.tree_map(convert, params,
                                  is_leaf=lambda node: isinstance(node, QuantizedWeight))
