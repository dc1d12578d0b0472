"""Batched text generation: one jit-compiled prefill, one jit-compiled decode loop.

Prompts of different lengths are left-padded to a bucket length, so every row
decodes into the same cache slot at each step; per-row RoPE positions and a
key-validity mask keep padding invisible. The KV cache is preallocated
(layers × (B, S, Hkv, D)), updated in place with `dynamic_update_slice` and
donated to both programs. Shapes depend only on (batch, prompt bucket, new
token bucket), so prompts within a bucket and every decode step reuse the
same compiled programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import native_extension, program_cache
from jaxopt_llm.models import ModelConfig, family_spec, forward
from jaxopt_llm.models import init_cache as init_cache  # re-exported: callers size the cache
from jaxopt_llm.models.kv_cache import cache_bytes
from jaxopt_llm.placement import Placement

MIN_BUCKET = 16
NEW_TOKEN_BUCKET = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the next token is chosen: temperature 0 means greedy; top_k 0 and top_p 1.0
    disable those filters.

    Example:
        >>> Sampling(temperature=0.8, top_p=0.9)
        Sampling(temperature=0.8, top_k=0, top_p=0.9)
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN fails too
            raise ValueError(f"temperature must be a finite number >= 0, got "
                             f"{self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class GenerationResult:
    """What `generate` returns.

    Attributes:
        new_ids: per prompt, the generated ids (a final EOS included if one came).
        prefill_seconds / decode_seconds: wall time of each program (compilation excluded).
        prompt_tokens: real (unpadded) prompt tokens, all rows.
        decode_steps: decode loop iterations after the first token (all rows advance
            together).
        compile_seconds: lowering + compiling both programs (or loading them from the
            program cache); 0 when they were reused in this process.
        programs: where the two programs came from: "reused" (compiled earlier in this
            process), "compiled" (program cache off), "cache hit" / "cache miss" (the
            on-disk program cache, `program_cache`), or "cache partly hit".
    """
    new_ids: list[list[int]]  # per prompt, generated ids (including a final EOS if one came)
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int  # real (unpadded) prompt tokens, all rows
    decode_steps: int  # loop iterations after the first token (all rows advance together)
    compile_seconds: float = 0.0  # lowering + compiling both programs; 0 when reused
    kv_cache_bytes: int = 0  # the preallocated KV cache (all rows, all slots)
    programs: str = "compiled"  # reused | compiled | cache hit | cache miss | cache partly hit

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second over the prefill."""
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second per sequence, over the decode loop."""
        return self.decode_steps / max(self.decode_seconds, 1e-9)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def prompt_bucket(length: int) -> int:
    """Smallest power of two >= length (at least MIN_BUCKET).

    Args:
        length: the longest prompt's length.

    Returns:
        The padded prompt length (prompts in one bucket share compiled programs).

    Example:
        >>> prompt_bucket(5), prompt_bucket(17)
        (16, 32)
    """
    return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def activation_dtype(config: ModelConfig, params: Any) -> Any:
    """The dtype activations run in: the token table's (`FamilySpec.activation_dtype`).

    Args:
        config: the model's config.
        params: the parameter tree.

    Returns:
        The table's floating dtype, else float32.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxopt_llm.models import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> table = jnp.ones((64, 32), jnp.bfloat16)
        >>> activation_dtype(config, {"embed_tokens": {"embedding": table}})
        dtype(bfloat16)
    """
    return family_spec(config).activation_dtype(params)


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits (B, V) -> token ids (B,), greedy or temperature / top-k / top-p sampling.

    Args:
        logits: (B, V) scores of the next token.
        key: a PRNG key (unused when greedy).
        sampling: the `Sampling` settings.

    Returns:
        (B,) int32 token ids.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> sample_logits(jnp.array([[0.1, 2.0, 0.3]]), jax.random.key(0), Sampling()).tolist()
        [1]
    """
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        keep = before < sampling.top_p  # always keeps the best token
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# `kernels` (static) says whether native kernels may be traced in: "on", "sharded" or the
# JAXOPT_LLM_NATIVE setting. The bodies read it through `native_extension` while tracing;
# as a static argument it keeps traces made under different settings apart.
@functools.partial(jax.jit, static_argnames=("config", "sampling", "kernels"),
                   donate_argnames=("cache",))
def _prefill(params, tokens, positions, key_valid, cache, key, *, config, sampling, kernels):
    logits, cache = forward(config, params, tokens, positions=positions, key_valid=key_valid,
                            cache=cache, cache_index=0, last_only=True)
    first = sample_logits(logits[:, -1], key, sampling)
    return first, cache


@functools.partial(jax.jit, static_argnames=("config", "sampling", "kernels"),
                   donate_argnames=("cache",))
def _decode(params, first, positions, key_valid, cache, key, start_slot, max_new, eos_ids, *,
            config, sampling, kernels):
    """Decode until max_new tokens per row or every row has emitted an EOS.

    first (B,): the token sampled after prefill; positions (B,): its RoPE position;
    key_valid (B, S) with the prompt slots set; start_slot: the first free cache
    slot (the prompt bucket); max_new: traced int32 scalar. Returns (B, S) ids.
    """
    batch, capacity = key_valid.shape
    out = jnp.zeros((batch, capacity), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)

    def cond(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, out, cache, key_valid, positions, done, key = state
        slot = start_slot + step - 1  # the previous token goes here
        key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((batch, 1), bool),
                                                 (0, slot))
        token = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)  # (B, 1)
        logits, cache = forward(config, params, token, positions=positions[:, None],
                                key_valid=key_valid, cache=cache, cache_index=slot)
        key, subkey = jax.random.split(key)
        nxt = jnp.where(done, eos_ids[0], sample_logits(logits[:, 0], subkey, sampling))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        return step + 1, out, cache, key_valid, positions + 1, done | jnp.isin(nxt, eos_ids), key

    state = (jnp.int32(1), out, cache, key_valid, positions, done, key)
    step, out, cache, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out, step, cache


_PROGRAMS: dict[Any, tuple[Any, Any]] = {}
MAX_CACHED_PROGRAMS = 16
_COMPILED = [0]  # (prefill, decode) pairs compiled so far, evicted ones included


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings (a mesh-sharded input compiles a partitioned program)."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
        tree)


def _programs(config, sampling, prefill_args, decode_tail):
    """Compiled (prefill, decode) for these shapes, compiled ahead of time on first use.

    Compiling explicitly (not on the first call) keeps compile time out of the
    prefill/decode timings and reports it on its own. With the program cache on
    (`program_cache`), a start after the first loads both executables instead of tracing.
    Returns (prefill, decode, seconds, where they came from).
    """
    abstract_prefill = _abstract(prefill_args)
    sharded = not program_cache.single_device(abstract_prefill)
    kernels = "sharded" if sharded else (native_extension.disabled() or "on")
    signature = (config, sampling, kernels, jax.tree_util.tree_structure(abstract_prefill),
                 tuple(jax.tree_util.tree_leaves(abstract_prefill)),
                 tuple(jax.tree_util.tree_leaves(_abstract(decode_tail))))
    if signature in _PROGRAMS:
        return (*_PROGRAMS[signature], 0.0, "reused")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if sharded:  # the native kernels have no partitioning rule: none on meshes
            stack.enter_context(native_extension.sharded_program())
        prefill, decode, sources = _compile_pair(config, sampling, kernels, abstract_prefill,
                                                 decode_tail)
    if len(_PROGRAMS) >= MAX_CACHED_PROGRAMS:
        _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[signature] = (prefill, decode)
    _COMPILED[0] += 1
    source = ("compiled" if set(sources) == {"off"} else
              f"cache {sources[0]}" if len(set(sources)) == 1 else "cache partly hit")
    return prefill, decode, time.perf_counter() - start, source


def _compile_pair(config, sampling, kernels, abstract_prefill, decode_tail):
    """(prefill, decode, (where each came from)): compiled, or loaded by `program_cache`."""
    static = dict(config=config, sampling=sampling, kernels=kernels)
    prefill, prefill_source = program_cache.cached_compile(
        "generation.prefill", static, abstract_prefill,
        lambda: _prefill.lower(*abstract_prefill, **static).compile())
    params, tokens, _, _, cache, _ = abstract_prefill
    batch = tokens.shape[0]
    first = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key_valid, *rest = _abstract(decode_tail)
    abstract_decode = (params, first, first, key_valid, cache, *rest)
    decode, decode_source = program_cache.cached_compile(
        "generation.decode", static, abstract_decode,
        lambda: _decode.lower(*abstract_decode, **static).compile())
    return prefill, decode, (prefill_source, decode_source)


def compiled_program_count() -> int:
    """How many (prefill, decode) pairs have been compiled (tests count recompiles).

    Returns:
        The count since the process started (evicted programs included).

    Example:
        >>> compiled_program_count() >= 0
        True
    """
    return _COMPILED[0]


def generate(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    eos_token_ids: Sequence[int] | None = None,
    mesh: Any = None,
    placement: Placement | None = None,
) -> GenerationResult:
    """Generate up to max_new_tokens for each prompt (lists of token ids).

    Prompts are left-padded to a shared bucket; one compiled prefill and one compiled
    decode loop run them all, stopping when every row has emitted an end token.

    Args:
        config: the model's config.
        params: the parameter tree (placed by `placement.place_params` on a mesh).
        prompts: token id lists, each non-empty.
        max_new_tokens: the most new tokens per prompt.
        sampling: greedy (the default) or sampled (`Sampling`).
        seed: the sampling seed.
        eos_token_ids: end tokens (default `config.eos_token_ids`; () never stops early).
        mesh: the older way to give a mesh (prefer `placement`).
        placement: where to run (default one device). On a mesh prompts are spread over
            `data` (padded to a multiple of it with copies of the last prompt, whose
            outputs are dropped) and the KV cache is sharded: batch on `data`, kv heads on
            `model`.

    Returns:
        A `GenerationResult` (new ids per prompt, timings).

    Raises:
        ValueError: max_new_tokens <= 0, an empty prompt, or prompt + new tokens longer
            than the model's context.

    Example:
        >>> import jax
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> config = ModelConfig.tiny()
        >>> out = generate(config, init_params(config, jax.random.key(0)), [[1, 2, 3], [4]],
        ...                max_new_tokens=5, eos_token_ids=())
        >>> [len(ids) for ids in out.new_ids]
        [5, 5]
    """
    if config.is_encoder:
        raise ValueError(f"a {config.model_type} model is an encoder: it does not generate")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must contain at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"context of {config.max_position_embeddings} tokens; shorten the prompt or "
            "lower max_new_tokens"
        )
    eos = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids) or (-1,)
    requested = len(prompts)
    placement = Placement.resolve(placement, mesh=mesh)
    placement.check(config)
    prompts = list(prompts) + [prompts[-1]] * (placement.round_batch(requested) - requested)
    batch = len(prompts)
    bucket = prompt_bucket(longest)
    capacity = bucket + _round_up(max_new_tokens, NEW_TOKEN_BUCKET)
    tokens = np.zeros((batch, bucket), np.int32)
    key_valid = np.zeros((batch, capacity), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, bucket - len(prompt):] = prompt
        key_valid[row, bucket - len(prompt):bucket] = True
    positions = np.maximum(np.cumsum(key_valid[:, :bucket], axis=1) - 1, 0).astype(np.int32)

    key = jax.random.PRNGKey(seed)
    key, prefill_key = jax.random.split(key)
    cache = placement.new_cache(config, batch, capacity, activation_dtype(config, params))
    kv_cache_bytes = cache_bytes(cache)
    key, prefill_key = placement.replicate((key, prefill_key))
    place = placement.place_batch  # per-row arrays: batch on `data`
    constant = placement.replicate  # the same on every device
    prefill_args = (params, place(tokens), place(positions), place(key_valid), cache,
                    prefill_key)
    first_positions = place(positions[:, -1] + 1)
    decode_tail = (place(key_valid), key, constant(np.int32(bucket)),
                   constant(np.int32(max_new_tokens)), constant(np.asarray(eos, np.int32)))
    prefill, decode, compile_seconds, programs = _programs(config, sampling, prefill_args,
                                                           decode_tail)

    start = time.perf_counter()
    first, cache = prefill(*prefill_args)
    first.block_until_ready()
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    key_valid_arg, *rest = decode_tail
    decode_args = (params, first, first_positions, key_valid_arg, cache, *rest)
    # hand decode exactly the layouts it was compiled for
    decode_args = placement.put(decode_args, decode.input_shardings[0])
    out, steps, cache = decode(*decode_args)
    out = placement.gather(out)
    decode_seconds = time.perf_counter() - start
    steps = int(steps)

    new_ids = []
    for row in range(requested):
        ids = []
        for token in out[row, :steps]:
            ids.append(int(token))
            if token in eos:
                break
        new_ids.append(ids)
    return GenerationResult(
        new_ids=new_ids, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
        prompt_tokens=sum(len(p) for p in prompts[:requested]), decode_steps=steps - 1,
        compile_seconds=compile_seconds, kv_cache_bytes=kv_cache_bytes, programs=programs,
    )
