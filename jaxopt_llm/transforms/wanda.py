"""Wanda: pruning by weight magnitude times input activation norm, per output.

"A Simple and Effective Pruning Approach for Large Language Models" (Sun et al., ICLR
2024). For a kernel W (K inputs, N outputs) and calibration inputs X (tokens × K), the
score of weight (j, n) is

    S_jn = |W_jn| · ‖X_j‖₂        (‖X_j‖₂ = √(XᵀX)_jj, the norm of input channel j)

and weights are compared per output n (each output loses the same count, the paper's
per-output comparison group), or within every group of m consecutive inputs for N:M.
No weight is updated: the kept ones keep their values. Blocks run layer-sequentially,
so each block's statistics come from the outputs of the blocks already pruned (as the
authors' code does).

Layout: input channel j is row j of a Flax kernel (K, N), so "per output" ranks along
axis 0. The N:M convention is the `nm` op's: n of every m consecutive inputs are zeroed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_llm.calibration import Calibration
from jaxopt_llm.transforms.base import Op, OpOptions
from jaxopt_llm.transforms.layerwise import block_selection, each_linear_sequentially
from jaxopt_llm.transforms.prune import dense_kernel, lowest_mask
from jaxopt_llm.weights.base import WeightLeaf
from jaxopt_llm.weights.sparse import MaskedWeight, masked_weight, nm_sparse_weight

PATTERN_FORMATS = ("masked", "compressed", "dense")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityOptions(OpOptions):
    """What a calibrated pruning op removes: a fraction of every output's inputs
    (`sparsity`), or an N:M pattern (`n` zeroed of every `m` consecutive inputs); and how
    the result is stored ("masked": MaskedWeight; "compressed": NMSparseWeight, N:M only;
    "dense": zeros in a plain array).

    Example:
        >>> SparsityOptions(n=2, m=4).pattern
        'nm'
    """

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    format: str | None = None  # default: masked (unstructured), compressed (N:M)

    @property
    def pattern(self) -> str:
        """'nm' when n and m are given, else 'unstructured'."""
        return "nm" if self.m is not None else "unstructured"

    @property
    def storage(self) -> str:
        """The format in use (the default resolved)."""
        if self.format is not None:
            return self.format
        return "compressed" if self.pattern == "nm" else "masked"

    def validate(self) -> None:
        """Exactly one of sparsity in (0, 1) or integers 0 < n < m ≤ 256; a known format."""
        nm_given = self.n is not None or self.m is not None
        if nm_given == (self.sparsity is not None):
            raise ValueError("give either sparsity (a fraction of each output's inputs) or n "
                             f"and m (an N:M pattern), got sparsity={self.sparsity!r}, "
                             f"n={self.n!r}, m={self.m!r}")
        if nm_given:
            n, m = self.n, self.m
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)):
                raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
            if not 0 < n < m <= 256:
                raise ValueError(f"n:m needs 0 < n < m ≤ 256 (n of every m inputs are "
                                 f"zeroed), got {n}:{m}")
        elif isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in (0, 1), got {self.sparsity!r}")
        if self.format is not None and self.format not in PATTERN_FORMATS:
            raise ValueError(f"format must be one of {PATTERN_FORMATS}, got {self.format!r}")
        if self.format == "compressed" and not nm_given:
            raise ValueError("format 'compressed' (NMSparseWeight) needs an N:M pattern (n, m)")

    def check_kernel(self, path: str, shape: tuple[int, ...]) -> None:
        """A 2-D kernel whose input dimension m divides (N:M), before any work."""
        if len(shape) != 2:
            raise ValueError(f"{path} has shape {shape}: pruning selects 2-D kernels only")
        if self.pattern == "nm" and shape[0] % self.m:
            raise ValueError(f"{path} {shape}: m={self.m} does not divide the input "
                             f"dimension {shape[0]}")
        if self.pattern == "unstructured" and round(self.sparsity * shape[0]) in (0, shape[0]):
            raise ValueError(f"{path} {shape}: sparsity {self.sparsity} of {shape[0]} inputs "
                             "per output removes nothing or everything")


def store(w: jax.Array, keep: jax.Array, options: SparsityOptions) -> Any:
    """The pruned kernel in the options' format.

    Args:
        w: the kernel (K, N) (its removed entries may hold anything).
        keep: booleans (K, N), True where kept.
        options: the pattern and format.

    Returns:
        A MaskedWeight, an NMSparseWeight ("compressed") or a dense array with zeros.

    Example:
        >>> out = store(jnp.ones((2, 1)), jnp.array([[True], [False]]),
        ...             SparsityOptions(sparsity=0.5, format="dense"))
        >>> out.tolist()
        [[1.0], [0.0]]
    """
    fmt = options.storage
    if fmt == "dense":
        return jnp.where(keep, w, jnp.zeros((), w.dtype))
    if fmt == "compressed":
        return nm_sparse_weight(w, keep, options.m - options.n, options.m)
    return masked_weight(w, keep)


def wanda_keep_mask(w: jax.Array, input_norms: jax.Array, options: SparsityOptions
                    ) -> jax.Array:
    """Wanda's keep-mask of a kernel w (K, N) from its inputs' norms ‖X_j‖₂ (K,).

    Args:
        w: the kernel (K, N).
        input_norms: ‖X_j‖₂ per input channel (K,).
        options: sparsity per output, or n zeroed of every m consecutive inputs.

    Returns:
        Booleans (K, N), True where kept: per output, the lowest |W|·‖X‖ scores are
        dropped (ties: the earlier input first).

    Example:
        >>> w = jnp.array([[1.0, 1.0], [2.0, -1.0], [1.0, 3.0], [-1.0, 1.0]])
        >>> keep = wanda_keep_mask(w, jnp.array([4.0, 1.0, 1.0, 1.0]),
        ...                        SparsityOptions(sparsity=0.5))
        >>> keep.astype(int).T.tolist()
        [[1, 1, 0, 0], [1, 0, 1, 0]]
    """
    scores = jnp.abs(w) * input_norms[:, None]
    if options.pattern == "nm":
        k, cols = w.shape
        groups = scores.reshape(k // options.m, options.m, cols)
        return lowest_mask(groups, options.n, axis=1).reshape(k, cols)
    return lowest_mask(scores, round(options.sparsity * w.shape[0]), axis=0)


@partial(jax.jit, static_argnames=("options",))
def _wanda_one(w: jax.Array, gram: jax.Array, options: SparsityOptions) -> Any:
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
    return store(w, wanda_keep_mask(w, norms, options), options)


def wanda_leaf(leaf: Any, path: str, options: SparsityOptions, gram: jax.Array) -> Any:
    """Prune one kernel with Wanda given its inputs' Gram matrix XᵀX (K, K).

    Args:
        leaf: the float kernel (K, N) (or a MaskedWeight being pruned further).
        path: its parameter path (for errors).
        options: the `SparsityOptions`.
        gram: XᵀX of its calibration inputs (only the diagonal is used).

    Returns:
        The pruned kernel in the options' format.

    Example:
        >>> w = jnp.array([[1.0], [-2.0], [3.0], [0.5]])
        >>> gram = jnp.diag(jnp.array([16.0, 1.0, 1.0, 1.0]))  # input 0 is 4× louder
        >>> out = wanda_leaf(w, "w", SparsityOptions(sparsity=0.5, format="dense"), gram)
        >>> out[:, 0].tolist()
        [1.0, 0.0, 3.0, 0.0]
    """
    w = dense_kernel(leaf, path)
    options.check_kernel(path, w.shape)
    return _wanda_one(w, gram, options)


def check_selection(flat: Mapping[str, Any], paths: list[str], config: Any, op: str,
                    options: SparsityOptions) -> dict[int, list[str]]:
    """Every check a calibrated pruning op makes before work: block membership, float
    kernels, shapes that fit the pattern.

    Args:
        flat: the parameters (arrays or their shapes), by path.
        paths: the selected paths.
        config: the model config.
        op: the op's name, for messages.
        options: the pattern.

    Returns:
        The selected paths grouped by block index.

    Example:
        >>> from jaxopt_llm.models import ModelConfig
        >>> config = ModelConfig.tiny(num_layers=1)
        >>> flat = {"layers_0/mlp/up_proj/kernel": jnp.ones((32, 64))}
        >>> check_selection(flat, list(flat), config, "wanda", SparsityOptions(sparsity=0.5))
        {0: ['layers_0/mlp/up_proj/kernel']}
    """
    by_block = block_selection(flat, paths, config, op)
    for path in paths:
        leaf = flat[path]
        if isinstance(leaf, WeightLeaf) and not isinstance(leaf, MaskedWeight):
            raise ValueError(f"{path}: pruning needs a float kernel, got "
                             f"{type(leaf).__name__} (prune before quantizing or factorizing)")
        options.check_kernel(path, tuple(leaf.shape))
    return by_block


def _plan(flat: Mapping[str, Any], paths: list[str], config: Any, options: SparsityOptions,
          op: str = "wanda") -> tuple[Any, dict[str, Any]]:
    check_selection(flat, paths, config, op, options)

    def shapes(f):
        out = dict(f)
        for path in paths:
            w = jnp.zeros(f[path].shape, f[path].dtype)
            out[path] = store(w, jnp.ones(w.shape, jnp.bool_), options)
        return out

    return config, jax.eval_shape(shapes, dict(flat))


def calibrated_prune(flat: Mapping[str, Any], paths: list[str], config: Any,
                     calibration: Calibration, op: str, options: SparsityOptions,
                     prune_leaf: Any) -> tuple[Any, dict[str, Any]]:
    """Run `prune_leaf(leaf, path, options, gram)` on every selected block linear,
    blocks in order (layer-sequential), after every check.

    Args:
        flat: the parameters by path.
        paths: the selected block linears.
        config: the model config.
        calibration: the calibration windows.
        op: the op's name, for messages.
        options: the pattern (and the algorithm's settings).
        prune_leaf: prunes one kernel given the Gram matrix of its inputs.

    Returns:
        (config, the new parameters by path).

    Example:
        >>> calibrated_prune(flat, paths, config, calibration, "wanda", options,
        ...                  wanda_leaf)  # doctest: +SKIP
    """
    by_block = check_selection(flat, paths, config, op, options)
    new = each_linear_sequentially(
        flat, by_block, config, calibration,
        lambda leaf, path, stats: prune_leaf(leaf, path, options, stats.gram))
    return config, new


def _apply(flat: Mapping[str, Any], paths: list[str], config: Any, options: SparsityOptions,
           *, calibration: Calibration) -> tuple[Any, dict[str, Any]]:
    return calibrated_prune(flat, paths, config, calibration, "wanda", options, wanda_leaf)


OPS = (
    Op(name="wanda", options=SparsityOptions, apply=_apply, plan=_plan, traceable=False,
       needs_calibration=True,
       doc="Wanda: prune by |W|·‖X‖ per output (unstructured or N:M), from calibration"),
)

__all__ = ["OPS", "SparsityOptions", "calibrated_prune", "check_selection", "store",
           "wanda_keep_mask", "wanda_leaf"]
