"""Recipes on the all-MiniLM-L6-v2 sentence encoder: how close each compressed encoder's
embeddings stay to the float model's, and what it weighs.

Each row runs `jaxopt-llm eval --model minilm-l6 --recipe R` as a library call
(`runs.evaluate_encoder_text`): the first `--texts` sentences of the embedded pydoc text
and the repository's paraphrase set, embedded by the float model and by the recipe's
(mean pooling, L2 normalisation). Columns: mean and min cosine to the float embeddings,
Spearman correlation of the pairwise similarities, top-1 retrieval agreement, paraphrase
accuracy, parameter bytes, and the recipe's wall time (calibration included). Calibrated
recipes calibrate on the pydoc text after its first 65,536 tokens, far past the compared
sentences.

Run:  python benchmarks/bench_encoder.py --json benchmarks/results/encoder.json \\
          [--texts 256] [--recipes NAME,…]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROWS = ("fp32", "w8", "w8a8", "w8a8-smoothquant", "w4g32-float", "w4g128", "w4g128-gptq",
        "w4g128-awq", "w4-gptq", "w3g128-gptq", "wanda-50", "sparsegpt-50", "sparsegpt-2:4",
        "sparsegpt-2:4+w4g128-gptq", "heads-25", "heads-25-act", "mlp-25", "mlp-25-act",
        "svd-20", "svdllm-20")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here (after every row)")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--recipes", default=",".join(ROWS))
    args = parser.parse_args(argv)

    from jaxopt_llm import load_model, load_recipe, pydoc_text
    from jaxopt_llm.calibration import default_calibration
    from jaxopt_llm.recipes import apply_recipe
    from jaxopt_llm.runs import evaluate_encoder_text

    float_model = load_model("minilm-l6")
    text = pydoc_text()
    rows = []
    for name in args.recipes.split(","):
        recipe = load_recipe(name)
        start = time.perf_counter()
        calibration = (default_calibration(float_model.tokenizer)
                       if recipe.needs_calibration else None)
        compressed = apply_recipe(float_model, recipe, calibration=calibration)
        apply_seconds = time.perf_counter() - start
        record = evaluate_encoder_text(float_model, compressed, text, num_texts=args.texts)
        row = {"recipe": name, "apply_seconds": round(apply_seconds, 2),
               **{k: record[k] for k in ("cosine", "cosine_min", "spearman", "top1_agreement",
                                         "paraphrase_accuracy", "param_bytes",
                                         "dense_param_bytes", "texts")}}
        rows.append(row)
        print(f"{name:28s} cos {row['cosine']:.5f} (min {row['cosine_min']:.4f})  "
              f"spearman {row['spearman']:.5f}  top1 {row['top1_agreement']:.3f}  "
              f"para {row['paraphrase_accuracy']:.3f}  {row['param_bytes'] / 2**20:6.1f} MiB  "
              f"apply {apply_seconds:6.1f} s", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "command": "python benchmarks/bench_encoder.py " + " ".join(argv or sys.argv[1:]),
                "model": "minilm-l6 (all-MiniLM-L6-v2)", "machine": platform.processor()
                or platform.machine(), "texts": args.texts, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
