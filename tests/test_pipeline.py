"""Rules, stages, passes and plans (jaxopt_llm.rules / pipeline / plan) on tiny parameter trees.

References are independent of the library: kept sets and quantization grids are recomputed
here with numpy (stable argsort, hand-written round-to-nearest), error messages are asserted.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_llm.transforms.prune as prune_module
import jaxopt_llm.transforms.quantize as quantize_module
from jaxopt_llm.models import ModelConfig, build_model
from jaxopt_llm.models.layers import attention_mask
from jaxopt_llm.pipeline import Recipe, Stage, available_ops, chain, named_chain
from jaxopt_llm.plan import plan
from jaxopt_llm.rules import BLOCK_LINEARS, Rule, assign, flat_params, nested_params, rule
from jaxopt_llm.transforms import base as transforms_base
from jaxopt_llm.weights import (
    LowRankWeight,
    MaskedWeight,
    NMSparseWeight,
    QuantizedWeight,
    materialize,
    param_bytes,
)

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
ALL_OPS = ["fake_quant", "keep", "nm", "prune", "prune_heads", "prune_neurons", "quantize", "svd"]


def _tree(seed=0, as_numpy=False):
    rng = np.random.default_rng(seed)
    flat = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    if not as_numpy:
        flat = {p: jnp.asarray(v) for p, v in flat.items()}
    return nested_params(flat)


def _stage(*rules, name="s"):
    return Stage(name=name, rules=tuple(rules))


def _recipe(*stages, name="r"):
    return Recipe(name=name, stages=tuple(stages))


def _snapshot(tree):
    """Structure, leaf identities and copied values, to prove a tree was not touched."""
    flat = flat_params(tree)
    return jax.tree.structure(tree), {p: (id(v), np.array(v)) for p, v in flat.items()}


def _assert_untouched(tree, snapshot):
    structure, leaves = snapshot
    assert jax.tree.structure(tree) == structure
    flat = flat_params(tree)
    assert list(flat) == list(leaves)
    for path, leaf in flat.items():
        assert id(leaf) == leaves[path][0], path
        np.testing.assert_array_equal(np.asarray(leaf), leaves[path][1])


def _dense(leaf):
    return np.asarray(materialize(leaf))


def _jit_run(*passes, params):
    """Each pass on `params`, all in one jitted call: [(flat output, flat dense output)]."""

    def run(p):
        outs = [pass_(None, p)[1] for pass_ in passes]
        return [(out, materialize(out)) for out in outs]

    return [(flat_params(out), {k: np.asarray(v) for k, v in flat_params(dense).items()})
            for out, dense in jax.jit(run)(params)]


@pytest.fixture
def op_calls(monkeypatch):
    """Every registered op's apply, wrapped to record (op, selected paths) when called."""
    calls = []
    for name, op in available_ops().items():
        def apply(flat, paths, config, options, _name=name, _apply=op.apply):
            calls.append((_name, tuple(paths)))
            return _apply(flat, paths, config, options)

        monkeypatch.setitem(transforms_base._OPS, name, dataclasses.replace(op, apply=apply))
    return calls


# ------------------------------------------------------------------------------- rules


def test_block_linears_selects_every_kernel_but_an_untied_head():
    paths = [*SHAPES, "lm_head/kernel"]
    (taken,) = assign((rule(BLOCK_LINEARS, "quantize"),), paths)
    assert taken == KERNELS


def test_first_match_wins_keep_rule_excludes():
    params = _tree()
    stage = _stage(rule(r"layers_0/mlp/.*", "keep"), rule(BLOCK_LINEARS, "quantize", bits=8))
    assert assign(stage.rules, list(flat_params(params))) == [
        ["layers_0/mlp/up_proj/kernel", "layers_0/mlp/up_proj/bias",
         "layers_0/mlp/down_proj/kernel"],
        ["layers_0/attn/q_proj/kernel", "layers_0/attn/o_proj/kernel"],
    ]
    _, out = stage(None, params)
    before, after = flat_params(params), flat_params(out)
    assert list(after) == list(before)
    for path in before:
        if path.startswith("layers_0/attn/"):
            assert isinstance(after[path], QuantizedWeight), path
        else:  # the keep rule and paths no rule matches: the very same arrays
            assert after[path] is before[path], path


def test_rules_use_fullmatch():
    paths = list(SHAPES)
    assert Rule(match=r".*q_proj/kernel", op="quantize").matches("layers_0/attn/q_proj/kernel")
    for partial in ("q_proj", "layers_0/attn/q_proj", "attn/q_proj/kernel", r".*q_proj",
                    "kernel", r"layers_0/attn/q_proj/kernel/"):
        assert not rule(partial, "quantize").matches("layers_0/attn/q_proj/kernel")
        with pytest.raises(ValueError, match=rf"rule 0 \(match {re.escape(repr(partial))}, op "
                                             r"'quantize'\) matches no parameter"):
            assign((rule(partial, "quantize"),), paths)
    assert assign((rule(r".*q_proj/kernel", "quantize"),), paths) == [
        ["layers_0/attn/q_proj/kernel"]]


def test_rule_matching_nothing_names_index_and_pattern():
    params = _tree()
    recipe = _recipe(_stage(rule(BLOCK_LINEARS, "quantize"), rule(r"layers_9/.*", "prune"),
                            name="quant"))
    expected = (r"stage 'quant': rule 1 \(match 'layers_9/\.\*', op 'prune'\) matches no "
                r"parameter; paths look like embed_tokens/embedding, layers_0/attn/.*, "
                r"layers_0/attn/.*, layers_0/input_norm/scale, … \(8 in all\)")
    with pytest.raises(ValueError, match=rf"^pass 'quant': {expected}$") as run_error:
        recipe(None, params)
    assert "layers_0/attn/q_proj/kernel, layers_0/attn/o_proj/kernel" in str(run_error.value)
    # plan works on a key-sorted copy of the tree (jax.tree.map), so its preview is sorted
    with pytest.raises(ValueError, match=rf"^{expected}$"):
        plan(recipe, None, params)


def test_shadowed_rule_is_an_error():
    paths = list(SHAPES)
    rules = (rule(r".*/kernel", "quantize"), rule(r".*q_proj/kernel", "prune"))
    with pytest.raises(ValueError, match=re.escape(
            "recipe: rule 1 (match '.*q_proj/kernel', op 'prune') selects nothing: every "
            "parameter it matches (layers_0/attn/q_proj/kernel) is taken by an earlier rule")):
        assign(rules, paths)
    # A keep rule that shadows a later rule is just as dead.
    with pytest.raises(ValueError, match=r"rule 1 .* is taken by an earlier rule"):
        _stage(rule(r"layers_0/.*", "keep"), rule(BLOCK_LINEARS, "quantize"))(None, _tree())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"match": "(", "op": "quantize"}, r"rule match '\(' is not a valid regex: "),
    ({"match": "a[", "op": "quantize"}, r"rule match 'a\[' is not a valid regex: "),
    ({"match": "", "op": "quantize"}, r"rule match must be a non-empty regex string, got ''"),
    ({"match": 3, "op": "quantize"}, r"rule match must be a non-empty regex string, got 3"),
    ({"match": ".*", "op": ""}, r"rule op must be a non-empty string, got ''"),
])
def test_invalid_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rule(**kwargs)


def test_stage_needs_rules():
    with pytest.raises(ValueError, match=r"stage 'empty' has no rules"):
        Stage(name="empty", rules=())


def test_unknown_op_lists_the_ops(op_calls):
    ops = sorted(["keep", *available_ops()])
    assert set(ALL_OPS) <= set(ops)
    recipe = _recipe(_stage(rule(BLOCK_LINEARS, "quantise")))
    message = re.escape(f"unknown op 'quantise'; available ops: {ops}")
    for attempt in (recipe.check, lambda: plan(recipe, None, _tree()),
                    lambda: recipe(None, _tree())):
        with pytest.raises(ValueError, match=message):
            attempt()
    assert op_calls == []


def test_unknown_option_lists_the_options(op_calls):
    recipe = _recipe(_stage(rule(BLOCK_LINEARS, "nm", n=2, mm=4), name="p"))
    message = re.escape("stage 'p' rule 0: op 'nm' has no option(s) ['mm']; "
                        "options: ['format', 'm', 'n']")
    with pytest.raises(ValueError, match=message):
        recipe.check()
    with pytest.raises(ValueError, match=message):
        recipe(None, _tree())
    quantize = _recipe(_stage(rule(BLOCK_LINEARS, "quantize", bitz=4, groupsize=8)))
    with pytest.raises(ValueError, match=r"has no option\(s\) \['bitz', 'groupsize'\]; "
                                         r"options: \[.*'bits'.*'group_size'.*\]"):
        quantize.check()
    assert op_calls == []


BAD_OPTIONS = [
    ("quantize", {"bits": 1}, r"quantization bits must be an integer in 2\.\.8, got 1"),
    ("quantize", {"bits": 9}, r"quantization bits must be an integer in 2\.\.8, got 9"),
    ("quantize", {"bits": 4.0}, r"quantization bits must be an integer in 2\.\.8, got 4\.0"),
    ("quantize", {"granularity": "group", "group_size": 0},
     r"granularity 'group' needs a positive integer group_size, got 0"),
    ("quantize", {"group_size": 0},
     r"granularity 'group' needs a positive integer group_size, got 0"),
    ("quantize", {"granularity": "row"},
     r"quantization granularity must be one of \('tensor', 'channel', 'group'\), got 'row'"),
    ("quantize", {"method": "max"}, r"method must be one of"),
    ("quantize", {"act_bits": 4}, r"act_bits must be 8 or null, got 4"),
    ("quantize", {"act_bits": 8, "symmetric": False}, r"asymmetric 8-bit weights"),
    ("fake_quant", {"bits": 9}, r"quantization bits must be an integer in 2\.\.8, got 9"),
    ("fake_quant", {"ste": "magic"}, r"ste must be one of"),
    ("prune", {"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\), got 1\.0"),
    ("prune", {"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\), got -0\.1"),
    ("prune", {"sparsity": 1.5}, r"sparsity must be a number in \[0, 1\), got 1\.5"),
    ("prune", {"sparsity": "half"}, r"sparsity must be a number in \[0, 1\), got 'half'"),
    ("prune", {"scope": "column"}, r"scope must be one of \('layer', 'row', 'global'\)"),
    ("prune", {"format": "compressed"}, r"format must be one of \('masked', 'dense'\)"),
    ("nm", {"n": 4, "m": 4}, r"n:m needs 0 < n < m .*, got 4:4"),
    ("nm", {"n": 5, "m": 4}, r"n:m needs 0 < n < m .*, got 5:4"),
    ("nm", {"n": 0, "m": 4}, r"n:m needs 0 < n < m .*, got 0:4"),
    ("nm", {"n": 2.0, "m": 4}, r"n and m must be integers"),
    ("nm", {"format": "dense"}, r"format must be 'compressed' or 'masked'"),
    ("svd", {"rank": 0}, r"rank must be a positive integer, got 0"),
    ("svd", {"rank": -3}, r"rank must be a positive integer, got -3"),
    ("svd", {"ratio": 0.0}, r"ratio must be in \(0, 1\) .*got 0\.0"),
    ("svd", {"ratio": 1.0}, r"ratio must be in \(0, 1\) .*got 1\.0"),
    ("svd", {"ratio": -0.2}, r"ratio must be in \(0, 1\) .*got -0\.2"),
    ("svd", {}, r"give exactly one of rank, ratio or energy for the SVD, got none"),
    ("svd", {"rank": 2, "ratio": 0.5}, r"give exactly one of .*, got rank, ratio"),
    ("svd", {"energy": 1.5}, r"energy must be in \(0, 1\]"),
    ("prune_heads", {"fraction": 1.0}, r"fraction must be a number in \(0, 1\), got 1\.0"),
    ("prune_heads", {"fraction": 0}, r"fraction must be a number in \(0, 1\), got 0"),
    ("prune_neurons", {"fraction": -0.5}, r"fraction must be a number in \(0, 1\), got -0\.5"),
    ("prune_neurons", {"score": "l3"}, r"score must be one of \('l2', 'l1'\), got 'l3'"),
    ("prune_heads", {"score": "taylor"}, r"score must be one of \('l2', 'l1'\), got 'taylor'"),
]


@pytest.mark.parametrize(("op", "options", "message"), BAD_OPTIONS,
                         ids=[f"{o}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'none'}"
                              for o, kw, _ in BAD_OPTIONS])
def test_bad_options_fail_before_any_work(op, options, message, op_calls):
    """Options of every stage are checked up front: a bad later stage stops the first one too."""
    params = _tree(as_numpy=True)
    snapshot = _snapshot(params)
    recipe = _recipe(_stage(rule(r".*q_proj/kernel", "quantize"), name="first"),
                     _stage(rule(r".*up_proj/kernel", op, **options), name="bad"))
    full = rf"stage 'bad' rule 0: op '{op}': {message}"
    with pytest.raises(ValueError, match=full):
        recipe.check()
    with pytest.raises(ValueError, match=full):
        plan(recipe, None, params)
    with pytest.raises(ValueError, match=full):
        recipe(None, params)
    assert op_calls == []
    _assert_untouched(params, snapshot)


SHAPE_ERRORS = [
    ([rule(BLOCK_LINEARS, "quantize", bits=4, group_size=16)],
     r"layers_0/attn/o_proj/kernel \(8, 16\): group_size=16 does not divide the input "
     r"dimension 8; use a divisor of 8, or partial_groups: true for a shorter last group"),
    ([rule(BLOCK_LINEARS, "fake_quant", bits=4, group_size=16)],
     r"group_size=16 does not divide .* partial_groups: true"),
    ([rule(BLOCK_LINEARS, "nm", n=4, m=8)],
     r"layers_0/mlp/down_proj/kernel \(12, 16\): m=8 does not divide the input dimension 12"),
    ([rule(BLOCK_LINEARS, "svd", rank=8)],
     r"layers_0/attn/[qo]_proj/kernel: rank 8 is full rank \(or more\) for a kernel of shape "
     r"\((16, 8|8, 16)\); use rank < 8"),
    ([rule(BLOCK_LINEARS, "svd", rank=6)],
     r"layers_0/attn/[qo]_proj/kernel: rank=6 gives rank 6, which does not save parameters "
     r"for a kernel of shape \((16, 8|8, 16)\): 6·\((16\+8|8\+16)\) = 144 >= 128; the largest "
     r"rank that saves parameters is 5"),
    ([rule(BLOCK_LINEARS, "svd", ratio=0.99)],
     r"layers_0/attn/[qo]_proj/kernel: ratio=0\.99 gives rank 0 for a kernel of shape "
     r"\((16, 8|8, 16)\); keep more"),
    ([rule(r".*/(kernel|scale)", "quantize")],
     r"layers_0/input_norm/scale has shape \(16,\): quantize selects kernels and embedding "
     r"tables only"),
    ([rule(r"layers_0/.*", "prune")],
     r"layers_0/input_norm/scale has shape \(16,\): pruning selects 2-D kernels only"),
    ([rule(r"layers_0/mlp/.*", "prune_neurons")],
     r"pruning neurons needs the ModelConfig of a built-in family"),
]


@pytest.mark.parametrize(("rules", "message"), SHAPE_ERRORS,
                         ids=[f"{r[0].op}-{r[0].describe()}" for r, _ in SHAPE_ERRORS])
def test_shape_errors_in_plan_and_before_work(rules, message, monkeypatch):
    """Errors that need shapes: plan finds them from shapes alone; a run before any work."""
    params = _tree(as_numpy=True)
    snapshot = _snapshot(params)
    recipe = _recipe(_stage(*rules, name="stage"))
    recipe.check()  # the options themselves are fine
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with pytest.raises(ValueError, match=message):
        plan(recipe, None, shapes)  # no data at all: nothing can have run

    concrete = []  # concrete (not traced) per-parameter work done before the error

    def spy(fn):
        def wrapped(w, *args, **kwargs):
            if not isinstance(w, jax.core.Tracer):
                concrete.append(fn.__name__)
            return fn(w, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(quantize_module, "_quantize_jit", spy(quantize_module._quantize_jit))
    monkeypatch.setattr(prune_module, "nm_sparse_weight", spy(prune_module.nm_sparse_weight))
    monkeypatch.setattr(prune_module, "masked_weight", spy(prune_module.masked_weight))
    with pytest.raises(ValueError, match=rf"^pass 'stage': .*{message}"):
        recipe(None, params)
    assert concrete == []
    _assert_untouched(params, snapshot)


def test_partial_groups_opt_in_against_reference():
    """group_size 5 divides none of 16, 8, 12: the last group of each kernel is shorter."""
    params = _tree()
    ((after, dense),) = _jit_run(_stage(rule(BLOCK_LINEARS, "quantize", bits=4, symmetric=False,
                                              group_size=5, partial_groups=True)), params=params)
    before = flat_params(params)
    for path in KERNELS:
        leaf, w = after[path], np.asarray(before[path])
        assert isinstance(leaf, QuantizedWeight)
        assert leaf.scale.shape == (-(-w.shape[0] // 5), w.shape[1])
        assert leaf.scale.dtype == jnp.float16  # group scales default to float16
        reference = np.concatenate([
            _rtn_reference(w[start:start + 5], 4, False, 0, scale_dtype=np.float16)
            for start in range(0, w.shape[0], 5)])
        np.testing.assert_allclose(dense[path], reference, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------- magnitude pruning


def _prune(*sparsities, scope, fmt="masked"):
    """Per sparsity, (flat input, flat output, flat dense output) of pruning every kernel."""
    params = _tree()
    stages = [_stage(rule(BLOCK_LINEARS, "prune", sparsity=s, scope=scope, format=fmt))
              for s in sparsities]
    before = {p: np.asarray(v) for p, v in flat_params(params).items()}
    return [(before, out, dense) for out, dense in _jit_run(*stages, params=params)]


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
    params = _tree()
    before = {p: np.asarray(v) for p, v in flat_params(params).items()}
    sparsities = (0.25, 0.6)
    stages = [_stage(rule(BLOCK_LINEARS, "prune", sparsity=s, scope="row")) for s in sparsities]
    results = _jit_run(*stages, _stage(rule(BLOCK_LINEARS, "prune", sparsity=0.6, scope="row",
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
    recipe = _recipe(_stage(rule(attn, "prune", sparsity=0.25), name="a"),
                     _stage(rule(attn, "prune", sparsity=0.5), name="b"))
    once = _stage(rule(attn, "prune", sparsity=0.5))
    (_, twice), (_, single) = _jit_run(recipe, once, params=_tree())
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
    params = _tree(seed=7)
    patterns = [(2, 4), (1, 4), (4, 8)]
    attn = r"layers_0/attn/.*kernel"  # (16, 8) and (8, 16): d_in divisible by 4 and 8
    stages = [_stage(rule(attn, "nm", n=n, m=m)) for n, m in patterns]
    stages.append(_stage(rule(attn, "nm", n=2, m=4, format="masked")))
    *results, (masked, masked_dense) = _jit_run(*stages, params=params)
    before = flat_params(params)
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


# ------------------------------------------------------------------------------- quantize


def _rtn_reference(w, bits, symmetric, axis, scale_dtype=np.float32):
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


def test_quantize_kernels_and_embeddings_against_reference():
    """Kernels along their inputs (axis 0), tables (path ending 'embedding') along D (axis 1)."""
    params = _tree()
    variants = [(8, True), (4, False)]
    stages = [_stage(rule(BLOCK_LINEARS, "quantize", bits=b, symmetric=sym),
                     rule(r"(.*/)?embedding", "quantize", bits=b, symmetric=sym))
              for b, sym in variants]
    before = flat_params(params)
    for (bits, symmetric), (after, dense) in zip(variants, _jit_run(*stages, params=params),
                                                 strict=True):
        for path in [*KERNELS, "embed_tokens/embedding"]:
            leaf, w = after[path], np.asarray(before[path])
            axis = 1 if path.endswith("embedding") else 0
            assert isinstance(leaf, QuantizedWeight) and (leaf.axis, leaf.bits) == (axis, bits)
            # one scale per output channel (kernel) / per table row (embedding)
            assert leaf.scale.shape == ((w.shape[0], 1) if axis else (1, w.shape[1]))
            np.testing.assert_allclose(dense[path], _rtn_reference(w, bits, symmetric, axis),
                                       rtol=0, atol=1e-6)
        for path in ("layers_0/input_norm/scale", "layers_0/mlp/up_proj/bias", "norm/scale"):
            np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]))


def test_quantizing_twice_and_pruning_quantized_are_errors():
    params = _tree()
    recipe = _recipe(_stage(rule(BLOCK_LINEARS, "quantize"), name="q1"),
                     _stage(rule(BLOCK_LINEARS, "quantize", bits=4), name="q2"))
    with pytest.raises(ValueError, match=r"^pass 'q2': layers_0/attn/q_proj/kernel is already "
                                         r"quantized \(8-bit\); quantize it once"):
        recipe(None, params)
    recipe = _recipe(_stage(rule(BLOCK_LINEARS, "quantize"), name="q"),
                     _stage(rule(BLOCK_LINEARS, "nm"), name="nm"))
    with pytest.raises(ValueError, match=r"^pass 'nm': layers_0/attn/q_proj/kernel: pruning "
                                         r"needs a float kernel, got QuantizedWeight"):
        recipe(None, params)
    recipe = _recipe(_stage(rule(BLOCK_LINEARS, "quantize"), name="q"),
                     _stage(rule(BLOCK_LINEARS, "svd", rank=2), name="svd"))
    with pytest.raises(ValueError, match=r"svd needs a plain float kernel, got QuantizedWeight"):
        recipe(None, params)


TINY_LLAMA = ModelConfig(family="llama", model_type="llama", vocab_size=48, hidden_size=32,
                         intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                         head_dim=8, max_position_embeddings=32, tie_word_embeddings=True)


def _model_inputs(batch=2, length=6, vocab=48):
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, vocab, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return tokens, positions, attention_mask(jnp.ones((batch, length), bool), 0, length)


def _model_params(config, seed=0):
    shapes = jax.eval_shape(lambda: build_model(config).init(jax.random.PRNGKey(0),
                                                             *_model_inputs(1))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray((0.2 * rng.standard_normal(s.shape)).astype(np.float32)), shapes)


def test_quantized_tied_embedding_equals_materialized_table():
    params = _model_params(TINY_LLAMA)
    recipe = _recipe(_stage(rule(r"(.*/)?embedding", "quantize", bits=4, symmetric=False,
                                 group_size=8)))
    config, out = recipe(TINY_LLAMA, params)
    assert config == TINY_LLAMA
    table = out["embed_tokens"]["embedding"]
    assert isinstance(table, QuantizedWeight) and table.axis == 1
    assert table.scale.shape == (48, 4)  # (V, D/8) groups along the feature dim
    assert param_bytes(table) < param_bytes(params["embed_tokens"]["embedding"]) / 4
    model = build_model(config)

    @jax.jit
    def both(p, dense_table):
        dense = {**p, "embed_tokens": {"embedding": dense_table}}
        return (model.apply({"params": p}, *_model_inputs())[0],
                model.apply({"params": dense}, *_model_inputs())[0])

    dense_table = materialize(table)
    assert dense_table.shape == (48, 32)
    assert not np.array_equal(np.asarray(dense_table),
                              np.asarray(params["embed_tokens"]["embedding"]))
    ours, ref = both(out, dense_table)
    assert ours.shape == (2, 6, 48)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- composition


def test_nm_then_quantize_keeps_exact_zeros():
    attn = r"layers_0/attn/.*kernel"
    prune = _stage(rule(attn, "nm", n=2, m=4), name="prune")
    variants = [{"bits": 8}, {"bits": 4, "symmetric": False},
                {"bits": 4, "symmetric": False, "group_size": 8}]
    recipes = [_recipe(prune, _stage(rule(attn, "quantize", **options), name="quantize"))
               for options in variants]
    (_, pruned), *results = _jit_run(prune, *recipes, params=_tree(seed=3))
    for out, dense in results:
        for path in ("layers_0/attn/q_proj/kernel", "layers_0/attn/o_proj/kernel"):
            assert isinstance(out[path], QuantizedWeight)
            zeros = pruned[path] == 0
            assert zeros.sum() == pruned[path].size // 2
            assert np.all(dense[path][zeros] == 0), path  # exactly zero, not just small
            groups = (dense[path] == 0).reshape(-1, 4, dense[path].shape[1]).sum(axis=1)
            assert np.all(groups >= 2)


def test_svd_then_quantize_gives_quantized_factors():
    params = _tree(seed=4)
    up = r"layers_0/mlp/up_proj/kernel"
    recipe = _recipe(_stage(rule(up, "svd", rank=3), name="factorize"),
                     _stage(rule(up, "quantize", bits=8), name="quantize"))
    _, factored = recipe.stages[0](None, params)
    _, out = recipe(None, params)
    for path in ("layers_0/mlp/up_proj/kernel",):
        leaf = flat_params(out)[path]
        assert isinstance(leaf, LowRankWeight)
        assert isinstance(leaf.u, QuantizedWeight) and isinstance(leaf.v, QuantizedWeight)
        assert leaf.rank == 3 and leaf.shape == SHAPES[path]
        lowrank = flat_params(factored)[path]
        u, v = np.asarray(lowrank.u), np.asarray(lowrank.v)
        du, dv = _dense(leaf.u), _dense(leaf.v)
        np.testing.assert_allclose(du, _rtn_reference(u, 8, True, 0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(dv, _rtn_reference(v, 8, True, 0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(_dense(leaf), du @ dv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_dense(leaf), u @ v, atol=0.05)


def test_chain_and_named_chain_compose():
    params = _tree()
    first = _stage(rule(r"layers_0/attn/.*kernel", "nm"), name="prune")
    second = _stage(rule(r".*q_proj/kernel", "quantize"), name="quantize")
    results = _jit_run(chain(first, second), named_chain(("a", first), ("b", second)),
                       _recipe(first, second), lambda c, p: second(*first(c, p)), params=params)
    by_hand, by_hand_dense = results[-1]
    assert isinstance(by_hand["layers_0/attn/q_proj/kernel"], QuantizedWeight)
    assert isinstance(by_hand["layers_0/attn/o_proj/kernel"], NMSparseWeight)
    for out, dense in results[:-1]:
        assert jax.tree.structure(out) == jax.tree.structure(by_hand)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(by_hand), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for path in dense:
            np.testing.assert_array_equal(dense[path], by_hand_dense[path])

    def bump(config, p):
        return config + 1, p

    assert chain(bump, bump, bump)(0, params)[0] == 3
    config, same = chain()(7, params)
    assert config == 7 and same is params


def test_named_chain_prefixes_errors_with_the_pass_name():
    params = _tree()
    ok = _stage(rule(BLOCK_LINEARS, "quantize"), name="quantize")
    bad = _stage(rule(r"nothing/.*", "prune"), name="prune")
    with pytest.raises(ValueError, match=r"^pass 'second': stage 'prune': rule 0 \(match "
                                         r"'nothing/\.\*', op 'prune'\) matches no parameter"):
        named_chain(("first", ok), ("second", bad))(None, params)

    def broken(config, p):
        raise ValueError("boom")

    with pytest.raises(ValueError, match=r"^pass 'custom': boom$"):
        named_chain(("first", ok), ("custom", broken))(None, params)


# ----------------------------------------------------------------------------------- plan


def test_plan_rows_bytes_and_text():
    params = _tree()
    recipe = _recipe(
        _stage(rule(r"layers_0/mlp/down_proj/kernel", "keep"), rule(BLOCK_LINEARS, "nm"),
               name="prune"),
        _stage(rule(r"(.*/)?embedding", "quantize", bits=4, symmetric=False),
               rule(r"layers_0/attn/.*kernel", "quantize"), name="quantize"),
        name="mixed")
    result = plan(recipe, None, params)
    ((real, _),) = _jit_run(recipe, params=params)
    assert result.recipe == "mixed"
    assert sorted(r.path for r in result.rows) == sorted(SHAPES)
    assert result.bytes_before == param_bytes(params) == 4 * sum(
        int(np.prod(s)) for s in SHAPES.values())
    assert result.bytes_after == param_bytes(real) < result.bytes_before
    expected_ops = {
        "embed_tokens/embedding": ("quantize", "quantize(bits=4, symmetric=False)"),
        "layers_0/attn/q_proj/kernel": ("prune → quantize", "nm → quantize"),
        "layers_0/attn/o_proj/kernel": ("prune → quantize", "nm → quantize"),
        "layers_0/mlp/up_proj/kernel": ("prune", "nm"),
    }
    for row in result.rows:
        assert row.shape == SHAPES[row.path]
        assert row.bytes_before == 4 * int(np.prod(SHAPES[row.path]))
        assert row.bytes_after == param_bytes(real[row.path]), row.path
        assert (row.stage, row.op) == expected_ops.get(row.path, ("-", "keep")), row.path
        leaf = real[row.path]
        assert row.representation == (type(leaf).__name__ if not isinstance(leaf, jax.Array)
                                       else "float32")
    text = str(result)
    for path in SHAPES:
        assert path in text
    assert text.splitlines()[0] == "recipe mixed"
    ratio = result.bytes_after / result.bytes_before
    assert text.splitlines()[-1] == (f"total {result.bytes_before:,} → {result.bytes_after:,} "
                                     f"bytes ({ratio:.3f}×)")


def test_plan_keeps_the_input_and_config_after():
    params = _model_params(TINY_LLAMA)
    snapshot = _snapshot(params)
    recipe = _recipe(_stage(rule(r"layers_\d+/mlp/.*", "prune_neurons", fraction=0.25),
                            name="mlp"),
                     _stage(rule(r"layers_0/(attn/o_proj|mlp/up_proj)/kernel", "svd", ratio=0.5),
                            name="svd"))
    result = plan(recipe, TINY_LLAMA, params)
    config, out = recipe(TINY_LLAMA, params)
    _assert_untouched(params, snapshot)
    assert result.config_after == config
    assert config.intermediate_size == 48
    assert result.bytes_after == param_bytes(out)
    rows = {r.path: r for r in result.rows}
    assert rows["layers_0/mlp/up_proj/kernel"].shape == (32, 64)  # the shape before
    assert rows["layers_0/mlp/up_proj/kernel"].op == "prune_neurons(fraction=0.25) → svd(ratio=0.5)"
    assert rows["layers_0/mlp/up_proj/kernel"].stage == "mlp → svd"
    assert rows["layers_0/mlp/down_proj/kernel"].op == "prune_neurons(fraction=0.25)"
    assert rows["layers_0/attn/o_proj/kernel"].op == "svd(ratio=0.5)"
    assert rows["layers_0/input_norm/scale"].op == "keep"


@pytest.mark.parametrize(("fraction", "op", "message"), [
    (0.9, "prune_heads", r"fraction 0\.9 removes all 2 query heads per kv group; use a "
                         r"fraction below 0\.75"),
    (0.1, "prune_heads", r"fraction 0\.1 removes 0 of 2 query heads per kv group; use "
                         r"fraction >= 0\.25"),
    (0.999, "prune_neurons", r"fraction 0\.999 removes all 64 MLP neurons; use a fraction "
                             r"below 0\.9921"),
])
def test_structured_fraction_leaving_nothing(fraction, op, message):
    params = _model_params(TINY_LLAMA)
    snapshot = _snapshot(params)
    match = r"layers_\d+/attn/.*" if op == "prune_heads" else r"layers_\d+/mlp/.*"
    recipe = _recipe(_stage(rule(match, op, fraction=fraction), name="structured"))
    recipe.check()  # in (0, 1): only the model's sizes make it impossible
    with pytest.raises(ValueError, match=rf"^{message}$"):
        plan(recipe, TINY_LLAMA, params)
    with pytest.raises(ValueError, match=rf"^pass 'structured': {message}$"):
        recipe(TINY_LLAMA, params)
    _assert_untouched(params, snapshot)


def test_structured_rule_must_select_every_changed_parameter():
    params = _model_params(TINY_LLAMA)
    recipe = _recipe(_stage(rule(r"layers_\d+/mlp/(gate|up)_proj/kernel", "prune_neurons")))
    message = (r"pruning neurons changes \['layers_0/mlp/down_proj/kernel'\], which the rule "
               r"does not select; widen its match")
    with pytest.raises(ValueError, match=message):
        plan(recipe, TINY_LLAMA, params)
    with pytest.raises(ValueError, match=message):
        recipe(TINY_LLAMA, params)
