"""The `jaxopt-llm` command line: every subcommand's flags, validated as they are parsed.

`build_parser(commands)` sets each subcommand's `func` from `commands` (name → function,
see `jaxopt_llm.cli`), so this module knows flags, not what the commands do.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping


def _number(name: str, cast: type = int, *, allow_zero: bool = False,
            at_most: float | None = None):
    """argparse type: a number of `cast` type, > 0 (>= 0 with allow_zero; <= at_most),
    named in errors."""
    kind = "an integer" if cast is int else "a number"
    bound = f"in {'[' if allow_zero else '('}0, {at_most:g}]" if at_most is not None else \
        (">= 0" if cast is int else "a finite number >= 0") if allow_zero else \
        ("positive" if cast is int else "positive and finite")

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        low_ok = value > 0 or (allow_zero and value == 0)  # NaN fails both
        if not low_ok or not math.isfinite(value) or (at_most is not None
                                                       and not value <= at_most):
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {value}")
        return value
    return parse


def _positive_int(name: str):
    return _number(name, int, allow_zero=False)


def _recipe_list(text: str) -> tuple[str, ...]:
    """argparse type for --recipes: comma-separated names (checked by run_demo)."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"--recipes must be comma-separated recipe names, got {text!r}")
    return names


def build_parser(commands: Mapping[str, Callable[[argparse.Namespace], dict]]
                 ) -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each sets `func`, the function to run).

    Args:
        commands: subcommand name → the function that runs it (`jaxopt_llm.cli.COMMANDS`).

    Returns:
        The `argparse.ArgumentParser`.

    Example:
        >>> from jaxopt_llm.cli import COMMANDS
        >>> args = build_parser(COMMANDS).parse_args(["eval", "--model", "m.gguf",
        ...                                           "--tokens", "4096"])
        >>> args.command, args.tokens, args.func.__name__
        ('eval', 4096, 'cmd_eval')
    """
    parser = argparse.ArgumentParser(prog="jaxopt-llm", description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="compile every program again instead of loading it from the "
                             "persistent cache (default: on, in ~/.cache/jaxopt-llm/xla; "
                             "JAXOPT_LLM_COMPILE_CACHE=DIR|off also sets it)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model(p: argparse.ArgumentParser, default: str | None = None) -> None:
        p.add_argument("--model", required=default is None, default=default,
                       help="registry name (smollm2-135m), .gguf file, HF checkpoint or "
                            "artifact directory")

    def add_parallel(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("parallel execution")
        g.add_argument("--mesh", help="device mesh 'data=A,model=B': batch over A, tensor "
                                      "parallel over B (on CPU, A·B fake devices are made)")
        g.add_argument("--shard", action="append", default=[], metavar="REGEX=LAYOUT",
                       help="override a sharding rule (layouts: column, row, vocab, "
                            "replicated); repeatable, first match wins")
        g.add_argument("--coordinator", help="multi-host: host:port of process 0 "
                                             "(or JAXOPT_COORDINATOR)")
        g.add_argument("--num-processes", type=_positive_int("--num-processes"),
                       help="multi-host: number of processes (or JAXOPT_NUM_PROCESSES)")
        g.add_argument("--process-id", type=_number("--process-id", int, allow_zero=True),
                       help="multi-host: this process, 0..N-1 (or JAXOPT_PROCESS_ID)")

    def add_kv_cache(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kv-cache", choices=("float", "int8"), default="float",
                       help="KV cache storage: float (default) or int8 with per token and "
                            "head scales (evaluation rounds keys and values the same way)")

    def add_compute(p: argparse.ArgumentParser) -> None:
        p.add_argument("--compute", choices=("float32", "bfloat16", "auto"), default="float32",
                       help="run float weights and activations in bfloat16 (quantized codes "
                            "stay; norms in float32); auto: bfloat16 only where this backend "
                            "has native bf16 (GPU/TPU, AVX-512 BF16 or AMX CPUs)")

    def add_recipe(p: argparse.ArgumentParser, required: bool = False) -> None:
        p.add_argument("--recipe", required=required,
                       help="built-in recipe name (see `jaxopt-llm recipes`) or a .yaml/.json "
                            "recipe file")
        p.add_argument("--calib-text", metavar="FILE",
                       help="calibration text for calibrated recipes (GPTQ, …); default: the "
                            "embedded text after the 65,536 evaluation tokens")
        p.add_argument("--calib-tokens", type=_positive_int("--calib-tokens"), default=None,
                       help="at most this many calibration tokens (windows of 512, ≤ 128)")

    from jaxopt_llm.demo import DEMO_NEW_TOKENS, DEMO_PROMPT, DEMO_RECIPES, DEMO_TOKENS

    demo = sub.add_parser("demo", help="compare recipes on the embedded SmolLM2: perplexity, "
                                       "size, speed and a greedy sample each")
    add_model(demo, "smollm2-135m")
    demo.add_argument("--recipes", type=_recipe_list, default=DEMO_RECIPES,
                      help=f"comma-separated recipes to compare (default: "
                           f"{','.join(DEMO_RECIPES)})")
    demo.add_argument("--tokens", type=_positive_int("--tokens"), default=DEMO_TOKENS,
                      help="pydoc tokens to score per recipe (whole windows of 512)")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"),
                      default=DEMO_NEW_TOKENS)
    demo.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    demo.set_defaults(func=commands["demo"])

    def command(name: str, func: Callable, help_text: str, recipe_required: bool = False):
        """A subcommand of a model (--model, --recipe) that can print JSON (--json, last)."""
        p = sub.add_parser(name, help=help_text)
        add_model(p)
        add_recipe(p, recipe_required)
        p.set_defaults(func=func)
        return p

    ev = command("eval", commands["eval"], "perplexity of a decoder (docs/evaluation.md "
                 "protocol); an encoder's embeddings against its float model's")
    ev.add_argument("--text", help="UTF-8 text file (default: the embedded pydoc text)")
    add_kv_cache(ev)
    add_compute(ev)
    ev.add_argument("--texts", type=_positive_int("--texts"), default=256,
                    help="encoders: sentences of the text compared (default 256)")
    ev.add_argument("--tokens", type=_positive_int("--tokens"), default=65_536)
    ev.add_argument("--window", type=_positive_int("--window"), default=512)
    ev.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None,
                    help="windows (decoders, default 1) or texts (encoders, default 32) per "
                         "forward pass, rounded up to a multiple of data")
    add_parallel(ev)

    gen = command("generate", commands["generate"], "generate text from a prompt")
    gen.add_argument("--prompt", required=True)
    add_kv_cache(gen)
    add_compute(gen)
    gen.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=64)
    gen.add_argument("--temperature", type=_number("--temperature", float, allow_zero=True),
                     default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=_number("--top-k", int, allow_zero=True), default=0,
                     help="0 disables top-k")
    gen.add_argument("--top-p", type=_number("--top-p", float, at_most=1), default=1.0,
                     help="in (0, 1]; 1.0 disables nucleus sampling")
    gen.add_argument("--seed", type=int, default=0)
    add_parallel(gen)

    opt = command("optimize", commands["optimize"], "apply a recipe and save an artifact directory",
                  recipe_required=True)
    opt.add_argument("--out", required=True, help="artifact directory to write (atomically)")
    pl = command("plan", commands["plan"], "dry run: per parameter, the op and bytes before/after",
                 recipe_required=True)

    tr = command("train", commands["train"], "QAT / sparse / low-rank training of a recipe "
                 "(an encoder trains by distilling its float model's hidden states)")
    tr.add_argument("--out", required=True, help="artifact directory written at the end")
    tr.add_argument("--steps", type=_positive_int("--steps"), default=100)
    tr.add_argument("--batch", type=_positive_int("--batch"), default=4)
    tr.add_argument("--seq", type=_positive_int("--seq"), default=256)
    tr.add_argument("--lr", type=_number("--lr", float, allow_zero=False), default=1e-4)
    tr.add_argument("--text", help="UTF-8 training text (default: pydoc minus the eval tokens)")
    tr.add_argument("--distill", action="store_true",
                    help="mix the LM loss with a KL to the float model's logits "
                         "(encoders always distil hidden states: MSE to the float model's)")
    tr.add_argument("--distill-weight", default=0.5,
                    type=_number("--distill-weight", float, allow_zero=True, at_most=1),
                    help="weight of the KL in the loss with --distill (default 0.5)")
    tr.add_argument("--compute", choices=("float32", "bfloat16"), default="float32",
                    help="matmul dtype of the train step (master weights stay float32)")
    tr.add_argument("--learn-scale", action="store_true",
                    help="LSQ: learn the quantization step sizes along with the weights")
    tr.add_argument("--gradual", action="store_true",
                    help="reach the recipe's pruning sparsity gradually (cubic schedule over "
                         "the first 3/4 of the steps) instead of pruning at step 0")
    tr.add_argument("--lora", type=_positive_int("--lora"), default=None, metavar="RANK",
                    help="QLoRA-style recovery: LoRA adapters of RANK on the recipe's real "
                         "frozen weights; only the adapters train")
    tr.add_argument("--merge-lora", action="store_true",
                    help="with --lora, fold the adapters into the weights of the artifact "
                         "(re-quantizing quantized ones) instead of keeping them separate")
    add_parallel(tr)
    tr.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=50)
    tr.add_argument("--stop-after", type=_positive_int("--stop-after"), default=None,
                    help=argparse.SUPPRESS)  # simulate an interruption (tests)

    exp = command("export", commands["export"], "write the model (after --recipe) in another "
                  "runtime's format: gguf (llama.cpp), hf (a transformers directory), "
                  "onnx (an onnxruntime directory) or tflite (a LiteRT directory)")
    exp.add_argument("--format", required=True, choices=("gguf", "hf", "onnx", "tflite"))
    exp.add_argument("--out", required=True,
                     help="what to write (atomically): a .gguf file, or an hf / onnx / "
                          "tflite directory")
    exp.add_argument("--type", default="q8_0",
                     help="gguf: type of 2-D weights, f32|f16|bf16|q8_0|q4_0|q4_1 (default "
                          "q8_0); codes of matching grids are copied, others requantized")
    exp.add_argument("--floats", default=None,
                     help="gguf: type of 2-D weights the recipe left float (default: --type)")
    exp.add_argument("--seq-len", type=_positive_int("--seq-len"), default=None,
                     help="tflite: the graph's fixed sequence length (default 128, or the "
                          "model's context if shorter)")
    exp.add_argument("--batch", type=_positive_int("--batch"), default=1,
                     help="tflite: the graph's fixed batch size (default 1)")
    exp.add_argument("--int8-matmul", default="dynamic", choices=("dynamic", "float"),
                     help="tflite: run int8 weights in LiteRT's dynamic-range kernels "
                          "(activations quantized per row; default) or dequantize them "
                          "to a float matmul (results equal ours)")
    exp.add_argument("--strict", action="store_true",
                     help="refuse instead of widening or requantizing a compressed weight")

    emb = command("embed", commands["embed"], "sentence embeddings from an encoder "
                  "(mean-pooled, L2-normalised)")
    emb.add_argument("--text", action="append", help="a text to embed (repeatable)")
    emb.add_argument("--file", help="UTF-8 file: one text per non-empty line")
    emb.add_argument("--batch-size", type=_positive_int("--batch-size"), default=32)
    emb.add_argument("--max-length", type=_positive_int("--max-length"), default=None,
                     help="tokens per text at most (default: the model's context)")
    add_parallel(emb)

    rec = sub.add_parser("recipes", help="list the built-in recipes")
    rec.set_defaults(func=commands["recipes"])
    inf = sub.add_parser("info", help="this machine: backend, devices, CPU features, the "
                                      "execution paths they choose and the compile cache")
    inf.set_defaults(func=commands["info"])
    for p in (ev, gen, opt, pl, tr, exp, emb, rec, inf):
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


__all__ = ["build_parser"]
