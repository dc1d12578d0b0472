"""Exports run by the other side's runtime, on the real models: SmolLM2-135M and
all-MiniLM-L6-v2 written as ONNX by `export_onnx` and run by onnxruntime.

Per row: the files' size (model.onnx and its weights file) against the model's
`param_bytes` (what our artifact stores),
onnxruntime's resident memory after loading the session (in a fresh process, so nothing
else is counted) against the file size, and agreement with our own run of the same
weights:
  SmolLM2: the largest |logit| difference over one 512-token evaluation window, greedy
           agreement over `--new-tokens` tokens through the graph's KV cache (prefill then
           one token per step), perplexity by onnxruntime and by us on the first
           `--tokens` evaluation tokens (docs/evaluation.md windows of 512), and prefill
           (tokens/s over the window) and batch-1 decode speed of both (ours: `generate`'s
           compiled decode loop; onnxruntime: one session run per token from Python);
  MiniLM:  cosine between onnxruntime's sentence embeddings and ours on the first 64
           evaluation sentences, and its cosine to the float model (the encoder
           evaluation's figure).

Run:  python benchmarks/bench_export.py --json benchmarks/results/export.json \\
          [--recipes fp32,w8,w4g128,w4g128+float-table] [--models smollm2-135m] \\
          [--tokens 4096] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RSS_PROBE = """
import sys, onnxruntime as ort
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096
before = rss()
o = ort.SessionOptions(); o.add_session_config_entry('session.qdq_matmulnbits_accuracy_level', '1')
s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])
print(rss() - before)
"""


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_rss(path: Path) -> int:
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def decoder_feeds(config, ids, past=None):
    batch, length = ids.shape
    start = 0 if past is None else past["present.0.key"].shape[2]
    feeds = {"input_ids": ids.astype(np.int64),
             "attention_mask": np.ones((batch, start + length), np.int64),
             "position_ids": np.broadcast_to(np.arange(start, start + length),
                                             (batch, length)).astype(np.int64)}
    for i in range(config.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = (
                past[f"present.{i}.{kind}"] if past is not None else
                np.zeros((batch, config.num_kv_heads, 0, config.head_dim), np.float32))
    return feeds


def decoder_row(loaded, sess, ids, args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxopt_llm.evaluate import perplexity
    from jaxopt_llm.generation import generate
    from jaxopt_llm.models import forward

    config, params = loaded.config, loaded.params
    names = [o.name for o in sess.get_outputs()]
    window = np.asarray(ids[:512])[None]
    run = jax.jit(lambda p, t: forward(config, p, t)[0])
    ours = np.asarray(run(params, jnp.asarray(window, jnp.int32)))  # compile
    start = time.perf_counter()
    ours = np.asarray(run(params, jnp.asarray(window, jnp.int32)))
    ours_s = time.perf_counter() - start
    sess.run(None, decoder_feeds(config, window))  # warm-up
    start = time.perf_counter()
    theirs = sess.run(None, decoder_feeds(config, window))[0]
    theirs_s = time.perf_counter() - start
    # perplexity by onnxruntime on the protocol's windows
    nll, count = 0.0, 0
    for w in np.asarray(ids[:args.tokens]).reshape(-1, 512):
        logits = sess.run(None, decoder_feeds(config, w[None]))[0][0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= logp[np.arange(511), w[1:]].sum()
        count += 511
    ours_ppl = perplexity(config, params, ids, num_tokens=args.tokens).ppl
    # greedy through the KV cache
    prompt = [int(t) for t in ids[1000:1032]]
    generate(config, params, [prompt], max_new_tokens=args.new_tokens, eos_token_ids=[-1])
    ours_run = generate(config, params, [prompt], max_new_tokens=args.new_tokens,
                        eos_token_ids=[-1])  # compiled: decode timed alone
    expected = ours_run.new_ids[0]
    outs = dict(zip(names, sess.run(None, decoder_feeds(config, np.asarray([prompt]))),
                    strict=True))
    got = []
    start = time.perf_counter()
    for step in range(args.new_tokens):
        got.append(int(outs["logits"][0, -1].argmax()))
        if step == 0:
            start = time.perf_counter()
        outs = dict(zip(names, sess.run(None, decoder_feeds(config, np.asarray([[got[-1]]]),
                                                            past=outs)), strict=True))
    decode_s = (time.perf_counter() - start) / (args.new_tokens - 1)
    agree = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b),
                 len(got))
    return {"max_abs_logit_diff": float(np.abs(theirs - ours).max()),
            "max_abs_logit": float(np.abs(ours).max()),
            "ppl_onnxruntime": float(np.exp(nll / count)), "ppl_ours": float(ours_ppl),
            "greedy_tokens_agreeing": agree, "greedy_tokens": len(got),
            "prefill_tok_s_onnxruntime": 512 / theirs_s, "prefill_tok_s_ours": 512 / ours_s,
            "decode_tok_s_onnxruntime": 1 / decode_s,
            "decode_tok_s_ours": ours_run.decode_steps / ours_run.decode_seconds}


def encoder_row(float_model, loaded, sess, texts) -> dict:
    from jaxopt_llm.encoders import embed

    tok = loaded.tokenizer
    ours = embed(loaded.config, loaded.params, tok, texts)
    reference = embed(float_model.config, float_model.params, tok, texts)
    rows = [tok.encode_with_special_tokens(t) for t in texts]
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    start = time.perf_counter()
    theirs = sess.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    seconds = time.perf_counter() - start
    return {"cosine_onnxruntime_vs_ours": float((theirs * ours).sum(1).min()),
            "cosine_to_float_mean": float((theirs * reference).sum(1).mean()),
            "embed_texts_per_s_onnxruntime": len(texts) / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recipes", default="fp32,w8,w4g128,w4g32-float,w8a8")
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    # a built-in, or `+float-table`: without the int8 token-table rule
    from bench_decode import bench_recipe

    from jaxopt_llm import load_model, pydoc_text
    from jaxopt_llm.encoders import sentences
    from jaxopt_llm.io.export_onnx import DATA_FILE, MODEL_FILE, export_onnx
    from jaxopt_llm.recipes import apply_recipe
    from jaxopt_llm.weights import param_bytes

    text = pydoc_text()
    rows = []
    for model_name in args.models.split(","):
        float_model = load_model(model_name)
        ids = float_model.tokenizer.encode(text)
        for name in args.recipes.split(","):
            loaded = apply_recipe(float_model, bench_recipe(name))
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                out, plan = export_onnx(loaded.config, loaded.params, loaded.tokenizer,
                                        Path(tmp) / "onnx")
                export_s = time.perf_counter() - start
                path = out / MODEL_FILE
                row = {"model": model_name, "recipe": name, "export_seconds": export_s,
                       "file_bytes": path.stat().st_size + (out / DATA_FILE).stat().st_size,
                       "param_bytes": param_bytes(loaded.params),
                       "widened": [r.path for r in plan if r.how == "widened"],
                       "load_rss_bytes": load_rss(path)}
                row["file_over_param_bytes"] = row["file_bytes"] / row["param_bytes"]
                row["load_rss_over_file"] = row["load_rss_bytes"] / row["file_bytes"]
                sess = session(path)
                if loaded.config.is_encoder:
                    row.update(encoder_row(float_model, loaded, sess, sentences(text, 64)))
                else:
                    row.update(decoder_row(loaded, sess, ids, args))
                del sess
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({
                    "command": "python benchmarks/bench_export.py "
                               + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": platform.processor() or platform.machine(),
                    "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
