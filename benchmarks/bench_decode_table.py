"""The quantized tied head on SmolLM2: batch-1 decode tok/s of `w8` (int8 kernels per
channel) with its tied table float32 against the same model with the table also int8 per
row (axis 1: the native table kernel, `native_attend`), and that model with the native path
off; rounds interleaved (median), greedy tokens of native on and off compared.

Run:  python benchmarks/bench_decode_table.py --json benchmarks/results/decode_table.json \\
          [--rounds 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import jax

    from jaxopt_llm import generation, load_model, load_recipe, pydoc_text
    from jaxopt_llm.generation import generate
    from jaxopt_llm.weights import QuantSpec, native, param_bytes, quantize_weight

    model = load_model("smollm2-135m")
    prompt = model.tokenizer.encode(pydoc_text())[1000:1032]
    config, w8 = load_recipe("w8")(model.config, model.params)
    table = quantize_weight(w8["embed_tokens"]["embedding"], QuantSpec(bits=8), axis=1)
    models = {"w8, table float32": w8,
              "w8, table int8 per row": {**w8, "embed_tokens": {"embedding": table}}}
    runs = [("w8, table float32", "on"), ("w8, table int8 per row", "on"),
            ("w8, table int8 per row", "off")]

    def decode(name: str, path: str):
        os.environ[native.ENV] = path
        native.path_in_use.cache_clear()
        jax.clear_caches()
        generation._PROGRAMS.clear()  # the programs are keyed without the native choice
        out = generate(config, models[name], [prompt], max_new_tokens=args.new_tokens,
                       eos_token_ids=(-1,))
        return out.decode_tok_s, out.new_ids[0]

    speeds, ids = {}, {}
    for _ in range(args.rounds):
        for name, path in runs:
            tok_s, new = decode(name, path)
            speeds.setdefault((name, path), []).append(tok_s)
            ids[(name, path)] = new
    base = statistics.median(speeds[runs[0]])
    rows = [{"model": name, "native": path, "param_bytes": param_bytes(models[name]),
             "decode_tok_s": statistics.median(values), "rounds": values,
             "vs_table_float32": statistics.median(values) / base}
            for (name, path), values in speeds.items()]
    result = {"command": "python benchmarks/bench_decode_table.py "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": platform.processor() or platform.machine(),
              "native": native.native_status()[1], "rows": rows,
              "same_greedy_tokens_native_on_and_off":
                  ids[runs[1]] == ids[runs[2]]}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
