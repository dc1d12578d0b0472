"""Placement on 8 fake CPU devices (conftest): a mesh computes what one device computes,
the model is checked against the mesh once, and bad arguments fail clearly."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxopt_llm import parallel
from jaxopt_llm.evaluate import perplexity
from jaxopt_llm.generation import generate
from jaxopt_llm.parallel import make_mesh
from jaxopt_llm.placement import Placement, ensure_cpu_devices
from jaxopt_llm.tree import flatten
from tests.test_parallel import CONFIG, TOKENS, _params


def setup_module():
    assert jax.device_count() >= 8, "tests/conftest.py must set 8 fake CPU devices"


@pytest.fixture(scope="module")
def params():
    return _params()


def test_single_and_mesh_placements_compute_the_same(params, monkeypatch):
    calls = []
    check_mesh = parallel.check_mesh
    monkeypatch.setattr(parallel, "check_mesh", lambda *a, **k: (calls.append(a[0]),
                                                                 check_mesh(*a, **k))[1])
    ids = np.random.default_rng(3).integers(3, 256, 32 * 10).astype(np.int32)
    prompts = [list(TOKENS[i, : 4 + 2 * i]) for i in range(3)]  # 3 prompts: padded to data=2
    results = {}
    for name, placement in (("single", Placement.single()),
                            ("mesh", Placement.on_mesh(make_mesh("data=2,model=4")))):
        placed = placement.place_params(CONFIG, params)
        results[name] = (
            perplexity(CONFIG, placed, ids, num_tokens=len(ids), window=32, batch_size=3,
                       placement=placement),
            generate(CONFIG, placed, prompts, max_new_tokens=5, eos_token_ids=(-1,),
                     placement=placement).new_ids)
        placement.check(CONFIG, batch=4)
    assert calls == [CONFIG]  # placing, evaluating, generating: one check of the model
    (single_ppl, single_ids), (mesh_ppl, mesh_ids) = results["single"], results["mesh"]
    assert mesh_ids == single_ids
    assert mesh_ppl.tokens_scored == single_ppl.tokens_scored == 10 * 31
    np.testing.assert_allclose(mesh_ppl.nll_sum, single_ppl.nll_sum, rtol=1e-5)


def test_one_device_placement_leaves_arrays_alone(params):
    single = Placement.single()
    assert not single.is_mesh and single.data_size == 1 and single.cache_sharding() is None
    assert single.place_params(CONFIG, params) is params
    assert single.round_batch(3) == 3
    np.testing.assert_array_equal(single.gather(single.place_batch(TOKENS)), TOKENS)


def test_mesh_placement_lays_out_params_batches_and_cache(params):
    placement = Placement.on_mesh(make_mesh("data=4,model=2"),
                                  rules=[("embed_tokens/embedding", "replicated")])
    assert placement.is_mesh and placement.data_size == 4 and placement.round_batch(5) == 8
    placed = flatten(placement.place_params(CONFIG, params))
    assert placed["embed_tokens/embedding"].sharding.spec == P()  # the user rule won
    assert placed["layers_0/attn/q_proj/kernel"].sharding.spec == P(None, "model")
    batch = placement.place_batch(TOKENS)
    assert batch.sharding.spec == P("data", None)
    np.testing.assert_array_equal(placement.gather(batch), TOKENS)
    cache = placement.new_cache(CONFIG, 4, 16)
    assert cache[0][0].sharding.spec == P("data", None, "model", None)
    assert not np.asarray(cache[0][0]).any()


def test_bad_placement_arguments():
    mesh = make_mesh("data=2")
    with pytest.raises(ValueError, match="give placement= or mesh="):
        Placement.resolve(Placement.single(), mesh=mesh)
    with pytest.raises(ValueError, match="shard rules lay parameters out on a mesh"):
        Placement(rules=[("embed_tokens/embedding", "replicated")])
    with pytest.raises(ValueError, match="layout must be one of"):
        Placement.on_mesh(mesh, rules=[("embed_tokens/embedding", "diagonal")])
    with pytest.raises(ValueError, match=r"mesh= must be a jax Mesh with axes \('data', 'model'\)"):
        Placement.on_mesh(jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",)))
    with pytest.raises(ValueError, match="batch=3 is not divisible by data=2"):
        Placement.on_mesh(mesh).check(CONFIG, batch=3)
    with pytest.raises(ValueError, match="count must be an integer"):
        ensure_cpu_devices("4")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


def test_ensure_cpu_devices_before_and_after_jax_starts():
    done = _python("import jax\nfrom jaxopt_llm.placement import ensure_cpu_devices\n"
                   "ensure_cpu_devices(4)\nprint(jax.device_count())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4"]
    late = _python("import jax\nfrom jaxopt_llm.placement import ensure_cpu_devices\n"
                   "jax.devices()\nensure_cpu_devices(4)")
    assert late.returncode != 0
    assert ("ValueError: JAX has already started with 1 devices, fewer than the 4 asked for; "
            "call ensure_cpu_devices(4) before any JAX computation") in late.stderr
