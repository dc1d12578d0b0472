"""The `jaxopt-llm` command: demo, eval, generate, optimize, plan, recipes, train.

Progress goes to stderr (rich); `--json` prints exactly one JSON object on
stdout. Bad input exits with status 2 and one line naming what was wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from jaxopt_llm import compile_cache
from jaxopt_llm.cli_parser import build_parser

stderr = Console(stderr=True)


@contextlib.contextmanager
def _flags(**flags: str) -> Iterator[None]:
    """Library errors name Python parameters (`window=1000: …`); re-word those raised here
    with the flags the values came from (`--window 1000: …`). `flags`: parameter → flag."""
    from jaxopt_llm.errors import ParameterError

    try:
        yield
    except ParameterError as err:
        if err.parameter not in flags:
            raise
        raise ValueError(err.for_flag(flags[err.parameter])) from None


@contextlib.contextmanager
def _spinner(message: str, quiet: bool = False) -> Iterator[None]:
    if quiet:
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=stderr, transient=True) as progress:
        progress.add_task(message, total=None)
        yield


@contextlib.contextmanager
def _bar(message: str, unit: str, quiet: bool) -> Iterator[Callable[..., None]]:
    """A progress bar counting `unit`s; yields update(total=…, completed=…, note=…). The
    bar appears at the first update, which gives the total."""
    if quiet:
        yield lambda **_: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn(f"{{task.completed}}/{{task.total}} {unit}"),
                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                  console=stderr, transient=True) as progress:
        tasks = []

        def update(**fields) -> None:
            if not tasks:
                tasks.append(progress.add_task(message, total=fields.pop("total"), note=""))
            progress.update(tasks[0], **fields)
        yield update


def _load(model: str, quiet: bool = False):
    from jaxopt_llm.io.loader import load_model

    with _spinner(f"loading {model}", quiet), _flags(spec="--model"):
        return load_model(model)


def _recipe(spec: str | None):
    """Resolve --recipe before loading anything, so a bad name or file fails fast."""
    from jaxopt_llm.recipes import load_recipe

    return None if spec is None else load_recipe(spec)


def _read_text(path: str, flag: str = "--text") -> str:
    from jaxopt_llm.data import read_text_file

    with _flags(path=flag):
        return read_text_file(path)


def _out_dir(out: str):
    """--out checked before any work: a directory (or nothing yet) whose nearest existing
    ancestor is a writable directory."""
    import os
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {ancestor} is not writable")
    from jaxopt_llm.io.artifact import check_target

    with _flags(out_dir="--out"):
        check_target(path)  # a foreign non-empty directory is refused before any work
    return path


def _check_paths_first(args: argparse.Namespace) -> None:
    """The paths a command names, checked before anything imports JAX (a bad path fails in
    well under a second): --model, --text, --calib-text, a --recipe file."""
    from pathlib import Path

    from jaxopt_llm.data import read_text_file
    from jaxopt_llm.io.loader import resolve_model_path

    model = getattr(args, "model", None)
    if model is not None:
        with _flags(spec="--model"):
            resolve_model_path(model)
    for attr, flag in (("text", "--text"), ("calib_text", "--calib-text"), ("file", "--file")):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            with _flags(path=flag):
                read_text_file(value)
    recipe = getattr(args, "recipe", None)
    if isinstance(recipe, str):
        path = Path(recipe).expanduser()
        if path.suffix in (".yaml", ".yml", ".json") and not path.is_file():
            raise ValueError(f"recipe file {path}: no such file")


def _calib_text(args: argparse.Namespace) -> str | None:
    """--calib-text read up front (a missing or empty file fails before any work)."""
    calib = getattr(args, "calib_text", None)
    if calib is None:
        return None
    from jaxopt_llm.data import read_text_file

    with _flags(path="--calib-text"):
        return read_text_file(calib)


@contextlib.contextmanager
def _calibrated(args: argparse.Namespace, loaded, recipe, text: str | None):
    """The Calibration a calibrated --recipe runs on (None for other recipes), with a
    progress bar over the model's blocks."""
    if recipe is None or not recipe.needs_calibration:
        yield None
        return
    with _bar("calibrating", "blocks", args.json) as update:
        done = [0]

        def progress(line: str) -> None:
            if line.endswith("compressing"):
                done[0] += 1
            update(total=loaded.config.num_layers, completed=done[0], note=line)

        yield _calibration(args, loaded, recipe, text, progress)


def _calibration(args: argparse.Namespace, loaded, recipe, text: str | None,
                 progress: Callable[[str], None]):
    """--calib-text / --calib-tokens as a Calibration (None unless the recipe needs one)."""
    if recipe is None or not recipe.needs_calibration:
        return None
    from jaxopt_llm.calibration import default_calibration

    with _flags(num_tokens="--calib-tokens"):
        return default_calibration(loaded.tokenizer, text=text, num_tokens=args.calib_tokens,
                                   progress=progress)


def _parallel_setup(args: argparse.Namespace) -> None:
    """Before JAX starts: join a multi-host job (--coordinator … or JAXOPT_* env), and on
    CPU provide as many devices as --mesh asks for (fake CPU devices on one host)."""
    from jaxopt_llm import distributed
    from jaxopt_llm.parallel import parse_mesh
    from jaxopt_llm.placement import ensure_cpu_devices

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.mesh:
        with _flags(spec="--mesh"):
            sizes = parse_mesh(args.mesh)
        processes = args.num_processes or int(os.environ.get(distributed.ENV_NUM_PROCESSES, "1"))
        ensure_cpu_devices(sizes["data"] * sizes["model"] // max(1, processes))


def _placement(args: argparse.Namespace):
    """The Placement of --mesh and --shard (one device without --mesh)."""
    from jaxopt_llm.parallel import make_mesh, parse_shard_rule
    from jaxopt_llm.placement import Placement

    if not args.mesh:
        return Placement.single()
    with _flags(spec="--mesh", text="--shard"):
        rules = [parse_shard_rule(text) for text in args.shard]
        return Placement.on_mesh(make_mesh(args.mesh), rules)


def _decoder_only(loaded, command: str) -> None:
    """Refuse an encoder for a command that needs next-token logits, before any work."""
    if loaded.config.is_encoder:
        instead = "use `embed` or `eval` for an encoder"
        raise ValueError(f"--model {loaded.source}: a {loaded.config.model_type} model is an "
                         f"encoder; `{command}` needs a decoder ({instead})")


def _model(args: argparse.Namespace, decoder_only: str | None = None, with_float=False):
    """(model of --model with --recipe applied and placed by --mesh, its placement), and
    with `with_float` the model before the recipe (not placed) last."""
    from jaxopt_llm.recipes import apply_recipe

    recipe = _recipe(args.recipe)
    text = _calib_text(args)
    _parallel_setup(args)  # after the cheap checks: bad input fails fast
    loaded = original = _load(args.model, args.json)
    if decoder_only:
        _decoder_only(loaded, decoder_only)
    with _calibrated(args, loaded, recipe, text) as calibration, _spinner(
            f"applying recipe {getattr(recipe, 'name', '')}",
            args.json or not recipe or calibration is not None):
        loaded = apply_recipe(loaded, recipe, calibration=calibration)
    placement = _placement(args)
    params = loaded.params
    if getattr(args, "compute", "float32") != "float32":
        from jaxopt_llm.transforms.precision import compute_in

        params = compute_in(params, args.compute)
    params = placement.place_params(loaded.config, params)
    config = loaded.config
    if getattr(args, "kv_cache", "float") != "float":
        if config.is_encoder:
            raise ValueError(f"--kv-cache {args.kv_cache}: a {config.model_type} model is an "
                             f"encoder; it has no KV cache")
        config = dataclasses.replace(config, kv_cache=args.kv_cache)
    out = dataclasses.replace(loaded, config=config, params=params), placement
    return (*out, original) if with_float else out


def _compute_dtype(args: argparse.Namespace) -> str:
    """The dtype --compute resolved to on this backend ("auto" → what it picked)."""
    from jaxopt_llm.transforms.precision import resolve_compute

    return resolve_compute(args.compute)


def _attention_path(args: argparse.Namespace, length: int) -> str:
    """The prefix-attention formulation a decoder runs for `length` tokens here."""
    from jaxopt_llm.models.attention import prefix_path

    return prefix_path(length, _compute_dtype(args))


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm eval`: perplexity of --model (with --recipe) on a text.

    Args:
        args: the parsed arguments.

    Returns:
        The JSON record (`runs.evaluate_text`).

    Example:
        >>> main(["eval", "--model", "smollm2-135m", "--tokens", "4096"])  # doctest: +SKIP
    """
    from jaxopt_llm.data import pydoc_text
    from jaxopt_llm.runs import evaluate_encoder_text, evaluate_text

    text = pydoc_text() if args.text is None else _read_text(args.text)
    loaded, placement, original = _model(args, with_float=True)
    if loaded.config.is_encoder:  # compared with the float model, placed the same way
        original = dataclasses.replace(original, params=placement.place_params(
            original.config, original.params))
        with _spinner("embedding the evaluation texts", args.json), _flags(count="--texts"):
            out = evaluate_encoder_text(original, loaded, text, num_texts=args.texts,
                                        batch_size=args.batch_size or 32, placement=placement)
        if not args.json:
            stderr.print(f"[bold]cosine[/bold] {out['cosine']:.5f} (min {out['cosine_min']:.5f})"
                         f", spearman {out['spearman']:.5f}, top-1 agreement "
                         f"{out['top1_agreement']:.4f} over {out['texts']} texts; paraphrases "
                         f"{out['paraphrase_accuracy']:.3f} (float "
                         f"{out['paraphrase_accuracy_reference']:.3f}); recipe {out['recipe']}, "
                         f"params {out['param_bytes'] / 2**20:.1f} MiB")
        return out
    with _bar("perplexity", "windows", args.json) as update, _flags(num_tokens="--tokens",
                                                                     window="--window"):
        out = evaluate_text(loaded, text, num_tokens=args.tokens, window=args.window,
                            batch_size=args.batch_size or 1, placement=placement,
                            progress=lambda done, total: update(completed=done, total=total))
    out["compute"] = _compute_dtype(args)
    out["attention"] = _attention_path(args, out["window"])
    if not args.json:
        stderr.print(f"[bold]perplexity[/bold] {out['ppl']:.4f} over {out['tokens_scored']} "
                     f"scored tokens ({out['windows']} windows of {out['window']}), "
                     f"{out['eval_tok_s']:.0f} tok/s, recipe {out['recipe']}, params "
                     f"{out['param_bytes'] / 2**20:.1f} MiB "
                     f"(float32: {out['dense_param_bytes'] / 2**20:.1f} MiB)")
    return out


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm embed`: sentence embeddings of --text (repeatable) or --file lines under
    an encoder --model (with --recipe).

    Args:
        args: the parsed arguments.

    Returns:
        The JSON record: model, recipe, dim, param_bytes and one embedding per text.

    Example:
        >>> main(["embed", "--model", "minilm-l6", "--text", "Hi there."])  # doctest: +SKIP
    """
    from jaxopt_llm.encoders import embed
    from jaxopt_llm.runs import recipe_name
    from jaxopt_llm.weights import param_bytes

    texts = list(args.text or [])
    if args.file is not None:
        texts += [line for line in _read_text(args.file, "--file").splitlines()
                  if line.strip()]
    if not texts:
        raise ValueError("embed: give at least one --text or a --file with non-empty lines")
    if any(not t.strip() for t in texts):
        raise ValueError("embed: --text must not be empty")
    loaded, placement = _model(args)
    with _spinner(f"embedding {len(texts)} texts", args.json), _flags(
            max_length="--max-length", batch_size="--batch-size"):
        vectors = embed(loaded.config, loaded.params, loaded.tokenizer, texts,
                        batch_size=args.batch_size, max_length=args.max_length,
                        placement=placement)
    if not args.json:
        for text, vector in zip(texts, vectors, strict=True):
            print(json.dumps({"text": text, "embedding": [round(float(v), 6) for v in vector]}))
    return {"model": loaded.source, "recipe": recipe_name(loaded),
            "dim": int(vectors.shape[1]), "param_bytes": param_bytes(loaded.params),
            "texts": texts, "embeddings": vectors.tolist()}


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm generate`: a continuation of --prompt.

    Args:
        args: the parsed arguments.

    Returns:
        The JSON record (`runs.generate_text`).

    Example:
        >>> main(["generate", "--model", "smollm2-135m", "--prompt", "Hi"])  # doctest: +SKIP
    """
    from jaxopt_llm.generation import Sampling
    from jaxopt_llm.runs import generate_text

    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    loaded, placement = _model(args, decoder_only="generate")
    with _spinner("compiling and generating", args.json):
        out = generate_text(loaded, args.prompt, max_new_tokens=args.max_new_tokens,
                            sampling=sampling, seed=args.seed, placement=placement)
    out["compute"] = _compute_dtype(args)
    out["attention"] = _attention_path(args, len(out["prompt_ids"]))
    if not args.json:
        print(args.prompt + out["text"])
        stderr.print(f"prefill {out['prefill_tok_s']:.1f} tok/s, "
                     f"decode {out['decode_tok_s']:.1f} tok/s, "
                     f"compile {out['compile_seconds']:.1f} s")
    return out


def cmd_optimize(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm optimize`: apply --recipe and write the artifact --out.

    Args:
        args: the parsed arguments.

    Returns:
        The JSON record (`runs.optimize_model`).

    Example:
        >>> main(["optimize", "--model", "smollm2-135m", "--recipe", "w8",  # doctest: +SKIP
        ...       "--out", "smol-w8"])
    """
    from jaxopt_llm.runs import optimize_model

    recipe = _recipe(args.recipe)
    out_dir = _out_dir(args.out)
    text = _calib_text(args)
    loaded = _load(args.model, args.json)
    with _calibrated(args, loaded, recipe, text) as calibration, _spinner(
            f"applying recipe {recipe.name}, writing {out_dir}",
            args.json or calibration is not None):
        out = optimize_model(loaded, recipe, out_dir, calibration=calibration)
    if not args.json:
        stderr.print(f"wrote {out['out']}: recipe {out['recipe']}, params "
                     f"{out['param_bytes'] / 2**20:.1f} MiB (float32 "
                     f"{out['dense_param_bytes'] / 2**20:.1f} MiB), transform "
                     f"{out['transform_seconds']:.1f} s")
    return out


def _export_target(out: str, fmt: str):
    """--out of an export checked before any work: new, or a previous export of that
    format (a GGUF file; a directory `export_hf` wrote), in a writable directory."""
    import os
    from pathlib import Path

    path = Path(out)
    if fmt in ("hf", "onnx", "tflite"):
        from jaxopt_llm.io.atomic import is_previous_export

        if path.exists() and (not path.is_dir() or (any(path.iterdir())
                                                    and not is_previous_export(path, fmt))):
            raise ValueError(f"--out {out}: exists and is not a previous {fmt} export; "
                             "refusing to replace it")
    elif path.suffix != ".gguf":
        raise ValueError(f"--out {out}: expected a .gguf file name")
    elif path.is_dir():
        raise ValueError(f"--out {out}: is a directory")
    elif path.exists():
        with path.open("rb") as file:
            magic = file.read(4)
        if magic != b"GGUF":
            raise ValueError(f"--out {out}: exists and is not a previous GGUF export; "
                             "refusing to overwrite it")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")
    return path


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm export`: --model after --recipe, written as --format (gguf, hf, onnx,
    tflite) to --out.

    What each weight becomes (codes copied, widened, requantized) is printed before the
    file is written; --strict refuses instead of widening or requantizing.

    Args:
        args: the parsed arguments.

    Returns:
        The JSON record: the file, its bytes, the model's bytes, and per tensor how it
        was written.

    Example:
        >>> main(["export", "--model", "smollm2-135m", "--recipe", "w4g32-float",  # doctest: +SKIP
        ...       "--format", "gguf", "--type", "q4_1", "--out", "smol.gguf"])
    """
    from collections import Counter

    from jaxopt_llm.io.export_gguf import export_gguf, plan_gguf
    from jaxopt_llm.io.export_hf import export_hf, plan_hf
    from jaxopt_llm.io.export_onnx import export_onnx, plan_onnx
    from jaxopt_llm.io.export_tflite import DEFAULT_SEQ_LEN, export_tflite, plan_tflite
    from jaxopt_llm.pipeline import Recipe
    from jaxopt_llm.plan import planned_params
    from jaxopt_llm.recipes import apply_recipe
    from jaxopt_llm.weights import param_bytes

    recipe = _recipe(args.recipe)
    out = _export_target(args.out, args.format)
    text = _calib_text(args)
    loaded = _load(args.model, args.json)
    # what the file will hold, from the recipe's shapes: refusals come before any work
    config, shapes = planned_params(recipe or Recipe(name="none"), loaded.config,
                                    loaded.params)
    flags = {"qtype": "--type", "floats": "--floats", "seq_len": "--seq-len",
             "batch": "--batch", "int8_matmul": "--int8-matmul"}
    with _flags(**flags):
        if args.format == "hf":
            rows = plan_hf(config, shapes, strict=args.strict)
        elif args.format == "onnx":
            rows = plan_onnx(config, shapes, strict=args.strict)
        elif args.format == "tflite":
            if args.seq_len is None:
                args.seq_len = min(DEFAULT_SEQ_LEN, config.max_position_embeddings)
            if args.seq_len > config.max_position_embeddings:
                raise ValueError(f"--seq-len {args.seq_len}: expected at most the model's "
                                 f"context, {config.max_position_embeddings}")
            rows = plan_tflite(config, shapes, strict=args.strict,
                               int8_matmul=args.int8_matmul)
        else:
            rows = plan_gguf(config, shapes, args.type, floats=args.floats, strict=args.strict)
    counts = Counter(f"{row.how} → {row.written_as}" for row in rows)
    if not args.json:
        stderr.print("writing: " + ", ".join(f"{n} {how}" for how, n in sorted(counts.items())),
                     highlight=False)
        for row in rows:
            if row.how in ("widened", "requantized"):
                stderr.print(f"  {row.path} ({row.stored_as}) {row.how} to "
                             f"{row.written_as}", highlight=False)
    with _calibrated(args, loaded, recipe, text) as calibration, _spinner(
            f"applying recipe {getattr(recipe, 'name', '')}",
            args.json or not recipe or calibration is not None):
        loaded = apply_recipe(loaded, recipe, calibration=calibration)
    with _spinner(f"writing {out}", args.json), _flags(**flags):
        if args.format == "hf":
            path, rows = export_hf(loaded.config, loaded.params, loaded.tokenizer, out,
                                   strict=args.strict)
        elif args.format == "tflite":
            path, rows = export_tflite(loaded.config, loaded.params, loaded.tokenizer, out,
                                       batch=args.batch, seq_len=args.seq_len,
                                       strict=args.strict, int8_matmul=args.int8_matmul)
        elif args.format == "onnx":
            path, rows = export_onnx(loaded.config, loaded.params, loaded.tokenizer, out,
                                     strict=args.strict)
        else:
            path, rows = export_gguf(loaded.config, loaded.params, loaded.tokenizer, out,
                                     qtype=args.type, floats=args.floats, strict=args.strict,
                                     name=f"{loaded.source} {getattr(recipe, 'name', '')}"
                                     .strip())
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
        else path.stat().st_size
    record = {"out": str(path), "format": args.format,
              "type": args.type if args.format == "gguf" else (
                  "float32" if args.format == "hf" else "as stored"),
              **({"batch": args.batch, "seq_len": args.seq_len,
                  "int8_matmul": args.int8_matmul} if args.format == "tflite" else {}),
              "file_bytes": size, "param_bytes": param_bytes(loaded.params),
              "tensors": [dataclasses.asdict(row) for row in rows],
              "summary": dict(sorted(counts.items()))}
    if not args.json:
        stderr.print(f"wrote {path}: {record['file_bytes'] / 2**20:.1f} MiB (the model's "
                     f"parameters: {record['param_bytes'] / 2**20:.1f} MiB)", highlight=False)
    return record


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm plan`: the dry run of --recipe on --model.

    Args:
        args: the parsed arguments.

    Returns:
        `Plan.to_dict()`.

    Example:
        >>> main(["plan", "--model", "smollm2-135m", "--recipe", "w4g128"])  # doctest: +SKIP
    """
    from jaxopt_llm.plan import plan

    recipe = _recipe(args.recipe)
    loaded = _load(args.model, args.json)
    result = plan(recipe, loaded.config, loaded.params)
    if not args.json:
        print(result)
    return result.to_dict()


def cmd_recipes(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm recipes`: the built-in recipes.

    Args:
        args: the parsed arguments.

    Returns:
        {"recipes": {name: recipe as a dict}}.

    Example:
        >>> main(["recipes"])  # doctest: +SKIP
    """
    from jaxopt_llm.recipes import BUILTIN_RECIPES

    if not args.json:
        for name, recipe in BUILTIN_RECIPES.items():
            print(f"{name:<14} {recipe.description}")
    return {"recipes": {name: r.to_dict() for name, r in BUILTIN_RECIPES.items()}}


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm info`: the backend, devices, CPU features and the paths they choose.

    Args:
        args: the parsed arguments.

    Returns:
        {"backend", "devices", "jax", "cpu_flags", "bf16_prefill", "compile_cache", ...}.

    Example:
        >>> main(["info", "--json"])  # doctest: +SKIP
    """
    import jax

    from jaxopt_llm import hardware
    from jaxopt_llm.models.attention import describe_prefix_attention
    from jaxopt_llm.weights.native import path_in_use

    out = {"jax": jax.__version__, "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()], **hardware.describe(),
           "quantized_decode": path_in_use()[1],
           "prefix_attention": describe_prefix_attention(), **args.compile_cache}
    if not args.json:
        for key, value in out.items():
            print(f"{key:<16} {value}")
    return out


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm train`: `train.train_recipe` with the flags' settings, then the artifact.

    Args:
        args: the parsed arguments.

    Returns:
        The JSON record (out, log, steps, losses, step time, mesh), or where it stopped.

    Example:
        >>> main(["train", "--model", "smollm2-135m", "--recipe", "w4",  # doctest: +SKIP
        ...       "--steps", "10", "--out", "smol-w4-qat"])
    """
    from jaxopt_llm.runs import mesh_shape
    from jaxopt_llm.train import TrainSettings, train_recipe, training_ids

    with _flags(lora_rank="--lora"):
        settings = TrainSettings(
            steps=args.steps, batch=args.batch, seq=args.seq, learning_rate=args.lr,
            distill_weight=args.distill_weight if args.distill else 0.0,
            compute_dtype=args.compute, learn_scale=args.learn_scale, gradual=args.gradual,
            lora_rank=args.lora, merge_lora=args.merge_lora and args.lora is not None)
    recipe = _recipe(args.recipe)
    if recipe is None and (args.gradual or args.learn_scale):
        raise ValueError("--gradual and --learn-scale need a --recipe")
    out_dir = _out_dir(args.out)
    text = None if args.text is None else _read_text(args.text)  # None: pydoc minus eval
    _parallel_setup(args)
    placement = _placement(args)
    calib_text = _calib_text(args)
    loaded = _load(args.model, args.json)  # an encoder distils its own hidden states
    checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoint")
    log_path = out_dir.with_name(out_dir.name + ".train_log.jsonl")
    with _bar("training", "steps", args.json) as update, _flags(seq="--seq"):
        update(total=args.steps)
        calibration = _calibration(args, loaded, recipe, calib_text,
                                   lambda line: update(note=f"calibrating: {line}"))
        trained = train_recipe(
            loaded, recipe, training_ids(loaded.tokenizer, text), settings,
            checkpoint_dir=checkpoint_dir, checkpoint_every=args.checkpoint_every,
            log_path=log_path, stop_after=args.stop_after, placement=placement,
            on_step=lambda step, record: update(completed=step,
                                                note=f"loss {record['loss']:.3f}"),
            calibration=calibration)
    if not trained.finished:
        return {"stopped_at": trained.steps_done, "checkpoint": str(checkpoint_dir)}
    path = trained.save(out_dir)
    out = {"out": str(path), "log": str(log_path), "steps": args.steps,
           "resumed_from": trained.resumed_from, "loss_first": trained.loss_first,
           "loss_last": trained.loss_last, "step_s": trained.step_seconds,
           "mesh": mesh_shape(placement)}
    if not args.json:
        stderr.print(f"trained {args.steps} steps: loss {out['loss_first']:.3f} → "
                     f"{out['loss_last']:.3f}, {out['step_s']:.3f} s/step; wrote {path}")
    return out


# run_demo's parameters and the demo flags that set them (its errors name the parameter)
_DEMO_FLAGS = {"num_tokens": "--tokens", "max_new_tokens": "--max-new-tokens",
               "recipes": "--recipes", "prompt": "--prompt"}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    """`jaxopt-llm demo`: `demo.run_demo` printed as one table.

    Args:
        args: the parsed arguments.

    Returns:
        `run_demo`'s result.

    Example:
        >>> main(["demo", "--recipes", "fp32,w8"])  # doctest: +SKIP
    """
    from jaxopt_llm.demo import run_demo

    started = time.perf_counter()

    def progress(line: str) -> None:
        stderr.print(f"[dim]{time.perf_counter() - started:6.1f} s[/dim]  {line}",
                     highlight=False)

    try:
        with _flags(spec="--model"):
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


COMMANDS = {"demo": cmd_demo, "embed": cmd_embed, "eval": cmd_eval, "export": cmd_export,
            "generate": cmd_generate, "optimize": cmd_optimize, "plan": cmd_plan,
            "recipes": cmd_recipes, "train": cmd_train, "info": cmd_info}
# (for cli_parser.build_parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `jaxopt-llm` command; library errors become one line on stderr.

    Args:
        argv: the arguments (default `sys.argv[1:]`).

    Returns:
        The exit status: 0; 2 for an anticipated error (bad input: ValueError; a file
        system error: OSError; non-finite results: FloatingPointError), printed as one
        line; 130 when interrupted.

    Example:
        >>> main(["recipes", "--json"])  # doctest: +SKIP
        0
    """
    args = build_parser(COMMANDS).parse_args(argv)
    try:
        _check_paths_first(args)  # before JAX is imported (configure imports it)
        args.compile_cache = compile_cache.configure(not args.no_compile_cache)
        out = args.func(args)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"jaxopt-llm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(out, allow_nan=False))  # strict JSON: NaN is never printed
    return 0


if __name__ == "__main__":
    sys.exit(main())
