"""Training as a library: one jit-compiled step over any weight representation (`step`),
the loop with checkpoints and resume (`loop`), quantization-aware recipes and their
conversion to integers (`qat`), gradual pruning schedules (`schedule`), and the whole
recipe-training workflow behind `jaxopt-llm train` (`workflow.train_recipe`).
"""

from jaxopt_llm.train.loop import (
    EVAL_TOKENS,
    LORA_TRAINABLE,
    TrainResult,
    batch_at,
    check_data,
    load_checkpoint,
    run_training,
    save_checkpoint,
)
from jaxopt_llm.train.qat import (
    convert,
    convert_leaf,
    qat_recipe,
    trainable_leaf,
    trainable_quantized,
    with_activation_bits,
)
from jaxopt_llm.train.schedule import (
    PruneSchedule,
    gradual_recipe,
    polynomial_sparsity,
    prune_schedules,
    reprune,
)
from jaxopt_llm.train.step import (
    COMPUTE_DTYPES,
    TRAIN_ALL,
    Trainer,
    TrainOptions,
    TrainState,
    cast_for_compute,
    default_optimizer,
    distill_kl,
    lm_loss,
    make_trainer,
    merge,
    split,
    trainable_mask,
)
from jaxopt_llm.train.workflow import TrainedModel, TrainSettings, train_recipe, training_ids

__all__ = [
    "COMPUTE_DTYPES",
    "EVAL_TOKENS",
    "LORA_TRAINABLE",
    "PruneSchedule",
    "TRAIN_ALL",
    "TrainOptions",
    "TrainResult",
    "TrainSettings",
    "TrainState",
    "TrainedModel",
    "Trainer",
    "batch_at",
    "cast_for_compute",
    "check_data",
    "convert",
    "convert_leaf",
    "default_optimizer",
    "distill_kl",
    "gradual_recipe",
    "lm_loss",
    "load_checkpoint",
    "make_trainer",
    "merge",
    "polynomial_sparsity",
    "prune_schedules",
    "qat_recipe",
    "reprune",
    "run_training",
    "save_checkpoint",
    "split",
    "train_recipe",
    "trainable_mask",
    "trainable_leaf",
    "trainable_quantized",
    "training_ids",
    "with_activation_bits",
]
