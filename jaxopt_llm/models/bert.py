"""BERT encoders ("BERT: Pre-training of Deep Bidirectional Transformers", Devlin et al.,
2019), e.g. all-MiniLM-L6-v2 (Wang et al., 2020; sentence-transformers).

Post-LayerNorm encoder: bidirectional attention over the non-padding tokens, learned
absolute position and token-type embeddings, exact (erf) GELU. The model returns the last
hidden states (B, T, D), not logits; `jaxopt_llm.encoders` pools them into sentence
embeddings. Every input is one segment (token type 0): sentence embeddings need no more.

Parameter tree (kernels are (d_in, d_out)):
  word_embeddings/embedding (V, D)   position_embeddings/embedding (P, D)
  token_type_embeddings/embedding (2, D)   embeddings_norm/{scale,bias}
  layer_{i}/attn/{query,key,value,output}/{kernel,bias}   layer_{i}/attn_norm/{scale,bias}
  layer_{i}/mlp/intermediate (D, F)   layer_{i}/mlp/output (F, D)   layer_{i}/mlp_norm
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_llm.models.attention import dot_product_attention
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.models.layers import Embed, LayerNorm, Linear


class Attention(nn.Module):
    """Bidirectional multi-head attention: query/key/value/output, all with biases."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, width = x.shape
        inner = cfg.num_heads * cfg.head_dim  # = width unless heads were pruned
        q, k, v = (Linear(inner, True, name=name)(x).reshape(
            batch, length, cfg.num_heads, cfg.head_dim) for name in ("query", "key", "value"))
        out = dot_product_attention(q, k, v, mask).reshape(batch, length, inner)
        return Linear(width, True, name="output")(out)


class MLP(nn.Module):
    """output(gelu(intermediate(x))), exact GELU."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = Linear(self.config.intermediate_size, True, name="intermediate")(x)
        return Linear(self.config.hidden_size, True, name="output")(
            jax.nn.gelu(hidden, approximate=False))


class Block(nn.Module):
    """One post-LayerNorm encoder layer; runnable alone on given hidden states (the
    `cache` arguments exist for the family contract and must be None)."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask, cache=None, cache_index=0):
        if cache is not None:
            raise ValueError("a BERT encoder has no KV cache (it does not generate)")
        eps = self.config.norm_eps
        x = LayerNorm(eps, name="attn_norm")(x + Attention(self.config, name="attn")(x, mask))
        x = LayerNorm(eps, name="mlp_norm")(x + MLP(self.config, name="mlp")(x))
        return x, None


def _embeddings(config: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    positions = jnp.clip(positions, 0, config.max_position_embeddings - 1)
    x = Embed(config.vocab_size, config.hidden_size, name="word_embeddings")(tokens)
    x = x + Embed(config.max_position_embeddings, config.hidden_size,
                  name="position_embeddings")(positions)
    token_types = Embed(config.type_vocab_size, config.hidden_size, name="token_type_embeddings")
    return x + token_types(jnp.zeros_like(tokens))


class BertModel(nn.Module):
    """Same call signature as the decoders; returns (last hidden states (B, T, D), None).
    `mask` is (B, T, S) from `models.forward.model_mask` (every query sees every
    non-padding key); `last_only` keeps the last position's state."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, mask, cache=None, cache_index=0, last_only=False):
        cfg = self.config
        if cache is not None:
            raise ValueError("a BERT encoder has no KV cache (it does not generate)")
        x = LayerNorm(cfg.norm_eps, name="embeddings_norm")(_embeddings(cfg, tokens, positions))
        for i in range(cfg.num_layers):
            x, _ = Block(cfg, name=f"layer_{i}")(x, mask)
        return (x[:, -1:] if last_only else x), None


class _Inputs(nn.Module):
    """The embedding stage alone (the parameter names of `BertModel`'s)."""
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions):
        return LayerNorm(self.config.norm_eps, name="embeddings_norm")(
            _embeddings(self.config, tokens, positions))


def block_inputs(config: ModelConfig, params: Any, tokens: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """What block 0 receives, as `BertModel` computes it: the normalised sum of word,
    position and token-type (0) embeddings (B, T, D); blocks take no other argument.

    Args:
        config: the model's config.
        params: the whole parameter tree.
        tokens: (B, T) token ids.
        positions: (B, T) positions (clipped to the position table).

    Returns:
        (x (B, T, D), ()).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxopt_llm.models import init_params
        >>> config = ModelConfig.tiny("bert")
        >>> tokens = jnp.zeros((1, 4), jnp.int32)
        >>> x, args = block_inputs(config, init_params(config, jax.random.key(0)), tokens, tokens)
        >>> x.shape, args
        ((1, 4, 32), ())
    """
    names = ("word_embeddings", "position_embeddings", "token_type_embeddings",
             "embeddings_norm")
    return _Inputs(config).apply({"params": {n: params[n] for n in names}}, tokens,
                                 positions), ()
