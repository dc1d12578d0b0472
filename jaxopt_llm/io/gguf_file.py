"""Load a GGUF file (llama.cpp's format): metadata → config, tensors → float32 params.

Quantized tensors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants) are
dequantized with the `gguf` package. llama.cpp stores Llama's q/k projection
rows in a rope-permuted order (interleaved pairs); we undo it so weights
match HF's rotate-half layout.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from jaxopt_llm.io.gguf_dequant import XLA_DEQUANTIZED, dequantize_blocks
from jaxopt_llm.io.gguf_dequant import unpermute_rope_rows as _unpermute_rope_rows
from jaxopt_llm.io.params import assemble_params
from jaxopt_llm.models.config import ModelConfig

SUPPORTED_QUANT_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")
_WHOLE_TENSOR_DEQUANTIZE = {Q.Q8_0: gguf.quants.Q8_0, Q.Q4_0: gguf.quants.Q4_0,
                            Q.Q4_1: gguf.quants.Q4_1, Q.Q5_0: gguf.quants.Q5_0,
                            Q.Q5_1: gguf.quants.Q5_1}

_LLAMA_NAMES = {
    "attn_norm.weight": ("input_norm/scale", False),
    "ffn_norm.weight": ("post_attention_norm/scale", False),
    "attn_q.weight": ("attn/q_proj/kernel", True), "attn_q.bias": ("attn/q_proj/bias", False),
    "attn_k.weight": ("attn/k_proj/kernel", True), "attn_k.bias": ("attn/k_proj/bias", False),
    "attn_v.weight": ("attn/v_proj/kernel", True), "attn_v.bias": ("attn/v_proj/bias", False),
    "attn_output.weight": ("attn/o_proj/kernel", True),
    "attn_output.bias": ("attn/o_proj/bias", False),
    "ffn_gate.weight": ("mlp/gate_proj/kernel", True),
    "ffn_up.weight": ("mlp/up_proj/kernel", True),
    "ffn_down.weight": ("mlp/down_proj/kernel", True),
}
_GPT2_NAMES = {
    "attn_norm.weight": ("ln_1/scale", False), "attn_norm.bias": ("ln_1/bias", False),
    "attn_qkv.weight": ("attn/c_attn/kernel", True), "attn_qkv.bias": ("attn/c_attn/bias", False),
    "attn_output.weight": ("attn/c_proj/kernel", True),
    "attn_output.bias": ("attn/c_proj/bias", False),
    "ffn_norm.weight": ("ln_2/scale", False), "ffn_norm.bias": ("ln_2/bias", False),
    "ffn_up.weight": ("mlp/c_fc/kernel", True), "ffn_up.bias": ("mlp/c_fc/bias", False),
    "ffn_down.weight": ("mlp/c_proj/kernel", True), "ffn_down.bias": ("mlp/c_proj/bias", False),
}


class _BulkArrayReader(gguf.GGUFReader):
    """`gguf.GGUFReader` with metadata arrays of strings and scalars parsed in bulk.

    The package's reader slices its memory map once or twice per array element; for a
    tokenizer's 49,152 tokens and 48,900 merges that took ~3 s of SmolLM2's ~3.7 s load.
    This builds the same `ReaderField` parts (one array per string length, string and
    scalar element; the same data indices and types) with `np.frombuffer` and
    `struct.unpack_from`, ~0.2 s. Files in the host's byte order only (the package's
    code handles byte-swapped files, and nested arrays).
    """

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list, list]:
        value_type = gguf.GGUFValueType(raw_type)
        if value_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        buffer = self.data
        raw_item_type = np.frombuffer(buffer, np.uint32, 1, orig_offs)
        item_type = gguf.GGUFValueType(int(raw_item_type[0]))
        scalar = self.gguf_scalar_to_np.get(item_type)
        if item_type != gguf.GGUFValueType.STRING and scalar is None:
            return super()._get_field_parts(orig_offs, raw_type)  # nested arrays
        length = np.frombuffer(buffer, np.uint64, 1, orig_offs + 4)
        count, offset = int(length[0]), orig_offs + 12
        parts: list[np.ndarray] = [raw_item_type, length]
        if item_type == gguf.GGUFValueType.STRING:
            for _ in range(count):
                (size,) = struct.unpack_from("=Q", buffer, offset)
                parts.append(np.frombuffer(buffer, np.uint64, 1, offset))
                parts.append(np.frombuffer(buffer, np.uint8, size, offset + 8))
                offset += 8 + size
            data = list(range(3, 2 + 2 * count, 2))
        else:
            values = np.frombuffer(buffer, scalar, count, offset)
            parts += [values[i:i + 1] for i in range(count)]
            offset += values.nbytes
            data = list(range(2, 2 + count))
        types = [value_type, item_type] if count else [value_type]
        return offset - orig_offs, parts, data, types


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A `gguf.GGUFReader` on `path`, with a clear error for a damaged file.

    Args:
        path: the .gguf file.

    Returns:
        The reader (memory-mapped).

    Raises:
        ValueError: the file is not a readable GGUF file.

    Example:
        >>> reader = open_gguf("model.gguf")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        return _BulkArrayReader(path)
    except Exception as err:  # the reader raises many types on damaged files
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupted ({err})") \
            from None


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: gguf.GGUFReader, source: str) -> ModelConfig:
    """Our `ModelConfig` from a GGUF file's metadata (llama and gpt2 architectures).

    Args:
        reader: the open GGUF file.
        source: the file's name, for error messages.

    Returns:
        The config.

    Raises:
        ValueError: an unsupported architecture or missing metadata, naming `source`.

    Example:
        >>> config = config_from_gguf(open_gguf("model.gguf"), "model.gguf")  # doctest: +SKIP
    """
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {list(SUPPORTED_ARCHITECTURES)}")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise ValueError(f"{source}: GGUF has neither {arch}.vocab_size nor a token list")
    width, heads = need("embedding_length"), need("attention.head_count")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    common = dict(
        model_type=arch, vocab_size=int(vocab), hidden_size=width,
        intermediate_size=need("feed_forward_length"), num_layers=need("block_count"),
        num_heads=heads, max_position_embeddings=need("context_length"),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )
    if arch == "gpt2":
        return ModelConfig(family="gpt2", num_kv_heads=heads, head_dim=width // heads,
                           norm_eps=need("attention.layer_norm_epsilon"),
                           tie_word_embeddings=True, **common)
    rope_scaling = None
    if "rope_freqs.weight" in names:
        factors = _tensor(reader, "rope_freqs.weight", source)
        rope_scaling = (("factors", tuple(float(f) for f in factors)),
                        ("rope_type", "freq_factors"))
    elif _field(reader, f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = (("factor", float(need("rope.scaling.factor"))), ("rope_type", "linear"))
    head_dim = _field(reader, f"{arch}.attention.key_length") or width // heads
    return ModelConfig(
        family="llama", num_kv_heads=_field(reader, f"{arch}.attention.head_count_kv") or heads,
        head_dim=head_dim, norm_eps=need("attention.layer_norm_rms_epsilon"),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling, tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
        sliding_window=_field(reader, f"{arch}.attention.sliding_window"), **common,
    )


def _tensor(reader: gguf.GGUFReader, name: str, source: str) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == name)
    return _dequantize(tensor, source)


def _dequantize(tensor: Any, source: str) -> np.ndarray:
    qtype = tensor.tensor_type
    if qtype not in SUPPORTED_QUANT_TYPES:
        raise ValueError(
            f"{source}: tensor {tensor.name!r} uses GGUF type {qtype.name}, which is not "
            f"supported; supported: {[q.name for q in SUPPORTED_QUANT_TYPES]}"
        )
    # GGUF lists dims fastest-first; numpy wants them slowest-first.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if qtype == Q.F32:
        array = np.asarray(tensor.data, dtype=np.float32)
    elif qtype in _WHOLE_TENSOR_DEQUANTIZE:
        # the package's block arithmetic on all blocks at once (its `dequantize` loops over
        # small row groups in Python: ~1 s of SmolLM2's load); elementwise, so the same values
        type_size = gguf.GGML_QUANT_SIZES[qtype][1]
        blocks = np.asarray(tensor.data, np.uint8).reshape(-1, type_size)
        array = _WHOLE_TENSOR_DEQUANTIZE[qtype].dequantize_blocks(blocks)
    else:
        array = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{source}: tensor {tensor.name!r} holds {array.size} values, its "
                         f"header says shape {shape}: the file is corrupted")
    return array.reshape(shape).astype(np.float32, copy=False)


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, Any], gguf.GGUFReader]:
    """(config, float32 params, reader) from a GGUF file.

    Quantized tensors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K–Q6_K) are dequantized to float32.

    Args:
        path: the .gguf file.

    Returns:
        (ModelConfig, parameter tree, the open reader (its tokenizer metadata is read by
        `io.tokenizer.tokenizer_from_gguf`)).

    Example:
        >>> from jaxopt_llm.io.loader import resolve_model_path
        >>> config, params, reader = load_gguf(resolve_model_path("smollm2-135m"))  # doctest: +SKIP
        >>> config.num_layers  # doctest: +SKIP
        30
    """
    source = str(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, source)
    per_block = _GPT2_NAMES if config.family == "gpt2" else _LLAMA_NAMES
    prefix = "h" if config.family == "gpt2" else "layers"
    top = ({"token_embd.weight": "wte/embedding", "position_embd.weight": "wpe/embedding",
            "output_norm.weight": "ln_f/scale", "output_norm.bias": "ln_f/bias"}
           if config.family == "gpt2" else
           {"token_embd.weight": "embed_tokens/embedding", "output_norm.weight": "norm/scale",
            "output.weight": "lm_head/kernel"})
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    transposed: set[str] = set()
    for tensor in reader.tensors:
        name = tensor.name
        if name == "rope_freqs.weight" or (config.family == "gpt2" and name == "output.weight"):
            continue  # folded into the config / GPT-2's head is the tied token table
        if name in top:
            path, transpose = top[name], name == "output.weight"
        elif (m := re.fullmatch(r"blk\.(\d+)\.(.+)", name)) and m[2] in per_block:
            sub, transpose = per_block[m[2]]
            path = f"{prefix}_{m[1]}/{sub}"
        else:
            raise ValueError(f"{source}: unexpected tensor {name!r} for a "
                             f"{config.model_type} GGUF")
        heads = 0
        if config.model_type == "llama" and re.search(r"attn_[qk]\.(weight|bias)$", name):
            heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
            rows = int(tensor.shape[-1])  # GGUF lists dims fastest-first
            if rows % (2 * heads):
                raise ValueError(f"{source}: tensor {name!r} has {rows} rows, not a "
                                 f"multiple of 2 x {heads} heads")
        if tensor.tensor_type in XLA_DEQUANTIZED and len(tensor.shape) == 2:
            shape = tuple(int(d) for d in reversed(tensor.shape))
            try:  # straight to a float32 device array, rows reordered, head transposed
                flat[path] = dequantize_blocks(tensor.data, tensor.tensor_type, shape,
                                               rope_heads=heads, transpose=transpose)
            except ValueError as err:
                raise ValueError(f"{source}: tensor {name!r}: {err}: the file is "
                                 "corrupted") from None
        else:
            array = _dequantize(tensor, source)
            if heads:
                array = _unpermute_rope_rows(array, heads)
            flat[path] = array.T if transpose else array
        origin[path] = name
        if transpose:
            transposed.add(path)
    return config, assemble_params(config, flat, source, origin, frozenset(transposed)), reader
