"""Start-up of the command line on SmolLM2: cold (empty compilation cache) and warm (the
cache from the cold run) `jaxopt-llm generate`, each a fresh process, wall-clock from
launch to exit, with one new token (so nearly all of it is start-up: import, model load,
compile or cache load, prefill, first token).

Each round runs, in turn: a cold process (a new empty `JAXOPT_LLM_COMPILE_CACHE`
directory), then a warm one on that directory; medians over rounds. The generate record
(`--json`) says how long compiling took inside the process (`compile_seconds`: 0-ish when
the executables came from the cache) and which paths ran. `--recipe` adds rows for a
compressed model applied on the fly.

Run:  python benchmarks/bench_startup.py --json benchmarks/results/startup.json \\
          [--rounds 3] [--recipes w8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_PROMPT = "def add(a, b):"


def run_generate(cache: Path, recipe: str | None, model: str = "smollm2-135m",
                 extra: tuple[str, ...] = ()) -> tuple[float, dict]:
    """Seconds from launch to exit of one `jaxopt-llm generate`, and its JSON record
    (`model`: a registry name, .gguf or artifact; `extra`: more command-line options)."""
    command = [sys.executable, "-m", "jaxopt_llm.cli", "generate", "--model", model,
               "--prompt", START_PROMPT, "--max-new-tokens", "1", *extra, "--json"]
    if recipe:
        command += ["--recipe", recipe]
    env = {**os.environ, "JAXOPT_LLM_COMPILE_CACHE": str(cache)}
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recipes", default="", help="comma-separated recipes besides fp32")
    args = parser.parse_args(argv)

    recipes = [None] + [r for r in args.recipes.split(",") if r]
    times: dict[str, list[float]] = {}
    records: dict[str, dict] = {}
    for round_ in range(args.rounds):
        for recipe in recipes:
            cache = Path(tempfile.mkdtemp(prefix="jaxopt-llm-xla-"))
            try:
                for kind in ("cold", "warm"):
                    seconds, record = run_generate(cache, recipe)
                    key = f"{recipe or 'fp32'} {kind}"
                    times.setdefault(key, []).append(seconds)
                    records[key] = record
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    rows = [{"run": key, "seconds_launch_to_exit": statistics.median(values), "rounds": values,
             "compile_seconds_in_process": records[key]["compile_seconds"],
             "prefill_tok_s": records[key]["prefill_tok_s"]}
            for key, values in times.items()]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python benchmarks/bench_startup.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": platform.processor() or platform.machine(), "rows": rows},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
