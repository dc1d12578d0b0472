"""The training loop behind `jaxopt-llm train`: data, QAT recipes, checkpoints, resume.

- Data: `batch` windows of `seq` tokens per step, their starts drawn from a generator
  seeded by (seed, step), so step t sees the same batch in a resumed run as in an
  uninterrupted one. The default text is the embedded pydoc text without the first
  65,536 tokens (the evaluation tokens of docs/evaluation.md).
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
from jaxopt_llm.placement import Placement
from jaxopt_llm.qat import polynomial_sparsity, reprune
from jaxopt_llm.rules import Rule, flat_params
from jaxopt_llm.train import TrainOptions, make_trainer, split

EVAL_TOKENS = 65_536
LORA_TRAINABLE = r".*/kernel/(a|b)"  # only LoRA adapters train (add_lora's leaves)
_FAKE_QUANT_KEYS = ("bits", "symmetric", "granularity", "group_size", "partial_groups")


def qat_recipe(recipe: Recipe, *, learn_scale: bool = False) -> Recipe:
    """The trainable form of a recipe: quantize → fake_quant (same grid; with LSQ step
    sizes if `learn_scale`), N:M masked."""
    stages = []
    for stage in recipe.stages:
        rules = []
        for rule in stage.rules:
            options = rule.option_dict
            if rule.op == "quantize":
                fake = {k: v for k, v in options.items() if k in _FAKE_QUANT_KEYS}
                if options.get("method") in ("absmax", "minmax"):
                    fake["method"] = options["method"]
                if learn_scale:
                    fake["learn_scale"] = True
                rule = Rule(match=rule.match, op="fake_quant", options=tuple(fake.items()))
            elif rule.op == "nm":
                rule = Rule(match=rule.match, op="nm",
                            options=tuple({**options, "format": "masked"}.items()))
            rules.append(rule)
        stages.append(Stage(name=stage.name, rules=tuple(rules)))
    return Recipe(name=f"{recipe.name}-qat", description=recipe.description,
                  stages=tuple(stages))


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
    """Gradual magnitude pruning of `paths` (MaskedWeight leaves) to `final` sparsity:
    the polynomial schedule of `qat.polynomial_sparsity` from step `start` to `end`,
    masks recomputed before every `every`-th step."""

    paths: tuple[str, ...]
    final: float
    start: int
    end: int
    every: int
    scope: str = "layer"

    def __post_init__(self) -> None:
        polynomial_sparsity(self.start, self.final, self.start, self.end)  # validates
        if self.every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {self.every}")

    def target(self, step: int) -> float | None:
        """The sparsity to impose before `step` (0-based), or None if not a mask step."""
        if not self.start <= step <= self.end:
            return None
        if (step - self.start) % self.every and step != self.end:
            return None
        return polynomial_sparsity(step, self.final, self.start, self.end)


def gradual_recipe(recipe: Recipe, steps: int) -> tuple[Recipe, list[dict[str, Any]]]:
    """Split a recipe's `prune` rules into a start at sparsity 0 (masks of all ones) and
    the schedules that reach each rule's sparsity by 3/4 of the run (Zhu & Gupta's
    shape, masks recomputed 20 times)."""
    stages, targets = [], []
    for stage in recipe.stages:
        rules = []
        for rule in stage.rules:
            if rule.op == "prune":
                options = {**rule.option_dict, "format": "masked"}
                targets.append({"match": rule.match, "stage": stage.name,
                                "final": float(options.get("sparsity", 0.5)),
                                "scope": options.get("scope", "layer")})
                rule = Rule(match=rule.match, op="prune",
                            options=tuple({**options, "sparsity": 0.0}.items()))
            rules.append(rule)
        stages.append(Stage(name=stage.name, rules=tuple(rules)))
    if not targets:
        raise ValueError(f"recipe {recipe.name!r} has no `prune` rule to make gradual")
    end = max(1, (3 * steps) // 4)
    for target in targets:
        target.update(start=0, end=end, every=max(1, end // 20))
    return Recipe(name=f"{recipe.name}-gradual", description=recipe.description,
                  stages=tuple(stages)), targets


def prune_schedules(recipe: Recipe, targets: list[dict[str, Any]], params: Any
                    ) -> list[PruneSchedule]:
    """The schedules of `gradual_recipe`'s targets on the parameters their rules select."""
    flat = flat_params(params)
    schedules = []
    for target in targets:
        stage = next(s for s in recipe.stages if s.name == target["stage"])
        paths = next(p for r, _, p, _ in stage.selections(flat) if r.match == target["match"])
        schedules.append(PruneSchedule(paths=tuple(paths), final=target["final"],
                                       start=target["start"], end=target["end"],
                                       every=target["every"], scope=target["scope"]))
    return schedules


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


def save_checkpoint(directory: Path, state: Any, meta: dict[str, Any]) -> None:
    """Atomically replace `directory` with the state's arrays and `meta`."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    arrays = {f"{i:06d}": np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(state))}
    write_safetensors(tmp / "state.safetensors", arrays)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, template: Any, meta: dict[str, Any]) -> Any:
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
        array = np.asarray(array, dtype=like.dtype)
        # onto the template's devices (a mesh-sharded run resumes sharded)
        on_mesh = isinstance(getattr(like, "sharding", None), jax.sharding.NamedSharding)
        restored.append(jax.device_put(array, like.sharding) if on_mesh else jnp.asarray(array))
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
                 prune_schedules: list[PruneSchedule] = (),
                 mesh: Any = None, shard_rules: Any = (), placement: Placement | None = None,
                 on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train `params` for options.steps micro-batch steps (optionally stopping early after
    `stop_after`, as an interruption would); resume from `checkpoint_dir` if asked.

    The checkpoint holds the train state and the frozen arrays (masks recomputed by a
    gradual schedule live there), so a resumed run continues exactly.

    With a mesh (`placement=Placement.on_mesh(mesh, rules)`, or the older `mesh=` and
    `shard_rules=`), parameters (and the teacher) are placed by the tensor-parallel rules
    and each batch is split over `data`; the optimizer state takes the layouts the
    compiled step gives it, so the step compiles once."""
    import time

    placement = Placement.resolve(placement, mesh=mesh, rules=shard_rules)
    placement.check(config, batch=batch)
    params = placement.place_params(config, params)
    if teacher is not None:
        teacher = placement.place_params(config, teacher)
    place_tokens = placement.place_batch
    trainer, frozen = make_trainer(config, params, options)
    state = trainer.init(params)
    meta = dict(meta or {})
    start = 0
    if resume and checkpoint_dir is not None and (checkpoint_dir / "meta.json").exists():
        state, frozen = load_checkpoint(checkpoint_dir, (state, frozen), meta)
        start = int(state.step)
    if start < options.steps:
        state = placement.settle(trainer.step, state, frozen,
                                 place_tokens(batch_at(ids, start, batch, seq, seed)), teacher)
    history = []
    last = options.steps if stop_after is None else min(options.steps, stop_after)
    mask = None
    for step in range(start, last):
        for schedule in prune_schedules:
            target = schedule.target(step)
            if target is not None:  # new masks; the optimizer state carries over
                if mask is None:
                    mask = jax.tree_util.tree_map(lambda a: a is not None, state.trainable,
                                                  is_leaf=lambda x: x is None)
                current = reprune(trainer.params(state, frozen), list(schedule.paths),
                                  target, schedule.scope)
                trainable, new_frozen = split(current, mask)
                # keep the layouts the step was compiled for
                trainable, frozen = placement.like((trainable, new_frozen),
                                                   (state.trainable, frozen))
                state = state._replace(trainable=trainable)
        tokens = place_tokens(batch_at(ids, step, batch, seq, seed))
        began = time.perf_counter()
        state, metrics = trainer.step(state, frozen, tokens, teacher)
        record = {k: float(v) for k, v in metrics.items()}
        record["step"] = step + 1
        record["step_s"] = time.perf_counter() - began
        history.append(record)
        if on_step is not None:
            on_step(step + 1, record)
        if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, (state, frozen), {**meta, "step": step + 1})
    return TrainResult(params=trainer.params(state, frozen), history=history,
                       resumed_from=start)
