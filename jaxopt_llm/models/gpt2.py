"""GPT-2 ("Language Models are Unsupervised Multitask Learners", Radford et al., 2019).

Pre-LayerNorm decoder with learned absolute positions, a fused q/k/v
projection, a GELU (tanh approximation) MLP and a head tied to the token table.

Parameter tree (kernels are (d_in, d_out), as in HF's Conv1D):
  wte/embedding (V, D)   wpe/embedding (P, D)
  h_{i}/ln_1/{scale,bias}   h_{i}/attn/c_attn/{kernel,bias} (D, 3D)   h_{i}/attn/c_proj
  h_{i}/ln_2/{scale,bias}   h_{i}/mlp/c_fc (D, F)   h_{i}/mlp/c_proj (F, D)
  ln_f/{scale,bias}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_llm.models.attention import attend_with_cache
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.models.kv_cache import KVCache
from jaxopt_llm.models.layers import Embed, LayerNorm, Linear


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection `c_attn` and `c_proj`."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask, cache: KVCache | None, cache_index):
        cfg = self.config
        batch, length, width = x.shape
        inner = cfg.num_heads * cfg.head_dim  # = width unless heads were pruned
        qkv = Linear(3 * inner, True, name="c_attn")(x)
        q, k, v = (t.reshape(batch, length, cfg.num_heads, cfg.head_dim)
                   for t in jnp.split(qkv, 3, axis=-1))
        out, cache = attend_with_cache(q, k, v, mask, cache, cache_index, cfg.kv_cache)
        out = out.reshape(batch, length, inner)
        return Linear(width, True, name="c_proj")(out), cache


class MLP(nn.Module):
    """GELU (tanh approximation) MLP: c_proj(gelu(c_fc(x)))."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        hidden = Linear(self.config.intermediate_size, True, name="c_fc")(x)
        return Linear(self.config.hidden_size, True, name="c_proj")(
            jax.nn.gelu(hidden, approximate=True)
        )


class Block(nn.Module):
    """One pre-LayerNorm decoder layer; runnable alone on given hidden states."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask, cache: KVCache | None = None, cache_index=0):
        eps = self.config.norm_eps
        attn_out, cache = Attention(self.config, name="attn")(
            LayerNorm(eps, name="ln_1")(x), mask, cache, cache_index
        )
        x = x + attn_out
        x = x + MLP(self.config, name="mlp")(LayerNorm(eps, name="ln_2")(x))
        return x, cache


class GPT2Model(nn.Module):
    """Same call signature as LlamaModel: positions index the learned position table."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, mask, cache=None, cache_index=0, last_only=False):
        cfg = self.config
        wte = Embed(cfg.vocab_size, cfg.hidden_size, name="wte")
        wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, name="wpe")
        positions = jnp.clip(positions, 0, cfg.max_position_embeddings - 1)
        x = wte(tokens) + wpe(positions)
        new_cache = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = Block(cfg, name=f"h_{i}")(x, mask, layer_cache, cache_index)
            new_cache.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        logits = wte.attend(LayerNorm(cfg.norm_eps, name="ln_f")(x))
        return logits, (None if cache is None else tuple(new_cache))


def block_inputs(config: ModelConfig, params: Any, tokens: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """What block 0 receives, as `GPT2Model` computes it: token plus position embeddings
    (B, T, D); GPT-2 blocks take no other argument before the mask.

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
        >>> config = ModelConfig.tiny("gpt2")
        >>> tokens = jnp.zeros((1, 4), jnp.int32)
        >>> x, args = block_inputs(config, init_params(config, jax.random.key(0)), tokens, tokens)
        >>> x.shape, args
        ((1, 4, 32), ())
    """
    positions = jnp.clip(positions, 0, config.max_position_embeddings - 1)
    x = Embed(config.vocab_size, config.hidden_size).apply({"params": params["wte"]}, tokens)
    x = x + Embed(config.max_position_embeddings, config.hidden_size).apply(
        {"params": params["wpe"]}, positions)
    return x, ()
