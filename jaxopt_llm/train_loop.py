"""The training loop behind `jaxopt-llm train`: data, QAT recipes, checkpoints, resume.

- Data: `batch` windows of `seq` tokens per step, their starts drawn from a generator
  seeded by (seed, step), so step t sees the same batch in a resumed run as in an
  uninterrupted one. The default text is the embedded pydoc text without the first
  65,536 tokens (the evaluation tokens of REFERENCES.md).
- Recipes train through their QAT form (`qat_recipe`): `quantize` rules become
  `fake_quant` with the same grid, pruning keeps `MaskedWeight`s; at the end
  `qat.convert` turns fake-quant leaves into real integer weights.
- Checkpoints: the train state's arrays in one safetensors file plus a JSON of what
  must match to resume (model, recipe, options, step); written atomically every
  `checkpoint_every` steps into `<out>.checkpoint/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.io.safetensors_file import read_safetensors, write_safetensors
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.rules import Rule
from jaxopt_llm.train import TrainOptions, TrainState, make_trainer

EVAL_TOKENS = 65_536
_FAKE_QUANT_KEYS = ("bits", "symmetric", "granularity", "group_size", "partial_groups")


def qat_recipe(recipe: Recipe) -> Recipe:
    """The trainable form of a recipe: quantize → fake_quant (same grid), N:M masked."""
    stages = []
    for stage in recipe.stages:
        rules = []
        for rule in stage.rules:
            options = rule.option_dict
            if rule.op == "quantize":
                fake = {k: v for k, v in options.items() if k in _FAKE_QUANT_KEYS}
                if options.get("method") in ("absmax", "minmax"):
                    fake["method"] = options["method"]
                rule = Rule(match=rule.match, op="fake_quant", options=tuple(fake.items()))
            elif rule.op == "nm":
                rule = Rule(match=rule.match, op="nm",
                            options=tuple({**options, "format": "masked"}.items()))
            rules.append(rule)
        stages.append(Stage(name=stage.name, rules=tuple(rules)))
    return Recipe(name=f"{recipe.name}-qat", description=recipe.description,
                  stages=tuple(stages))


def batch_at(ids: np.ndarray, step: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """(batch, seq) token windows for `step`, the same in every run."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(ids) - seq + 1, size=batch)
    return np.stack([ids[s:s + seq] for s in starts]).astype(np.int32)


def check_data(ids: np.ndarray, batch: int, seq: int, context: int) -> None:
    if seq > context:
        raise ValueError(f"--seq {seq} is longer than the model's context of {context} tokens")
    if len(ids) < seq:
        raise ValueError(f"the training text has {len(ids)} tokens, fewer than one sequence "
                         f"of --seq {seq}; give a longer --text or a shorter --seq")


def _state_arrays(state: TrainState) -> list[Any]:
    return jax.tree_util.tree_leaves(state)


def save_checkpoint(directory: Path, state: TrainState, meta: dict[str, Any]) -> None:
    """Atomically replace `directory` with the state's arrays and `meta`."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    arrays = {f"{i:06d}": np.asarray(a) for i, a in enumerate(_state_arrays(state))}
    write_safetensors(tmp / "state.safetensors", arrays)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, template: TrainState, meta: dict[str, Any]) -> TrainState:
    """The saved state, after checking it was made by the same run configuration."""
    saved = json.loads((directory / "meta.json").read_text())
    for key in sorted(set(meta) | set(saved)):
        if key != "step" and saved.get(key) != meta.get(key):
            raise ValueError(f"checkpoint {directory} was made with another {key}: "
                             f"{saved.get(key)!r}, this run has {meta.get(key)!r}")
    arrays = read_safetensors(directory / "state.safetensors")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(arrays) != len(leaves):
        raise ValueError(f"checkpoint {directory} holds {len(arrays)} arrays, expected "
                         f"{len(leaves)}")
    restored = []
    for i, like in enumerate(leaves):
        array = arrays[f"{i:06d}"].reshape(np.shape(like))
        restored.append(jnp.asarray(array, dtype=like.dtype))
    return jax.tree_util.tree_unflatten(treedef, restored)


@dataclasses.dataclass
class TrainResult:
    params: Any
    history: list[dict[str, float]]
    resumed_from: int


def run_training(config, params, options: TrainOptions, ids: np.ndarray, *, batch: int,
                 seq: int, seed: int = 0, teacher: Any = None,
                 checkpoint_dir: Path | None = None, checkpoint_every: int = 0,
                 meta: dict[str, Any] | None = None, resume: bool = False,
                 stop_after: int | None = None,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train `params` for options.steps micro-batch steps (optionally stopping early after
    `stop_after`, as an interruption would); resume from `checkpoint_dir` if asked."""
    import time

    trainer, frozen = make_trainer(config, params, options)
    state = trainer.init(params)
    meta = dict(meta or {})
    start = 0
    if resume and checkpoint_dir is not None and (checkpoint_dir / "meta.json").exists():
        state = load_checkpoint(checkpoint_dir, state, meta)
        start = int(state.step)
    history = []
    last = options.steps if stop_after is None else min(options.steps, stop_after)
    for step in range(start, last):
        tokens = jnp.asarray(batch_at(ids, step, batch, seq, seed))
        began = time.perf_counter()
        state, metrics = trainer.step(state, frozen, tokens, teacher)
        record = {k: float(v) for k, v in metrics.items()}
        record["step"] = step + 1
        record["step_s"] = time.perf_counter() - began
        history.append(record)
        if on_step is not None:
            on_step(step + 1, record)
        if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, state, {**meta, "step": step + 1})
    return TrainResult(params=trainer.params(state, frozen), history=history,
                       resumed_from=start)
