"""Building blocks shared by the model families: projections, norms, RoPE, attention.

Every projection goes through `jaxopt_llm.weights.linear`, so a model never
knows whether its weights are dense, quantized, low-rank or sparse.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_llm.models.kv_cache import round_trip as kv_round_trip
from jaxopt_llm.weights import attend, embed, linear

# One layer: keys, values, each (B, S, Hkv, D). A head-major (B, Hkv, S, D) layout was
# measured 10% slower for decode on CPU (benchmarks/bench_foundation.py), so slots lead.
KVCache = tuple[jax.Array, jax.Array]
PREFILL_QUERY_BLOCKS = 8  # at most this many query blocks in a causal prefill


def _weight(module: nn.Module, name: str, init, shape: tuple[int, ...]):
    """The stored weight as is (a typed leaf's arrays have other shapes than the dense
    weight, which `self.param`'s shape check would reject); initialised when absent."""
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init, shape, jnp.float32)


class Linear(nn.Module):
    """y = linear(x, kernel) + bias, kernel stored (d_in, d_out) like flax.linen.Dense."""

    features: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _weight(self, "kernel", nn.initializers.normal(0.02),
                         (x.shape[-1], self.features))
        y = linear(x, kernel)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + jnp.broadcast_to(bias, y.shape)
        return y


class Embed(nn.Module):
    """Token table (vocab, d); `attend` reuses it as a tied output head."""

    num_embeddings: int
    features: int

    def setup(self) -> None:
        """Bind the stored table as is (a typed leaf's arrays have other shapes)."""
        self.embedding = _weight(self, "embedding", nn.initializers.normal(0.02),
                                 (self.num_embeddings, self.features))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return embed(self.embedding, ids)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: x (..., d) against the table → logits (..., vocab).

        Args:
            x: the hidden states.

        Returns:
            The logits.
        """
        return attend(x, self.embedding)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis (in float32), scaled by `scale` (D,)."""
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * jnp.broadcast_to(scale.astype(jnp.float32), normed.shape)).astype(x.dtype)


class LayerNorm(nn.Module):
    """Layer norm over the last axis (in float32), with `scale` and `bias` (D,)."""
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        scale, bias = (jnp.broadcast_to(p.astype(jnp.float32), normed.shape) for p in (scale, bias))
        return (normed * scale + bias).astype(x.dtype)


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict | None
) -> jax.Array:
    """RoPE inverse frequencies (head_dim // 2,), with Llama-3 or linear scaling.

    Llama-3 scaling ("The Llama 3 Herd of Models", 2024): long wavelengths are
    divided by `factor`, short ones kept, and the band between is interpolated.

    Args:
        head_dim: the attention head size D.
        theta: RoPE's base (10000 for Llama 2).
        scaling: `ModelConfig.rope_scaling_dict` (rope_type default, linear, llama3 or
            freq_factors), or None.

    Returns:
        theta^(-2i/D) for i < D/2, scaled as asked.

    Example:
        >>> rope_inverse_frequencies(4, 10000.0, None).tolist()
        [1.0, 0.009999999776482582]
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return jnp.where(medium, smoothed, scaled)
    if kind == "freq_factors":  # GGUF rope_freqs tensor: per-frequency divisors
        return inv_freq / jnp.asarray(scaling["factors"], jnp.float32)
    raise ValueError(
        f"rope scaling type {kind!r} is not supported; "
        "supported: default, linear, llama3, freq_factors"
    )


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions (B, T) -> cos, sin (B, T, head_dim) in the rotate-half layout of HF Llama.

    Args:
        positions: integer positions (B, T).
        inv_freq: `rope_inverse_frequencies` (D/2,).

    Returns:
        (cos, sin), each (B, T, D), the D/2 angles repeated twice.

    Example:
        >>> cos, sin = rope_cos_sin(jnp.zeros((1, 3), jnp.int32), jnp.ones(2))
        >>> cos.shape, float(cos[0, 0, 0])
        ((1, 3, 4), 1.0)
    """
    inv_freq = jnp.expand_dims(inv_freq, tuple(range(positions.ndim)))  # (1, 1, D/2)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, D/2)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, H, D) rotated by position; cos/sin (B, T, D).

    Args:
        x: queries or keys (B, T, H, D).
        cos / sin: from `rope_cos_sin`.

    Returns:
        The rotated x, in x's dtype (computed in float32).

    Example:
        >>> x = jnp.ones((1, 1, 1, 2))
        >>> apply_rope(x, jnp.zeros((1, 1, 2)), jnp.ones((1, 1, 2))).tolist()  # a 90° turn
        [[[[-1.0, 1.0]]]]
    """
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)  # rotate in float32 whatever the compute dtype
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


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


def causal_prefix_attention(
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
        >>> causal_prefix_attention(q, k, v, mask, min_block=2).shape
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


def attend_with_cache(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
    cache: KVCache | None, cache_index: jax.Array | int, kv_cache: str = "float",
) -> tuple[jax.Array, KVCache | None]:
    """Write k, v (B, T, Hkv, D) into the cache (if any) and attend; returns (out, cache).

    A static cache_index of 0 means the queries are a prefix (prefill or no
    cache): keys past T are invisible, so the blocked causal path applies.
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
        return causal_prefix_attention(q, k, v, mask[:, :, :length]), cache
    keys, values = (slots.read(q.dtype) for slots in cache) if int8 else cache
    return dot_product_attention(q, keys, values, mask), cache
