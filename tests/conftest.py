"""Test settings: strict dtype and rank promotion (silent upcasts and implicit broadcasts
fail loudly), fake CPU devices.

The XLA flag must be set before JAX initialises its backends, so it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# numpy's SVD (svd passes) with OpenBLAS threads competing with XLA's on 2 cores runs
# hundreds of times slower than single-threaded.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model, loaded once per test session."""
    from jaxopt_llm.io.loader import load_model

    return load_model("smollm2-135m")


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
def tiny_model_dir(tmp_path_factory, word_tokenizer):
    """make(config, text, seed=0, scale=1.0) → (artifact dir of a random tiny model with the
    word tokenizer, text file); `scale` multiplies its 2-D weights (sharper logits)."""

    def make(config, text, seed=0, scale=1.0):
        import jax.numpy as jnp

        from jaxopt_llm.io.artifact import save_artifact
        from jaxopt_llm.models import build_model
        from jaxopt_llm.models.layers import attention_mask

        tokens = jnp.zeros((1, 4), jnp.int32)
        mask = attention_mask(jnp.ones((1, 4), bool), 0, 4)
        params = build_model(config).init(jax.random.key(seed), tokens, tokens, mask)["params"]
        params = jax.tree_util.tree_map(lambda a: a * scale if a.ndim == 2 else a, params)
        directory = tmp_path_factory.mktemp("tiny") / "model"
        save_artifact(directory, config=config, params=params, tokenizer=word_tokenizer,
                      recipe=None)
        path = directory.parent / "train.txt"
        path.write_text(text)
        return directory, path

    return make
