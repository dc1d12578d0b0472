"""One forward pass for every caller: evaluation, training, generation and loading.

Every family's module takes `(tokens, positions, mask, cache, cache_index, last_only)`;
`forward` builds the default positions and the attention mask so callers say only
what differs from a plain causal pass over a full window.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.models.family import family_spec
from jaxopt_llm.models.kv_cache import KVCache, empty_cache


def build_model(config: ModelConfig):
    """The Flax module of `config`'s family.

    Args:
        config: the model's config.

    Returns:
        The family's module (`FamilySpec.model(config)`); call it through `forward`.

    Example:
        >>> from jaxopt_llm.models.config import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> type(build_model(config)).__name__
        'LlamaModel'
    """
    return family_spec(config).model(config)


def forward(
    config: ModelConfig,
    params: Any,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    key_valid: jax.Array | None = None,
    cache: tuple[KVCache, ...] | None = None,
    cache_index: jax.Array | int = 0,
    last_only: bool = False,
) -> tuple[jax.Array, tuple[KVCache, ...] | None]:
    """Logits of `tokens` under `params`.

    Args:
        config: the model configuration (static under jit).
        params: the parameter tree (dense arrays or typed weight leaves).
        tokens: (B, T) int32 token ids.
        positions: (B, T) int32 positions; default 0..T-1 in every row.
        key_valid: (B, S) bool, which key slots hold a real token; default all T slots
            of the tokens themselves (S = T). Required with a cache (S = its length).
        cache: per-layer (keys, values), each (B, S, Hkv, D), written at `cache_index`.
        cache_index: the slot of the first token; a static 0 marks a prefix (prefill).
        last_only: return the logits of the last position only.

    Returns:
        (logits (B, T or 1, V), the updated cache or None).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxopt_llm.models.config import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> params = init_params(config, jax.random.key(0))
        >>> logits, _ = forward(config, params, jnp.zeros((2, 5), jnp.int32))
        >>> logits.shape
        (2, 5, 64)
    """
    batch, length = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if key_valid is None:
        if cache is not None:
            raise ValueError("key_valid is required with a cache (which slots hold tokens)")
        key_valid = jnp.ones((batch, length), bool)
    mask = model_mask(config, key_valid, cache_index, length)
    return build_model(config).apply({"params": params}, tokens, positions, mask, cache,
                                     cache_index, last_only=last_only)


def model_mask(config: ModelConfig, key_valid: jax.Array, cache_index: jax.Array | int,
               num_queries: int) -> jax.Array:
    """Which keys each query may see in `config`'s model: (B, T, S) bool.

    Decoders see the slots at or before their own (and within the sliding window, if
    any); an encoder's queries see every valid key.

    Args:
        config: the model's config.
        key_valid: (B, S), True where a slot holds a real token.
        cache_index: the slot of query 0 (decoders).
        num_queries: T.

    Returns:
        The mask (B, T, S).

    Example:
        >>> from jaxopt_llm.models.config import ModelConfig
        >>> valid = jnp.array([[True, True, False]])
        >>> model_mask(ModelConfig.tiny("bert"), valid, 0, 3)[0].astype(int).tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 0]]
    """
    if config.is_encoder:
        return jnp.broadcast_to(key_valid[:, None, :], (key_valid.shape[0], num_queries,
                                                        key_valid.shape[1]))
    return attention_mask(key_valid, cache_index, num_queries, config.sliding_window)


def init_cache(config: ModelConfig, batch: int, length: int,
               dtype: Any = jnp.float32) -> tuple[KVCache, ...]:
    """A zeroed KV cache: per layer (keys, values), each (batch, length, Hkv, head_dim).

    Args:
        config: the model's config.
        batch: rows.
        length: slots (prompt plus new tokens).
        dtype: the float cache's dtype (the activation dtype); `config.kv_cache` "int8"
            stores int8 codes and float32 scales instead (`kv_cache.Int8Slots`).

    Returns:
        A tuple of `config.num_layers` (keys, values) pairs.

    Raises:
        ValueError: for an encoder, which has no cache.

    Example:
        >>> from jaxopt_llm.models.config import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> cache = init_cache(config, 1, 16)
        >>> len(cache), cache[0][0].shape
        (2, (1, 16, 2, 8))
    """
    if config.is_encoder:
        raise ValueError(f"a {config.model_type} model is an encoder: it has no KV cache and "
                         "does not generate")
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    return tuple(empty_cache(config.kv_cache, shape, dtype) for _ in range(config.num_layers))


def init_params(config: ModelConfig, key: jax.Array) -> Any:
    """Freshly initialised parameters of `config` (values depend only on `key`).

    Args:
        config: the model's config.
        key: a PRNG key.

    Returns:
        The parameter tree (float32 arrays).

    Example:
        >>> import jax
        >>> from jaxopt_llm.models.config import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> params = init_params(config, jax.random.key(0))
        >>> params["layers_0"]["attn"]["q_proj"]["kernel"].shape
        (32, 32)
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = model_mask(config, jnp.ones((1, 1), bool), 0, 1)
    return build_model(config).init(key, tokens, tokens, mask)["params"]


def param_shapes(config: ModelConfig) -> Any:
    """The parameter tree of `config` as `jax.ShapeDtypeStruct`s (nothing computed).

    Args:
        config: the model's config.

    Returns:
        The tree of shapes and dtypes.

    Example:
        >>> from jaxopt_llm.models.config import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> param_shapes(config)["embed_tokens"]["embedding"].shape
        (64, 32)
    """
    return jax.tree_util.tree_map(lambda leaf: leaf, _param_shapes(config))  # fresh containers


@functools.lru_cache(maxsize=32)
def _param_shapes(config: ModelConfig) -> Any:
    """Layers are uniform (no per-layer sizes in `ModelConfig`), so a one-layer model is
    traced and its layer repeated: tracing SmolLM2's 30 layers took ~0.9 s of every load."""
    if config.num_layers <= 1:
        return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    one = dataclasses.replace(config, num_layers=1)
    shapes = dict(jax.eval_shape(lambda: init_params(one, jax.random.PRNGKey(0))))
    spec = family_spec(config)
    layer = shapes.pop(spec.block(0))
    shapes.update({spec.block(i): layer for i in range(config.num_layers)})
    return dict(sorted(shapes.items()))  # Flax's order: keys sorted


__all__ = ["build_model", "forward", "init_cache", "init_params", "model_mask", "param_shapes"]
