"""Building blocks shared by the model families: projections, norms, RoPE (attention
is `jaxopt_llm.models.attention`).

Every projection goes through `jaxopt_llm.weights.linear`, so a model never
knows whether its weights are dense, quantized, low-rank or sparse.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_llm.weights import attend, embed, linear


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
