"""Calibrated post-training compression on SmolLM2-135M: RTN vs GPTQ vs AWQ, W8A8 vs
SmoothQuant, and (with --recipes) magnitude vs Wanda vs SparseGPT pruning.

For each grid (W4 g128, W3 g128, W4 per channel) the round-to-nearest recipe and its
`-gptq` and `-awq` recipes are applied to the float model and scored by the evaluation
protocol (docs/evaluation.md: first `--tokens` pydoc tokens, windows of 512); naive `w8a8`
is compared with `w8a8-smoothquant`; `w4g32-float` (the embedded weights' own Q4_1 grid)
and fp32 are the anchors. Calibration data: the pydoc text after the 65,536 evaluation
tokens (92 windows of 512), never the evaluation tokens. Wall times: one layer-sequential
statistics pass alone ("calibration"), and applying each recipe (for calibrated recipes:
their own calibration pass plus the algorithm).

Run:  python benchmarks/bench_calibrated.py [--tokens 65536] [--calib-tokens N]
          [--pairs w4g128,w3g128,w4] [--recipes NAME,…]
          [--json benchmarks/results/calibrated.json] [--plot benchmarks/results/calibrated.png]
Pruning: python benchmarks/bench_calibrated.py --recipes fp32,magnitude-50,wanda-50,\
          sparsegpt-50,nm-2:4,wanda-2:4,sparsegpt-2:4 --json benchmarks/results/pruning.json \
          --plot benchmarks/results/pruning.png
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--calib-tokens", type=int, default=None)
    parser.add_argument("--pairs", default="w4g128,w3g128,w4",
                        help="RTN recipes, each compared with its '-gptq' and '-awq' recipes")
    parser.add_argument("--recipes", default=None,
                        help="exactly these recipes instead (comma-separated)")
    parser.add_argument("--skip-calibration-timing", action="store_true",
                        help="do not time one statistics pass on its own")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    import numpy as np

    from jaxopt_llm import load_model, load_recipe, param_bytes, perplexity
    from jaxopt_llm.calibration import default_calibration
    from jaxopt_llm.data import pydoc_text, text_sha256

    loaded = load_model("smollm2-135m")
    text = pydoc_text()
    ids = np.asarray(loaded.tokenizer.encode(text))
    calibration = default_calibration(loaded.tokenizer, num_tokens=args.calib_tokens,
                                      progress=lambda line: None)
    log(f"calibration: {calibration.source}")
    from jaxopt_llm.calibration import linear_statistics

    if args.recipes:
        names = args.recipes.split(",")
    else:
        names = ["fp32", "w4g32-float", "w8a8", "w8a8-smoothquant"]
        for rtn in args.pairs.split(","):
            names += [rtn, f"{rtn}-gptq", f"{rtn}-awq"]
    calibration_s = None
    if not args.skip_calibration_timing:
        start = time.perf_counter()
        linear_statistics(loaded.config, loaded.params, calibration)
        calibration_s = time.perf_counter() - start
        log(f"calibration pass alone: {calibration_s:.1f} s")
    rows = []
    for name in names:
        recipe = load_recipe(name)
        start = time.perf_counter()
        config, params = recipe(loaded.config, loaded.params,
                                calibration=calibration if recipe.needs_calibration else None)
        apply_s = time.perf_counter() - start
        result = perplexity(config, params, ids, num_tokens=args.tokens, window=512)
        rows.append({"recipe": name, "ppl": result.ppl, "param_bytes": param_bytes(params),
                     "apply_seconds": apply_s, "tokens_scored": result.tokens_scored})
        log(f"{name}: ppl {result.ppl:.4f}, apply {apply_s:.1f} s")
    fp32 = rows[0]["ppl"]
    print(f"SmolLM2-135M, {rows[0]['tokens_scored']} scored tokens, text sha256 "
          f"{text_sha256(text)[:12]}…, calibration {calibration.source}\n")
    if calibration_s is not None:
        print(f"calibration (one layer-sequential statistics pass): {calibration_s:.1f} s\n")
    print("| recipe | ppl | ΔPPL | MiB | apply s (calibration + algorithm) |")
    print("|---|---|---|---|---|")
    for row in rows:
        row["delta_ppl"] = row["ppl"] / fp32 - 1.0
        print(f"| {row['recipe']} | {row['ppl']:.3f} | {row['delta_ppl']:+.2%} | "
              f"{row['param_bytes'] / 2**20:.1f} | {row['apply_seconds']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "machine": platform.processor()
            or platform.machine(), "text_sha256": text_sha256(text),
            "calibration": calibration.source, "calibration_seconds": calibration_s,
            "tokens": args.tokens, "rows": rows},
            indent=1) + "\n")
    if args.plot:
        _plot(rows, args.plot, rows[0]["tokens_scored"])


def _plot(rows: list[dict], path: Path, scored: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[bench]'") from None
    shown = [r for r in rows if r["recipe"] != "fp32"]
    def color(name: str) -> str:
        if name.endswith("-gptq") or name.startswith("sparsegpt"):
            return "tab:red"
        if name.endswith(("-awq", "-smoothquant")) or name.startswith("wanda"):
            return "tab:green"
        return "tab:gray"

    colors = [color(r["recipe"]) for r in shown]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh([r["recipe"] for r in shown], [100 * r["delta_ppl"] for r in shown], color=colors)
    ax.set_xscale("symlog", linthresh=10)
    ax.invert_yaxis()
    ax.set_xlabel(f"ΔPPL vs fp32, % ({scored:,} scored tokens; gray uncalibrated, red "
                  "GPTQ/SparseGPT, green AWQ/SmoothQuant/Wanda)")
    ax.set_title("SmolLM2-135M: calibrated vs uncalibrated compression")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
