"""The real SmolLM2 (9 heads, 3 kv heads) tensor-parallel over model=3 and data-parallel:
the same perplexity sums and greedy tokens as one device."""

import numpy as np
import pytest

from jaxopt_llm.data import pydoc_text
from jaxopt_llm.evaluate import perplexity
from jaxopt_llm.generation import generate
from jaxopt_llm.parallel import check_mesh, make_mesh, shard_params

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mesh_spec", ["data=2,model=3", "data=2"])
def test_smollm2_on_a_mesh_equals_one_device(smollm2, mesh_spec):
    ids = smollm2.tokenizer.encode(pydoc_text())[:2048]
    mesh = make_mesh(mesh_spec)
    sharded = shard_params(smollm2.config, smollm2.params, mesh)
    single = perplexity(smollm2.config, smollm2.params, ids, num_tokens=1024, window=256,
                        batch_size=2)
    on_mesh = perplexity(smollm2.config, sharded, ids, num_tokens=1024, window=256,
                         batch_size=2, mesh=mesh)
    np.testing.assert_allclose(on_mesh.nll_sum, single.nll_sum, rtol=1e-5)
    prompt = [smollm2.tokenizer.encode("def fibonacci(n):")]
    a = generate(smollm2.config, smollm2.params, prompt, max_new_tokens=12)
    b = generate(smollm2.config, sharded, prompt, max_new_tokens=12, mesh=mesh)
    assert a.new_ids == b.new_ids


def test_smollm2_model_axis_must_divide_its_heads(smollm2):
    with pytest.raises(ValueError, match="num_heads=9 is not divisible by model=2; "
                                         "use model=1 or 3"):
        check_mesh(smollm2.config, make_mesh("model=2"))
