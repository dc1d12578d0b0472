"""Fuzzing every file the project reads: GGUF and safetensors headers, `artifact.json`,
HF `config.json` and recipe files, damaged by random truncations, byte flips and field
edits (hypothesis). The only outcomes allowed are a correct result or one clear error
(ValueError / OSError / FloatingPointError, the errors the CLI prints as one line):
never another exception, a hang, or, for an artifact, a silently different number.

Bounded: a fixed number of examples per target (well under two minutes in all); on a
failure hypothesis prints the falsifying example and the blob that reproduces it
(`@reproduce_failure(...)`); examples are drawn afresh each run (no example database).
"""

import copy
import datetime
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gguf import TINY, tiny_llama_tensors, write_gguf
from test_hf_loading import CONFIG, _tensors

from jaxopt_llm.io.artifact import load_artifact, save_artifact
from jaxopt_llm.io.gguf_file import load_gguf
from jaxopt_llm.io.hf import load_hf_directory
from jaxopt_llm.io.safetensors_file import write_safetensors
from jaxopt_llm.models import forward, init_params
from jaxopt_llm.pipeline import read_recipe_file
from jaxopt_llm.plan import plan
from jaxopt_llm.recipes import load_recipe

CLEAR_ERRORS = (ValueError, OSError, FloatingPointError)
# JAXOPT_FUZZ_EXAMPLES=500 fuzzes deeper locally; CI runs the default.
FUZZ = settings(max_examples=int(os.environ.get("JAXOPT_FUZZ_EXAMPLES", "40")),
                deadline=datetime.timedelta(seconds=30), print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow], database=None)

# Values a field edit writes: wrong types, out-of-range numbers, non-finite floats, nesting.
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([10**12, -(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-2, 2), max_size=3), st.dictionaries(st.text(max_size=3),
                                                              st.integers(), max_size=2))


def _clear(err: BaseException) -> None:
    """An error is clear when the CLI prints it as one line: one of CLEAR_ERRORS, one line."""
    assert isinstance(err, CLEAR_ERRORS), f"{type(err).__name__}: {err}"
    assert str(err) and "\n" not in str(err).strip(), repr(str(err))


def _flip(data: bytes, positions: list[int], masks: list[int], limit: int) -> bytes:
    out = bytearray(data)
    for position, mask in zip(positions, masks, strict=False):
        out[position % limit] ^= mask
    return bytes(out)


def _damaged(data, raw: bytes, limit: int, max_flips: int, keep_up_to: int) -> bytes:
    """`raw` truncated (to at most `keep_up_to` bytes) or with 1..max_flips bytes of its
    first `limit` flipped, as hypothesis draws it."""
    if data.draw(st.booleans(), label="truncate"):
        return raw[:data.draw(st.integers(0, keep_up_to), label="keep")]
    count = data.draw(st.integers(1, max_flips), label="flips")
    positions = data.draw(st.lists(st.integers(0, 2**31), min_size=count, max_size=count))
    masks = data.draw(st.lists(st.integers(1, 255), min_size=count, max_size=count))
    return _flip(raw, positions, masks, limit)


def _paths(tree):
    """Every (path, value) of a JSON tree, containers included."""
    yield (), tree
    items = tree.items() if isinstance(tree, dict) else (
        enumerate(tree) if isinstance(tree, list) else ())
    for key, value in items:
        for path, inner in _paths(value):
            yield (key, *path), inner


def _edited(tree, path, value):
    tree = copy.deepcopy(tree)
    if not path:
        return value
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


# ---------------------------------------------------------------- artifact.json and tensors


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_config, tiny_params, word_tokenizer):
    """A w8 artifact of the tiny Llama and its logits on fixed tokens."""
    config = tiny_config(bos_token_id=1, eos_token_ids=(2,))
    config, params = load_recipe("w8")(config, tiny_params(config))
    directory = tmp_path_factory.mktemp("fuzz") / "artifact"
    save_artifact(directory, config=config, params=params, tokenizer=word_tokenizer,
                  recipe=None)
    return directory, _logits(config, params)


TOKENS = jnp.arange(12, dtype=jnp.int32).reshape(1, 12) % 8


def _logits(config, params) -> np.ndarray:
    return np.asarray(jax.jit(lambda p: forward(config, p, TOKENS)[0])(params))


# Config fields no weight can contradict: editing them makes a different, valid model (a
# user may mean to change the RoPE base or the context length), so only their validity is
# checked. Every other edit either fails clearly or loads the same numbers.
FREE_CONFIG_FIELDS = ("norm_eps", "rope_theta", "rope_scaling", "sliding_window",
                      "max_position_embeddings", "bos_token_id", "eos_token_ids", "model_type")


def _load_and_compare(directory, reference, same_numbers: bool = True) -> None:
    try:
        loaded = load_artifact(directory)
        logits = _logits(loaded.config, loaded.params)
    except BaseException as err:  # noqa: BLE001  (the oracle judges every outcome)
        _clear(err)
        return
    if same_numbers:
        np.testing.assert_array_equal(logits, reference)
    else:
        assert logits.shape == reference.shape


@FUZZ
@given(data=st.data())
def test_artifact_json_field_edits(artifact, tmp_path, data):
    directory, reference = artifact
    meta = json.loads((directory / "artifact.json").read_text())
    paths = [path for path, _ in _paths(meta)]
    path = data.draw(st.sampled_from(paths), label="field")
    value = data.draw(ODD_VALUES, label="value")
    target = tmp_path / "edited"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(directory, target)
    (target / "artifact.json").write_text(json.dumps(_edited(meta, path, value)))
    free = len(path) > 1 and path[0] == "config" and path[1] in FREE_CONFIG_FIELDS
    _load_and_compare(target, reference, same_numbers=not free)


@FUZZ
@given(data=st.data())
def test_artifact_files_truncated_or_flipped(artifact, tmp_path, data):
    directory, reference = artifact
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    name = data.draw(st.sampled_from(files), label="file")
    raw = (directory / name).read_bytes()
    target = tmp_path / "damaged"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(directory, target)
    damaged = _damaged(data, raw, len(raw), 8, max(len(raw) - 1, 0))
    (target / name).write_bytes(damaged)
    _load_and_compare(target, reference)


# ---------------------------------------------------------------- HF config.json and safetensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(CONFIG))
    write_safetensors(directory / "model.safetensors", _tensors(CONFIG))
    return directory


def _load_hf(directory) -> None:
    try:
        config, params = load_hf_directory(directory)
        logits = _logits(config, params)
    except BaseException as err:  # noqa: BLE001
        _clear(err)
        return
    assert logits.shape[-1] == config.vocab_size  # a loaded model may be a different one


@FUZZ
@given(data=st.data())
def test_hf_config_field_edits(hf_dir, tmp_path, data):
    key = data.draw(st.sampled_from(sorted(CONFIG) + ["rope_theta", "rms_norm_eps",
                                                      "head_dim", "max_position_embeddings"]))
    value = data.draw(ODD_VALUES, label="value")
    target = tmp_path / "hf"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(hf_dir, target)
    (target / "config.json").write_text(json.dumps({**CONFIG, key: value}))
    _load_hf(target)


@FUZZ
@given(data=st.data())
def test_safetensors_header_damage(hf_dir, tmp_path, data):
    raw = (hf_dir / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    damaged = _damaged(data, raw, header_end, 6, header_end + 16)
    target = tmp_path / "hf"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(hf_dir, target)
    (target / "model.safetensors").write_bytes(damaged)
    _load_hf(target)


# ---------------------------------------------------------------- GGUF headers


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    write_gguf(path, "llama", tiny_llama_tensors(), **TINY)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_gguf_header_damage(gguf_bytes, tmp_path, data):
    header = min(len(gguf_bytes), 2048)  # magic, version, counts, metadata, tensor infos
    damaged = _damaged(data, gguf_bytes, header, 6, header)
    path = tmp_path / "damaged.gguf"
    path.write_bytes(damaged)
    try:
        config, params, _ = load_gguf(path)
        _logits(config, params)
    except BaseException as err:  # noqa: BLE001
        _clear(err)


# ---------------------------------------------------------------- recipe files

RECIPE = {"name": "fuzzed", "stages": [{"name": "quantize", "rules": [
    {"match": ".*kernel", "op": "quantize", "options": {"bits": 4, "granularity": "group",
                                                       "group_size": 16}}]}]}


@FUZZ
@given(data=st.data())
def test_recipe_file_damage(tmp_path, tiny_config, data):
    paths = [path for path, _ in _paths(RECIPE)]
    how = data.draw(st.sampled_from(["edit", "flip", "truncate"]), label="how")
    text = json.dumps(RECIPE)
    if how == "edit":
        path = data.draw(st.sampled_from(paths), label="field")
        text = json.dumps(_edited(RECIPE, path, data.draw(ODD_VALUES, label="value")))
    elif how == "truncate":
        text = text[:data.draw(st.integers(0, len(text) - 1), label="keep")]
    raw = text.encode()
    if how == "flip":
        positions = data.draw(st.lists(st.integers(0, 2**31), min_size=1, max_size=4))
        raw = _flip(raw, positions, [data.draw(st.integers(1, 255))] * len(positions), len(raw))
    file = tmp_path / "recipe.json"
    file.write_bytes(raw)
    try:
        recipe = read_recipe_file(file)
        config = tiny_config()
        plan(recipe, config, _tiny_shapes(config))
    except BaseException as err:  # noqa: BLE001
        _clear(err)


def _tiny_shapes(config):
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
