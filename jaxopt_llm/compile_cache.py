"""A persistent XLA compilation cache for the command line, on by default.

A `jaxopt-llm` command compiles the same programs on every run (the forward pass of a
model at a few padded lengths, a decode step); XLA can keep compiled executables on
disk and load them on the next start instead of compiling again. The CLI turns this on
for every command, in the user's cache directory (`$XDG_CACHE_HOME/jaxopt-llm/xla`, by
default `~/.cache/jaxopt-llm/xla`). `JAXOPT_LLM_COMPILE_CACHE` overrides it: a
directory to use instead, or `off` (also `0`, `no`, `false`) to compile every time; an
already configured JAX cache (`JAX_COMPILATION_CACHE_DIR`) is left as it is. The cache
only skips compilation: results are the same program's. Beside XLA's entries, the
compiled generation programs themselves are kept (`program_cache`), so a warm start
skips tracing too.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "JAXOPT_LLM_COMPILE_CACHE"
_OFF = ("off", "0", "no", "false")


def default_directory() -> Path:
    """Where the cache lives by default: `$XDG_CACHE_HOME/jaxopt-llm/xla`.

    Returns:
        The directory (not created).

    Example:
        >>> default_directory().parts[-2:]
        ('jaxopt-llm', 'xla')
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxopt-llm" / "xla"


def configure(enabled: bool = True) -> dict[str, object]:
    """Turn the persistent compilation cache on (unless disabled), before compiling.

    Args:
        enabled: False (the CLI's `--no-compile-cache`) leaves JAX's setting as it is.

    Returns:
        What is in effect, JSON-ready: {"compile_cache": the directory or None,
        "compile_cache_source": why}.

    Raises:
        ValueError: when `JAXOPT_LLM_COMPILE_CACHE` names a path that is not a directory
            and cannot be made one.

    Example:
        >>> configure(enabled=False)["compile_cache"] is None or True
        True
    """
    import jax  # here, not at import: the CLI checks paths before JAX starts

    from jaxopt_llm import program_cache

    configured = jax.config.jax_compilation_cache_dir
    setting = os.environ.get(ENV, "").strip()
    if configured:
        wanted = enabled and setting.lower() not in _OFF
        program_cache.enable(Path(configured) if wanted else None)
        return {"compile_cache": str(configured),
                "compile_cache_source": "set by JAX_COMPILATION_CACHE_DIR"}
    if not enabled or setting.lower() in _OFF:
        program_cache.enable(None)
        why = "--no-compile-cache" if not enabled else f"{ENV}={setting}"
        return {"compile_cache": None, "compile_cache_source": f"off ({why})"}
    directory = Path(setting).expanduser() if setting else default_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{ENV}: cannot use {str(directory)!r} as the compilation cache "
                         f"directory ({err.strerror or err}); give a writable directory, "
                         f"or 'off'") from None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # keep every program: start-up is many small compiles (JAX's default keeps ≥ 1 s ones)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    program_cache.enable(directory)
    return {"compile_cache": str(directory),
            "compile_cache_source": f"{ENV}" if setting else "default (user cache directory)"}
