"""Attention: which keys each query sees, and softmax(q·kᵀ/√D)·v in three formulations.

- `dot_product_attention`: the scores (B, Hkv, G, T, S) in one tensor. Decoding over a
  cache (T is 1 or a few), encoders, and the reference for the others.
- `blocked_prefix_attention`: a causal prefix (prefill, evaluation, training) cut into at
  most `PREFILL_QUERY_BLOCKS` query blocks, each scoring only the keys up to its own end.
  Differentiable; the score tensor is still O(T²/B) per block.
- `flash_prefix_attention`: keys in blocks with a running (online) softmax, as in
  FlashAttention (Dao et al., 2022, arXiv:2205.14135) and Rabe & Staats (2021,
  arXiv:2112.05682): per query block, m = running max, l = running Σexp, acc = running
  Σexp·v, rescaled by exp(m_old − m_new) when the max grows; the output is acc / l. Memory
  is linear in T (one (block × block) score tile per kv head), key blocks after a query
  block's end are never visited, and the program size does not grow with T (a scan over
  query blocks, a while loop over key blocks).
- a native CPU kernel of the same algorithm (`jaxopt_llm.models.native_attention`, built
  by `pip install -e .`), where it is built and the inputs are float32 (or bfloat16,
  widened to float32 for it) on a CPU.

`prefix_attention` chooses: the native kernel where it runs, else the pure-JAX flash path
from `FLASH_MIN_LENGTH` tokens on, else the blocked path. Under differentiation every
choice computes its value and gradient with the blocked path (a custom VJP), so training
is unchanged and only inference takes the linear-memory paths.

A query that sees no key (a padding row) gets an output of zeros on the flash and native
paths and the mean of the values it was offered on the dense ones; its logits are
meaningless either way, and no other position sees it.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

from jaxopt_llm import native_extension
from jaxopt_llm.models.kv_cache import KVCache
from jaxopt_llm.models.kv_cache import round_trip as kv_round_trip
from jaxopt_llm.models.native_attention import (
    native_prefix_attention,
    prefix_attention_status,
)

PREFILL_QUERY_BLOCKS = 8  # at most this many query blocks in a blocked causal prefill
FLASH_BLOCK = 256  # query and key block of the pure-JAX flash path
FLASH_MIN_LENGTH = 1024  # prefixes at least this long take the pure-JAX flash path
# JAXOPT_LLM_ATTENTION=blocked|flash|native forces one prefix path (native falls back to
# flash where the kernel does not run); unset or "auto" chooses as above.
ATTENTION_ENV = "JAXOPT_LLM_ATTENTION"
PREFIX_PATHS = ("auto", "blocked", "flash", "native")
_NEG = float(jnp.finfo(jnp.float32).min)


def attention_mask(
    key_valid: jax.Array, cache_index: jax.Array | int, num_queries: int,
    sliding_window: int | None = None,
) -> jax.Array:
    """Which keys each query may see: (B, T, S) bool.

    Args:
        key_valid: (B, S), True where a slot holds a real token (False for padding or
            unwritten cache slots).
        cache_index: the slot of query 0; query t sits in slot cache_index + t and sees
            slots at or before its own.
        num_queries: T.
        sliding_window: if set, a query sees fewer than this many slots back.

    Returns:
        The mask (B, T, S).

    Example:
        >>> attention_mask(jnp.ones((1, 3), bool), 0, 3)[0].astype(int).tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    num_keys = key_valid.shape[1]
    query_slot = cache_index + jnp.arange(num_queries)[:, None]  # (T, 1)
    key_slot = jnp.arange(num_keys)[None, :]  # (1, S)
    allowed = key_slot <= query_slot
    if sliding_window is not None:
        allowed &= query_slot - key_slot < sliding_window
    return allowed[None] & key_valid[:, None, :]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
) -> jax.Array:
    """Grouped-query attention.

    Args:
        q: (B, T, H, D) queries.
        k / v: (B, S, Hkv, D) keys and values, H a multiple of Hkv (query head h uses kv
            head h // (H // Hkv)).
        mask: (B, T, S), True where a query may see a key.

    Returns:
        (B, T, H, D), softmax(q·kᵀ/√D) · v with masked scores left out.

    Example:
        >>> q = k = v = jnp.ones((1, 2, 2, 4))
        >>> dot_product_attention(q, k, v, jnp.ones((1, 2, 2), bool)).shape
        (1, 2, 2, 4)
    """
    batch, num_queries, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    group = num_heads // num_kv
    q = q.reshape(batch, num_queries, num_kv, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, num_queries, num_heads, head_dim)


def blocked_prefix_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, min_block: int = 128
) -> jax.Array:
    """Attention for queries in slots 0..T-1 (prefill, evaluation) over keys 0..T-1.

    Same result as `dot_product_attention`, but queries are cut into blocks and
    a block scores only the keys up to its own end: causal masking makes the
    rest zero anyway, so this skips about half the score FLOPs and keeps the
    score tensor small for long prompts.

    Args:
        q / k / v / mask: as `dot_product_attention`, with S = T.
        min_block: the smallest query block.

    Returns:
        (B, T, H, D).

    Example:
        >>> q = k = v = jnp.ones((1, 4, 2, 4))
        >>> mask = attention_mask(jnp.ones((1, 4), bool), 0, 4)
        >>> blocked_prefix_attention(q, k, v, mask, min_block=2).shape
        (1, 4, 2, 4)
    """
    length = q.shape[1]
    block = max(min_block, -(-length // PREFILL_QUERY_BLOCKS))
    outputs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        outputs.append(dot_product_attention(q[:, start:end], k[:, :end], v[:, :end],
                                             mask[:, start:end, :end]))
    return jnp.concatenate(outputs, axis=1)


def flash_prefix_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int | None = None
) -> jax.Array:
    """Causal-prefix attention with keys in blocks and an online softmax (pure JAX).

    Args:
        q: (B, T, H, D) queries.
        k / v: (B, T, Hkv, D) keys and values of the same T slots.
        mask: (B, T, T) bool; False for every key after its query (a causal prefix).
        block: query and key block length (T is padded up to a multiple of it); default
            `FLASH_BLOCK`.

    Returns:
        (B, T, H, D); a query that sees no key gets zeros.

    Example:
        >>> q = k = v = jnp.ones((1, 5, 2, 4))
        >>> mask = attention_mask(jnp.ones((1, 5), bool), 0, 5)
        >>> flash_prefix_attention(q, k, v, mask, block=2).shape
        (1, 5, 2, 4)
    """
    block = block or FLASH_BLOCK
    batch, length, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    group = num_heads // num_kv
    blocks = -(-length // block)
    padded = blocks * block - length
    if padded:
        pad = ((0, 0), (0, padded), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        mask = jnp.pad(mask, ((0, 0), (0, padded), (0, padded)))
    dtype = v.dtype
    # head-major: (B, Hkv, G, T, D) queries, (B, Hkv, T, D) keys and values
    qh = (q * (1.0 / math.sqrt(head_dim))).reshape(
        batch, blocks * block, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
    kh, vh = (x.transpose(0, 2, 1, 3) for x in (k, v))

    def query_block(i: jax.Array) -> jax.Array:
        start = i * block
        qb = jax.lax.dynamic_slice_in_dim(qh, start, block, axis=3)
        rows = jax.lax.dynamic_slice_in_dim(mask, start, block, axis=1)  # (B, bq, T)

        def key_block(j, carry):
            running_max, running_sum, acc = carry
            kb, vb = (jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=2)
                      for x in (kh, vh))
            seen = jax.lax.dynamic_slice_in_dim(rows, j * block, block, axis=2)[:, None, None]
            scores = jnp.einsum("bkgtd,bksd->bkgts", qb, kb).astype(jnp.float32)
            scores = jnp.where(seen, scores, _NEG)
            new_max = jnp.maximum(running_max, scores.max(-1))
            probs = jnp.where(seen, jnp.exp(scores - new_max[..., None]), 0.0)
            rescale = jnp.exp(running_max - new_max)
            acc = acc * rescale[..., None] + jnp.einsum(
                "bkgts,bksd->bkgtd", probs.astype(dtype), vb).astype(jnp.float32)
            return new_max, running_sum * rescale + probs.sum(-1), acc

        shape = (batch, num_kv, group, block)
        init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, head_dim), jnp.float32))
        _, total, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        return (acc / jnp.where(total > 0, total, 1.0)[..., None]).astype(dtype)

    out = jax.lax.map(query_block, jnp.arange(blocks))  # (n, B, Hkv, G, block, D)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, blocks * block, num_heads, head_dim)
    return out[:, :length]


# Query dtypes the native kernel takes (bfloat16 is widened to float32 for it: XLA's CPU
# bfloat16 einsums with bfloat16 results ran ~5x slower than with float32 ones).
_NATIVE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _forced_path() -> str:
    """JAXOPT_LLM_ATTENTION, checked: one of `PREFIX_PATHS` ("auto" when unset)."""
    forced = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if forced not in PREFIX_PATHS:
        raise ValueError(f"{ATTENTION_ENV} must be one of {', '.join(PREFIX_PATHS)}, "
                         f"got {forced!r}")
    return forced


def prefix_path(length: int, dtype: jnp.dtype) -> str:
    """Which formulation `prefix_attention` runs for a prefix of `length` tokens.

    Args:
        length: T.
        dtype: the queries' dtype (the native kernel computes in float32; bfloat16
            queries, keys and values are widened for it and the output rounded back).

    Returns:
        "native", "flash" or "blocked" (JAXOPT_LLM_ATTENTION may force one).

    Example:
        >>> prefix_path(16, jnp.float32) in PREFIX_PATHS
        True
    """
    forced = _forced_path()
    if forced == "blocked":
        return "blocked"
    if forced in ("auto", "native") and jnp.dtype(dtype) in _NATIVE_DTYPES \
            and not native_extension.in_sharded_program() and prefix_attention_status()[0]:
        return "native"
    if forced in ("flash", "native") or length >= FLASH_MIN_LENGTH:
        return "flash"
    return "blocked"


def describe_prefix_attention() -> str:
    """One line for `jaxopt-llm info`: which prefix-attention path runs here, and why.

    Returns:
        e.g. "native avx512 prefix attention kernel (threads as XLA's CPU pool) for float32
        and bfloat16; other dtypes: pure-JAX flash (blocks of 256) from 1024 tokens, blocked
        below".

    Example:
        >>> isinstance(describe_prefix_attention(), str)
        True
    """
    try:
        forced = _forced_path()
    except ValueError as error:
        return str(error)
    available, why = prefix_attention_status()
    flash = f"pure-JAX flash (blocks of {FLASH_BLOCK})"
    if forced == "blocked":
        return f"blocked ({ATTENTION_ENV}=blocked)"
    if forced == "flash":
        return f"{flash} ({ATTENTION_ENV}=flash)"
    fallback = f"{flash} from {FLASH_MIN_LENGTH} tokens, blocked below"
    if available:
        return f"native {why} for float32 and bfloat16; other dtypes: {fallback}"
    return f"{fallback} (native kernel: {why})"


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Causal-prefix attention by the formulation `prefix_path` picks (see the module).

    Args:
        q / k / v / mask: as `flash_prefix_attention`.

    Returns:
        (B, T, H, D).

    Example:
        >>> q = k = v = jnp.ones((1, 3, 2, 4))
        >>> prefix_attention(q, k, v, attention_mask(jnp.ones((1, 3), bool), 0, 3)).shape
        (1, 3, 2, 4)
    """
    path = prefix_path(q.shape[1], q.dtype)
    if path == "blocked":
        return blocked_prefix_attention(q, k, v, mask)
    return _linear_memory_attention(q, k, v, mask, path)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear_memory_attention(q, k, v, mask, path):
    if path == "native":
        dtype = q.dtype
        wide = (x.astype(jnp.float32) for x in (q, k, v))
        out = native_prefix_attention(*wide, mask)
        if out is not None:
            return out.astype(dtype)
    return flash_prefix_attention(q, k, v, mask)


def _linear_memory_forward(q, k, v, mask, path):
    # differentiated: value and gradient of the blocked (dense, differentiable) path
    out, pullback = jax.vjp(lambda q, k, v: blocked_prefix_attention(q, k, v, mask), q, k, v)
    return out, pullback


def _linear_memory_backward(path, pullback, cotangent):
    return (*pullback(cotangent), None)


_linear_memory_attention.defvjp(_linear_memory_forward, _linear_memory_backward)


def attend_with_cache(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
    cache: KVCache | None, cache_index: jax.Array | int, kv_cache: str = "float",
) -> tuple[jax.Array, KVCache | None]:
    """Write k, v (B, T, Hkv, D) into the cache (if any) and attend; returns (out, cache).

    A static cache_index of 0 means the queries are a prefix (prefill or no
    cache): keys past T are invisible, so `prefix_attention` applies.
    With kv_cache="int8" keys and values are rounded as the int8 cache stores them
    (`kv_cache.Int8Slots`) whether or not a cache is passed, so a prefill, an evaluation
    and a decode over the cache all see the same keys and values.

    Args:
        q: (B, T, H, D) queries.
        k / v: (B, T, Hkv, D) this step's keys and values.
        mask: (B, T, S) from `attention_mask`.
        cache: (keys, values), each (B, S, Hkv, D) arrays or `Int8Slots`, or None.
        cache_index: the slot k and v are written at.
        kv_cache: the cache's storage (`ModelConfig.kv_cache`).

    Returns:
        (attention output (B, T, H, D), the updated cache or None).

    Example:
        >>> q = k = v = jnp.ones((1, 3, 2, 4))
        >>> out, cache = attend_with_cache(q, k, v, attention_mask(jnp.ones((1, 3), bool), 0, 3),
        ...                                None, 0)
        >>> out.shape, cache
        ((1, 3, 2, 4), None)
    """
    prefix = isinstance(cache_index, int) and cache_index == 0
    int8 = kv_cache == "int8"
    if cache is not None:
        start = (0, cache_index, 0, 0)
        cache = tuple(
            slots.write(x, cache_index) if int8
            else jax.lax.dynamic_update_slice(slots, x.astype(slots.dtype), start)
            for slots, x in zip(cache, (k, v), strict=True))
    if prefix:
        length = q.shape[1]
        if int8:
            k, v = kv_round_trip(k), kv_round_trip(v)
        return prefix_attention(q, k, v, mask[:, :, :length]), cache
    keys, values = (slots.read(q.dtype) for slots in cache) if int8 else cache
    return dot_product_attention(q, keys, values, mask), cache
