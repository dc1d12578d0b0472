"""Quantization-aware training of all-MiniLM-L6-v2 by hidden-state distillation: how close
a 4-bit encoder gets to the float model's sentence embeddings after training.

The recipe's quantized weights become fake-quantized masters on the same grid
(`qat_recipe`), trained with AdamW for `--steps` steps of `--batch` windows of `--seq`
tokens from the evaluation text after its first 65,536 tokens (the calibration split:
the evaluation sentences come from the start of the text), with the mean squared error
between the student's and the float teacher's last hidden states as the loss; then
converted back to integer codes. Reported before and after: the encoder evaluation
(docs/evaluation.md, "Encoders": cosine to the float model's embeddings on 256
sentences, Spearman, top-1) and `param_bytes`.

Run:  python benchmarks/bench_encoder_qat.py --json benchmarks/results/encoder_qat.json \\
          [--recipes w4g32-float,w4g128] [--steps 150] [--lr 5e-5]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recipes", default="w4g32-float,w4g128")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--texts", type=int, default=256)
    args = parser.parse_args(argv)

    from jaxopt_llm import load_model, load_recipe, pydoc_text
    from jaxopt_llm.calibration import EVAL_TOKENS
    from jaxopt_llm.encoders import evaluate_encoder, sentences
    from jaxopt_llm.train import TrainOptions, convert, run_training
    from jaxopt_llm.train.qat import qat_recipe
    from jaxopt_llm.weights import param_bytes

    text = pydoc_text()
    model = load_model("minilm-l6")
    texts = sentences(text, args.texts)
    train_ids = np.asarray(model.tokenizer.encode(text)[EVAL_TOKENS:], np.int32)
    rows = []
    for name in args.recipes.split(","):
        recipe = load_recipe(name)
        config, start_params = recipe(model.config, model.params)
        before = evaluate_encoder(model.config, model.params, config, start_params,
                                  model.tokenizer, texts)
        _, student = qat_recipe(recipe)(model.config, model.params)
        began = time.perf_counter()
        result = run_training(config, student, TrainOptions(
            steps=args.steps, learning_rate=args.lr, warmup_steps=args.steps // 10),
            train_ids, batch=args.batch, seq=args.seq, teacher=model.params)
        seconds = time.perf_counter() - began
        trained = convert(result.params)
        after = evaluate_encoder(model.config, model.params, config, trained,
                                 model.tokenizer, texts)
        losses = [r["hidden_mse"] for r in result.history]
        row = {"recipe": name, "steps": args.steps, "batch": args.batch, "seq": args.seq,
               "lr": args.lr, "train_seconds": seconds,
               "hidden_mse_first10": float(np.mean(losses[:10])),
               "hidden_mse_last10": float(np.mean(losses[-10:])),
               "param_bytes_before": param_bytes(start_params),
               "param_bytes_after": param_bytes(trained),
               "before": {k: before[k] for k in ("cosine", "cosine_min", "spearman",
                                                 "top1_agreement")},
               "after": {k: after[k] for k in ("cosine", "cosine_min", "spearman",
                                               "top1_agreement")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "command": "python benchmarks/bench_encoder_qat.py "
                           + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": platform.processor() or platform.machine(),
                "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
