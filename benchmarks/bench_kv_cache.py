"""The int8 KV cache on SmolLM2: what it saves (bytes) and what it costs (perplexity,
greedy agreement, decode speed), against the float32 cache in the same run.

For each `--recipes` entry: perplexity on the first `--tokens` evaluation tokens
(docs/evaluation.md: windows of 512) with kv_cache float and int8 — an int8 cache stores
each token's keys and values rounded once, so the no-cache evaluation with the same
rounding is exactly what decoding over the cache sees (tests/models/test_kv_cache.py
checks this); greedy continuations of `--prompts` prompts taken from the text after the
evaluation tokens, `--new-tokens` each, and how many leading tokens agree with the float
cache's; the cache's bytes for batch 1 × the whole context; decode tok/s of both caches,
interleaved over `--rounds` rounds (median), as a ratio.

Run:  python benchmarks/bench_kv_cache.py --json benchmarks/results/kv_cache.json \\
          [--recipes fp32,w8] [--tokens 4096] [--prompts 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recipes", default="fp32,w8")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from jaxopt_llm import load_model, load_recipe, pydoc_text
    from jaxopt_llm.calibration import EVAL_TOKENS
    from jaxopt_llm.evaluate import perplexity
    from jaxopt_llm.generation import generate
    from jaxopt_llm.models import init_cache
    from jaxopt_llm.models.kv_cache import cache_bytes

    model = load_model("smollm2-135m")
    ids = model.tokenizer.encode(pydoc_text())
    prompts = [ids[EVAL_TOKENS + 64 * i: EVAL_TOKENS + 64 * i + 48]
               for i in range(args.prompts)]
    rows = []
    for name in args.recipes.split(","):
        config, params = load_recipe(name)(model.config, model.params)
        configs = {kind: dataclasses.replace(config, kv_cache=kind)
                   for kind in ("float", "int8")}
        row = {"recipe": name}
        for kind, cfg in configs.items():
            row[f"ppl_{kind}"] = perplexity(cfg, params, ids, num_tokens=args.tokens).ppl
            row[f"cache_bytes_{kind}"] = cache_bytes(init_cache(
                cfg, 1, cfg.max_position_embeddings))
        greedy = {kind: generate(cfg, params, prompts, max_new_tokens=args.new_tokens,
                                 eos_token_ids=(-1,)).new_ids
                  for kind, cfg in configs.items()}
        agree = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                 for x, y in zip(greedy["float"], greedy["int8"], strict=True)]
        speeds = {"float": [], "int8": []}
        for _ in range(args.rounds):  # interleaved: both caches see the same machine state
            for kind, cfg in configs.items():
                result = generate(cfg, params, prompts[:1], max_new_tokens=64,
                                  eos_token_ids=(-1,))
                speeds[kind].append(result.decode_tok_s)
        row.update({
            "delta_ppl_pct": 100 * (row["ppl_int8"] / row["ppl_float"] - 1),
            "cache_bytes_ratio": row["cache_bytes_int8"] / row["cache_bytes_float"],
            "greedy_agreeing_mean": statistics.mean(agree), "greedy_tokens": args.new_tokens,
            "greedy_identical": sum(a == args.new_tokens for a in agree),
            "prompts": len(prompts),
            "decode_tok_s_float": statistics.median(speeds["float"]),
            "decode_tok_s_int8": statistics.median(speeds["int8"]),
        })
        row["decode_ratio"] = row["decode_tok_s_int8"] / row["decode_tok_s_float"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python benchmarks/bench_kv_cache.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": platform.processor() or platform.machine(), "tokens": args.tokens,
            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
