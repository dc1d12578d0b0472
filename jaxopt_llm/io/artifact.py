"""Artifacts: a transformed model saved as one directory that reloads exactly.

Layout of an artifact directory::

    artifact.json        format_version, jaxopt_llm version, config, recipe, extra,
                         `tensors` (name -> dtype, shape, sha256 of the stored bytes) and
                         `leaves` (typed weight leaves)
    model.safetensors    every array, in its own dtype (packed uint8 stays uint8)
    tokenizer.json       \
    tokenizer_meta.json  / written by Tokenizer.save

Tensor names are the "/"-joined parameter path; a typed leaf's children add their
field name (`layers_0/attn/q_proj/kernel/qvalue`, and for a nested leaf
`.../kernel/u/qvalue`). `leaves` maps each typed leaf's path to
`{"class", "static", "children"}` where a child is `{"tensor": name}`, `null`, or a
nested leaf description; plain parameters are the tensors no leaf refers to.
Dtypes safetensors cannot name (uint32, float8, ...) are stored as their raw bytes,
uint8 with a trailing itemsize axis, and marked `"stored_as": "bytes"`.

Loading checks every tensor's sha256 (a damaged tensor is named) and the config against
the weights (every tensor used, every one the config needs present, dense shapes equal).

Writing is atomic: everything goes to a hidden sibling directory that is fsynced and then
swapped into place (`io.atomic`: an exchange rename where the OS has one), so the path
names either the old artifact or the new at every moment; a crashed save's leftovers are
removed by the next save or load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import tree
from jaxopt_llm.io import atomic
from jaxopt_llm.io.loaded import LoadedModel
from jaxopt_llm.io.params import check_against_config, expected_shapes
from jaxopt_llm.io.safetensors_file import read_safetensors, write_safetensors
from jaxopt_llm.models import ModelConfig
from jaxopt_llm.weights import WeightLeaf, is_weight_leaf, leaf_classes

FORMAT_VERSION = 1
ARTIFACT_FILE = "artifact.json"
WEIGHTS_FILE = "model.safetensors"
# Dtypes model.safetensors stores natively (safetensors_file's table); others go as bytes.
_NATIVE = frozenset(
    {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
     "bool"}
)


def is_artifact_dir(path: str | Path) -> bool:
    """True when `path` is a directory holding an `artifact.json`.

    Args:
        path: any path.

    Returns:
        Whether it is an artifact directory.

    Example:
        >>> is_artifact_dir("/nonexistent")
        False
    """
    path = Path(path)
    return path.is_dir() and (path / ARTIFACT_FILE).is_file()


# --------------------------------------------------------------------------- save


def _version() -> str | None:
    try:
        return importlib.metadata.version("jaxopt-llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _static_value(value: Any, where: str) -> Any:
    """A static field as JSON (tuples become lists; load turns lists back into tuples)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return [_static_value(v, where) for v in value]
    raise ValueError(
        f"{where}: static value {value!r} of type {type(value).__name__} cannot be saved; "
        "static fields must be int, float, str, bool, None or tuples of those"
    )


def _describe(node: Any, path: str, arrays: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Record `node`'s arrays in `arrays` and return its JSON description."""
    if node is None:
        return None
    if is_weight_leaf(node):
        name = type(node).__name__
        if leaf_classes().get(name) is not type(node):
            raise ValueError(
                f"{path}: weight class {type(node).__qualname__} shares the name {name!r} with "
                "another registered class; artifacts identify classes by name, so rename one"
            )
        if not dataclasses.is_dataclass(node):
            raise ValueError(f"{path}: weight class {name} is not a (flax.struct) dataclass")
        static: dict[str, Any] = {}
        children: dict[str, Any] = {}
        for field in dataclasses.fields(node):
            if not field.init:
                continue
            value = getattr(node, field.name)
            where = f"{path}/{field.name}"
            if field.metadata.get("pytree_node", True):
                children[field.name] = _describe(value, where, arrays)
            else:
                static[field.name] = _static_value(value, f"{where} ({name})")
        return {"class": name, "static": static, "children": children}
    if isinstance(node, (jax.Array, np.ndarray, np.generic)):
        arrays[path] = np.asarray(node)
        return {"tensor": path}
    raise ValueError(
        f"{path}: cannot save a {type(node).__name__}; parameters must be arrays or "
        "weight leaves (subclasses of jaxopt_llm.weights.WeightLeaf)"
    )


def _digest(array: np.ndarray) -> str:
    """sha256 of an array's bytes as stored (C order): artifacts record one per tensor."""
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def _encode(array: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    info: dict[str, Any] = {"dtype": array.dtype.name, "shape": list(array.shape)}
    if array.dtype.name in _NATIVE:
        info["sha256"] = _digest(array)
        return array, info
    info["stored_as"] = "bytes"
    raw = np.ascontiguousarray(array).reshape(array.shape + (1,))
    stored = raw.view(np.uint8).reshape(array.shape + (array.dtype.itemsize,))
    info["sha256"] = _digest(stored)
    return stored, info


def _json_data(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON data (dicts, lists, str, numbers): {err}") from None
    return value


def check_target(out_dir: Path) -> bool:
    """Whether `out_dir` holds a previous artifact `save_artifact` may replace.

    Args:
        out_dir: the artifact's directory (it need not exist).

    Returns:
        True for a previous artifact, False for nothing or an empty directory.

    Raises:
        ValueError: a file, or a non-empty directory that is not (only) an artifact.

    Example:
        >>> check_target(Path("never-written"))
        False
    """
    if not out_dir.exists() and not out_dir.is_symlink():
        return False
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory; choose a directory path "
                         "for the artifact")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return False
    previous = None
    if (out_dir / ARTIFACT_FILE).is_file():
        try:
            previous = json.loads((out_dir / ARTIFACT_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            previous = None
    if not isinstance(previous, dict) or "format_version" not in previous:
        raise ValueError(
            f"{out_dir} is a non-empty directory that is not a jaxopt-llm artifact "
            f"(contains {entries[:5]}); refusing to overwrite it. Choose a new or empty "
            "directory"
        )
    ours = {ARTIFACT_FILE, WEIGHTS_FILE, *previous.get("files", ())}
    foreign = [name for name in entries if name not in ours]
    if foreign:
        raise ValueError(
            f"{out_dir} holds a previous artifact plus files it did not write ({foreign[:5]}); "
            "refusing to delete them. Move them away or choose another directory"
        )
    return True


def save_artifact(
    out_dir: str | Path,
    *,
    config: ModelConfig,
    params: Any,
    tokenizer: Any,
    recipe: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write config, params (typed leaves included), tokenizer and recipe to `out_dir`.

    Atomic: a previous artifact at `out_dir` is replaced only once the new one is
    complete; a non-empty directory that is not an artifact is never touched.

    Args:
        out_dir: the artifact directory.
        config: the model's config.
        params: the parameter tree (every array in its own dtype; typed leaves described
            by class name and static fields).
        tokenizer: the tokenizer, or None (then none is saved).
        recipe: the recipe that made the params (`Recipe.to_dict()`), or None.
        extra: provenance (source model, dense bytes, training settings, …).

    Returns:
        `out_dir` as a Path.

    Example:
        >>> import jax, pathlib, tempfile
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> config = ModelConfig.tiny()
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "tiny"
        >>> path = save_artifact(out, config=config, params=init_params(config, jax.random.key(0)),
        ...                      tokenizer=None, recipe=None)
        >>> load_artifact(path).config == config
        True
    """
    out_dir = Path(out_dir)
    replace = check_target(out_dir)
    arrays: dict[str, np.ndarray] = {}
    leaves: dict[str, Any] = {}
    for path, leaf in tree.flatten(params, strict=True).items():
        description = _describe(leaf, path, arrays)
        if description is None:
            raise ValueError(f"{path}: a parameter is None; drop it from the tree instead")
        if "class" in description:
            leaves[path] = description
    stored, tensors = {}, {}
    for name, array in arrays.items():
        stored[name], tensors[name] = _encode(array)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "jaxopt_llm_version": _version(),
        "config": config.to_dict(),
        "recipe": _json_data(recipe, "recipe"),
        "extra": _json_data(extra, "extra"),
        "tensors": tensors,
        "leaves": leaves,
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale(out_dir)  # a crashed earlier save's leftovers (and its old version)
    replace = check_target(out_dir)
    tmp = atomic.sibling(out_dir, "tmp")
    try:
        tmp.mkdir()
        write_safetensors(tmp / WEIGHTS_FILE, stored,
                          metadata={"format": "jaxopt-llm", "format_version": str(FORMAT_VERSION)})
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta["files"] = sorted(p.name for p in tmp.iterdir()) + [ARTIFACT_FILE]
        (tmp / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        atomic.fsync_tree(tmp)
        if replace:
            atomic.replace_dir(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)  # also replaces an empty directory
        atomic.fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- load


def _rebuild(desc: Any, where: str, arrays: dict[str, jax.Array], used: set[str],
             source: Path) -> Any:
    if desc is None:
        return None
    if not isinstance(desc, dict):
        raise ValueError(f"{source}: leaf {where!r} has a malformed description {desc!r}")
    if "tensor" in desc:
        name = desc["tensor"]
        if not isinstance(name, str) or name not in arrays:
            raise ValueError(f"{source}: leaf {where!r} refers to tensor {name!r}, which is not "
                             "described under 'tensors'")
        used.add(name)
        return arrays[name]
    known = leaf_classes()
    name = desc.get("class")
    if not isinstance(name, str) or name not in known:
        raise ValueError(
            f"{source}: leaf {where!r} has unknown weight class {name!r}; known classes: "
            f"{sorted(known)} (import the module that registers it before loading)"
        )
    klass = known[name]
    static = desc.get("static", {})
    children = desc.get("children", {})
    if not isinstance(static, dict) or not isinstance(children, dict):
        raise ValueError(f"{source}: leaf {where!r} ({name}): 'static' and 'children' must "
                         f"be objects, got {type(static).__name__} and "
                         f"{type(children).__name__}")
    fields = {f.name: f for f in dataclasses.fields(klass) if f.init}
    stored = {**{k: "static" for k in static}, **{k: "child" for k in children}}
    for field_name, kind in stored.items():
        field = fields.get(field_name)
        if field is None:
            raise ValueError(f"{source}: leaf {where!r}: class {name} has no field "
                             f"{field_name!r} (fields: {sorted(fields)})")
        if field.metadata.get("pytree_node", True) != (kind == "child"):
            raise ValueError(f"{source}: leaf {where!r}: field {field_name!r} of {name} is "
                             f"stored as {kind} but the class declares it otherwise")
    required = [f for f, v in fields.items()
                if v.default is dataclasses.MISSING and v.default_factory is dataclasses.MISSING]
    missing = [f for f in required if f not in stored]
    if missing:
        raise ValueError(f"{source}: leaf {where!r} ({name}) lacks fields {missing}")
    kwargs = {k: tree.freeze(v) for k, v in static.items()}  # JSON lists → tuples
    for field_name, child in children.items():
        kwargs[field_name] = _rebuild(child, f"{where}/{field_name}", arrays, used, source)
    try:
        return klass(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: leaf {where!r} ({name}) cannot be rebuilt from what is "
                         f"stored: {err}") from None


def _dense_shape(leaf: Any, path: str, source: Path,
                 expected: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape of the dense weight a stored leaf stands for (shapes only, no compute).

    A user's leaf that only defines `linear` is traced on an input of the config's width."""
    if not is_weight_leaf(leaf):
        return tuple(leaf.shape)
    if type(leaf).materialize is WeightLeaf.materialize and expected and len(expected) == 2:
        x = jax.ShapeDtypeStruct((1, expected[0]), jnp.float32)
        try:
            return (expected[0], *jax.eval_shape(lambda w, x: w.linear(x), leaf, x).shape[1:])
        except Exception as err:  # noqa: BLE001  (any failure to trace it is the answer)
            raise ValueError(f"{source}: leaf {path!r} ({type(leaf).__name__}) does not take "
                             f"the {expected[0]} inputs the config expects: {err}") from None
    try:
        return tuple(jax.eval_shape(lambda w: w.materialize(), leaf).shape)
    except Exception as err:  # a damaged leaf: any failure to even trace it
        raise ValueError(f"{source}: leaf {path!r} ({type(leaf).__name__}) is inconsistent "
                         f"with its stored arrays: {type(err).__name__}: {err}") from None


def _read_tensors(directory: Path, described: dict[str, Any], source: Path) -> dict[str, Any]:
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{weights}: missing; an artifact stores its arrays there")
    raw = read_safetensors(weights)
    missing = sorted(set(described) - set(raw))
    if missing:
        raise ValueError(f"{weights}: {len(missing)} tensors described in {source.name} are "
                         f"missing, e.g. {missing[:5]}")
    unexpected = sorted(set(raw) - set(described))
    if unexpected:
        raise ValueError(f"{weights}: {len(unexpected)} tensors are not described in "
                         f"{source.name}, e.g. {unexpected[:5]}")
    arrays = {}
    for name, info in described.items():
        try:
            if not isinstance(info["dtype"], str) or not isinstance(info["shape"], list):
                raise TypeError
            dtype = jnp.dtype(info["dtype"])
            shape = tuple(info["shape"])
            if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
                raise TypeError
        except (KeyError, TypeError):
            raise ValueError(f"{source}: tensor {name!r} has a malformed entry {info!r}; "
                             "expected a dtype name and a list of non-negative integer "
                             "dimensions") from None
        array = raw[name]
        as_bytes = info.get("stored_as") == "bytes"
        want_dtype = np.dtype(np.uint8) if as_bytes else dtype
        want_shape = shape + (dtype.itemsize,) if as_bytes else shape
        if want_shape == () and array.shape == (1,):
            array = array.reshape(())  # write_safetensors' ascontiguousarray stores 0-d as (1,)
        if array.dtype != want_dtype or array.shape != want_shape:
            raise ValueError(
                f"{weights}: tensor {name!r} is {array.dtype}{list(array.shape)} but "
                f"{source.name} expects {want_dtype}{list(want_shape)}"
            )
        digest = info.get("sha256")  # artifacts from before digests have none
        if digest is not None and _digest(array) != digest:
            raise ValueError(f"{weights}: tensor {name!r} is damaged (its sha256 differs from "
                             f"the one {source.name} recorded); re-create the artifact")
        if as_bytes:
            array = np.ascontiguousarray(array).view(dtype).reshape(shape)
        arrays[name] = jnp.asarray(array)
    return arrays


def load_artifact(directory: str | Path) -> LoadedModel:
    """Read an artifact written by `save_artifact`.

    Typed leaves are rebuilt by class name (`leaf_classes()`); arrays come back as jax
    arrays in their stored dtype.

    Args:
        directory: the artifact directory (holding artifact.json and model.safetensors).

    Returns:
        A `LoadedModel` (the same type `load_model` returns) with the recipe, provenance
        (`extra`), format version and writer version; `tokenizer` is None if none was saved.

    Example:
        >>> loaded = load_artifact("smollm2-w8")  # doctest: +SKIP
        >>> loaded.config.num_layers, loaded.recipe["name"]  # doctest: +SKIP
        (30, 'w8')
    """
    from jaxopt_llm.io.tokenizer import TOKENIZER_FILE, load_tokenizer_dir

    directory = Path(directory)
    try:
        atomic.clean_stale(directory)  # restores the last version after a crashed swap
    except OSError:
        pass  # a read-only location: nothing to clean
    source = directory / ARTIFACT_FILE
    if not source.is_file():
        raise ValueError(f"{source}: missing; expected a directory written by save_artifact")
    try:
        meta = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{source}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: expected a JSON object")
    version = meta.get("format_version")
    if version is None:
        raise ValueError(f"{source}: no format_version; expected an integer (this jaxopt-llm "
                         f"writes {FORMAT_VERSION})")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{source}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source}: format_version {version} was written by a newer jaxopt-llm "
            f"({meta.get('jaxopt_llm_version')}); this one reads up to {FORMAT_VERSION}; upgrade"
        )
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: bad or missing model config ({err})") from None
    described = meta.get("tensors")
    leaves = meta.get("leaves")
    if not isinstance(described, dict) or not isinstance(leaves, dict):
        raise ValueError(f"{source}: expected 'tensors' and 'leaves' objects")
    arrays = _read_tensors(directory, described, source)
    used: set[str] = set()
    flat = {path: _rebuild(desc, path, arrays, used, source) for path, desc in leaves.items()}
    for name, array in arrays.items():
        if name not in used:
            flat[name] = array
    expected = expected_shapes(config)  # presence first, then shapes in the model's order
    check_against_config(config, {p: expected.get(p, ()) for p in flat}, str(source))
    traced: dict[Any, tuple[int, ...]] = {}  # blocks repeat: one trace per kind of leaf
    for path, shape in expected.items():
        leaf = flat[path]
        key = (jax.tree_util.tree_structure(leaf), shape, tuple(
            (a.shape, a.dtype) for a in jax.tree_util.tree_leaves(leaf)))
        if key not in traced:
            traced[key] = _dense_shape(leaf, path, source, shape)
        actual = traced[key]
        if actual != shape:
            check_against_config(config, {**expected, path: actual}, str(source))
    listed = meta.get("files") if isinstance(meta.get("files"), list) else []
    missing = [name for name in listed if not (directory / str(name)).is_file()]
    if missing:
        raise ValueError(f"{source}: lists {missing} but the directory lacks them; the "
                         "artifact is incomplete (re-create it)")
    tokenizer = load_tokenizer_dir(directory) if (directory / TOKENIZER_FILE).is_file() else None
    return LoadedModel(config=config, params=tree.unflatten(flat), tokenizer=tokenizer,
                       source=str(directory), recipe=meta.get("recipe"), extra=meta.get("extra"),
                       format_version=version,
                       jaxopt_llm_version=meta.get("jaxopt_llm_version"))
