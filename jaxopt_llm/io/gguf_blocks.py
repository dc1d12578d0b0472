"""GGUF Q8_0 / Q4_0 / Q4_1 tensors kept as integer codes (`QuantizedWeight`), not floats.

`load_gguf` dequantizes every tensor to float32, which is what a float model needs. A
model compared with llama.cpp on its own file needs the codes and block scales as
llama.cpp holds them, so that `transforms.quantize.with_activation_blocks` can run
llama.cpp's arithmetic on them. A block of 32 values along a row (ggml's fastest axis,
the contraction axis of a projection) maps onto our groups of 32 exactly:
- Q8_0: float16 d, 32 int8 codes q; w = d·q → symmetric 8-bit, group 32, float16 scales;
- Q4_0: float16 d, 16 bytes (value j in the low nibble of byte j, value j+16 in its high
  nibble); w = d·(u − 8) → symmetric 4-bit (our stored offset is the same 8);
- Q4_1: float16 d and m, 16 bytes as Q4_0; w = d·u + m → asymmetric 4-bit, zero "float".
Every converted tensor is checked value for value against the float load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.io.gguf_dequant import split_blocks
from jaxopt_llm.io.gguf_file import _LLAMA_NAMES, _unpermute_rope_rows, load_gguf
from jaxopt_llm.models import ModelConfig
from jaxopt_llm.tree import flatten, unflatten
from jaxopt_llm.weights import QuantizedWeight, packing

Q = gguf.GGMLQuantizationType
BLOCK = 32
_LAYOUT = {Q.Q8_0: (8, True), Q.Q4_0: (4, True), Q.Q4_1: (4, False)}  # bits, symmetric


def _blocks(tensor: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes (R, C) as stored: int8 or unsigned nibbles, d (R, C/32), m or None)."""
    rows_cols = tuple(int(d) for d in reversed(tensor.shape))
    rows, cols = int(np.prod(rows_cols[:-1])), rows_cols[-1]
    size = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]  # bytes per block
    codes, d, m = split_blocks(np.asarray(tensor.data, np.uint8).reshape(-1, size),
                               tensor.tensor_type)
    return (codes.reshape(rows, cols), d.reshape(rows, cols // BLOCK),
            None if m is None else m.reshape(rows, cols // BLOCK))


def _leaf(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None, bits: int, symmetric: bool,
          table: bool) -> QuantizedWeight:
    """Codes (R, C) with blocks along C as a kernel (C, R) (table=False) or a table (R, C)."""
    if table:
        axis, shape, codes2, scale, zero = 1, codes.shape, codes, d, m
    else:
        axis, shape, codes2, scale = 0, codes.shape[::-1], codes.T, d.T
        zero = None if m is None else m.T
    if bits == 8:
        qvalue = jnp.asarray(codes2.astype(np.int8))
    else:
        qvalue = packing.pack(jnp.asarray(codes2), bits, axis=axis)
    return QuantizedWeight(
        qvalue=qvalue, scale=jnp.asarray(scale), zero_point=None if zero is None
        else jnp.asarray(zero), bits=bits, symmetric=symmetric, granularity="group",
        group_size=BLOCK, partial_groups=False, axis=axis, shape=tuple(int(s) for s in shape),
        dtype="float32", zero="integer" if symmetric else "float")


def load_gguf_blocks(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) of a Llama-family GGUF with its Q8_0/Q4_0/Q4_1 tensors as codes.

    Other tensors (F32, F16, K-quants…) are the float32 values `load_gguf` gives.

    Args:
        path: the .gguf file.

    Returns:
        (ModelConfig, parameter tree with QuantizedWeight leaves where the file is Q8_0,
        Q4_0 or Q4_1).

    Raises:
        ValueError: for a non-Llama file, or when a converted tensor does not reproduce
            the float load exactly (a corrupted or unexpected file).

    Example:
        >>> from jaxopt_llm.io.loader import resolve_model_path
        >>> config, params = load_gguf_blocks(resolve_model_path("smollm2-135m"))  # doctest: +SKIP
        >>> params["layers_0"]["mlp"]["up_proj"]["kernel"].zero  # doctest: +SKIP
        'float'
    """
    config, params, reader = load_gguf(path)
    if config.family != "llama":
        raise ValueError(f"{path}: GGUF blocks are kept for Llama-family files, got "
                         f"{config.family!r}")
    flat = flatten(params)
    for tensor in reader.tensors:
        if tensor.tensor_type not in _LAYOUT:
            continue
        name = tensor.name
        if name == "token_embd.weight":
            target, table = "embed_tokens/embedding", True
        elif name == "output.weight":
            target, table = "lm_head/kernel", False
        elif (match := re.fullmatch(r"blk\.(\d+)\.(.+)", name)) and match[2] in _LLAMA_NAMES:
            target, table = f"layers_{match[1]}/{_LLAMA_NAMES[match[2]][0]}", False
        else:
            continue
        codes, d, m = _blocks(tensor)
        if config.model_type == "llama" and re.search(r"attn_[qk]\.weight$", name):
            heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
            codes, d = _unpermute_rope_rows(codes, heads), _unpermute_rope_rows(d, heads)
            m = None if m is None else _unpermute_rope_rows(m, heads)
        bits, symmetric = _LAYOUT[tensor.tensor_type]
        leaf = _leaf(codes, d, m, bits, symmetric, table)
        if not np.array_equal(np.asarray(leaf.materialize()), np.asarray(flat[target])):
            raise ValueError(f"{path}: tensor {name!r} ({tensor.tensor_type.name}) does not "
                             f"decode to the values the gguf package reads")
        flat[target] = leaf
    return config, unflatten(flat)


__all__ = ["load_gguf_blocks"]
