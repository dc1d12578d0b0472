"""TFLite exports run by LiteRT, on the real models: SmolLM2-135M and all-MiniLM-L6-v2
written by `export_tflite` and run by `ai_edge_litert`'s interpreter, next to
ai-edge-quantizer (TFLite's own quantizer) applied to our float export.

Rows: our recipes exported as they are ("dynamic": int8 weights in LiteRT's dynamic-range
kernels; "float": DEQUANTIZE then a float matmul), and peers: ai-edge-quantizer recipes
run on our fp32 file. Per row: the file's size against the model's `param_bytes` (the
float model's for the peers), and against what LiteRT computes:
  SmolLM2 (graph: batch 1, 512 tokens)  perplexity by LiteRT (its default resolver,
          XNNPACK, what a user gets) on the first `--tokens` evaluation tokens
          (docs/evaluation.md windows of 512) against ours for the same weights; the
          largest |logit| difference on the first window, by the default resolver and by
          LiteRT's builtin reference kernels; greedy agreement over `--new-tokens` tokens
          (each step re-runs the right-padded window); and prefill speed (tokens/s over
          the window) of LiteRT and of our compiled forward in the same process;
  MiniLM (graph: batch 1, the longest of the texts)  the cosine between LiteRT's sentence
          embeddings and the float model's (ours) on the first 64 evaluation sentences.
For dynamic-range rows "ours" is the same weights with per-token int8 activations (W8A8),
which is what LiteRT's builtin kernel computes; XNNPACK rounds activations asymmetrically.

Needs `.[tflite]`; the peer rows need `pip install ai-edge-quantizer==0.10.0`.
Run:  python benchmarks/bench_tflite.py --json benchmarks/results/tflite.json \\
          [--models smollm2-135m,minilm-l6] [--tokens 4096] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OURS = (("fp32", "float"), ("w8", "dynamic"), ("w8", "float"), ("w8a8", "dynamic"),
        ("w4g128", "float"))
PEERS = ("dynamic_wi8_afp32", "weight_only_wi8_afp32", "dynamic_wi4b32_afp32")


def interpreter(data: bytes, builtin: bool = False):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if builtin
                else OpResolverType.AUTO)
    return Interpreter(model_content=data, experimental_op_resolver_type=resolver,
                       num_threads=2).get_signature_runner()


def peer(float_file: Path, name: str) -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(str(float_file))
    q.load_quantization_recipe(getattr(recipe, name)())
    return bytes(q.quantize().quantized_model)


def with_int8_activations(params):
    import jax

    from jaxopt_llm.weights import QuantizedWeight

    return jax.tree_util.tree_map(
        lambda leaf: dataclasses.replace(leaf, act_bits=8) if isinstance(
            leaf, QuantizedWeight) else leaf, params,
        is_leaf=lambda x: isinstance(x, QuantizedWeight))


def log_probs(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def decoder_row(config, params, data: bytes, ids, args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxopt_llm.evaluate import perplexity
    from jaxopt_llm.models import forward

    run = interpreter(data)
    reference = interpreter(data, builtin=True)
    window = np.asarray(ids[:512], np.int32)[None]
    ours_fn = jax.jit(lambda p, t: forward(config, p, t)[0])
    ours = np.asarray(ours_fn(params, jnp.asarray(window)))  # compile
    start = time.perf_counter()
    ours = np.asarray(ours_fn(params, jnp.asarray(window)))
    ours_s = time.perf_counter() - start
    run(input_ids=window)  # warm-up
    start = time.perf_counter()
    theirs = run(input_ids=window)["logits"]
    theirs_s = time.perf_counter() - start
    builtin = reference(input_ids=window)["logits"]
    nll, count = 0.0, 0
    for w in np.asarray(ids[:args.tokens], np.int32).reshape(-1, 512):
        logp = log_probs(run(input_ids=w[None])["logits"][0, :-1])
        nll -= logp[np.arange(511), w[1:]].sum()
        count += 511
    prompt = [int(t) for t in ids[1000:1032]]
    tokens, expected = list(prompt), list(prompt)
    for _ in range(args.new_tokens):
        for seq, logits_of in ((tokens, lambda w: run(input_ids=w)["logits"]),
                               (expected, lambda w: np.asarray(ours_fn(params,
                                                                       jnp.asarray(w))))):
            w = np.zeros((1, 512), np.int32)
            w[0, :len(seq)] = seq
            seq.append(int(logits_of(w)[0, len(seq) - 1].argmax()))
    new, new_ours = tokens[len(prompt):], expected[len(prompt):]
    agree = next((i for i, (a, b) in enumerate(zip(new, new_ours, strict=True)) if a != b),
                 len(new))
    return {"ppl_litert": float(np.exp(nll / count)),
            "ppl_ours": float(perplexity(config, params, ids, num_tokens=args.tokens).ppl),
            "max_abs_logit_diff": float(np.abs(theirs - ours).max()),
            "max_abs_logit_diff_builtin_kernels": float(np.abs(builtin - ours).max()),
            "max_abs_logit": float(np.abs(ours).max()),
            "greedy_tokens_agreeing": agree, "greedy_tokens": len(new),
            "prefill_tok_s_litert": 512 / theirs_s, "prefill_tok_s_ours": 512 / ours_s}


def encoder_rows(tokenizer, texts) -> tuple[np.ndarray, np.ndarray]:
    rows = [tokenizer.encode_with_special_tokens(t) for t in texts]
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


def encoder_row(data: bytes, ids, mask, reference) -> dict:
    run = interpreter(data)
    start = time.perf_counter()
    theirs = np.concatenate([run(input_ids=i[None], attention_mask=m[None])
                             ["sentence_embedding"] for i, m in zip(ids, mask, strict=True)])
    seconds = time.perf_counter() - start
    cosine = (theirs * reference).sum(1) / np.linalg.norm(theirs, axis=1)
    return {"cosine_to_float_mean": float(cosine.mean()),
            "cosine_to_float_min": float(cosine.min()),
            "embed_texts_per_s_litert": len(ids) / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args(argv)

    from jaxopt_llm import load_model, load_recipe, pydoc_text
    from jaxopt_llm.encoders import embed, sentences
    from jaxopt_llm.io.export_tflite import tflite_model
    from jaxopt_llm.recipes import apply_recipe
    from jaxopt_llm.weights import param_bytes

    text = pydoc_text()
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "command": "python benchmarks/bench_tflite.py "
                           + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": platform.processor() or platform.machine(),
                "rows": rows}, indent=1) + "\n")

    for model_name in args.models.split(","):
        float_model = load_model(model_name)
        encoder = float_model.config.is_encoder
        if encoder:
            texts = sentences(text, 64)
            ids, mask = encoder_rows(float_model.tokenizer, texts)
            seq_len = ids.shape[1]
            reference = embed(float_model.config, float_model.params, float_model.tokenizer,
                              texts)
        else:
            ids = float_model.tokenizer.encode(text)
            seq_len = 512
        float_file = None
        for name, mode in OURS:
            loaded = apply_recipe(float_model, load_recipe(name))
            start = time.perf_counter()
            data, plan = tflite_model(loaded.config, loaded.params, seq_len=seq_len,
                                      int8_matmul=mode)
            row = {"model": model_name, "recipe": name, "int8_matmul": mode,
                   "export_seconds": time.perf_counter() - start, "file_bytes": len(data),
                   "param_bytes": param_bytes(loaded.params),
                   "requantized": sum(r.how == "requantized" for r in plan),
                   "widened": [r.path for r in plan if r.how == "widened"]}
            row["file_over_param_bytes"] = row["file_bytes"] / row["param_bytes"]
            if encoder:
                row.update(encoder_row(data, ids, mask, reference))
            else:
                params = (with_int8_activations(loaded.params) if mode == "dynamic"
                          else loaded.params)
                row.update(decoder_row(loaded.config, params, data, ids, args))
            if name == "fp32":
                float_file = Path(tempfile.mkdtemp()) / "model.tflite"
                float_file.write_bytes(data)
            record(row)
        if args.no_peers or float_file is None:
            continue
        for name in PEERS:
            start = time.perf_counter()
            data = peer(float_file, name)
            row = {"model": model_name, "recipe": f"ai-edge-quantizer {name}",
                   "export_seconds": time.perf_counter() - start, "file_bytes": len(data),
                   "param_bytes": param_bytes(float_model.params)}
            row["file_over_param_bytes"] = row["file_bytes"] / row["param_bytes"]
            if encoder:
                row.update(encoder_row(data, ids, mask, reference))
            else:
                row.update(decoder_row(float_model.config, float_model.params, data, ids,
                                       args))
            record(row)
        float_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
