"""Attention formulations against a float64 numpy reference, and the prefix-path choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.models import attention
from jaxopt_llm.models.attention import (
    ATTENTION_ENV,
    attention_mask,
    blocked_prefix_attention,
    dot_product_attention,
    flash_prefix_attention,
    prefix_attention,
    prefix_path,
)
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.models.forward import forward, init_params


def reference(q, k, v, mask):
    """softmax over the visible keys in float64; a row that sees nothing gives zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    mask = np.asarray(mask)
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    visible = mask[:, None]
    scores = np.where(visible, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    weights = np.where(visible, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = weights.sum(-1, keepdims=True)
    probs = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bhts,bshd->bthd", probs, v)


def inputs(batch, length, heads, kv_heads, head_dim, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, length, kv_heads, head_dim)).astype(dtype)
    return q, k, v


def padded_valid(batch, length):
    """Row 0 all valid; later rows left-padded by a few slots (their first queries see
    no key)."""
    valid = np.ones((batch, length), bool)
    for row in range(1, batch):
        valid[row, : min(length - 1, 3 * row)] = False
    return jnp.asarray(valid)


@pytest.mark.parametrize("length,block", [(1, 4), (7, 4), (16, 4), (37, 8), (300, 64)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("masking", ["causal", "left-padded", "window"])
def test_flash_matches_reference(length, block, heads, kv_heads, masking):
    batch = 2
    q, k, v = inputs(batch, length, heads, kv_heads, 16, seed=length)
    valid = padded_valid(batch, length) if masking == "left-padded" else jnp.ones(
        (batch, length), bool)
    mask = attention_mask(valid, 0, length, sliding_window=5 if masking == "window" else None)
    got = jax.jit(flash_prefix_attention, static_argnames="block")(q, k, v, mask, block=block)
    np.testing.assert_allclose(np.asarray(got), reference(q, k, v, mask), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("length", [5, 40])
def test_dense_paths_match_reference_on_rows_that_see_a_key(length):
    q, k, v = inputs(2, length, 6, 2, 8, seed=3)
    mask = attention_mask(padded_valid(2, length), 0, length)
    want = reference(q, k, v, mask)
    seen = np.asarray(mask).any(-1)  # (B, T): the dense paths average pad rows
    for path in (dot_product_attention, blocked_prefix_attention):
        got = np.asarray(jax.jit(path)(q, k, v, mask))
        np.testing.assert_allclose(got[seen], want[seen], rtol=2e-5, atol=2e-5)


def test_flash_in_bfloat16_stays_within_its_rounding():
    q, k, v = inputs(1, 70, 4, 2, 16, seed=5)
    mask = attention_mask(jnp.ones((1, 70), bool), 0, 70)
    low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    got = flash_prefix_attention(*low, mask, block=16)
    assert got.dtype == jnp.bfloat16
    want = reference(*(np.asarray(x, np.float32) for x in low), mask)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


@pytest.mark.parametrize("forced", ["blocked", "flash", "native"])
def test_forced_path_gives_the_reference_and_the_blocked_gradient(monkeypatch, forced):
    monkeypatch.setenv(ATTENTION_ENV, forced)
    monkeypatch.setattr(attention, "FLASH_BLOCK", 8)
    q, k, v = inputs(2, 21, 4, 2, 8, seed=7)
    mask = attention_mask(padded_valid(2, 21), 0, 21)
    out = jax.jit(prefix_attention)(q, k, v, mask)
    seen = np.asarray(mask).any(-1)
    np.testing.assert_allclose(np.asarray(out)[seen], reference(q, k, v, mask)[seen],
                               rtol=2e-5, atol=2e-5)

    def loss(path, q, k, v):  # pad rows excluded, as every loss here does
        return jnp.sum(jnp.where(seen[..., None, None], path(q, k, v, mask), 0.0) ** 2)

    got = jax.jit(jax.grad(lambda *a: loss(prefix_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: loss(blocked_prefix_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_path_choice(monkeypatch):
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    monkeypatch.setattr(attention, "prefix_attention_status", lambda: (False, "not built"))
    assert prefix_path(attention.FLASH_MIN_LENGTH - 1, jnp.float32) == "blocked"
    assert prefix_path(attention.FLASH_MIN_LENGTH, jnp.float32) == "flash"
    monkeypatch.setenv(ATTENTION_ENV, "native")  # asked for, not built: the pure flash path
    assert prefix_path(8, jnp.float32) == "flash"
    monkeypatch.setattr(attention, "prefix_attention_status", lambda: (True, "avx2"))
    assert prefix_path(8, jnp.float32) == "native"
    assert prefix_path(8, jnp.bfloat16) == "native"  # widened to float32 for the kernel
    assert prefix_path(8, jnp.float16) == "flash"
    monkeypatch.setenv(ATTENTION_ENV, "")
    assert prefix_path(8, jnp.float32) == "native"
    monkeypatch.setenv(ATTENTION_ENV, "blocked")
    assert prefix_path(10**6, jnp.float32) == "blocked"


def test_a_bad_path_name_is_refused(monkeypatch):
    monkeypatch.setenv(ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match=f"{ATTENTION_ENV} must be one of .*'fast'"):
        prefix_path(8, jnp.float32)


def test_flash_memory_is_linear_in_the_prompt():
    """XLA's own accounting of the compiled program's temporary buffers: doubling T
    doubles flash's (or less) and quadruples the blocked path's."""
    def temp_bytes(fn, length):
        q = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)
        k = jax.ShapeDtypeStruct((1, length, 2, 64), jnp.float32)
        mask = jax.ShapeDtypeStruct((1, length, length), bool)
        return jax.jit(fn).lower(q, k, k, mask).compile().memory_analysis().temp_size_in_bytes

    flash = [temp_bytes(flash_prefix_attention, t) for t in (2048, 4096)]
    blocked = [temp_bytes(blocked_prefix_attention, t) for t in (2048, 4096)]
    assert flash[1] <= 2.2 * flash[0], flash
    assert blocked[1] >= 3.5 * blocked[0], blocked
    assert flash[1] * 8 < blocked[1], (flash, blocked)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_logits_agree_across_paths(monkeypatch, family):
    monkeypatch.setattr(attention, "FLASH_BLOCK", 8)
    config = ModelConfig.tiny(family)
    params = init_params(config, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 19), 0, config.vocab_size)
    valid = padded_valid(2, 19)
    logits = {}
    for forced in ("blocked", "flash"):
        monkeypatch.setenv(ATTENTION_ENV, forced)
        logits[forced] = np.asarray(jax.jit(lambda p, t, v: forward(
            config, p, t, key_valid=v)[0])(params, tokens, valid))
    real = np.asarray(valid)
    np.testing.assert_allclose(logits["flash"][real], logits["blocked"][real],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("forced", ["blocked", "flash", "native"])
def test_cli_eval_reports_its_path_and_every_path_scores_alike(tiny_model_dir, capsys,
                                                                monkeypatch, forced):
    import json

    from jaxopt_llm import cli
    from tests.test_train_cli import CONFIG, TEXT

    directory, text = tiny_model_dir(CONFIG, TEXT, seed=1, scale=2.0)
    monkeypatch.setattr(attention, "FLASH_BLOCK", 16)
    results = {}
    for path in ("blocked", forced):
        monkeypatch.setenv(ATTENTION_ENV, path)
        code = cli.main(["eval", "--model", str(directory), "--text", str(text), "--tokens",
                         "256", "--window", "64", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        results[path] = json.loads(out)
    assert results[forced]["attention"] == prefix_path(64, jnp.float32)
    assert results["blocked"]["attention"] == "blocked"
    assert results[forced]["ppl"] == pytest.approx(results["blocked"]["ppl"], rel=1e-5)
