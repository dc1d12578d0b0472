"""Export a Llama-family model to GGUF, llama.cpp's file format.

Tensor names, the q/k row order (llama.cpp interleaves each head's rotary pairs) and the
metadata mirror what `gguf_file.load_gguf` reads, so a file written here loads back to
the same parameters. Block linears and the embedding table are written in the requested
type; norms (1-D) stay F32, as llama.cpp's own converter does.

Quantized leaves whose grid *is* a GGUF block type are written code for code, without
re-rounding: symmetric int8 groups of 32 with float16 scales are Q8_0 (w = d·q),
symmetric int4 groups of 32 are Q4_0 (w = d·(u − 8)), asymmetric int4 groups of 32
with float offsets are Q4_1 (w = d·u + m). Any other leaf (another grid, a pruned or
low-rank weight) is widened to float and, for a block type, quantized by `gguf.quants`
(requantized; an int8 leaf, such as the built-in recipes' int8 token table, to Q8_0 when
the requested type is 4-bit, as llama.cpp's own Q4 files keep their token table in Q8_0);
`plan_gguf` says which before any work, and `strict` refuses instead.
A kernel whose input dimension is not a multiple of 32 cannot hold blocks and is
written F32.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from jaxopt_llm import tree
from jaxopt_llm.errors import ParameterError
from jaxopt_llm.io.tokenizer import Tokenizer, gguf_tokenizer_fields
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.weights import QuantizedWeight, WeightLeaf, materialize

GGUF_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
              "q4_1": Q.Q4_1}
BLOCK = 32  # values per Q8_0 / Q4_0 / Q4_1 block
_BLOCK_NAMES = {
    "input_norm/scale": "attn_norm.weight", "post_attention_norm/scale": "ffn_norm.weight",
    "attn/q_proj/kernel": "attn_q.weight", "attn/q_proj/bias": "attn_q.bias",
    "attn/k_proj/kernel": "attn_k.weight", "attn/k_proj/bias": "attn_k.bias",
    "attn/v_proj/kernel": "attn_v.weight", "attn/v_proj/bias": "attn_v.bias",
    "attn/o_proj/kernel": "attn_output.weight", "attn/o_proj/bias": "attn_output.bias",
    "mlp/gate_proj/kernel": "ffn_gate.weight", "mlp/up_proj/kernel": "ffn_up.weight",
    "mlp/down_proj/kernel": "ffn_down.weight",
}
_TOP_NAMES = {"embed_tokens/embedding": "token_embd.weight", "norm/scale": "output_norm.weight",
              "lm_head/kernel": "output.weight"}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """How one parameter is written: its GGUF name, what it is here, the GGUF type, and
    how ("exact": codes copied; "quantized": float rounded by gguf.quants; "requantized":
    a compressed leaf widened then rounded again; "widened": a compressed leaf written as
    float; "float": a float tensor written as float)."""

    path: str
    name: str
    stored_as: str
    written_as: str
    how: str


def _gguf_name(path: str) -> str:
    if path in _TOP_NAMES:
        return _TOP_NAMES[path]
    match = re.fullmatch(r"layers_(\d+)/(.+)", path)
    if match is None or match[2] not in _BLOCK_NAMES:
        raise ValueError(f"GGUF export: parameter {path!r} has no llama.cpp tensor name")
    return f"blk.{match[1]}.{_BLOCK_NAMES[match[2]]}"


def _exact_type(leaf: Any) -> Q | None:
    """The GGUF block type a QuantizedWeight's grid equals, or None."""
    if not isinstance(leaf, QuantizedWeight):
        return None
    if leaf.act_bits is not None and leaf.act_group != BLOCK:  # per-token W8A8: not llama.cpp's
        return None
    if leaf.granularity != "group" or leaf.group_size != BLOCK or leaf.scale.dtype != np.float16:
        return None
    if leaf.bits == 8 and leaf.symmetric:
        return Q.Q8_0
    if leaf.bits == 4 and leaf.symmetric:
        return Q.Q4_0
    if leaf.bits == 4 and not leaf.symmetric and leaf.zero == "float":
        return Q.Q4_1
    return None


def _check_model(config: ModelConfig) -> str:
    if config.family != "llama":
        raise ValueError(f"GGUF export supports Llama-family models (llama, mistral, qwen2), "
                         f"got family {config.family!r}")
    return "qwen2" if config.model_type == "qwen2" else "llama"


def plan_gguf(config: ModelConfig, params: Any, qtype: str = "q8_0", *,
              floats: str | None = None, strict: bool = False) -> list[GGUFTensor]:
    """What `export_gguf` will write for each parameter, before any work.

    Args:
        config: the model config (Llama family).
        params: the parameters (any representation).
        qtype: the type of 2-D weights: one of `GGUF_TYPES`.
        floats: the type of 2-D weights that are plain float here (e.g. the embedding
            table and head a recipe left alone); None: `qtype`. "f32" keeps the file's
            numbers equal to the model's wherever codes are copied.
        strict: refuse (ValueError) where a compressed weight would be widened or
            requantized.

    Returns:
        One `GGUFTensor` per parameter.

    Example:
        >>> rows = plan_gguf(config, params, "q4_0")  # doctest: +SKIP
        >>> {row.how for row in rows}  # doctest: +SKIP
        {'float', 'quantized'}
    """
    for option, value in (("qtype", qtype), ("floats", floats)):
        if value not in GGUF_TYPES and not (option == "floats" and value is None):
            raise ParameterError(option, value, f"not a GGUF type this export writes; one of "
                                 f"{list(GGUF_TYPES)}")
    _check_model(config)
    rows = []
    for path, leaf in tree.flatten(params).items():
        name = _gguf_name(path)
        compressed = isinstance(leaf, WeightLeaf)
        wanted = GGUF_TYPES[qtype if compressed or floats is None else floats]
        stored = leaf.describe() if compressed else str(np.dtype(leaf.dtype))
        shape = tuple(leaf.shape)
        inner = shape[1] if path.endswith("embedding") else shape[0]
        if len(shape) == 1:
            written, how = Q.F32, "widened" if compressed else "float"
        elif _exact_type(leaf) == wanted:
            written, how = wanted, "exact"
        elif wanted in (Q.F32, Q.F16, Q.BF16):
            written, how = wanted, "widened" if compressed else "float"
        elif inner % BLOCK:
            written, how = Q.F32, "widened" if compressed else "float"
        elif getattr(leaf, "bits", None) == 8 and wanted in (Q.Q4_0, Q.Q4_1):
            written, how = Q.Q8_0, "requantized"  # int8 (a token table) stays 8-bit
        else:
            written, how = wanted, "requantized" if compressed else "quantized"
        if strict and how in ("widened", "requantized"):
            raise ValueError(f"GGUF export --strict: {path} ({stored}) would be {how} to "
                             f"{written.name}; GGUF keeps codes only of int8/int4 groups of 32 "
                             "with float16 scales (Q8_0, Q4_0, Q4_1)")
        rows.append(GGUFTensor(path, name, stored, written.name, how))
    return rows


def _blocks_of(leaf: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes (rows, K) int, scale (rows, K/32) f16, offset or None) in GGUF's layout:
    one row per output (kernel) or per token (table), blocks along the contraction."""
    codes = np.asarray(leaf.codes())  # (K, N): contraction first
    scale = np.asarray(leaf.scale)
    zero = None if leaf.zero_point is None else np.asarray(leaf.zero_point)
    if leaf.axis == 0:
        return codes.T, scale.T, None if zero is None else zero.T
    return codes.T, scale, zero  # a table's scales are already (V, G)


def _block_bytes(leaf: QuantizedWeight, qtype: Q) -> np.ndarray:
    """The raw GGUF bytes (rows, blocks·bytes per block) of a leaf `_exact_type` maps."""
    codes, scale, offset = _blocks_of(leaf)
    rows, k = codes.shape
    blocks = codes.reshape(rows, k // BLOCK, BLOCK)
    d = scale.astype(np.float16).reshape(rows, k // BLOCK, 1).view(np.uint8)
    if qtype == Q.Q8_0:
        body = blocks.astype(np.int8).view(np.uint8)
        return np.concatenate([d, body], axis=-1).reshape(rows, -1)
    unsigned = (blocks + 8 if qtype == Q.Q4_0 else blocks).astype(np.uint8)
    nibbles = (unsigned[..., :16] & 0xF) | (unsigned[..., 16:] << 4)
    parts = [d]
    if qtype == Q.Q4_1:
        parts.append(offset.astype(np.float16).reshape(rows, k // BLOCK, 1).view(np.uint8))
    return np.concatenate([*parts, nibbles.astype(np.uint8)], axis=-1).reshape(rows, -1)


def _rope_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half row order → llama.cpp's interleaved pairs (per head)."""
    rows = array.shape[0]
    return (array.reshape(heads, 2, rows // heads // 2, *array.shape[1:])
            .swapaxes(1, 2).reshape(array.shape))


def export_gguf(config: ModelConfig, params: Any, tokenizer: Tokenizer | None,
                out: str | Path, *, qtype: str = "q8_0", floats: str | None = None,
                strict: bool = False, name: str = "jaxopt-llm export"
                ) -> tuple[Path, list[GGUFTensor]]:
    """Write the model as one GGUF file (atomically: a temporary sibling, then renamed).

    Args:
        config: the model config (Llama family: llama, mistral, qwen2).
        params: the parameters (any representation; see the module doc).
        tokenizer: its tokenizer (byte-level BPE), written as llama.cpp's metadata so the
            file runs on its own; None writes no tokenizer (llama.cpp then cannot run it).
        out: the .gguf path.
        qtype: the type of 2-D weights, one of `GGUF_TYPES`.
        floats: the type of 2-D weights that are plain float here; None: `qtype`.
        strict: refuse instead of widening or requantizing a compressed weight.
        name: general.name in the metadata.

    Returns:
        (the path written, `plan_gguf`'s rows).

    Example:
        >>> path, rows = export_gguf(m.config, params, m.tokenizer, "smol.gguf",
        ...                          qtype="q4_1")  # doctest: +SKIP
    """
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"GGUF export: --out must name a .gguf file, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"GGUF export: {str(out)!r} is a directory")
    rows = plan_gguf(config, params, qtype, floats=floats, strict=strict)
    fields = {} if tokenizer is None else gguf_tokenizer_fields(tokenizer)
    arch = _check_model(config)
    flat = tree.flatten(params)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_metadata(writer, config, fields, name, qtype)
        for row in rows:
            leaf = flat[row.path]
            qt = Q[row.written_as]
            if row.how == "exact":
                data = _block_bytes(leaf, qt)
            else:
                dense = np.asarray(materialize(leaf), np.float32)
                if row.path.endswith("kernel"):  # kernels (K, N) → GGUF rows (N, K)
                    dense = dense.T
                data = dense if qt == Q.F32 else (
                    dense.astype(np.float16) if qt == Q.F16 else gguf.quants.quantize(dense, qt))
            if re.search(r"attn_[qk]\.(weight|bias)$", row.name):
                heads = config.num_heads if ".attn_q." in row.name else config.num_kv_heads
                data = _rope_rows(data, heads)
            if qt in (Q.F32, Q.F16):
                writer.add_tensor(row.name, np.ascontiguousarray(data))
            else:
                writer.add_tensor(row.name, np.ascontiguousarray(data), raw_dtype=qt)
        if config.rope_scaling is not None and dict(config.rope_scaling).get(
                "rope_type") == "freq_factors":
            factors = np.asarray(dict(config.rope_scaling)["factors"], np.float32)
            writer.add_tensor("rope_freqs.weight", factors)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, rows


def _write_metadata(writer: gguf.GGUFWriter, config: ModelConfig, fields: dict[str, Any],
                    name: str, qtype: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    scaling = dict(config.rope_scaling or ())
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling and scaling.get("rope_type") != "freq_factors":
        raise ValueError(f"GGUF export: rope scaling {scaling.get('rope_type')!r} has no "
                         "GGUF metadata here")
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
    writer.add_file_type(file_types[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in fields.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, int(value))
    if fields:
        writer.add_bool("tokenizer.ggml.add_bos_token", False)
        writer.add_bool("tokenizer.ggml.add_space_prefix", False)


__all__ = ["GGUFTensor", "GGUF_TYPES", "export_gguf", "plan_gguf"]
