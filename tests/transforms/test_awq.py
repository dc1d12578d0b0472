"""The `awq` op: scales from activation magnitudes searched on the block output (never worse
than α = 0 there), folded exactly or kept in the leaf, clipping equal to a numpy search;
with α = 0 and no clipping it is round-to-nearest exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import tree
from jaxopt_llm.calibration import Calibration, layer_sequential
from jaxopt_llm.models import forward
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.plan import plan
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.transforms.awq import (
    AWQOptions,
    _alpha_errors,
    awq_clip_quantize,
    awq_scales,
)
from jaxopt_llm.transforms.scaling import apply_scales, block_groups
from jaxopt_llm.weights import QuantizedWeight, QuantSpec, ScaledInputWeight

GRID = {"bits": 3, "symmetric": False, "group_size": 16}
WINDOWS = np.random.default_rng(0).integers(0, 64, (6, 16)).astype(np.int32)
HELD_OUT = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 16)), jnp.int32)


def _recipe(op, **options):
    return Recipe(name=op, stages=(Stage(name="q", rules=(rule(BLOCK_LINEARS, op, **options),)),))


@pytest.fixture(scope="module")
def models(tiny_config, tiny_params):
    out = {}
    for name, family, overrides in (("llama", "llama", {}), ("llama-mha", "llama",
                                                            {"num_kv_heads": 4}),
                                    ("gpt2", "gpt2", {})):
        config = tiny_config(family, vocab_size=64, **overrides)
        flat = tree.flatten(tiny_params(config, seed=4, scale=2.0))
        for path in flat:  # salient input channels, as real LLMs have (AWQ's premise)
            if path.endswith(("norm/scale", "ln_1/scale", "ln_2/scale")):
                norm = np.ones(flat[path].shape, np.float32)
                norm[[1, 5, 9]] = 8.0
                flat[path] = jnp.asarray(norm)
        out[name] = (config, tree.unflatten(flat))
    return out


def test_scales_against_numpy():
    mean_abs = np.array([0.0, 0.5, 2.0, 8.0], np.float32)
    for alpha in (0.0, 0.3, 1.0):
        s = np.maximum(mean_abs, 1e-4) ** alpha
        want = s / np.sqrt(s.max() * s.min())
        np.testing.assert_allclose(np.asarray(awq_scales(jnp.asarray(mean_abs), alpha)), want,
                                   rtol=1e-5)


def _numpy_clip(w, gram, bits, group, grid, shrink):
    """Straightforward per-(group, column) clip search with float16 scales, uint8 zeros."""
    k, n = w.shape
    qmax = 2 ** bits - 1
    codes = np.zeros((k, n), np.int64)
    scales = np.zeros((k // group, n), np.float16)
    for g in range(k // group):
        rows = slice(g * group, (g + 1) * group)
        block = gram[rows, rows].astype(np.float64)
        for col in range(n):
            v = w[rows, col].astype(np.float32)
            lo0, hi0 = min(v.min(), 0.0), max(v.max(), 0.0)
            best = None
            for i in range(grid):
                r = np.float32(1.0 - shrink * i / grid)
                lo, hi = np.float32(lo0 * r), np.float32(hi0 * r)
                scale = np.float16(max((hi - lo) / qmax, np.finfo(np.float16).tiny))
                zero = np.clip(np.round(-lo / np.float32(scale)), 0, qmax)
                q = np.clip(np.round(v / np.float32(scale)) + zero, 0, qmax)
                e = (v - (q - zero) * np.float32(scale)).astype(np.float64)
                err = e @ block @ e
                if best is None or err < best[0]:
                    best = (err, q, scale)
            codes[rows, col], scales[g, col] = best[1], best[2]
    return codes, scales


def test_clipping_search_equals_numpy_and_is_never_worse_than_plain_rounding():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(256, 32)) @ rng.normal(size=(32, 32)) * 0.3  # correlated inputs
    gram = (x.T @ x).astype(np.float32)
    w = rng.standard_t(3, size=(32, 6)).astype(np.float32)  # heavy tails: clipping pays
    spec = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16)
    leaf = jax.jit(lambda w, g: awq_clip_quantize(w, g, spec, grid=10, max_shrink=0.5))(w, gram)
    codes, scales = _numpy_clip(w, gram, 3, 16, 10, 0.5)
    np.testing.assert_array_equal(np.asarray(leaf.codes()), codes)
    np.testing.assert_array_equal(np.asarray(leaf.scale), scales)
    plain = awq_clip_quantize(w, gram, spec, grid=1)

    def output_error(q):
        e = w - np.asarray(q.materialize())
        return float(np.trace(e.T @ gram @ e))

    assert output_error(leaf) < output_error(plain)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_alpha_zero_without_clipping_is_round_to_nearest(models, family):
    config, params = models[family]
    awq = _recipe("awq", **GRID, alpha=0.0, clip=False)(
        config, params, calibration=Calibration(windows=WINDOWS))[1]
    rtn = _recipe("quantize", **GRID)(config, params)[1]
    for path, want in tree.flatten(rtn).items():
        got = tree.flatten(awq)[path]
        if isinstance(got, ScaledInputWeight):
            np.testing.assert_array_equal(np.asarray(got.input_scale), 1.0)
            got = got.weight
        if isinstance(want, QuantizedWeight):
            np.testing.assert_array_equal(np.asarray(got.qvalue), np.asarray(want.qvalue))
            np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_chosen_scales_never_lose_to_alpha_zero_on_the_block_output(models):
    """The searched errors equal the block output error of the folded, really quantized
    block, and the chosen α's is the smallest (α = 0 is a candidate)."""
    config, params = models["llama"]
    options = AWQOptions(**GRID)
    spec = options.spec
    seen = []

    def check(context):
        block = tree.flatten(context.params)
        names = sorted({k.rsplit("/", 1)[0] for k in block if k.endswith("/kernel")})
        x, args, mask = context.sample(4)
        reference = context.runner.run(context.params, x, args, mask)
        for group in block_groups(config, block, names):
            mean_abs = context.stats[group.selected[0]].mean_abs
            errors = np.asarray(_alpha_errors(
                block, mean_abs, jnp.asarray(options.alphas), x, args, mask, reference,
                names=group.selected, spec=spec, scale_dtype="float16", runner=context.runner))
            best = int(np.argmin(errors))
            assert errors[best] <= errors[0]
            # Independently: fold the chosen scales, quantize the group for real, run.
            s = awq_scales(mean_abs, float(options.alphas[best]))
            folded = apply_scales(block, group, s)
            for name in group.selected:
                kernel = folded[f"{name}/kernel"]
                inner = kernel.weight if isinstance(kernel, ScaledInputWeight) else kernel
                leaf = awq_clip_quantize(inner, jnp.eye(inner.shape[0]), spec, grid=1)
                folded[f"{name}/kernel"] = ScaledInputWeight(weight=leaf, input_scale=s) \
                    if isinstance(kernel, ScaledInputWeight) else leaf
            out = context.runner.run(tree.unflatten(folded), x, args, mask)
            real = float(jnp.mean((out - reference) ** 2))
            np.testing.assert_allclose(real, errors[best], rtol=2e-3)
            seen.append((group.selected, best))
        return context.params

    layer_sequential(config, params, Calibration(windows=WINDOWS), check)
    assert len(seen) == 4 * config.num_layers
    assert any(best > 0 for _, best in seen)  # the search does move away from plain rounding


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_closer_to_float_than_round_to_nearest(models, family):
    config, params = models[family]
    awq = _recipe("awq", **GRID, search_windows=len(WINDOWS))(
        config, params, calibration=Calibration(windows=WINDOWS))[1]
    rtn = _recipe("quantize", **GRID)(config, params)[1]
    run = jax.jit(lambda p: forward(config, p, HELD_OUT)[0])
    want = run(params)

    def error(p):
        return float(jnp.mean((run(p) - want) ** 2))

    assert error(awq) < 0.5 * error(rtn)


@pytest.mark.parametrize("model, kept", [("llama", {"attn/o_proj"}), ("llama-mha", set()),
                                          ("gpt2", {"mlp/c_proj"})])
def test_scales_fold_where_they_can_and_the_plan_says_where_not(models, model, kept):
    config, params = models[model]
    recipe = _recipe("awq", **GRID)
    out = tree.flatten(recipe(config, params, calibration=Calibration(windows=WINDOWS))[1])
    prefix = "h_0" if config.family == "gpt2" else "layers_0"
    explicit = {p[len(prefix) + 1:].rsplit("/", 1)[0] for p, v in out.items()
                if p.startswith(prefix + "/") and isinstance(v, ScaledInputWeight)}
    assert explicit == kept
    norms = [p for p in out if p.endswith(("norm/scale", "ln_1/scale", "ln_2/scale"))]
    assert any(not np.allclose(np.asarray(out[p]), np.asarray(tree.flatten(params)[p]))
               for p in norms)  # some scales were folded into a norm
    result = plan(recipe, config, params)
    rows = {r.path: r for r in result.rows}
    for path, leaf in out.items():
        assert rows[path].representation == (leaf.describe() if hasattr(leaf, "describe")
                                             else str(leaf.dtype)), path
        assert rows[path].bytes_after == (leaf.nbytes if hasattr(leaf, "describe")
                                          else leaf.size * leaf.dtype.itemsize), path


@pytest.mark.parametrize("options, message", [
    ({"alpha": 1.5}, r"alpha must be in \[0.0, 1.0\], got 1.5"),
    ({"alpha": float("nan")}, r"alpha must be a finite number"),
    ({"grid": 0}, r"grid must be a positive integer, got 0"),
    ({"search_windows": 0}, r"search_windows must be a positive integer"),
    ({"clip_max_shrink": 1.0}, r"clip_max_shrink must be in \[0.0, 1.0\)"),
    ({"clip": "yes"}, r"clip must be true or false"),
    ({"bits": 9}, r"bits"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        AWQOptions(**{**GRID, **options})


def test_bad_inputs_fail_before_any_work(models):
    config, params = models["llama"]
    calibration = Calibration(windows=WINDOWS)
    with pytest.raises(ValueError, match=r"op 'awq' needs calibration data"):
        load_recipe("w4g128-awq")(config, params)
    quantized = load_recipe("w8")(config, params)[1]
    with pytest.raises(ValueError, match=r"is already a QuantizedWeight: awq starts from the "
                                         r"float weights; apply the recipe to the original"):
        load_recipe("w4g128-awq")(config, quantized, calibration=calibration)
    with pytest.raises(ValueError, match=r"group_size=24 does not divide the input dimension"):
        _recipe("awq", bits=4, group_size=24)(config, params, calibration=calibration)
    with pytest.raises(ValueError, match=r"embed_tokens/embedding is outside them"):
        Recipe(name="r", stages=(Stage(name="q", rules=(
            rule(r"embed_tokens/embedding", "awq", bits=4),)),))(
            config, params, calibration=calibration)
