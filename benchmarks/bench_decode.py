"""Batch-1 decode speed on SmolLM2: ours (native kernels and the pure-JAX path) against
llama.cpp on the same machine, interleaved in one run.

Rows, each timed `--rounds` times in turn (medians; machines here are shared and noisy,
so only ratios within this run mean anything):
- ours: fp32, and each of `--recipes` twice: with the native quantized kernels
  (`jaxopt_llm.weights.native`, what `QuantizedWeight.linear` uses for ≤ 8 rows) and with
  JAXOPT_LLM_NATIVE=off (dequantize + XLA matmul). `generate` on a 32-token prompt,
  `--new-tokens` greedy tokens, decode tok/s as `generate` reports it (compile excluded);
- llama.cpp (llama-cpp-python, the optional `.[peers]` extra, 2 threads): F32 and Q8_0
  files exported from the float model by `export_gguf`, and the shipped Q4_1 file; the
  same prompt ids, then one `eval` per new token (sampling excluded: argmax in numpy).
Without llama-cpp-python its rows are skipped, saying so.

Run:  python benchmarks/bench_decode.py --json benchmarks/results/decode.json \\
          [--recipes w8,w4g128,w4g32-float] [--rounds 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def llama_cpp_decode(path: Path, prompt: list[int], steps: int) -> float:
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
    args = parser.parse_args(argv)

    import jax

    from jaxopt_llm import generation, hardware, load_model, load_recipe, pydoc_text
    from jaxopt_llm.generation import generate
    from jaxopt_llm.io.export_gguf import export_gguf
    from jaxopt_llm.io.loader import resolve_model_path
    from jaxopt_llm.weights import native, param_bytes

    model = load_model("smollm2-135m")
    prompt = model.tokenizer.encode(pydoc_text())[1000:1032]
    ours = {"fp32": (model.config, model.params)}
    for name in args.recipes.split(","):
        ours[name] = load_recipe(name)(model.config, model.params)
    runs = [(name, "native") for name in ours if name != "fp32"] + \
        [(name, "pure") for name in ours]

    def ours_decode(name: str, path: str) -> float:
        os.environ[native.ENV] = "on" if path == "native" else "off"
        native.path_in_use.cache_clear()
        jax.clear_caches()  # the path is chosen while tracing: trace again, and do not
        generation._PROGRAMS.clear()  # reuse generate's compiled programs either
        config, params = ours[name]
        result = generate(config, params, [prompt], max_new_tokens=args.new_tokens,
                          eos_token_ids=(-1,))
        return result.decode_tok_s

    peers: dict[str, Path] = {}
    tmp = tempfile.TemporaryDirectory()
    if importlib.util.find_spec("llama_cpp") is None:
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
            speeds.setdefault(label, []).append(llama_cpp_decode(file, prompt,
                                                                 args.new_tokens))
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
        if name != "fp32":
            key = f"ours {name} (native)"
            for label in peers:
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
            "param_bytes": sizes, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
