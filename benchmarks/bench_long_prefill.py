"""Long prompts on SmolLM2-135M (float32, batch 1): our prefill with each attention
formulation against HF transformers (torch, sdpa) in one process.

For each prompt length T (tokens cut from the evaluation text), one forward that returns
the last position's logits (what a prefill needs; HF: `logits_to_keep=1, use_cache=False`):

* ours, per attention path (`jaxopt_llm.models.attention`, forced with
  JAXOPT_LLM_ATTENTION): `blocked` (the dense path with query blocks), `flash` (pure JAX,
  keys in blocks with an online softmax) and `native` (the C++ kernel, when built);
* HF transformers fp32 with its default attention (sdpa), 2 torch threads.

Rounds interleave every system (median of `--rounds`); a first call per path is its
compile and is reported apart. Memory: XLA's own count of the compiled forward's
temporary buffers (`memory_analysis().temp_size_in_bytes`), which is where the score
tensors live. The last-position logits of each path are compared with HF's (max |Δ|).

Run:  python benchmarks/bench_long_prefill.py --json benchmarks/results/long_prefill.json \\
          [--lengths 1024,2048,4096] [--rounds 3] [--paths blocked,flash,native]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_foundation import load_hf, load_ours, log, token_ids  # noqa: E402

TORCH_THREADS = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", default="blocked,flash,native")
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    paths = args.paths.split(",")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxopt_llm import hardware
    from jaxopt_llm.models.attention import ATTENTION_ENV, describe_prefix_attention
    from jaxopt_llm.models.forward import forward
    from jaxopt_llm.models.native_attention import prefix_attention_status

    if "native" in paths and not prefix_attention_status()[0]:
        log(f"native kernel not available ({prefix_attention_status()[1]}): its rows skipped")
        paths.remove("native")
    config, params, tokenizer, gguf = load_ours()
    ids, _ = token_ids(tokenizer, gguf)
    if len(ids) < max(lengths):
        raise SystemExit(f"the evaluation text has {len(ids)} tokens, fewer than {max(lengths)}")
    hf = None
    if not args.no_hf:
        import torch

        torch.set_num_threads(TORCH_THREADS)
        hf = load_hf(gguf)

    def ours_program(path: str, length: int):
        os.environ[ATTENTION_ENV] = path  # read while tracing: one program per path
        program = jax.jit(lambda p, t: forward(config, p, t, last_only=True)[0][0, -1])
        tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
        start = time.perf_counter()
        compiled = program.lower(params, tokens).compile()
        seconds = time.perf_counter() - start
        return compiled, seconds, compiled.memory_analysis().temp_size_in_bytes

    rows = []
    for length in lengths:
        tokens = jnp.asarray([ids[:length]], jnp.int32)
        programs = {p: ours_program(p, length) for p in paths}
        times: dict[str, list[float]] = {p: [] for p in [*paths, *(["hf"] if hf else [])]}
        logits = {}
        for p, (compiled, _, _) in programs.items():  # first execution, not timed
            logits[p] = np.asarray(compiled(params, tokens))
        if hf is not None:
            with torch.inference_mode():
                hf_tokens = torch.tensor([ids[:length]])
                logits["hf"] = hf(hf_tokens, logits_to_keep=1, use_cache=False).logits[
                    0, -1].numpy()
        for round_index in range(args.rounds):
            for p, (compiled, _, _) in programs.items():
                start = time.perf_counter()
                compiled(params, tokens).block_until_ready()
                times[p].append(time.perf_counter() - start)
            if hf is not None:
                with torch.inference_mode():
                    start = time.perf_counter()
                    hf(hf_tokens, logits_to_keep=1, use_cache=False)
                    times["hf"].append(time.perf_counter() - start)
            log(f"T={length} round {round_index + 1}: " + ", ".join(
                f"{p} {ts[-1]:.2f}s" for p, ts in times.items()))
        medians = {p: statistics.median(ts) for p, ts in times.items()}
        for p in times:
            row = {"length": length, "system": "hf-sdpa" if p == "hf" else f"ours-{p}",
                   "seconds": medians[p], "tok_s": length / medians[p],
                   "vs_hf": (medians[p] / medians["hf"]) if hf is not None else None}
            if p != "hf":
                _, compile_s, temp = programs[p]
                row.update(compile_seconds=compile_s, temp_bytes=temp)
                if hf is not None:
                    row["max_abs_logit_diff_vs_hf"] = float(np.abs(logits[p] - logits["hf"]).max())
            rows.append(row)

    result = {
        "benchmark": "long_prefill",
        "command": "python benchmarks/bench_long_prefill.py " + " ".join(argv or sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), **hardware.describe(),
                    "prefix_attention": describe_prefix_attention()},
        "rounds": args.rounds, "torch_threads": TORCH_THREADS,
        "rows": rows,
    }
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["| T | system | seconds | tok/s | × HF time | compile s | XLA temp MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_hf']:.2f}" if r.get("vs_hf") is not None else "—"
        compile_s = f"{r['compile_seconds']:.1f}" if "compile_seconds" in r else "—"
        temp = f"{r['temp_bytes'] / 2**20:.0f}" if "temp_bytes" in r else "—"
        lines.append(f"| {r['length']} | {r['system']} | {r['seconds']:.2f} | "
                     f"{r['tok_s']:.0f} | {ratio} | {compile_s} | {temp} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
