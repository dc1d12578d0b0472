"""Every built-in recipe on SmolLM2-135M: perplexity lost, bytes saved, speed gained.

For each recipe, in one process:
* ppl: docs/evaluation.md protocol (first 65,536 pydoc tokens, windows of 512, batch 1),
  ΔPPL relative to fp32 measured in the same run; the text's sha256 is printed.
* bytes: all parameters (`param_bytes`) and the block linears alone (what the
  recipes transform), each as a ratio to fp32.
* prefill / decode tok/s: `generate` on a 512-token prompt from the evaluation text,
  32 greedy new tokens (EOS disabled), best of `--rounds`; fp32 runs alternate with the
  recipe's and each speed ratio uses those paired fp32 runs, so machine drift hits
  both sides alike. Compile time is excluded (AOT-compiled programs).
Outputs a markdown table on stdout, JSON (`--json`) and a PNG plot of perplexity vs
bytes (`--plot`, needs matplotlib: pip install -e '.[bench]').

Run:  python benchmarks/bench_recipes.py [--tokens N] [--recipes fp32,w8,...]
          [--json benchmarks/results/recipes.json] [--plot benchmarks/results/recipes.png]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

TARGETS = "w8 ΔPPL ≤ 0.5%; w4g128 linear bytes ≈ 0.13×; quantized prefill ≥ 1× fp32; w8a8 ≥ 1.5×"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _linear_bytes(params: Any) -> int:
    import re

    from jaxopt_llm.rules import BLOCK_LINEARS
    from jaxopt_llm.tree import flatten
    from jaxopt_llm.weights import param_bytes

    return sum(param_bytes(leaf) for path, leaf in flatten(params).items()
               if re.fullmatch(BLOCK_LINEARS, path))


def _paired_speed(base, candidate, prompt: list[int], new_tokens: int,
                  rounds: int) -> list[tuple[float, float]]:
    """Best (prefill, decode) tok/s of fp32 and of the candidate, runs alternating."""
    from jaxopt_llm.generation import generate

    best = [[0.0, 0.0], [0.0, 0.0]]
    for _ in range(rounds):
        for slot, (config, params) in enumerate((base, candidate)):
            result = generate(config, params, [prompt], max_new_tokens=new_tokens,
                              eos_token_ids=())
            best[slot][0] = max(best[slot][0], result.prefill_tok_s)
            best[slot][1] = max(best[slot][1], result.decode_tok_s)
    return [tuple(b) for b in best]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from jaxopt_llm import load_model, perplexity, pydoc_text, text_sha256
    from jaxopt_llm.recipes import BUILTIN_RECIPES
    from jaxopt_llm.weights import param_bytes

    # calibrated recipes (GPTQ) are compared with their RTN grids by bench_calibrated.py
    names = args.recipes.split(",") if args.recipes else [
        name for name, recipe in BUILTIN_RECIPES.items() if not recipe.needs_calibration]
    unknown = [n for n in names if n not in BUILTIN_RECIPES
               or BUILTIN_RECIPES[n].needs_calibration]
    if unknown:
        raise SystemExit(f"recipes {unknown} are unknown or calibrated (see bench_calibrated.py); "
                         f"built-ins: {list(BUILTIN_RECIPES)}")
    if "fp32" not in names:
        names.insert(0, "fp32")
    loaded = load_model("smollm2-135m")
    text = pydoc_text()
    ids = loaded.tokenizer.encode(text)
    log(f"text sha256 {text_sha256(text)}, {len(ids)} tokens")
    prompt = ids[-args.prompt_tokens:]  # from the end: not the start the ppl scores
    base_config, base_params = loaded.config, loaded.params
    reused = {}
    if args.reuse_ppl:
        previous = json.loads(args.reuse_ppl.read_text())
        same = (previous.get("text_sha256"), previous.get("tokens")) == (text_sha256(text),
                                                                         args.tokens)
        if not same:
            raise SystemExit(f"{args.reuse_ppl} was measured on another text or token count")
        reused = {row["recipe"]: row for row in previous["rows"]}
    rows = []
    for name in names:
        start = time.perf_counter()
        config, params = BUILTIN_RECIPES[name](base_config, base_params)
        transform_s = time.perf_counter() - start
        start = time.perf_counter()
        if name in reused:  # perplexity is deterministic: take it from an earlier run
            ppl_value, scored = reused[name]["ppl"], reused[name]["tokens_scored"]
        else:
            log(f"{name}: transformed in {transform_s:.1f} s; perplexity…")
            result = perplexity(config, params, ids, num_tokens=args.tokens)
            ppl_value, scored = result.ppl, result.tokens_scored
        eval_s = time.perf_counter() - start
        (fp32_prefill, fp32_decode), (prefill, decode) = _paired_speed(
            (base_config, base_params), (config, params), prompt, args.new_tokens, args.rounds)
        rows.append({
            "recipe": name, "ppl": ppl_value, "tokens_scored": scored,
            "param_bytes": param_bytes(params), "linear_bytes": _linear_bytes(params),
            "prefill_tok_s": prefill, "decode_tok_s": decode,
            "fp32_prefill_tok_s": fp32_prefill, "fp32_decode_tok_s": fp32_decode,
            "transform_s": transform_s, "eval_s": eval_s,
        })
        log(f"{name}: ppl {ppl_value:.4f}, prefill {prefill:.0f} (fp32 {fp32_prefill:.0f}), "
            f"decode {decode:.1f} (fp32 {fp32_decode:.1f}) tok/s")
    base = rows[0]
    for row in rows:
        row["delta_ppl_pct"] = 100 * (row["ppl"] / base["ppl"] - 1)
        row["bytes_ratio"] = row["param_bytes"] / base["param_bytes"]
        row["linear_bytes_ratio"] = row["linear_bytes"] / base["linear_bytes"]
        row["prefill_ratio"] = row["prefill_tok_s"] / row["fp32_prefill_tok_s"]
        row["decode_ratio"] = row["decode_tok_s"] / row["fp32_decode_tok_s"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| recipe | ppl | ΔPPL | MiB | bytes × | linear bytes × | prefill tok/s (× fp32) "
        "| decode tok/s (× fp32) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f}% "
            f"| {r['param_bytes'] / 2**20:.1f} | {r['bytes_ratio']:.3f} "
            f"| {r['linear_bytes_ratio']:.3f} | {r['prefill_tok_s']:.0f} "
            f"({r['prefill_ratio']:.2f}×) | {r['decode_tok_s']:.1f} ({r['decode_ratio']:.2f}×) |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["param_bytes"] / 2**20, r["ppl"])
        ax.annotate(r["recipe"], (r["param_bytes"] / 2**20, r["ppl"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("parameter bytes (MiB, all weights incl. float32 embeddings)")
    ax.set_ylabel("perplexity (pydoc, 65,536 tokens, window 512)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: built-in recipes, perplexity vs size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", help="comma-separated built-in names (default: all)")
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--reuse-ppl", type=Path,
                        help="take perplexities from an earlier --json (same text and --tokens) "
                             "and measure only bytes and speed")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    rows = run(args)
    print(table(rows))
    print(f"\ntargets: {TARGETS}; machine: {platform.processor() or platform.machine()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from jaxopt_llm import pydoc_text, text_sha256

        args.json.write_text(json.dumps({"rows": rows, "argv": sys.argv, "tokens": args.tokens,
                                         "text_sha256": text_sha256(pydoc_text())}, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
