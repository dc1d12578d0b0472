"""The op contract: typed frozen options, pure ops, unique names, room for calibration."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import tree
from jaxopt_llm.pipeline import Recipe, Stage
from jaxopt_llm.recipes import load_recipe
from jaxopt_llm.rules import BLOCK_LINEARS, rule
from jaxopt_llm.transforms import Op, OpOptions, available_ops, register_op
from jaxopt_llm.transforms import base as transforms_base
from jaxopt_llm.transforms.quantize import QuantizeOptions


def _params():
    rng = np.random.default_rng(0)
    return {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.asarray(
        rng.normal(size=(16, 8)), jnp.float32)}}}}


def test_every_builtin_op_has_typed_frozen_keyword_only_options():
    for name, op in available_ops().items():
        assert issubclass(op.options, OpOptions), name
        params = dataclasses.fields(op.options)
        assert all(f.kw_only for f in params), name
        assert op.options.__dataclass_params__.frozen, name
        assert set(op.defaults) == {f.name for f in params}


def test_options_validate_on_construction_and_reject_non_finite_numbers():
    assert QuantizeOptions(bits=4, group_size=8).spec.granularity == "group"
    with pytest.raises(ValueError, match=r"percentile must be a finite number, got nan"):
        QuantizeOptions(percentile=math.nan)
    with pytest.raises(ValueError, match=r"clip_ratio must be a finite number, got inf"):
        available_ops()["fake_quant"].options(clip_ratio=math.inf)
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantizeOptions().bits = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        QuantizeOptions(4)  # type: ignore[misc]  (keyword-only)


def test_a_recipe_never_modifies_its_input():
    params = _params()
    before = tree.flatten(params)
    _, out = load_recipe("w8")(None, params)
    after = tree.flatten(params)
    assert all(after[p] is before[p] for p in before)
    assert type(tree.flatten(out)["layers_0/mlp/up_proj/kernel"]).__name__ == "QuantizedWeight"


def test_an_op_gets_a_read_only_view(monkeypatch):
    def writes_in_place(flat, paths, config, options):
        flat[paths[0]] = 0
        return config, flat

    monkeypatch.setitem(transforms_base._OPS, "writer",
                        Op(name="writer", options=OpOptions, apply=writes_in_place))
    stage = Stage(name="s", rules=(rule(BLOCK_LINEARS, "writer"),))
    with pytest.raises(TypeError):
        stage(None, _params())


def test_duplicate_op_and_stage_names_are_rejected():
    with pytest.raises(ValueError, match=r"an op named 'quantize' is already registered"):
        register_op(dataclasses.replace(available_ops()["quantize"]))
    with pytest.raises(ValueError, match=r"an op named 'keep' is already registered"):
        register_op(Op(name="keep", options=OpOptions, apply=lambda *a: a))
    stage = Stage(name="quantize", rules=(rule(BLOCK_LINEARS, "quantize"),))
    with pytest.raises(ValueError, match=r"recipe 'r': stage name 'quantize' is used twice"):
        Recipe(name="r", stages=(stage, stage))
    with pytest.raises(ValueError, match=r"stage name 'a' is used twice"):
        Recipe.from_dict({"name": "r", "stages": [
            {"name": "a", "rules": [{"match": BLOCK_LINEARS, "op": "quantize"}]},
            {"name": "a", "rules": [{"match": BLOCK_LINEARS, "op": "nm"}]}]})


def test_unknown_option_of_every_op_names_it():
    for name in available_ops():
        recipe = Recipe(name="r", stages=(Stage(name="s", rules=(
            rule(BLOCK_LINEARS, name, not_an_option=1),)),))
        with pytest.raises(ValueError, match=rf"op '{name}' has no option\(s\) "
                                             r"\['not_an_option'\]; options: \["):
            recipe.check()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ScaleOptions(OpOptions):
    factor: float = 2.0


def test_an_op_that_needs_calibration_gets_it_or_a_clear_error(monkeypatch):
    seen = []

    def scale_by_statistic(flat, paths, config, options, *, calibration):
        seen.append(calibration)
        out = dict(flat)
        for path in paths:
            out[path] = flat[path] * options.factor * calibration[path]
        return config, out

    monkeypatch.setitem(transforms_base._OPS, "calibrated_scale", Op(
        name="calibrated_scale", options=_ScaleOptions, apply=scale_by_statistic,
        needs_calibration=True))
    recipe = Recipe(name="r", stages=(Stage(name="calib", rules=(
        rule(BLOCK_LINEARS, "calibrated_scale", factor=3.0),)),))
    with pytest.raises(ValueError, match=r"stage 'calib': op 'calibrated_scale' needs "
                                         r"calibration data; pass calibration="):
        recipe(None, _params())
    stats = {"layers_0/mlp/up_proj/kernel": 0.5}
    _, out = recipe(None, _params(), calibration=stats)
    assert seen == [stats]
    np.testing.assert_allclose(np.asarray(out["layers_0"]["mlp"]["up_proj"]["kernel"]),
                               np.asarray(_params()["layers_0"]["mlp"]["up_proj"]["kernel"])
                               * 1.5)
