"""Batch-1 decode speed on SmolLM2: ours (native kernels and the pure-JAX path) against
llama.cpp on the same machine, interleaved in one run.

Rows, each timed `--rounds` times in turn (medians; machines here are shared and noisy,
so only ratios within this run mean anything):
- ours: fp32, and each of `--recipes` twice: with the native kernels
  (`jaxopt_llm.weights.native`, what `QuantizedWeight.linear` and `linear` on a float
  kernel use for ≤ 8 rows) and with JAXOPT_LLM_NATIVE=off (XLA's matmul, after
  dequantizing a quantized weight). `generate` on a 32-token prompt,
  `--new-tokens` greedy tokens, decode tok/s as `generate` reports it (compile excluded);
  the built-in weight-quantizing recipes store the tied embedding table (the LM head) int8
  per row, as llama.cpp's Q8_0 and Q4_1 files do (`w8`: 135 MB against Q8_0's 145 MB); a
  name ending in `+float-table` drops that rule and keeps the 113 MB float32 table
  (`w8+float-table`: 220 MB in all);
- llama.cpp (llama-cpp-python, the optional `.[peers]` extra, 2 threads): F32 and Q8_0
  files exported from the float model by `export_gguf`, and the shipped Q4_1 file; the
  same prompt ids, then one `eval` per new token (sampling excluded: argmax in numpy).
  Each llama.cpp measurement runs in a child process, so a llama.cpp crash loses its row,
  not the run (llama.cpp's AMX code segfaults on some virtual Sapphire Rapids hosts: build
  the extra there with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ..." and no AMX).
Without llama-cpp-python its rows are skipped, saying so.

`--batch 8` decodes 8 copies of the prompt together (ours only; tok/s counts every row).

Run:  python benchmarks/bench_decode.py --json benchmarks/results/decode.json \\
          [--recipes w8,w8+float-table,w4g128,w4g128+float-table] [--rounds 3] [--new-tokens 64] \\
          [--batch 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLOAT_TABLE = "+float-table"


def bench_recipe(name: str):
    """The recipe a row name stands for: a built-in, or with `+float-table` the built-in
    without its int8 token-table rule (block linears only)."""
    from jaxopt_llm.pipeline import Recipe, Stage
    from jaxopt_llm.recipes import TABLES_INT8, load_recipe

    recipe = load_recipe(name.removesuffix(FLOAT_TABLE))
    if not name.endswith(FLOAT_TABLE):
        return recipe
    stages = tuple(Stage(name=s.name, rules=tuple(r for r in s.rules if r != TABLES_INT8))
                   for s in recipe.stages)
    if stages == recipe.stages:
        raise ValueError(f"{name}: recipe {recipe.name!r} has no token-table rule to drop")
    return Recipe(name=name, description=recipe.description, stages=stages)


def llama_cpp_decode(path: Path, prompt: list[int], steps: int) -> float | None:
    """Decode tok/s of llama.cpp on `path` measured in a child process (None: it crashed)."""
    child = subprocess.run(
        [sys.executable, __file__, "--llama-cpp-child", str(path), "--new-tokens", str(steps),
         "--prompt", ",".join(map(str, prompt))], capture_output=True, text=True)
    if child.returncode != 0:
        print(f"llama.cpp on {path.name} failed (exit {child.returncode}): "
              f"{child.stderr.strip()[-300:]}", flush=True)
        return None
    return float(child.stdout.strip().splitlines()[-1])


def llama_cpp_child(path: Path, prompt: list[int], steps: int) -> float:
    """Decode tok/s of llama.cpp on `path`: `steps` single-token evals after the prompt."""
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    model.reset()
    model.eval(prompt)
    token = int(np.argmax(model.scores[model.n_tokens - 1]))
    began = time.perf_counter()
    for _ in range(steps):
        model.eval([token])
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
    seconds = time.perf_counter() - began
    del model
    return steps / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recipes", default="w8,w4g128,w4g32-float")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1,
                        help="prompts decoded together (ours only above 1: tok/s of all rows)")
    parser.add_argument("--llama-cpp-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.llama_cpp_child:
        print(llama_cpp_child(args.llama_cpp_child, [int(t) for t in args.prompt.split(",")],
                              args.new_tokens))
        return 0

    import jax

    from jaxopt_llm import generation, hardware, load_model, pydoc_text
    from jaxopt_llm.generation import generate
    from jaxopt_llm.io.export_gguf import export_gguf
    from jaxopt_llm.io.loader import resolve_model_path
    from jaxopt_llm.weights import native, param_bytes

    model = load_model("smollm2-135m")
    prompt = model.tokenizer.encode(pydoc_text())[1000:1032]
    ours = {"fp32": (model.config, model.params)}
    for name in args.recipes.split(","):
        ours[name] = bench_recipe(name)(model.config, model.params)
    runs = [(name, "native") for name in ours] + [(name, "pure") for name in ours]

    def ours_decode(name: str, path: str) -> float:
        os.environ[native.ENV] = "on" if path == "native" else "off"
        native.path_in_use.cache_clear()
        jax.clear_caches()  # the path is chosen while tracing: trace again, and do not
        generation._PROGRAMS.clear()  # reuse generate's compiled programs either
        config, params = ours[name]
        result = generate(config, params, [prompt] * args.batch,
                          max_new_tokens=args.new_tokens, eos_token_ids=(-1,))
        return result.decode_tok_s * args.batch  # tokens of all rows per second

    peers: dict[str, Path] = {}
    tmp = tempfile.TemporaryDirectory()
    if args.batch > 1:
        print(f"batch {args.batch}: llama.cpp rows skipped (llama-cpp-python's API decodes one "
              "sequence)")
    elif importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: llama.cpp rows skipped "
              "(pip install -e '.[peers]')")
    else:
        for qtype in ("f32", "q8_0"):
            peers[f"llama.cpp {qtype.upper()}"] = Path(tmp.name) / f"{qtype}.gguf"
            export_gguf(model.config, model.params, model.tokenizer,
                        peers[f"llama.cpp {qtype.upper()}"], qtype=qtype)
        peers["llama.cpp Q4_1 (shipped)"] = resolve_model_path("smollm2-135m")

    speeds: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for name, path in runs:
            speeds.setdefault(f"ours {name} ({path})", []).append(ours_decode(name, path))
        for label, file in peers.items():
            tok_s = llama_cpp_decode(file, prompt, args.new_tokens)
            if tok_s is not None:
                speeds.setdefault(label, []).append(tok_s)
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f}"
                                                  for k, v in speeds.items()), flush=True)
    os.environ.pop(native.ENV, None)
    native.path_in_use.cache_clear()
    rows = [{"system": label, "decode_tok_s": statistics.median(values), "rounds": values}
            for label, values in speeds.items()]
    by_label = {row["system"]: row["decode_tok_s"] for row in rows}
    for row in rows:
        row["vs_ours_fp32"] = row["decode_tok_s"] / by_label["ours fp32 (pure)"]
    for name in ours:
        key = f"ours {name} (native)"
        for label in (label for label in peers if label in by_label):
            by_label_ratio = by_label[key] / by_label[label]
            next(r for r in rows if r["system"] == key)[f"vs {label}"] = by_label_ratio
    sizes = {name: param_bytes(params) for name, (_, params) in ours.items()}
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python benchmarks/bench_decode.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": platform.processor() or platform.machine(),
            "cpu_flags": hardware.describe()["cpu_flags"],
            "native": native.native_status()[1], "new_tokens": args.new_tokens,
            "batch": args.batch,
            "param_bytes": sizes, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
