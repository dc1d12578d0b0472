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

from jaxopt_llm.models import ModelConfig, forward
from jaxopt_llm.placement import Placement

DEFAULT_TOKENS = 65_536
DEFAULT_WINDOW = 512


@dataclasses.dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    tokens_scored: int
    tokens_used: int
    windows: int
    window: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=("config",))
def window_nll(params: Any, windows: jax.Array, *, config: ModelConfig) -> jax.Array:
    """Summed NLL of tokens 1..W-1 of each window given its prefix: (B, W) -> (B,)."""
    logits, _ = forward(config, params, windows)
    logits = logits[:, :-1].astype(jnp.float32)  # (B, W-1, V): predicts tokens 1..W-1
    target_logits = jnp.take_along_axis(logits, windows[:, 1:, None], axis=-1)[..., 0]
    # NLL = logsumexp - target logit; cheaper than materialising log_softmax over the vocab
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - target_logits, axis=-1)


def check_eval_args(num_tokens: int, window: int) -> None:
    if num_tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {num_tokens}")
    if window <= 1:
        raise ValueError(f"--window must be at least 2, got {window}")


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

    With a mesh (`placement=Placement.on_mesh(...)`, or the older `mesh=`; params placed
    by `placement.place_params`), each batch of windows is spread over `data`; batch_size
    is rounded up to a multiple of it.
    """
    check_eval_args(num_tokens, window)
    placement = Placement.resolve(placement, mesh=mesh)
    placement.check(config)
    batch_size = placement.round_batch(batch_size)
    if window > config.max_position_embeddings:
        raise ValueError(f"--window {window} exceeds the model's context of "
                         f"{config.max_position_embeddings} tokens")
    token_ids = np.asarray(token_ids, np.int32)
    available = min(num_tokens, len(token_ids))
    num_windows = available // window
    if num_windows == 0:
        raise ValueError(
            f"the text has {len(token_ids)} tokens, fewer than one window of {window}; "
            "give a longer text or a smaller --window"
        )
    windows = token_ids[: num_windows * window].reshape(num_windows, window)
    nll = 0.0
    for start in range(0, num_windows, batch_size):
        chunk = windows[start:start + batch_size]
        pad = np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)  # fixed compiled shape
        sums = window_nll(params, placement.place_batch(np.concatenate([chunk, pad])),
                          config=config)
        sums = placement.gather(sums)[: len(chunk)]
        nll += float(np.sum(sums, dtype=np.float64))
        if on_window is not None:
            on_window(len(chunk))
    scored = num_windows * (window - 1)
    return PerplexityResult(
        ppl=math.exp(nll / scored), nll_sum=nll, tokens_scored=scored,
        tokens_used=num_windows * window, windows=num_windows, window=window,
    )


__all__ = ["PerplexityResult", "perplexity", "window_nll"]
