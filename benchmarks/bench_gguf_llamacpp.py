"""Our GGUF exports run by llama.cpp (llama-cpp-python, the optional `.[peers]` extra).

For each `--types` entry, SmolLM2 after `--recipe` is exported with `export_gguf` and
  - loaded back by our own loader: the weights must equal the export's (dequantized)
    weights, so our perplexity on the file is the perplexity of what was written;
  - run by llama.cpp on exactly the same token ids (fed as ids, no llama.cpp
    tokenization, no BOS), windows of 512 as docs/evaluation.md, every token but a
    window's first scored.
  - run by us again with llama.cpp's activation rounding (`with_activation_blocks`:
    int8 blocks of 32 with float16 scales, Q8_0 for Q8_0/Q4_0 and Q8_1 for Q4_1, one
    int32 dot product per block), which is what llama.cpp's CPU backend computes.
Rows: file bytes, perplexity by llama.cpp and by us on the file (weight-only and with
activation blocks), the ratios with the standard error of their logarithm (from the
windows' paired differences: rounding activations to 8 bits makes two arithmetics that
differ only in the order of float additions drift apart by 0.07–0.3% of a window's NLL, so
a ratio is only as good as the number of windows behind it; the default is the
protocol's 65,536 tokens), and llama.cpp's own greedy continuation of a prompt against
both of ours.

Run:  python benchmarks/bench_gguf_llamacpp.py --json benchmarks/results/gguf_llamacpp.json \\
          [--types q8_0,q4_0,q4_1] [--tokens 65536] [--recipe fp32] [--llama-variants]
Without llama-cpp-python installed it says so and exits 0 (pip install -e '.[peers]').
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def llama_cpp_window_nll(path: Path, ids: list[int], tokens: int, **settings
                         ) -> tuple[np.ndarray, float]:
    """llama.cpp's summed NLL per window of 512 (every token but the window's first) and
    its eval tok/s; `settings` go to `llama_cpp.Llama` (e.g. type_k/type_v for the KV
    cache's type, flash_attn)."""
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True,
                            n_threads=2, verbose=False, **settings)
    sums = []
    start = time.perf_counter()
    for window in np.asarray(ids[:tokens]).reshape(-1, 512):
        model.reset()
        model.eval([int(t) for t in window])
        logits = np.asarray(model.scores[:511], np.float32)
        top = logits.max(-1)
        lse = np.log(np.exp(logits - top[:, None]).sum(-1, dtype=np.float64)) + top
        sums.append(float((lse - logits[np.arange(511), window[1:]]).sum()))
    seconds = time.perf_counter() - start
    return np.asarray(sums), tokens / seconds


def llama_cpp_ppl(path: Path, ids: list[int], tokens: int, **settings) -> tuple[float, float]:
    """llama.cpp's perplexity and eval tok/s (`llama_cpp_window_nll` summed)."""
    sums, tok_s = llama_cpp_window_nll(path, ids, tokens, **settings)
    return float(np.exp(sums.sum() / (511 * len(sums)))), tok_s


def our_window_nll(config, params, ids: list[int], tokens: int) -> np.ndarray:
    """Our summed NLL per window of 512, the same windows and tokens as llama.cpp's."""
    import jax
    import jax.numpy as jnp

    from jaxopt_llm.evaluate import window_nll

    run = jax.jit(lambda p, w: window_nll(p, w, config=config))
    return np.asarray([float(run(params, jnp.asarray(w[None], jnp.int32))[0])
                       for w in np.asarray(ids[:tokens]).reshape(-1, 512)])


def compare(theirs: np.ndarray, ours: np.ndarray) -> dict:
    """Perplexity ratio llama.cpp / ours and the standard error of its log from the
    windows' paired differences (how far two equivalent arithmetics drift apart)."""
    per_token = (theirs - ours) / 511
    return {"ratio": float(np.exp(per_token.mean())),
            "log_ratio_standard_error": float(per_token.std(ddof=1) / np.sqrt(len(per_token)))}


def llama_cpp_greedy(path: Path, prompt: list[int], steps: int) -> list[int]:
    import llama_cpp

    # logits_all: without it llama-cpp-python 0.3 leaves `scores` rows unwritten
    model = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, n_threads=2,
                            verbose=False)
    model.reset()
    model.eval(prompt)
    out = []
    for _ in range(steps):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        out.append(token)
        model.eval([token])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--types", default="q8_0,q4_0,q4_1")
    parser.add_argument("--recipe", default="fp32")
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--llama-variants", action="store_true",
                        help="also llama.cpp's perplexity with a float32 KV cache and with "
                             "flash attention")
    args = parser.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        print(f"llama-cpp-python cannot be imported ({err}): rows skipped "
              "(pip install -e '.[peers]')")
        return 0

    from jaxopt_llm import load_model, load_recipe, pydoc_text
    from jaxopt_llm.generation import generate
    from jaxopt_llm.io.export_gguf import export_gguf
    from jaxopt_llm.io.gguf_blocks import load_gguf_blocks
    from jaxopt_llm.recipes import apply_recipe
    from jaxopt_llm.transforms.quantize import with_activation_blocks

    source = apply_recipe(load_model("smollm2-135m"), load_recipe(args.recipe))
    ids = source.tokenizer.encode(pydoc_text())
    prompt = ids[1000:1032]
    rows = []
    for qtype in args.types.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"smollm2-{args.recipe}-{qtype}.gguf"
            export_gguf(source.config, source.params, source.tokenizer, path, qtype=qtype)
            ours = load_model(str(path))
            # the same codes with llama.cpp's activation rounding (Q8_0/Q8_1 blocks of 32)
            # (the file's Q8_0/Q4_0/Q4_1 blocks kept as codes, checked equal to the floats)
            blocks = with_activation_blocks(load_gguf_blocks(path)[1], 32)
            count = 511 * (args.tokens // 512)
            ours_nll = our_window_nll(ours.config, ours.params, ids, args.tokens)
            blocks_nll = our_window_nll(ours.config, blocks, ids, args.tokens)
            theirs_nll, tok_s = llama_cpp_window_nll(path, ids, args.tokens)
            ours_ppl, blocks_ppl, theirs_ppl = (float(np.exp(v.sum() / count)) for v in
                                                (ours_nll, blocks_nll, theirs_nll))
            got = llama_cpp_greedy(path, prompt, args.new_tokens)

            def agreeing(params, got=got, config=ours.config):
                expected = generate(config, params, [prompt], max_new_tokens=args.new_tokens,
                                    eos_token_ids=[-1]).new_ids[0]
                return next((i for i, (a, b) in enumerate(zip(got, expected, strict=True))
                             if a != b), len(got))

            weight_only, emulated = compare(theirs_nll, ours_nll), compare(theirs_nll,
                                                                          blocks_nll)
            row = {"recipe": args.recipe, "type": qtype, "file_bytes": path.stat().st_size,
                   "ppl_llama_cpp": theirs_ppl, "ppl_ours_on_the_file": ours_ppl,
                   "ratio": weight_only["ratio"],
                   "ratio_log_standard_error": weight_only["log_ratio_standard_error"],
                   "greedy_tokens_agreeing": agreeing(ours.params),
                   "ppl_ours_activation_blocks": blocks_ppl,
                   "ratio_to_activation_blocks": emulated["ratio"],
                   "ratio_to_activation_blocks_log_standard_error":
                       emulated["log_ratio_standard_error"],
                   "greedy_tokens_agreeing_activation_blocks": agreeing(blocks),
                   "greedy_tokens": len(got), "llama_cpp_eval_tok_s": tok_s}
            if args.llama_variants:
                # llama.cpp's own configurations: its default KV cache is float16 (ours
                # float32), and flash attention takes another path; how far they move
                # llama.cpp's perplexity is the noise floor of this comparison
                import llama_cpp

                f32 = llama_cpp.GGML_TYPE_F32
                row["ppl_llama_cpp_kv_f32"] = llama_cpp_ppl(path, ids, args.tokens,
                                                            type_k=f32, type_v=f32)[0]
                row["ppl_llama_cpp_flash_attn"] = llama_cpp_ppl(path, ids, args.tokens,
                                                                flash_attn=True)[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "command": "python benchmarks/bench_gguf_llamacpp.py "
                           + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": platform.processor() or platform.machine(), "tokens": args.tokens,
                "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
