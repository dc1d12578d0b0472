"""Data-parallel evaluation on 1 vs 2 CPU devices, and generation throughput vs batch size.

The two real cores of this machine become two XLA CPU devices
(`--xla_force_host_platform_device_count=2`, set below before JAX starts). Both arms run
in this one process, alternating, on the same windows of the embedded pydoc text:
* eval: perplexity windows of 512 tokens, `--batch` windows per step; one device
  (mesh data=1) vs data-parallel over two (mesh data=2, each device gets batch/2
  windows). The ratio of tokens/s is the speed-up (target ≥ 1.6×).
* generation: greedy decode of `--new-tokens` tokens for batch sizes `--batches`
  (one device), decode tokens/s summed over the batch.

Run:  python benchmarks/bench_parallel.py --json benchmarks/results/parallel.json
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4, help="eval windows per step")
    parser.add_argument("--steps", type=int, default=4, help="timed eval steps per arm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import jax

    from jaxopt_llm import load_model, pydoc_text
    from jaxopt_llm.evaluate import window_nll
    from jaxopt_llm.generation import generate
    from jaxopt_llm.parallel import global_batch, make_mesh, shard_params

    assert jax.device_count() >= 2, "needs two CPU devices"
    loaded = load_model(args.model)
    config = loaded.config
    ids = np.asarray(loaded.tokenizer.encode(pydoc_text()), np.int32)
    window = 512
    windows = ids[: (len(ids) // window) * window].reshape(-1, window)
    arms = {}
    for name, spec in (("1 device", "data=1"), ("2 devices (data=2)", "data=2")):
        mesh = make_mesh(spec)
        arms[name] = (mesh, shard_params(config, loaded.params, mesh))

    def run(arm, step):
        mesh, params = arms[arm]
        start = (step * args.batch) % (len(windows) - args.batch)
        batch = global_batch(windows[start:start + args.batch], mesh)
        return window_nll(params, batch, config=config).block_until_ready()

    for arm in arms:  # compile, and check both arms compute the same thing
        first = np.asarray(run(arm, 0))
        log(f"{arm}: compiled; nll[0] = {first[0]:.4f}")
    best = {arm: float("inf") for arm in arms}
    for _ in range(args.rounds):
        for arm in arms:
            began = time.perf_counter()
            for step in range(args.steps):
                run(arm, step)
            best[arm] = min(best[arm], time.perf_counter() - began)
    tokens = args.steps * args.batch * window
    evals = {arm: {"seconds": s, "tok_s": tokens / s} for arm, s in best.items()}
    base, dp = (evals[a]["tok_s"] for a in arms)
    log(f"eval: 1 device {base:.0f} tok/s, 2 devices {dp:.0f} tok/s ({dp / base:.2f}×)")

    prompt = loaded.tokenizer.encode("The three most important Python data structures are")
    gen = []
    for batch in (int(b) for b in args.batches.split(",")):
        generate(config, loaded.params, [prompt] * batch, max_new_tokens=args.new_tokens,
                 eos_token_ids=(-1,))  # compile
        runs = [generate(config, loaded.params, [prompt] * batch,
                         max_new_tokens=args.new_tokens, eos_token_ids=(-1,))
                for _ in range(args.rounds)]
        fastest = min(runs, key=lambda r: r.decode_seconds)
        gen.append({"batch": batch, "decode_tok_s": fastest.decode_tok_s * batch,
                    "decode_tok_s_per_sequence": fastest.decode_tok_s,
                    "prefill_tok_s": fastest.prefill_tok_s})
        log(f"generate batch {batch}: {fastest.decode_tok_s * batch:.1f} tok/s total")

    result = {
        "eval": {"window": window, "batch": args.batch, "steps": args.steps,
                 "arms": evals, "speedup": dp / base},
        "generation": {"new_tokens": args.new_tokens, "rows": gen},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count(), "jax": jax.__version__},
    }
    print("| arm | eval tok/s | × |\n|---|---|---|")
    for arm, row in evals.items():
        print(f"| {arm} | {row['tok_s']:.0f} | {row['tok_s'] / base:.2f} |")
    print("\n| batch | decode tok/s (total) | per sequence |\n|---|---|---|")
    for row in gen:
        print(f"| {row['batch']} | {row['decode_tok_s']:.1f} | "
              f"{row['decode_tok_s_per_sequence']:.1f} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
