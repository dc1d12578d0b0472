"""Calibrated post-training quantization on SmolLM2-135M: round-to-nearest vs GPTQ.

For each grid (W4 g128, W3 g128, W4 per channel) the RTN recipe and its GPTQ recipe are
applied to the float model and scored by the evaluation protocol (docs/evaluation.md:
first `--tokens` pydoc tokens, windows of 512); `w4g32-float` (the embedded weights'
own Q4_1 grid) and fp32 are the anchors. Calibration data: the pydoc text after the
65,536 evaluation tokens (92 windows of 512), never the evaluation tokens. Wall times:
applying each recipe (for GPTQ: layer-sequential calibration plus the algorithm).

Run:  python benchmarks/bench_calibrated.py [--tokens 65536] [--calib-tokens N]
          [--pairs w4g128,w3g128,w4] [--json benchmarks/results/calibrated.json]
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
                        help="RTN recipes, each compared with its '-gptq' recipe")
    parser.add_argument("--json", type=Path)
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
    names = ["fp32", "w4g32-float"]
    for rtn in args.pairs.split(","):
        names += [rtn, f"{rtn}-gptq"]
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
            "calibration": calibration.source, "tokens": args.tokens, "rows": rows},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
