"""The on-disk program cache: a second start loads the compiled prefill and decode instead
of tracing them, gives the same tokens, and survives damaged entries and XLA's own cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt_llm.generation as gen
from jaxopt_llm import program_cache
from jaxopt_llm.models import ModelConfig, init_params
from jaxopt_llm.weights import QuantSpec, quantize_weight

CONFIG = ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=32,
                     intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     max_position_embeddings=128, eos_token_ids=(3,))
PROMPTS = [[5, 9, 11, 2, 40], [7, 1]]


@pytest.fixture()
def cache_dir(tmp_path):
    program_cache.enable(tmp_path)
    gen._PROGRAMS.clear()
    yield tmp_path / program_cache.FOLDER
    program_cache.enable(None)
    gen._PROGRAMS.clear()


@pytest.fixture(scope="module")
def params():
    values = init_params(CONFIG, jax.random.key(3))
    return jax.tree_util.tree_map(lambda p: p * 4.0, values)  # peaked logits, no ties


def _run(params, **kwargs):
    return gen.generate(CONFIG, params, PROMPTS, max_new_tokens=6, eos_token_ids=[-1],
                        **kwargs)


def _fresh_process_view():
    """What a new process sees: no programs in memory, no jit caches."""
    gen._PROGRAMS.clear()
    jax.clear_caches()


def test_second_start_loads_the_programs_and_gives_the_same_tokens(params, cache_dir):
    program_cache.enable(None)
    reference = _run(params)
    assert reference.programs == "compiled"
    program_cache.enable(cache_dir.parent)
    _fresh_process_view()
    first = _run(params)
    assert first.programs == "cache miss"
    assert len(list(cache_dir.glob("*.bin"))) == 2  # prefill and decode
    _fresh_process_view()
    second = _run(params)
    assert second.programs == "cache hit"
    assert second.new_ids == first.new_ids == reference.new_ids
    assert _run(params).programs == "reused"  # in memory from now on


def test_quantized_weights_and_sampling_get_their_own_entries(params, cache_dir):
    quantized = dict(params)
    quantized["layers_0"] = jax.tree_util.tree_map(lambda a: a, params["layers_0"])
    mlp = dict(quantized["layers_0"]["mlp"])
    mlp["up_proj"] = {"kernel": quantize_weight(params["layers_0"]["mlp"]["up_proj"]["kernel"],
                                                QuantSpec(bits=4, granularity="group",
                                                          group_size=16))}
    quantized["layers_0"] = {**quantized["layers_0"], "mlp": mlp}
    plain = _run(params)
    assert _run(quantized).programs == "cache miss"  # other leaves, other key
    sampled = _run(params, sampling=gen.Sampling(temperature=0.7, top_k=5), seed=1)
    assert sampled.programs == "cache miss"
    assert len(list(cache_dir.glob("*.bin"))) == 6
    _fresh_process_view()
    assert _run(quantized).programs == "cache hit"
    again = _run(params, sampling=gen.Sampling(temperature=0.7, top_k=5), seed=1)
    assert again.programs == "cache hit" and again.new_ids == sampled.new_ids
    assert _run(params).new_ids == plain.new_ids


def test_a_damaged_entry_is_a_miss_and_is_rewritten(params, cache_dir):
    first = _run(params)
    for entry in cache_dir.glob("*.bin"):
        entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a full disk
    _fresh_process_view()
    again = _run(params)
    assert again.programs == "cache miss" and again.new_ids == first.new_ids
    _fresh_process_view()
    assert _run(params).programs == "cache hit"


def test_programs_that_xla_cache_served_are_recompiled_before_storing(params, cache_dir,
                                                                      tmp_path_factory):
    """XLA's persistent cache (on in this suite, conftest) hands back executables whose
    serialized copy cannot run on CPU; the program cache compiles afresh before storing."""
    from jax.experimental.compilation_cache import compilation_cache

    xla_dir = tmp_path_factory.mktemp("xla")
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(xla_dir))
    compilation_cache.reset_cache()
    try:
        program_cache.enable(None)
        _fresh_process_view()
        _run(params)  # compiled and written to XLA's cache only
        assert any(xla_dir.iterdir())
        _fresh_process_view()
        program_cache.enable(cache_dir.parent)
        stored = _run(params)  # XLA's cache would serve it: must compile afresh
        assert stored.programs == "cache miss"
        _fresh_process_view()
        loaded = _run(params)
        assert loaded.programs == "cache hit" and loaded.new_ids == stored.new_ids
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


def test_key_covers_shapes_static_arguments_and_environment(monkeypatch):
    leaf = [jax.ShapeDtypeStruct((2, 3), jnp.float32)]
    base = program_cache.program_key("p", (1,), leaf)
    assert base == program_cache.program_key("p", (1,), leaf)
    assert base != program_cache.program_key("q", (1,), leaf)
    assert base != program_cache.program_key("p", (2,), leaf)
    assert base != program_cache.program_key("p", (1,), [jax.ShapeDtypeStruct((2, 3),
                                                                            jnp.bfloat16)])
    monkeypatch.setenv("JAXOPT_LLM_NATIVE", "off")
    assert base != program_cache.program_key("p", (1,), leaf)


def test_sharded_inputs_are_not_cached():
    mesh = jax.make_mesh((2,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = [jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding)]
    assert not program_cache.single_device(sharded)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert program_cache.single_device([jax.ShapeDtypeStruct((4,), jnp.float32,
                                                              sharding=one)])
    assert np.all(np.asarray([program_cache.single_device([])]))
