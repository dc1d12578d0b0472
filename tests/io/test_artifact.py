"""Artifacts: save -> load is exact (tree, dtypes, static fields, logits), writes are atomic."""

from __future__ import annotations

import json
import struct as pystruct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import struct

from jaxopt_llm.io import artifact
from jaxopt_llm.io.artifact import FORMAT_VERSION, is_artifact_dir, load_artifact, save_artifact
from jaxopt_llm.io.loaded import LoadedModel
from jaxopt_llm.io.loader import load_model
from jaxopt_llm.io.safetensors_file import read_safetensors, write_safetensors
from jaxopt_llm.io.tokenizer import Tokenizer
from jaxopt_llm.models import build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.tree import flatten, unflatten
from jaxopt_llm.weights import WeightLeaf, linear, param_bytes

RECIPE = {"rules": [{"pattern": ".*q_proj/kernel", "pass": "quantize", "bits": 8}], "seed": 0}


# ----------------------------------------------------------------- test-local weight leaves


@struct.dataclass
class ArtifactTestInt8Weight(WeightLeaf):
    """int8 codes (K, N) times float16 scales (1, N), plus an optional float32 offset."""

    q: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    bits: int = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    tag: str = struct.field(pytree_node=False, default="test")

    def materialize(self) -> jax.Array:
        w = self.q.astype(jnp.float32) * self.scale.astype(jnp.float32)
        return w if self.offset is None else w + self.offset


@struct.dataclass
class ArtifactTestFactored(WeightLeaf):
    """u (K, r) -- itself a typed leaf -- times a bfloat16 v (r, N)."""

    u: Any
    v: jax.Array
    rank: int = struct.field(pytree_node=False)
    notes: tuple[Any, ...] = struct.field(pytree_node=False, default=((1, "a"), 2.5, None, True))

    def linear(self, x: jax.Array) -> jax.Array:
        return linear(linear(x, self.u), self.v)


@struct.dataclass
class ArtifactTestAllDtypes(WeightLeaf):
    """A kernel `w` carrying one array of every dtype an artifact must store."""

    w: jax.Array
    f32: jax.Array
    f16: jax.Array
    bf16: jax.Array
    i8: jax.Array
    u8: jax.Array
    i32: jax.Array
    flags: jax.Array
    u32: jax.Array
    f8: jax.Array
    scalar: jax.Array
    empty: jax.Array

    def materialize(self) -> jax.Array:
        return self.w


def _int8(w: jax.Array, with_offset: bool) -> ArtifactTestInt8Weight:
    scale = (jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127).astype(jnp.float16)
    q = jnp.round(w / scale.astype(jnp.float32)).astype(jnp.int8)
    offset = jnp.full(scale.shape, 0.01, jnp.float32) if with_offset else None
    return ArtifactTestInt8Weight(q=q, scale=scale, offset=offset, bits=8,
                                  shape=tuple(w.shape), tag=f"rank{w.ndim}")


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def config(tiny_config):
    """The tiny Llama with the word tokenizer's special ids."""
    return tiny_config(bos_token_id=1, eos_token_ids=(2,))


def _mask(length: int) -> jax.Array:
    return attention_mask(jnp.ones((1, length), bool), 0, length)


@pytest.fixture(scope="module")
def dense_params(config, tiny_params) -> dict[str, Any]:
    return tiny_params(config)


@pytest.fixture(scope="module")
def typed_params(dense_params) -> dict[str, Any]:
    flat = dict(flatten(dense_params))
    flat["layers_0/attn/q_proj/kernel"] = _int8(flat["layers_0/attn/q_proj/kernel"], False)
    flat["layers_0/mlp/up_proj/kernel"] = _int8(flat["layers_0/mlp/up_proj/kernel"], True)
    # Full rank 32: flax's Linear checks the first leaf of a param against (d_in, d_out).
    down = flat["layers_1/mlp/down_proj/kernel"]  # (48, 32)
    u, s, vt = np.linalg.svd(np.asarray(down), full_matrices=False)
    flat["layers_1/mlp/down_proj/kernel"] = ArtifactTestFactored(
        u=_int8(jnp.asarray(u * s), False), v=jnp.asarray(vt).astype(jnp.bfloat16), rank=32)
    return unflatten(flat)


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer) -> Tokenizer:
    return word_tokenizer


@pytest.fixture(scope="module")
def save(config, tokenizer):
    """save(directory, params, **kwargs): the tiny config and word tokenizer, RECIPE unless
    recipe= is given; returns the artifact directory."""

    def save(directory: Path, params: Any, **kwargs) -> Path:
        return save_artifact(directory, config=config, params=params, tokenizer=tokenizer,
                             recipe=kwargs.pop("recipe", RECIPE), **kwargs)

    return save


def _logits(config, params: Any, tokens: jax.Array) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    apply = jax.jit(build_model(config).apply)
    return np.asarray(apply({"params": params}, tokens, positions, _mask(tokens.shape[1]))[0])


def _assert_same_tree(a: Any, b: Any) -> None:
    # The treedef carries static fields, so this also compares bits, shape, tag, notes.
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert isinstance(y, jax.Array)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------- round trip


def test_round_trip_is_exact(typed_params, tokenizer, tmp_path, save, config):
    out = save(tmp_path / "art", typed_params, extra={"note": "tiny"})
    assert is_artifact_dir(out) and not is_artifact_dir(tmp_path)
    loaded = load_artifact(out)
    assert isinstance(loaded, LoadedModel) and loaded.source == str(out)
    params, tok, recipe = loaded.params, loaded.tokenizer, loaded.recipe
    assert loaded.config == config and recipe == RECIPE
    assert loaded.format_version == FORMAT_VERSION and loaded.extra == {"note": "tiny"}
    _assert_same_tree(typed_params, params)
    q = params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, ArtifactTestInt8Weight) and q.offset is None
    assert q.q.dtype == jnp.int8 and q.scale.dtype == jnp.float16
    assert type(q.shape) is tuple and q.shape == (32, 32) and q.tag == "rank2"
    down = params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(down.u, ArtifactTestInt8Weight) and down.v.dtype == jnp.bfloat16
    assert down.notes == ((1, "a"), 2.5, None, True) and type(down.notes[0]) is tuple
    text = "hello jax weights ."
    assert tok.encode(text) == tokenizer.encode(text)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, (2,), 0)
    assert _leftovers(tmp_path) == []


def test_loaded_logits_are_bit_identical(typed_params, dense_params, tmp_path, save, config):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 12)), jnp.int32)
    params = load_artifact(save(tmp_path / "art", typed_params)).params
    expected = _logits(config, typed_params, tokens)
    # the leaves are used
    assert not np.array_equal(expected, _logits(config, dense_params, tokens))
    np.testing.assert_array_equal(_logits(config, params, tokens), expected)


def test_load_model_recognises_artifact(typed_params, tmp_path, save, config):
    out = save(tmp_path / "art", typed_params)
    loaded = load_model(str(out))
    assert loaded.config == config and loaded.recipe == RECIPE and loaded.source == str(out)
    _assert_same_tree(typed_params, loaded.params)
    assert loaded.tokenizer.encode("hello world") == [3, 4]


def test_every_dtype_round_trips(dense_params, tmp_path, save):
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f16": rng.normal(size=(5,)).astype(np.float16),
        "bf16": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
        "i8": rng.integers(-128, 128, (4, 4)).astype(np.int8),
        "u8": rng.integers(0, 256, (7,)).astype(np.uint8),
        "i32": rng.integers(-1000, 1000, (2, 2)).astype(np.int32),
        "flags": rng.integers(0, 2, (3, 3)).astype(bool),
        "u32": rng.integers(0, 2**32, (2, 3), dtype=np.uint64).astype(np.uint32),  # as bytes
        "f8": rng.normal(size=(4,)).astype(ml_dtypes.float8_e4m3fn),  # as bytes
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 3), np.float16),
    }
    flat = dict(flatten(dense_params))  # the arrays ride on a kernel the config expects
    path = "layers_0/attn/v_proj/kernel"
    flat[path] = ArtifactTestAllDtypes(w=flat[path], **{k: jnp.asarray(v)
                                                         for k, v in arrays.items()})
    params = unflatten(flat)
    loaded = load_artifact(save(tmp_path / "art", params)).params
    _assert_same_tree(params, loaded)
    assert loaded["layers_0"]["attn"]["v_proj"]["kernel"].u32.dtype == jnp.uint32


def test_file_size_matches_param_bytes(typed_params, dense_params, tmp_path, save):
    out = save(tmp_path / "art", typed_params)
    data = (out / "model.safetensors").read_bytes()
    (header_len,) = pystruct.unpack("<Q", data[:8])
    assert len(data) - 8 - header_len == param_bytes(typed_params)
    assert param_bytes(typed_params) < param_bytes(dense_params)
    stored = read_safetensors(out / "model.safetensors")
    assert stored["layers_0/attn/q_proj/kernel/q"].dtype == np.int8
    assert stored["layers_1/mlp/down_proj/kernel/u/scale"].dtype == np.float16


# ----------------------------------------------------------------- atomic writes


def test_failed_write_leaves_nothing(typed_params, tmp_path, monkeypatch, save):
    def half_write(path, tensors, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "write_safetensors", half_write)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "art", typed_params)
    assert list(tmp_path.iterdir()) == []


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_overwrite_keeps_previous(typed_params, dense_params, tmp_path, monkeypatch,
                                         save):
    out = save(tmp_path / "art", dense_params)
    before = _snapshot(out)

    def failing_save(self, directory):
        Path(directory, "tokenizer.json").write_text("{")
        raise RuntimeError("tokenizer exploded")

    with monkeypatch.context() as patch:
        patch.setattr(Tokenizer, "save", failing_save)
        with pytest.raises(RuntimeError, match="tokenizer exploded"):
            save(out, typed_params)
    assert _snapshot(out) == before and _leftovers(tmp_path) == []

    real_rename = artifact.os.rename

    def rename(src, dst):  # moving the old artifact aside works, moving the new one in fails
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_rename(src, dst)

    from jaxopt_llm.io import atomic

    monkeypatch.setattr(artifact.os, "rename", rename)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # the two-rename fallback
    with pytest.raises(OSError, match="rename failed"):
        save(out, typed_params)
    assert _snapshot(out) == before and _leftovers(tmp_path) == []

    def exchange(a, b):
        raise OSError("exchange failed")

    monkeypatch.setattr(atomic, "exchange", exchange)
    with pytest.raises(OSError, match="exchange failed"):
        save(out, typed_params)
    assert _snapshot(out) == before and _leftovers(tmp_path) == []


def test_overwrite_previous_artifact(typed_params, dense_params, tmp_path, save):
    out = save(tmp_path / "art", dense_params, recipe=None)
    save(out, typed_params)
    loaded = load_artifact(out)
    params, recipe = loaded.params, loaded.recipe
    _assert_same_tree(typed_params, params)
    assert recipe == RECIPE and _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_empty_directory_is_used(dense_params, tmp_path, save):
    (tmp_path / "art").mkdir()
    save(tmp_path / "art", dense_params)
    assert is_artifact_dir(tmp_path / "art")


def test_refuses_user_directory(dense_params, tmp_path, save):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a jaxopt-llm artifact.*refusing to overwrite"):
        save(user, dense_params)
    assert (user / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


def test_refuses_artifact_with_foreign_files(dense_params, tmp_path, save):
    out = save(tmp_path / "art", dense_params)
    (out / "results.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"files it did not write \(\['results.csv'\]\)"):
        save(out, dense_params)
    assert (out / "results.csv").read_text() == "1,2"


def test_refuses_file_target(dense_params, tmp_path, save):
    target = tmp_path / "art"
    target.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        save(target, dense_params)
    assert target.read_text() == "x"


def test_unsaveable_values(dense_params, tmp_path, save):
    bad = ArtifactTestInt8Weight(q=jnp.zeros((2, 2), jnp.int8), scale=jnp.ones((1, 2), jnp.float16),
                                 offset=None, bits=8, shape=[2, 2])  # a list, not a tuple
    with pytest.raises(ValueError, match="shape.*static value \\[2, 2\\].*tuples"):
        save(tmp_path / "a", {"w": bad})
    with pytest.raises(ValueError, match="w: cannot save a list"):
        save(tmp_path / "b", {"w": [1, 2]})
    with pytest.raises(ValueError, match="recipe must be JSON data"):
        save(tmp_path / "c", dense_params, recipe={"x": object()})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- load errors


def _edit_json(directory: Path, edit) -> None:
    path = directory / "artifact.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("format_version"), "artifact.json: no format_version"),
        (lambda m: m.update(format_version=FORMAT_VERSION + 1),
         "written by a newer jaxopt-llm.*upgrade"),
        (lambda m: m.update(format_version="1"), "format_version must be a positive integer"),
        (lambda m: m.update(format_version=1.5), "format_version must be a positive integer"),
        (lambda m: m["leaves"]["layers_0/attn/q_proj/kernel"].update({"class": "Nope"}),
         r"unknown weight class 'Nope'; known classes: \[.*'ArtifactTestInt8Weight'"),
        (lambda m: m["tensors"]["norm/scale"].update(shape=[31]),
         r"tensor 'norm/scale' is float32\[32\] but artifact.json expects float32\[31\]"),
        (lambda m: m["tensors"]["norm/scale"].update(dtype="float16"),
         "tensor 'norm/scale' is float32.*expects float16"),
        (lambda m: m["leaves"]["layers_0/attn/q_proj/kernel"]["static"].pop("bits"),
         r"lacks fields \['bits'\]"),
        (lambda m: m["config"].update(hidden_sizes=3), "bad or missing model config"),
    ],
)
def test_bad_artifact_json(edit, message, typed_params, tmp_path, save):
    out = save(tmp_path / "art", typed_params)
    _edit_json(out, edit)
    with pytest.raises(ValueError, match=message):
        load_artifact(out)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["config"].update(num_layers=1),  # one block silently dropped, before
         r"artifact.json: \d+ tensors are not used by the config, e.g. \['layers_1/"),
        (lambda m: m["config"].update(num_layers=3),
         r"artifact.json: \d+ tensors the config needs are missing, e.g. \['layers_2/"),
        (lambda m: m["config"].update(hidden_size=40, head_dim=10),
         r"artifact.json: tensor '.*' has shape \(.*\) but the config expects"),
        (lambda m: m["config"].update(intermediate_size=64),
         r"tensor 'layers_0/mlp/down_proj/kernel' has shape \(48, 32\) but the config "
         r"expects \(64, 32\)"),
        (lambda m: m["leaves"].pop("layers_0/mlp/up_proj/kernel"),  # its tensors orphaned
         r"tensors the config needs are missing, e.g. \['layers_0/mlp/up_proj/kernel'\]"),
    ],
)
def test_config_is_checked_against_the_weights(edit, message, typed_params, tmp_path, save):
    out = save(tmp_path / "art", typed_params)
    _edit_json(out, edit)
    with pytest.raises(ValueError, match=message):
        load_artifact(out)


def test_config_check_covers_the_librarys_leaves(config, dense_params, tmp_path, save):
    """Quantized, low-rank and scale-wrapped leaves are checked by their dense shapes."""
    from jaxopt_llm.weights import LowRankWeight, QuantSpec, ScaledInputWeight, quantize_weight

    flat = dict(flatten(dense_params))
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    flat["layers_0/attn/o_proj/kernel"] = ScaledInputWeight(
        weight=quantize_weight(flat["layers_0/attn/o_proj/kernel"], spec),
        input_scale=jnp.ones((32,), jnp.float32))
    down = flat["layers_1/mlp/down_proj/kernel"]
    flat["layers_1/mlp/down_proj/kernel"] = LowRankWeight(u=down[:, :8], v=jnp.eye(8, 32))
    out = save(tmp_path / "art", unflatten(flat))
    assert isinstance(load_artifact(out).params["layers_0"]["attn"]["o_proj"]["kernel"],
                      ScaledInputWeight)
    _edit_json(out, lambda m: m["config"].update(intermediate_size=40))
    with pytest.raises(ValueError, match=r"'layers_0/mlp/down_proj/kernel' has shape "
                                         r"\(48, 32\) but the config expects \(40, 32\)"):
        load_artifact(out)
    _edit_json(out, lambda m: m["config"].update(intermediate_size=48))
    load_artifact(out)
    inner = "layers_0/attn/o_proj/kernel"  # a leaf's stored shape edited
    _edit_json(out, lambda m: m["leaves"][inner]["children"]["weight"]["static"].update(
        shape=[32, 16]))
    with pytest.raises(ValueError, match=r"leaf 'layers_0/attn/o_proj/kernel.*"
                                         r"(cannot be rebuilt|inconsistent|has shape)"):
        load_artifact(out)


def test_a_listed_file_that_is_gone_is_named(typed_params, tmp_path, save):
    out = save(tmp_path / "art", typed_params)
    (out / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"artifact.json: lists \['tokenizer.json'\] but the "
                                         r"directory lacks them"):
        load_artifact(out)


def test_a_damaged_tensor_is_named(typed_params, tmp_path, save):
    out = save(tmp_path / "art", typed_params)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (header_len,) = pystruct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    begin, _ = header["layers_0/attn/q_proj/kernel/q"]["data_offsets"]
    start = 8 + header_len + begin + 4
    data[start:start + 64] = bytes(b ^ 0x5A for b in data[start:start + 64])  # 64 bytes flipped
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor "
                                         r"'layers_0/attn/q_proj/kernel/q' is damaged"):
        load_artifact(out)


def test_missing_files_and_tensors(dense_params, tmp_path, save):
    with pytest.raises(ValueError, match="artifact.json: missing"):
        load_artifact(tmp_path)
    out = save(tmp_path / "art", dense_params)
    weights = out / "model.safetensors"
    tensors = {k: np.array(v) for k, v in read_safetensors(weights).items()}
    del tensors["norm/scale"]
    write_safetensors(weights, tensors)
    with pytest.raises(ValueError, match=r"tensors described in artifact.json are missing, "
                                         r"e.g. \['norm/scale'\]"):
        load_artifact(out)
    weights.unlink()
    with pytest.raises(ValueError, match="model.safetensors: missing"):
        load_artifact(out)


# ----------------------------------------------------------------- the library's own leaves


def _real_classes():
    weights = pytest.importorskip("jaxopt_llm.weights")
    if not hasattr(weights, "QuantizedWeight") or not hasattr(weights, "LowRankWeight"):
        pytest.skip("QuantizedWeight / LowRankWeight not available yet")
    from jaxopt_llm.weights import LowRankWeight, QuantSpec, quantize_weight

    return LowRankWeight, QuantSpec, quantize_weight


def test_real_weight_classes_logits(config, dense_params, tmp_path, save):
    LowRankWeight, QuantSpec, quantize_weight = _real_classes()
    q8 = QuantSpec(bits=8, symmetric=True, granularity="channel")
    q8g = QuantSpec(bits=8, symmetric=True, granularity="group", group_size=16)
    flat = dict(flatten(dense_params))
    # int8 codes keep the kernel's shape; packed codes would trip flax's param shape check.
    flat["layers_0/attn/q_proj/kernel"] = quantize_weight(flat["layers_0/attn/q_proj/kernel"], q8g)
    flat["layers_0/attn/k_proj/kernel"] = quantize_weight(
        flat["layers_0/attn/k_proj/kernel"], q8, act_bits=8)
    flat["embed_tokens/embedding"] = quantize_weight(flat["embed_tokens/embedding"], q8, axis=1)
    u, s, vt = np.linalg.svd(np.asarray(flat["layers_1/mlp/down_proj/kernel"]),
                             full_matrices=False)
    flat["layers_1/mlp/down_proj/kernel"] = LowRankWeight(
        u=quantize_weight(jnp.asarray(u * s), q8), v=quantize_weight(jnp.asarray(vt), q8))
    params = unflatten(flat)

    out = save(tmp_path / "art", params)
    loaded = load_artifact(out).params
    _assert_same_tree(params, loaded)
    assert loaded["layers_0"]["attn"]["k_proj"]["kernel"].zero_point is None
    assert loaded["layers_0"]["attn"]["k_proj"]["kernel"].act_bits == 8
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, 10)), jnp.int32)
    expected = _logits(config, params, tokens)
    assert not np.array_equal(expected, _logits(config, dense_params, tokens))
    np.testing.assert_array_equal(_logits(config, loaded, tokens), expected)


def test_real_packed_weights_round_trip(dense_params, tmp_path, save):
    LowRankWeight, QuantSpec, quantize_weight = _real_classes()
    rng = np.random.default_rng(2)
    q4 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    q3 = QuantSpec(bits=3, symmetric=True, granularity="channel")
    w = jnp.asarray(rng.normal(size=(48, 32)).astype(np.float32))  # down_proj's shape
    flat = dict(flatten(dense_params))
    flat["layers_0/mlp/down_proj/kernel"] = quantize_weight(w, q4)
    flat["layers_1/mlp/down_proj/kernel"] = LowRankWeight(u=quantize_weight(w[:, :16], q3),
                                                          v=quantize_weight(w[:16], q4))
    flat["layers_0/mlp/up_proj/kernel"] = flat["layers_0/mlp/up_proj/kernel"].astype(
        jnp.bfloat16)
    params = unflatten(flat)
    out = save(tmp_path / "art", params)
    loaded = load_artifact(out).params
    _assert_same_tree(params, loaded)
    packed = loaded["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert packed.qvalue.dtype == jnp.uint8 and packed.qvalue.shape == (24, 32)
    assert packed.zero_point is not None and type(packed.shape) is tuple
    np.testing.assert_array_equal(packed.materialize(), flat["layers_0/mlp/down_proj/kernel"]
                                  .materialize())
    np.testing.assert_array_equal(loaded["layers_1"]["mlp"]["down_proj"]["kernel"].materialize(),
                                  flat["layers_1/mlp/down_proj/kernel"].materialize())
    data = (out / "model.safetensors").read_bytes()
    (header_len,) = pystruct.unpack("<Q", data[:8])
    assert len(data) - 8 - header_len == param_bytes(params)
