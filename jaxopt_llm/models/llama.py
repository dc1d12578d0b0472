"""The Llama family: Llama 2/3, Mistral, Qwen2, SmolLM2.

Pre-norm decoder ("LLaMA: Open and Efficient Foundation Language Models",
Touvron et al., 2023): RMSNorm, rotary positions, grouped-query attention,
SwiGLU MLP, optionally tied embeddings. Qwen2 adds biases on q/k/v; Mistral
adds a sliding attention window; Llama 3 rescales RoPE frequencies.

Parameter tree (kernels are (d_in, d_out)):
  embed_tokens/embedding             (V, D)
  layers_{i}/input_norm/scale        (D,)
  layers_{i}/attn/{q,k,v,o}_proj/kernel [+ bias: q/k/v if qkv_bias, o if o_bias]
  layers_{i}/post_attention_norm/scale
  layers_{i}/mlp/{gate,up,down}_proj/kernel
  norm/scale
  lm_head/kernel                     (D, V), only when embeddings are untied
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxopt_llm.models.attention import attend_with_cache
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.models.kv_cache import KVCache
from jaxopt_llm.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rope_inverse_frequencies,
)
from jaxopt_llm.weights.base import as_logits


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE: q/k/v/o projections (`Linear`s)."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache: KVCache | None, cache_index):
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = Linear(heads * head_dim, cfg.qkv_bias, name="q_proj")(x)
        k = Linear(kv_heads * head_dim, cfg.qkv_bias, name="k_proj")(x)
        v = Linear(kv_heads * head_dim, cfg.qkv_bias, name="v_proj")(x)
        q = apply_rope(q.reshape(batch, length, heads, head_dim), cos, sin)  # (B, T, H, D)
        k = apply_rope(k.reshape(batch, length, kv_heads, head_dim), cos, sin)  # (B, T, Hkv, D)
        v = v.reshape(batch, length, kv_heads, head_dim)
        out, cache = attend_with_cache(q, k, v, mask, cache, cache_index, cfg.kv_cache)
        out = out.reshape(batch, length, heads * head_dim)
        return Linear(cfg.hidden_size, cfg.o_bias, name="o_proj")(out), cache


class MLP(nn.Module):
    """SwiGLU MLP: down_proj(silu(gate_proj(x)) · up_proj(x))."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = Linear(cfg.intermediate_size, cfg.mlp_bias, name="gate_proj")(x)
        up = Linear(cfg.intermediate_size, cfg.mlp_bias, name="up_proj")(x)
        return Linear(cfg.hidden_size, cfg.mlp_bias, name="down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    """One decoder layer; runnable alone on given hidden states (calibration, layer-wise passes)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache: KVCache | None = None, cache_index=0):
        eps = self.config.norm_eps
        attn_out, cache = Attention(self.config, name="attn")(
            RMSNorm(eps, name="input_norm")(x), cos, sin, mask, cache, cache_index
        )
        x = x + attn_out
        x = x + MLP(self.config, name="mlp")(RMSNorm(eps, name="post_attention_norm")(x))
        return x, cache


class LlamaModel(nn.Module):
    """tokens (B, T) -> logits (B, T, V), with an optional preallocated KV cache per layer."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # (B, T) int32
        positions: jax.Array,  # (B, T) int32, RoPE positions (pads may hold anything)
        mask: jax.Array,  # (B, T, S) bool, from attention.attention_mask
        cache: tuple[KVCache, ...] | None = None,
        cache_index: jax.Array | int = 0,
        last_only: bool = False,  # logits of the last position only (prefill needs no more)
    ):
        cfg = self.config
        embedding = Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens")
        x = embedding(tokens)  # (B, T, D)
        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        cos, sin = rope_cos_sin(positions, inv_freq)
        new_cache = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = Block(cfg, name=f"layers_{i}")(x, cos, sin, mask, layer_cache,
                                                             cache_index)
            new_cache.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        x = RMSNorm(cfg.norm_eps, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embedding.attend(x)
        else:
            logits = as_logits(Linear(cfg.vocab_size, False, name="lm_head")(x))
        return logits, (None if cache is None else tuple(new_cache))


def block_inputs(config: ModelConfig, params: Any, tokens: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """What block 0 receives, as `LlamaModel` computes it: the embedded tokens (B, T, D) and
    the per-block arguments before the mask, RoPE's (cos, sin). Layer-wise passes run the
    blocks one by one from here (`Block(config).apply`).

    Args:
        config: the model's config.
        params: the whole parameter tree.
        tokens: (B, T) token ids.
        positions: (B, T) positions.

    Returns:
        (x (B, T, D), (cos, sin)).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxopt_llm.models import init_params
        >>> config = ModelConfig.tiny()
        >>> tokens = jnp.zeros((1, 4), jnp.int32)
        >>> x, (cos, sin) = block_inputs(config, init_params(config, jax.random.key(0)),
        ...                              tokens, tokens)
        >>> x.shape, cos.shape
        ((1, 4, 32), (1, 4, 8))
    """
    x = Embed(config.vocab_size, config.hidden_size).apply(
        {"params": params["embed_tokens"]}, tokens)
    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta,
                                        config.rope_scaling_dict)
    return x, rope_cos_sin(positions, inv_freq)
