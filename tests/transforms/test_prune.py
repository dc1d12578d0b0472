"""Magnitude pruning (per layer, per row, global) and N:M pruning in recipes against numpy
argsort references."""

from __future__ import annotations

import jax
import numpy as np
from pipeline_helpers import KERNELS, jit_run, make_recipe, make_stage, mini_tree

from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.tree import flatten
from jaxopt_llm.weights import MaskedWeight, NMSparseWeight

# ----------------------------------------------------------------------- magnitude pruning


def _prune(*sparsities, scope, fmt="masked"):
    """Per sparsity, (flat input, flat output, flat dense output) of pruning every kernel."""
    params = mini_tree()
    stages = [make_stage(rule(BLOCK_LINEARS, "prune", sparsity=s, scope=scope, format=fmt))
              for s in sparsities]
    before = {p: np.asarray(v) for p, v in flatten(params).items()}
    return [(before, out, dense) for out, dense in jit_run(*stages, params=params)]


def _argsort_keep(scores, count):
    """Keep-mask dropping the `count` lowest scores (stable order: ties drop the lower index)."""
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores.ravel(), kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


SPARSITIES = (0.0, 0.3, 0.75)


def test_magnitude_per_layer_matches_argsort():
    for sparsity, (before, after, dense) in zip(SPARSITIES, _prune(*SPARSITIES, scope="layer"),
                                                strict=True):
        for path in KERNELS:
            w, leaf = before[path], after[path]
            assert isinstance(leaf, MaskedWeight) and leaf.shape == w.shape
            count = round(sparsity * w.size)
            keep = _argsort_keep(np.abs(w), count)
            assert int(np.sum(dense[path] == 0)) == count, (sparsity, path)
            np.testing.assert_array_equal(dense[path], np.where(keep, w, 0))
            np.testing.assert_array_equal(np.asarray(leaf.w), np.where(keep, w, 0))


def test_magnitude_per_row_and_dense_format():
    params = mini_tree()
    before = {p: np.asarray(v) for p, v in flatten(params).items()}
    sparsities = (0.25, 0.6)
    stages = [make_stage(rule(BLOCK_LINEARS, "prune", sparsity=s, scope="row")) for s in sparsities]
    results = jit_run(*stages, make_stage(rule(BLOCK_LINEARS, "prune", sparsity=0.6, scope="row",
                                               format="dense")), params=params)
    for sparsity, (after, dense) in zip(sparsities, results, strict=False):
        for path in KERNELS:
            assert isinstance(after[path], MaskedWeight)
            w = before[path]
            d_in, d_out = w.shape
            count = round(sparsity * d_in)
            keep = np.ones_like(w, bool)
            for j in range(d_out):  # each output channel: a column of the (d_in, d_out) kernel
                assert int(np.sum(dense[path][:, j] == 0)) == count, (path, j)
                keep[:, j] = _argsort_keep(np.abs(w[:, j]), count)
            np.testing.assert_array_equal(dense[path], np.where(keep, w, 0))
    (_, masked_dense), (plain, _) = results[1:]
    for path in KERNELS:  # format "dense": a plain array equal to the materialized mask
        assert isinstance(plain[path], jax.Array)
        np.testing.assert_array_equal(np.asarray(plain[path]), masked_dense[path])


def test_magnitude_global_one_threshold():
    sparsities = (0.3, 0.5)
    for sparsity, (before, _, dense) in zip(sparsities, _prune(*sparsities, scope="global"),
                                            strict=True):
        scores = np.concatenate([np.abs(before[p]).ravel() for p in KERNELS])
        count = round(sparsity * scores.size)
        pruned = np.concatenate([(dense[p] == 0).ravel() for p in KERNELS])
        assert int(pruned.sum()) == count
        assert scores[pruned].max() <= scores[~pruned].min()  # one threshold over all layers
        np.testing.assert_array_equal(~pruned, _argsort_keep(scores, count))
        # layers lose different fractions: one global threshold, not one per layer
        assert len({float(np.mean(dense[p] == 0)) for p in KERNELS}) > 1


def test_repruning_a_masked_weight_starts_from_it():
    attn = r"layers_0/attn/.*kernel"
    recipe = make_recipe(make_stage(rule(attn, "prune", sparsity=0.25), name="a"),
                         make_stage(rule(attn, "prune", sparsity=0.5), name="b"))
    once = make_stage(rule(attn, "prune", sparsity=0.5))
    (_, twice), (_, single) = jit_run(recipe, once, params=mini_tree())
    # zeroing the smallest first leaves the magnitude order unchanged
    for path in ("layers_0/attn/q_proj/kernel", "layers_0/attn/o_proj/kernel"):
        np.testing.assert_array_equal(twice[path], single[path])


# ------------------------------------------------------------------------------------ N:M


def _nm_reference(w, n, m):
    """Keep-mask zeroing the n smallest |w| of every m consecutive inputs of each output."""
    keep = np.ones_like(w, bool)
    d_in, d_out = w.shape
    for j in range(d_out):
        for start in range(0, d_in, m):
            keep[start:start + m, j] = _argsort_keep(np.abs(w[start:start + m, j]), n)
    return keep


def test_nm_pruning_matches_reference():
    params = mini_tree(seed=7)
    patterns = [(2, 4), (1, 4), (4, 8)]
    attn = r"layers_0/attn/.*kernel"  # (16, 8) and (8, 16): d_in divisible by 4 and 8
    stages = [make_stage(rule(attn, "nm", n=n, m=m)) for n, m in patterns]
    stages.append(make_stage(rule(attn, "nm", n=2, m=4, format="masked")))
    *results, (masked, masked_dense) = jit_run(*stages, params=params)
    before = flatten(params)
    for (n, m), (compressed, dense) in zip(patterns, results, strict=True):
        for path in ("layers_0/attn/q_proj/kernel", "layers_0/attn/o_proj/kernel"):
            w = np.asarray(before[path])
            leaf = compressed[path]
            assert isinstance(leaf, NMSparseWeight)
            assert (leaf.kept, leaf.m, leaf.shape) == (m - n, m, w.shape)
            assert leaf.values.shape == (w.shape[0] * (m - n) // m, w.shape[1])
            zeros = (dense[path] == 0).reshape(w.shape[0] // m, m, w.shape[1]).sum(axis=1)
            assert np.all(zeros == n), (n, m, path)
            np.testing.assert_array_equal(dense[path], np.where(_nm_reference(w, n, m), w, 0))
            if (n, m) == (2, 4):  # format "masked": the same weights as a MaskedWeight
                assert isinstance(masked[path], MaskedWeight)
                np.testing.assert_array_equal(masked_dense[path], dense[path])
        np.testing.assert_array_equal(np.asarray(compressed["layers_0/mlp/up_proj/kernel"]),
                                      np.asarray(before["layers_0/mlp/up_proj/kernel"]))
