"""The native weight-only GEMV kernels (jaxopt_llm.weights.native, csrc/gemv.cc) against the
independent pure-JAX path `x @ w.materialize()` (kernels) and `x @ table.materialize().T`
(tables, the tied head), for every handled storage form, eagerly, under jit and under vmap,
with both kernel variants and forced multi-threaded splits."""

import functools
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import program_cache
from jaxopt_llm.weights import QuantSpec, native, quantize_weight
from jaxopt_llm.weights.quantized import quantize_activations_per_token

RTOL = 1e-5
# Plus an absolute slack of 1e-6 · Σ_k |x_k|·|w_kn|: the kernel sums in a different order
# than XLA's dot, so an output that cancels to ~0 differs by float32 rounding of its terms
# (measured ≤ 2.5e-7 of that sum over these cases).
ATOL_OF_ABS_SUM = 1e-6


def require_native() -> None:
    """Skip only when the extension was genuinely not built; any other failure fails."""
    available, status = native.native_status()
    if not available and status.startswith("extension not built"):
        pytest.skip(status)
    assert available, status


def test_native_is_built_where_a_compiler_exists():
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine: the extension is optional")
    available, status = native.native_status()
    assert available, (f"{compiler} exists but the native kernels are not available: {status} "
                       "(build them with `pip install --no-deps -e .`)")
    assert "kernel" in status and "threads" in status


# name -> (spec, scale_dtype or None for the default, [(K, N), ...])
FORMS = {
    "int8 channel f32": (QuantSpec(bits=8), None, [(75, 40), (130, 13)]),
    "int8 channel f16": (QuantSpec(bits=8), "float16", [(75, 40)]),
    "int8 g32 f16": (QuantSpec(bits=8, granularity="group", group_size=32), None,
                     [(96, 40), (160, 13)]),
    "int8 g128 f32": (QuantSpec(bits=8, granularity="group", group_size=128), "float32",
                      [(384, 40)]),
    "int8 g128 partial": (QuantSpec(bits=8, granularity="group", group_size=128,
                                    partial_groups=True), None, [(200, 13)]),
    "uint8 zero channel": (QuantSpec(bits=8, symmetric=False), None, [(75, 40)]),
    "uint8 float offset g32": (QuantSpec(bits=8, symmetric=False, zero="float",
                                         granularity="group", group_size=32), None, [(96, 13)]),
    "int4 channel odd K": (QuantSpec(bits=4), None, [(75, 40), (130, 13)]),
    "int4 tensor": (QuantSpec(bits=4, granularity="tensor"), None, [(96, 13)]),
    "int4 g32 f16": (QuantSpec(bits=4, granularity="group", group_size=32), None,
                     [(96, 40), (160, 13)]),
    "int4 g32 f32": (QuantSpec(bits=4, granularity="group", group_size=32), "float32",
                     [(96, 40)]),
    "int4 g128": (QuantSpec(bits=4, granularity="group", group_size=128), None, [(384, 40)]),
    "int4 g128 partial odd K": (QuantSpec(bits=4, granularity="group", group_size=128,
                                          partial_groups=True), None, [(201, 13)]),
    "int4 zero g32": (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32),
                      None, [(96, 40), (160, 13)]),
    "int4 zero g128 f32": (QuantSpec(bits=4, symmetric=False, granularity="group",
                                     group_size=128, partial_groups=True), "float32",
                           [(200, 40)]),
    "int4 float offset g32 f16": (QuantSpec(bits=4, symmetric=False, zero="float",
                                            granularity="group", group_size=32), None,
                                  [(96, 40), (160, 13)]),
    "int4 float offset g32 f32": (QuantSpec(bits=4, symmetric=False, zero="float",
                                            granularity="group", group_size=32), "float32",
                                  [(96, 13)]),
    "int4 float offset bf16": (QuantSpec(bits=4, symmetric=False, zero="float",
                                         granularity="group", group_size=32), "bfloat16",
                               [(96, 13)]),
    "int4 zero channel": (QuantSpec(bits=4, symmetric=False), None, [(130, 40)]),
    # wider than one panel (2,048 columns for one row, 256 for eight), N % 8 ≠ 0
    "int8 channel wide": (QuantSpec(bits=8), None, [(21, 2100)]),
    "int4 zero g32 wide": (QuantSpec(bits=4, symmetric=False, granularity="group",
                                      group_size=32, partial_groups=True), None, [(72, 2100)]),
}
CASES = [(name, shape) for name, (_, _, shapes) in FORMS.items() for shape in shapes]
ROWS = (1, 3, 8)


# jitted: eager quantization and dequantization dispatch dozens of small ops (seconds)
quantize = jax.jit(quantize_weight, static_argnums=1, static_argnames=("scale_dtype", "axis"))
materialize = jax.jit(lambda w: w.materialize().reshape(w.shape2d))


@functools.cache
def weight(name: str, shape: tuple[int, int], seed: int = 0):
    """(QuantizedWeight, its materialized float32 (K, N) weight as numpy)."""
    spec, scale_dtype, _ = FORMS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), *shape, seed])
    dense = rng.normal(0.0, 0.1, shape).astype(np.float32)
    dense[:, 0] += 0.3  # an asymmetric column: zero points and offsets far from the middle
    qw = quantize(jnp.asarray(dense), spec, scale_dtype=scale_dtype)
    return qw, np.asarray(materialize(qw))


def inputs(rows: int, k: int, seed: int = 1, lead: tuple[int, ...] = ()) -> np.ndarray:
    return np.random.default_rng(seed + 7 * rows + k).normal(
        size=(*lead, rows, k)).astype(np.float32)


def reference(x: np.ndarray, w) -> np.ndarray:
    """The pure-JAX path: x @ w.materialize() in float32."""
    return np.asarray(jnp.matmul(jnp.asarray(x), materialize(w)))


def assert_matches(got, want: np.ndarray, x: np.ndarray, dense: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.float32
    slack = ATOL_OF_ABS_SUM * (np.abs(x) @ np.abs(dense))
    bad = np.abs(got - want) > RTOL * np.abs(want) + slack
    assert not bad.any(), (f"{bad.sum()} of {bad.size} differ; worst "
                           f"{np.max(np.abs(got - want))} (|want| max {np.abs(want).max()})")


def variants() -> list[str]:
    from jaxopt_llm import _native_gemv  # noqa: F401 - only called once available

    forms = {"avx512": ["scalar", "avx2", "avx512"], "avx2": ["scalar", "avx2"]}
    return forms.get(_native_gemv.best_variant(), ["scalar"])


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("name", "shape"), CASES, ids=[f"{n} {k}x{m}" for n, (k, m) in CASES])
def test_matches_pure_jax(name, shape, rows):
    require_native()
    w, dense = weight(name, shape)
    assert native.supports(w, rows)
    x = inputs(rows, shape[0])
    want = reference(x, w)
    for variant in variants():
        got = native.native_matmul(jnp.asarray(x), w, variant=variant)
        assert_matches(got, want, x, dense)


@pytest.mark.parametrize("tasks", [1, 2, 3, 5])
def test_forced_column_splits(tasks):
    """Chunks of 32 columns over XLA's pool (the tail chunk shorter, N % 8 ≠ 0)."""
    require_native()
    for name, shape in [("int4 g32 f16", (96, 77)), ("int8 channel f32", (75, 150)),
                        ("int4 float offset g32 f16", (96, 77))]:
        w, dense = weight(name, shape)
        x = inputs(8, shape[0])
        assert_matches(native.native_matmul(jnp.asarray(x), w, tasks=tasks),
                       reference(x, w), x, dense)


@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("name", ["int8 channel wide", "int4 zero g32 wide"])
def test_one_chunk_of_several_panels(name, rows):
    """One chunk (tasks=1) walks several panels: 2,100 columns, blocks of 8 code rows and a
    shorter last block (K 21; K 72 in groups of 32, 32, 8), the last 2,100 % 8 columns by
    the scalar loop."""
    require_native()
    shape = FORMS[name][2][0]
    w, dense = weight(name, shape)
    x = inputs(rows, shape[0])
    assert_matches(native.native_matmul(jnp.asarray(x), w, tasks=1), reference(x, w), x, dense)


@pytest.mark.parametrize("name", ["int8 g32 f16", "int4 g128 partial odd K",
                                  "int4 zero g32", "int4 float offset g32 f16"])
def test_under_jit(name):
    require_native()
    shape = FORMS[name][2][0]
    w, dense = weight(name, shape)
    x = inputs(3, shape[0])
    got = jax.jit(native.native_matmul)(jnp.asarray(x), w)
    assert_matches(got, reference(x, w), x, dense)


@pytest.mark.parametrize("name", ["int8 channel f32", "int4 g32 f16", "int4 zero g32",
                                  "int4 float offset g32 f16"])
def test_vmap_over_inputs(name):
    """A batch of inputs against one weight: folded into rows (beyond 8: blocks of 8)."""
    require_native()
    shape = FORMS[name][2][0]
    w, dense = weight(name, shape)
    for lead, rows in [((4,), 8), ((2,), 1), ((3,), 3)]:
        x = inputs(rows, shape[0], lead=lead)
        got = jax.vmap(native.native_matmul, in_axes=(0, None))(jnp.asarray(x), w)
        want = np.stack([reference(xi, w) for xi in x])
        assert_matches(got, want, x, dense)
    x = inputs(2, shape[0], lead=(2, 3))  # nested vmap, under jit
    got = jax.jit(jax.vmap(jax.vmap(native.native_matmul, in_axes=(0, None)),
                           in_axes=(0, None)))(jnp.asarray(x), w)
    want = np.stack([np.stack([reference(xij, w) for xij in xi]) for xi in x])
    assert_matches(got, want, x, dense)


@pytest.mark.parametrize("name", ["int8 g32 f16", "int4 g32 f16", "int4 zero g32",
                                  "int4 float offset g32 f16"])
def test_vmap_over_weights(name):
    """Stacked weights (e.g. layers), with batched or shared inputs."""
    require_native()
    shape = FORMS[name][2][0]
    (w0, d0), (w1, d1) = weight(name, shape, 0), weight(name, shape, 1)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), w0, w1)
    dense = np.maximum(np.abs(d0), np.abs(d1))
    x = inputs(3, shape[0], lead=(2,))
    got = jax.vmap(native.native_matmul)(jnp.asarray(x), stacked)
    assert_matches(got, np.stack([reference(x[0], w0), reference(x[1], w1)]), x, dense)
    shared = x[0]
    got = jax.jit(jax.vmap(native.native_matmul, in_axes=(None, 0)))(jnp.asarray(shared),
                                                                      stacked)
    want = np.stack([reference(shared, w0), reference(shared, w1)])
    assert_matches(got, want, np.stack([shared, shared]), dense)


def test_declines_what_it_does_not_handle():
    require_native()
    w8, _ = weight("int8 channel f32", (75, 40))
    w4, _ = weight("int4 g32 f16", (96, 40))
    table = quantize(jnp.ones((8, 64)), QuantSpec(bits=8), axis=1)
    assert native.supports(table, 1)  # by native_attend, not by native_matmul
    assert native.native_matmul(jnp.ones((1, 64), jnp.float32), table) is None
    assert native.native_attend(jnp.ones((1, 75), jnp.float32), w8) is None  # a kernel
    cases = {
        "3 bits": quantize(jnp.ones((64, 8)), QuantSpec(bits=3)),
        # the static fields quantize_weight sets for act_bits=8 / a bfloat16 weight
        "W8A8": w8.replace(act_bits=8),
        "bfloat16 weight": w8.replace(dtype="bfloat16"),
        "odd 4-bit groups": w4.replace(group_size=31, partial_groups=True),
    }
    for label, w in cases.items():
        assert not native.supports(w, 1), label
        k = w.shape2d[0] if w.axis == 0 else w.shape2d[1]
        assert native.native_matmul(jnp.ones((1, k), jnp.float32), w) is None, label
    assert native.supports(w8, native.MAX_ROWS)
    assert not native.supports(w8, native.MAX_ROWS + 1)
    assert native.native_matmul(jnp.ones((9, 75), jnp.float32), w8) is None
    x16 = jnp.asarray(np.random.default_rng(3).normal(size=(2, 75)), jnp.bfloat16)
    np.testing.assert_array_equal(  # bfloat16 widened exactly: the float32 kernel's result
        np.asarray(native.native_matmul(x16, w8)),
        np.asarray(native.native_matmul(x16.astype(jnp.float32), w8)))
    assert native.native_matmul(jnp.ones((1, 75), jnp.float16), w8) is None
    assert native.native_matmul(jnp.ones((1, 32), jnp.float32), w8) is None  # K mismatch
    assert not native.supports(jnp.ones((64, 8)), 1)
    with pytest.raises(ValueError, match="variant"):
        native.native_matmul(jnp.ones((1, 75), jnp.float32), w8, variant="avx9")


def test_kernel_rejects_inconsistent_operands():
    """The handler checks shapes and dtypes itself (a bad call is an error, not garbage)."""
    require_native()
    x = jnp.ones((1, 64), jnp.float32)
    codes = jnp.ones((64, 8), jnp.int8)
    out = jax.ShapeDtypeStruct((1, 8), jnp.float32)
    call = jax.ffi.ffi_call("jaxopt_llm_weight_gemv", out, vmap_method="expand_dims")
    attrs = dict(bits=np.int64(8), variant=np.int64(0), tasks=np.int64(0))
    good = call(x, codes, jnp.ones((2, 8), jnp.float32), group_size=np.int64(32), **attrs)
    np.testing.assert_allclose(np.asarray(good), np.full((1, 8), 64.0))
    with pytest.raises(Exception, match="scale"):  # 3 groups of 32 do not cover K = 64
        call(x, codes, jnp.ones((3, 8), jnp.float32), group_size=np.int64(32),
             **attrs).block_until_ready()
    with pytest.raises(Exception, match="float32 or float16"):
        call(x, codes, jnp.ones((2, 8), jnp.bfloat16), group_size=np.int64(32),
             **attrs).block_until_ready()


def test_the_leaf_calls_the_kernel_at_decode_sizes_only(monkeypatch):
    """`QuantizedWeight.linear` (what every model calls) runs the kernel for ≤ MAX_ROWS
    float32 rows, XLA above, and nothing native when the path is turned off; its gradient
    with respect to x is the pure-JAX product's (LoRA on a quantized base trains through
    it)."""
    if not native.native_status()[0]:
        pytest.skip(native.native_status()[1])
    w = jax.jit(quantize_weight, static_argnums=1)(
        jnp.asarray(np.random.default_rng(7).normal(size=(64, 24)), jnp.float32),
        QuantSpec(bits=4, granularity="group", group_size=32))

    def jaxpr(rows):
        return str(jax.make_jaxpr(lambda x: w.linear(x))(jnp.ones((rows, 64), jnp.float32)))

    assert "jaxopt_llm_weight_gemv" in jaxpr(1) and "jaxopt_llm_weight_gemv" in jaxpr(8)
    assert "jaxopt_llm_weight_gemv" not in jaxpr(9)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(3, 64)), jnp.float32)
    dense = w.materialize()
    c = jnp.asarray(np.random.default_rng(9).normal(size=(3, 24)), jnp.float32)
    got = jax.grad(lambda a: jnp.sum(w.linear(a) * c))(x)
    want = c @ dense.T  # d/dx of Σ c·(x @ W)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(native, "path_in_use", lambda: (False, "off"))
    assert "jaxopt_llm_weight_gemv" not in jaxpr(1)


def test_the_first_status_check_may_come_while_a_model_is_traced():
    """The self-check runs eagerly even inside `jit` tracing (where every op is staged):
    a model traced before anything else asked still gets the kernel."""
    if shutil.which("g++") is None and not native.native_status()[0]:
        pytest.skip(native.native_status()[1])
    w = jax.jit(quantize_weight, static_argnums=1)(jnp.ones((64, 16), jnp.float32),
                                                    QuantSpec(bits=8))
    native.path_in_use.cache_clear()
    native.native_status.cache_clear()
    text = jax.jit(lambda x: w.linear(x)).lower(jnp.ones((1, 64), jnp.float32)).as_text()
    assert native.path_in_use()[0], native.path_in_use()[1]
    assert "jaxopt_llm_weight_gemv" in text


@pytest.mark.parametrize("bits,granularity", [(8, "channel"), (4, "channel"), (8, "tensor")])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_w8a8_decode_runs_the_weight_kernel_on_rounded_activations(rows, bits, granularity,
                                                                   monkeypatch):
    """W8A8 at decode sizes: x rounded to int8 per token, then the weight-only kernel on
    those integers (float32) and the token scale after; equal to the int8 x int8 -> int32
    path up to float32 rounding, and to a float64 numpy reference."""
    require_native()
    w = quantize_weight(np.random.default_rng(3).normal(size=(96, 40)).astype(np.float32),
                        QuantSpec(bits=bits, granularity=granularity), act_bits=8)
    x = jnp.asarray(inputs(rows, 96))
    xq, x_scale = (np.asarray(a, np.float64) for a in quantize_activations_per_token(x))
    codes = np.asarray(w.codes(), np.float64)
    want = (xq @ codes) * np.asarray(w.scale, np.float64) * x_scale
    native_text = jax.jit(w.linear).lower(x).as_text()
    got = jax.jit(w.linear)(x)
    monkeypatch.setattr(native, "path_in_use", lambda: (False, "off"))
    pure_text = jax.jit(w.linear).lower(x).as_text()
    pure = jax.jit(w.linear)(x)
    assert "jaxopt_llm_weight_gemv" in native_text
    assert "jaxopt_llm_weight_gemv" not in pure_text
    np.testing.assert_allclose(np.asarray(got), np.asarray(pure), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ tables (axis 1, tied head)

# name -> (spec, scale_dtype or None for the default, [(V, D), ...]); V not a multiple of the
# 4 table rows the AVX2 kernel decodes together, D with partial groups and group tails
TABLE_FORMS = {
    "int8 row f32": (QuantSpec(bits=8), None, [(133, 75), (37, 576)]),
    "int8 row f16": (QuantSpec(bits=8), "float16", [(133, 75)]),
    "int8 row bf16": (QuantSpec(bits=8), "bfloat16", [(37, 64)]),
    "int8 g32 f16": (QuantSpec(bits=8, granularity="group", group_size=32), None,
                     [(133, 96)]),
    "int8 g12 partial": (QuantSpec(bits=8, granularity="group", group_size=12,
                                   partial_groups=True), "float32", [(37, 75)]),
    "uint8 zero row": (QuantSpec(bits=8, symmetric=False), None, [(133, 75)]),
    "uint8 float offset g32": (QuantSpec(bits=8, symmetric=False, zero="float",
                                         granularity="group", group_size=32), None,
                               [(37, 96)]),
    "int4 row odd D": (QuantSpec(bits=4), None, [(133, 75)]),
    "int4 tensor": (QuantSpec(bits=4, granularity="tensor"), None, [(37, 96)]),
    "int4 g32 f16": (QuantSpec(bits=4, granularity="group", group_size=32), None,
                     [(133, 96), (37, 576)]),
    "int4 g128 partial odd D": (QuantSpec(bits=4, granularity="group", group_size=128,
                                          partial_groups=True), None, [(37, 201)]),
    "int4 g20 partial": (QuantSpec(bits=4, granularity="group", group_size=20,
                                   partial_groups=True), "float32", [(37, 70)]),
    "int4 zero g32": (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32),
                      None, [(133, 96)]),
    "int4 zero g128 f32": (QuantSpec(bits=4, symmetric=False, granularity="group",
                                     group_size=128, partial_groups=True), "float32",
                           [(37, 576)]),
    "int4 float offset g32 f16": (QuantSpec(bits=4, symmetric=False, zero="float",
                                            granularity="group", group_size=32), None,
                                  [(133, 96), (37, 576)]),
    "int4 float offset g32 f32": (QuantSpec(bits=4, symmetric=False, zero="float",
                                            granularity="group", group_size=32), "float32",
                                  [(37, 96)]),
    "int4 float offset bf16": (QuantSpec(bits=4, symmetric=False, zero="float",
                                         granularity="group", group_size=32), "bfloat16",
                               [(37, 96)]),
    "int4 zero row": (QuantSpec(bits=4, symmetric=False), None, [(133, 75)]),
}
TABLE_CASES = [(name, shape) for name, (_, _, shapes) in TABLE_FORMS.items() for shape in shapes]


@functools.cache
def table(name: str, shape: tuple[int, int], seed: int = 0):
    """(a QuantizedWeight table (axis 1), its materialized float32 (V, D) table as numpy)."""
    spec, scale_dtype, _ = TABLE_FORMS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), *shape, seed, 1])
    dense = rng.normal(0.0, 0.1, shape).astype(np.float32)
    dense[0] += 0.3  # an asymmetric row: zero points and offsets far from the middle
    qt = quantize(jnp.asarray(dense), spec, scale_dtype=scale_dtype, axis=1)
    return qt, np.asarray(jax.jit(lambda t: t.materialize())(qt))


@jax.jit
def pure_attend(x, t):
    """The pure-JAX tied head (what `QuantizedWeight.attend` runs with the native path off)."""
    return jnp.einsum("...d,vd->...v", x, t.materialize().astype(x.dtype))


def assert_table_matches(got, want, x, dense):
    assert_matches(got, want, x, dense.T)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("name", "shape"), TABLE_CASES,
                         ids=[f"{n} {v}x{d}" for n, (v, d) in TABLE_CASES])
def test_table_matches_pure_jax(name, shape, rows):
    require_native()
    t, dense = table(name, shape)
    assert native.supports(t, rows)
    x = inputs(rows, shape[1])
    want = np.asarray(pure_attend(jnp.asarray(x), t))
    for variant in variants():
        got = jax.jit(functools.partial(native.native_attend, variant=variant))(
            jnp.asarray(x), t)
        assert_table_matches(got, want, x, dense)


@pytest.mark.parametrize("tasks", [1, 2, 3, 5])
def test_table_forced_row_splits(tasks):
    """Chunks of 32 table rows over XLA's pool (the tail chunk shorter, V % 4 ≠ 0)."""
    require_native()
    for name, shape in [("int4 g32 f16", (133, 96)), ("int8 row f32", (133, 75)),
                        ("int4 float offset g32 f16", (133, 96))]:
        t, dense = table(name, shape)
        x = inputs(8, shape[1])
        got = native.native_attend(jnp.asarray(x), t, tasks=tasks)
        assert_table_matches(got, np.asarray(pure_attend(jnp.asarray(x), t)), x, dense)


@pytest.mark.parametrize("name", ["int8 row f32", "int4 g32 f16", "int4 float offset g32 f16"])
def test_table_vmap(name):
    """A batch of inputs against one table (folded into rows), and stacked tables."""
    require_native()
    shape = TABLE_FORMS[name][2][0]
    t, dense = table(name, shape)
    for lead, rows in [((4,), 8), ((2,), 1), ((3,), 3)]:
        x = inputs(rows, shape[1], lead=lead)
        got = jax.jit(jax.vmap(native.native_attend, in_axes=(0, None)))(jnp.asarray(x), t)
        want = np.asarray(pure_attend(jnp.asarray(x), t))
        assert_table_matches(got, want, x, dense)
    t1, d1 = table(name, shape, 1)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), t, t1)
    x = inputs(3, shape[1], lead=(2,))
    got = jax.vmap(native.native_attend)(jnp.asarray(x), stacked)
    want = np.stack([np.asarray(pure_attend(jnp.asarray(x[0]), t)),
                     np.asarray(pure_attend(jnp.asarray(x[1]), t1))])
    assert_table_matches(got, want, x, np.maximum(np.abs(dense), np.abs(d1)))


def test_attend_calls_the_table_kernel_at_decode_sizes_only(monkeypatch):
    """`QuantizedWeight.attend` (the tied head) runs the table kernel for ≤ MAX_ROWS float32
    or bfloat16 rows (widened) and falls back to the pure path (still correct) for more rows
    or float16 inputs; its gradient with respect to x is the pure-JAX product's."""
    require_native()
    t, dense = table("int4 float offset g32 f16", (133, 96))

    def jaxpr(x):
        return str(jax.make_jaxpr(lambda a: t.attend(a))(x))

    assert "jaxopt_llm_table_gemv" in jaxpr(jnp.ones((1, 96), jnp.float32))
    assert "jaxopt_llm_table_gemv" in jaxpr(jnp.ones((2, 4, 96), jnp.float32))
    for x in [inputs(9, 96), inputs(3, 96, lead=(3,))]:  # 9 rows: XLA
        assert "jaxopt_llm_table_gemv" not in jaxpr(jnp.asarray(x))
        got = jax.jit(lambda a: t.attend(a))(jnp.asarray(x))
        assert_table_matches(got, np.asarray(pure_attend(jnp.asarray(x), t)), x, dense)
    x16 = jnp.asarray(inputs(1, 96), jnp.bfloat16)  # widened exactly for the kernel
    assert "jaxopt_llm_table_gemv" in jaxpr(x16)
    np.testing.assert_array_equal(np.asarray(native.native_attend(x16, t)),
                                  np.asarray(native.native_attend(x16.astype(jnp.float32), t)))
    assert native.native_attend(jnp.ones((1, 96), jnp.float16), t) is None
    got = jax.jit(lambda a: t.attend(a))(x16)
    assert got.dtype == jnp.float32  # float32 logits
    wide = np.asarray(x16, np.float32)
    assert_table_matches(got, np.asarray(pure_attend(jnp.asarray(wide), t)), wide, dense)
    assert native.native_attend(jnp.ones((9, 96), jnp.float32), t) is None
    assert native.native_attend(jnp.ones((1, 95), jnp.float32), t) is None  # D mismatch
    w8a8 = quantize(jnp.asarray(dense), QuantSpec(bits=8), axis=1).replace(act_bits=8)
    assert not native.supports(w8a8, 1)
    assert native.native_attend(jnp.ones((1, 96), jnp.float32), w8a8) is None

    x = jnp.asarray(inputs(3, 96))
    c = jnp.asarray(np.random.default_rng(9).normal(size=(3, 133)), jnp.float32)
    got = jax.jit(jax.grad(lambda a: jnp.sum(t.attend(a) * c)))(x)
    want = jax.grad(lambda a: jnp.sum(pure_attend(a, t) * c))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(c) @ dense, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(native, "path_in_use", lambda: (False, "off"))
    assert "jaxopt_llm_table_gemv" not in jaxpr(jnp.ones((1, 96), jnp.float32))


def test_table_kernel_rejects_inconsistent_operands():
    require_native()
    x = jnp.ones((1, 64), jnp.float32)
    codes = jnp.ones((8, 64), jnp.int8)
    out = jax.ShapeDtypeStruct((1, 8), jnp.float32)
    call = jax.ffi.ffi_call("jaxopt_llm_table_gemv", out, vmap_method="expand_dims")
    attrs = dict(bits=np.int64(8), variant=np.int64(0), tasks=np.int64(0))
    good = call(x, codes, jnp.ones((8, 2), jnp.float32), group_size=np.int64(32), **attrs)
    np.testing.assert_allclose(np.asarray(good), np.full((1, 8), 64.0))
    with pytest.raises(Exception, match="scale"):  # 3 groups of 32 do not cover D = 64
        call(x, codes, jnp.ones((8, 3), jnp.float32), group_size=np.int64(32),
             **attrs).block_until_ready()
    with pytest.raises(Exception, match="codes"):  # 4-bit codes of D = 64 are 32 bytes
        call(x, codes.astype(jnp.uint8), jnp.ones((8, 2), jnp.float32),
             group_size=np.int64(32), bits=np.int64(4), variant=np.int64(0),
             tasks=np.int64(0)).block_until_ready()


@pytest.mark.parametrize("spec", [QuantSpec(bits=8),
                                  QuantSpec(bits=4, symmetric=False, zero="float",
                                            granularity="group", group_size=16)],
                         ids=["int8 row", "int4 float offset g16"])
def test_tied_llama_generates_the_same_tokens_native_on_and_off(spec, tiny_config,
                                                                random_params, monkeypatch):
    """End to end: a tiny Llama whose tied embedding table is quantized (axis 1) decodes the
    same greedy tokens through the table kernel as through the pure-JAX head."""
    require_native()
    from jaxopt_llm import generation

    config = tiny_config(tie_word_embeddings=True, num_layers=1)
    params = jax.tree.map(jnp.asarray, random_params(config, std=0.3))
    qt = quantize(params["embed_tokens"]["embedding"], spec, axis=1)
    params = {**params, "embed_tokens": {"embedding": qt}}
    prompt = [[3, 17, 42, 5]]

    def run():
        """(greedy ids, whether the compiled decode program calls the table kernel)."""
        generation._PROGRAMS.clear()  # path_in_use is read while tracing: trace again
        generation._prefill.clear_cache()
        generation._decode.clear_cache()
        ids = generation.generate(config, params, prompt, max_new_tokens=12,
                                  eos_token_ids=()).new_ids
        (_, decode), = generation._PROGRAMS.values()
        return ids, "jaxopt_llm_table_gemv" in decode.as_text()

    # the patched path is not part of the on-disk program cache's key (the environment
    # that sets it is): keep that cache out, whatever an earlier test left configured
    monkeypatch.setattr(program_cache, "active_directory", lambda: None)
    native_ids, native_called = run()
    monkeypatch.setattr(native, "path_in_use", lambda: (False, "off"))
    pure_ids, pure_called = run()
    generation._PROGRAMS.clear()  # no program traced with the path off outlives the test
    generation._prefill.clear_cache()
    generation._decode.clear_cache()
    assert native_called and not pure_called
    assert len(native_ids[0]) == 12
    assert native_ids == pure_ids


# ---------------------------------------------------------------- dense float32 / bfloat16

DENSE_SHAPES = [(576, 1536), (75, 40), (21, 2100), (130, 13)]


def dense_weight(shape: tuple[int, int], dtype) -> jax.Array:
    rng = np.random.default_rng([*shape, 3])
    return jnp.asarray(rng.normal(0.0, 0.1, shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=[f"{k}x{n}" for k, n in DENSE_SHAPES])
def test_dense_matches_numpy(shape, rows, dtype):
    """A float32 or bfloat16 kernel read as stored: x @ w in float64 numpy (bfloat16 values
    widened exactly), every variant, tasks chosen and forced to one chunk."""
    require_native()
    w = dense_weight(shape, dtype)
    wide = np.asarray(w.astype(jnp.float32)).astype(np.float64)
    x = inputs(rows, shape[0])
    want = (x.astype(np.float64) @ wide).astype(np.float32)
    assert native.supports_dense(w, rows)
    for variant in variants():
        for tasks in (0, 1):
            got = native.native_dense_matmul(jnp.asarray(x), w, variant=variant, tasks=tasks)
            assert_matches(got, want, x, wide)


def test_dense_under_jit_vmap_and_grad():
    require_native()
    w = dense_weight((75, 40), jnp.float32)
    x = inputs(3, 75, lead=(2,))
    want = x @ np.asarray(w)
    got = jax.jit(jax.vmap(native.native_dense_matmul, in_axes=(0, None)))(jnp.asarray(x), w)
    assert_matches(got, want, x, np.asarray(w))
    c = jnp.asarray(np.random.default_rng(4).normal(size=(3, 40)), jnp.float32)

    def loss(a, b, product):
        return jnp.sum(product(a, b) * c)

    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
        jnp.asarray(x[0]), w, native.native_dense_matmul)
    want = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x[0]), w, jnp.matmul)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-6)


def test_dense_bfloat16_inputs_come_back_in_bfloat16():
    require_native()
    w = dense_weight((64, 24), jnp.bfloat16)
    x = jnp.asarray(inputs(2, 64), jnp.bfloat16)
    got = native.native_dense_matmul(x, w)
    assert got.dtype == jnp.bfloat16
    want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2)


def test_dense_declines_what_it_does_not_handle():
    require_native()
    w = dense_weight((64, 24), jnp.float32)
    assert native.native_dense_matmul(jnp.ones((9, 64)), w) is None  # more than MAX_ROWS
    assert native.native_dense_matmul(jnp.ones((1, 63)), w) is None  # K mismatch
    assert native.native_dense_matmul(jnp.ones((1, 64), jnp.float16), w) is None
    assert native.native_dense_matmul(jnp.ones((1, 64)), w.astype(jnp.float16)) is None
    assert native.native_dense_matmul(jnp.ones((1, 64)), jnp.ones((2, 64, 24))) is None
    qw = quantize(w, QuantSpec(bits=8))
    assert not native.supports_dense(qw, 1)
    with pytest.raises(ValueError, match="variant"):
        native.native_dense_matmul(jnp.ones((1, 64)), w, variant="avx9")


def test_dense_kernel_rejects_inconsistent_operands():
    require_native()
    x = jnp.ones((1, 64), jnp.float32)
    out = jax.ShapeDtypeStruct((1, 24), jnp.float32)
    call = jax.ffi.ffi_call("jaxopt_llm_weight_gemv", out, vmap_method="expand_dims")
    attrs = dict(group_size=np.int64(64), variant=np.int64(0), tasks=np.int64(0))
    ones = jnp.ones((1, 24), jnp.float32)
    good = call(x, jnp.ones((64, 24), jnp.float32), ones, bits=np.int64(32), **attrs)
    np.testing.assert_allclose(np.asarray(good), np.full((1, 24), 64.0))
    with pytest.raises(Exception, match="bits 32 is float32"):
        call(x, jnp.ones((64, 24), jnp.bfloat16), ones, bits=np.int64(32),
             **attrs).block_until_ready()
    with pytest.raises(Exception, match="does not match K"):
        call(x, jnp.ones((63, 24), jnp.float32), ones, bits=np.int64(32),
             **attrs).block_until_ready()


def test_linear_of_a_float_kernel_calls_the_dense_kernel_at_decode_sizes_only(monkeypatch):
    """`dispatch.linear` on a plain float32 kernel: native for ≤ MAX_ROWS rows on CPU, XLA
    above and with JAXOPT_LLM_NATIVE off, the same values either way."""
    require_native()
    from jaxopt_llm.weights.dispatch import linear

    w = dense_weight((96, 40), jnp.float32)

    def jaxpr(x):
        return str(jax.make_jaxpr(lambda a: linear(a, w))(x))

    assert "jaxopt_llm_weight_gemv" in jaxpr(jnp.ones((2, 1, 96)))
    assert "jaxopt_llm_weight_gemv" not in jaxpr(jnp.ones((3, 3, 96)))  # 9 rows
    x = inputs(4, 96, lead=(2,))
    got = jax.jit(lambda a: linear(a, w))(jnp.asarray(x))
    assert got.shape == (2, 4, 40)
    assert_matches(got, x @ np.asarray(w), x, np.asarray(w))
    monkeypatch.setattr(native, "path_in_use", lambda: (False, "off"))
    assert "jaxopt_llm_weight_gemv" not in jaxpr(jnp.ones((1, 96)))


def test_avx512_is_refused_where_the_cpu_lacks_it_and_matches_where_it_has_it():
    """variant="avx512" runs the 16-lane panels on an AVX-512 CPU (equal to the pure path)
    and is a clear error elsewhere; "auto" picks it where it exists."""
    require_native()
    from jaxopt_llm import _native_gemv

    w, dense = weight("int4 zero g32", (96, 40))
    x = inputs(3, 96)
    if _native_gemv.best_variant() == "avx512":
        got = native.native_matmul(jnp.asarray(x), w, variant="avx512")
        assert_matches(got, reference(x, w), x, dense)
        assert native.native_status()[1].startswith("avx512 kernel")
    else:
        with pytest.raises(Exception, match="AVX-512F"):
            native.native_matmul(jnp.asarray(x), w, variant="avx512").block_until_ready()


def test_programs_for_several_devices_keep_the_pure_path(tiny_config, random_params):
    """The kernels have no partitioning rule (XLA would gather their operands onto every
    device), so a decode program for a mesh is traced without them; on one device the same
    weights call them. Tokens agree."""
    require_native()
    from jaxopt_llm import generation
    from jaxopt_llm.parallel import make_mesh
    from jaxopt_llm.placement import Placement

    config = tiny_config(num_layers=1)
    params = jax.tree.map(jnp.asarray, random_params(config, std=0.3))
    kernel = params["layers_0"]["mlp"]["up_proj"]["kernel"]
    params["layers_0"]["mlp"]["up_proj"]["kernel"] = quantize(kernel, QuantSpec(bits=8))
    prompt = [[3, 17, 42, 5], [9, 1, 2, 8]]

    def run(placement):
        generation._PROGRAMS.clear()
        ids = generation.generate(config, placement.place_params(config, params), prompt,
                                  max_new_tokens=6, eos_token_ids=(),
                                  placement=placement).new_ids
        (_, decode), = generation._PROGRAMS.values()
        return ids, "jaxopt_llm_weight_gemv" in decode.as_text()

    single_ids, single_native = run(Placement.single())
    mesh_ids, mesh_native = run(Placement.on_mesh(make_mesh("data=2,model=2")))
    generation._PROGRAMS.clear()
    assert single_native and not mesh_native
    assert mesh_ids == single_ids
