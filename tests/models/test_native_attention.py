"""The native causal-prefix attention kernel (jaxopt_llm.models.native_attention,
csrc/attention.cc) against a float64 numpy reference, under jit, with both kernel variants:
causal, left-padded (with a fully masked row and a hidden key) and sliding-window masks,
grouped-query head layouts, head sizes that are and are not multiples of 8, several
thread counts; and the paths where it must decline or fail loudly."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import native_extension
from jaxopt_llm.models import native_attention

RTOL = ATOL = 1e-5
LENGTHS = (1, 7, 64, 129, 300)
HEADS = ((4, 4), (9, 3), (8, 1))  # (H, Hkv): multi-head, SmolLM2's GQA, multi-query
DIMS = (64, 32, 20)
MASKS = ("causal", "padded", "window")
VARIANTS = ("scalar", "avx2", "avx512")


def require_native() -> None:
    """Skip only when the extension was genuinely not built; any other failure fails."""
    available, status = native_attention.prefix_attention_status()
    if not available and status.startswith("extension not built"):
        pytest.skip(status)
    assert available, status


def require_variant(variant: str) -> None:
    require_native()
    best = native_extension.load()[0].best_variant()
    if variant == "avx2" and best not in ("avx2", "avx512"):
        pytest.skip("this CPU has no AVX2 + FMA: only the scalar kernel runs here")
    if variant == "avx512" and best != "avx512":
        pytest.skip(f"this CPU has no AVX-512F: the {best} kernel runs here")


def make_mask(kind: str, batch: int, length: int) -> np.ndarray:
    """(B, T, T) bool: causal; causal with left padding (batch entry b has 1 + 2b + T // 5
    padding positions, which see nothing and are seen by nobody, and key T // 2 is hidden
    from everyone); or causal within a sliding window."""
    t = np.arange(length)
    causal = t[None, :] <= t[:, None]
    if kind == "causal":
        return np.broadcast_to(causal, (batch, length, length)).copy()
    if kind == "padded":
        pads = [min(length, 1 + 2 * b + length // 5) for b in range(batch)]
        valid = t[None, :] >= np.array(pads)[:, None]  # (B, T)
        mask = causal[None] & valid[:, None, :] & valid[:, :, None]
        if length > 4:
            mask[:, :, length // 2] = False
        return mask
    window = 40 if length > 64 else 3
    return np.broadcast_to(causal & (t[:, None] - t[None, :] < window),
                           (batch, length, length)).copy()


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float64 softmax attention; a query that sees no key outputs zeros."""
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k.astype(np.float64), group, axis=2)
    v = np.repeat(v.astype(np.float64), group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
    seen = mask[:, None]  # (B, 1, T, S)
    scores = np.where(seen, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    weights = np.where(seen, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = weights.sum(-1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bhts,bshd->bthd", weights, v)


def inputs(batch: int, length: int, heads: int, kv_heads: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, dim), dtype=np.float32)
    k = rng.standard_normal((batch, length, kv_heads, dim), dtype=np.float32)
    v = rng.standard_normal((batch, length, kv_heads, dim), dtype=np.float32)
    return q, k, v


def run(q, k, v, mask, variant: str = "auto", tasks: int = 0) -> np.ndarray:
    call = jax.jit(lambda q, k, v, mask: native_attention.native_prefix_attention(
        q, k, v, mask, variant=variant, tasks=tasks))
    out = call(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    assert out is not None, "native_prefix_attention declined supported inputs"
    return np.asarray(out)


def check(q, k, v, mask, variant: str, tasks: int = 0) -> None:
    got, want = run(q, k, v, mask, variant, tasks), reference(q, k, v, mask)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    hidden = ~mask.any(-1)  # (B, T): rows that see nothing are exactly zero
    assert not got[hidden].any()


# Every length × mask × variant, each with one (B, (H, Hkv), D); the 30 cases cycle through
# all 18 combinations of batch, head layout and head size.
SHAPES = list(itertools.product((1, 2), HEADS, DIMS))
CASES = [(length, kind, variant, *SHAPES[i % len(SHAPES)])
         for i, (length, kind, variant) in enumerate(itertools.product(LENGTHS, MASKS, VARIANTS))]


@pytest.mark.parametrize(("length", "kind", "variant", "batch", "heads", "dim"), CASES,
                         ids=[f"T{t}-{m}-{v}-B{b}-H{h[0]}x{h[1]}-D{d}"
                              for t, m, v, b, h, d in CASES])
def test_matches_reference(length, kind, variant, batch, heads, dim):
    require_variant(variant)
    q, k, v = inputs(batch, length, *heads, dim)
    check(q, k, v, make_mask(kind, batch, length), variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=[f"H{h}x{kv}" for h, kv in HEADS])
def test_every_head_layout_and_size(heads, dim, variant):
    require_variant(variant)
    q, k, v = inputs(2, 129, *heads, dim, seed=1)
    check(q, k, v, make_mask("padded", 2, 129), variant)


@pytest.mark.parametrize("dim", (48, 80, 128))
def test_other_head_sizes(dim):
    require_native()
    q, k, v = inputs(1, 100, 6, 2, dim, seed=2)
    check(q, k, v, make_mask("window", 1, 100), "auto")


def test_thread_counts_give_identical_results():
    require_native()
    q, k, v = inputs(2, 300, 9, 3, 64, seed=3)
    mask = make_mask("padded", 2, 300)
    one = run(q, k, v, mask, tasks=1)
    np.testing.assert_allclose(one, reference(q, k, v, mask), rtol=RTOL, atol=ATOL)
    for tasks in (2, 5):  # each query block is computed alone: bitwise the same
        np.testing.assert_array_equal(run(q, k, v, mask, tasks=tasks), one)


def test_broadcast_mask_and_vmap():
    require_native()
    q, k, v = inputs(1, 50, 4, 2, 32, seed=4)
    mask = make_mask("causal", 1, 50)
    want = reference(q, k, v, mask)
    out = native_attention.native_prefix_attention(jnp.asarray(q), jnp.asarray(k),
                                                   jnp.asarray(v), jnp.asarray(mask[0]))
    np.testing.assert_allclose(np.asarray(out), want, rtol=RTOL, atol=ATOL)
    stacked = [jnp.asarray(np.stack([x, 2 * x])) for x in (q, k, v)]  # a leading vmap axis

    def attend(q, k, v):
        return native_attention.native_prefix_attention(q, k, v, jnp.asarray(mask))

    got = np.asarray(jax.jit(jax.vmap(attend))(*stacked))
    np.testing.assert_allclose(got[0], want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got[1], reference(2 * q, 2 * k, 2 * v, mask), rtol=RTOL,
                               atol=ATOL)


@pytest.mark.parametrize(("shapes", "message"), [
    (((1, 8, 4, 16), (1, 8, 3, 16), (1, 8, 8)), "H = 4 query heads is not a multiple of Hkv = 3"),
    (((1, 8, 4, 16), (1, 9, 2, 16), (1, 8, 8)), "do not match q"),
    (((1, 8, 4, 16), (1, 8, 2, 8), (1, 8, 8)), "do not match q"),
    (((2, 8, 4, 16), (2, 8, 2, 16), (3, 8, 8)), r"mask \(3, 8, 8\) is not \(B, T, T\)"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 7)), r"mask \(1, 8, 7\) is not \(B, T, T\)"),
])
def test_bad_shapes_fail_with_the_problem_named(shapes, message):
    require_native()
    q_shape, kv_shape, mask_shape = shapes
    q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
    mask = jnp.ones(mask_shape, bool)
    assert native_attention.native_prefix_attention(q, k, k, mask) is None
    with pytest.raises(Exception, match=message):  # the kernel's own check, through XLA
        jax.block_until_ready(native_attention._call(q, k, k, mask, "auto", 0))


def test_bad_operands_fail_with_the_problem_named():
    require_native()
    q, k = jnp.zeros((1, 8, 4, 16)), jnp.zeros((1, 8, 2, 16))
    with pytest.raises(Exception, match="mask must be bool"):
        jax.block_until_ready(native_attention._call(q, k, k, jnp.ones((1, 8, 8), jnp.int8),
                                                     "auto", 0))
    with pytest.raises(Exception, match="k must be float32, got float16"):
        jax.block_until_ready(native_attention._call(q, k.astype(jnp.float16), k,
                                                     jnp.ones((1, 8, 8), bool), "auto", 0))
    with pytest.raises(Exception, match=r"v .* differ"):
        jax.block_until_ready(native_attention._call(q, k, k[:, :, :1], jnp.ones((1, 8, 8), bool),
                                                     "auto", 0))


def test_declines_what_it_does_not_handle():
    require_native()
    q, k = jnp.zeros((1, 8, 4, 16)), jnp.zeros((1, 8, 2, 16))
    mask = jnp.tril(jnp.ones((8, 8), bool))
    attend = native_attention.native_prefix_attention
    assert attend(q.astype(jnp.bfloat16), k, k, mask) is None
    assert attend(q, k, k, mask.astype(jnp.int32)) is None
    assert attend(q[0], k[0], k[0], mask) is None
    assert attend(q, k, k, jnp.ones((3, 8, 8), bool)) is None
    with pytest.raises(ValueError, match="variant must be one of"):
        attend(q, k, k, mask, variant="avx1024")


@pytest.fixture
def fresh_status():
    native_attention.prefix_attention_status.cache_clear()
    yield
    native_attention.prefix_attention_status.cache_clear()


@pytest.mark.parametrize("setting", ("off", "0", "No", "false"))
def test_env_switch_turns_the_kernel_off(monkeypatch, fresh_status, setting):
    monkeypatch.setenv(native_extension.ENV, setting)
    available, why = native_attention.prefix_attention_status()
    assert not available and why.startswith(f"off ({native_extension.ENV}={setting.lower()})")
    q, k = jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 1, 8))
    assert native_attention.native_prefix_attention(q, k, k, jnp.ones((4, 4), bool)) is None
