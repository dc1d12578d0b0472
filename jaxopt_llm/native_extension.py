"""The optional native extension `jaxopt_llm._native_gemv` (csrc/, built by setup.py).

It holds XLA FFI handlers: weight-only quantized GEMV kernels (`jaxopt_llm.weights.native`)
and causal-prefix attention (`jaxopt_llm.models.native_attention`). `load()` imports it and
registers every handler with `jax.ffi.register_ffi_target` once, so either user can call its
targets without importing the other (the model code must not import `jaxopt_llm.weights`).

`JAXOPT_LLM_NATIVE=off` (or 0, no, false) keeps every caller on its pure-JAX path; each
caller checks `disabled()` itself, because loading is cached and the setting is not.
`sharded_program()` turns them off too while a program for several devices is traced: the
kernels have no partitioning rule, so XLA would gather their operands onto every device.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from types import ModuleType

import jax

# JAXOPT_LLM_NATIVE=off (or 0, no, false) turns every native kernel off.
ENV = "JAXOPT_LLM_NATIVE"
_OFF = ("off", "0", "no", "false")
_SHARDED = contextvars.ContextVar("jaxopt_llm_sharded_program", default=False)


@functools.cache
def load() -> tuple[ModuleType | None, str]:
    """The extension with all its FFI targets registered (once), or None and why not.

    Returns:
        (module, "") when loaded, e.g. `module.best_variant()` then says "avx512", "avx2"
        or "scalar";
        (None, reason) otherwise, e.g. "extension not built: No module named ...".

    Example:
        >>> module, reason = load()
        >>> module is not None or reason.startswith(("extension not built", "FFI"))
        True
    """
    try:
        from jaxopt_llm import _native_gemv
    except ImportError as error:
        return None, f"extension not built: {error}"
    try:
        for name, capsule in _native_gemv.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except Exception as error:  # noqa: BLE001 - any failure means "not available"
        return None, f"FFI registration failed: {type(error).__name__}: {error}"
    return _native_gemv, ""


def disabled() -> str | None:
    """The `JAXOPT_LLM_NATIVE` setting when it turns the native kernels off, else None.

    Returns:
        The lower-cased setting ("off", "0", "no" or "false") or None (kernels allowed).

    Example:
        >>> disabled() is None or disabled() in ("off", "0", "no", "false")
        True
    """
    setting = os.environ.get(ENV, "").strip().lower()
    return setting if setting in _OFF else None


@contextlib.contextmanager
def sharded_program() -> Iterator[None]:
    """Inside this block (tracing a program whose inputs span several devices) every
    caller takes its pure-JAX path (`in_sharded_program()` is True).

    Returns:
        A context manager (nothing is bound by `as`).

    Example:
        >>> with sharded_program():
        ...     in_sharded_program()
        True
        >>> in_sharded_program()
        False
    """
    token = _SHARDED.set(True)
    try:
        yield
    finally:
        _SHARDED.reset(token)


def in_sharded_program() -> bool:
    """True inside `sharded_program()`: callers keep their pure-JAX path.

    Returns:
        Whether a program for several devices is being traced.

    Example:
        >>> in_sharded_program()
        False
    """
    return _SHARDED.get()
