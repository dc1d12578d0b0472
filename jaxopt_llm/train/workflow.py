"""`train_recipe`: train a loaded model through a recipe and get its integer form back.

The workflow behind `jaxopt-llm train` (and `benchmarks/bench_qat.py`):

1. the recipe in its trainable form: `qat_recipe` (quantize → fake_quant, with learned
   step sizes if asked), its `prune` rules made gradual if asked (`gradual_recipe`), or,
   for LoRA, the recipe's real weights frozen under trainable adapters (QLoRA). A
   calibrated recipe (GPTQ, AWQ, SmoothQuant) runs on its calibration data first and
   training starts from its result: each integer weight becomes a fake-quantized one
   holding the calibrated values, with the calibrated step sizes as LSQ's learned scales
   (`trainable_quantized`);
2. training (`run_training`): AdamW, optional distillation from the loaded model's
   logits, bf16 compute, checkpoints every `checkpoint_every` steps, resumed
   automatically from `checkpoint_dir` when it holds one;
3. back to integers (`convert`), adapters merged if asked; `TrainedModel.save` writes
   the artifact and then removes the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxopt_llm.errors import ParameterError
from jaxopt_llm.io import atomic
from jaxopt_llm.io.loaded import LoadedModel
from jaxopt_llm.models import ModelConfig
from jaxopt_llm.pipeline import Recipe
from jaxopt_llm.placement import Placement
from jaxopt_llm.rules import BLOCK_LINEARS
from jaxopt_llm.train.loop import EVAL_TOKENS, LORA_TRAINABLE, check_data, run_training
from jaxopt_llm.train.qat import (
    convert,
    qat_recipe,
    trainable_quantized,
    with_activation_bits,
)
from jaxopt_llm.train.schedule import gradual_recipe, prune_schedules
from jaxopt_llm.train.step import TRAIN_ALL, TrainOptions
from jaxopt_llm.weights.lora import add_lora, merge_lora


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How `train_recipe` trains.

    Args:
        steps: optimizer steps.
        batch: sequences per step.
        seq: tokens per sequence.
        learning_rate: peak AdamW learning rate.
        warmup_steps: linear warmup steps; None: a tenth of `steps` (at most steps − 1).
        distill_weight: > 0 mixes the LM loss with a KL to the loaded model's logits,
            (1 − w)·LM + w·KL.
        compute_dtype: "float32" or "bfloat16" matmuls (master weights stay float32).
        learn_scale: also learn the quantization step sizes (LSQ).
        gradual: reach the recipe's pruning sparsity gradually (cubic schedule).
        lora_rank: train LoRA adapters of this rank on the recipe's real, frozen weights
            instead of the weights themselves.
        merge_lora: fold the trained adapters into the weights at the end (needs
            lora_rank).
        seed: seed of the batch sampler.

    Example:
        >>> TrainSettings(steps=100, lora_rank=16).train_options().trainable
        '.*/kernel/(a|b)'
    """

    steps: int = 100
    batch: int = 4
    seq: int = 256
    learning_rate: float = 1e-4
    warmup_steps: int | None = None
    distill_weight: float = 0.0
    compute_dtype: str = "float32"
    learn_scale: bool = False
    gradual: bool = False
    lora_rank: int | None = None
    merge_lora: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ParameterError(name, value, "must be a positive integer")
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or not isinstance(
                self.lora_rank, int) or self.lora_rank <= 0):
            raise ParameterError("lora_rank", self.lora_rank, "must be a positive integer")
        if self.lora_rank is not None and (self.gradual or self.learn_scale):
            raise ParameterError("lora_rank", self.lora_rank, "does not combine with gradual "
                                 "pruning or learned scales (LoRA trains adapters on the "
                                 "recipe's real, frozen weights)")
        if self.merge_lora and self.lora_rank is None:
            raise ParameterError("merge_lora", self.merge_lora, "needs a lora_rank")
        self.train_options()  # validates steps, rates, weights and dtype now

    def train_options(self) -> TrainOptions:
        """The options of the train step these settings describe.

        Returns:
            The `TrainOptions`.
        """
        warmup = self.warmup_steps
        if warmup is None:
            warmup = min(self.steps - 1, self.steps // 10)
        return TrainOptions(steps=self.steps, learning_rate=self.learning_rate,
                            warmup_steps=warmup, distill_weight=self.distill_weight,
                            compute_dtype=self.compute_dtype,
                            trainable=TRAIN_ALL if self.lora_rank is None else LORA_TRAINABLE)


@dataclasses.dataclass
class TrainedModel:
    """What `train_recipe` returns.

    `params` hold integer weights (fake-quant leaves converted, adapters merged if asked)
    when `finished`; a run ended early by `stop_after` returns its trainable form
    unconverted, and its checkpoint holds the state to resume from.

    Example:
        >>> trained = train_recipe(loaded, "w4", ids, TrainSettings(steps=100))  # doctest: +SKIP
        >>> trained.loss_first, trained.loss_last  # doctest: +SKIP
        (3.1, 2.4)
        >>> trained.save("smol-w4-qat")  # doctest: +SKIP
    """

    config: ModelConfig  # after the recipe
    params: Any
    tokenizer: Any
    source: str  # the loaded model it was trained from
    recipe: dict[str, Any] | None  # the recipe (not its trainable form), as saved
    meta: dict[str, Any]  # the run's settings, saved as the artifact's extra["trained"]
    history: list[dict[str, float]]  # per step: loss, lm_loss, grad_norm, step, step_s, …
    resumed_from: int  # the step a checkpoint resumed from (0: from the start)
    finished: bool
    train_seconds: float  # wall time of the training loop (compilation included)
    checkpoint_dir: Path | None = None

    @property
    def steps_done(self) -> int:
        """The last step run (the resumed-from step if none ran)."""
        return int(self.history[-1]["step"]) if self.history else self.resumed_from

    @property
    def loss_first(self) -> float | None:
        """The first step's loss, or None."""
        return self.history[0]["loss"] if self.history else None

    @property
    def loss_last(self) -> float | None:
        """The last step's loss, or None."""
        return self.history[-1]["loss"] if self.history else None

    @property
    def step_seconds(self) -> float:
        """Median seconds of a step, the first (compiling) one left out."""
        return float(np.median([h["step_s"] for h in self.history[1:]] or [0.0]))

    def save(self, directory: str | Path) -> Path:
        """Write the integer artifact to `directory` (atomically), then remove the
        checkpoint: the run is complete.

        Args:
            directory: the artifact directory.

        Returns:
            The artifact's path.

        Raises:
            ValueError: the run has not finished (resume it first).
        """
        from jaxopt_llm.io.artifact import save_artifact

        if not self.finished:
            raise ValueError(f"training stopped at step {self.steps_done} of "
                             f"{self.meta['steps']}; resume it before saving")
        path = save_artifact(directory, config=self.config, params=self.params,
                             tokenizer=self.tokenizer, recipe=self.recipe,
                             extra={"source": self.source, "trained": self.meta})
        if self.checkpoint_dir is not None:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        return path


def training_ids(tokenizer: Any, text: str | None = None) -> np.ndarray:
    """Token ids to train on: `text`, or the embedded pydoc text without its first
    EVAL_TOKENS tokens (never train on the evaluation tokens).

    Args:
        tokenizer: the model's tokenizer.
        text: the training text, or None for the default.

    Returns:
        int32 token ids.

    Example:
        >>> ids = training_ids(load_model("smollm2-135m").tokenizer)  # doctest: +SKIP
    """
    from jaxopt_llm.data import pydoc_text

    ids = np.asarray(tokenizer.encode(pydoc_text() if text is None else text), np.int32)
    return ids[EVAL_TOKENS:] if text is None else ids


def _log_until_checkpoint(log_path: str | Path | None,
                          checkpoint_dir: Path) -> list[dict[str, float]]:
    """On resume: the log's records up to the checkpoint's step, the rest (steps run after
    it before the interruption, about to be run again) cut off, the file rewritten
    atomically. Returns the kept records (the history before the resumed steps)."""
    if log_path is None or not Path(log_path).is_file():
        return []
    step = json.loads((checkpoint_dir / "meta.json").read_text()).get("step", 0)
    kept = []
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] <= step:
            kept.append(record)
    tmp = Path(log_path).with_name(f".{Path(log_path).name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, log_path)
    return kept


def _trainable_form(loaded: LoadedModel, recipe: Recipe | None, settings: TrainSettings,
                    calibration: Any):
    """(config, params, prune schedules) to start training from."""
    config, params, schedules = loaded.config, loaded.params, []
    if recipe is not None:
        if settings.lora_rank is not None:  # QLoRA: the real weights, frozen, under adapters
            form, targets = recipe, []
        else:
            form, targets = qat_recipe(recipe, learn_scale=settings.learn_scale), []
            if settings.gradual:
                form, targets = gradual_recipe(form, settings.steps)
        if form.needs_calibration and calibration is None:
            from jaxopt_llm.calibration import default_calibration

            calibration = default_calibration(loaded.tokenizer)
        config, params = form(loaded.config, loaded.params,
                              calibration=calibration if form.needs_calibration else None)
        if form.needs_calibration and settings.lora_rank is None:
            params = trainable_quantized(params)
        if targets:
            schedules = prune_schedules(form, targets, params)
    if settings.lora_rank is not None:
        params = add_lora(params, BLOCK_LINEARS, rank=settings.lora_rank)
    return config, params, schedules


def train_recipe(loaded: LoadedModel, recipe: Recipe | str | None, token_ids: np.ndarray,
                 settings: TrainSettings | None = None, *,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 50,
                 log_path: str | Path | None = None, stop_after: int | None = None,
                 placement: Placement | None = None,
                 on_step: Callable[[int, dict[str, float]], None] | None = None,
                 calibration: Any = None) -> TrainedModel:
    """Train `loaded` through `recipe` on `token_ids`.

    Args:
        loaded: the model to train; with distillation it is also the teacher.
        recipe: a Recipe, a built-in name or recipe file, or None (train the model as is).
        token_ids: the training tokens (see `training_ids`).
        settings: what to train and how (default: `TrainSettings()`).
        checkpoint_dir: where to checkpoint; a checkpoint already there (same run
            settings) is resumed from, and appended to `log_path`.
        checkpoint_every: steps between checkpoints (0: never).
        log_path: a JSON-lines file receiving one record per step.
        stop_after: end after this step, as an interruption would (tests).
        placement: where to train (default: one device; `Placement.on_mesh(mesh, rules)`
            for data and tensor parallelism).
        on_step: called with (step, record) after every step.
        calibration: a `calibration.Calibration` for a calibrated recipe (GPTQ, AWQ,
            SmoothQuant); None: `default_calibration` (the text after the evaluation tokens).

    Returns:
        A TrainedModel; call `.save(directory)` to write the integer artifact.

    Raises:
        ParameterError: a recipe-less run asks for gradual pruning or learned scales, or
            `settings.seq` does not fit the model or the tokens.

    Example:
        >>> import jaxopt_llm as jl
        >>> m = jl.load_model("smollm2-135m")  # doctest: +SKIP
        >>> trained = jl.train_recipe(m, "w4", jl.training_ids(m.tokenizer),  # doctest: +SKIP
        ...                           jl.TrainSettings(steps=100, distill_weight=1.0))
        >>> trained.save("smol-w4-qat")  # doctest: +SKIP
    """
    from jaxopt_llm.recipes import load_recipe

    settings = TrainSettings() if settings is None else settings
    if recipe is not None:
        recipe = load_recipe(recipe)
    elif settings.gradual or settings.learn_scale:
        raise ParameterError("recipe", None, "gradual pruning and learned scales need a recipe")
    token_ids = np.asarray(token_ids, np.int32)
    check_data(token_ids, settings.batch, settings.seq, loaded.config.max_position_embeddings)
    options = settings.train_options()
    # an encoder has no next-token loss: it always trains by distilling its float self's
    # hidden states (`step.hidden_mse`), whatever distill_weight says
    distills = bool(settings.distill_weight) or loaded.config.is_encoder
    config, params, schedules = _trainable_form(loaded, recipe, settings, calibration)
    meta = {"model": loaded.source, "recipe": recipe.to_dict() if recipe else None,
            "steps": settings.steps, "batch": settings.batch, "seq": settings.seq,
            "lr": settings.learning_rate,
            "distill": "hidden_mse" if loaded.config.is_encoder else settings.distill_weight,
            "compute": settings.compute_dtype, "learn_scale": settings.learn_scale,
            "gradual": settings.gradual, "lora": settings.lora_rank,
            "text_tokens": int(len(token_ids))}
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if checkpoint_dir is not None:  # a crash mid-swap: the last checkpoint comes back
        atomic.clean_stale(checkpoint_dir)
    resume = checkpoint_dir is not None and (checkpoint_dir / "meta.json").exists()
    earlier = _log_until_checkpoint(log_path, checkpoint_dir) if resume else []
    log = None if log_path is None else Path(log_path).open("a" if resume else "w")

    def step_done(step: int, record: dict[str, float]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if on_step is not None:
            on_step(step, record)

    began = time.perf_counter()
    try:
        result = run_training(config, params, options, token_ids, batch=settings.batch,
                              seq=settings.seq, seed=settings.seed,
                              teacher=loaded.params if distills else None,
                              checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                              meta=meta, resume=resume, stop_after=stop_after,
                              prune_schedules=schedules, placement=placement,
                              on_step=step_done)
    finally:
        if log is not None:
            log.close()
    seconds = time.perf_counter() - began
    history = earlier + result.history  # step 1 onwards when the log was kept
    done = int(history[-1]["step"]) if history else result.resumed_from
    finished = done >= settings.steps  # not when stop_after ended the run early
    final = result.params
    if finished:  # to host: the integer weights are computed and saved from whole arrays
        final = convert(jax.tree_util.tree_map((placement or Placement.single()).gather, final))
        if recipe is not None and settings.lora_rank is None:
            final = with_activation_bits(recipe, final)
        if settings.merge_lora:
            final = merge_lora(final)
    return TrainedModel(config=config, params=final, tokenizer=loaded.tokenizer,
                        source=loaded.source, recipe=recipe.to_dict() if recipe else None,
                        meta=meta, history=history, resumed_from=result.resumed_from,
                        finished=finished, train_seconds=seconds, checkpoint_dir=checkpoint_dir)


__all__ = ["TrainSettings", "TrainedModel", "train_recipe", "training_ids"]
