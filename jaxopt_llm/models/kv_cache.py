"""How the KV cache stores keys and values: float (the activation dtype) or int8.

`ModelConfig.kv_cache` chooses. With "int8" every key and value vector of one token and
one kv head gets its own scale `s = max|x| / 127` (float32) and int8 codes
`round(x / s)` — the per-token, per-head granularity of KIVI-style and vLLM/llama.cpp
8-bit caches, which keeps an outlier token from costing the others their precision. A
cached slot is written once and never re-rounded, so decoding over an int8 cache sees
exactly the keys and values that a prefill with the same rounding sees; prefill and
evaluation therefore apply the same rounding (`round_trip`), and perplexity under
`kv_cache="int8"` is the cost of the int8 cache, measured without decoding token by
token. Storage per token and kv head: D bytes + 4 (scale) instead of 4·D (float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxopt_llm.weights.quantized import quantize_absmax_int8

KV_CACHE_KINDS = ("float", "int8")


def check_kv_cache(kind: str, name: str = "kv_cache") -> None:
    """Raise a ValueError naming `name` unless `kind` is one of `KV_CACHE_KINDS`.

    Args:
        kind: the requested cache storage.
        name: what it belongs to, for the message.

    Example:
        >>> check_kv_cache("int8")
    """
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"{name} must be one of {', '.join(KV_CACHE_KINDS)}, got {kind!r}")


@struct.dataclass
class Int8Slots:
    """One layer's keys or values in int8: codes (B, S, Hkv, D), scales (B, S, Hkv, 1).

    Example:
        >>> slots = Int8Slots.zeros((1, 4, 2, 8))
        >>> slots.codes.dtype, slots.scale.shape, slots.read(jnp.float32).shape
        (dtype('int8'), (1, 4, 2, 1), (1, 4, 2, 8))
    """

    codes: jax.Array
    scale: jax.Array

    @staticmethod
    def zeros(shape: tuple[int, ...]) -> Int8Slots:
        """An empty cache of `shape` (B, S, Hkv, D).

        Args:
            shape: (batch, slots, kv heads, head dim).

        Returns:
            Zero codes and zero scales.
        """
        return Int8Slots(codes=jnp.zeros(shape, jnp.int8),
                         scale=jnp.zeros((*shape[:-1], 1), jnp.float32))

    @property
    def shape(self) -> tuple[int, ...]:
        """(B, S, Hkv, D), as a float cache's."""
        return self.codes.shape

    def write(self, x: jax.Array, slot: jax.Array | int) -> Int8Slots:
        """`x` (B, T, Hkv, D) quantized into slots slot..slot+T-1.

        Args:
            x: this step's keys or values.
            slot: the first slot written.

        Returns:
            The updated cache.
        """
        codes, scale = quantize(x)
        start = (0, slot, 0, 0)
        return Int8Slots(codes=jax.lax.dynamic_update_slice(self.codes, codes, start),
                         scale=jax.lax.dynamic_update_slice(self.scale, scale, start))

    def read(self, dtype: jnp.dtype) -> jax.Array:
        """The cached vectors, dequantized to `dtype` (B, S, Hkv, D).

        Args:
            dtype: the attention's dtype.

        Returns:
            codes · scale.
        """
        return (self.codes.astype(jnp.float32) * self.scale).astype(dtype)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per token and head: x (..., D) → (int8 codes (..., D), float32 scales (..., 1)).

    Args:
        x: keys or values.

    Returns:
        (codes, scale) with codes in [-127, 127] and scale max|x|/127 (0 for a zero vector).

    Example:
        >>> codes, scale = quantize(jnp.array([[254.0, -127.0, 1.0]]))
        >>> codes.tolist(), scale.tolist()
        ([[127, -64, 0]], [[2.0]])
    """
    return quantize_absmax_int8(x)


def round_trip(x: jax.Array) -> jax.Array:
    """x as an int8 cache returns it: quantized per token and head, dequantized.

    Args:
        x: keys or values (..., D).

    Returns:
        The dequantized values, in x's dtype.

    Example:
        >>> round_trip(jnp.array([[254.0, -127.0, 1.0]])).tolist()
        [[254.0, -128.0, 0.0]]
    """
    codes, scale = quantize(x)
    return (codes.astype(jnp.float32) * scale).astype(x.dtype)


def empty_cache(kind: str, shape: tuple[int, ...], dtype) -> tuple:
    """One layer's empty (keys, values) of `shape` (B, S, Hkv, D) in storage `kind`.

    Args:
        kind: one of `KV_CACHE_KINDS`.
        shape: (batch, slots, kv heads, head dim).
        dtype: the float cache's dtype (the activation dtype).

    Returns:
        (keys, values): arrays, or `Int8Slots`.

    Example:
        >>> keys, values = empty_cache("int8", (1, 4, 2, 8), jnp.float32)
        >>> type(keys).__name__
        'Int8Slots'
    """
    check_kv_cache(kind)
    if kind == "int8":
        return Int8Slots.zeros(shape), Int8Slots.zeros(shape)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def cache_bytes(cache: tuple) -> int:
    """Bytes the cache holds (codes and scales for int8).

    Args:
        cache: per layer (keys, values).

    Returns:
        The total size in bytes.

    Example:
        >>> cache_bytes((empty_cache("int8", (1, 4, 2, 8), jnp.float32),))  # 2 × (64 + 32)
        192
    """
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(cache))


# One layer's cache: keys, values, each (B, S, Hkv, D) arrays or `Int8Slots`. A head-major
# (B, Hkv, S, D) layout was measured 10% slower for decode on CPU
# (benchmarks/bench_foundation.py), so slots lead.
KVCache = tuple[jax.Array | Int8Slots, jax.Array | Int8Slots]
