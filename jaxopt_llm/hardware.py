"""What the machine can do fast: CPU instruction-set extensions and the JAX backend.

Execution paths are chosen from these facts, never from a constant measured on one
host (the same kind of machine is AVX-512 with BF16 one day, AVX2-only the next).
"""

from __future__ import annotations

import functools
import pathlib

import jax

# Extensions that decide a formulation: native bf16 dot products (AVX-512 BF16, AMX),
# int8 dot products (VNNI), and the vector width.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                  "amx_int8", "fma")


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing or unreadable).

    Args:
        cpuinfo: the file to read (Linux's /proc/cpuinfo).

    Returns:
        The set of flags of the first processor listed.

    Example:
        >>> isinstance(cpu_flags(), frozenset)
        True
    """
    try:
        text = pathlib.Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bfloat16 matmuls run natively here (AVX-512 BF16 or AMX on x86).

    Args:
        flags: CPU flags to judge (default: this machine's).

    Returns:
        True where bf16 dot-product instructions exist.

    Example:
        >>> native_bf16(frozenset({"avx2"})), native_bf16(frozenset({"avx512_bf16"}))
        (False, True)
    """
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_prefill_pays(backend: str, flags: frozenset[str] | None = None) -> bool:
    """Whether prefill-sized bfloat16 matmuls beat float32 on this backend and CPU.

    On GPUs and TPUs bf16 is the fast path; on a CPU only where it runs natively (on an
    AVX2-only host XLA's bf16 GEMM measured 0.69× float32, on an AVX-512-BF16 host 1.36×).

    Args:
        backend: `jax.default_backend()` ("cpu", "gpu", "tpu", ...).
        flags: CPU flags to judge (default: this machine's).

    Returns:
        Whether `compute="auto"` picks bfloat16 for ≥ 128-row matmuls.

    Example:
        >>> bf16_prefill_pays("gpu"), bf16_prefill_pays("cpu", frozenset({"avx2"}))
        (True, False)
    """
    return backend != "cpu" or native_bf16(flags)


def describe() -> dict[str, object]:
    """The facts `jaxopt-llm info` reports: flags that matter and the paths they pick.

    Returns:
        A JSON-ready dict.

    Example:
        >>> sorted(describe())
        ['bf16_prefill', 'cpu_flags']
    """
    flags = cpu_flags()
    return {
        "cpu_flags": sorted(flags & set(REPORTED_FLAGS)),
        "bf16_prefill": bf16_prefill_pays(jax.default_backend(), flags),
    }
