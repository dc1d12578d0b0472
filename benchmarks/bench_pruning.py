"""Calibrated pruning and low-rank factorization on SmolLM2-135M: one table of perplexity,
ΔPPL, bytes and algorithm wall time, with and without a short distillation recovery.

Rows (each against fp32 in the same run): magnitude vs Wanda vs SparseGPT at 50%
unstructured and 2:4; L2 vs activation-aware structured pruning at 25% of heads and of
MLP neurons; SVD vs ASVD vs SVD-LLM removing 20% and 40% of the block linears'
parameters; SparseGPT 2:4 with int4 codes (`sparsegpt-2:4+w4g128-gptq`) next to
`w4g128`. Perplexity follows docs/evaluation.md (the first `--tokens` pydoc tokens,
windows of 512); calibration uses the text after the 65,536 evaluation tokens, never the
evaluation tokens. "apply s" is the recipe's wall time: its layer-sequential calibration
pass plus the algorithm over every block linear.

Recovery (`--recover`): `train_recipe` from each listed recipe with pure distillation
from the float model (`distill_weight 1`) for `--recover-steps` steps of
`--recover-batch` × `--recover-seq` tokens on the training text (the pydoc text after
the evaluation tokens), then the same perplexity. Masks, N:M positions, ranks and the
shrunk configs are kept by training (tests/test_train_recipe.py).

Results are written to --json after every row, so an interrupted run keeps what it
measured; `--resume` skips rows already there.

Run:  python benchmarks/bench_pruning.py --json benchmarks/results/pruning.json \\
          --plot benchmarks/results/pruning.png [--tokens 16384] [--calib-tokens 16384] \\
          [--recipes NAME,…] [--recover NAME,…|none] [--recover-steps 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROWS = ("fp32", "magnitude-50", "wanda-50", "sparsegpt-50", "nm-2:4", "wanda-2:4",
        "sparsegpt-2:4", "heads-25", "heads-25-act", "mlp-25", "mlp-25-act", "svd-20",
        "asvd-20", "svdllm-20", "svdllm-20-global", "svd-40", "asvd-40", "svdllm-40",
        "svdllm-40-global", "w4g128",
        "sparsegpt-2:4+w4g128-gptq")
# The best of each family, recovered by default.
RECOVER = ("sparsegpt-50", "sparsegpt-2:4", "mlp-25-act", "svdllm-20",
           "sparsegpt-2:4+w4g128-gptq")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def recipe_named(name: str):
    """A built-in recipe, the 40% variants of svd-20 / asvd-20 (same ops, ratio 0.4), or
    SVD-LLM with ranks allocated over all linears ("-global", as asvd-20's)."""
    from jaxopt_llm import load_recipe
    from jaxopt_llm.pipeline import Recipe, Stage
    from jaxopt_llm.rules import BLOCK_LINEARS, rule

    extra = {"svd-40": rule(BLOCK_LINEARS, "svd", ratio=0.4),
             "asvd-40": rule(BLOCK_LINEARS, "asvd", ratio=0.4, allocation="global"),
             "svdllm-20-global": rule(BLOCK_LINEARS, "svdllm", ratio=0.2,
                                      allocation="global"),
             "svdllm-40-global": rule(BLOCK_LINEARS, "svdllm", ratio=0.4,
                                      allocation="global"),
             }
    if name in extra:
        return Recipe(name=name, description=f"{name} of the block linears' parameters",
                      stages=(Stage(name="factorize", rules=(extra[name],)),))
    return load_recipe(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--calib-tokens", type=int, default=16_384)
    parser.add_argument("--recipes", default=",".join(ROWS))
    parser.add_argument("--recover", default=",".join(RECOVER),
                        help="recipes to recover by distillation, or 'none'")
    parser.add_argument("--recover-steps", type=int, default=100)
    parser.add_argument("--recover-batch", type=int, default=2)
    parser.add_argument("--recover-seq", type=int, default=256)
    parser.add_argument("--recover-lr", type=float, default=5e-5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json and measure only the others")
    args = parser.parse_args()
    names = args.recipes.split(",")
    recover = [] if args.recover == "none" else args.recover.split(",")
    for name in recover:
        if name not in names:
            parser.error(f"--recover {name!r} is not one of --recipes")
    if names[0] != "fp32":
        parser.error("--recipes must start with fp32 (the reference of ΔPPL)")

    import numpy as np

    from jaxopt_llm import (
        TrainSettings,
        load_model,
        param_bytes,
        perplexity,
        train_recipe,
        training_ids,
    )
    from jaxopt_llm.calibration import default_calibration
    from jaxopt_llm.data import pydoc_text, text_sha256

    loaded = load_model("smollm2-135m")
    text = pydoc_text()
    ids = np.asarray(loaded.tokenizer.encode(text))
    calibration = default_calibration(loaded.tokenizer, num_tokens=args.calib_tokens,
                                      progress=lambda line: None)
    log(f"calibration: {calibration.source}")
    train_ids = training_ids(loaded.tokenizer)  # never the evaluation tokens
    result = {"command": "python " + " ".join(sys.argv),
              "machine": platform.processor() or platform.machine(),
              "text_sha256": text_sha256(text), "calibration": calibration.source,
              "tokens": args.tokens, "recovery": {
                  "steps": args.recover_steps, "batch": args.recover_batch,
                  "seq": args.recover_seq, "lr": args.recover_lr, "distill_weight": 1.0,
                  "train_tokens": int(len(train_ids))}, "rows": []}
    if args.resume and args.json and args.json.exists():
        result["rows"] = json.loads(args.json.read_text())["rows"]
    done = {row["recipe"]: row for row in result["rows"]}

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(args.json)

    for name in names:
        if name in done and (name not in recover or "recovered_ppl" in done[name]):
            continue
        recipe = recipe_named(name)
        row = done.get(name)
        if row is None:
            start = time.perf_counter()
            config, params = recipe(loaded.config, loaded.params, calibration=calibration
                                    if recipe.needs_calibration else None)
            apply_s = time.perf_counter() - start
            scored = perplexity(config, params, ids, num_tokens=args.tokens, window=512)
            row = {"recipe": name, "ppl": scored.ppl, "param_bytes": param_bytes(params),
                   "apply_seconds": apply_s, "tokens_scored": scored.tokens_scored}
            result["rows"].append(row)
            done[name] = row
            log(f"{name}: ppl {scored.ppl:.4f}, {row['param_bytes']:,} bytes, apply "
                f"{apply_s:.1f} s")
            save()
        if name in recover:
            settings = TrainSettings(steps=args.recover_steps, batch=args.recover_batch,
                                     seq=args.recover_seq, learning_rate=args.recover_lr,
                                     distill_weight=1.0)
            start = time.perf_counter()
            trained = train_recipe(loaded, recipe, train_ids, settings,
                                   calibration=calibration)
            row["recover_seconds"] = time.perf_counter() - start
            scored = perplexity(trained.config, trained.params, ids, num_tokens=args.tokens,
                                window=512)
            row["recovered_ppl"] = scored.ppl
            log(f"{name}: recovered ppl {scored.ppl:.4f} ({row['recover_seconds']:.0f} s)")
            save()

    rows = [done[name] for name in names]
    fp32 = rows[0]["ppl"]
    print(f"SmolLM2-135M, {rows[0]['tokens_scored']:,} scored tokens, text sha256 "
          f"{text_sha256(text)[:12]}…, calibration {calibration.source}; recovery: "
          f"{args.recover_steps} distillation steps of {args.recover_batch}×"
          f"{args.recover_seq} tokens\n")
    print("| recipe | ppl | ΔPPL | MiB | apply s | ppl after recovery | ΔPPL after |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["delta_ppl"] = row["ppl"] / fp32 - 1.0
        after = row.get("recovered_ppl")
        if after is not None:
            row["recovered_delta_ppl"] = after / fp32 - 1.0
        print(f"| {row['recipe']} | {row['ppl']:,.3f} | {row['delta_ppl']:+.1%} | "
              f"{row['param_bytes'] / 2**20:.1f} | {row['apply_seconds']:.1f} | "
              + ("– | – |" if after is None else
                 f"{after:,.3f} | {row['recovered_delta_ppl']:+.1%} |"))
    save()
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
    labels = [r["recipe"] for r in shown]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.barh(labels, [100 * r["delta_ppl"] for r in shown], color="tab:gray",
            label="one-shot")
    recovered = [(r["recipe"], 100 * r["recovered_delta_ppl"]) for r in shown
                 if "recovered_delta_ppl" in r]
    if recovered:
        ax.scatter([v for _, v in recovered], [n for n, _ in recovered], color="tab:red",
                   zorder=3, label="after distillation recovery")
    ax.set_xscale("symlog", linthresh=10)
    ax.invert_yaxis()
    ax.set_xlabel(f"ΔPPL vs fp32, % ({scored:,} scored tokens; symlog)")
    ax.set_title("SmolLM2-135M: calibrated pruning and low-rank")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
