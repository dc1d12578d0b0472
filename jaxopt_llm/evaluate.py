"""Perplexity by the protocol of docs/evaluation.md.

Take the first N tokens, cut them into non-overlapping windows of W tokens,
score every token of a window but the first given its prefix, and report
exp(mean NLL) over all scored tokens. N is floored to whole windows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.errors import ParameterError
from jaxopt_llm.models import ModelConfig, forward
from jaxopt_llm.placement import Placement

DEFAULT_TOKENS = 65_536
DEFAULT_WINDOW = 512


@dataclasses.dataclass
class PerplexityResult:
    """What `perplexity` measured.

    Attributes:
        ppl: exp(nll_sum / tokens_scored).
        nll_sum: summed negative log-likelihood (nats) of the scored tokens.
        tokens_scored: windows × (window − 1): every token but each window's first.
        tokens_used: windows × window.
        windows: how many windows were scored.
        window: the window length.
    """
    ppl: float
    nll_sum: float
    tokens_scored: int
    tokens_used: int
    windows: int
    window: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (the CLI's JSON record).

        Returns:
            {field: value}.
        """
        return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=("config", "row_chunks"))
def window_nll(params: Any, windows: jax.Array, *, config: ModelConfig,
               row_chunks: bool = False) -> jax.Array:
    """Summed NLL of tokens 1..W-1 of each window given its prefix: (B, W) -> (B,).

    Args:
        params: the parameter tree.
        windows: (B, W) int32 token ids.
        config: the model's config (static).
        row_chunks: compute the logsumexp a few rows at a time (`row_logsumexp`; static):
            faster on XLA's CPU backend, for one device only (it loops over the rows, so
            on a mesh it would serialise the sharded batch).

    Returns:
        (B,) float32 sums of −log p(token | prefix).
    """
    logits, _ = forward(config, params, windows)
    logits = logits.astype(jnp.float32)  # (B, W, V); position t predicts token t+1
    # the last position predicts nothing: it gets a dummy target and is dropped at the end,
    # after the vocabulary-wide work (slicing the logits first would copy all of them)
    targets = jnp.concatenate([windows[:, 1:], jnp.zeros_like(windows[:, :1])], axis=1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # NLL = logsumexp - target logit; cheaper than materialising log_softmax over the vocab
    if row_chunks:
        lse = row_logsumexp(logits.reshape(-1, logits.shape[-1])).reshape(target_logits.shape)
    else:
        lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum((lse - target_logits)[:, :-1], axis=-1)


# Rows per step of `row_logsumexp`.
LOGSUMEXP_ROWS = 8


def row_logsumexp(rows: jax.Array) -> jax.Array:
    """logsumexp of each row of a (R, V) float32 array, LOGSUMEXP_ROWS rows per step.

    `jax.nn.logsumexp(rows, axis=-1)` computed a block of rows at a time (max-shifted, so
    large logits do not overflow; a row of -inf gives -inf). On XLA's CPU backend the
    one-shot form computes exp(rows - max) with a slow, single-threaded loop (SmolLM2's
    512 × 49,152 window: 56 ms for the exp alone); a few rows at a time take its fast
    reduction path (97 ms → 24 ms for the whole NLL).

    Args:
        rows: (R, V) float32.

    Returns:
        (R,) float32.

    Example:
        >>> x = jnp.array([[0.0, 0.0], [1000.0, 1000.0]])
        >>> [round(float(v), 3) for v in row_logsumexp(x)]
        [0.693, 1000.693]
    """
    def block(r: jax.Array) -> jax.Array:
        peak = jax.lax.stop_gradient(r.max(-1, keepdims=True))
        peak = jnp.where(jnp.isfinite(peak), peak, 0.0)  # all -inf (or an inf): no shift
        return jnp.log(jnp.exp(r - peak).sum(-1)) + peak[..., 0]

    return jax.lax.map(block, rows, batch_size=LOGSUMEXP_ROWS)


def check_eval_args(num_tokens: int, window: int) -> None:
    """Raise a ParameterError for a non-positive `num_tokens` or a `window` below 2.

    Args:
        num_tokens: tokens to evaluate.
        window: the window length.

    Example:
        >>> check_eval_args(4096, 1)
        Traceback (most recent call last):
        ...
        jaxopt_llm.errors.ParameterError: window=1: must be at least 2
    """
    if num_tokens <= 0:
        raise ParameterError("num_tokens", num_tokens, "must be positive")
    if window <= 1:
        raise ParameterError("window", window, "must be at least 2")


def perplexity(
    config: ModelConfig,
    params: Any,
    token_ids: np.ndarray,
    *,
    num_tokens: int = DEFAULT_TOKENS,
    window: int = DEFAULT_WINDOW,
    batch_size: int = 1,
    on_window: Callable[[int], None] | None = None,
    mesh: Any = None,
    placement: Placement | None = None,
) -> PerplexityResult:
    """Perplexity of the first num_tokens of token_ids (floored to whole windows).

    The protocol of docs/evaluation.md: non-overlapping windows of `window` tokens, every
    token but a window's first scored given its prefix, ppl = exp(mean NLL).

    Args:
        config: the model's config.
        params: the parameter tree (placed by `placement.place_params` on a mesh).
        token_ids: the tokenized text.
        num_tokens: how many leading tokens to use (at most the text's length).
        window: the window length (at most the model's context).
        batch_size: windows per compiled step (rounded up to a multiple of the mesh's
            `data` axis; the last batch is padded).
        on_window: called with the number of windows each step finished (progress bars).
        mesh: the older way to give a mesh (prefer `placement`).
        placement: where to run (default one device); on a mesh each batch of windows is
            spread over `data`.

    Returns:
        A `PerplexityResult`.

    Raises:
        ParameterError: bad num_tokens or window, or a text shorter than one window.
        FloatingPointError: non-finite logits, or a perplexity beyond float range (both
            mean damaged or non-finite weights).

    Example:
        >>> import jax, numpy as np
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> config = ModelConfig.tiny()
        >>> ids = np.arange(256) % 64
        >>> result = perplexity(config, init_params(config, jax.random.key(0)), ids,
        ...                     num_tokens=256, window=64)
        >>> result.windows, result.tokens_scored
        (4, 252)
    """
    check_eval_args(num_tokens, window)
    if config.is_encoder:
        raise ParameterError("config", config.model_type, "is an encoder: perplexity needs a "
                             "decoder (encoders are evaluated by encoders.evaluate_encoder)")
    placement = Placement.resolve(placement, mesh=mesh)
    placement.check(config)
    batch_size = placement.round_batch(batch_size)
    if window > config.max_position_embeddings:
        raise ParameterError("window", window, f"exceeds the model's context of "
                                               f"{config.max_position_embeddings} tokens")
    token_ids = np.asarray(token_ids, np.int32)
    available = min(num_tokens, len(token_ids))
    num_windows = available // window
    if num_windows == 0:
        raise ParameterError(
            "window", window, f"the text has {len(token_ids)} tokens, fewer than one window; "
                              "give a longer text or a smaller window"
        )
    windows = token_ids[: num_windows * window].reshape(num_windows, window)
    row_chunks = not placement.is_mesh and jax.default_backend() == "cpu"
    nll = 0.0
    for start in range(0, num_windows, batch_size):
        chunk = windows[start:start + batch_size]
        pad = np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)  # fixed compiled shape
        sums = window_nll(params, placement.place_batch(np.concatenate([chunk, pad])),
                          config=config, row_chunks=row_chunks)
        sums = placement.gather(sums)[: len(chunk)]
        nll += float(np.sum(sums, dtype=np.float64))
        if on_window is not None:
            on_window(len(chunk))
    scored = num_windows * (window - 1)
    mean = nll / scored
    if not math.isfinite(mean):
        raise FloatingPointError(
            f"the model's log-likelihood is {mean} (non-finite logits): the weights are "
            "likely non-finite or damaged")
    if mean > 700.0:  # exp overflows float64 beyond ~709.8
        raise FloatingPointError(
            f"perplexity overflows (mean NLL {mean:.1f} nats per token): the weights are "
            "likely damaged")
    return PerplexityResult(
        ppl=math.exp(mean), nll_sum=nll, tokens_scored=scored,
        tokens_used=num_windows * window, windows=num_windows, window=window,
    )


__all__ = ["PerplexityResult", "perplexity", "window_nll"]
