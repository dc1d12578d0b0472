"""Recipe continuation on an artifact keeps stage names unique and the whole history."""

import jax

from jaxopt_llm.io.loaded import LoadedModel
from jaxopt_llm.models import ModelConfig, init_params
from jaxopt_llm.pipeline import Recipe
from jaxopt_llm.recipes import apply_recipe, load_recipe

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=32, hidden_size=16,
                     intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=8, max_position_embeddings=32)


def test_continuing_a_recipe_renames_a_repeated_stage():
    loaded = LoadedModel(config=CONFIG, params=init_params(CONFIG, jax.random.key(0)),
                         tokenizer=None, source="tiny")
    pruned = apply_recipe(loaded, load_recipe("mlp-25"))
    assert pruned.config.intermediate_size == 24
    both = apply_recipe(pruned, load_recipe("nm-2:4"))
    recipe = Recipe.from_dict(both.recipe)
    assert recipe.name == "mlp-25+nm-2:4"
    assert [s.name for s in recipe.stages] == ["prune", "prune-2"]
    again = apply_recipe(both, load_recipe("w8"))
    assert [s.name for s in Recipe.from_dict(again.recipe).stages] == [
        "prune", "prune-2", "quantize"]
    assert again.extra["dense_param_bytes"] == loaded_bytes(loaded)


def loaded_bytes(loaded):
    from jaxopt_llm.weights import param_bytes

    return param_bytes(loaded.params)
