"""Native CPU causal-prefix attention (prefill / evaluation) through the XLA FFI.

`native_prefix_attention(q, k, v, mask)` computes, for q (B, T, H, D) and k, v
(B, T, Hkv, D) float32 with H a multiple of Hkv (grouped-query attention: query head h reads
kv head h // G, G = H // Hkv) and a bool mask (B, T, T),

    out[b, t, h] = Σ_s p[s] · v[b, s, h // G],
    p = softmax over the keys s with mask[b, t, s] of q[b, t, h] · k[b, s, h // G] / √D,

with out[b, t, h] = 0 where mask[b, t, :] hides every key. The mask must hide every key
after its query (mask[b, t, s] is False for s > t: a causal prefix, possibly with padding or
a sliding window); the kernel never reads those keys and honours every other False.

Algorithm: the online softmax of FlashAttention (Dao et al., "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", 2022) on CPU-cache-sized tiles
(csrc/attention.cc): a task takes a block of query positions for all G query heads of one
kv head, so each K/V tile is read once for those heads, and walks the key blocks up to its
last position, keeping a running max, sum and unnormalized output per row; key blocks the
mask hides from the whole query block are skipped (sliding windows, left padding). AVX2 +
FMA register-blocked kernels (scores vectorised along keys against a transposed packed K,
P·V along D, a polynomial 2^x) or a portable scalar path, chosen at run time; query blocks
are spread over XLA's CPU thread pool. The (T, T) score matrix is never materialized.

The kernel has no derivative: the caller wraps it (a custom JVP with the pure-JAX attention
as its tangent). `native_prefix_attention` returns None where it does not apply, and the
caller then runs its pure-JAX attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import native_extension

# The kernel a call runs: the best this CPU supports, the portable one, AVX2 + FMA or
# AVX-512F (an error from the kernel where the CPU lacks it).
VARIANTS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}

_TARGET = "jaxopt_llm_prefix_attention"


@functools.cache
def prefix_attention_status() -> tuple[bool, str]:
    """Whether `native_prefix_attention` runs the kernel here, and why (or why not).

    The first call loads the extension and runs one tiny attention (two heads sharing one
    kv head, a padded causal mask) checked against numpy, eagerly even inside a trace, so
    "available" means a call really went through; the result is cached (clear it with
    `prefix_attention_status.cache_clear()` after changing `JAXOPT_LLM_NATIVE`).

    Returns:
        (available, description): e.g. (True, "avx2 prefix attention kernel (XLA CPU
        pool)"), or (False, reason) when the extension is missing, the default backend is
        not the CPU, or JAXOPT_LLM_NATIVE is off / 0 / no / false.

    Example:
        >>> available, description = prefix_attention_status()
        >>> isinstance(available, bool) and isinstance(description, str)
        True
    """
    setting = native_extension.disabled()
    if setting is not None:
        return False, f"off ({native_extension.ENV}={setting}): pure-JAX attention"
    module, reason = native_extension.load()
    if module is None:
        return False, reason
    if jax.default_backend() != "cpu":
        return False, f"default backend is {jax.default_backend()}, the kernel is CPU-only"
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 3, 2, 4)).astype(np.float32)
    k = rng.standard_normal((1, 3, 1, 4)).astype(np.float32)
    v = rng.standard_normal((1, 3, 1, 4)).astype(np.float32)
    mask = np.tril(np.ones((3, 3), bool))[None]
    mask[:, 0, :] = False  # a row that sees nothing outputs zeros
    try:
        with jax.ensure_compile_time_eval():  # run now, even while a model is traced
            got = np.asarray(_call(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                   jnp.asarray(mask), "auto", 0))
    except Exception as error:  # noqa: BLE001 - a failed call means "not available"
        return False, f"self-check call failed: {type(error).__name__}: {error}"
    scores = np.einsum("thd,sd->hts", q[0], k[0, :, 0]) / 2.0
    scores = np.where(mask[0], scores, -np.inf)
    with np.errstate(invalid="ignore"):
        weights = np.nan_to_num(np.exp(scores - scores.max(-1, keepdims=True)))
    weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-30)
    want = np.einsum("hts,sd->thd", weights, v[0, :, 0])[None]
    if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
        return False, f"self-check failed: {got.ravel().tolist()} != {want.ravel().tolist()}"
    return True, (f"{module.best_variant()} prefix attention kernel "
                  "(threads as XLA's CPU pool)")


def native_prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                            variant: str = "auto", tasks: int = 0) -> jax.Array | None:
    """Causal-prefix attention by the native kernel; None where it does not apply.

    Works under `jit` and `vmap` (a vmapped call loops over the mapped axis); no derivative.

    Args:
        q: float32 queries (B, T, H, D), not yet scaled by 1/√D.
        k: float32 keys (B, T, Hkv, D), H a multiple of Hkv.
        v: float32 values (B, T, Hkv, D).
        mask: bool (B, T, S), (1, T, S) or (T, S) with S ≥ T: mask[b, t, s] says whether
            query t sees key s; it must be False for s > t (the kernel skips those keys, and
            columns past T are dropped).
        variant: "auto" (the best kernel for this CPU), "scalar", "avx2" or "avx512"
            (`VARIANTS`).
        tasks: threads to spread the query blocks over (0: XLA's CPU pool size).

    Returns:
        The float32 (B, T, H, D) attention output (zeros for a query that sees no key), or
        None when `prefix_attention_status()` is false, an input is not float32 (q, k, v)
        or bool (mask), or the shapes do not fit together.

    Raises:
        ValueError: for an unknown `variant`.

    Example:
        >>> q = k = v = jnp.ones((1, 4, 2, 8))
        >>> causal = jnp.tril(jnp.ones((4, 4), bool))
        >>> out = native_prefix_attention(q, k, v, causal)
        >>> out is None or out.shape == (1, 4, 2, 8)
        True
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not prefix_attention_status()[0]:
        return None
    if any(x.dtype != jnp.float32 for x in (q, k, v)) or mask.dtype != jnp.bool_:
        return None
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        return None
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d or k.shape[2] < 1:
        return None
    if h % k.shape[2] or mask.ndim not in (2, 3) or mask.shape[-2] != t or mask.shape[-1] < t:
        return None
    if mask.ndim == 3 and mask.shape[0] not in (1, b):
        return None
    mask = jnp.broadcast_to(mask[..., :t], (b, t, t))
    return _call(q, k, v, mask, variant, tasks)


def _call(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, variant: str,
          tasks: int) -> jax.Array:
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q, k, v, mask, variant=np.int64(VARIANTS[variant]), tasks=np.int64(tasks))
