"""Native quantized GEMV (XLA FFI kernel) vs float32 GEMV and the pure-JAX quantized path.

At SmolLM2-135M's projection shapes (K×N: 576×576 q/o, 576×192 k/v, 576×1536 gate/up,
1536×576 down) and batch 1 and 8, three arms per weight format:
* f32     `x @ w` with a float32 weight (the baseline every ratio is against);
* jax     the pure-JAX quantized path, `x @ w.materialize().reshape(w.shape2d)`;
* native  `jaxopt_llm.weights.native.native_matmul` (csrc/gemv.cc through the XLA FFI);
for w8 (int8 per channel), w4g128 (4-bit symmetric, groups of 128 with a shorter last
group where 128 does not divide K, float16 scales), w4g128a (the same groups asymmetric,
uint8 zero points: the w4g128 recipe's grid) and w4g32f (4-bit, groups of 32, float
offset, llama.cpp's Q4_1 grid).

Each measurement is one jitted `lax.fori_loop` of `--iters` matmuls whose weight and input
pass through `lax.optimization_barrier` every iteration, so XLA can neither hoist the
dequantization out of the loop nor drop work; per-call time = loop time / iters (no Python
dispatch in it). Those weights stay in cache after the first iteration (576×1536 int8 is
0.9 MB; float32 3.5 MB, L3 is 32 MB here), which flatters the float32 baseline. A "layer"
row runs the 7 projections of one Llama block (q, k, v, o, gate, up, down) per iteration:
the per-call overhead of 7 FFI calls. A "model" row runs that block's loop (one iteration)
on `--layers` distinct blocks in turn (30, SmolLM2-135M's depth: 451 MB of float32,
113 MB int8, ~60 MB int4), so every weight comes from DRAM as in a decode step; its time
is per pass over all layers. Arms are interleaved round by round and the median over
rounds is reported. GB/s counts the bytes of the weights as stored (codes + scales +
zeros; 4·K·N for float32) per call or pass.

A "head" table (`--head`, default SmolLM2's tied LM head: a (49152, 576) embedding table)
runs the tied head x (M, 576) · tableᵀ with the table quantized along its rows (axis 1,
groups along D, ggml's layout), three arms again: f32 `x @ table.T`, jax (the pure-JAX
`QuantizedWeight.attend`: dequantize the whole table, then multiply) and native
(`native_attend`, the table kernel), for t8 (int8 per row), t4g32f (4-bit, groups of 32,
float offsets: Q4_1) and t4g128a (4-bit asymmetric, groups of 128 with a shorter last group,
uint8 zero points); 113 MB of float32, so every arm reads its table from DRAM.

Run:  python benchmarks/bench_native_gemv.py --json benchmarks/results/native_gemv.json
      (under 2 minutes on 2 cores; --quick: 3 rounds)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}
# One Llama block of SmolLM2-135M: q, k, v, o, gate, up, down
LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def formats():
    from jaxopt_llm.weights import QuantSpec

    return {
        "w8": QuantSpec(bits=8),
        "w4g128": QuantSpec(bits=4, granularity="group", group_size=128, partial_groups=True),
        # the w4g128 recipe's grid: asymmetric with uint8 zero points
        "w4g128a": QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128,
                             partial_groups=True),
        "w4g32f": QuantSpec(bits=4, symmetric=False, zero="float", granularity="group",
                            group_size=32),
    }


def head_formats():
    from jaxopt_llm.weights import QuantSpec

    return {
        "t8": QuantSpec(bits=8),
        "t4g32f": QuantSpec(bits=4, symmetric=False, zero="float", granularity="group",
                            group_size=32),
        "t4g128a": QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128,
                             partial_groups=True),
    }


def weight_bytes(w) -> int:
    import jax

    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(w))


def looped(matmuls, iters: int):
    """jit(fn(xs, ws) -> acc): `iters` rounds of y_i = matmul_i(x_i, w_i), summed."""
    import jax
    import jax.numpy as jnp

    def run(xs, ws):
        def body(_, carry):
            xs, ws, acc = carry
            xs, ws = jax.lax.optimization_barrier((xs, ws))
            total = acc
            for matmul, x, w in zip(matmuls, xs, ws, strict=True):
                total = total + jnp.sum(matmul(x, w), axis=1)  # every output is used
            return xs, ws, total

        acc = jnp.zeros((xs[0].shape[0],), jnp.float32)
        return jax.lax.fori_loop(0, iters, body, (xs, ws, acc))[2]

    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=0,
                        help="passes per timed loop (0: ~60 MB of float32 weight per loop)")
    parser.add_argument("--layers", type=int, default=30,
                        help="distinct Llama blocks of the 'model' row (SmolLM2-135M has 30; "
                             "0: no model row)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--formats", default="w8,w4g128,w4g128a,w4g32f")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--no-layer", action="store_true")
    parser.add_argument("--tasks", type=int, default=0, help="native column chunks (0: auto)")
    parser.add_argument("--head", default="49152x576",
                        help="V×D of the tied-head table row ('' or 0: no head row)")
    parser.add_argument("--head-formats", default="t8,t4g32f,t4g128a")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds

    import jax
    import jax.numpy as jnp

    from jaxopt_llm.weights import quantize_weight
    from jaxopt_llm.weights.native import native_attend, native_matmul, native_status

    available, status = native_status()
    log(f"native: {status}")
    if not available:
        sys.exit(f"native kernels not available: {status}")

    def f32(x, w):
        return x @ w

    def pure(x, w):
        return x @ w.materialize().reshape(w.shape2d)

    def native(x, w):
        y = native_matmul(x, w, tasks=args.tasks)
        assert y is not None, "native_matmul declined the weight"
        return y

    def f32_head(x, table):
        return x @ table.T

    def pure_head(x, table):
        return x @ table.materialize().T

    def native_head(x, table):
        y = native_attend(x, table, tasks=args.tasks)
        assert y is not None, "native_attend declined the table"
        return y

    quantize = jax.jit(quantize_weight, static_argnums=1, static_argnames=("axis",))
    rng = np.random.default_rng(0)
    specs = {name: spec for name, spec in formats().items() if name in args.formats.split(",")}
    batches = [int(b) for b in args.batches.split(",")]
    cases = {}  # (group, rows, format, arm) -> (jitted loop, xs, ws, iters, weight bytes)
    dense_cache, quant_cache = {}, {}

    def dense(shape, layer=0):
        if (shape, layer) not in dense_cache:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
            dense_cache[shape, layer] = jnp.asarray(values)
        return dense_cache[shape, layer]

    def quantized(shape, fmt, layer=0):
        if (shape, fmt, layer) not in quant_cache:
            quant_cache[shape, fmt, layer] = quantize(dense(shape, layer), specs[fmt])
        return quant_cache[shape, fmt, layer]

    # (label, shapes of one call, layers): single weights and one block reuse one weight per
    # shape (cache-hot after the first iteration); "model" calls the block's jitted loop
    # (one iteration) on --layers distinct blocks in turn, more bytes than the last-level
    # cache, like a decode step (dispatch is asynchronous, so Python overlaps the kernels).
    groups = [(f"{label} {k}×{n}", [(k, n)], 1) for label, (k, n) in SHAPES.items()
              if label in args.shapes.split(",")]
    if not args.no_layer:
        groups.append(("layer (7 matmuls)", LAYER, 1))
    if args.layers:
        groups.append((f"model ({args.layers} layers × 7)", LAYER, args.layers))
    loops = {}
    arms = {"f32": f32, "jax": pure, "native": native}
    head_shape = tuple(int(d) for d in args.head.split("x")) if args.head not in ("", "0") \
        else None
    head_specs = {name: spec for name, spec in head_formats().items()
                  if name in args.head_formats.split(",")}
    if head_shape:  # the tied head: (V, D) tables, x (M, D) · tableᵀ
        arms.update({"f32 head": f32_head, "jax head": pure_head, "native head": native_head})
        groups.append((f"head {head_shape[0]}×{head_shape[1]}", [head_shape], 1))

    def loop(arm, shapes, iters):
        key = (arm, tuple(shapes), iters)
        if key not in loops:
            loops[key] = looped([arms[arm]] * len(shapes), iters)
        return loops[key]

    def is_head(label):
        return label.startswith("head ")

    def table(shape, fmt):
        if (shape, fmt, "table") not in quant_cache:
            quant_cache[shape, fmt, "table"] = quantize(dense(shape), head_specs[fmt], axis=1)
        return quant_cache[shape, fmt, "table"]

    def formats_of(label):
        return head_specs if is_head(label) else specs

    for label, shapes, layers in groups:
        f32_bytes = sum(4 * k * n for k, n in shapes)
        iters = 1 if layers > 1 else args.iters or max(1, int(60e6 / f32_bytes))
        head = " head" if is_head(label) else ""
        for batch in batches:
            x_of = {k: jnp.asarray(rng.normal(size=(batch, k)).astype(np.float32))
                    for k, _ in shapes}
            if head:  # x (M, D) against a (V, D) table
                x_of = {d: jnp.asarray(rng.normal(size=(batch, d)).astype(np.float32))
                        for _, d in shapes}
                xs = tuple(x_of[d] for _, d in shapes)
            else:
                xs = tuple(x_of[k] for k, _ in shapes)
            per_layer = [tuple(dense(s, i) for s in shapes) for i in range(layers)]
            cases[label, batch, "f32", "f32"] = (loop("f32" + head, shapes, iters), xs,
                                                 per_layer, iters, f32_bytes * layers)
            for fmt in formats_of(label):
                if head:
                    per_layer = [tuple(table(s, fmt) for s in shapes)]
                else:
                    per_layer = [tuple(quantized(s, fmt, i) for s in shapes)
                                 for i in range(layers)]
                nbytes = sum(weight_bytes(w) for ws in per_layer for w in ws)
                for arm in ("jax", "native"):
                    cases[label, batch, fmt, arm] = (loop(arm + head, shapes, iters), xs,
                                                     per_layer, iters, nbytes)
    log(f"{len(cases)} cases, compiling and checking")
    check_native, check_pure = jax.jit(native), jax.jit(pure)
    check_native_head, check_pure_head = jax.jit(native_head), jax.jit(pure_head)
    checked = set()
    for (label, batch, fmt, arm), (fn, xs, per_layer, _, _) in cases.items():
        fn(xs, per_layer[0]).block_until_ready()
        if arm != "native":
            continue
        for x, w in zip(xs, per_layer[0], strict=True):  # the numbers of the pure-JAX path
            if (x.shape, w.shape2d, fmt) in checked:
                continue
            checked.add((x.shape, w.shape2d, fmt))
            if w.axis == 1:
                got = np.asarray(check_native_head(x, w))
                want = np.asarray(check_pure_head(x, w))
                bound = np.abs(np.asarray(x)) @ np.abs(np.asarray(w.materialize())).T
                assert np.all(np.abs(got - want) <= 1e-5 * bound + 1e-6), (label, batch, fmt)
                continue
            got, want = np.asarray(check_native(x, w)), np.asarray(check_pure(x, w))
            bound = np.abs(np.asarray(x)) @ np.abs(np.asarray(w.materialize()))
            assert np.all(np.abs(got - want) <= 1e-5 * bound + 1e-6), (label, batch, fmt)
    log("compiled; native results match the pure-JAX path")
    times = {key: [] for key in cases}
    began = time.perf_counter()
    for r in range(rounds):
        for key, (fn, xs, per_layer, iters, _) in cases.items():
            start = time.perf_counter()
            outs = [fn(xs, ws) for ws in per_layer]
            jax.block_until_ready(outs)
            times[key].append((time.perf_counter() - start) / iters)
        log(f"round {r + 1}/{rounds} done ({time.perf_counter() - began:.0f} s)")

    results = []
    print(f"\nnative: {status}; medians of {rounds} rounds (µs per call or per block/model "
          f"pass); ratio = f32 time / arm time (> 1: faster than the float32 GEMV); GB/s = "
          f"weight bytes as stored / time\n")
    print("| weights | M | format | f32 µs | f32 GB/s | jax µs | native µs | jax ratio | "
          "native ratio | native GB/s | native vs jax |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, shapes, layers in groups:
        for batch in batches:
            base = statistics.median(times[label, batch, "f32", "f32"])
            f32_bytes = cases[label, batch, "f32", "f32"][4]
            results.append(dict(weights=label, shapes=shapes, layers=layers, rows=batch,
                                format="f32", arm="f32", seconds=base, weight_bytes=f32_bytes,
                                gb_per_s=f32_bytes / base / 1e9, ratio_vs_f32=1.0,
                                all_seconds=times[label, batch, "f32", "f32"]))
            for fmt in formats_of(label):
                row = {}
                for arm in ("jax", "native"):
                    t = statistics.median(times[label, batch, fmt, arm])
                    nbytes = cases[label, batch, fmt, arm][4]
                    row[arm] = t
                    results.append(dict(weights=label, shapes=shapes, layers=layers,
                                        rows=batch, format=fmt, arm=arm, seconds=t,
                                        weight_bytes=nbytes,
                                        gb_per_s=nbytes / t / 1e9, ratio_vs_f32=base / t,
                                        all_seconds=times[label, batch, fmt, arm]))
                nbytes = cases[label, batch, fmt, "native"][4]
                print(f"| {label} | {batch} | {fmt} | {base * 1e6:.1f} | "
                      f"{f32_bytes / base / 1e9:.1f} | {row['jax'] * 1e6:.1f} | "
                      f"{row['native'] * 1e6:.1f} | {base / row['jax']:.2f} | "
                      f"{base / row['native']:.2f} | {nbytes / row['native'] / 1e9:.1f} | "
                      f"{row['jax'] / row['native']:.2f}× |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            status=status, rounds=rounds, jax=jax.__version__, machine=platform.machine(),
            processor=platform.processor(), results=results), indent=1) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
