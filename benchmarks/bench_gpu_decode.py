"""GPU decode benchmark: a Llama-3.2-1B-shaped model in bf16 and int8 (w8) against the HBM roofline.

What is measured: greedy decode throughput through `jaxopt_llm.generation.generate`
(one compiled prefill, one compiled `while_loop` decode; compile time excluded) for a
model shaped like Llama-3.2-1B (hidden 2048, MLP 8192, 16 layers, 32 query / 8 kv heads
of 64, vocab 128256, tied embeddings, RoPE theta 500000 with Llama-3 scaling), with
random weights initialised on the device (nothing is downloaded):

* bf16: every floating parameter cast to bfloat16 (activations follow the weights);
* int8: the built-in `w8` recipe on those bf16 params (int8 symmetric per output channel,
  weight-only `QuantizedWeight` kernels for every block linear; the embedding table,
  which is also the tied output head, and the norms stay bf16);
* int4: the built-in `w4g128` recipe likewise (4-bit codes, groups of 128 inputs).

For each batch size (`--batches`, default 1,8,32): prompts of `--prompt-tokens` (32)
random ids, `--new-tokens` (128) new tokens with EOS disabled, best of `--runs` (2)
runs. Measured total tok/s = batch × decode_steps / decode_seconds (the first new token
comes from the prefill, so decode_steps = new_tokens - 1).

Roofline (decode is memory bound): every step must read
  * the weights once: `param_bytes(params)`. The model has a tied head, so the
    embedding table IS read in full by the head each step and is counted once; the
    input lookup gathers only `batch` rows of it, counted in addition (negligible).
    For an untied model the table would be left out and only the gathered rows
    counted; the `lm_head` kernel is part of `param_bytes`.
  * the KV cache of the keys each query can see, in the dtype `generate` allocates it
    (float32 at the time of writing, even for bf16 weights): decode step i attends
    prompt + i keys, so the average over the loop is prompt + new_tokens / 2 slots,
    × layers × 2 (K, V) × kv heads × head_dim × batch. (`generate` itself attends over
    the whole preallocated cache, masked; `kv_capacity_bytes` in the JSON says how much
    that is.) KV writes, activations and the logits are not counted.
  roofline tok/s per sequence = HBM bandwidth / bytes per step; × batch for the total.
  HBM bandwidth: `--hbm-gbps` (default 4800 GB/s, the H200's 4.8 TB/s spec; 1 GB = 1e9 B).

`generate` allocates the KV cache in the activation dtype (the token table's, here
bfloat16), so both rows decode with bfloat16 activations and a bfloat16 cache; the JSON
records the cache dtype of each row.

Run on the GPU machine (one command, a few minutes on an H200):

    python benchmarks/bench_gpu_decode.py --json benchmarks/results/gpu_decode_h200.json

and record GPU results in benchmarks/results/ (the JSON, plus the printed table in a
README or commit message). Smoke test on CPU (tiny config, seconds):

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_gpu_decode.py --tiny --batches 1,2 \
        --new-tokens 8

Progress goes to stderr; the markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.generation import activation_dtype, generate
from jaxopt_llm.models import ModelConfig, build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.tree import freeze
from jaxopt_llm.weights import param_bytes

DTYPES = ("bf16", "int8", "int4")
RECIPES = {"int8": "w8", "int4": "w4g128"}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


LLAMA3_ROPE_SCALING = freeze({"rope_type": "llama3", "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192})


def llama_1b_config() -> ModelConfig:
    """The shapes of Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json)."""
    return ModelConfig(
        family="llama", model_type="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE_SCALING, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_ids=(128001,),
    )


def tiny_config() -> ModelConfig:
    """Same structure (GQA, tied head, Llama-3 RoPE), small enough for a CPU smoke test."""
    return ModelConfig(
        family="llama", model_type="llama", vocab_size=512, hidden_size=64,
        intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        max_position_embeddings=2048, rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE_SCALING, tie_word_embeddings=True,
    )


def init_params(config: ModelConfig, seed: int = 0) -> Any:
    """Random bf16 params drawn on the default device, leaf by leaf.

    Shapes come from `jax.eval_shape` of the model's init (nothing is compiled for the
    whole model); norm scales are ones, every other float leaf is N(0, 0.02²). Decode
    speed does not depend on the values, and one small jit per distinct shape starts in
    seconds where compiling the whole init did not.
    """
    model = build_model(config)
    tokens = jnp.zeros((1, 8), jnp.int32)
    mask = attention_mask(jnp.ones((1, 8), bool), 0, 8)
    shapes = jax.eval_shape(lambda k: model.init(k, tokens, tokens, mask)["params"],
                            jax.random.key(seed))

    @partial(jax.jit, static_argnums=(1, 2))
    def draw(key: jax.Array, shape: tuple[int, ...], ones: bool) -> jax.Array:
        if ones:
            return jnp.ones(shape, jnp.bfloat16)
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    params = []
    for index, (path, leaf) in enumerate(leaves):
        is_scale = str(getattr(path[-1], "key", path[-1])) == "scale"
        params.append(draw(jax.random.fold_in(jax.random.key(seed), index),
                           tuple(leaf.shape), is_scale))
    params = jax.tree_util.tree_unflatten(treedef, params)
    jax.block_until_ready(params)
    return params


def embedding_table(params: Any) -> Any:
    return params["embed_tokens"]["embedding"]


def step_bytes(config: ModelConfig, params: Any, batch: int, prompt_tokens: int,
               new_tokens: int, cache_itemsize: int) -> dict[str, float]:
    """HBM bytes one decode step must read (see the module docstring for the model)."""
    table_bytes = param_bytes(embedding_table(params))
    gathered = batch * table_bytes / config.vocab_size  # `batch` rows of the table
    weights = param_bytes(params) + gathered
    if not config.tie_word_embeddings:  # only the gathered rows of the table are read
        weights -= table_bytes
    per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * cache_itemsize
    kv = batch * (prompt_tokens + new_tokens / 2) * per_slot
    return {"weight_bytes": float(weights), "kv_bytes": float(kv),
            "kv_bytes_per_slot_per_seq": float(per_slot)}


def measure(config: ModelConfig, params: Any, batch: int, prompt_tokens: int,
            new_tokens: int, runs: int, seed: int) -> dict[str, Any]:
    """Best-of-`runs` decode of `batch` random prompts; compile time excluded."""
    rng = np.random.default_rng(seed + batch)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt_tokens)).tolist()
    best = None
    compile_s = 0.0
    for _ in range(runs):
        result = generate(config, params, prompts, max_new_tokens=new_tokens,
                          eos_token_ids=(-1,))
        compile_s += result.compile_seconds
        if result.decode_steps != new_tokens - 1:
            raise RuntimeError(f"expected {new_tokens - 1} decode steps, "
                               f"got {result.decode_steps}")
        if best is None or result.decode_tok_s > best.decode_tok_s:
            best = result
    assert best is not None
    return {
        "decode_steps": best.decode_steps, "decode_seconds": best.decode_seconds,
        "tok_s_per_seq": best.decode_tok_s, "tok_s": best.decode_tok_s * batch,
        "prefill_seconds": best.prefill_seconds, "compile_seconds": compile_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = tiny_config() if args.tiny else llama_1b_config()
    device = jax.devices()[0]
    log(f"jax {jax.__version__} on {device.platform}: {device.device_kind}; "
        f"{'tiny' if args.tiny else 'Llama-3.2-1B-shaped'} config")
    bandwidth = args.hbm_gbps * 1e9
    start = time.perf_counter()
    bf16_params = init_params(config, args.seed)
    log(f"bf16 params initialised on device in {time.perf_counter() - start:.1f} s "
        f"({param_bytes(bf16_params) / 2**20:.1f} MiB)")
    rows = []
    for dtype in args.dtypes:
        if dtype == "bf16":
            run_config, params = config, bf16_params
        else:
            start = time.perf_counter()
            run_config, params = load_recipe(RECIPES[dtype])(config, bf16_params)
            jax.block_until_ready(params)
            log(f"{RECIPES[dtype]} recipe applied in {time.perf_counter() - start:.1f} s")
        weight_mib = param_bytes(params) / 2**20
        cache_dtype = np.dtype(activation_dtype(run_config, params))  # what generate allocates
        for batch in args.batches:
            log(f"{dtype} batch {batch}: decoding {args.new_tokens} tokens × {args.runs} runs…")
            point = measure(run_config, params, batch, args.prompt_tokens, args.new_tokens,
                            args.runs, args.seed)
            traffic = step_bytes(run_config, params, batch, args.prompt_tokens,
                                 args.new_tokens, cache_dtype.itemsize)
            per_step = traffic["weight_bytes"] + traffic["kv_bytes"]
            roofline = batch * bandwidth / per_step
            capacity = args.prompt_tokens + -(-args.new_tokens // 64) * 64  # generate's S
            rows.append({
                "dtype": dtype, "batch": batch, "param_bytes": param_bytes(params),
                "kv_cache_dtype": cache_dtype.name,
                "weight_mib": weight_mib, **point, **traffic,
                "bytes_per_step": per_step,
                "kv_capacity_bytes": batch * capacity * traffic["kv_bytes_per_slot_per_seq"],
                "roofline_tok_s": roofline, "fraction_of_roofline": point["tok_s"] / roofline,
                "achieved_gbps": point["tok_s"] / batch * per_step / 1e9,
            })
            log(f"{dtype} batch {batch}: {point['tok_s']:.1f} tok/s, roofline {roofline:.1f} "
                f"({point['tok_s'] / roofline:.1%}); compile {point['compile_seconds']:.1f} s")
        if dtype != "bf16":
            del params
    return {
        "benchmark": "bench_gpu_decode", "tiny": args.tiny, "config": config.to_dict(),
        "device": {"platform": device.platform, "kind": device.device_kind,
                   "count": jax.device_count()},
        "jax": jax.__version__, "python": platform.python_version(),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
        "hbm_gbps": args.hbm_gbps, "rows": rows,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"decode, prompt {results['prompt_tokens']}, {results['new_tokens']} new tokens, "
        f"{results['device']['kind']}, roofline at {results['hbm_gbps']:g} GB/s",
        "",
        "| dtype | batch | weight MiB | measured tok/s | roofline tok/s | fraction of roofline |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['weight_mib']:.1f} | {r['tok_s']:.1f} "
                     f"| {r['roofline_tok_s']:.1f} | {r['fraction_of_roofline']:.1%} |")
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive comma-separated ints, got {text!r}")
    return values


def dtype_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in DTYPES for v in values):
        raise argparse.ArgumentTypeError(f"expected a subset of {DTYPES}, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int_list, default=[1, 8, 32],
                        help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2, help="best of this many runs per point")
    parser.add_argument("--dtypes", type=dtype_list, default=list(DTYPES),
                        help="comma-separated subset of bf16,int8,int4")
    parser.add_argument("--hbm-gbps", type=float, default=4800.0,
                        help="HBM bandwidth in GB/s for the roofline (H200: 4800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny config (hidden 64, 2 layers, vocab 512) for CPU smoke tests")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.runs < 1:
        parser.error("need --new-tokens >= 2, --prompt-tokens >= 1, --runs >= 1")
    results = run(args)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
