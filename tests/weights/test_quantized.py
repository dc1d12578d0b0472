"""Quantization math, packing and execution against plain-numpy references, under jit."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.weights import (
    QuantizedWeight,
    QuantSpec,
    attend,
    embed,
    linear,
    packing,
    param_bytes,
    quantize_weight,
)


def numpy_rtn(w, bits, symmetric, granularity, group_size, scale_dtype=np.float32):
    """Independent RTN reference on a kernel (K, N): returns (codes, scale, zero, dequant)."""
    k, n = w.shape
    size = group_size if granularity == "group" else k
    out_codes = np.zeros((k, n), np.int64)
    deq = np.zeros((k, n), np.float64)
    scales, zeros = [], []
    for g0 in range(0, k, size):
        block = w[g0:g0 + size].astype(np.float64)  # (g, N)
        if granularity == "tensor":
            block_max = np.abs(w).max()
            block_min, block_hi = min(w.min(), 0.0), max(w.max(), 0.0)
        else:
            block_max = np.abs(block).max(axis=0)
            block_min, block_hi = np.minimum(block.min(axis=0), 0), np.maximum(block.max(axis=0), 0)
        if symmetric:
            scale = (np.float32(block_max) / np.float32(2 ** (bits - 1) - 1))
            scale = np.maximum(scale, np.finfo(scale_dtype).tiny).astype(scale_dtype)
            q = np.clip(np.round(block / scale.astype(np.float32)), -(2 ** (bits - 1)),
                        2 ** (bits - 1) - 1)
            zero = None
            deq[g0:g0 + size] = q * scale.astype(np.float32)
        else:
            lo, hi = np.float32(block_min), np.float32(block_hi)  # min-max range
            scale = ((hi - lo) / np.float32(2 ** bits - 1))
            scale = np.maximum(scale, np.finfo(scale_dtype).tiny).astype(scale_dtype)
            zero = np.clip(np.round(-lo / scale.astype(np.float32)), 0, 2 ** bits - 1)
            q = np.clip(np.round(block / scale.astype(np.float32)) + zero, 0, 2 ** bits - 1)
            deq[g0:g0 + size] = (q - zero) * scale.astype(np.float32)
        del block_min, block_hi
        out_codes[g0:g0 + size] = q
        scales.append(np.broadcast_to(scale, (n,)))
        zeros.append(None if zero is None else np.broadcast_to(zero, (n,)))
        if granularity == "tensor":
            break
    return out_codes, np.stack(scales), zeros, deq


def pack_reference(codes, bits):
    """Bit-by-bit packing along axis 0, written from the layout description."""
    length = codes.shape[0]
    unit = packing.values_per_unit(bits)
    padded = -(-length // unit) * unit
    out = np.zeros((packing.packed_length(length, bits), *codes.shape[1:]), np.uint8)
    for col in np.ndindex(*codes.shape[1:]):
        column = np.zeros(padded, np.int64)
        column[:length] = codes[(slice(None), *col)]
        for i, value in enumerate(column):
            for b in range(bits):
                if bits == 8:
                    byte, offset = i, b
                elif 8 % bits == 0:
                    byte, offset = i // unit, (i % unit) * bits + b
                else:
                    byte, offset = (i // 8) * bits + b, i % 8
                out[(byte, *col)] |= np.uint8(((int(value) >> b) & 1) << offset)
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [8, 13, 64])
def test_pack_unpack_bit_exact(bits, length):
    rng = np.random.default_rng(bits * 100 + length)
    codes = rng.integers(0, 2 ** bits, size=(length, 3), dtype=np.int64)
    packed = jax.jit(packing.pack, static_argnums=(1, 2))(codes.astype(np.uint8), bits, 0)
    np.testing.assert_array_equal(np.asarray(packed), pack_reference(codes, bits))
    assert packed.shape[0] == -(-length * bits // 8) or bits in (3, 5, 6, 7)
    unpacked = jax.jit(packing.unpack, static_argnums=(1, 2, 3))(packed, bits, length, 0)
    np.testing.assert_array_equal(np.asarray(unpacked), codes)
    # Packing along axis 1 is the same as packing the transpose along axis 0.
    packed_t = packing.pack(codes.T.astype(np.uint8), bits, axis=1)
    np.testing.assert_array_equal(np.asarray(packed_t), pack_reference(codes, bits).T)


CASES = list(itertools.product(range(2, 9), [True, False],
                               [("tensor", None), ("channel", None), ("group", 16)]))


@pytest.mark.parametrize("bits,symmetric,granularity", CASES)
def test_rtn_matches_numpy(bits, symmetric, granularity):
    gran, group_size = granularity
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((64, 12)) * rng.uniform(0.1, 2, size=(1, 12))).astype(np.float32)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=gran, group_size=group_size)
    q = jax.jit(lambda a: quantize_weight(a, spec, scale_dtype="float32"))(w)
    codes, scale, _zeros, deq = numpy_rtn(w, bits, symmetric, gran, group_size)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    # XLA may divide by a constant as a multiply by its reciprocal: 1 ulp.
    np.testing.assert_allclose(np.asarray(q.scale), scale[: q.scale.shape[0], : q.scale.shape[1]],
                               rtol=2e-7, atol=0)
    np.testing.assert_allclose(np.asarray(jax.jit(QuantizedWeight.materialize)(q)), deq,
                               rtol=1e-6, atol=1e-7)
    # Storage: exactly bits/8 bytes per value plus scales (and zero points).
    groups = {"tensor": 1, "channel": 1, "group": 64 // 16}[gran]
    per_group = 1 if gran == "tensor" else 12
    expected = 64 * 12 * bits // 8 + groups * per_group * (4 + (0 if symmetric else 1))
    assert param_bytes({"w": q}) == expected


def test_group_boundaries_are_independent():
    w = np.ones((32, 2), np.float32) * np.repeat(np.array([1, 2, 4, 8], np.float32), 8)[:, None]
    spec = QuantSpec(bits=4, granularity="group", group_size=8)
    q = quantize_weight(w, spec, scale_dtype="float32")
    np.testing.assert_allclose(np.asarray(q.scale)[:, 0],
                               np.array([1, 2, 4, 8], np.float32) / np.float32(7), rtol=2e-7)
    np.testing.assert_allclose(np.asarray(q.materialize()), w, rtol=1e-6)  # codes ±7 exactly
    assert set(np.unique(np.asarray(q.codes()))) == {7}
    w2 = w.copy()
    w2[9, 0] = 16.0  # second group, first column only
    q2 = quantize_weight(w2, spec, scale_dtype="float32")
    changed = np.asarray(q2.scale) != np.asarray(q.scale)
    assert changed.sum() == 1 and changed[1, 0]


def test_mse_and_percentile_ranges_match_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 4)).astype(np.float32)
    w[3, 0] = 12.0  # an outlier the clip search should cut
    spec = QuantSpec(bits=4)
    q = quantize_weight(w, spec, method="mse", mse_grid=20, mse_max_shrink=0.8,
                        scale_dtype="float32")
    best = []
    for col in range(4):
        m = np.abs(w[:, col]).max()
        errs = []
        for i in range(20):
            s = np.float32(m * np.float32(1 - 0.8 * i / 20)) / np.float32(7)
            qq = np.clip(np.round(w[:, col] / s), -8, 7) * s
            errs.append(((w[:, col] - qq) ** 2).sum())
        best.append(np.float32(m * np.float32(1 - 0.8 * int(np.argmin(errs)) / 20)) / 7)
    np.testing.assert_allclose(np.asarray(q.scale)[0], np.array(best), rtol=1e-5)
    assert np.asarray(q.scale)[0, 0] < 12.0 / 7  # the outlier was clipped
    qp = quantize_weight(w, spec, method="percentile", percentile=99.0, scale_dtype="float32")
    np.testing.assert_allclose(np.asarray(qp.scale)[0],
                               np.percentile(np.abs(w), 99.0, axis=0) / 7, rtol=1e-5)


def test_minmax_asymmetric_range():
    w = np.linspace(-1.0, 3.0, 32, dtype=np.float32).reshape(32, 1)
    q = quantize_weight(w, QuantSpec(bits=4, symmetric=False), method="minmax",
                        scale_dtype="float32")
    assert float(q.scale[0, 0]) == pytest.approx(4.0 / 15)
    assert int(q.zero_point[0, 0]) == round(1.0 / (4.0 / 15))
    assert np.abs(np.asarray(q.materialize()) - w).max() <= 4.0 / 15 / 2 + 1e-6


def _int8_reference(x, q):
    """Per-token int8 activations × int8 weight codes, accumulated exactly in int64."""
    sx = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(127), np.finfo(np.float32).tiny)
    xq = np.clip(np.round(x / sx), -127, 127).astype(np.int64)
    codes = np.asarray(q.codes()).astype(np.int64)
    scale = np.asarray(q.scale).astype(np.float32).astype(np.float64)
    k = codes.shape[0]
    g = q.group_size or k
    out = 0
    for gi, g0 in enumerate(range(0, k, g)):
        centered = codes[g0:g0 + g]
        if q.zero_point is not None:
            centered = centered - np.asarray(q.zero_point).astype(np.int64)[gi]
        acc = xq[..., g0:g0 + g] @ centered
        out = out + acc * scale[gi if scale.shape[0] > 1 else 0]
    return out * sx


@pytest.mark.parametrize("bits,granularity", [(8, ("channel", None)), (8, ("group", 32)),
                                              (4, ("channel", None)), (8, ("tensor", None)),
                                              (4, ("group", 96))])
def test_w8a8_contracts_int8_into_int32(bits, granularity):
    """(group 96 on 64 inputs: a single partial group, whose padded codes once met the
    unpadded activations.)"""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    # 10 rows: more than decode size, where the native weight kernel would take W8A8
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    spec = QuantSpec(bits=bits, granularity=granularity[0], group_size=granularity[1],
                     partial_groups=granularity[1] == 96)
    q = quantize_weight(w, spec, act_bits=8, scale_dtype="float32")
    y = jax.jit(linear)(x, q)
    np.testing.assert_allclose(np.asarray(y), _int8_reference(x, q), rtol=1e-5, atol=1e-5)
    ref = x @ w
    assert np.abs(np.asarray(y) - ref).max() < (0.03 if bits == 8 else 0.2) * np.abs(ref).max()
    jaxpr = jax.make_jaxpr(linear)(x, q)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 1
    assert [v.aval.dtype for v in dots[0].invars] == [jnp.int8, jnp.int8]
    assert dots[0].outvars[0].aval.dtype == jnp.int32


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [("channel", None), ("group", 8), ("tensor", None)])
def test_quantized_embedding_and_tied_head(symmetric, granularity):
    rng = np.random.default_rng(2)
    table = rng.standard_normal((50, 32)).astype(np.float32)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=granularity[0],
                     group_size=granularity[1])
    q = quantize_weight(table, spec, axis=1)
    dense = np.asarray(q.materialize())
    ref = numpy_rtn(table.T, 4, symmetric, granularity[0], granularity[1],
                    np.float16 if granularity[0] == "group" else np.float32)[3].T
    np.testing.assert_allclose(dense, ref, rtol=1e-6, atol=1e-7)
    ids = np.array([[0, 7, 49], [3, 3, 11]], np.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(embed)(q, ids)), dense[ids])
    x = rng.standard_normal((2, 32)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(attend)(x, q)), x @ dense.T, rtol=1e-5,
                               atol=1e-5)


def test_dense_general_kernel_keeps_trailing_shape():
    w = np.random.default_rng(3).standard_normal((16, 2, 4)).astype(np.float32)
    q = quantize_weight(w, QuantSpec(bits=8))
    assert q.materialize().shape == (16, 2, 4)
    x = np.ones((3, 16), np.float32)
    np.testing.assert_allclose(np.asarray(linear(x, q)),
                               np.einsum("bk,kij->bij", x, np.asarray(q.materialize())),
                               rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(spec=dict(bits=1)), "bits must be an integer in 2..8"),
        (dict(spec=dict(bits=9)), "bits must be an integer in 2..8"),
        (dict(spec=dict(bits=4, granularity="group", group_size=48)),
         "group_size=48 does not divide the input dimension 64"),
        (dict(spec=dict(bits=4, granularity="group")), "positive integer group_size"),
        (dict(spec=dict(bits=4, granularity="row")), "granularity must be one of"),
        (dict(spec=dict(bits=8, symmetric=False), act_bits=8), "asymmetric 8-bit"),
        (dict(spec=dict(bits=8), method="median"), "range method must be one of"),
        (dict(spec=dict(bits=8), method="percentile", percentile=0.0), "percentile must be"),
    ],
)
def test_bad_quantization_options(kwargs, message):
    w = np.ones((64, 8), np.float32)
    with pytest.raises(ValueError, match=message):
        spec = QuantSpec(**kwargs.pop("spec"))
        quantize_weight(w, spec, **kwargs)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_partial_last_group_matches_numpy(bits, symmetric):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((40, 6)).astype(np.float32)  # groups of 16, 16 and 8
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=16,
                     partial_groups=True)
    q = jax.jit(lambda a: quantize_weight(a, spec, scale_dtype="float32"))(w)
    codes, scale, _, deq = numpy_rtn(w, bits, symmetric, "group", 16)
    assert q.scale.shape == (3, 6)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=2e-7)
    np.testing.assert_allclose(np.asarray(q.materialize()), deq, rtol=1e-6, atol=1e-7)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    if symmetric or bits < 8:
        q8 = quantize_weight(w, spec, act_bits=8, scale_dtype="float32")
        np.testing.assert_allclose(np.asarray(jax.jit(linear)(x, q8)), _int8_reference(x, q8),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="partial_groups: true"):
        quantize_weight(w, QuantSpec(bits=bits, granularity="group", group_size=16))


@pytest.mark.parametrize("granularity,group_size", [("channel", None), ("group", 32)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_prefill_path_rounds_only_activations(granularity, group_size, symmetric):
    """compute='bfloat16' with >= BF16_MIN_ROWS rows: bf16 inputs, f32 accumulation."""
    import ml_dtypes

    from jaxopt_llm.weights.quantized import BF16_MIN_ROWS

    rng = np.random.default_rng(8)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    x = rng.standard_normal((2, BF16_MIN_ROWS // 2, 64)).astype(np.float32)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=granularity, group_size=group_size)
    auto = quantize_weight(w, spec, compute="bfloat16")
    exact = quantize_weight(w, spec)  # float32 is the default
    dense = np.asarray(exact.materialize()).astype(np.float64)
    x16 = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    if granularity == "group":  # the dequantized weight is rounded to bf16 too
        dense16 = np.asarray(exact.materialize()).astype(ml_dtypes.bfloat16).astype(np.float64)
        reference = x16 @ dense16
    else:
        reference = x16 @ dense
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(x, auto)), reference, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(x, exact)), x @ dense, rtol=1e-5,
                               atol=1e-5)
    small = x[:, :4]  # decode-sized inputs stay float32 under "bfloat16"
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(small, auto)), small @ dense,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 8, 200])
@pytest.mark.parametrize("bits,symmetric,granularity,group_size", [
    (8, True, "channel", None), (8, False, "channel", None), (4, True, "channel", None),
    (4, False, "group", 32)])
def test_bfloat16_activations_meet_exact_codes(rows, bits, symmetric, granularity, group_size):
    """bf16 activations (bf16 params, --compute bfloat16) at any row count: per channel the
    exact codes enter an f32-accumulated product and the scale follows it, so the result
    is the float64 product of the bf16 inputs with the dequantized weight up to the final
    bf16 rounding; with groups the dequantized weight is rounded to bf16 first, except at
    decode sizes on the native kernels, which widen the activations and keep the weight."""
    import ml_dtypes

    from jaxopt_llm.weights import native

    rng = np.random.default_rng(9)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    x16 = jnp.asarray(rng.standard_normal((rows, 96)), jnp.bfloat16)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity,
                     group_size=group_size)
    q = quantize_weight(w, spec)
    dense = np.asarray(q.materialize(), np.float64)
    widened = native.path_in_use()[0] and rows <= native.MAX_ROWS
    if granularity == "group" and not widened:
        dense = dense.astype(ml_dtypes.bfloat16).astype(np.float64)
    reference = np.asarray(x16.astype(jnp.float32), np.float64) @ dense
    got = jax.jit(linear)(x16, q)
    assert got.dtype == jnp.bfloat16
    bf16_step = 2.0 ** -8 * np.abs(reference) + 1e-6  # one bf16 rounding of the output
    assert np.all(np.abs(np.asarray(got, np.float64) - reference) <= bf16_step)


@pytest.mark.parametrize("native", [True, False])
def test_auto_compute_follows_the_cpu(monkeypatch, native):
    """compute='auto' rounds prefill inputs to bf16 only where bf16 runs natively."""
    from jaxopt_llm import hardware
    from jaxopt_llm.weights.quantized import BF16_MIN_ROWS

    flags = frozenset({"avx2", "avx512_bf16"} if native else {"avx2"})
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    rng = np.random.default_rng(9)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    x = rng.standard_normal((BF16_MIN_ROWS, 64)).astype(np.float32)
    spec = QuantSpec(bits=8)
    expected = quantize_weight(w, spec, compute="bfloat16" if native else "float32")
    got = linear(x, quantize_weight(w, spec, compute="auto"))  # eager: flags read at trace
    np.testing.assert_array_equal(np.asarray(got), np.asarray(linear(x, expected)))


def test_compute_mode_is_checked():
    with pytest.raises(ValueError, match="weight: compute must be one of float32, bfloat16, "
                                         "auto, got 'bf16'"):
        quantize_weight(np.ones((4, 2), np.float32), QuantSpec(bits=8), compute="bf16")
