"""W8A8 with int8 activation blocks (act_group): llama.cpp's Q8_0/Q8_1 numerics.

The reference is plain numpy written from ggml's CPU kernels: `quantize_row_q8_0`
(d = absmax/127 stored as float16, codes round(x·127/absmax) ties to even),
`quantize_row_q8_1` (also s = float16(d·Σq)), and the block dot products
`vec_dot_q8_0_q8_0`, `vec_dot_q4_0_q8_0` (codes q − 8), `vec_dot_q4_1_q8_1`
(d_w·d_x·Σ u·q + m·s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.transforms.quantize import QuantizeOptions, quantize_leaf, with_activation_blocks
from jaxopt_llm.weights import QuantSpec, quantize_weight
from jaxopt_llm.weights.quantized import quantize_activations_blockwise


def numpy_q8_blocks(x: np.ndarray, block: int):
    """ggml's quantize_row_q8_1 on rows of x: codes, float16 d, float16 s = d·Σq."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, block)
    amax = np.abs(blocks).max(-1, keepdims=True)
    d = amax / np.float32(127)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0)
    codes = np.rint(blocks * inverse.astype(np.float32)).astype(np.int32)  # ties to even
    s = (d * codes.sum(-1, keepdims=True)).astype(np.float16).astype(np.float64)
    return codes, d.astype(np.float16).astype(np.float64), s


def numpy_block_dot(x: np.ndarray, codes: np.ndarray, scale: np.ndarray,
                    offset: np.ndarray | None, block: int, group: int) -> np.ndarray:
    """y = Σ_b d_x·d_w·(q_x · q_w) (+ m·s_x) with codes (K, N), per-group scale (G, N)."""
    xq, dx, sx = numpy_q8_blocks(x, block)  # (M, B, block), (M, B, 1)
    k, n = codes.shape
    y = np.zeros((x.shape[0], n))
    for b in range(k // block):
        g = b * block // group
        rows = slice(b * block, (b + 1) * block)
        sumi = xq[:, b, :].astype(np.int64) @ codes[rows].astype(np.int64)  # (M, N)
        y += sumi * dx[:, b] * scale[g].astype(np.float64)
        if offset is not None:
            y += sx[:, b] * offset[g].astype(np.float64)
    return y


GRIDS = {  # name: (QuantSpec, act_group)
    "q8_0": (QuantSpec(bits=8, granularity="group", group_size=32), 32),
    "q4_0": (QuantSpec(bits=4, granularity="group", group_size=32), 32),
    "q4_1": (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32,
                       zero="float"), 32),
    "w4g64-int-zero": (QuantSpec(bits=4, symmetric=False, granularity="group",
                                 group_size=64), 32),
    "w8-per-channel": (QuantSpec(bits=8), 16),
}


def leaf_codes(qw):
    """Codes as llama.cpp multiplies them (K, N), scales and float offset per group."""
    codes = np.asarray(qw.codes()).astype(np.int64)
    scale = np.asarray(qw.scale, np.float64)
    zero = None if qw.zero_point is None else np.asarray(qw.zero_point, np.float64)
    if qw.axis == 1:
        scale, zero = scale.T, (None if zero is None else zero.T)
    offset = None
    if zero is not None and qw.zero == "float":
        offset = zero
    elif zero is not None:
        group = codes.shape[0] // scale.shape[0]
        codes = codes - np.repeat(zero, group, axis=0).astype(np.int64)
    return codes, scale, offset


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_linear_equals_numpy_ggml_reference(name):
    spec, block = GRIDS[name]
    rng = np.random.default_rng(0)
    w = rng.normal(size=(128, 24)).astype(np.float32)
    x = rng.normal(size=(2, 3, 128)).astype(np.float32)
    x[0, 0, :32] = 0.0  # an all-zero activation block
    qw = quantize_weight(jnp.asarray(w), spec, act_bits=8, act_group=block)
    y = jax.jit(lambda a, leaf: leaf.linear(a))(jnp.asarray(x), qw)
    codes, scale, offset = leaf_codes(qw)
    group = spec.group_size if spec.granularity == "group" else 128
    expected = numpy_block_dot(x.reshape(-1, 128), codes, scale, offset, block, group)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 24), expected, rtol=2e-5, atol=2e-5)
    # and it is not the weight-only product: activations really are rounded
    weight_only = x.reshape(-1, 128) @ np.asarray(qw.materialize(), np.float64)
    assert np.abs(np.asarray(y).reshape(-1, 24) - weight_only).max() > 1e-4


@pytest.mark.parametrize("name", ["q8_0", "q4_1"])
def test_tied_head_uses_activation_blocks(name):
    spec, block = GRIDS[name]
    rng = np.random.default_rng(1)
    table = rng.normal(size=(40, 64)).astype(np.float32)  # (V, D)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    qt = quantize_weight(jnp.asarray(table), spec, axis=1, act_bits=8, act_group=block)
    logits = jax.jit(lambda a, leaf: leaf.attend(a))(jnp.asarray(x), qt)
    codes, scale, offset = leaf_codes(qt)  # codes (D, V)
    expected = numpy_block_dot(x, codes, scale, offset, block, spec.group_size)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=2e-5, atol=2e-5)


def test_blockwise_activation_codes_equal_numpy():
    x = np.random.default_rng(2).normal(size=(3, 96)).astype(np.float32) * 5
    x[1, 32:64] = 0.0
    x[2, 0] = 127.0 / 2  # an exact .5 tie: codes round to even like _mm256_round_ps
    codes, scale, total = quantize_activations_blockwise(jnp.asarray(x), 32)
    ref_codes, ref_scale, ref_sum = numpy_q8_blocks(x, 32)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    np.testing.assert_array_equal(np.asarray(scale, np.float64), ref_scale)
    np.testing.assert_array_equal(np.asarray(total, np.float64), ref_sum)


def test_with_activation_blocks_converts_what_can_run_and_leaves_the_rest():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32))
    params = {
        "q4": quantize_weight(w, GRIDS["q4_0"][0]),
        "asym8": quantize_weight(w, QuantSpec(bits=8, symmetric=False)),
        "g16": quantize_weight(w, QuantSpec(bits=4, granularity="group", group_size=16)),
        "float": w,
    }
    out = with_activation_blocks(params)
    assert (out["q4"].act_bits, out["q4"].act_group) == (8, 32)
    assert out["asym8"].act_group is None and out["asym8"].act_bits is None
    assert out["g16"].act_group is None
    assert out["float"] is w
    with pytest.raises(ValueError, match="act_group must be a positive integer"):
        with_activation_blocks(params, 0)


def test_quantize_option_act_group_reaches_the_leaf():
    w = jnp.asarray(np.random.default_rng(4).normal(size=(64, 8)).astype(np.float32))
    options = QuantizeOptions(bits=4, symmetric=False, zero="float", granularity="group",
                              group_size=32, act_bits=8, act_group=32)
    leaf = quantize_leaf(w, "layers_0/mlp/up_proj/kernel", options)
    assert (leaf.act_bits, leaf.act_group, leaf.zero) == (8, 32, "float")


@pytest.mark.parametrize("kwargs, message", [
    (dict(act_group=32), "act_group 32 needs act_bits 8"),
    (dict(act_bits=8, act_group=0), "act_group must be a positive integer"),
    (dict(act_bits=8, act_group=True), "act_group must be a positive integer"),
    (dict(act_bits=8, act_group="32"), "act_group must be a positive integer"),
    (dict(act_bits=8, act_group=64, granularity="group", group_size=32),
     "act_group 64 must divide the weight's group_size 32"),
    (dict(act_bits=8, symmetric=False, zero="float", granularity="group", group_size=32),
     "act_group: 32"),
])
def test_bad_activation_grid_is_one_clear_error(kwargs, message):
    act = {k: kwargs.pop(k) for k in ("act_bits", "act_group") if k in kwargs}
    with pytest.raises(ValueError, match=message):
        QuantizeOptions(bits=4, **kwargs, **act)
    with pytest.raises(ValueError, match=message):
        quantize_weight(jnp.ones((64, 4)), QuantSpec(bits=4, **kwargs), **act)


def test_act_group_must_divide_the_contraction_length():
    options = QuantizeOptions(bits=8, act_bits=8, act_group=32)
    with pytest.raises(ValueError, match="act_group 32 does not divide the contraction "
                                         "length 48"):
        quantize_leaf(jnp.ones((48, 4)), "layers_0/mlp/down_proj/kernel", options)
