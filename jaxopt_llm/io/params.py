"""Turn a flat {"a/b/c": array} mapping into the model's parameter tree, checking it.

Every loader ends here, so missing tensors, unexpected tensors and shapes that
disagree with the config all fail the same way, naming the source file.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import tree
from jaxopt_llm.models import ModelConfig, param_shapes


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """"/"-joined parameter path -> shape, as the model defines them (no compute).

    Args:
        config: the model's config.

    Returns:
        path → shape, in the model's parameter order.

    Example:
        >>> from jaxopt_llm.models import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> expected_shapes(config)["layers_0/attn/k_proj/kernel"]
        (32, 16)
    """
    return {path: tuple(leaf.shape) for path, leaf in tree.flatten(param_shapes(config)).items()}


def check_against_config(
    config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str,
    origin: dict[str, str] | None = None, transposed: frozenset[str] = frozenset(),
) -> None:
    """Every tensor the config needs is present, none is left over, and every shape is the
    config's — the one check every loader (HF, GGUF, artifacts) makes.

    Args:
        config: the model's config.
        shapes: our "/"-joined path → the (dense) shape read from the source.
        source: the file's name, for error messages.
        origin: each of our paths → the tensor name in the source file (default: the path).
        transposed: the paths the file stores (d_out, d_in), so that messages quote
            shapes as the file has them.

    Raises:
        ValueError: naming the source, the tensors and the config values involved.

    Example:
        >>> config = ModelConfig.tiny()
        >>> shapes = expected_shapes(config)
        >>> check_against_config(config, shapes, "model.safetensors")
        >>> del shapes["layers_0/attn/k_proj/kernel"]
        >>> check_against_config(config, shapes, "m")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: m: 1 tensors the config needs are missing, e.g. [...] ...
    """
    origin = origin or {}
    flat = shapes
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(flat))
    if missing:
        names = [origin.get(m, m) for m in missing[:5]]
        raise ValueError(
            f"{source}: {len(missing)} tensors the config needs are missing, e.g. {names} "
            f"(config: {config.num_layers} layers, "
            f"tie_word_embeddings={config.tie_word_embeddings})"
        )
    unexpected = sorted(set(flat) - set(expected))
    if unexpected:
        names = [origin.get(u, u) for u in unexpected[:5]]
        raise ValueError(
            f"{source}: {len(unexpected)} tensors are not used by the config, e.g. {names}; "
            "do the config and the weights match?"
        )
    for path, shape in expected.items():
        actual = tuple(flat[path])
        if actual != shape:
            if path in transposed:
                actual, shape = actual[::-1], shape[::-1]
            raise ValueError(
                f"{source}: tensor {origin.get(path, path)!r} has shape {actual} but the "
                f"config expects {shape}"
            )


def assemble_params(
    config: ModelConfig, flat: dict[str, Any], source: str, origin: dict[str, str],
    transposed: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Check `flat` against the config and build the nested tree of float32 jax arrays.

    Args:
        config: the model's config.
        flat: our "/"-joined path → array, as read from the file (numpy, or float32 device
            arrays, which are kept as they are).
        source: the file's name, for error messages.
        origin: each of our paths → the tensor name in the source file.
        transposed: the paths the file stores (d_out, d_in), so that messages quote
            shapes as the file has them.

    Returns:
        The nested parameter tree.

    Raises:
        ValueError: missing or unexpected tensors, or shapes that disagree with the config.

    Example:
        >>> params = assemble_params(config, flat, "model.safetensors", origin)  # doctest: +SKIP
    """
    check_against_config(config, {p: tuple(a.shape) for p, a in flat.items()}, source,
                         origin, transposed)
    return tree.unflatten({p: a if isinstance(a, jax.Array) and a.dtype == jnp.float32
                           else jax.device_put(np.asarray(a, dtype=np.float32))
                           for p, a in flat.items()})
