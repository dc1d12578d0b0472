"""A miniature parameter tree and recipe helpers shared by tests/test_pipeline.py and the op
tests in tests/transforms/ (imported by module name: pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.tree import flatten, unflatten
from jaxopt_llm.weights import materialize

# A miniature "model": (d_in, d_out) kernels, an embedding table, norms and a bias.
SHAPES = {
    "embed_tokens/embedding": (32, 16),
    "layers_0/attn/q_proj/kernel": (16, 8),
    "layers_0/attn/o_proj/kernel": (8, 16),
    "layers_0/input_norm/scale": (16,),
    "layers_0/mlp/up_proj/kernel": (16, 12),
    "layers_0/mlp/up_proj/bias": (12,),
    "layers_0/mlp/down_proj/kernel": (12, 16),
    "norm/scale": (16,),
}
KERNELS = [p for p in SHAPES if p.endswith("/kernel")]


def mini_tree(seed=0, as_numpy=False):
    """The tree of SHAPES, standard-normal float32 values (jax arrays unless `as_numpy`)."""
    rng = np.random.default_rng(seed)
    flat = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    if not as_numpy:
        flat = {p: jnp.asarray(v) for p, v in flat.items()}
    return unflatten(flat)


def make_stage(*rules, name="s"):
    """A stage of these rules."""
    return Stage(name=name, rules=tuple(rules))


def make_recipe(*stages, name="r"):
    """A recipe of these stages."""
    return Recipe(name=name, stages=tuple(stages))


def jit_run(*passes, params):
    """Each pass on `params`, all in one jitted call: [(flat output, flat dense output)]."""

    def run(p):
        outs = [pass_(None, p)[1] for pass_ in passes]
        return [(out, materialize(out)) for out in outs]

    return [(flatten(out), {k: np.asarray(v) for k, v in flatten(dense).items()})
            for out, dense in jax.jit(run)(params)]


def rtn_reference(w, bits, symmetric, axis, scale_dtype=np.float32):
    """Hand-written round-to-nearest with one scale per slice along the contraction `axis`."""
    w = w.astype(np.float32)

    def stored(scale):  # scales are stored (and used) in scale_dtype
        return scale.astype(scale_dtype).astype(np.float32)

    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = stored(np.max(np.abs(w), axis=axis, keepdims=True) / np.float32(qmax))
        q = np.clip(np.round(w / scale), -qmax - 1, qmax)
        return (q * scale).astype(np.float32)
    qmax = 2 ** bits - 1
    lo = np.minimum(np.min(w, axis=axis, keepdims=True), np.float32(0))
    hi = np.maximum(np.max(w, axis=axis, keepdims=True), np.float32(0))
    scale = stored((hi - lo) / np.float32(qmax))
    zero = np.clip(np.round(-lo / scale), 0, qmax)
    u = np.clip(np.round(w / scale) + zero, 0, qmax)
    return ((u - zero) * scale).astype(np.float32)
