"""bfloat16 compute (`compute_in`, `--compute bfloat16`) on SmolLM2: what it costs in
perplexity and what it gains or loses in speed, against float32 in the same run.

For each `--recipes` entry, float32 and bfloat16 compute: perplexity on the first
`--tokens` evaluation tokens (docs/evaluation.md: windows of 512) and its change; then
interleaved over `--rounds` rounds (median): evaluation tok/s (one 512-token window per
forward), prefill tok/s of a 512-token prompt and decode tok/s (64 new tokens, batch 1);
the parameter bytes. The CPU's bf16 support is recorded: XLA's bf16 matmuls are fast only
where the CPU has bf16 instructions (`jaxopt_llm.hardware`), which `--compute auto` uses.

Run:  python benchmarks/bench_compute_dtype.py --json benchmarks/results/compute_dtype.json \\
          [--recipes fp32,w8] [--tokens 4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recipes", default="fp32,w8")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import numpy as np

    from jaxopt_llm import hardware, load_model, load_recipe, pydoc_text
    from jaxopt_llm.calibration import EVAL_TOKENS
    from jaxopt_llm.evaluate import perplexity
    from jaxopt_llm.generation import generate
    from jaxopt_llm.transforms.precision import compute_in
    from jaxopt_llm.weights import param_bytes

    model = load_model("smollm2-135m")
    ids = model.tokenizer.encode(pydoc_text())
    prompt = ids[EVAL_TOKENS: EVAL_TOKENS + 512]
    rows = []
    for name in args.recipes.split(","):
        config, params = load_recipe(name)(model.config, model.params)
        variants = {dtype: compute_in(params, dtype) for dtype in ("float32", "bfloat16")}
        row = {"recipe": name}
        for dtype, p in variants.items():
            row[f"ppl_{dtype}"] = perplexity(config, p, ids, num_tokens=args.tokens).ppl
            row[f"param_bytes_{dtype}"] = param_bytes(p)
        speeds = {dtype: {"eval": [], "prefill": [], "decode": []} for dtype in variants}
        eval_ids = np.asarray(ids[:2048])
        for p in variants.values():  # warm-up: compile both before timing
            perplexity(config, p, eval_ids, num_tokens=2048)
            generate(config, p, [prompt], max_new_tokens=64, eos_token_ids=(-1,))
        for _ in range(args.rounds):  # interleaved: both see the same machine state
            for dtype, p in variants.items():
                start = time.perf_counter()
                perplexity(config, p, eval_ids, num_tokens=2048)
                speeds[dtype]["eval"].append(2048 / (time.perf_counter() - start))
                result = generate(config, p, [prompt], max_new_tokens=64, eos_token_ids=(-1,))
                speeds[dtype]["prefill"].append(result.prefill_tok_s)
                speeds[dtype]["decode"].append(result.decode_tok_s)
        for dtype in variants:
            for kind, values in speeds[dtype].items():
                row[f"{kind}_tok_s_{dtype}"] = statistics.median(values)
        row["delta_ppl_pct"] = 100 * (row["ppl_bfloat16"] / row["ppl_float32"] - 1)
        for kind in ("eval", "prefill", "decode"):
            row[f"{kind}_ratio"] = row[f"{kind}_tok_s_bfloat16"] / row[f"{kind}_tok_s_float32"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python benchmarks/bench_compute_dtype.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": platform.processor() or platform.machine(),
            "cpu_bf16_native": hardware.native_bf16(), "tokens": args.tokens,
            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
