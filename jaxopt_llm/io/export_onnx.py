"""Export to ONNX (onnxruntime): one graph per model, written with `onnx.helper`.

Decoders (Llama family: llama, mistral, qwen2, SmolLM2; GPT-2) get one graph that serves
both prefill and KV-cache decode, in the layout transformers' ONNX exports use:
  inputs   input_ids (batch, seq) int64, attention_mask (batch, past + seq) int64 (1 = a
           real token), position_ids (batch, seq) int64, and per layer i
           past_key_values.{i}.key / .value (batch, kv_heads, past, head_dim) float32
           (past may be 0: a prefill);
  outputs  logits (batch, seq, vocab) float32 and present.{i}.key / .value
           (batch, kv_heads, past + seq, head_dim), the next step's past.
A query at slot past + t sees the real keys at or before its own slot (and within the
sliding window, if the model has one). Batch, sequence and past lengths are dynamic.

Encoders (bert) get input_ids and attention_mask and return last_hidden_state
(batch, seq, hidden) and sentence_embedding (batch, hidden): mean-pooled over the real
tokens and L2-normalised, as `encoders.embed`.

Weights (`plan_onnx` says which way each goes, before any work; `strict` refuses where a
compressed weight would be widened):
  float arrays            float32 initializers;
  QuantizedWeight, integer zero points (symmetric or asymmetric, 4 or 8 bits, per
                          channel or in groups)  → the codes as INT4/UINT4/INT8/UINT8
                          initializers (two 4-bit codes per byte) and DequantizeLinear
                          (opset 21, blockwise along the input axis) before the MatMul,
                          which onnxruntime fuses into MatMulNBits: the codes stay packed
                          in memory. W8A8 weights (act_bits 8) contract int8 × int8 in
                          MatMulInteger after quantizing the activations per token as
                          `quantized.quantize_activations_per_token` does;
  QuantizedWeight with float offsets (w = s·q + m)  → DequantizeLinear of s·q, and the
                          offsets' share x·M computed from the per-group sums of x (exact);
  LowRankWeight           its two factors, two MatMuls (each factor as above);
  ScaledInputWeight       x · (1/s) before the inner weight;
  masked, N:M sparse, anything else  → widened to a float32 initializer (listed).
Token tables are written float, or, when int8 symmetric per row (the weight-quantizing
built-in recipes), as INT8 codes with one scale per row behind DequantizeLinear: the file
keeps the codes, onnxruntime dequantizes the table as it runs (listed as "int8-table");
other quantized tables are widened. A tied head reads the same table through
Gemm(transB) without a second copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jaxopt_llm import tree
from jaxopt_llm.io import atomic
from jaxopt_llm.io.tokenizer import Tokenizer
from jaxopt_llm.models.config import ModelConfig
from jaxopt_llm.models.family import family_spec
from jaxopt_llm.models.layers import rope_inverse_frequencies
from jaxopt_llm.weights import (
    LowRankWeight,
    QuantizedWeight,
    ScaledInputWeight,
    WeightLeaf,
    materialize,
)

OPSET = 21  # blockwise DequantizeLinear and INT4/UINT4 tensors
IR_VERSION = 10  # what onnxruntime 1.20+ reads
MARKER = atomic.EXPORT_MARKER
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the initializers (external data, next to MODEL_FILE)
ONNX_PIP = "pip install -e '.[onnx]'  (or: pip install onnx onnxruntime)"
FAMILIES = ("llama", "gpt2", "bert")


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ValueError(f"ONNX export needs the onnx package; install it with: {ONNX_PIP}"
                         ) from None
    return onnx


@dataclasses.dataclass(frozen=True)
class ONNXTensor:
    """One parameter: what it is here and how it is written ("float", "packed": integer
    codes kept, "int8-activations": W8A8 codes in MatMulInteger, "factors": two
    matmuls, "int8-table": a token table's int8 codes and row scales, dequantized by the
    runtime, "widened": written as its dense float32 weight)."""

    path: str
    stored_as: str
    how: str
    written_as: str


def _how(leaf: Any) -> tuple[str, str]:
    """(how, written_as) for one parameter."""
    if not isinstance(leaf, WeightLeaf):
        return "float", "FLOAT"
    if isinstance(leaf, ScaledInputWeight):
        how, written = _how(leaf.weight)
        return how, f"Mul(1/s)+{written}"
    if isinstance(leaf, LowRankWeight):
        parts = [_how(f) for f in (leaf.u, leaf.v)]
        how = "widened" if any(h == "widened" for h, _ in parts) else "factors"
        return how, "+".join(w for _, w in parts)
    if isinstance(leaf, QuantizedWeight) and leaf.axis == 0 and len(leaf.shape) == 2 \
            and leaf.bits in (4, 8):
        kind = "INT" if leaf.symmetric else "UINT"
        if leaf.act_bits == 8 and leaf.act_group is None and leaf.stored_as_int8:
            return "int8-activations", "MatMulInteger(INT8)"
        blocks = " with float activations (act_group not expressed)" if leaf.act_group else ""
        return "packed", f"DequantizeLinear({kind}{leaf.bits}){blocks}"
    return "widened", "FLOAT"


def plan_onnx(config: ModelConfig, params: Any, *, strict: bool = False) -> list[ONNXTensor]:
    """What `export_onnx` writes for each parameter, before any work.

    Args:
        config: the model config (Llama family, gpt2 or bert).
        params: the parameters (any representation).
        strict: refuse (ValueError) where a compressed weight would be widened.

    Returns:
        One `ONNXTensor` per parameter.

    Raises:
        ValueError: an unsupported family, or a widening under `strict`.

    Example:
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> import jax
        >>> rows = plan_onnx(ModelConfig.tiny(), init_params(ModelConfig.tiny(),
        ...                                                  jax.random.key(0)))
        >>> {row.how for row in rows}
        {'float'}
    """
    if config.family not in FAMILIES:
        raise ValueError(f"ONNX export supports the {', '.join(FAMILIES)} families, got "
                         f"family {config.family!r}")
    rows = []
    for path, leaf in tree.flatten(params).items():
        stored = leaf.describe() if isinstance(leaf, WeightLeaf) else str(np.dtype(leaf.dtype))
        how, written = _how(leaf)
        if path.endswith("embedding") and isinstance(leaf, WeightLeaf):
            how, written = (("int8-table", "DequantizeLinear(INT8, per row)")
                            if _int8_rows(leaf) else ("widened", "FLOAT"))
        if strict and how == "widened" and isinstance(leaf, WeightLeaf):
            raise ValueError(f"ONNX export --strict: {path} ({stored}) would be widened to "
                             "float32; ONNX keeps integer codes (4/8-bit, per channel or "
                             "grouped) and low-rank factors only")
        rows.append(ONNXTensor(path, stored, how, written))
    return rows


class _Graph:
    """Nodes and initializers of one graph, with generated unique names."""

    def __init__(self, onnx: Any):
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", outputs: int = 1,
           **attrs: Any) -> Any:
        names = [self.name(hint or op_type) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, names,
                                                     name=self.name("n"), **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: Any, hint: str = "c", dtype: Any = None) -> str:
        array = np.asarray(value, dtype=dtype)
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def tensor(self, array: np.ndarray, name: str) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array),
                                                                   name))
        return name


def _np(x: Any) -> np.ndarray:
    return np.asarray(x)


def _dequantized(g: _Graph, leaf: QuantizedWeight, path: str) -> str:
    """DequantizeLinear of the codes (K, N), blockwise along K (per channel: one block)."""
    import ml_dtypes

    codes = _np(leaf.codes())  # (K, N) int32: signed if symmetric, else unsigned
    k = codes.shape[0]
    block = k if leaf.granularity != "group" else leaf.group_size
    scale = _np(leaf.scale).astype(np.float32)  # (G, N) (per channel: (1, N))
    if scale.shape[0] == 1 and block != k:
        block = k
    width = codes.shape[1]
    scale = np.ascontiguousarray(np.broadcast_to(scale, (scale.shape[0], width)))  # per tensor
    kind = {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8,
            (8, False): np.uint8}[(leaf.bits, leaf.symmetric)]
    inputs = [g.tensor(codes.astype(kind), f"{path}/codes"), g.tensor(scale, f"{path}/scale")]
    if leaf.zero_point is not None and leaf.zero == "integer":
        zero = np.broadcast_to(_np(leaf.zero_point), scale.shape)
        inputs.append(g.tensor(zero.astype(kind), f"{path}/zero"))
    # a last partial group is a short block: DequantizeLinear takes ⌈K/block⌉ scale rows
    return g.op("DequantizeLinear", inputs, "dq", axis=0, block_size=block)


def _linear_w8a8(g: _Graph, x: str, leaf: QuantizedWeight, path: str) -> str:
    """Per-token symmetric int8 activations × int8 codes → int32, rescaled (W8A8)."""
    codes = _np(leaf.codes()).astype(np.int8)
    scale = _np(leaf.scale).astype(np.float32)  # (1, N) per channel
    absmax = g.op("ReduceMax", [g.op("Abs", [x]), g.const([-1], dtype=np.int64)], keepdims=1)
    absmax = g.op("Max", [absmax, g.const(np.float32(np.finfo(np.float32).tiny))])
    q = g.op("Mul", [x, g.op("Div", [g.const(np.float32(127.0)), absmax])])
    q = g.op("Cast", [g.op("Clip", [g.op("Round", [q]), g.const(np.float32(-127)),
                                    g.const(np.float32(127))])], to=3)  # INT8
    acc = g.op("MatMulInteger", [q, g.tensor(codes, f"{path}/codes")])
    x_scale = g.op("Div", [absmax, g.const(np.float32(127.0))])
    out = g.op("Mul", [g.op("Cast", [acc], to=1), x_scale])
    return g.op("Mul", [out, g.tensor(scale.reshape(-1), f"{path}/scale")])


def _linear(g: _Graph, x: str, leaf: Any, path: str) -> str:
    """x (…, K) @ the kernel `leaf`, in the form `plan_onnx` chose."""
    how, _ = _how(leaf)
    if isinstance(leaf, ScaledInputWeight):
        inverse = (1.0 / _np(leaf.input_scale)).astype(np.float32)
        return _linear(g, g.op("Mul", [x, g.tensor(inverse, f"{path}/inverse_input_scale")]),
                       leaf.weight, path)
    if isinstance(leaf, LowRankWeight) and how == "factors":
        return _linear(g, _linear(g, x, leaf.u, f"{path}/u"), leaf.v, f"{path}/v")
    if how == "int8-activations":
        return _linear_w8a8(g, x, leaf, path)
    if how == "packed":
        y = g.op("MatMul", [x, _dequantized(g, leaf, path)])
        if leaf.zero == "float":  # w = s·q + m per group: x·M from the groups' sums of x
            k = leaf.shape[0]
            block = leaf.group_size if leaf.granularity == "group" else k
            offset = _np(leaf.zero_point).astype(np.float32)  # (G, N)
            groups = offset.shape[0]
            pad = groups * block - k
            xs = x if not pad else g.op("Pad", [x, g.const([0, 0, 0, pad], dtype=np.int64)])
            sums = g.op("ReduceSum", [g.op("Reshape", [xs, g.const([0, 0, groups, block],
                                                                   dtype=np.int64)]),
                                      g.const([-1], dtype=np.int64)], keepdims=0)
            y = g.op("Add", [y, g.op("MatMul", [sums, g.tensor(offset, f"{path}/offset")])])
        return y
    dense = _np(materialize(leaf)).astype(np.float32)
    return g.op("MatMul", [x, g.tensor(dense, path)])


def _bias(g: _Graph, y: str, block: dict[str, Any], name: str) -> str:
    bias = block.get(f"{name}/bias")
    if bias is None:
        return y
    return g.op("Add", [y, g.tensor(_np(bias).astype(np.float32), f"{name}/bias")])


def _projection(g: _Graph, x: str, flat: dict[str, Any], path: str) -> str:
    return _bias(g, _linear(g, x, flat[f"{path}/kernel"], path), flat, path)


def _rms_norm(g: _Graph, x: str, scale: np.ndarray, eps: float, name: str) -> str:
    mean = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1], dtype=np.int64)], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, g.const(np.float32(eps))])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), g.tensor(scale.astype(np.float32), name)])


def _layer_norm(g: _Graph, x: str, scale: np.ndarray, bias: np.ndarray, eps: float,
                name: str) -> str:
    return g.op("LayerNormalization", [x, g.tensor(scale.astype(np.float32), f"{name}/scale"),
                                       g.tensor(bias.astype(np.float32), f"{name}/bias")],
                axis=-1, epsilon=float(eps))


def _heads(g: _Graph, x: str, heads: int, head_dim: int) -> str:
    """(B, T, H·D) → (B, H, T, D)."""
    shaped = g.op("Reshape", [x, g.const([0, 0, heads, head_dim], dtype=np.int64)])
    return g.op("Transpose", [shaped], perm=[0, 2, 1, 3])


def _attention(g: _Graph, q: str, k: str, v: str, bias: str, heads: int, kv_heads: int,
               head_dim: int) -> str:
    """softmax(q·kᵀ/√D + bias)·v with q (B, H, T, D), k/v (B, Hkv, S, D) → (B, T, H·D)."""
    if kv_heads != heads:  # grouped-query: repeat each kv head for its query heads
        group = heads // kv_heads
        repeat = g.const([1, 1, group, 1, 1], dtype=np.int64)
        k, v = (g.op("Reshape", [g.op("Tile", [g.op("Unsqueeze", [t, g.const(
            [2], dtype=np.int64)]), repeat]), g.const([0, heads, -1, head_dim],
                                                       dtype=np.int64)]) for t in (k, v))
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = g.op("Add", [g.op("Mul", [scores, g.const(np.float32(1 / math.sqrt(head_dim)))]),
                          bias])
    out = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    out = g.op("Transpose", [out], perm=[0, 2, 1, 3])
    return g.op("Reshape", [out, g.const([0, 0, heads * head_dim], dtype=np.int64)])


_NEG = np.float32(np.finfo(np.float32).min)


def _decoder_io(g: _Graph, config: ModelConfig) -> tuple[list, list, str]:
    """The decoder graph's inputs and logits output, and the attention bias (B, 1, T, S):
    key j visible to query t iff j ≤ past + t, real, and within the sliding window."""
    onnx = g.onnx
    tp = onnx.TensorProto
    inputs = [onnx.helper.make_tensor_value_info("input_ids", tp.INT64, ["batch", "seq"]),
              onnx.helper.make_tensor_value_info("attention_mask", tp.INT64,
                                                 ["batch", "total"]),
              onnx.helper.make_tensor_value_info("position_ids", tp.INT64, ["batch", "seq"])]
    outputs = [onnx.helper.make_tensor_value_info("logits", tp.FLOAT,
                                                  ["batch", "seq", config.vocab_size])]
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1, dtype=np.int64)])
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1, dtype=np.int64)])
    past = g.op("Sub", [total, seq])
    query_slot = g.op("Add", [g.op("Range", [g.const(0, dtype=np.int64), seq,
                                             g.const(1, dtype=np.int64)]), past])
    query_slot = g.op("Unsqueeze", [query_slot, g.const([1], dtype=np.int64)])  # (T, 1)
    key_slot = g.op("Range", [g.const(0, dtype=np.int64), total, g.const(1, dtype=np.int64)])
    key_slot = g.op("Unsqueeze", [key_slot, g.const([0], dtype=np.int64)])  # (1, S)
    allowed = g.op("LessOrEqual", [key_slot, query_slot])
    if config.sliding_window is not None:
        within = g.op("Less", [g.op("Sub", [query_slot, key_slot]),
                               g.const(config.sliding_window, dtype=np.int64)])
        allowed = g.op("And", [allowed, within])
    real = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const([1, 2], dtype=np.int64)])],
                to=9)  # BOOL (B, 1, 1, S)
    visible = g.op("And", [g.op("Unsqueeze", [allowed, g.const([0, 1], dtype=np.int64)]), real])
    return inputs, outputs, g.op("Where", [visible, g.const(np.float32(0)), g.const(_NEG)])


def _with_cache(g: _Graph, config: ModelConfig, i: int, k: str, v: str, inputs: list,
                outputs: list) -> tuple[str, str]:
    """Layer i's keys and values (B, Hkv, T, D) after its past ones; adds the past inputs
    and the present outputs."""
    onnx = g.onnx
    tp = onnx.TensorProto
    kv, hd = config.num_kv_heads, config.head_dim
    past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    for name in (past_k, past_v):
        inputs.append(onnx.helper.make_tensor_value_info(name, tp.FLOAT,
                                                         ["batch", kv, "past", hd]))
    k = g.op("Concat", [past_k, k], axis=2)
    v = g.op("Concat", [past_v, v], axis=2)
    for name, value in ((f"present.{i}.key", k), (f"present.{i}.value", v)):
        g.nodes.append(onnx.helper.make_node("Identity", [value], [name]))
        outputs.append(onnx.helper.make_tensor_value_info(name, tp.FLOAT,
                                                          ["batch", kv, "total", hd]))
    return k, v


def _tied_head(g: _Graph, config: ModelConfig, x: str, table: str) -> None:
    """logits from the token table read transposed (Gemm transB): no second copy."""
    onnx = g.onnx
    rows = g.op("Reshape", [x, g.const([-1, config.hidden_size], dtype=np.int64)])
    logits = g.op("Gemm", [rows, table], transB=1)
    shape = g.op("Concat", [g.op("Shape", ["input_ids"]),
                            g.const([config.vocab_size], dtype=np.int64)], axis=0)
    g.nodes.append(onnx.helper.make_node("Reshape", [logits, shape], ["logits"]))


def _int8_rows(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedWeight) and leaf.is_int8_row_table


def _table(g: _Graph, flat: dict[str, Any], path: str) -> str:
    """A token table (V, D): float32, or its int8 codes dequantized per row."""
    leaf = flat[path]
    if _int8_rows(leaf):
        codes = _np(leaf.codes()).T.astype(np.int8)  # codes() is (D, V) for a table
        scale = _np(leaf.scale).astype(np.float32).reshape(-1)  # (V,)
        return g.op("DequantizeLinear", [g.tensor(codes, f"{path}/codes"),
                                         g.tensor(scale, f"{path}/scale")], "dq", axis=0)
    return g.tensor(_np(materialize(leaf)).astype(np.float32), path)


def _llama_graph(g: _Graph, config: ModelConfig, flat: dict[str, Any]) -> tuple[list, list]:
    onnx = g.onnx
    spec = family_spec(config)
    hd, heads, kv = config.head_dim, config.num_heads, config.num_kv_heads
    inputs, outputs, bias = _decoder_io(g, config)
    table_name = _table(g, flat, spec.embedding)
    x = g.op("Gather", [table_name, "input_ids"], axis=0)
    # RoPE: cos/sin (B, 1, T, D) from position_ids
    inv_freq = _np(rope_inverse_frequencies(hd, config.rope_theta,
                                            config.rope_scaling_dict)).astype(np.float32)
    positions = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=1),
                                   g.const([-1], dtype=np.int64)])
    freqs = g.op("Mul", [positions, g.const(inv_freq)])
    angles = g.op("Concat", [freqs, freqs], axis=-1)
    cos, sin = (g.op("Unsqueeze", [g.op(f, [angles]), g.const([1], dtype=np.int64)])
                for f in ("Cos", "Sin"))

    def rope(t: str) -> str:
        first, second = g.op("Split", [t, g.const([hd // 2, hd // 2], dtype=np.int64)],
                             outputs=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
        return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [rotated, sin])])

    for i in range(config.num_layers):
        block = spec.block(i)
        attn = f"{block}/{spec.attention}"
        h = _rms_norm(g, x, _np(flat[f"{block}/input_norm/scale"]), config.norm_eps,
                      f"{block}/input_norm/scale")
        q = rope(_heads(g, _projection(g, h, flat, f"{attn}/q_proj"), heads, hd))
        k = rope(_heads(g, _projection(g, h, flat, f"{attn}/k_proj"), kv, hd))
        v = _heads(g, _projection(g, h, flat, f"{attn}/v_proj"), kv, hd)
        k, v = _with_cache(g, config, i, k, v, inputs, outputs)
        out = _attention(g, q, k, v, bias, heads, kv, hd)
        x = g.op("Add", [x, _projection(g, out, flat, f"{attn}/o_proj")])
        h = _rms_norm(g, x, _np(flat[f"{block}/post_attention_norm/scale"]), config.norm_eps,
                      f"{block}/post_attention_norm/scale")
        mlp = f"{block}/{spec.mlp}"
        gate = _projection(g, h, flat, f"{mlp}/gate_proj")
        up = _projection(g, h, flat, f"{mlp}/up_proj")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, _projection(g, act, flat, f"{mlp}/down_proj")])
    x = _rms_norm(g, x, _np(flat["norm/scale"]), config.norm_eps, "norm/scale")
    if config.tie_word_embeddings:
        _tied_head(g, config, x, table_name)
    else:
        g.nodes.append(onnx.helper.make_node(
            "Identity", [_linear(g, x, flat["lm_head/kernel"], "lm_head/kernel")], ["logits"]))
    return inputs, outputs


def _gelu_tanh(g: _Graph, x: str) -> str:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), GPT-2's GELU."""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [cube, g.const(np.float32(0.044715))])]),
                         g.const(np.float32(math.sqrt(2 / math.pi)))])
    return g.op("Mul", [g.op("Mul", [x, g.const(np.float32(0.5))]),
                        g.op("Add", [g.const(np.float32(1)), g.op("Tanh", [inner])])])


def _gpt2_graph(g: _Graph, config: ModelConfig, flat: dict[str, Any]) -> tuple[list, list]:
    hd, heads = config.head_dim, config.num_heads
    inner = heads * hd
    inputs, outputs, bias = _decoder_io(g, config)
    table_name = _table(g, flat, "wte/embedding")
    positions = g.op("Clip", ["position_ids", g.const(0, dtype=np.int64),
                              g.const(config.max_position_embeddings - 1, dtype=np.int64)])
    x = g.op("Add", [g.op("Gather", [table_name, "input_ids"], axis=0),
                     g.op("Gather", [_table(g, flat, "wpe/embedding"), positions], axis=0)])
    for i in range(config.num_layers):
        block = f"h_{i}"
        h = _layer_norm(g, x, _np(flat[f"{block}/ln_1/scale"]), _np(flat[f"{block}/ln_1/bias"]),
                        config.norm_eps, f"{block}/ln_1")
        qkv = _projection(g, h, flat, f"{block}/attn/c_attn")
        q, k, v = (_heads(g, part, heads, hd) for part in g.op(
            "Split", [qkv, g.const([inner] * 3, dtype=np.int64)], outputs=3, axis=-1))
        k, v = _with_cache(g, config, i, k, v, inputs, outputs)
        out = _attention(g, q, k, v, bias, heads, heads, hd)
        x = g.op("Add", [x, _projection(g, out, flat, f"{block}/attn/c_proj")])
        h = _layer_norm(g, x, _np(flat[f"{block}/ln_2/scale"]), _np(flat[f"{block}/ln_2/bias"]),
                        config.norm_eps, f"{block}/ln_2")
        hidden = _gelu_tanh(g, _projection(g, h, flat, f"{block}/mlp/c_fc"))
        x = g.op("Add", [x, _projection(g, hidden, flat, f"{block}/mlp/c_proj")])
    x = _layer_norm(g, x, _np(flat["ln_f/scale"]), _np(flat["ln_f/bias"]), config.norm_eps,
                    "ln_f")
    _tied_head(g, config, x, table_name)
    return inputs, outputs


def _bert_graph(g: _Graph, config: ModelConfig, flat: dict[str, Any]) -> tuple[list, list]:
    onnx = g.onnx
    tp = onnx.TensorProto
    hd, heads = config.head_dim, config.num_heads
    inputs = [onnx.helper.make_tensor_value_info("input_ids", tp.INT64, ["batch", "seq"]),
              onnx.helper.make_tensor_value_info("attention_mask", tp.INT64, ["batch", "seq"])]
    outputs = [onnx.helper.make_tensor_value_info("last_hidden_state", tp.FLOAT,
                                                  ["batch", "seq", config.hidden_size]),
               onnx.helper.make_tensor_value_info("sentence_embedding", tp.FLOAT,
                                                  ["batch", config.hidden_size])]

    def table(name: str) -> str:
        return _table(g, flat, f"{name}/embedding")

    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1, dtype=np.int64)])
    positions = g.op("Range", [g.const(0, dtype=np.int64), seq, g.const(1, dtype=np.int64)])
    x = g.op("Add", [g.op("Gather", [table("word_embeddings"), "input_ids"], axis=0),
                     g.op("Gather", [table("position_embeddings"), positions], axis=0)])
    type0 = _np(materialize(flat["token_type_embeddings/embedding"]))[0].astype(np.float32)
    x = g.op("Add", [x, g.tensor(type0, "token_type_embeddings/row0")])
    x = _layer_norm(g, x, _np(flat["embeddings_norm/scale"]), _np(flat["embeddings_norm/bias"]),
                    config.norm_eps, "embeddings_norm")
    real = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const([1, 2], dtype=np.int64)])],
                to=9)
    bias = g.op("Where", [real, g.const(np.float32(0)), g.const(_NEG)])  # (B, 1, 1, S)
    for i in range(config.num_layers):
        block = f"layer_{i}"
        q, k, v = (_heads(g, _projection(g, x, flat, f"{block}/attn/{name}"), heads, hd)
                   for name in ("query", "key", "value"))
        out = _projection(g, _attention(g, q, k, v, bias, heads, heads, hd), flat,
                          f"{block}/attn/output")
        x = _layer_norm(g, g.op("Add", [x, out]), _np(flat[f"{block}/attn_norm/scale"]),
                        _np(flat[f"{block}/attn_norm/bias"]), config.norm_eps,
                        f"{block}/attn_norm")
        hidden = _projection(g, x, flat, f"{block}/mlp/intermediate")
        gelu = g.op("Mul", [g.op("Mul", [hidden, g.const(np.float32(0.5))]), g.op("Add", [
            g.const(np.float32(1)), g.op("Erf", [g.op("Mul", [hidden, g.const(
                np.float32(1 / math.sqrt(2)))])])])])
        out = _projection(g, gelu, flat, f"{block}/mlp/output")
        x = _layer_norm(g, g.op("Add", [x, out]), _np(flat[f"{block}/mlp_norm/scale"]),
                        _np(flat[f"{block}/mlp_norm/bias"]), config.norm_eps,
                        f"{block}/mlp_norm")
    g.nodes.append(onnx.helper.make_node("Identity", [x], ["last_hidden_state"]))
    weights = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=1),
                                 g.const([-1], dtype=np.int64)])
    summed = g.op("ReduceSum", [g.op("Mul", [x, weights]), g.const([1], dtype=np.int64)],
                  keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [weights, g.const([1], dtype=np.int64)],
                              keepdims=0), g.const(np.float32(1))])
    mean = g.op("Div", [summed, count])
    norm = g.op("Max", [g.op("ReduceL2", [mean, g.const([-1], dtype=np.int64)], keepdims=1),
                        g.const(np.float32(1e-12))])
    g.nodes.append(onnx.helper.make_node("Div", [mean, norm], ["sentence_embedding"]))
    return inputs, outputs


def onnx_model(config: ModelConfig, params: Any, *, strict: bool = False) -> tuple[Any, list]:
    """The ONNX ModelProto of a model (in memory), and `plan_onnx`'s rows.

    Args:
        config: the model config (Llama family, gpt2 or bert).
        params: the parameters (any representation `plan_onnx` accepts).
        strict: refuse instead of widening a compressed weight.

    Returns:
        (onnx.ModelProto, rows).

    Example:
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> import jax
        >>> model, rows = onnx_model(ModelConfig.tiny(), init_params(ModelConfig.tiny(),
        ...                                                          jax.random.key(0)))
        >>> [i.name for i in model.graph.input][:3]
        ['input_ids', 'attention_mask', 'position_ids']
    """
    onnx = _onnx()
    rows = plan_onnx(config, params, strict=strict)
    flat = tree.flatten(params)
    g = _Graph(onnx)
    build = {"bert": _bert_graph, "gpt2": _gpt2_graph}.get(config.family, _llama_graph)
    inputs, outputs = build(g, config, flat)
    graph = onnx.helper.make_graph(g.nodes, f"jaxopt_llm_{config.model_type}", inputs, outputs,
                                   g.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   ir_version=IR_VERSION, producer_name="jaxopt-llm")
    return model, rows


def export_onnx(config: ModelConfig, params: Any, tokenizer: Tokenizer | None,
                out: str | Path, *, strict: bool = False) -> tuple[Path, list[ONNXTensor]]:
    """Write an ONNX export directory (atomically): model.onnx (the graph) with its weights
    in model.onnx.data, config.json (our model config), the tokenizer, and the export
    marker. Load it with `onnxruntime.InferenceSession(dir / "model.onnx")`; set the
    session config entry "session.qdq_matmulnbits_accuracy_level" to "1" for results equal
    to ours (float32 accumulation in the 4/8-bit matmuls).

    Args:
        config: the model config.
        params: the parameters.
        tokenizer: the tokenizer, or None.
        out: the directory: new, or a previous ONNX export (replaced whole).
        strict: refuse instead of widening a compressed weight.

    Returns:
        (the directory, `plan_onnx`'s rows).

    Example:
        >>> export_onnx(m.config, params, m.tokenizer, "smol-onnx")  # doctest: +SKIP
    """
    onnx = _onnx()
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not atomic.is_previous_export(out, "onnx"))):
        raise ValueError(f"ONNX export: {str(out)!r} exists and is not a previous ONNX "
                         "export; refusing to replace it")
    model, rows = onnx_model(config, params, strict=strict)
    with atomic.staged_dir(out) as tmp:
        # Weights in a separate file: onnxruntime maps it instead of copying it out of
        # the protobuf (SmolLM2 w4g128: 322 MiB resident after load against 377 MiB),
        # and models over protobuf's 2 GB limit need it anyway.
        onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE,
                        size_threshold=1024)
        if (tmp / DATA_FILE).exists():  # onnx creates it owner-only; give it the graph's mode
            shutil.copymode(tmp / MODEL_FILE, tmp / DATA_FILE)
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / MARKER).write_text(json.dumps({"format": "onnx", "tensors": len(rows)}) + "\n")
    return out, rows



__all__ = ["DATA_FILE", "MARKER", "MODEL_FILE", "ONNXTensor", "export_onnx", "onnx_model",
           "plan_onnx"]
