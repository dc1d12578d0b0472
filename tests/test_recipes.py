"""Built-in recipes on tiny Llama / GPT-2 models and users' own Flax models; recipe files; plans.

Every built-in is applied once per model (cached for the module) and then checked several
ways: the model runs under jit, its output equals the plain model on the materialized
weights, what it must not touch is untouched, and `plan` predicts the bytes exactly
(checked against hand-computed sizes for one kernel).
"""

from __future__ import annotations

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxopt_llm.byo import linen_apply, nnx_params, nnx_with_params
from jaxopt_llm.io.params import expected_shapes
from jaxopt_llm.models import ModelConfig, build_model
from jaxopt_llm.models.attention import attention_mask
from jaxopt_llm.pipeline import Recipe, Stage, read_recipe_file, save_recipe
from jaxopt_llm.plan import plan
from jaxopt_llm.recipes import BUILTIN_RECIPES, TABLES_INT8, load_recipe
from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.tree import flatten
from jaxopt_llm.weights import (
    LowRankWeight,
    MaskedWeight,
    NMSparseWeight,
    QuantizedWeight,
    is_weight_leaf,
    materialize,
    param_bytes,
)

BUILTIN_NAMES = ("fp32", "w8", "w8a8", "w4", "w4g128", "w3g128", "w4g32-float", "magnitude-50",
                 "nm-2:4", "heads-25", "mlp-25", "svd-20")  # recipes that need no calibration
# calibrated: tests/transforms/test_gptq_op.py, test_awq.py, test_smoothquant.py,
# test_sparse_calibrated.py
CALIBRATED_NAMES = ("w4g128-gptq", "w3g128-gptq", "w4-gptq", "w4g128-awq", "w3g128-awq",
                    "w4-awq", "w8a8-smoothquant")
CALIBRATED_PRUNING = ("wanda-50", "wanda-2:4", "sparsegpt-50", "sparsegpt-2:4",
                      "sparsegpt-2:4+w4g128-gptq")
CALIBRATED_LOW_RANK = ("asvd-20", "svdllm-20", "svdllm-40")
CALIBRATED_STRUCTURED = ("heads-25-act", "mlp-25-act")
ALL_NAMES = ("fp32", "w8", "w8a8", "w4", "w4g128", "w3g128", *CALIBRATED_NAMES, "w4g32-float",
             "magnitude-50", "nm-2:4", *CALIBRATED_PRUNING, "heads-25", "mlp-25",
             *CALIBRATED_STRUCTURED, "svd-20", *CALIBRATED_LOW_RANK)
STRUCTURED = ("heads-25", "mlp-25")
TRACEABLE = ("w8", "w8a8", "w4", "w4g128", "w3g128", "magnitude-50", "nm-2:4")  # run under jit
VOCAB, LENGTH = 64, 8

FAMILIES = ("llama", "gpt2")


@pytest.fixture(scope="module")
def configs(tiny_config):
    # hidden 128 / intermediate 256: group 128 divides every input dimension.
    wide = {"vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 256, "num_layers": 1,
            "head_dim": 32}
    return {"llama": tiny_config("llama", **wide),  # untied: has lm_head
            "gpt2": tiny_config("gpt2", **wide, tie_word_embeddings=True)}
UP_KERNEL = {"llama": "layers_0/mlp/up_proj/kernel", "gpt2": "h_0/mlp/c_fc/kernel"}  # (128, 256)
# Hand-computed bytes of a (128, 256) float32 kernel after each built-in.
UP_BYTES = {
    "fp32": 128 * 256 * 4,
    "w8": 128 * 256 + 256 * 4,  # int8 codes + float32 scale per output
    "w8a8": 128 * 256 + 256 * 4,
    "w4": 128 * 256 // 2 + 256 * 4 + 256,  # 4-bit codes + float32 scale + uint8 zero point
    "w4g128": 128 * 256 // 2 + 256 * 2 + 256,  # one group of 128: float16 scales
    "w3g128": 128 * 256 * 3 // 8 + 256 * 2 + 256,
    "w4g32-float": 128 * 256 // 2 + 4 * 256 * 2 * 2,  # 4 groups: float16 scale + float16 offset
    "magnitude-50": 128 * 256 * 4 + 128 * 256 // 8,  # dense float + 1-bit mask
    "nm-2:4": 64 * 256 * 4 + 64 * 256 * 2 // 8,  # half the values + 2-bit positions
    "svd-20": 68 * (128 + 256) * 4,  # rank floor(0.8 * 128 * 256 / 384) = 68
    "heads-25": 128 * 256 * 4,
    "mlp-25": 128 * 192 * 4,  # 64 of 256 neurons removed
}


def _inputs():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (1, LENGTH)), jnp.int32)
    positions = jnp.arange(LENGTH, dtype=jnp.int32)[None]
    return tokens, positions, attention_mask(jnp.ones((1, LENGTH), bool), 0, LENGTH)


def _random_params(init, seed=0):
    """Random float32 params with the shapes `init()` would give (no init to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray((0.1 * rng.standard_normal(s.shape)).astype(np.float32)),
        jax.eval_shape(init))


class TinyModel:
    """A family's config and random params; each built-in applied once, forwards jitted."""

    def __init__(self, family: str, config: ModelConfig, params):
        self.family = family
        self.config = config
        self.params = params
        self._forward: dict[ModelConfig, object] = {}
        self._runs: dict[str, tuple] = {}

    def forward(self, config: ModelConfig):
        if config not in self._forward:
            model = build_model(config)
            self._forward[config] = jax.jit(
                lambda p: model.apply({"params": p}, *_inputs())[0])
        return self._forward[config]

    def run(self, name: str):
        """(config, params, logits, logits of the materialized params) after built-in `name`.

        Recipes whose ops are traceable run inside the same jitted function as the model
        (one compilation); SVD and structured pruning run eagerly (numpy), the model jitted.
        """
        if name not in self._runs:
            recipe = BUILTIN_RECIPES[name]
            if name in TRACEABLE:
                model = build_model(self.config)

                def transformed(p):
                    _, out = recipe(self.config, p)
                    return out, model.apply({"params": out}, *_inputs())[0], materialize(out)

                config = self.config  # (plan checks that these recipes keep the config)
                out, logits, dense = jax.jit(transformed)(self.params)
            else:
                config, out = recipe(self.config, self.params)
                logits = self.forward(config)(out)
                dense = jax.jit(materialize)(out)
            reference = self.forward(config)(dense)  # plain arrays: one compilation per config
            self._runs[name] = (config, out, np.asarray(logits), np.asarray(reference))
        return self._runs[name]


@pytest.fixture(scope="module")
def models(configs, random_params):
    return {family: TinyModel(family, config, jax.tree.map(jnp.asarray, random_params(config)))
            for family, config in configs.items()}


# -------------------------------------------------------------------------------- built-ins


def test_builtin_names():
    assert tuple(BUILTIN_RECIPES) == ALL_NAMES
    assert [n for n in ALL_NAMES if BUILTIN_RECIPES[n].needs_calibration] == [
        n for n in ALL_NAMES
        if n in CALIBRATED_NAMES + CALIBRATED_PRUNING + CALIBRATED_LOW_RANK
        + CALIBRATED_STRUCTURED]
    for name, recipe in BUILTIN_RECIPES.items():
        assert recipe.name == name
        assert load_recipe(name) is recipe
        recipe.check()


EXPECTED_LEAF = {
    "w8": (QuantizedWeight, {"bits": 8, "symmetric": True, "act_bits": None,
                             "granularity": "channel"}),
    "w8a8": (QuantizedWeight, {"bits": 8, "symmetric": True, "act_bits": 8}),
    "w4": (QuantizedWeight, {"bits": 4, "symmetric": False, "granularity": "channel"}),
    "w4g128": (QuantizedWeight, {"bits": 4, "symmetric": False, "group_size": 128}),
    "w3g128": (QuantizedWeight, {"bits": 3, "symmetric": False, "group_size": 128}),
    "w4g32-float": (QuantizedWeight, {"bits": 4, "symmetric": False, "group_size": 32,
                                      "zero": "float"}),
    "magnitude-50": (MaskedWeight, {}),
    "nm-2:4": (NMSparseWeight, {"kept": 2, "m": 4}),
    "svd-20": (LowRankWeight, {}),
}


def _is_block_kernel(path: str) -> bool:
    return path.endswith("/kernel") and not path.startswith("lm_head/")


@pytest.mark.parametrize("name", BUILTIN_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_runs_under_jit_and_matches_materialized(models, family, name):
    model = models[family]
    config, out, logits, reference = model.run(name)
    _, _, base, _ = model.run("fp32")
    assert logits.shape == (1, LENGTH, VOCAB) and np.all(np.isfinite(logits))
    if name == "fp32":
        assert out is model.params and config == model.config
        return
    if name in STRUCTURED:
        if name == "heads-25":  # llama: 1 of 2 query heads per kv group; gpt2: 1 of 4 heads
            heads = {"llama": (2, 2), "gpt2": (3, 3)}[family]
            assert (config.num_heads, config.num_kv_heads) == heads
            assert config.intermediate_size == 256
        else:
            assert config.intermediate_size == 192
            assert (config.num_heads, config.num_kv_heads) == (4, model.config.num_kv_heads)
        shapes = {p: tuple(v.shape) for p, v in flatten(out).items()}
        assert shapes == expected_shapes(config)
        assert not np.allclose(logits, base)
        return
    assert config == model.config
    leaf_type, fields = EXPECTED_LEAF[name]
    for path, leaf in flatten(out).items():
        if _is_block_kernel(path):
            assert isinstance(leaf, leaf_type), path
            assert {k: getattr(leaf, k) for k in fields} == fields, path
    # The same model on the dequantized / densified weights: identical up to float rounding
    # (W8A8 also rounds activations to int8, per token).
    if name == "w8a8":
        assert np.max(np.abs(logits - reference)) <= 0.02 * np.max(np.abs(reference))
        assert not np.array_equal(logits, reference)
    else:
        np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits, base, rtol=0, atol=1e-6)  # the weights did change


@pytest.mark.parametrize("name", BUILTIN_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_leaves_norms_biases_embeddings_and_head_alone(models, family, name):
    """Block linears change; the token table (and an untied head) become int8 per row in
    the weight-quantizing recipes; every other embedding, norm and bias is untouched."""
    model = models[family]
    _, out, _, _ = model.run(name)
    before, after = flatten(model.params), flatten(out)
    block = re.compile(r"(layers|h)_\d+/(attn|mlp)/.*")
    tables = re.compile(TABLES_INT8.match)
    quantizing = any(r == TABLES_INT8 for s in BUILTIN_RECIPES[name].stages for r in s.rules)
    int8_tables = [p for p in before if quantizing and tables.fullmatch(p)]
    untouched = [p for p in before if not _is_block_kernel(p) and p not in int8_tables
                 and not (name in STRUCTURED and block.fullmatch(p))]
    assert any(p.endswith("scale") for p in untouched)
    if family == "llama":  # the token table and the untied head
        assert len(int8_tables) == (2 if quantizing else 0)
        assert quantizing or "lm_head/kernel" in untouched  # BLOCK_LINEARS leaves it alone
    else:
        assert len(int8_tables) == (1 if quantizing else 0)
        assert "wpe/embedding" in untouched  # positions stay float
        assert any(p.endswith("ln_1/bias") for p in untouched)
    for path in int8_tables:  # per row: one scale for each token (each head output)
        leaf, table = after[path], np.asarray(before[path])
        assert isinstance(leaf, QuantizedWeight) and leaf.bits == 8, path
        step = np.abs(table).max(axis=1 if path.endswith("embedding") else 0, keepdims=True)
        assert (np.abs(np.asarray(materialize(leaf)) - table) <= step / 254 + 1e-7).all()
    for path in untouched:
        assert isinstance(after[path], jax.Array), path
        np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]))
    if name in ("fp32", *STRUCTURED):
        assert not any(is_weight_leaf(leaf) for leaf in after.values())


@pytest.mark.parametrize("name", BUILTIN_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_predicts_the_real_run(models, family, name):
    model = models[family]
    config, out, _, _ = model.run(name)
    recipe = BUILTIN_RECIPES[name]
    result = plan(recipe, model.config, model.params)
    real = flatten(out)
    assert result.config_after == config
    assert result.bytes_before == param_bytes(model.params) == 4 * sum(
        int(np.prod(v.shape)) for v in flatten(model.params).values())
    assert result.bytes_after == param_bytes(out)
    assert param_bytes(real[UP_KERNEL[family]]) == UP_BYTES[name]
    rows = {r.path: r for r in result.rows}
    assert set(rows) == set(real)
    selected = {p for p in rows for s in recipe.stages for r in s.rules if r.matches(p)}
    for path, row in rows.items():
        assert row.bytes_after == param_bytes(real[path]), path
        assert row.shape == tuple(flatten(model.params)[path].shape)
        if path in selected:
            op = recipe.stages[0].rules[0].op
            assert (row.stage, row.op.split("(")[0]) == (recipe.stages[0].name, op), path
        else:
            assert (row.stage, row.op) == ("-", "keep"), path
    if name != "fp32":
        assert selected
    text = str(result)
    for path in rows:
        assert path in text
    assert text.splitlines()[-1].startswith(
        f"total {result.bytes_before:,} → {result.bytes_after:,} bytes (")


# ------------------------------------------------------------------------------ recipe files

CUSTOM = Recipe(
    name="custom svd + 2:4 + int4",
    description="factorize o/v, keep the down projection dense, then int4 — with ünïcode, '#', "
                "a: colon\nand a second line",
    stages=(
        Stage(name="factorize", rules=(rule(r"layers_\d+/attn/[ov]_proj/kernel", "svd", rank=4),)),
        Stage(name="prune", rules=(
            rule(r"layers_\d+/mlp/down_proj/kernel", "keep"),
            rule(r"layers_\d+/attn/[ov]_proj/kernel", "keep"),
            rule(BLOCK_LINEARS, "nm", n=2, m=4, format="masked"),
        )),
        Stage(name="yes", rules=(  # a name YAML would read as a boolean unless quoted
            rule(r"lm_head/kernel", "keep"),
            rule(r"(.*/)?embedding", "quantize", bits=8, scale_dtype="bfloat16", act_bits=None),
            rule(BLOCK_LINEARS, "quantize", bits=4, symmetric=False, group_size=64,
                 method="mse", mse_grid=20, percentile=99.5, partial_groups=True),
        )),
    ),
)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("name", [*BUILTIN_NAMES, "custom"])
def test_recipe_files_round_trip_exactly(tmp_path, name, suffix):
    recipe = CUSTOM if name == "custom" else BUILTIN_RECIPES[name]
    data = recipe.to_dict()
    assert Recipe.from_dict(data) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(data))) == recipe
    path = save_recipe(recipe, tmp_path / f"recipe{suffix}")
    assert path == tmp_path / f"recipe{suffix}"
    text = path.read_text()
    assert (json.loads(text) if suffix == ".json" else yaml.safe_load(text)) == data
    loaded = read_recipe_file(path)
    assert loaded == recipe
    assert loaded.to_dict() == data
    assert load_recipe(str(path)) == recipe
    assert list(tmp_path.iterdir()) == [path]  # the temporary file is gone


def test_custom_recipe_data_and_plan_after_loading(tmp_path, configs):
    data = CUSTOM.to_dict()
    assert data["stages"][2]["rules"][1] == {
        "match": "(.*/)?embedding", "op": "quantize",
        "options": {"act_bits": None, "bits": 8, "scale_dtype": "bfloat16"}}
    assert data["stages"][1]["rules"][0] == {"match": r"layers_\d+/mlp/down_proj/kernel",
                                             "op": "keep", "options": {}}
    assert data["stages"][0]["rules"][0]["options"] == {"rank": 4}
    loaded = read_recipe_file(save_recipe(CUSTOM, tmp_path / "custom.yaml"))
    config = dataclasses.replace(configs["llama"], hidden_size=64, intermediate_size=128,
                                 head_dim=16)
    shapes = jax.eval_shape(lambda: build_model(config).init(jax.random.PRNGKey(0),
                                                             *_inputs())["params"])
    assert plan(loaded, config, shapes) == plan(CUSTOM, config, shapes)
    rows = {r.path: r for r in plan(loaded, config, shapes).rows}
    assert rows["lm_head/kernel"].op == "keep"  # kept by every stage
    assert rows["layers_0/mlp/down_proj/kernel"].stage == "yes"  # kept only from the 2:4 stage
    assert rows["layers_0/mlp/up_proj/kernel"].representation == "QuantizedWeight"
    assert rows["lm_head/kernel"].representation == "float32"
    assert rows["layers_0/attn/q_proj/kernel"].representation == "QuantizedWeight"
    assert rows["layers_0/attn/o_proj/kernel"].representation == "LowRankWeight"
    assert rows["layers_0/attn/o_proj/kernel"].stage == "factorize → yes"
    assert rows["layers_0/attn/o_proj/kernel"].op.startswith("svd(rank=4) → quantize(")
    assert rows["layers_0/input_norm/scale"].op == "keep"


def _rules_yaml(*rules: str) -> str:
    return "name: r\nstages:\n  - name: s\n    rules:\n" + "".join(rules)


MALFORMED = [
    ("bad.yaml", "name: x\nstages:\n  - name: s\n    rules: [\n",
     r"invalid YAML at line 5 column 1: expected the node content"),
    ("tab.yml", "name: x\n\tstages: []\n",
     r"invalid YAML at line 2 column 1: found character '\\t' that cannot start any token"),
    ("bad.json", '{"name": "x", "stages": [}',
     r"invalid JSON at line 1 column 26: Expecting value"),
    ("trailing.json", '{"name": "x",\n "stages": [],\n}',
     r"invalid JSON at line 3 column 1: Expecting property name"),
    ("missing-op.yaml", _rules_yaml("      - {match: '.*kernel', op: quantize}\n",
                                    "      - {match: '.*bias'}\n"),
     r"stages\[0\]\.rules\[1\]: missing key\(s\) \['op'\]"),
    ("unknown-rule-key.yaml", _rules_yaml("      - {match: '.*', op: nm, opts: {n: 2}}\n"),
     r"stages\[0\]\.rules\[0\]: unknown key\(s\) \['opts'\]; expected \['match', 'op', "
     r"'optional', 'options'\]"),
    ("unknown-top-key.json", '{"name": "x", "stages": [], "version": 2}',
     r"unknown key\(s\) \['version'\]; expected \['description', 'name', "
     r"'stages'\]"),
    ("unknown-stage-key.yaml", "name: x\nstages:\n  - {name: s, rules: [], when: now}\n",
     r"stages\[0\]: unknown key\(s\) \['when'\]; expected \['name', 'rules'\]"),
    ("options-list.yaml", _rules_yaml("      - match: '.*'\n        op: quantize\n"
                                      "        options: [bits, 4]\n"),
     r"stages\[0\]\.rules\[0\]\.options: expected a mapping of option names to values"),
    ("stages-mapping.json", '{"name": "x", "stages": {"name": "s"}}', r"stages must be a list"),
    ("stage-string.json", '{"name": "x", "stages": [{"name": "a", "rules": [{"match": "a", '
                          '"op": "keep"}]}, "quantize"]}',
     r"stages\[1\]: expected a mapping, got str"),
    ("no-rules.yaml", "name: x\nstages:\n  - {name: s, rules: []}\n",
     r"stages\[0\]\.rules: expected a non-empty list of rules"),
    ("no-name.json", '{"stages": []}', r"missing key\(s\) \['name'\]"),
    ("bad-regex.yaml", _rules_yaml("      - {match: '(', op: quantize}\n"),
     r"stages\[0\]\.rules\[0\]: rule match '\(' is not a valid regex"),
    ("rule-string.yaml", _rules_yaml("      - quantize everything\n"),
     r"stages\[0\]\.rules\[0\]: expected a mapping, got str"),
    ("list.json", "[1, 2]", r"expected a mapping, got list"),
    ("empty.yaml", "", r"expected a mapping, got NoneType"),
    ("recipe.txt", "name: x\nstages: []\n", r"expected a \.yaml, \.yml or \.json file"),
    ("recipe.toml", 'name = "x"\n', r"expected a \.yaml, \.yml or \.json file"),
]


@pytest.mark.parametrize(("filename", "text", "message"), MALFORMED,
                         ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_files_name_file_and_location(tmp_path, filename, text, message):
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^recipe file {re.escape(str(path))}: .*{message}"):
        read_recipe_file(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "missing.yaml"
    message = rf"^recipe file {re.escape(str(path))}: no such file$"
    with pytest.raises(ValueError, match=message):
        read_recipe_file(path)
    with pytest.raises(ValueError, match=message):
        load_recipe(str(path))


def test_save_recipe_needs_a_known_extension(tmp_path):
    with pytest.raises(ValueError, match=r"recipe file .*recipe\.txt: expected a \.yaml, "
                                         r"\.yml or \.json name"):
        save_recipe(BUILTIN_RECIPES["w8"], tmp_path / "recipe.txt")
    assert list(tmp_path.iterdir()) == []


def test_json_is_valid_yaml(tmp_path):
    path = tmp_path / "w4.yaml"
    path.write_text(json.dumps(BUILTIN_RECIPES["w4"].to_dict()))
    assert read_recipe_file(path) == BUILTIN_RECIPES["w4"]


@pytest.mark.parametrize("rule_text", ["      - {match: '.*kernel', op: quantise}\n",
                                       "      - {match: '.*kernel', op: quantize, "
                                       "options: {bits: 12}}\n"], ids=["unknown-op", "bits-12"])
def test_recipe_file_option_errors_name_the_file(tmp_path, rule_text):
    path = tmp_path / "r.yaml"
    path.write_text(_rules_yaml(rule_text))
    with pytest.raises(ValueError, match=re.escape(f"recipe file {path}: stages[0].rules[0]")):
        read_recipe_file(path)


def test_load_recipe_unknown_name_lists_the_builtins():
    message = re.escape("unknown recipe 'w5'; built-in recipes: " + ", ".join(ALL_NAMES)
                        + " (or give a path to a .yaml/.json recipe file)")
    with pytest.raises(ValueError, match=f"^{message}$"):
        load_recipe("w5")
    assert load_recipe(CUSTOM) is CUSTOM
    bad = Recipe(name="bad", stages=(Stage(name="s", rules=(rule(".*", "nm", n=4, m=4),)),))
    with pytest.raises(ValueError, match=r"stage 's' rule 0: op 'nm': n:m needs 0 < n < m"):
        load_recipe(bad)


# ------------------------------------------------------------------- users' own Flax models

BYO_RECIPES = ("w8", "w4", "nm-2:4", "svd-20")
BYO_LEAF = {"w8": QuantizedWeight, "w4": QuantizedWeight, "nm-2:4": NMSparseWeight,
            "svd-20": LowRankWeight}


class UserNet(nn.Module):
    """Embed -> DenseGeneral (int features: a 2-D kernel) -> Dense -> tied head."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(32, 16)
        x = embed(ids)  # (B, T, 16)
        h = nn.gelu(nn.DenseGeneral(32)(x))  # kernel (16, 32)
        x = x + nn.Dense(16)(h)  # kernel (32, 16)
        return embed.attend(x)  # (B, T, 32)


def _ids():
    return jnp.asarray(np.random.default_rng(2).integers(0, 32, (2, 5)), jnp.int32)


def test_builtins_on_a_user_linen_model():
    model = UserNet()
    params = _random_params(lambda: model.init(jax.random.key(0), _ids())["params"])
    assert set(flatten(params)) == {"Embed_0/embedding", "DenseGeneral_0/kernel",
                                        "DenseGeneral_0/bias", "Dense_0/kernel", "Dense_0/bias"}
    plain = jax.jit(lambda p: model.apply({"params": p}, _ids()))

    def both(p):
        return linen_apply(model, {"params": p}, _ids()), model.apply(
            {"params": materialize(p)}, _ids())

    for name in BYO_RECIPES:
        recipe = BUILTIN_RECIPES[name]
        if name == "svd-20":  # numpy SVD: not traceable
            config, out = recipe(None, params)
            assert config is None
            ours, reference = jax.jit(lambda p: linen_apply(model, {"params": p}, _ids()))(out), \
                plain(materialize(out))
        else:
            out, ours, reference = jax.jit(
                lambda p, recipe=recipe: (out := recipe(None, p)[1], *both(out)))(params)
        flat, before = flatten(out), flatten(params)
        for path in ("DenseGeneral_0/kernel", "Dense_0/kernel"):
            assert isinstance(flat[path], BYO_LEAF[name]), (name, path)
        for path in ("Embed_0/embedding", "DenseGeneral_0/bias", "Dense_0/bias"):
            np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(before[path]))
        assert plan(recipe, None, params).bytes_after == param_bytes(out) < param_bytes(params)
        assert ours.shape == (2, 5, 32)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    # eagerly, outside jit, the embedding and biases are the very same arrays
    _, out = BUILTIN_RECIPES["w8"](None, params)
    assert out["Embed_0"]["embedding"] is params["Embed_0"]["embedding"]


class TupleFeatures(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral(features=(2, 8))(x)  # kernel (16, 2, 8)
        return nn.Dense(4)(h.reshape(h.shape[:-2] + (16,)))


@pytest.mark.parametrize(("name", "message"), [
    ("nm-2:4", r"pass 'prune': DenseGeneral_0/kernel has shape \(16, 2, 8\): pruning selects "
               r"2-D kernels only \(narrow the rule's match\)"),
    ("svd-20", r"pass 'factorize': DenseGeneral_0/kernel has shape \(16, 2, 8\): svd selects "
               r"2-D kernels only"),
])
def test_dense_general_with_tuple_features_is_rejected_by_pruning_and_svd(name, message):
    model = TupleFeatures()
    params = _random_params(lambda: model.init(jax.random.key(0), jnp.ones((3, 16)))["params"])
    with pytest.raises(ValueError, match=f"^{message}"):
        BUILTIN_RECIPES[name](None, params)
    with pytest.raises(ValueError, match=message.split(": ", 1)[1]):
        plan(BUILTIN_RECIPES[name], None, params)


@pytest.mark.parametrize("name", ["w8", "w4"])
def test_quantized_dense_general_with_tuple_features_runs(name):
    """Quantize keeps Flax's (d_in, *features) kernel shape; linen_apply runs it as 2-D."""
    model = TupleFeatures()
    x = jax.random.normal(jax.random.key(3), (3, 16))
    params = _random_params(lambda: model.init(jax.random.key(0), x)["params"])
    _, out = BUILTIN_RECIPES[name](None, params)
    kernel = out["DenseGeneral_0"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and kernel.shape == (16, 2, 8)
    assert kernel.scale.shape == (1, 16)  # one scale per output feature of the 2-D view
    ours = linen_apply(model, {"params": out}, x)
    reference = model.apply({"params": materialize(out)}, x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-5)


class UserNnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, 16, rngs=rngs)
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.down(jax.nn.gelu(self.up(x)))
        return self.embed.attend(x)


class UserNnxList(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, 16, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 16, rngs=rngs)])

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.layers[1](jax.nn.gelu(self.layers[0](x)))
        return self.embed.attend(x)


def _transformed(name, params):
    """(params after built-in `name`, their materialized form); jitted where traceable."""
    recipe = BUILTIN_RECIPES[name]
    if name == "svd-20":  # numpy SVD: eager
        out = recipe(None, params)[1]
        return out, jax.jit(materialize)(out)
    return jax.jit(lambda p: (out := recipe(None, p)[1], materialize(out)))(params)


def test_builtins_on_a_user_nnx_model():
    model = nnx.jit(lambda: UserNnxNet(nnx.Rngs(0)))()
    forward = nnx.jit(lambda m: m(_ids()))
    before = np.asarray(forward(model))
    params = nnx_params(model)
    assert set(flatten(params)) == {"embed/embedding", "up/kernel", "up/bias",
                                        "down/kernel", "down/bias"}
    for name in BYO_RECIPES:
        out, dense = _transformed(name, params)
        assert isinstance(out["up"]["kernel"], BYO_LEAF[name])
        assert isinstance(out["down"]["kernel"], BYO_LEAF[name])
        for module, leaf in (("embed", "embedding"), ("up", "bias"), ("down", "bias")):
            np.testing.assert_array_equal(np.asarray(out[module][leaf]),
                                          np.asarray(params[module][leaf]))
        ours = np.asarray(forward(nnx_with_params(model, out)))
        reference = np.asarray(forward(nnx_with_params(model, dense)))
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(forward(model)), before)  # the model is untouched
    # eagerly, leaves no rule selects stay the very same arrays
    _, out = BUILTIN_RECIPES["svd-20"](None, params)
    assert out["embed"]["embedding"] is params["embed"]["embedding"]


def test_builtin_on_an_nnx_model_with_a_layer_list():
    model = nnx.jit(lambda: UserNnxList(nnx.Rngs(0)))()
    _, out = BUILTIN_RECIPES["w8"](None, nnx_params(model))
    ours = np.asarray(nnx_with_params(model, out)(_ids()))
    reference = np.asarray(nnx_with_params(model, materialize(out))(_ids()))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
