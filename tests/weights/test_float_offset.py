"""Float-offset grids (zero="float", w = u·d + m): numpy references, every execution path,
storage and sharding, artifacts, and the real model's Q4_1 weights reproduced exactly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxopt_llm.io.artifact import load_artifact, save_artifact
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.transforms.quantize import QuantizeOptions, quantize_leaf
from jaxopt_llm.weights import (
    QuantizedWeight,
    QuantSpec,
    attend,
    embed,
    linear,
    param_bytes,
    quantize_weight,
)


def numpy_float_offset(w, bits, group_size, scale_dtype=np.float16):
    """Independent reference on a kernel (K, N): per group (along K, the last one possibly
    shorter) d = (max - min)/(2^b - 1), m = min, both rounded to `scale_dtype`;
    u = clip(round((w - m)/d), 0, 2^b - 1). Returns (codes, d, m, dequantized)."""
    k, n = w.shape
    size = group_size or k
    qmax = 2 ** bits - 1
    codes = np.zeros((k, n), np.int64)
    deq = np.zeros((k, n), np.float32)
    ds, ms = [], []
    for start in range(0, k, size):
        block = w[start:start + size].astype(np.float32)
        lo, hi = block.min(axis=0), block.max(axis=0)
        d = np.maximum((hi - lo) / np.float32(qmax), np.finfo(scale_dtype).tiny)
        d, m = d.astype(scale_dtype), lo.astype(scale_dtype)
        u = np.clip(np.round((block - m.astype(np.float32)) / d.astype(np.float32)), 0, qmax)
        codes[start:start + size] = u
        deq[start:start + size] = u.astype(np.float32) * d.astype(np.float32) \
            + m.astype(np.float32)
        ds.append(d)
        ms.append(m)
    return codes, np.stack(ds), np.stack(ms), deq


def _spec(bits, group_size=None, partial=False):
    if group_size is None:
        return QuantSpec(bits=bits, symmetric=False, zero="float")
    return QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=group_size,
                     partial_groups=partial, zero="float")


def _weights(seed, shape=(64, 12), shift=0.0):
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.1, 2, size=(1, shape[1]))
    return (rng.standard_normal(shape) * scales + shift).astype(np.float32)


# ------------------------------------------------------------------ the grid math


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [None, 16, 32])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_grid_matches_numpy(bits, group_size, scale_dtype):
    # Shifted weights: most groups' ranges exclude 0, which an integer zero would waste codes on.
    w = _weights(bits, shift=3.0)
    q = jax.jit(lambda a: quantize_weight(a, _spec(bits, group_size),
                                          scale_dtype=scale_dtype))(w)
    codes, d, m, deq = numpy_float_offset(w, bits, group_size, np.dtype(scale_dtype))
    assert q.zero == "float" and q.zero_point.dtype == jnp.dtype(scale_dtype)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    # XLA may divide by a constant as a multiply by its reciprocal: 1 ulp of d.
    np.testing.assert_allclose(np.asarray(q.scale, np.float32), d.astype(np.float32),
                               rtol=float(np.finfo(scale_dtype).eps), atol=0)
    np.testing.assert_array_equal(np.asarray(q.zero_point), m)  # m = min, rounded once
    np.testing.assert_allclose(np.asarray(jax.jit(QuantizedWeight.materialize)(q)), deq,
                               rtol=1e-6, atol=1e-6)
    groups = 1 if group_size is None else 64 // group_size
    itemsize = np.dtype(scale_dtype).itemsize
    assert param_bytes({"w": q}) == 64 * 12 * bits // 8 + 2 * groups * 12 * itemsize


def test_float_offset_beats_integer_zero_on_shifted_groups():
    # All-positive groups: an integer zero's range is widened to [0, max]; the float
    # offset spends all 2^b codes on [min, max].
    w = (10.0 + 0.5 * np.random.default_rng(0).standard_normal((64, 12))).astype(np.float32)
    spec_int = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    err_int = np.abs(quantize_weight(w, spec_int).materialize() - w).max()
    err_float = np.abs(quantize_weight(w, _spec(4, 16)).materialize() - w).max()
    assert err_float < err_int / 2


def test_partial_last_group_uses_its_own_rows():
    w = _weights(3, shape=(40, 6), shift=2.0)
    q = quantize_weight(w, _spec(4, 16, partial=True), scale_dtype="float32")
    codes, d, m, deq = numpy_float_offset(w, 4, 16, np.float32)  # last group: rows 32..39
    assert q.scale.shape == (3, 6)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    np.testing.assert_array_equal(np.asarray(q.zero_point), m)
    np.testing.assert_allclose(np.asarray(q.materialize()), deq, rtol=1e-6, atol=1e-6)


def test_mse_range_never_worse_than_minmax():
    w = _weights(5, shape=(128, 8), shift=1.0)
    w[7, 2] = 30.0  # an outlier: the clip search shrinks its group's range
    spec = _spec(4, 32)
    err = {method: np.abs(np.asarray(quantize_weight(w, spec, method=method,
                                                     scale_dtype="float32").materialize()) - w)
           for method in ("minmax", "mse")}
    per_group = {k: (v ** 2).reshape(4, 32, 8).sum(axis=1) for k, v in err.items()}
    assert np.all(per_group["mse"] <= per_group["minmax"] * (1 + 1e-6))
    assert per_group["mse"][0, 2] < per_group["minmax"][0, 2] * 0.9


def test_embedding_table_rows_are_float_offset_groups():
    table = _weights(4, shape=(10, 32), shift=-1.0)  # (V, D), quantized along D
    q = quantize_weight(table, _spec(4, 8), axis=1)
    codes, d, m, deq = numpy_float_offset(table.T, 4, 8)
    assert q.scale.shape == (10, 4) and q.zero_point.shape == (10, 4)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)  # canonical (D, V)
    np.testing.assert_array_equal(np.asarray(q.zero_point), m.T)
    np.testing.assert_allclose(np.asarray(q.materialize()), deq.T, rtol=1e-6, atol=1e-6)
    ids = jnp.array([[3, 0, 9], [9, 9, 1]])
    np.testing.assert_array_equal(np.asarray(jax.jit(embed)(q, ids)), deq.T[np.asarray(ids)])
    x = _weights(6, shape=(5, 32))
    np.testing.assert_allclose(np.asarray(jax.jit(attend)(x, q)), x @ deq, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ execution paths


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("rows", [4, 256])  # float32 path / bfloat16 path (≥ 128 rows)
def test_linear_matches_dequantized_matmul(group_size, rows):
    w = _weights(7, shape=(64, 24), shift=0.5)
    q = quantize_weight(w, _spec(4, group_size), compute="bfloat16")
    deq = np.asarray(q.materialize(), np.float64)
    x = _weights(8, shape=(rows, 64))
    y = np.asarray(jax.jit(linear)(jnp.asarray(x), q))
    ref = x.astype(np.float64) @ deq
    if rows < 128:
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    else:  # bf16 inputs (and, with groups, bf16 weights), f32 accumulation
        x16 = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
        if group_size is None:  # bf16 x against exact codes·d, plus (Σx)·m from float32 x
            d = np.asarray(q.scale, np.float64)
            m = np.asarray(q.zero_point, np.float64)
            expected = x16 @ (np.asarray(q.codes(), np.float64) * d) + x.sum(-1, keepdims=True) * m
        else:  # bf16 x against the bf16-rounded dequantized weight
            expected = x16 @ np.asarray(jnp.asarray(deq, jnp.float32).astype(jnp.bfloat16)
                                        .astype(jnp.float32), np.float64)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-3)
        assert np.abs(y - ref).max() < 0.01 * np.abs(ref).max()
    f32 = q.replace(compute="float32")
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(jnp.asarray(x), f32)), ref,
                               rtol=1e-5, atol=1e-4)


def test_add_dense_requantizes_on_a_float_offset_grid():
    w = _weights(9, shape=(32, 8), shift=1.0)
    q = quantize_weight(w, _spec(4, 16))
    delta = np.full_like(w, 0.25)
    merged = q.add_dense(jnp.asarray(delta))
    assert merged.zero == "float" and merged.zero_point.dtype == jnp.float16
    ref = quantize_weight(np.asarray(q.materialize()) + delta, _spec(4, 16))
    np.testing.assert_array_equal(np.asarray(merged.materialize()), np.asarray(ref.materialize()))


def test_partition_specs_shard_offsets_like_scales():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    w = _weights(10, shape=(64, 16))
    q = quantize_weight(w, _spec(4, 8))  # 8 groups
    specs = q.partition_specs("data", "model", mesh)
    assert specs.qvalue == P("data", "model")
    assert specs.scale == P("data", "model") and specs.zero_point == P("data", "model")
    per_channel = quantize_weight(w, _spec(4)).partition_specs("model", None, mesh)
    assert per_channel.zero_point == P() and per_channel.scale == P()


# ------------------------------------------------------------------ options and errors


def test_options_and_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"zero='float'.*symmetric"):
        QuantSpec(bits=4, zero="float")
    with pytest.raises(ValueError, match=r"zero must be one of"):
        QuantSpec(bits=4, symmetric=False, zero="offset")
    with pytest.raises(ValueError, match=r"symmetric"):
        QuantizeOptions(bits=4, zero="float")
    with pytest.raises(ValueError, match=r"zero 'float'.*act_bits"):
        QuantizeOptions(bits=4, symmetric=False, zero="float", act_bits=8)
    with pytest.raises(ValueError, match=r"act_bits=8.*integer zero"):
        quantize_weight(_weights(0), _spec(4), act_bits=8)
    q = quantize_weight(_weights(0), _spec(4)).replace(act_bits=8)  # built by hand
    with pytest.raises(ValueError, match=r"W8A8.*float offset"):
        linear(jnp.ones((2, 64)), q)


def test_quantize_op_option_builds_float_offsets():
    options = QuantizeOptions(bits=4, symmetric=False, group_size=16, zero="float")
    w = _weights(11, shift=2.0)
    leaf = quantize_leaf(jnp.asarray(w), "layers_0/mlp/up_proj/kernel", options)
    codes, _, m, _ = numpy_float_offset(w, 4, 16)
    assert isinstance(leaf, QuantizedWeight) and leaf.spec == options.spec
    np.testing.assert_array_equal(np.asarray(leaf.codes()), codes)
    np.testing.assert_array_equal(np.asarray(leaf.zero_point), m)


# ------------------------------------------------------------------ artifacts


_CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=32,
                      intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_position_embeddings=64, bos_token_id=1,
                      eos_token_ids=(2,))


def test_artifact_round_trip_and_older_leaves_without_zero(tmp_path):
    from jaxopt_llm.models import init_params
    from jaxopt_llm.tree import flatten, unflatten

    w = _weights(12, shape=(48, 32), shift=1.0)  # down_proj's shape
    leaves = {"offset": quantize_weight(w, _spec(5, 16)),
              "integer": quantize_weight(w, QuantSpec(bits=4, symmetric=False))}
    paths = {"offset": "layers_0/mlp/down_proj/kernel", "integer": "layers_0/attn/q_proj/kernel"}
    leaves["integer"] = quantize_weight(_weights(13, shape=(32, 32), shift=1.0),
                                        QuantSpec(bits=4, symmetric=False))
    flat = flatten(init_params(_CONFIG, jax.random.key(0)))
    flat.update({paths[name]: leaf for name, leaf in leaves.items()})
    out = save_artifact(tmp_path / "art", config=_CONFIG, params=unflatten(flat),
                        tokenizer=None, recipe=None)
    loaded_flat = flatten(load_artifact(out).params)
    loaded = {name: loaded_flat[path] for name, path in paths.items()}
    params = leaves
    for name, leaf in params.items():
        assert loaded[name].zero == leaf.zero
        assert jax.tree_util.tree_structure(loaded[name]) == jax.tree_util.tree_structure(leaf)
        np.testing.assert_array_equal(np.asarray(loaded[name].materialize()),
                                      np.asarray(leaf.materialize()))
    # An artifact written before the field existed lacks "zero": it loads as integer.
    meta_path = out / "artifact.json"
    meta = json.loads(meta_path.read_text())
    del meta["leaves"][paths["integer"]]["static"]["zero"]
    meta_path.write_text(json.dumps(meta))
    older = flatten(load_artifact(out).params)[paths["integer"]]
    assert older.zero == "integer"
    np.testing.assert_array_equal(np.asarray(older.materialize()),
                                  np.asarray(params["integer"].materialize()))


# ------------------------------------------------------------------ the real model


def _gguf_q4_1_blocks(name):
    """(d, m, codes) of one Q4_1 tensor straight from the GGUF bytes: rows are outputs,
    each row is blocks of 32 inputs stored as fp16 d, fp16 m and 16 bytes of nibbles
    (low nibbles: inputs 0..15, high nibbles: 16..31)."""
    import gguf

    from jaxopt_llm.io.loader import resolve_model_path

    reader = gguf.GGUFReader(resolve_model_path("smollm2-135m"))
    tensor = next(t for t in reader.tensors if t.name == name)
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    raw = np.asarray(tensor.data).reshape(tensor.data.shape[0], -1, 20)  # (N, G, 20)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0]
    m = raw[..., 2:4].copy().view(np.float16)[..., 0]
    nibbles = raw[..., 4:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # (N, G, 32)
    return d.T, m.T, codes.reshape(codes.shape[0], -1).T  # (G, N), (G, N), (K, N)


# Kernels whose output rows the loader keeps in GGUF order (q/k rows are rope-permuted).
_REAL_KERNELS = {
    "layers_0/attn/v_proj/kernel": "blk.0.attn_v.weight",
    "layers_11/attn/o_proj/kernel": "blk.11.attn_output.weight",
    "layers_29/mlp/up_proj/kernel": "blk.29.ffn_up.weight",
    "layers_5/mlp/down_proj/kernel": "blk.5.ffn_down.weight",
}


@pytest.mark.slow
def test_reproduces_the_real_models_q4_1_weights(smollm2):
    from jaxopt_llm import tree

    flat = tree.flatten(smollm2.params)
    spec = _spec(4, 32)
    quantize = jax.jit(lambda a: quantize_weight(a, spec))
    for path, gguf_name in _REAL_KERNELS.items():
        w = np.asarray(flat[path])
        q = quantize(w)
        d, m, codes = _gguf_q4_1_blocks(gguf_name)
        # The stored grid itself: the same fp16 d and m, the same 4-bit codes as llama.cpp's.
        np.testing.assert_array_equal(np.asarray(q.scale), d, err_msg=path)
        np.testing.assert_array_equal(np.asarray(q.zero_point), m, err_msg=path)
        np.testing.assert_array_equal(np.asarray(q.codes()), codes, err_msg=path)
        # Hence the loaded float weights come back bit for bit.
        np.testing.assert_array_equal(np.asarray(q.materialize()), w, err_msg=path)
        assert q.nbytes == w.size // 2 + 2 * 2 * (w.shape[0] // 32) * w.shape[1]  # 5 bits/weight
    # q/k kernels: rows permuted by the loader, groups along the inputs unchanged.
    for path in ("layers_0/attn/q_proj/kernel", "layers_17/attn/k_proj/kernel"):
        w = np.asarray(flat[path])
        np.testing.assert_array_equal(np.asarray(quantize(w).materialize()), w, err_msg=path)
