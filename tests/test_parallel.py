"""Sharded execution on 8 fake CPU devices (conftest sets the XLA flag before JAX starts):
every mesh shape × weight form computes what one device computes, with the planned layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxopt_llm.evaluate import perplexity
from jaxopt_llm.generation import compiled_program_count, generate
from jaxopt_llm.models import ModelConfig, build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.parallel import (
    check_mesh,
    make_mesh,
    param_specs,
    parse_mesh,
    parse_shard_rule,
    shard_params,
)
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.tree import flatten
from jaxopt_llm.weights import LowRankWeight, NMSparseWeight, QuantizedWeight

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=256, hidden_size=64,
                     intermediate_size=256, num_layers=2, num_heads=16, num_kv_heads=8,
                     head_dim=8, max_position_embeddings=128, bos_token_id=1, eos_token_ids=(2,))
MESHES = ["data=8,model=1", "data=1,model=8", "data=2,model=4", "data=4,model=2"]
RECIPES = ["fp32", "w8", "w4g128", "nm-2:4", "svd-20"]
# The float model on every mesh shape; every weight form on the mesh that splits both axes
# (data=2,model=4: each leaf's rows or columns in four), and on model=8 for the forms whose
# groups, N:M blocks or ranks the finest split cuts; ScaledInputWeight (AWQ's kept scales)
# on the two meshes that split it: rows and columns. A form's layout does not depend on the
# data axis, which the float cases cover.
CASES = ([(mesh, "fp32") for mesh in MESHES]
         + [("data=2,model=4", recipe) for recipe in RECIPES[1:]]
         + [("data=1,model=8", recipe) for recipe in ("w4g128", "nm-2:4", "svd-20")]
         + [("data=1,model=8", "w4g128-awq"), ("data=2,model=4", "w4g128-awq")])


def setup_module():
    assert jax.device_count() >= 8, "tests/conftest.py must set 8 fake CPU devices"


def _params(config=CONFIG, seed=0):
    tokens = jnp.zeros((1, 4), jnp.int32)
    mask = attention_mask(jnp.ones((1, 4), bool), 0, 4)
    params = build_model(config).init(jax.random.key(seed), tokens, tokens, mask)["params"]
    # scale up the random weights so logits differ clearly between tokens
    return jax.tree_util.tree_map(lambda a: a * 3.0 if a.ndim == 2 else a, params)


_RECIPE_CACHE = {}


def _model(recipe):
    if recipe not in _RECIPE_CACHE:
        from jaxopt_llm.calibration import Calibration

        windows = np.random.default_rng(1).integers(3, 256, (4, 32))
        # Built-in recipes compute in float32 (the default), so the layouts are what is
        # under test here.
        _RECIPE_CACHE[recipe] = load_recipe(recipe)(CONFIG, _params(),
                                                   calibration=Calibration(windows=windows))
    return _RECIPE_CACHE[recipe]


@jax.jit
def _forward_fn(params, tokens):
    return build_model(CONFIG).apply({"params": params}, tokens,
                                     jnp.broadcast_to(jnp.arange(tokens.shape[1]),
                                                      tokens.shape),
                                     attention_mask(jnp.ones(tokens.shape, bool), 0,
                                                    tokens.shape[1]))[0]


def _assert_sharded_forward_matches(config, params, mesh, tokens):
    """Logits of `config` on the mesh (params by the rules) equal one device's."""
    model = build_model(config)
    tokens = jnp.asarray(tokens)
    length = tokens.shape[1]

    @jax.jit
    def forward(p, t):
        return model.apply({"params": p}, t, jnp.broadcast_to(jnp.arange(length), t.shape),
                           attention_mask(jnp.ones(t.shape, bool), 0, length))[0]

    expected = np.asarray(forward(params, tokens))
    got = np.asarray(forward(shard_params(config, params, mesh), tokens))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


TOKENS = np.random.default_rng(0).integers(3, 256, (8, 24)).astype(np.int32)


@pytest.mark.parametrize(("mesh_spec", "recipe"), CASES)
def test_sharded_forward_and_generation_equal_one_device(mesh_spec, recipe):
    config, params = _model(recipe)
    mesh = make_mesh(mesh_spec)
    sharded = shard_params(config, params, mesh)
    # every array sits where the rules put it
    specs = param_specs(config, params, mesh)
    for array, spec in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(
            specs, is_leaf=lambda x: isinstance(x, P)), strict=True):
        assert array.sharding.spec == spec and array.sharding.mesh.shape == mesh.shape
    expected = np.asarray(_forward_fn(params, jnp.asarray(TOKENS)))
    tokens = jax.device_put(TOKENS, jax.sharding.NamedSharding(mesh, P("data", None)))
    got = np.asarray(_forward_fn(sharded, tokens))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    prompts = [list(TOKENS[i, : 5 + i]) for i in range(3)]  # 3 prompts: padded to data
    single = generate(config, params, prompts, max_new_tokens=6, eos_token_ids=(-1,))
    before = compiled_program_count()
    on_mesh = generate(config, sharded, prompts, max_new_tokens=6, eos_token_ids=(-1,),
                       mesh=mesh)
    assert on_mesh.new_ids == single.new_ids
    again = generate(config, sharded, prompts, max_new_tokens=6, eos_token_ids=(-1,),
                     mesh=mesh)
    assert again.new_ids == single.new_ids
    assert compiled_program_count() == before + 1  # one prefill+decode pair, reused


def test_layouts_per_weight_form():
    mesh = make_mesh("data=2,model=4")
    expect = {
        "fp32": {"layers_0/attn/q_proj/kernel": P(None, "model"),
                 "layers_0/attn/o_proj/kernel": P("model"),
                 "embed_tokens/embedding": P("model"),
                 "layers_0/input_norm/scale": P()},
    }
    specs = flatten(param_specs(CONFIG, _params(), mesh))
    for path, spec in expect["fp32"].items():
        assert specs[path] == spec, path
    config, params = _model("w4g128")
    specs = flatten(param_specs(config, params, mesh))
    up, down = specs["layers_0/mlp/up_proj/kernel"], specs["layers_0/mlp/down_proj/kernel"]
    assert isinstance(up, QuantizedWeight)
    assert up.qvalue == P(None, "model") and up.scale == P(None, "model")
    # down: K=256 packed to 128 bytes of codes, two groups of 128 → split over model=4:
    # codes by whole bytes, group scales replicated (2 groups do not split 4 ways)
    assert down.qvalue == P("model") and down.scale == P() and down.zero_point == P()
    config, params = _model("svd-20")
    specs = flatten(param_specs(config, params, mesh))
    low = specs["layers_0/mlp/up_proj/kernel"]
    assert isinstance(low, LowRankWeight)
    assert low.u == P() and low.v == P(None, "model")  # column: u replicated, v local
    low = specs["layers_0/mlp/down_proj/kernel"]
    assert low.u == P("model") and low.v == P()  # row: one all-reduce of the rank-r act
    config, params = _model("nm-2:4")
    nm = flatten(param_specs(config, params, mesh))["layers_0/mlp/down_proj/kernel"]
    assert isinstance(nm, NMSparseWeight) and nm.values == P("model")


def test_data_parallel_perplexity_equals_one_device():
    ids = np.random.default_rng(3).integers(3, 256, 32 * 12).astype(np.int32)
    mesh = make_mesh("data=4,model=2")
    single = perplexity(CONFIG, _params(), ids, num_tokens=len(ids), window=32, batch_size=2)
    sharded = perplexity(CONFIG, shard_params(CONFIG, _params(), mesh), ids,
                         num_tokens=len(ids), window=32, batch_size=2, mesh=mesh)
    assert sharded.tokens_scored == single.tokens_scored
    np.testing.assert_allclose(sharded.nll_sum, single.nll_sum, rtol=1e-5)


def test_gpt2_rules_shard_the_fused_projection():
    config = ModelConfig(family="gpt2", model_type="gpt2", vocab_size=256, hidden_size=64,
                         intermediate_size=256, num_layers=1, num_heads=8, num_kv_heads=8,
                         head_dim=8, max_position_embeddings=64, norm_eps=1e-5)
    params = _params(config)
    mesh = make_mesh("data=2,model=4")
    specs = flatten(param_specs(config, params, mesh))
    assert specs["h_0/attn/c_attn/kernel"] == P(None, "model")
    assert specs["h_0/attn/c_attn/bias"] == P("model")
    assert specs["h_0/mlp/c_proj/kernel"] == P("model")
    assert specs["h_0/mlp/c_proj/bias"] == P()
    assert specs["wte/embedding"] == P("model") and specs["wpe/embedding"] == P()
    _assert_sharded_forward_matches(config, params, mesh, TOKENS[:2, :16])


def test_user_rules_override_the_defaults():
    mesh = make_mesh("data=1,model=4")
    rules = [parse_shard_rule("embed_tokens/embedding=replicated"),
             parse_shard_rule(r".*/mlp/up_proj/kernel=row")]
    specs = flatten(param_specs(CONFIG, _params(), mesh, rules))
    assert specs["embed_tokens/embedding"] == P()
    assert specs["layers_1/mlp/up_proj/kernel"] == P("model")


def test_user_shard_rule_that_selects_nothing_is_an_error():
    mesh = make_mesh("data=1,model=4")
    typo = [parse_shard_rule("embed_tokenz/embedding=replicated")]
    with pytest.raises(ValueError, match=r"shard rules: rule 0 \(match 'embed_tokenz/embedding', "
                                         r"op 'replicated'\) matches no parameter"):
        param_specs(CONFIG, _params(), mesh, typo)
    with pytest.raises(ValueError, match="embed_tokenz/embedding"):
        shard_params(CONFIG, _params(), mesh, typo)
    shadowed = [parse_shard_rule(".*/mlp/.*=replicated"),
                parse_shard_rule("layers_0/mlp/up_proj/kernel=row")]
    with pytest.raises(ValueError, match=r"shard rules: rule 1 \(match "
                                         r"'layers_0/mlp/up_proj/kernel', op 'row'\) selects "
                                         r"nothing: every parameter it matches"):
        param_specs(CONFIG, _params(), mesh, shadowed)


def test_mesh_parsing():
    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert parse_mesh("model=2") == {"data": 1, "model": 2}
    mesh = make_mesh("data=2,model=2")
    assert mesh.shape == {"data": 2, "model": 2}
    assert list(mesh.devices.flat) == jax.devices()[:4]


@pytest.mark.parametrize(("spec", "message"), [
    ("data=2,model", "expected axis=size pairs"),
    ("data=2,pipe=2", "unknown axis ['pipe']"),
    ("data=0", "data must be a positive integer"),
    ("data=2,data=2", "axis 'data' given twice"),
    ("data=4,model=4", "needs 16 devices, 8 available"),
])
def test_bad_meshes(spec, message):
    with pytest.raises(ValueError, match=__import__("re").escape(f"spec={spec!r}: {message}")):
        make_mesh(spec)


def test_impossible_model_axis_gets_an_actionable_error():
    config = ModelConfig(family="llama", model_type="llama", vocab_size=96, hidden_size=36,
                         intermediate_size=96, num_layers=1, num_heads=6, num_kv_heads=3,
                         head_dim=6, max_position_embeddings=64)
    with pytest.raises(ValueError, match="num_kv_heads=3 is not divisible by model=2; "
                                         "use model=1 or 3"):
        check_mesh(config, make_mesh("model=2"))
    with pytest.raises(ValueError, match="vocab_size=256 is not divisible by model=3"):
        check_mesh(CONFIG.__class__(**{**CONFIG.__dict__, "num_heads": 3, "num_kv_heads": 3,
                                       "head_dim": 8, "intermediate_size": 96}),
                   make_mesh("model=3"))
    with pytest.raises(ValueError, match="batch=3 is not divisible by data=2"):
        check_mesh(CONFIG, make_mesh("data=2"), batch=3)
    with pytest.raises(ValueError, match="layout must be one of"):
        parse_shard_rule("embed_tokens/embedding=diagonal")


@pytest.mark.parametrize(("recipe", "mesh_spec"), [("w4g128", "data=2,model=4"),
                                                   ("magnitude-50", "data=4,model=2")])
def test_sharded_training_equals_one_device_and_compiles_once(recipe, mesh_spec, tmp_path):
    from jaxopt_llm.train import (
        TrainOptions,
        gradual_recipe,
        prune_schedules,
        qat_recipe,
        run_training,
    )

    trainable = qat_recipe(load_recipe(recipe), learn_scale=True)
    targets = []
    if recipe.startswith("magnitude"):
        trainable, targets = gradual_recipe(trainable, 6)
    config, params = trainable(CONFIG, _params())
    schedules = prune_schedules(trainable, targets, params) if targets else []
    ids = np.random.default_rng(5).integers(3, 256, 2000).astype(np.int32)
    options = TrainOptions(steps=6, learning_rate=1e-3, distill_weight=0.5)
    common = dict(batch=4, seq=16, teacher=_params(), prune_schedules=schedules,
                  meta={"recipe": recipe})
    single = run_training(config, params, options, ids, **common)
    mesh = make_mesh(mesh_spec)
    sharded = run_training(config, params, options, ids, mesh=mesh, **common)
    # the first steps agree to float rounding; later, a fake-quant code that the two
    # reduction orders round to different sides (the int8 token table's too) moves the
    # loss by up to ~5e-5 relative
    losses = [h["loss"] for h in sharded.history], [h["loss"] for h in single.history]
    np.testing.assert_allclose(losses[0][:3], losses[1][:3], rtol=2e-5)
    np.testing.assert_allclose(*losses, rtol=1e-4)
    # Adam normalises gradients, so float-rounding differences in near-zero gradients may
    # move a weight differently, by at most the step size (lr) per step; here one step's
    for a, b in zip(jax.tree_util.tree_leaves(sharded.params),
                    jax.tree_util.tree_leaves(single.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                   atol=options.learning_rate)
    q = flatten(sharded.params)["layers_0/attn/q_proj/kernel"]
    assert q.w.sharding.spec == P(None, "model")
    # an interrupted sharded run resumes on the mesh and ends where the straight one did
    ckpt = tmp_path / "ckpt"
    run_training(config, params, options, ids, mesh=mesh, checkpoint_dir=ckpt,
                 checkpoint_every=2, stop_after=3, **common)
    resumed = run_training(config, params, options, ids, mesh=mesh, checkpoint_dir=ckpt,
                           checkpoint_every=2, resume=True, **common)
    assert resumed.resumed_from == 2
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params),
                    jax.tree_util.tree_leaves(sharded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_train_step_does_not_recompile(count_compiles):
    from jaxopt_llm.parallel import batch_sharding
    from jaxopt_llm.train import TrainOptions, make_trainer, qat_recipe

    mesh = make_mesh("data=2,model=4")
    config, params = qat_recipe(load_recipe("w4"))(CONFIG, _params())
    params = shard_params(config, params, mesh)
    trainer, frozen = make_trainer(config, params, TrainOptions(steps=4))
    state = trainer.init(params)
    tokens = jax.device_put(TOKENS[:4, :16], batch_sharding(mesh))
    compiled = trainer.step.lower(state, frozen, tokens).compile()
    state = jax.device_put(state, compiled.output_shardings[0])
    with count_compiles() as compiles:
        for _ in range(3):
            state, _ = trainer.step(state, frozen, tokens)
    assert compiles["step"] == 1


def test_structurally_pruned_models_are_checked_against_the_mesh_again():
    from jaxopt_llm.pipeline import Recipe, Stage
    from jaxopt_llm.recipes import MLP
    from jaxopt_llm.rules import rule

    recipe = Recipe(name="mlp-10", stages=(Stage(name="prune", rules=(
        rule(MLP, "prune_neurons", fraction=0.1),)),))
    config, params = recipe(CONFIG, _params())
    assert config.intermediate_size == 230  # 256 − round(25.6)
    with pytest.raises(ValueError, match="intermediate_size=230 is not divisible by model=4; "
                                         "use model=1 or 2"):
        shard_params(config, params, make_mesh("model=4"))
    mesh = make_mesh("data=4,model=2")
    _assert_sharded_forward_matches(config, params, mesh, TOKENS[:4, :16])
