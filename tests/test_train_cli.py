"""`jaxopt-llm train` and the loop behind it: QAT recipes, resume = uninterrupted, errors."""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import cli
from jaxopt_llm.io.loader import load_model
from jaxopt_llm.models import ModelConfig
from jaxopt_llm.recipes import BUILTIN_RECIPES
from jaxopt_llm.train import TrainOptions, batch_at, qat_recipe, run_training
from jaxopt_llm.weights import FakeQuantWeight, QuantizedWeight

TEXT = " ".join(["hello world jax weights ."] * 400)
CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=32,
                     intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     max_position_embeddings=64, bos_token_id=1, eos_token_ids=(2,))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir(CONFIG, TEXT)


def test_qat_recipe_swaps_quantize_for_fake_quant_on_the_same_grid():
    qat = qat_recipe(BUILTIN_RECIPES["w4g128"])
    rule = qat.stages[0].rules[0]
    assert rule.op == "fake_quant"
    assert rule.option_dict == {"bits": 4, "symmetric": False, "group_size": 128,
                                "partial_groups": True}
    # N:M keeps its compressed storage: the kept values train at fixed positions
    assert qat_recipe(BUILTIN_RECIPES["nm-2:4"]).stages[0].rules[0] == \
        BUILTIN_RECIPES["nm-2:4"].stages[0].rules[0]


def test_batches_depend_only_on_the_step():
    ids = np.arange(1000)
    np.testing.assert_array_equal(batch_at(ids, 7, 4, 16), batch_at(ids, 7, 4, 16))
    assert not np.array_equal(batch_at(ids, 7, 4, 16), batch_at(ids, 8, 4, 16))


def test_resume_after_interrupt_equals_uninterrupted(model_dir, tmp_path):
    loaded = load_model(str(model_dir[0]))
    config, params = qat_recipe(BUILTIN_RECIPES["w4"])(loaded.config, loaded.params)
    ids = np.asarray(loaded.tokenizer.encode(TEXT), np.int32)
    options = TrainOptions(steps=6, learning_rate=1e-2)
    common = dict(batch=2, seq=16, meta={"recipe": "w4"})
    straight = run_training(config, params, options, ids, **common)
    ckpt = tmp_path / "ckpt"
    first = run_training(config, params, options, ids, checkpoint_dir=ckpt, checkpoint_every=2,
                         stop_after=3, **common)  # "interrupted" after step 3; saved at 2
    assert first.history[-1]["step"] == 3
    second = run_training(config, params, options, ids, checkpoint_dir=ckpt,
                          checkpoint_every=2, resume=True, **common)
    assert second.resumed_from == 2
    for a, b in zip(jax.tree_util.tree_leaves(straight.params),
                    jax.tree_util.tree_leaves(second.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="was made with another recipe"):
        run_training(config, params, options, ids, checkpoint_dir=ckpt, resume=True,
                     batch=2, seq=16, meta={"recipe": "w8"})


def test_train_command_writes_an_integer_artifact(model_dir, tmp_path, capsys):
    directory, text = model_dir
    out = tmp_path / "qat"
    code = cli.main(["train", "--model", str(directory), "--recipe", "w4", "--text", str(text),
                     "--steps", "8", "--batch", "2", "--seq", "16", "--lr", "0.01",
                     "--distill", "--out", str(out), "--json"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["steps"] == 8 and result["loss_last"] < result["loss_first"]
    assert result["step_s"] > 0
    log = [json.loads(line) for line in (tmp_path / "qat.train_log.jsonl").read_text().split("\n")
           if line]
    assert [r["step"] for r in log] == list(range(1, 9)) and "distill_kl" in log[0]
    trained = load_model(str(out))
    kernel = trained.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and not isinstance(kernel, FakeQuantWeight)
    assert trained.recipe["name"] == "w4"
    assert not (tmp_path / "qat.checkpoint").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps must be positive"),
    (["--batch", "-1"], "--batch must be positive"),
    (["--lr", "0"], "--lr must be positive"),
])
def test_bad_numbers(model_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", str(model_dir[0]), "--out", str(tmp_path / "o"), *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--seq", "100"], "--seq 100: longer than the model's context of 64 tokens"),
    (["--seq", "32", "--text", "{short}"], "--seq 32: the training text has 2 tokens, fewer "
                                           "than one sequence"),
])
def test_bad_data(model_dir, tmp_path, capsys, argv, message):
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    argv = [a.format(short=short) for a in argv]
    if "--text" not in argv:
        argv += ["--text", str(model_dir[1])]
    code = cli.main(["train", "--model", str(model_dir[0]), "--out", str(tmp_path / "o"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_prune_schedule_mask_steps_and_targets():
    from jaxopt_llm.train import PruneSchedule, polynomial_sparsity

    schedule = PruneSchedule(paths=("a",), final=0.5, start=2, end=12, every=4)
    due = {step: schedule.target(step) for step in range(20)}
    assert [s for s, t in due.items() if t is not None] == [2, 6, 10, 12]
    assert due[6] == polynomial_sparsity(6, 0.5, 2, 12) and due[12] == 0.5
    with pytest.raises(ValueError, match="every must be a positive"):
        PruneSchedule(paths=("a",), final=0.5, start=0, end=4, every=0)
    with pytest.raises(ValueError, match="final sparsity"):
        PruneSchedule(paths=("a",), final=1.0, start=0, end=4, every=1)


def _sparsity(leaf):
    keep = np.asarray(leaf.dense_mask())
    return 1.0 - keep.mean(), np.asarray(leaf.w)[~keep]


def test_gradual_pruning_resume_equals_uninterrupted(model_dir, tmp_path):
    """Masks recomputed during the run live in the checkpoint: a resumed gradual run ends
    exactly where the uninterrupted one does, at the recipe's sparsity, zeros exact."""
    from jaxopt_llm.train import gradual_recipe, prune_schedules
    from jaxopt_llm.tree import flatten

    loaded = load_model(str(model_dir[0]))
    recipe, targets = gradual_recipe(qat_recipe(BUILTIN_RECIPES["magnitude-50"]), 8)
    config, params = recipe(loaded.config, loaded.params)
    schedules = prune_schedules(recipe, targets, params)
    assert schedules[0].final == 0.5 and schedules[0].end == 6 and len(schedules[0].paths) == 14
    ids = np.asarray(loaded.tokenizer.encode(TEXT), np.int32)
    options = TrainOptions(steps=8, learning_rate=1e-2)
    common = dict(batch=2, seq=16, prune_schedules=schedules, meta={"recipe": "m50"})
    straight = run_training(config, params, options, ids, **common)
    ckpt = tmp_path / "ckpt"
    run_training(config, params, options, ids, checkpoint_dir=ckpt, checkpoint_every=4,
                 stop_after=5, **common)
    resumed = run_training(config, params, options, ids, checkpoint_dir=ckpt,
                           checkpoint_every=4, resume=True, **common)
    assert resumed.resumed_from == 4
    for a, b in zip(jax.tree_util.tree_leaves(straight.params),
                    jax.tree_util.tree_leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for path in schedules[0].paths:
        sparsity, pruned = _sparsity(flatten(straight.params)[path])
        assert sparsity == pytest.approx(0.5, abs=1e-3) and np.all(pruned == 0.0)


def _train_cli(model_dir, out, *extra):
    directory, text = model_dir
    return cli.main(["train", "--model", str(directory), "--text", str(text), "--steps", "8",
                     "--batch", "2", "--seq", "16", "--lr", "0.01", "--out", str(out),
                     "--json", *extra])


def test_train_command_gradual_pruning(model_dir, tmp_path, capsys):
    from jaxopt_llm.weights import MaskedWeight

    assert _train_cli(model_dir, tmp_path / "g", "--recipe", "magnitude-50", "--gradual",
                      "--compute", "bfloat16") == 0, capsys.readouterr().err
    trained = load_model(str(tmp_path / "g"))
    kernel = trained.params["layers_1"]["attn"]["o_proj"]["kernel"]
    assert isinstance(kernel, MaskedWeight)
    sparsity, pruned = _sparsity(kernel)
    assert sparsity == pytest.approx(0.5, abs=1e-3) and np.all(pruned == 0.0)
    assert trained.extra["trained"]["gradual"] and trained.extra["trained"]["compute"] == \
        "bfloat16"


def test_train_command_learned_scales(model_dir, tmp_path, capsys):
    assert _train_cli(model_dir, tmp_path / "l", "--recipe", "w4g128", "--learn-scale",
                      "--distill") == 0, capsys.readouterr().err
    kernel = load_model(str(tmp_path / "l")).params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and kernel.bits == 4


@pytest.mark.parametrize("merge", [False, True])
def test_train_command_lora_recovery(model_dir, tmp_path, capsys, merge):
    from jaxopt_llm.weights import LoRAWeight

    out = tmp_path / "lora"
    assert _train_cli(model_dir, out, "--recipe", "w4", "--lora", "4",
                      *(["--merge-lora"] if merge else [])) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["loss_last"] < result["loss_first"]
    trained = load_model(str(out))
    kernel = trained.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    if merge:
        assert isinstance(kernel, QuantizedWeight)
    else:
        assert isinstance(kernel, LoRAWeight) and isinstance(kernel.base, QuantizedWeight)
        assert float(jnp.abs(kernel.b).max()) > 0  # the adapter trained
    assert cli.main(["eval", "--model", str(out), "--text", str(model_dir[1]), "--tokens", "64",
                     "--window", "32", "--json"]) == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--gradual"], "--gradual and --learn-scale need a --recipe"),
    (["--recipe", "w4", "--gradual"], "has no `prune` rule to make gradual"),
    (["--recipe", "w4", "--lora", "4", "--learn-scale"], "does not combine"),
    (["--recipe", "w4", "--distill-weight", "2"], "--distill-weight must be in [0, 1]"),
    (["--recipe", "w4", "--compute", "float16"], "invalid choice"),
])
def test_bad_training_modes(model_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if message in ("invalid choice",
                                                   "--distill-weight must be in [0, 1]") \
            else contextlib.nullcontext():
        code = _train_cli(model_dir, tmp_path / "o", *argv)
        assert code == 2
    assert message in capsys.readouterr().err
