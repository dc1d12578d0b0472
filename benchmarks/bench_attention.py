"""Causal-prefix attention: the native kernel vs torch's SDPA vs XLA's dense attention.

At SmolLM2-135M's attention shapes (B=1, H=9 query heads, Hkv=3 kv heads, D=64, float32)
for T in --lengths (default 512, 1024, 2048, 4096), one layer's attention per call:
* native  `jaxopt_llm.models.native_attention.native_prefix_attention` (csrc/attention.cc
          through the XLA FFI), q (B, T, H, D) with a causal (B, T, T) bool mask, jitted;
* torch   `torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)` on
          (B, H, T, D) tensors, torch limited to --threads threads; GQA by k and v repeated
          to H heads before timing (`--torch-gqa` passes `enable_gqa=True` instead);
* dense   a plain pure-JAX reference: scores (B, H, T, T), masked, softmax, · v (XLA);
* flash   (with `--flash`) the pure-JAX online-softmax path of jaxopt_llm.models.attention,
          when that module is importable.
Every arm gets its inputs in its own layout, prepared before timing. Arms are interleaved
round by round in one process and the median over rounds is reported, with each arm's
ratio to torch (< 1: faster than torch). Short lengths repeat the call inside one sample
(4096²/T²/4 times) so a sample is not just dispatch. Before timing, every arm's output is
compared with torch's (max |difference|).

Run:  python benchmarks/bench_attention.py --json /tmp/attention.json
      (under a minute on 2 cores; --quick: 3 rounds; --lengths 4096 for the target row)
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

B, H, HKV, D = 1, 9, 3, 64  # SmolLM2-135M


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--torch-gqa", action="store_true",
                        help="torch with enable_gqa=True instead of repeated k, v")
    parser.add_argument("--flash", action="store_true",
                        help="also time the pure-JAX flash path (jaxopt_llm.models.attention)")
    parser.add_argument("--no-dense", action="store_true", help="skip XLA's dense attention")
    parser.add_argument("--variant", default="auto", help="native kernel: auto, scalar, avx2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds

    import jax
    import jax.numpy as jnp
    import torch

    from jaxopt_llm.models.native_attention import (
        native_prefix_attention,
        prefix_attention_status,
    )

    torch.set_num_threads(args.threads)
    available, status = prefix_attention_status()
    log(f"native: {status}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"jax {jax.__version__}")
    if not available:
        sys.exit(f"native attention not available: {status}")

    def native(q, k, v, mask):
        out = native_prefix_attention(q, k, v, mask, variant=args.variant)
        assert out is not None, "native_prefix_attention declined the inputs"
        return out

    def dense(q, k, v, mask):
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.float32(np.sqrt(q.shape[-1]))
        scores = jnp.where(mask[:, None], scores, -jnp.inf)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)

    arms = {"native": jax.jit(native)}
    if not args.no_dense:
        arms["dense"] = jax.jit(dense)
    if args.flash:
        try:
            from jaxopt_llm.models.attention import flash_prefix_attention
        except ImportError as error:
            log(f"no flash arm: {error}")
        else:
            arms["flash"] = jax.jit(flash_prefix_attention)

    def torch_sdpa(q, k, v):
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=args.torch_gqa)

    rng = np.random.default_rng(0)
    lengths = [int(t) for t in args.lengths.split(",")]
    cases = {}
    for t in lengths:
        q = rng.standard_normal((B, t, H, D), dtype=np.float32)
        k = rng.standard_normal((B, t, HKV, D), dtype=np.float32)
        v = rng.standard_normal((B, t, HKV, D), dtype=np.float32)
        mask = jnp.asarray(np.broadcast_to(np.tril(np.ones((t, t), bool)), (B, t, t)))
        jax_inputs = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
        tq = torch.from_numpy(q).transpose(1, 2).contiguous()  # (B, H, T, D)
        tk = torch.from_numpy(k).transpose(1, 2).contiguous()
        tv = torch.from_numpy(v).transpose(1, 2).contiguous()
        if not args.torch_gqa:
            tk, tv = tk.repeat_interleave(H // HKV, dim=1), tv.repeat_interleave(H // HKV, dim=1)
        want = torch_sdpa(tq, tk, tv).transpose(1, 2).numpy()
        errors = {}
        for name, fn in arms.items():
            got = np.asarray(jax.block_until_ready(fn(*jax_inputs)))  # also compiles
            errors[name] = float(np.max(np.abs(got - want)))
        log(f"T={t}: max |arm - torch| " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))
        reps = max(1, (4096 // t) ** 2 // 4)
        cases[t] = (jax_inputs, (tq, tk, tv), reps, errors)

    def sample(name, t):
        jax_inputs, torch_inputs, reps, _ = cases[t]
        start = time.perf_counter()
        for _ in range(reps):
            if name == "torch":
                torch_sdpa(*torch_inputs)
            else:
                jax.block_until_ready(arms[name](*jax_inputs))
        return (time.perf_counter() - start) / reps * 1e3

    names = ["native", "torch", *[n for n in arms if n != "native"]]
    times = {(n, t): [] for n in names for t in lengths}
    for r in range(rounds):
        for t in lengths:
            for name in names if r % 2 == 0 else names[::-1]:
                times[name, t].append(sample(name, t))
        log(f"round {r + 1}/{rounds}: " + ", ".join(
            f"T={t} native {times['native', t][-1]:.1f} / torch {times['torch', t][-1]:.1f} ms"
            for t in lengths))

    median = {key: statistics.median(values) for key, values in times.items()}
    header = "| T | " + " | ".join(f"{n} ms" for n in names) + " | " + \
        " | ".join(f"{n} / torch" for n in names if n != "torch") + " |"
    print(f"\nB={B}, H={H}, Hkv={HKV}, D={D}, float32, causal; median of {rounds} rounds; "
          f"torch {args.threads} threads{' (enable_gqa)' if args.torch_gqa else ''}\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for t in lengths:
        cells = [f"{median[n, t]:.1f}" for n in names]
        ratios = [f"{median[n, t] / median['torch', t]:.2f}x" for n in names if n != "torch"]
        print(f"| {t} | " + " | ".join(cells + ratios) + " |")

    if args.json:
        result = {
            "shape": {"B": B, "H": H, "Hkv": HKV, "D": D, "dtype": "float32"},
            "native_status": status,
            "torch": torch.__version__, "torch_threads": args.threads,
            "torch_gqa": args.torch_gqa, "jax": jax.__version__,
            "machine": platform.processor() or platform.machine(), "rounds": rounds,
            "rows": [{"T": t, "reps": cases[t][2], "max_abs_vs_torch": cases[t][3],
                      **{f"{n}_ms": median[n, t] for n in names},
                      **{f"{n}_samples_ms": times[n, t] for n in names},
                      **{f"{n}_over_torch": median[n, t] / median["torch", t]
                         for n in names if n != "torch"}}
                     for t in lengths],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
