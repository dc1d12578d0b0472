"""Compiled generation programs kept on disk, so a warm start skips tracing entirely.

XLA's persistent compilation cache (`compile_cache`) skips compiling, but each start still
traces and lowers the model's prefill and decode programs (about 1.5 s of Python for
SmolLM2's 30 unrolled layers) before it can look the executable up. This cache stores
the compiled executables themselves (`jax.experimental.serialize_executable`) under a
key that covers everything the program depends on:

* the program's name and static arguments (the model config, the sampling settings);
* the input tree (its structure, including the static fields of weight leaves such as
  `QuantizedWeight`) and every leaf's shape and dtype;
* the JAX and jaxlib versions, the backend, device kind and device, the CPU's instruction sets;
* every environment variable that changes what is traced (`JAXOPT_LLM_*`, `XLA_FLAGS`);
* the package's own source: a digest of every `.py` file and the native extension.

A hit loads the executable (~0.4 s for SmolLM2 against ~2 s to trace, lower and fetch it
from XLA's cache). Anything unexpected while loading (a truncated file, another jaxlib's
format) counts as a miss: the program is compiled again and the entry rewritten.
Programs are cached only for inputs on one device (sharded programs compile as before).

It is on wherever the compilation cache is (the CLI by default; `compile_cache.configure`
from Python), in a `programs` folder beside XLA's entries, and off with it
(`JAXOPT_LLM_COMPILE_CACHE=off` or `--no-compile-cache`). Entries are written atomically.
A loaded executable is only as trustworthy as the directory it came from: the cache lives
in the user's own cache directory, like XLA's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jaxlib

from jaxopt_llm import hardware

_STATE: dict[str, Path | None] = {"directory": None}
FOLDER = "programs"


def enable(directory: Path | None) -> None:
    """Keep programs under `directory / "programs"` from now on (None turns the cache off).

    Args:
        directory: the compilation cache's directory, or None.

    Example:
        >>> enable(None); active_directory() is None
        True
    """
    _STATE["directory"] = None if directory is None else Path(directory) / FOLDER


def active_directory() -> Path | None:
    """Where programs are kept, or None when the cache is off.

    Returns:
        The folder (created on the first store), or None.

    Example:
        >>> enable(None); active_directory() is None
        True
    """
    return _STATE["directory"]


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the package's Python sources and its native extension, by path.

    Returns:
        A hex digest that changes whenever any of the package's code does.

    Example:
        >>> len(source_digest())
        64
    """
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".so")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _environment() -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in os.environ.items()
                  if k.startswith("JAXOPT_LLM_") or k == "XLA_FLAGS")


def program_key(name: str, static: Any, arguments: Any) -> str:
    """The cache key of one program: what it is, what it is called with, and where.

    Args:
        name: the program's name (e.g. "prefill").
        static: its static arguments (hashable, with a stable repr: dataclasses, tuples).
        arguments: its abstract inputs (a tree of `jax.ShapeDtypeStruct`).

    Returns:
        A hex digest.

    Example:
        >>> import jax.numpy as jnp
        >>> a = program_key("f", (1,), [jax.ShapeDtypeStruct((2,), jnp.float32)])
        >>> b = program_key("f", (1,), [jax.ShapeDtypeStruct((3,), jnp.float32)])
        >>> a != b
        True
    """
    leaves, tree = jax.tree_util.tree_flatten(arguments)
    device = _device_of(arguments)
    parts = (
        name, repr(static), str(tree), [(tuple(a.shape), str(a.dtype)) for a in leaves],
        jax.__version__, jaxlib.__version__, device.platform, device.device_kind, device.id,
        sorted(hardware.cpu_flags()), _environment(), source_digest(),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _device_of(arguments: Any) -> Any:
    """The one device the inputs live on (the default device when none is placed yet)."""
    for leaf in jax.tree_util.tree_leaves(arguments):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return next(iter(sharding.device_set))
    return jax.devices()[0]


def single_device(arguments: Any) -> bool:
    """True when every input lives on one device (or has no placement yet).

    Args:
        arguments: a tree of `jax.ShapeDtypeStruct` (or arrays).

    Returns:
        Whether the program may be cached.

    Example:
        >>> import jax.numpy as jnp
        >>> single_device([jax.ShapeDtypeStruct((2,), jnp.float32)])
        True
    """
    for leaf in jax.tree_util.tree_leaves(arguments):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and len(sharding.device_set) != 1:
            return False
    return True


def load(key: str, device: Any = None) -> Any | None:
    """The compiled program stored under `key`, or None (missing or unreadable).

    Args:
        key: from `program_key`.
        device: the device to load it onto (default: the first device).

    Returns:
        A `jax.stages.Compiled`, or None.

    Example:
        >>> enable(None); load("0" * 64) is None  # the cache is off: nothing to load
        True
    """
    directory = active_directory()
    if directory is None:
        return None
    path = directory / f"{key}.bin"
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    try:
        from jax.experimental.serialize_executable import deserialize_and_load

        payload, in_tree, out_tree = pickle.loads(blob)
        return deserialize_and_load(payload, in_tree, out_tree,
                                    execution_devices=[device or jax.devices()[0]])
    except Exception:  # noqa: BLE001 - any damaged or foreign entry is a miss
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def store(key: str, compiled: Any) -> bool:
    """Write `compiled` under `key` (atomically); False when it cannot be serialized.

    Args:
        key: from `program_key`.
        compiled: a `jax.stages.Compiled` compiled in this process (see `fresh_compile`).

    Returns:
        Whether an entry was written.

    Example:
        >>> enable(None); store("0" * 64, None)  # the cache is off: nothing is written
        False
    """
    directory = active_directory()
    if directory is None:
        return False
    try:
        from jax.experimental.serialize_executable import serialize

        blob = pickle.dumps(serialize(compiled))
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{key}.", suffix=".tmp",
                                         delete=False) as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, directory / f"{key}.bin")
        return True
    except Exception:  # noqa: BLE001 - the cache is an optimisation, never an error
        with contextlib.suppress(Exception):
            os.unlink(handle.name)  # type: ignore[possibly-undefined]
        return False


def _forget_compiled_programs() -> None:
    """Drop JAX's in-process compilation memo, which may hold executables that came from
    XLA's persistent cache; the whole cache is cleared where the memo is not reachable."""
    from jax._src.interpreters import pxla

    memo = getattr(pxla, "_cached_compilation", None)
    if memo is not None and hasattr(memo, "cache_clear"):
        memo.cache_clear()
    else:
        jax.clear_caches()


@contextlib.contextmanager
def fresh_compile() -> Iterator[None]:
    """Compile afresh inside this block: neither XLA's persistent cache nor JAX's memo.

    An executable that XLA's cache loaded cannot be serialized again whole on CPU (its
    fused kernels are missing from the copy, and running it fails with NOT_FOUND), so a
    program that is about to be stored is compiled from scratch. JAX decides once per
    process whether the persistent cache is in use, so the decision is reset around the
    block.

    Returns:
        A context manager (nothing is bound by `as`).

    Example:
        >>> import jax.numpy as jnp
        >>> with fresh_compile():
        ...     compiled = jax.jit(jnp.sin).lower(1.0).compile()
        >>> float(compiled(0.0))
        0.0
    """
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    _forget_compiled_programs()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def cached_compile(name: str, static: Any, arguments: Any,
                   compile_: Callable[[], Any]) -> tuple[Any, str]:
    """`compile_()`'s program, from the cache when an entry exists.

    Args:
        name: the program's name.
        static: its static arguments (part of the key).
        arguments: its abstract inputs (part of the key).
        compile_: lowers and compiles the program (called on a miss).

    Returns:
        (the compiled program, "hit" | "miss" | "off").

    Example:
        >>> import jax.numpy as jnp
        >>> enable(None)
        >>> program, source = cached_compile("sin", (), [jax.ShapeDtypeStruct((), jnp.float32)],
        ...                                  lambda: jax.jit(jnp.sin).lower(1.0).compile())
        >>> source, float(program(0.0))
        ('off', 0.0)
    """
    if active_directory() is None or not single_device(arguments):
        return compile_(), "off"
    key = program_key(name, static, arguments)
    program = load(key, _device_of(arguments))
    if program is not None:
        return program, "hit"
    with fresh_compile():
        program = compile_()
    store(key, program)
    return program, "miss"
