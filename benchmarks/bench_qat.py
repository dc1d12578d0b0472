"""QAT and gradual pruning on SmolLM2-135M: how much of the PTQ perplexity gap training wins back.

Runs (choose with `--runs`, results merged into `--json`):
* `timing`: median seconds of a float train step and of a QAT (W4 fake-quant) train
  step on the same batches, interleaved in one process, in float32 and bfloat16.
* `w4`, `w3g128` (any quantized built-in recipe): perplexity of the float model, of
  round-to-nearest PTQ, and after `--steps` QAT steps with distillation from the float
  model (then converted to real integer weights); recovered = (PTQ − QAT)/(PTQ − fp32).
* `prune`: magnitude 50% one-shot (no training), one-shot + fine-tune, and gradual
  (cubic schedule to 50% over 3/4 of the steps) + fine-tune, same steps and data.

Perplexity: docs/evaluation.md protocol on the first `--tokens` pydoc tokens (windows of
512); training uses the text after the first 65,536 tokens, `--batch`×`--seq` windows.

Run:  python benchmarks/bench_qat.py --runs timing,w4,w3g128,prune --json \
          benchmarks/results/qat.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _ppl(config, params, ids, tokens: int) -> float:
    from jaxopt_llm import perplexity

    return perplexity(config, params, ids, num_tokens=tokens).ppl


def _settings(args, **changes):
    """The benchmark's training settings: distillation from the float model, a tenth of
    the steps (at least one) of warmup."""
    from jaxopt_llm.train import TrainSettings

    return TrainSettings(steps=args.steps, batch=args.batch, seq=args.seq,
                         learning_rate=args.lr, warmup_steps=max(1, args.steps // 10),
                         distill_weight=args.distill_weight, compute_dtype=args.compute,
                         **changes)


def _train(loaded, recipe, ids, settings):
    """`train_recipe`, logging every tenth step; (trained model, timing and loss stats)."""
    from jaxopt_llm.train import train_recipe

    trained = train_recipe(loaded, recipe, ids, settings, on_step=lambda step, rec: (
        step % 10 == 0 and log(f"  step {step}: loss {rec['loss']:.4f} ({rec['step_s']:.1f} s)")))
    return trained, {"train_s": trained.train_seconds, "step_s": trained.step_seconds,
                     "loss_first": trained.loss_first, "loss_last": trained.loss_last}


def run_timing(loaded, train_ids, args) -> dict[str, Any]:
    """Float step vs QAT step (W4 per-channel fake-quant), interleaved on the same batches."""
    import jax.numpy as jnp

    from jaxopt_llm.recipes import load_recipe
    from jaxopt_llm.train import TrainOptions, batch_at, make_trainer, qat_recipe

    out = {}
    _, qat_params = qat_recipe(load_recipe("w4"))(loaded.config, loaded.params)
    for compute in ("float32", "bfloat16"):
        options = TrainOptions(steps=100, learning_rate=1e-5, compute_dtype=compute)
        runs = {}
        for name, params in (("float", loaded.params), ("qat", qat_params)):
            trainer, frozen = make_trainer(loaded.config, params, options)
            runs[name] = [trainer, frozen, trainer.init(params)]
        times = {"float": [], "qat": []}
        for step in range(args.timing_steps + 1):
            tokens = jnp.asarray(batch_at(train_ids, step, args.batch, args.seq))
            for name, run in runs.items():
                began = time.perf_counter()
                run[2], metrics = run[0].step(run[2], run[1], tokens)
                metrics["loss"].block_until_ready()
                if step:  # step 0 compiles
                    times[name].append(time.perf_counter() - began)
        medians = {k: float(np.median(v)) for k, v in times.items()}
        out[compute] = {"float_step_s": medians["float"], "qat_step_s": medians["qat"],
                        "qat_over_float": medians["qat"] / medians["float"]}
        log(f"timing {compute}: float {medians['float']:.2f} s, qat {medians['qat']:.2f} s "
            f"({medians['qat'] / medians['float']:.2f}×)")
    return out


def run_qat(name: str, loaded, eval_ids, train_ids, fp32_ppl: float, args) -> dict[str, Any]:
    from jaxopt_llm.recipes import load_recipe

    recipe = load_recipe(name)
    config, ptq = recipe(loaded.config, loaded.params)
    ptq_ppl = _ppl(config, ptq, eval_ids, args.tokens)
    log(f"{name}: PTQ ppl {ptq_ppl:.3f} (fp32 {fp32_ppl:.3f})")
    began = time.perf_counter()
    trained, stats = _train(loaded, recipe, train_ids, _settings(args,
                                                                 learn_scale=args.learn_scale))
    qat_ppl = _ppl(trained.config, trained.params, eval_ids, args.tokens)
    recovered = (ptq_ppl - qat_ppl) / (ptq_ppl - fp32_ppl)
    log(f"{name}: QAT ppl {qat_ppl:.3f}, recovered {100 * recovered:.1f}% of the gap")
    return {"fp32_ppl": fp32_ppl, "ptq_ppl": ptq_ppl, "qat_ppl": qat_ppl,
            "recovered": recovered, "qat_total_s": time.perf_counter() - began,
            "learn_scale": args.learn_scale, **stats}


def run_prune(loaded, eval_ids, train_ids, fp32_ppl: float, args) -> dict[str, Any]:
    from jaxopt_llm.recipes import load_recipe

    recipe = load_recipe("magnitude-50")
    config, one_shot = recipe(loaded.config, loaded.params)
    out = {"fp32_ppl": fp32_ppl, "one_shot_ppl": _ppl(config, one_shot, eval_ids, args.tokens)}
    log(f"prune: one-shot ppl {out['one_shot_ppl']:.3f}")
    for key, label, gradual in (("one_shot_finetune", "one-shot + fine-tune", False),
                                ("gradual", "gradual + fine-tune", True)):
        trained, out[key] = _train(loaded, recipe, train_ids, _settings(args, gradual=gradual))
        out[f"{key}_ppl"] = _ppl(trained.config, trained.params, eval_ids, args.tokens)
        log(f"prune: {label} ppl {out[f'{key}_ppl']:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="timing,w4,w3g128,prune")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--compute", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--learn-scale", action="store_true")
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--timing-steps", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from jaxopt_llm import load_model, pydoc_text
    from jaxopt_llm.train import EVAL_TOKENS

    loaded = load_model("smollm2-135m")
    ids = np.asarray(loaded.tokenizer.encode(pydoc_text()), np.int32)
    eval_ids, train_ids = ids[:EVAL_TOKENS], ids[EVAL_TOKENS:]
    results: dict[str, Any] = {}
    if args.json is not None and args.json.exists():
        results = json.loads(args.json.read_text())
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "runs")}
    fp32_ppl = None
    for run in args.runs.split(","):
        log(f"run {run}")
        if run == "timing":
            results["timing"] = {"settings": settings, **run_timing(loaded, train_ids, args)}
        else:
            if fp32_ppl is None:
                fp32_ppl = _ppl(loaded.config, loaded.params, eval_ids, args.tokens)
                log(f"fp32 ppl {fp32_ppl:.3f}")
            if run == "prune":
                results["prune"] = {"settings": settings,
                                    **run_prune(loaded, eval_ids, train_ids, fp32_ppl, args)}
            else:
                results[run] = {"settings": settings,
                                **run_qat(run, loaded, eval_ids, train_ids, fp32_ppl, args)}
        results["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0]}
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2))
            tmp.replace(args.json)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
