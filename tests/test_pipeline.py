"""Rules, stages, passes and plans (jaxopt_llm.rules / pipeline / plan) on tiny parameter trees:
composition, up-front checks and error messages. One op family's own results are tested next
to it in tests/transforms/.

References are independent of the library: quantization grids are recomputed here with numpy
(hand-written round-to-nearest), error messages are asserted.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_helpers import (
    KERNELS,
    SHAPES,
    jit_run,
    make_recipe,
    make_stage,
    mini_tree,
    rtn_reference,
)

import jaxopt_llm.transforms.prune as prune_module
import jaxopt_llm.transforms.quantize as quantize_module
from jaxopt_llm.pipeline import Stage, available_ops, chain, named_chain
from jaxopt_llm.plan import plan
from jaxopt_llm.rules import BLOCK_LINEARS, Rule, assign, rule
from jaxopt_llm.transforms import base as transforms_base
from jaxopt_llm.tree import flatten
from jaxopt_llm.weights import (
    LowRankWeight,
    NMSparseWeight,
    QuantizedWeight,
    materialize,
    param_bytes,
)

ALL_OPS = ["fake_quant", "keep", "nm", "prune", "prune_heads", "prune_neurons", "quantize", "svd"]


def _snapshot(tree):
    """Structure, leaf identities and copied values, to prove a tree was not touched."""
    flat = flatten(tree)
    return jax.tree.structure(tree), {p: (id(v), np.array(v)) for p, v in flat.items()}


def _assert_untouched(tree, snapshot):
    structure, leaves = snapshot
    assert jax.tree.structure(tree) == structure
    flat = flatten(tree)
    assert list(flat) == list(leaves)
    for path, leaf in flat.items():
        assert id(leaf) == leaves[path][0], path
        np.testing.assert_array_equal(np.asarray(leaf), leaves[path][1])


def _dense(leaf):
    return np.asarray(materialize(leaf))


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
    params = mini_tree()
    stage = make_stage(rule(r"layers_0/mlp/.*", "keep"), rule(BLOCK_LINEARS, "quantize", bits=8))
    assert assign(stage.rules, list(flatten(params))) == [
        ["layers_0/mlp/up_proj/kernel", "layers_0/mlp/up_proj/bias",
         "layers_0/mlp/down_proj/kernel"],
        ["layers_0/attn/q_proj/kernel", "layers_0/attn/o_proj/kernel"],
    ]
    _, out = stage(None, params)
    before, after = flatten(params), flatten(out)
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
    params = mini_tree()
    recipe = make_recipe(make_stage(rule(BLOCK_LINEARS, "quantize"), rule(r"layers_9/.*", "prune"),
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


def test_an_optional_rule_may_select_nothing_and_round_trips(tmp_path):
    """Built-in recipes' table rule: optional, so a model without the part is still
    compressed; the flag survives to_dict / recipe files; a non-bool flag is refused."""
    from jaxopt_llm.pipeline import Recipe, read_recipe_file, save_recipe

    params = mini_tree()
    stage = make_stage(rule(BLOCK_LINEARS, "quantize"),
                       rule(r"layers_9/.*", "prune", optional=True), name="quant")
    _, out = stage(None, params)
    assert isinstance(flatten(out)["layers_0/attn/q_proj/kernel"], QuantizedWeight)
    assert assign((rule("a", "keep", optional=True), rule("b", "keep")), ["b"]) == [[], ["b"]]
    recipe = Recipe(name="r", stages=(stage,))
    saved = save_recipe(recipe, tmp_path / "r.yaml")
    assert read_recipe_file(saved) == recipe
    assert recipe.to_dict()["stages"][0]["rules"][1]["optional"] is True
    assert "optional" not in recipe.to_dict()["stages"][0]["rules"][0]
    with pytest.raises(ValueError, match=r"rule optional must be true or false, got 'yes'"):
        Rule(match=".*", op="keep", optional="yes")


def test_shadowed_rule_is_an_error():
    paths = list(SHAPES)
    rules = (rule(r".*/kernel", "quantize"), rule(r".*q_proj/kernel", "prune"))
    with pytest.raises(ValueError, match=re.escape(
            "recipe: rule 1 (match '.*q_proj/kernel', op 'prune') selects nothing: every "
            "parameter it matches (layers_0/attn/q_proj/kernel) is taken by an earlier rule")):
        assign(rules, paths)
    # A keep rule that shadows a later rule is just as dead.
    with pytest.raises(ValueError, match=r"rule 1 .* is taken by an earlier rule"):
        make_stage(rule(r"layers_0/.*", "keep"), rule(BLOCK_LINEARS, "quantize"))(None, mini_tree())


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
    recipe = make_recipe(make_stage(rule(BLOCK_LINEARS, "quantise")))
    message = re.escape(f"unknown op 'quantise'; available ops: {ops}")
    for attempt in (recipe.check, lambda: plan(recipe, None, mini_tree()),
                    lambda: recipe(None, mini_tree())):
        with pytest.raises(ValueError, match=message):
            attempt()
    assert op_calls == []


def test_unknown_option_lists_the_options(op_calls):
    recipe = make_recipe(make_stage(rule(BLOCK_LINEARS, "nm", n=2, mm=4), name="p"))
    message = re.escape("stage 'p' rule 0: op 'nm' has no option(s) ['mm']; "
                        "options: ['format', 'm', 'n']")
    with pytest.raises(ValueError, match=message):
        recipe.check()
    with pytest.raises(ValueError, match=message):
        recipe(None, mini_tree())
    quantize = make_recipe(make_stage(rule(BLOCK_LINEARS, "quantize", bitz=4, groupsize=8)))
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
    ("prune_neurons", {"score": "l3"}, r"score must be one of \('l2', 'l1', 'act'\), got 'l3'"),
    ("prune_heads", {"score": "taylor"},
     r"score must be one of \('l2', 'l1', 'act'\), got 'taylor'"),
]


@pytest.mark.parametrize(("op", "options", "message"), BAD_OPTIONS,
                         ids=[f"{o}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'none'}"
                              for o, kw, _ in BAD_OPTIONS])
def test_bad_options_fail_before_any_work(op, options, message, op_calls):
    """Options of every stage are checked up front: a bad later stage stops the first one too."""
    params = mini_tree(as_numpy=True)
    snapshot = _snapshot(params)
    recipe = make_recipe(make_stage(rule(r".*q_proj/kernel", "quantize"), name="first"),
                         make_stage(rule(r".*up_proj/kernel", op, **options), name="bad"))
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
    params = mini_tree(as_numpy=True)
    snapshot = _snapshot(params)
    recipe = make_recipe(make_stage(*rules, name="stage"))
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


# ---------------------------------------------------------------------------- composition


def test_quantizing_twice_and_pruning_quantized_are_errors():
    params = mini_tree()
    recipe = make_recipe(make_stage(rule(BLOCK_LINEARS, "quantize"), name="q1"),
                         make_stage(rule(BLOCK_LINEARS, "quantize", bits=4), name="q2"))
    with pytest.raises(ValueError, match=r"^pass 'q2': layers_0/attn/q_proj/kernel is already "
                                         r"quantized \(8-bit\); quantize it once"):
        recipe(None, params)
    recipe = make_recipe(make_stage(rule(BLOCK_LINEARS, "quantize"), name="q"),
                         make_stage(rule(BLOCK_LINEARS, "nm"), name="nm"))
    with pytest.raises(ValueError, match=r"^pass 'nm': layers_0/attn/q_proj/kernel: pruning "
                                         r"needs a float kernel, got QuantizedWeight"):
        recipe(None, params)
    recipe = make_recipe(make_stage(rule(BLOCK_LINEARS, "quantize"), name="q"),
                         make_stage(rule(BLOCK_LINEARS, "svd", rank=2), name="svd"))
    with pytest.raises(ValueError, match=r"svd needs a plain float kernel, got QuantizedWeight"):
        recipe(None, params)


def test_nm_then_quantize_keeps_exact_zeros():
    attn = r"layers_0/attn/.*kernel"
    prune = make_stage(rule(attn, "nm", n=2, m=4), name="prune")
    variants = [{"bits": 8}, {"bits": 4, "symmetric": False},
                {"bits": 4, "symmetric": False, "group_size": 8}]
    recipes = [make_recipe(prune, make_stage(rule(attn, "quantize", **options), name="quantize"))
               for options in variants]
    (_, pruned), *results = jit_run(prune, *recipes, params=mini_tree(seed=3))
    for out, dense in results:
        for path in ("layers_0/attn/q_proj/kernel", "layers_0/attn/o_proj/kernel"):
            assert isinstance(out[path], QuantizedWeight)
            zeros = pruned[path] == 0
            assert zeros.sum() == pruned[path].size // 2
            assert np.all(dense[path][zeros] == 0), path  # exactly zero, not just small
            groups = (dense[path] == 0).reshape(-1, 4, dense[path].shape[1]).sum(axis=1)
            assert np.all(groups >= 2)


def test_svd_then_quantize_gives_quantized_factors():
    params = mini_tree(seed=4)
    up = r"layers_0/mlp/up_proj/kernel"
    recipe = make_recipe(make_stage(rule(up, "svd", rank=3), name="factorize"),
                         make_stage(rule(up, "quantize", bits=8), name="quantize"))
    _, factored = recipe.stages[0](None, params)
    _, out = recipe(None, params)
    for path in ("layers_0/mlp/up_proj/kernel",):
        leaf = flatten(out)[path]
        assert isinstance(leaf, LowRankWeight)
        assert isinstance(leaf.u, QuantizedWeight) and isinstance(leaf.v, QuantizedWeight)
        assert leaf.rank == 3 and leaf.shape == SHAPES[path]
        lowrank = flatten(factored)[path]
        u, v = np.asarray(lowrank.u), np.asarray(lowrank.v)
        du, dv = _dense(leaf.u), _dense(leaf.v)
        np.testing.assert_allclose(du, rtn_reference(u, 8, True, 0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(dv, rtn_reference(v, 8, True, 0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(_dense(leaf), du @ dv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_dense(leaf), u @ v, atol=0.05)


def test_chain_and_named_chain_compose():
    params = mini_tree()
    first = make_stage(rule(r"layers_0/attn/.*kernel", "nm"), name="prune")
    second = make_stage(rule(r".*q_proj/kernel", "quantize"), name="quantize")
    results = jit_run(chain(first, second), named_chain(("a", first), ("b", second)),
                      make_recipe(first, second), lambda c, p: second(*first(c, p)), params=params)
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
    params = mini_tree()
    ok = make_stage(rule(BLOCK_LINEARS, "quantize"), name="quantize")
    bad = make_stage(rule(r"nothing/.*", "prune"), name="prune")
    with pytest.raises(ValueError, match=r"^pass 'second': stage 'prune': rule 0 \(match "
                                         r"'nothing/\.\*', op 'prune'\) matches no parameter"):
        named_chain(("first", ok), ("second", bad))(None, params)

    def broken(config, p):
        raise ValueError("boom")

    with pytest.raises(ValueError, match=r"^pass 'custom': boom$"):
        named_chain(("first", ok), ("custom", broken))(None, params)


# ----------------------------------------------------------------------------------- plan


def test_plan_rows_bytes_and_text():
    params = mini_tree()
    recipe = make_recipe(
        make_stage(rule(r"layers_0/mlp/down_proj/kernel", "keep"), rule(BLOCK_LINEARS, "nm"),
                   name="prune"),
        make_stage(rule(r"(.*/)?embedding", "quantize", bits=4, symmetric=False),
                   rule(r"layers_0/attn/.*kernel", "quantize"), name="quantize"),
        name="mixed")
    result = plan(recipe, None, params)
    ((real, _),) = jit_run(recipe, params=params)
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


@pytest.fixture(scope="module")
def tiny_llama(tiny_config):
    """One layer, tied embeddings, 2 query heads per kv group, 64 MLP neurons."""
    return tiny_config(vocab_size=48, intermediate_size=64, num_layers=1,
                       max_position_embeddings=32, tie_word_embeddings=True)


@pytest.fixture
def tiny_llama_params(tiny_llama, random_params):
    return jax.tree.map(jnp.asarray, random_params(tiny_llama, std=0.2))


def test_plan_keeps_the_input_and_config_after(tiny_llama, tiny_llama_params):
    params = tiny_llama_params
    snapshot = _snapshot(params)
    recipe = make_recipe(
        make_stage(rule(r"layers_\d+/mlp/.*", "prune_neurons", fraction=0.25), name="mlp"),
        make_stage(rule(r"layers_0/(attn/o_proj|mlp/up_proj)/kernel", "svd", ratio=0.5),
                   name="svd"))
    result = plan(recipe, tiny_llama, params)
    config, out = recipe(tiny_llama, params)
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
def test_structured_fraction_leaving_nothing(fraction, op, message, tiny_llama,
                                             tiny_llama_params):
    params = tiny_llama_params
    snapshot = _snapshot(params)
    match = r"layers_\d+/attn/.*" if op == "prune_heads" else r"layers_\d+/mlp/.*"
    recipe = make_recipe(make_stage(rule(match, op, fraction=fraction), name="structured"))
    recipe.check()  # in (0, 1): only the model's sizes make it impossible
    with pytest.raises(ValueError, match=rf"^{message}$"):
        plan(recipe, tiny_llama, params)
    with pytest.raises(ValueError, match=rf"^pass 'structured': {message}$"):
        recipe(tiny_llama, params)
    _assert_untouched(params, snapshot)


def test_structured_rule_must_select_every_changed_parameter(tiny_llama, tiny_llama_params):
    params = tiny_llama_params
    recipe = make_recipe(make_stage(rule(r"layers_\d+/mlp/(gate|up)_proj/kernel", "prune_neurons")))
    message = (r"pruning neurons changes \['layers_0/mlp/down_proj/kernel'\], which the rule "
               r"does not select; widen its match")
    with pytest.raises(ValueError, match=message):
        plan(recipe, tiny_llama, params)
    with pytest.raises(ValueError, match=message):
        recipe(tiny_llama, params)
