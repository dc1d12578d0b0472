"""The training loop: data, checkpoints, resume, gradual pruning steps.

- Data: `batch` windows of `seq` tokens per step, their starts drawn from a generator
  seeded by (seed, step), so step t sees the same batch in a resumed run as in an
  uninterrupted one. The default text is the embedded pydoc text without the first
  65,536 tokens (the evaluation tokens of docs/evaluation.md).
- Recipes train through their QAT form (`train.qat.qat_recipe`); a gradual pruning
  schedule (`train.schedule`) recomputes masks before the steps it names.
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

from jaxopt_llm.errors import ParameterError
from jaxopt_llm.io import atomic
from jaxopt_llm.io.safetensors_file import read_safetensors, write_safetensors
from jaxopt_llm.placement import Placement
from jaxopt_llm.train.schedule import PruneSchedule, reprune
from jaxopt_llm.train.step import TrainOptions, make_trainer, split

EVAL_TOKENS = 65_536
LORA_TRAINABLE = r".*/kernel/(a|b)"  # only LoRA adapters train (add_lora's leaves)


def batch_at(ids: np.ndarray, step: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """(batch, seq) token windows for `step`, the same in every run.

    Args:
        ids: the training tokens.
        step: the step (with `seed`, it seeds the window starts).
        batch: windows per step.
        seq: tokens per window.
        seed: the run's seed.

    Returns:
        int32 (batch, seq).

    Example:
        >>> import numpy as np
        >>> batch_at(np.arange(100), step=3, batch=2, seq=8).shape
        (2, 8)
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(ids) - seq + 1, size=batch)
    return np.stack([ids[s:s + seq] for s in starts]).astype(np.int32)


def check_data(ids: np.ndarray, batch: int, seq: int, context: int) -> None:
    """Raise ParameterError (on `seq`) unless `ids` holds a sequence the model can take.

    Args:
        ids: the training tokens.
        batch: sequences per step.
        seq: tokens per sequence.
        context: the model's context length.

    Example:
        >>> import numpy as np
        >>> check_data(np.arange(10), 2, 16, 2048)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jaxopt_llm.errors.ParameterError: seq=16: the training text has 10 tokens, fewer ...
    """
    if seq > context:
        raise ParameterError("seq", seq, f"longer than the model's context of {context} tokens")
    if len(ids) < seq:
        raise ParameterError("seq", seq, f"the training text has {len(ids)} tokens, fewer "
                                         f"than one sequence; give a longer text or a shorter "
                                         f"sequence")


def save_checkpoint(directory: Path, state: Any, meta: dict[str, Any]) -> None:
    """Atomically replace `directory` with the state's arrays and `meta`.

    Args:
        directory: the checkpoint directory (written beside, fsynced, then swapped into
            place by `io.atomic.replace_dir`: the path always names a complete checkpoint).
        state: any tree of arrays (a `TrainState` and the frozen arrays).
        meta: JSON data describing the run (compared on resume).

    Example:
        >>> import pathlib, tempfile, jax.numpy as jnp
        >>> where = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        >>> save_checkpoint(where, {"w": jnp.ones(2)}, {"step": 1})
        >>> load_checkpoint(where, {"w": jnp.zeros(2)}, {"step": 1})["w"].tolist()
        [1.0, 1.0]
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale(directory)
    tmp = atomic.sibling(directory, "tmp")
    try:
        tmp.mkdir()
        arrays = {f"{i:06d}": np.asarray(a)
                  for i, a in enumerate(jax.tree_util.tree_leaves(state))}
        write_safetensors(tmp / "state.safetensors", arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for path in (tmp / "state.safetensors", tmp / "meta.json", tmp):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        atomic.replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(directory: Path, template: Any, meta: dict[str, Any]) -> Any:
    """The saved state, after checking it was made by the same run configuration.

    Args:
        directory: the checkpoint directory.
        template: a tree like the saved state (structure, shapes, dtypes and, on a mesh,
            shardings to restore onto).
        meta: this run's description; every key but "step" must equal the saved one.

    Returns:
        The restored tree.

    Raises:
        ValueError: the checkpoint was made by another run (naming the setting that
            differs) or holds another number of arrays.

    Example:
        >>> state = load_checkpoint(Path("run.checkpoint"), template, meta)  # doctest: +SKIP
    """
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
    """What `run_training` returns: the trained parameters (trainable form), one record per
    step run (loss, lm_loss, grad_norm, step, step_s, …) and the step a checkpoint resumed
    from (0: from the start).
    """
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
    compiled step gives it, so the step compiles once.

    Args:
        config: the model's config.
        params: the parameters to train (their trainable form).
        options: the `TrainOptions`.
        ids: the training tokens.
        batch / seq / seed: sequences per step, tokens per sequence, sampling seed.
        teacher: the teacher's parameters for distillation (options.distill_weight > 0).
        checkpoint_dir / checkpoint_every: where and how often to checkpoint (0: never).
        meta: JSON description of the run, stored with checkpoints and compared on resume.
        resume: continue from the checkpoint in `checkpoint_dir`.
        stop_after: end after this step.
        prune_schedules: gradual pruning schedules (`schedule.prune_schedules`).
        mesh / shard_rules: the older way to give a mesh (prefer `placement`).
        placement: where to train (default one device).
        on_step: called with (step, record) after every step.

    Returns:
        A `TrainResult`.

    Example:
        >>> import jax, numpy as np
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> config = ModelConfig.tiny()
        >>> result = run_training(config, init_params(config, jax.random.key(0)),
        ...                       TrainOptions(steps=2), np.arange(200) % 64, batch=2, seq=16)
        >>> [record["step"] for record in result.history]
        [1, 2]
    """
    if config.is_encoder and teacher is None:
        raise ValueError(f"teacher=None: a {config.model_type} model is an encoder; it "
                         "trains by distilling a teacher's hidden states (pass the float "
                         "model's params as teacher)")
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
