"""Build of the optional native extension `jaxopt_llm._native_gemv` (csrc/).

Everything else about the package is in pyproject.toml. The extension holds XLA FFI
handlers for weight-only quantized matmuls (jaxopt_llm.weights.native) and causal-prefix
attention (jaxopt_llm.models.native_attention); it needs a C++17
compiler and the XLA FFI headers that jaxlib ships (`jax.ffi.include_dir()`). It is
optional: without a compiler or headers the package installs without it, and
`jaxopt_llm.native_extension.load()` says why.

The headers are found, in order, in `$JAXOPT_LLM_FFI_INCLUDE`, through an importable jax
(a non-isolated build), or in the site-packages of the interpreter running the build: pip's
isolated build environment hides them from `sys.path` but `sysconfig` still names them, and
the jaxlib found there is the one the extension will be loaded into. `JAXOPT_LLM_NO_NATIVE=1`
skips the extension.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
FFI_HEADER = Path("xla") / "ffi" / "api" / "ffi.h"


def _has_ffi_header(include: Path) -> bool:
    return (include / FFI_HEADER).is_file()


def _site_dirs() -> list[Path]:
    dirs = []
    for key in ("purelib", "platlib"):
        try:
            dirs.append(Path(sysconfig.get_paths()[key]))
        except KeyError:
            pass
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
    except AttributeError:  # some virtualenv versions lack it
        pass
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user:
        dirs.append(Path(user))
    dirs += [Path(p) for p in sys.path if p]
    seen, unique = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def find_ffi_include() -> tuple[Path | None, str]:
    """The XLA FFI include directory and where it came from (or None and why not)."""
    override = os.environ.get("JAXOPT_LLM_FFI_INCLUDE")
    if override:
        path = Path(override)
        if _has_ffi_header(path):
            return path, f"$JAXOPT_LLM_FFI_INCLUDE={path}"
        return None, f"$JAXOPT_LLM_FFI_INCLUDE={path} has no {FFI_HEADER}"
    try:
        import jax.ffi

        path = Path(jax.ffi.include_dir())
        if _has_ffi_header(path):
            return path, f"jax.ffi.include_dir() = {path}"
        import_reason = f"jax.ffi.include_dir() = {path} has no {FFI_HEADER}"
    except Exception as error:  # noqa: BLE001 - any failure just means "look elsewhere"
        import_reason = f"jax not importable ({type(error).__name__}: {error})"
    for directory in _site_dirs():
        path = directory / "jaxlib" / "include"
        if _has_ffi_header(path):
            return path, f"{path} (site-packages; {import_reason})"
    return None, f"no XLA FFI headers: {import_reason}, and no jaxlib/include in site-packages"


def native_extensions() -> list[Extension]:
    """The native extension, or none (with the reason printed) when it cannot be built."""
    if os.environ.get("JAXOPT_LLM_NO_NATIVE", "") not in ("", "0"):
        print("jaxopt-llm: JAXOPT_LLM_NO_NATIVE is set: building without the native kernels")
        return []
    include, origin = find_ffi_include()
    if include is None:
        print(f"jaxopt-llm: building without the native kernels: {origin}")
        return []
    print(f"jaxopt-llm: native kernels with the XLA FFI headers from {origin}")
    return [
        Extension(
            "jaxopt_llm._native_gemv",
            sources=["csrc/gemv.cc", "csrc/nm_gemv.cc", "csrc/attention.cc", "csrc/module.cc"],
            depends=["csrc/gemv.h", "csrc/gemv_panel.inc", "csrc/nm_gemv.h", "csrc/attention.h",
                     "csrc/parallel_for.h"],
            include_dirs=["csrc"],
            # -isystem: the FFI headers are not warning-clean under Python's -Wall
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-isystem",
                                str(include)],
            language="c++",
            optional=True,  # no compiler, a failed compile: install without it
        )
    ]


setup(ext_modules=native_extensions())
