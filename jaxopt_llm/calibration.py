"""Calibration: what calibrated passes know about a model's activations.

Calibrated algorithms (GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT, ASVD, SVD-LLM, FLAP)
need, per linear layer, statistics of its inputs X (tokens × d_in) over calibration
text: the Gram matrix XᵀX (GPTQ/SparseGPT Hessians, SVD-LLM whitening, Wanda's ‖X_j‖₂ on
its diagonal), per input channel the sum, mean |X| and max |X| (AWQ, SmoothQuant, ASVD,
FLAP's fluctuation). `Calibration` holds the token windows; `layer_sequential` runs the
model block by block ("GPTQ", Frantar et al., 2023, §4): the statistics of block i come
from the outputs of blocks 0..i-1 *after* they were compressed, so each block corrects
the error of the ones before it.

Memory stays bounded: the hidden states of the calibration windows (W × T × D floats)
and, for one block at a time, one accumulator per distinct linear input (q/k/v share
theirs); activations are never kept. Statistics are computed under `jit`; with a mesh
placement the windows are spread over `data` and XLA reduces the sums across it.

Calibration text must never overlap the evaluation tokens: the default is the part of
the embedded pydoc text after the first 65,536 tokens (the same split training uses).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.errors import ParameterError
from jaxopt_llm.models import ModelConfig, family_spec, model_mask
from jaxopt_llm.models.layers import Linear
from jaxopt_llm.placement import Placement

EVAL_TOKENS = 65_536  # the evaluation protocol's default: calibration starts after these
DEFAULT_WINDOW = 512
DEFAULT_MAX_WINDOWS = 128


@dataclasses.dataclass(frozen=True)
class LinearStats:
    """Statistics of one linear's inputs X (n tokens × K channels), accumulated.

    Attributes:
      tokens: n.
      gram: XᵀX (K, K), float32.
      total: Σ_t X_tj (K,).
      abs_total: Σ_t |X_tj| (K,).
      abs_max: max_t |X_tj| (K,).
    """

    tokens: int
    gram: jax.Array
    total: jax.Array
    abs_total: jax.Array
    abs_max: jax.Array

    @property
    def mean(self) -> jax.Array:
        """Mean of each input channel (K,)."""
        return self.total / self.tokens

    @property
    def mean_abs(self) -> jax.Array:
        """Mean |X_j| per input channel (K,) (AWQ's activation scale, ASVD's S)."""
        return self.abs_total / self.tokens

    @property
    def norm(self) -> jax.Array:
        """‖X_j‖₂ per input channel (K,) (Wanda's score factor)."""
        return jnp.sqrt(jnp.maximum(jnp.diagonal(self.gram), 0.0))

    @property
    def variance(self) -> jax.Array:
        """Sample variance of each input channel (K,) (FLAP's fluctuation)."""
        mean = self.mean
        return jnp.maximum(jnp.diagonal(self.gram) / self.tokens - mean * mean, 0.0) * (
            self.tokens / max(self.tokens - 1, 1))

    def merge(self, other: LinearStats) -> LinearStats:
        """Statistics of both token sets together (sums add, maxima take the larger).

        Args:
          other: statistics of other tokens of the same linear.

        Returns:
          The combined LinearStats.

        Example:
          >>> a = input_stats(jnp.ones((2, 3)))
          >>> a.merge(a).tokens
          4
        """
        return LinearStats(tokens=self.tokens + other.tokens, gram=self.gram + other.gram,
                           total=self.total + other.total,
                           abs_total=self.abs_total + other.abs_total,
                           abs_max=jnp.maximum(self.abs_max, other.abs_max))


def input_stats(x: jax.Array) -> LinearStats:
    """Statistics of a linear's inputs.

    Args:
      x: inputs (..., K); every leading position is one token.

    Returns:
      LinearStats with XᵀX (computed in float32 at highest precision) and per-channel sums.

    Example:
      >>> stats = input_stats(jnp.array([[1.0, -2.0], [3.0, 0.0]]))
      >>> stats.gram.tolist(), stats.abs_max.tolist()
      ([[10.0, -2.0], [-2.0, 4.0]], [3.0, 2.0])
    """
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return LinearStats(tokens=int(x2.shape[0]),
                       gram=jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST),
                       total=jnp.sum(x2, axis=0), abs_total=jnp.sum(jnp.abs(x2), axis=0),
                       abs_max=jnp.max(jnp.abs(x2), axis=0))


jax.tree_util.register_dataclass(
    LinearStats, data_fields=["gram", "total", "abs_total", "abs_max"], meta_fields=["tokens"])


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration token windows (W, T) and how to run them.

    Attributes:
      windows: int32 token ids, one window per row (every token is a real token).
      source: where the tokens came from (for reports).
      batch_size: windows per compiled step.
      placement: one device or a mesh (windows spread over `data`).
      progress: called with a short line as work advances (e.g. to drive a progress bar).
    """

    windows: np.ndarray
    source: str = "tokens"
    batch_size: int = 8
    placement: Placement = dataclasses.field(default_factory=Placement.single)
    progress: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        windows = np.asarray(self.windows)
        if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
            raise ValueError(f"calibration windows must be a (windows, tokens) array with at "
                             f"least one window of 2+ tokens, got shape {windows.shape}")
        if not np.issubdtype(windows.dtype, np.integer):
            raise ValueError(f"calibration windows must hold integer token ids, got "
                             f"{windows.dtype}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        object.__setattr__(self, "windows", windows.astype(np.int32))

    @property
    def num_tokens(self) -> int:
        """Calibration tokens in all windows."""
        return int(self.windows.size)

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)


def calibration_windows(token_ids: Any, *, num_tokens: int | None = None,
                        window: int = DEFAULT_WINDOW, skip: int = 0,
                        max_windows: int = DEFAULT_MAX_WINDOWS) -> np.ndarray:
    """Non-overlapping windows of `window` tokens from token_ids[skip:].

    Args:
      token_ids: a 1-D sequence of token ids.
      num_tokens: use at most this many tokens (after `skip`); None: all.
      window: tokens per window.
      skip: tokens left out at the start (the evaluation tokens).
      max_windows: at most this many windows.

    Returns:
      int32 array (W, window).

    Raises:
      ValueError: fewer tokens than one window, or bad sizes (each error names its parameter).

    Example:
      >>> calibration_windows(range(10), window=4, skip=1).tolist()
      [[1, 2, 3, 4], [5, 6, 7, 8]]
    """
    for name, value in (("window", window), ("max_windows", max_windows),
                        ("num_tokens", num_tokens)):
        if value is None and name == "num_tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ParameterError(name, value, "must be a positive integer")
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)[skip:]
    if num_tokens is not None and num_tokens < window:
        raise ParameterError("num_tokens", num_tokens, f"calibration needs at least one "
                             f"window of {window} tokens")
    if num_tokens is not None:
        ids = ids[:num_tokens]
    count = min(len(ids) // window, max_windows)
    if count == 0:
        raise ValueError(f"calibration needs at least one window of {window} tokens, the "
                         f"calibration text has {len(ids)}; give more calibration text")
    return ids[:count * window].reshape(count, window).astype(np.int32)


def default_calibration(tokenizer: Any, *, num_tokens: int | None = None,
                        window: int = DEFAULT_WINDOW, text: str | None = None,
                        **kwargs: Any) -> Calibration:
    """Calibration windows from `text`, or by default from the embedded pydoc text after its
    first 65,536 tokens (the evaluation tokens are never seen).

    Args:
      tokenizer: anything with `encode(text) -> list[int]` (the model's tokenizer).
      num_tokens: use at most this many calibration tokens; None: all (≤ 128 windows).
      window: tokens per window.
      text: calibration text; None: the embedded text after the evaluation tokens.
      **kwargs: `Calibration` fields (batch_size, placement, progress).

    Returns:
      A Calibration whose `source` names the text, its sha256 and the token count.

    Example:
      >>> calib = default_calibration(loaded.tokenizer)  # doctest: +SKIP
      >>> calib.windows.shape  # doctest: +SKIP
      (92, 512)
    """
    from jaxopt_llm.data import pydoc_text, text_sha256

    if text is None:
        source_text, skip, name = pydoc_text(), EVAL_TOKENS, "pydoc text after 65,536 tokens"
    else:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text: calibration text is empty")
        source_text, skip, name = text, 0, "calibration text"
    ids = tokenizer.encode(source_text)
    windows = calibration_windows(ids, num_tokens=num_tokens, window=window, skip=skip)
    return Calibration(windows=windows, **kwargs,
                       source=f"{name} (sha256 {text_sha256(source_text)[:12]}…, "
                              f"{windows.size} tokens)")


# ------------------------------------------------------------------- running blocks


def _linear_inputs(module: nn.Module, apply: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run `apply` recording the input of every `Linear` call (keyed by its path in the
    block, e.g. "attn/q_proj"); linears fed the same array share one entry."""
    seen: dict[str, Any] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            seen["/".join(context.module.path)] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        out = apply()
    return out, seen


class BlockRunner:
    """Runs one block of `config` on hidden states, compiled once per block shape."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.spec = family_spec(config)
        self.module = self.spec.block_module(config)

        def run(block_params, x, args, mask):
            return self.module.apply({"params": block_params}, x, *args, mask)[0]

        def run_with_stats(block_params, x, args, mask):
            (y, _), inputs = _linear_inputs(self.module, lambda: self.module.apply(
                {"params": block_params}, x, *args, mask))
            unique: dict[int, LinearStats] = {}
            stats = {}
            for name, value in inputs.items():
                if id(value) not in unique:
                    unique[id(value)] = input_stats(value)
                stats[name] = unique[id(value)]
            return y, stats

        self.run = jax.jit(run)
        self.run_with_stats = jax.jit(run_with_stats)


@dataclasses.dataclass
class BlockContext:
    """What a layer-wise pass sees of block `index`: its path, its parameters, the
    statistics of its linears' inputs (keyed "attn/q_proj", …) and a way to run it on the
    calibration hidden states (AWQ's and SmoothQuant's searches compare block outputs)."""

    index: int
    path: str
    params: Mapping[str, Any]
    stats: dict[str, LinearStats]
    runner: BlockRunner
    inputs: list[tuple[jax.Array, tuple[Any, ...], jax.Array]]

    def outputs(self, block_params: Any) -> list[jax.Array]:
        """The block's outputs for every calibration batch under `block_params`."""
        return [self.runner.run(block_params, x, args, mask) for x, args, mask in self.inputs]

    def sample(self, windows: int) -> tuple[jax.Array, tuple[Any, ...], jax.Array]:
        """The block's inputs (x, args, mask) for the first `windows` calibration windows
        (all of them if there are fewer), as one batch — what a search runs the block on.

        Args:
          windows: how many windows (a positive int).

        Returns:
          (x (W, T, D), args, mask), every array cut along its leading (window) axis.
        """
        parts = []
        count = 0
        for batch in self.inputs:
            parts.append(batch)
            count += batch[0].shape[0]
            if count >= windows:
                break
        joined = jax.tree_util.tree_map(lambda *arrays: jnp.concatenate(arrays, axis=0)[:windows],
                                        *parts)
        return joined[0], tuple(joined[1]), joined[2]


def layer_sequential(
    config: ModelConfig,
    params: Mapping[str, Any],
    calibration: Calibration,
    compress: Callable[[BlockContext], Any],
    *,
    blocks: range | None = None,
) -> dict[str, Any]:
    """Compress the model block by block on calibration data.

    For each block (in order): collect its linears' input statistics from the current
    hidden states, call `compress(context)` for its new parameters, then run the new block
    to get the next block's inputs. Blocks after the last one in `blocks` are not run.

    Args:
      config: the model's config (any built-in family).
      params: the parameter tree.
      calibration: the calibration windows.
      compress: BlockContext → the block's new parameter subtree.
      blocks: the block indices to compress (default: all).

    Returns:
      The parameter tree with every compressed block replaced.

    Example:
      >>> new = layer_sequential(config, params, calib, lambda ctx: ctx.params)  # doctest: +SKIP
    """
    spec = family_spec(config)
    blocks = range(config.num_layers) if blocks is None else blocks
    if not blocks:
        return dict(params)
    placement = calibration.placement
    batch = calibration.batch_size
    if placement.is_mesh:
        data = placement.mesh.shape["data"]
        if len(calibration.windows) % data:
            raise ValueError(f"calibration: {len(calibration.windows)} windows cannot be "
                             f"spread evenly over data={data}; use a multiple of {data}")
        batch = math.ceil(batch / data) * data
    windows = calibration.windows
    length = windows.shape[1]
    runner = BlockRunner(config)
    embed = jax.jit(lambda p, tokens, positions: spec.block_inputs(config, p, tokens, positions))
    inputs = []
    for start in range(0, len(windows), batch):
        tokens = placement.place_batch(windows[start:start + batch])
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
        mask = model_mask(config, jnp.ones(tokens.shape, bool), 0, length)
        x, args = embed(params, tokens, positions)
        inputs.append((x, args, mask))
    out = dict(params)
    for index in range(max(blocks) + 1):
        path = spec.block(index)
        block_params = out[path]
        if index in blocks:
            calibration._say(f"block {index + 1}/{config.num_layers}: statistics")
            stats: dict[str, LinearStats] = {}
            outputs = []
            for x, args, mask in inputs:
                y, batch_stats = runner.run_with_stats(block_params, x, args, mask)
                outputs.append(y)
                stats = batch_stats if not stats else {
                    name: stats[name].merge(value) for name, value in batch_stats.items()}
            context = BlockContext(index=index, path=path, params=block_params, stats=stats,
                                   runner=runner, inputs=inputs)
            calibration._say(f"block {index + 1}/{config.num_layers}: compressing")
            compressed = compress(context)
            if compressed is not block_params:  # else the outputs computed above still hold
                outputs = None
            block_params = out[path] = compressed
        else:
            outputs = None
        if index < max(blocks):
            if outputs is None:
                outputs = [runner.run(block_params, x, args, mask) for x, args, mask in inputs]
            inputs = [(y, args, mask) for y, (_, args, mask) in zip(outputs, inputs, strict=True)]
    return out


def linear_statistics(config: ModelConfig, params: Mapping[str, Any],
                      calibration: Calibration) -> dict[str, LinearStats]:
    """Input statistics of every block linear of the model as it is (no compression).

    Args:
      config: the model's config.
      params: its parameter tree.
      calibration: the calibration windows.

    Returns:
      {"layers_0/attn/q_proj": LinearStats, …} (linears fed the same input share one).

    Example:
      >>> stats = linear_statistics(config, params, calibration)  # doctest: +SKIP
      >>> stats["layers_0/mlp/down_proj"].gram.shape  # doctest: +SKIP
      (1536, 1536)
    """
    found: dict[str, LinearStats] = {}

    def keep(context: BlockContext) -> Any:
        for name, value in context.stats.items():
            found[f"{context.path}/{name}"] = value
        return context.params

    layer_sequential(config, params, calibration, keep)
    return found


__all__ = ["BlockContext", "BlockRunner", "Calibration", "LinearStats", "calibration_windows",
           "default_calibration", "input_stats", "layer_sequential", "linear_statistics"]
