"""One jit-compiled training step over any parameter representation.

The parameter tree may hold typed leaves: `FakeQuantWeight` (quantization-aware
training with a straight-through gradient, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", Jacob et al., 2018),
`MaskedWeight` (pruned entries stay exactly zero: their derivative is masked, so their
gradient is zero, AdamW's decay keeps a zero at zero, and each update is projected back
onto the mask) or `LowRankWeight`.
What trains is chosen by path rules on the flattened arrays ("…/kernel/w" is a fake-
quantized master weight, "…/kernel/u" a low-rank factor); integer arrays (codes,
masks) never train. The step computes the causal-LM loss, optionally mixed with a
distillation KL against a teacher's logits ("Distilling the Knowledge in a Neural
Network", Hinton et al., 2015). An encoder (BERT) has no next-token loss: it trains by
distillation only, the mean squared error between its last hidden states and a teacher's
(TinyBERT's hidden-state loss, "TinyBERT: Distilling BERT for Natural Language
Understanding", Jiao et al., 2020). The step applies any optax optimizer (AdamW with warmup +
cosine decay and global-norm clipping by default; gradient accumulation with
optax.MultiSteps).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_llm.models import ModelConfig
from jaxopt_llm.models import forward as model_forward
from jaxopt_llm.weights import MaskedWeight, is_weight_leaf

# Every floating array of the model trains by default (norms included).
TRAIN_ALL = r".*"
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """What one training run does (the step's settings; `TrainSettings` builds them for
    `train_recipe`).

    Attributes:
        steps: micro-batch steps (optimizer updates × accumulation).
        learning_rate: peak AdamW learning rate.
        warmup_steps: linear warmup steps, then cosine decay to 0 at `steps`.
        weight_decay: AdamW's decoupled weight decay.
        clip_norm: global-norm gradient clipping (None: off).
        accumulation: micro-batches per optimizer update.
        trainable: regex (`re.fullmatch`) on "/"-joined array paths of what trains
            (typed leaves flattened: "…/kernel/w", "…/kernel/a"); integer arrays never do.
        distill_weight: 0: LM loss only; 1: KL to the teacher only.
        distill_temperature: the KL's softmax temperature T (the loss is scaled by T²).
        compute_dtype: "float32" or "bfloat16" matmuls (master weights stay float32).

    Example:
        >>> TrainOptions(steps=100, warmup_steps=10).trainable
        '.*'
    """
    steps: int
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    accumulation: int = 1  # micro-batches per optimizer update
    trainable: str = TRAIN_ALL  # regex (re.fullmatch) on "/"-joined array paths
    distill_weight: float = 0.0  # 0: LM loss only; 1: KL to the teacher only
    distill_temperature: float = 1.0
    # "bfloat16": the forward/backward matmuls run in bf16 on f32 master weights (norm
    # scales and LSQ step sizes stay f32; the loss is computed in f32).
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("steps", "accumulation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), "
                             f"got {self.warmup_steps}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {self.clip_norm}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be positive, got "
                             f"{self.distill_temperature}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, "
                             f"got {self.compute_dtype!r}")
        try:
            re.compile(self.trainable)
        except re.error as err:
            raise ValueError(f"trainable {self.trainable!r} is not a valid regex: {err}") from None


def default_optimizer(options: TrainOptions) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay, global-norm clipping, accumulation.

    Args:
        options: the run's `TrainOptions`.

    Returns:
        The optax transformation.

    Example:
        >>> import jax.numpy as jnp
        >>> optimizer = default_optimizer(TrainOptions(steps=10))
        >>> state = optimizer.init({"w": jnp.zeros(3)})
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if options.warmup_steps else options.learning_rate,
        peak_value=options.learning_rate, warmup_steps=options.warmup_steps,
        decay_steps=options.steps, end_value=options.learning_rate * 0.1)
    parts = [optax.clip_by_global_norm(options.clip_norm)] if options.clip_norm else []
    parts.append(optax.adamw(schedule, weight_decay=options.weight_decay))
    optimizer = optax.chain(*parts)
    if options.accumulation > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=options.accumulation)
    return optimizer


def _array_path(path: tuple) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", None) or getattr(key, "name", None)
        parts.append(str(name if name is not None else getattr(key, "idx", key)))
    return "/".join(parts)


def trainable_mask(params: Any, pattern: str) -> Any:
    """Bool per array of `params` (typed leaves flattened into their children).

    Args:
        params: the parameter tree.
        pattern: a regex `re.fullmatch`ed against each array's "/"-joined path.

    Returns:
        A tree of bools like `params`: True for floating arrays the pattern matches.

    Example:
        >>> import jax.numpy as jnp
        >>> trainable_mask({"a": jnp.zeros(2), "b": jnp.zeros(2, jnp.int8)}, ".*")
        {'a': True, 'b': False}
    """
    def decide(path, leaf):
        return bool(jnp.issubdtype(leaf.dtype, jnp.floating)
                    and re.fullmatch(pattern, _array_path(path)))

    return jax.tree_util.tree_map_with_path(decide, params)


def split(params: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen) trees with None where the other one holds the array.

    Args:
        params: the parameter tree.
        mask: `trainable_mask(params, …)`.

    Returns:
        (trainable, frozen); `merge` puts them back together.

    Example:
        >>> split({"a": 1.0, "b": 2.0}, {"a": True, "b": False})
        ({'a': 1.0, 'b': None}, {'a': None, 'b': 2.0})
    """
    trainable = jax.tree_util.tree_map(lambda m, a: a if m else None, mask, params)
    frozen = jax.tree_util.tree_map(lambda m, a: None if m else a, mask, params)
    return trainable, frozen


def merge(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split`: each array from whichever tree holds it.

    Args:
        trainable: the trainable tree (None where frozen).
        frozen: the frozen tree (None where trainable).

    Returns:
        The full parameter tree.

    Example:
        >>> merge({"a": 1.0, "b": None}, {"a": None, "b": 2.0})
        {'a': 1.0, 'b': 2.0}
    """
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen,
                                  is_leaf=lambda x: x is None)


def _enforce_masks(trainable: Any, frozen: Any) -> Any:
    """Project pruned entries of every MaskedWeight back to exactly zero after an update
    (Adam's momentum would otherwise move a weight pruned at a later schedule step)."""
    def project(leaf: Any) -> Any:
        if isinstance(leaf, MaskedWeight) and leaf.w is not None:
            return leaf.replace(w=jnp.where(leaf.dense_mask(), leaf.w,
                                            jnp.zeros((), leaf.w.dtype)))
        return leaf

    full = jax.tree_util.tree_map(project, merge(trainable, frozen), is_leaf=is_weight_leaf)
    mask = jax.tree_util.tree_map(lambda t: t is not None, trainable,
                                  is_leaf=lambda x: x is None)
    return split(full, mask)[0]


def cast_for_compute(params: Any, dtype: str) -> Any:
    """Floating arrays → `dtype`, except those named `scale` (norm scales, LSQ step
    sizes), which stay float32. The cast is differentiable: gradients reach the f32
    master weights.

    Args:
        params: the parameter tree.
        dtype: "float32" (no change) or "bfloat16".

    Returns:
        The cast tree.

    Example:
        >>> import jax.numpy as jnp
        >>> out = cast_for_compute({"kernel": jnp.ones(2), "scale": jnp.ones(2)}, "bfloat16")
        >>> out["kernel"].dtype, out["scale"].dtype
        (dtype(bfloat16), dtype('float32'))
    """
    if dtype == "float32":
        return params

    def cast(path, leaf):
        last = _array_path(path).rsplit("/", 1)[-1]
        if jnp.issubdtype(leaf.dtype, jnp.floating) and last != "scale":
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)


class TrainState(NamedTuple):
    """What the jitted step carries: the trainable arrays (None where frozen), the optimizer
    state and the int32 count of micro-batches seen.
    """
    trainable: Any  # arrays that train (None elsewhere)
    opt_state: Any
    step: jax.Array  # int32 scalar: micro-batches seen


def lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy: logits (B, T, V) predict tokens[:, 1:].

    Args:
        logits: (B, T, V) model outputs.
        tokens: (B, T) the input tokens.

    Returns:
        A float32 scalar (nats per predicted token).

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(lm_loss(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), jnp.int32))), 4)  # ln 4
        1.3863
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(nll)


def hidden_mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Mean squared difference of hidden states (B, T, H), over every element.

    Args:
        student: (B, T, H) the student's last hidden states.
        teacher: (B, T, H) the teacher's.

    Returns:
        A float32 scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> float(hidden_mse(jnp.ones((1, 2, 4)), jnp.zeros((1, 2, 4))))
        1.0
    """
    return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)))


def distill_kl(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """Mean KL(teacher ‖ student) over positions of temperature-softened distributions, ·T².

    Args:
        student: (B, T, V) student logits.
        teacher: (B, T, V) teacher logits.
        temperature: the softmax temperature T.

    Returns:
        A float32 scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> float(distill_kl(jnp.ones((1, 2, 5)), jnp.ones((1, 2, 5)), 2.0))
        0.0
    """
    log_p = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.mean(kl) * temperature**2


class Trainer(NamedTuple):
    """What `make_trainer` returns: `init(params) -> TrainState`, the jitted
    `step(state, frozen, tokens[, teacher_params]) -> (state, metrics)` and
    `params(state, frozen) -> full params`.
    """
    init: Any  # params -> TrainState
    step: Any  # (TrainState, frozen, tokens[, teacher_params]) -> (TrainState, metrics)
    params: Any  # (TrainState, frozen) -> full params


def make_trainer(config: ModelConfig, params: Any, options: TrainOptions,
                 optimizer: optax.GradientTransformation | None = None) -> tuple[Trainer, Any]:
    """A jitted train step for `config`; returns (trainer, frozen part of `params`).

    Args:
        config: the model's config.
        params: the parameter tree to train (any representation).
        options: the `TrainOptions`.
        optimizer: any optax transformation (default `default_optimizer(options)`).

    Returns:
        (Trainer, frozen): the step functions and the arrays that do not train.

    Raises:
        ValueError: the `trainable` rule selects no floating array; (from `step`) an
            encoder without teacher_params.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> config = ModelConfig.tiny()
        >>> params = init_params(config, jax.random.key(0))
        >>> trainer, frozen = make_trainer(config, params, TrainOptions(steps=2))
        >>> state, metrics = trainer.step(trainer.init(params), frozen,
        ...                               jnp.zeros((2, 8), jnp.int32))
        >>> sorted(metrics)
        ['grad_norm', 'lm_loss', 'loss']
    """
    mask = trainable_mask(params, options.trainable)
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError(f"trainable {options.trainable!r} selects no floating-point "
                         f"parameter; nothing would train")
    optimizer = optimizer or default_optimizer(options)
    _, frozen = split(params, mask)

    def forward(full, tokens):
        return model_forward(config, cast_for_compute(full, options.compute_dtype), tokens)[0]

    def loss_fn(trainable, frozen, tokens, teacher_logits):
        logits = forward(merge(trainable, frozen), tokens)
        if config.is_encoder:  # hidden states: distillation is the whole loss
            loss = hidden_mse(logits, teacher_logits)
            return loss, {"hidden_mse": loss}
        loss = lm_loss(logits, tokens)
        metrics = {"lm_loss": loss}
        if teacher_logits is not None:
            kl = distill_kl(logits, teacher_logits, options.distill_temperature)
            metrics["distill_kl"] = kl
            loss = (1 - options.distill_weight) * loss + options.distill_weight * kl
        return loss, metrics

    def init(initial_params):
        trainable, _ = split(initial_params, mask)
        return TrainState(trainable=trainable, opt_state=optimizer.init(trainable),
                          step=jnp.zeros((), jnp.int32))

    @jax.jit
    def step(state, frozen, tokens, teacher_params=None):
        if config.is_encoder and teacher_params is None:
            raise ValueError(f"an encoder ({config.model_type}) trains by distillation "
                             "only: give teacher_params (the float model)")
        teacher_logits = None
        if teacher_params is not None:  # no gradient flows into the teacher
            teacher_logits = jax.lax.stop_gradient(forward(teacher_params, tokens))
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable, frozen, tokens, teacher_logits)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts with floats
            updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = _enforce_masks(optax.apply_updates(state.trainable, updates), frozen)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(trainable, opt_state, state.step + 1), metrics

    return Trainer(init=init, step=step, params=lambda state, fz: merge(state.trainable, fz)), \
        frozen
