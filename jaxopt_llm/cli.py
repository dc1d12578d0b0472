"""The `jaxopt-llm` command: demo, eval, generate, optimize, plan, recipes.

Progress goes to stderr (rich); `--json` prints exactly one JSON object on
stdout. Bad input exits with status 2 and one line naming what was wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

stderr = Console(stderr=True)


def _number(name: str, cast: type, *, allow_zero: bool):
    """argparse type: a number of `cast` type, > 0 (or >= 0 with allow_zero), named in errors."""
    kind = "an integer" if cast is int else "a number"
    bound = ">= 0" if allow_zero else "positive"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {value}")
        return value
    return parse


def _positive_int(name: str):
    return _number(name, int, allow_zero=False)


def _fraction(name: str):
    """argparse type: a number in [0, 1], named in errors."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1], got {value}")
        return value
    return parse


@contextlib.contextmanager
def _spinner(message: str, quiet: bool = False) -> Iterator[None]:
    if quiet:
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=stderr, transient=True) as progress:
        progress.add_task(message, total=None)
        yield


def _load(model: str, quiet: bool = False):
    from jaxopt_llm.io.loader import load_model

    with _spinner(f"loading {model}", quiet):
        return load_model(model)


def _recipe(spec: str | None):
    """Resolve --recipe before loading anything, so a bad name or file fails fast."""
    if spec is None:
        return None
    from jaxopt_llm.recipes import load_recipe

    return load_recipe(spec)


def _dense_bytes(params: Any) -> int:
    """Bytes of the same weights stored densely in float32."""
    import jax
    import jax.numpy as jnp

    from jaxopt_llm.weights import materialize, param_bytes

    shapes = jax.eval_shape(materialize, params)
    return param_bytes(jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), shapes))


def _apply_recipe(loaded, recipe, quiet: bool):
    """The loaded model with `recipe` applied; remembers the dense size and the recipes."""
    import dataclasses

    from jaxopt_llm.pipeline import Recipe

    dense = (loaded.extra or {}).get("dense_param_bytes") or _dense_bytes(loaded.params)
    if recipe is None:
        return dataclasses.replace(loaded, extra={**(loaded.extra or {}),
                                                  "dense_param_bytes": dense})
    with _spinner(f"applying recipe {recipe.name}", quiet):
        config, params = recipe(loaded.config, loaded.params)
    applied = recipe
    if loaded.recipe:  # an artifact: the new recipe continues the one it was made with
        before = Recipe.from_dict(loaded.recipe)
        applied = Recipe(name=f"{before.name}+{recipe.name}",
                         description=f"{before.description}; then {recipe.description}",
                         stages=before.stages + recipe.stages)
    return dataclasses.replace(loaded, config=config, params=params, recipe=applied.to_dict(),
                               extra={**(loaded.extra or {}), "dense_param_bytes": dense})


def _parallel_setup(args: argparse.Namespace) -> None:
    """Before JAX starts: join a multi-host job (--coordinator … or JAXOPT_* env), and on
    CPU provide as many devices as --mesh asks for (fake CPU devices on one host)."""
    from jaxopt_llm import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.mesh and "xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""):
        from jaxopt_llm.parallel import parse_mesh

        sizes = parse_mesh(args.mesh)
        wanted = sizes["data"] * sizes["model"] // max(1, args.num_processes or int(
            os.environ.get(distributed.ENV_NUM_PROCESSES, "1")))
        import jax

        if wanted > 1 and not jax._src.xla_bridge.backends_are_initialized():
            jax.config.update("jax_num_cpu_devices", max(wanted, 1))


def _on_mesh(loaded, args: argparse.Namespace):
    """(loaded with params placed on the mesh, mesh) — or (loaded, None) without --mesh."""
    import dataclasses

    if not args.mesh:
        return loaded, None
    from jaxopt_llm.parallel import make_mesh, parse_shard_rule, shard_params

    rules = [parse_shard_rule(text) for text in args.shard]
    mesh = make_mesh(args.mesh)
    params = shard_params(loaded.config, loaded.params, mesh, rules)
    return dataclasses.replace(loaded, params=params), mesh


def _mesh_json(mesh) -> dict[str, int] | None:
    return None if mesh is None else {k: int(v) for k, v in mesh.shape.items()}


def _run_eval(loaded, text: str, num_tokens: int, window: int, quiet: bool,
              mesh=None, batch_size: int = 1) -> dict[str, Any]:
    from jaxopt_llm.data import text_sha256
    from jaxopt_llm.evaluate import check_eval_args, perplexity
    from jaxopt_llm.weights import param_bytes

    check_eval_args(num_tokens, window)
    with _spinner("tokenizing", quiet):
        ids = loaded.tokenizer.encode(text)
    windows = min(num_tokens, len(ids)) // window
    start = time.perf_counter()
    if quiet or windows == 0:
        result = perplexity(loaded.config, loaded.params, ids, num_tokens=num_tokens,
                            window=window, batch_size=batch_size, mesh=mesh)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} windows"), TimeElapsedColumn(),
                      console=stderr, transient=True) as progress:
            task = progress.add_task("perplexity", total=windows)
            result = perplexity(loaded.config, loaded.params, ids, num_tokens=num_tokens,
                                window=window, batch_size=batch_size, mesh=mesh,
                                on_window=lambda n: progress.advance(task, n))
    seconds = time.perf_counter() - start
    return {
        "model": loaded.source,
        **result.to_dict(),
        "param_bytes": param_bytes(loaded.params),
        "dense_param_bytes": (loaded.extra or {}).get("dense_param_bytes"),
        "recipe": (loaded.recipe or {}).get("name", "fp32"),
        "text_sha256": text_sha256(text),
        "text_tokens": len(ids),
        "seconds": seconds,
        "eval_tok_s": result.tokens_used / seconds,
        "mesh": _mesh_json(mesh),
    }


def _run_generate(loaded, prompt: str, max_new_tokens: int, sampling, seed: int,
                  quiet: bool, mesh=None) -> dict[str, Any]:
    from jaxopt_llm.generation import generate

    ids = loaded.tokenizer.encode(prompt)
    with _spinner("compiling and generating", quiet):
        result = generate(loaded.config, loaded.params, [ids], max_new_tokens=max_new_tokens,
                          sampling=sampling, seed=seed,
                          eos_token_ids=loaded.tokenizer.eos_token_ids or None, mesh=mesh)
    new_ids = result.new_ids[0]
    return {
        "model": loaded.source,
        "recipe": (loaded.recipe or {}).get("name", "fp32"),
        "prompt": prompt,
        "prompt_ids": ids,
        "new_ids": new_ids,
        "text": loaded.tokenizer.decode(new_ids),
        "prefill_tok_s": result.prefill_tok_s,
        "decode_tok_s": result.decode_tok_s,
        "prefill_seconds": result.prefill_seconds,
        "compile_seconds": result.compile_seconds,
        "decode_seconds": result.decode_seconds,
        "mesh": _mesh_json(mesh),
    }


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from jaxopt_llm.data import pydoc_text, read_text_file

    text = pydoc_text() if args.text is None else read_text_file(args.text)
    recipe = _recipe(args.recipe)
    _parallel_setup(args)
    loaded = _apply_recipe(_load(args.model, args.json), recipe, args.json)
    loaded, mesh = _on_mesh(loaded, args)
    out = _run_eval(loaded, text, args.tokens, args.window, args.json, mesh, args.batch_size)
    if not args.json:
        stderr.print(f"[bold]perplexity[/bold] {out['ppl']:.4f} over {out['tokens_scored']} "
                     f"scored tokens ({out['windows']} windows of {out['window']}), "
                     f"{out['eval_tok_s']:.0f} tok/s, recipe {out['recipe']}, params "
                     f"{out['param_bytes'] / 2**20:.1f} MiB "
                     f"(float32: {out['dense_param_bytes'] / 2**20:.1f} MiB)")
    return out


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from jaxopt_llm.generation import Sampling

    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    recipe = _recipe(args.recipe)
    # after the cheap checks: bad input fails fast
    _parallel_setup(args)
    loaded = _apply_recipe(_load(args.model, args.json), recipe, args.json)
    loaded, mesh = _on_mesh(loaded, args)
    out = _run_generate(loaded, args.prompt, args.max_new_tokens, sampling, args.seed,
                        args.json, mesh)
    if not args.json:
        print(args.prompt + out["text"])
        stderr.print(f"prefill {out['prefill_tok_s']:.1f} tok/s, "
                     f"decode {out['decode_tok_s']:.1f} tok/s, "
                     f"compile {out['compile_seconds']:.1f} s")
    return out


def cmd_optimize(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from jaxopt_llm.io.artifact import WEIGHTS_FILE, save_artifact
    from jaxopt_llm.weights import param_bytes

    recipe = _recipe(args.recipe)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a directory")
    loaded = _load(args.model, args.json)
    start = time.perf_counter()
    optimized = _apply_recipe(loaded, recipe, args.json)
    seconds = time.perf_counter() - start
    extra = {**(optimized.extra or {}),
             "source": (loaded.extra or {}).get("source", loaded.source)}
    with _spinner(f"writing {out_dir}", args.json):
        path = save_artifact(out_dir, config=optimized.config, params=optimized.params,
                             tokenizer=optimized.tokenizer, recipe=optimized.recipe, extra=extra)
    out = {
        "model": loaded.source,
        "recipe": optimized.recipe["name"],
        "out": str(path),
        "param_bytes": param_bytes(optimized.params),
        "dense_param_bytes": extra["dense_param_bytes"],
        "weights_file_bytes": (path / WEIGHTS_FILE).stat().st_size,
        "transform_seconds": seconds,
    }
    if not args.json:
        stderr.print(f"wrote {path}: recipe {out['recipe']}, params "
                     f"{out['param_bytes'] / 2**20:.1f} MiB (float32 "
                     f"{out['dense_param_bytes'] / 2**20:.1f} MiB), transform {seconds:.1f} s")
    return out


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from jaxopt_llm.plan import plan

    recipe = _recipe(args.recipe)
    loaded = _load(args.model, args.json)
    result = plan(recipe, loaded.config, loaded.params)
    if not args.json:
        print(result)
    return {
        "recipe": result.recipe,
        "bytes_before": result.bytes_before,
        "bytes_after": result.bytes_after,
        "parameters": [dict(path=r.path, stage=r.stage, op=r.op, shape=list(r.shape),
                            bytes_before=r.bytes_before, bytes_after=r.bytes_after,
                            representation=r.representation) for r in result.rows],
    }


def cmd_recipes(args: argparse.Namespace) -> dict[str, Any]:
    from jaxopt_llm.recipes import BUILTIN_RECIPES

    if not args.json:
        for name, recipe in BUILTIN_RECIPES.items():
            print(f"{name:<14} {recipe.description}")
    return {"recipes": {name: r.to_dict() for name, r in BUILTIN_RECIPES.items()}}


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    import numpy as np

    from jaxopt_llm.data import pydoc_text, read_text_file
    from jaxopt_llm.io.artifact import save_artifact
    from jaxopt_llm.qat import convert
    from jaxopt_llm.rules import BLOCK_LINEARS
    from jaxopt_llm.train import TRAIN_ALL, TrainOptions
    from jaxopt_llm.train_loop import (
        EVAL_TOKENS,
        LORA_TRAINABLE,
        check_data,
        gradual_recipe,
        prune_schedules,
        qat_recipe,
        run_training,
    )
    from jaxopt_llm.weights.lora import add_lora, merge_lora

    options = TrainOptions(steps=args.steps, learning_rate=args.lr,
                           warmup_steps=min(args.steps - 1, args.steps // 10),
                           distill_weight=args.distill_weight if args.distill else 0.0,
                           compute_dtype=args.compute,
                           trainable=LORA_TRAINABLE if args.lora else TRAIN_ALL)
    recipe = _recipe(args.recipe)
    if recipe is None and (args.gradual or args.learn_scale):
        raise ValueError("--gradual and --learn-scale need a --recipe")
    if args.lora and (args.gradual or args.learn_scale):
        raise ValueError("--lora trains adapters on the recipe's real (frozen) weights; it "
                         "does not combine with --gradual or --learn-scale")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a directory")
    text = pydoc_text() if args.text is None else read_text_file(args.text)
    _parallel_setup(args)
    mesh = shard_rules = None
    if args.mesh:
        from jaxopt_llm.parallel import make_mesh, parse_shard_rule

        shard_rules = [parse_shard_rule(t) for t in args.shard]
        mesh = make_mesh(args.mesh)
    loaded = _load(args.model, args.json)
    ids = np.asarray(loaded.tokenizer.encode(text), np.int32)
    if args.text is None:
        ids = ids[EVAL_TOKENS:]  # never train on the evaluation tokens
    check_data(ids, args.batch, args.seq, loaded.config.max_position_embeddings)
    config, params, targets = loaded.config, loaded.params, []
    if recipe is not None:
        if args.lora:  # QLoRA: the recipe's real weights, frozen, under trainable adapters
            trainable_form = recipe
        else:
            trainable_form = qat_recipe(recipe, learn_scale=args.learn_scale)
            if args.gradual:
                trainable_form, targets = gradual_recipe(trainable_form, args.steps)
        config, params = trainable_form(loaded.config, loaded.params)
    schedules = prune_schedules(trainable_form, targets, params) if targets else []
    if args.lora:
        params = add_lora(params, BLOCK_LINEARS, rank=args.lora)
    meta = {"model": loaded.source, "recipe": recipe.to_dict() if recipe else None,
            "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
            "distill": args.distill_weight if args.distill else 0.0,
            "compute": args.compute, "learn_scale": bool(args.learn_scale),
            "gradual": bool(args.gradual), "lora": args.lora,
            "text_tokens": int(len(ids))}
    checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoint")
    log_path = out_dir.with_name(out_dir.name + ".train_log.jsonl")
    resume = (checkpoint_dir / "meta.json").exists()
    log = log_path.open("a" if resume else "w")
    with contextlib.ExitStack() as stack:
        stack.enter_context(log)
        progress = None
        if not args.json:
            progress = stack.enter_context(Progress(
                TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[loss]}"),
                TimeElapsedColumn(), console=stderr, transient=True))
            task = progress.add_task("training", total=args.steps, loss="")

        def on_step(step: int, record: dict[str, float]) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()
            if progress is not None:
                progress.update(task, completed=step, loss=f"loss {record['loss']:.3f}")

        result = run_training(config, params, options, ids, batch=args.batch, seq=args.seq,
                              teacher=loaded.params if args.distill else None,
                              checkpoint_dir=checkpoint_dir,
                              checkpoint_every=args.checkpoint_every, meta=meta,
                              resume=resume, stop_after=args.stop_after,
                              prune_schedules=schedules, mesh=mesh,
                              shard_rules=shard_rules or (), on_step=on_step)
    if result.history and result.history[-1]["step"] < args.steps:
        return {"stopped_at": result.history[-1]["step"], "checkpoint": str(checkpoint_dir)}
    final = result.params
    if mesh is not None:  # gather to host: artifacts are written from whole arrays
        import jax

        from jaxopt_llm.parallel import to_host

        final = jax.tree_util.tree_map(to_host, final)
    final = convert(final)
    if args.lora and args.merge_lora:
        final = merge_lora(final)
    path = save_artifact(out_dir, config=config, params=final, tokenizer=loaded.tokenizer,
                         recipe=(recipe.to_dict() if recipe else None),
                         extra={"source": loaded.source, "trained": meta})
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the run is complete
    history = result.history
    out = {
        "out": str(path), "log": str(log_path), "steps": args.steps,
        "resumed_from": result.resumed_from,
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "step_s": float(np.median([h["step_s"] for h in history[1:]] or [0.0])),
        "mesh": _mesh_json(mesh),
    }
    if not args.json:
        stderr.print(f"trained {args.steps} steps: loss {out['loss_first']:.3f} → "
                     f"{out['loss_last']:.3f}, {out['step_s']:.3f} s/step; wrote {path}")
    return out


def _recipe_list(text: str) -> tuple[str, ...]:
    """argparse type for --recipes: comma-separated names (checked by run_demo)."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"--recipes must be comma-separated recipe names, got {text!r}")
    return names


# run_demo's parameters and the demo flags that set them (its errors name the parameter)
_DEMO_FLAGS = {"num_tokens": "--tokens", "max_new_tokens": "--max-new-tokens",
               "recipes": "--recipes", "prompt": "--prompt"}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from jaxopt_llm.demo import run_demo

    started = time.perf_counter()

    def progress(line: str) -> None:
        stderr.print(f"[dim]{time.perf_counter() - started:6.1f} s[/dim]  {line}",
                     highlight=False)

    try:
        out = run_demo(args.model, recipes=args.recipes, num_tokens=args.tokens,
                       prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                       progress=progress)
    except ValueError as err:
        message = str(err)
        for parameter, flag in _DEMO_FLAGS.items():
            if message.startswith((parameter + " ", parameter + ":")):
                message = flag + message[len(parameter):]
                break
        raise ValueError(message) from None
    if args.json:
        return out
    table = Table(title=f"jaxopt-llm demo: {args.model}",
                  caption=f"perplexity on the first {out['tokens']} pydoc tokens "
                          f"(windows of {out['window']})")
    for header in ("recipe", "ppl", "MiB", "prefill tok/s", "decode tok/s"):
        table.add_column(header, justify="left" if header == "recipe" else "right")
    for row in out["rows"]:
        table.add_row(row["recipe"], f"{row['ppl']:.3f}", f"{row['param_bytes'] / 2**20:.1f}",
                      f"{row['prefill_tok_s']:.0f}", f"{row['decode_tok_s']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"[bold]prompt[/bold]: {out['prompt']}", highlight=False)
    for row in out["rows"]:
        console.print(f"[bold]greedy output, {row['recipe']}[/bold]: {row['text']!r}",
                      highlight=False)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxopt-llm", description=__doc__.splitlines()[0])
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

    def add_recipe(p: argparse.ArgumentParser, required: bool = False) -> None:
        p.add_argument("--recipe", required=required,
                       help="built-in recipe name (see `jaxopt-llm recipes`) or a .yaml/.json "
                            "recipe file")

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
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="perplexity (docs/evaluation.md protocol)")
    add_model(ev)
    add_recipe(ev)
    ev.add_argument("--text", help="UTF-8 text file (default: the embedded pydoc text)")
    ev.add_argument("--tokens", type=_positive_int("--tokens"), default=65_536)
    ev.add_argument("--window", type=_positive_int("--window"), default=512)
    ev.add_argument("--batch-size", type=_positive_int("--batch-size"), default=1,
                    help="windows per forward pass (rounded up to a multiple of data)")
    add_parallel(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    add_model(gen)
    add_recipe(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=64)
    gen.add_argument("--temperature", type=_number("--temperature", float, allow_zero=True),
                     default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=_number("--top-k", int, allow_zero=True), default=0,
                     help="0 disables top-k")
    gen.add_argument("--top-p", type=float, default=1.0, help="1.0 disables nucleus sampling")
    gen.add_argument("--seed", type=int, default=0)
    add_parallel(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    gen.set_defaults(func=cmd_generate)

    opt = sub.add_parser("optimize", help="apply a recipe and save an artifact directory")
    add_model(opt)
    add_recipe(opt, required=True)
    opt.add_argument("--out", required=True, help="artifact directory to write (atomically)")
    opt.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    opt.set_defaults(func=cmd_optimize)

    pl = sub.add_parser("plan", help="dry run: per parameter, the op and bytes before/after")
    add_model(pl)
    add_recipe(pl, required=True)
    pl.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    pl.set_defaults(func=cmd_plan)

    tr = sub.add_parser("train", help="QAT / sparse / low-rank training of a recipe")
    add_model(tr)
    add_recipe(tr)
    tr.add_argument("--out", required=True, help="artifact directory written at the end")
    tr.add_argument("--steps", type=_positive_int("--steps"), default=100)
    tr.add_argument("--batch", type=_positive_int("--batch"), default=4)
    tr.add_argument("--seq", type=_positive_int("--seq"), default=256)
    tr.add_argument("--lr", type=_number("--lr", float, allow_zero=False), default=1e-4)
    tr.add_argument("--text", help="UTF-8 training text (default: pydoc minus the eval tokens)")
    tr.add_argument("--distill", action="store_true",
                    help="mix the LM loss with a KL to the float model's logits")
    tr.add_argument("--distill-weight", type=_fraction("--distill-weight"), default=0.5,
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
    tr.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    tr.set_defaults(func=cmd_train)

    rec = sub.add_parser("recipes", help="list the built-in recipes")
    rec.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    rec.set_defaults(func=cmd_recipes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = args.func(args)
    except ValueError as err:
        print(f"jaxopt-llm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
