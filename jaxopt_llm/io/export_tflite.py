"""Export to TFLite (LiteRT): one flatbuffer per model, written directly with the schema
LiteRT ships (`ai_edge_litert.schema_py_generated`); TensorFlow is not needed.

The graph has fixed shapes, chosen at export (`batch`, `seq_len`):
  decoders (Llama family, GPT-2)  input_ids (batch, seq_len) int32 → logits
                                  (batch, seq_len, vocab) float32. Causal: the logits at
                                  position t depend on tokens 0..t only, so a shorter
                                  prompt is right-padded with any token and read at its
                                  last real position. Positions are 0..seq_len-1 (no KV
                                  cache: each step runs the whole window).
  encoders (bert)                 input_ids and attention_mask (batch, seq_len) int32 →
                                  last_hidden_state (batch, seq_len, hidden) and
                                  sentence_embedding (batch, hidden), mean-pooled over the
                                  real tokens and L2-normalised, as `encoders.embed`.
The signature "serving_default" names these tensors for `get_signature_runner`.

Weights (`plan_tflite` says which way each goes, before any work; `strict` refuses where a
compressed weight would be widened or requantized):
  float arrays        FLOAT32 tensors (matrices as FULLY_CONNECTED's (out, in));
  QuantizedWeight with one scale per output channel (or per tensor) and integer zero
                      points, ≤ 7 bits or symmetric 8 bits → its signed codes q - z as an
                      INT8 tensor (4-bit codes in 8-bit containers) with the channel
                      scales as the tensor's quantization: exact. `int8_matmul` picks how
                      LiteRT runs it:
                        "dynamic"  LiteRT's dynamic-range FULLY_CONNECTED (int8 × int8:
                                   activations quantized per row at run time; its builtin
                                   kernel rounds them symmetrically as our W8A8 does, the
                                   XNNPACK delegate asymmetrically);
                        "float"    a DEQUANTIZE before a float FULLY_CONNECTED: results
                                   equal ours (the file stays int8; LiteRT widens the
                                   weight once when it prepares the graph).
                      W8A8 weights (act_bits 8) always run dynamic-range;
  QuantizedWeight in groups, with float offsets, or asymmetric 8-bit → requantized to
                      INT8 with one symmetric scale per output channel (listed: each value
                      moves by at most half an int8 step);
  LowRankWeight       its two factors, two FULLY_CONNECTED (each factor as above);
  ScaledInputWeight   x · (1/s) before the inner weight;
  masked, N:M sparse, anything else → widened to FLOAT32 (listed).
Token tables are written float, or, when int8 symmetric per row (the weight-quantizing
built-in recipes), as INT8 with one scale per row behind a DEQUANTIZE (the file keeps the
codes; LiteRT widens the table once when it prepares the graph; "int8-table"); other
quantized tables are widened. A tied head reads the same table as FULLY_CONNECTED weights
without a second copy. A flatbuffer holds at most
2 GiB: a larger model is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxopt_llm import tree
from jaxopt_llm.errors import ParameterError
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

MARKER = atomic.EXPORT_MARKER
MODEL_FILE = "model.tflite"
LITERT_PIP = "pip install -e '.[tflite]'  (or: pip install ai-edge-litert)"
FAMILIES = ("llama", "gpt2", "bert")
INT8_MATMUL = ("dynamic", "float")
SIGNATURE = "serving_default"
DEFAULT_SEQ_LEN = 128
MAX_BYTES = 2**31 - 2**20  # flatbuffers address 2 GiB; leave room for the graph itself
_NEG = np.float32(np.finfo(np.float32).min)


def _schema():
    try:
        import flatbuffers  # noqa: F401
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise ValueError("TFLite export needs the ai-edge-litert package (its schema and "
                         f"interpreter); install it with: {LITERT_PIP}") from None
    return schema_py_generated


@dataclasses.dataclass(frozen=True)
class TFLiteTensor:
    """One parameter: what it is here and how it is written ("float"; "packed": integer
    codes kept as INT8; "int8-activations": W8A8 codes in a dynamic-range matmul;
    "requantized": new INT8 codes per channel; "factors": two matmuls; "int8-table": a
    token table's INT8 codes and row scales, dequantized at load; "widened": its dense
    float32 weight)."""

    path: str
    stored_as: str
    how: str
    written_as: str


def _int8_exact(leaf: QuantizedWeight) -> bool:
    """Whether w = s·(q - z) is s times an int8 code with one scale per output channel: a
    per-channel (or per-tensor) grid, integer zero points, and q - z within int8 (always
    for ≤ 7 bits or symmetric 8-bit codes)."""
    return (np.shape(leaf.scale)[0] == 1 and leaf.zero == "integer"
            and (leaf.bits <= 7 or leaf.symmetric))


def _how(leaf: Any, int8_matmul: str) -> tuple[str, str]:
    """(how, written_as) for one parameter."""
    if not isinstance(leaf, WeightLeaf):
        return "float", "FLOAT32"
    if isinstance(leaf, ScaledInputWeight):
        how, written = _how(leaf.weight, int8_matmul)
        return how, f"MUL(1/s)+{written}"
    if isinstance(leaf, LowRankWeight):
        parts = [_how(f, int8_matmul) for f in (leaf.u, leaf.v)]
        kinds = {h for h, _ in parts}
        how = next((k for k in ("widened", "requantized") if k in kinds), "factors")
        return how, "+".join(w for _, w in parts)
    if isinstance(leaf, QuantizedWeight) and leaf.axis == 0 and len(leaf.shape) == 2:
        if leaf.act_bits == 8 and leaf.act_group is None and _int8_exact(leaf):
            return "int8-activations", "INT8 (dynamic-range FULLY_CONNECTED)"
        run = ("dynamic-range FULLY_CONNECTED" if int8_matmul == "dynamic"
               else "DEQUANTIZE+FULLY_CONNECTED")
        if leaf.act_group:
            run += ", act_group not expressed"
        if _int8_exact(leaf):
            bits = f" ({leaf.bits}-bit codes)" if leaf.bits < 8 else ""
            return "packed", f"INT8{bits} ({run})"
        return "requantized", f"INT8 per channel ({run})"
    return "widened", "FLOAT32"


def plan_tflite(config: ModelConfig, params: Any, *, strict: bool = False,
                int8_matmul: str = "dynamic") -> list[TFLiteTensor]:
    """What `export_tflite` writes for each parameter, before any work.

    Args:
        config: the model config (Llama family, gpt2 or bert).
        params: the parameters (any representation).
        strict: refuse (ValueError) where a compressed weight would be widened or
            requantized.
        int8_matmul: "dynamic" or "float" (see the module docstring).

    Returns:
        One `TFLiteTensor` per parameter.

    Raises:
        ValueError: an unsupported family or int8_matmul, or a widening or requantizing
            under `strict`.

    Example:
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> import jax
        >>> rows = plan_tflite(ModelConfig.tiny(), init_params(ModelConfig.tiny(),
        ...                                                    jax.random.key(0)))
        >>> {row.how for row in rows}
        {'float'}
    """
    if config.family not in FAMILIES:
        raise ValueError(f"TFLite export supports the {', '.join(FAMILIES)} families, got "
                         f"family {config.family!r}")
    if int8_matmul not in INT8_MATMUL:
        raise ParameterError("int8_matmul", int8_matmul,
                             f"TFLite export: expected one of {', '.join(INT8_MATMUL)}")
    rows = []
    for path, leaf in tree.flatten(params).items():
        stored = leaf.describe() if isinstance(leaf, WeightLeaf) else str(np.dtype(leaf.dtype))
        how, written = _how(leaf, int8_matmul)
        if path.endswith("embedding") and isinstance(leaf, WeightLeaf):
            how, written = (("int8-table", "INT8 per row (DEQUANTIZE)") if _int8_rows(leaf)
                            else ("widened", "FLOAT32"))
        if strict and how in ("widened", "requantized") and isinstance(leaf, WeightLeaf):
            raise ValueError(f"TFLite export --strict: {path} ({stored}) would be {how} "
                             f"to {written}; TFLite keeps symmetric per-channel 4/8-bit "
                             "codes (as INT8) and low-rank factors only")
        rows.append(TFLiteTensor(path, stored, how, written))
    return rows


class _Graph:
    """Tensors, buffers and operators of one subgraph; every tensor's shape is tracked
    (LiteRT's delegates read the declared shapes)."""

    def __init__(self, schema: Any):
        self.s = schema
        self.tensors: list[Any] = []
        self.shapes: list[tuple[int, ...]] = []
        self.buffers: list[Any] = [schema.BufferT()]  # buffer 0: the empty one
        self.operators: list[Any] = []
        self.opcodes: dict[int, int] = {}
        self.data_bytes = 0
        self.names: set[str] = set()

    def unique(self, name: str) -> str:
        """`name`, or `name_N` if taken: tools (ai-edge-quantizer) key tensors by name."""
        base, n = name, 0
        while name in self.names:
            n += 1
            name = f"{base}_{n}"
        self.names.add(name)
        return name

    def tensor(self, shape: tuple[int, ...], dtype: int, name: str, data: Any = None,
               quantization: Any = None) -> int:
        t = self.s.TensorT()
        t.name = self.unique(name)
        t.shape = np.asarray(shape, np.int32)
        t.type = dtype
        t.buffer = 0
        if data is not None:
            buffer = self.s.BufferT()
            raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            buffer.data = raw
            self.data_bytes += raw.size
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        if quantization is not None:
            t.quantization = quantization
        self.tensors.append(t)
        self.shapes.append(tuple(int(d) for d in shape))
        return len(self.tensors) - 1

    def rename(self, index: int, name: str) -> None:
        self.tensors[index].name = self.unique(name)

    def const(self, value: Any, name: str = "c", dtype: Any = np.float32) -> int:
        array = np.asarray(value, dtype=dtype)
        kind = {np.dtype(np.float32): self.s.TensorType.FLOAT32,
                np.dtype(np.int32): self.s.TensorType.INT32,
                np.dtype(np.int8): self.s.TensorType.INT8}[array.dtype]
        return self.tensor(array.shape, kind, name, data=array)

    def op(self, code: int, inputs: list[int], shape: tuple[int, ...], options: Any = None,
           dtype: int | None = None, name: str = "") -> int:
        out = self.tensor(shape, self.s.TensorType.FLOAT32 if dtype is None else dtype,
                          name or f"t{len(self.tensors)}")
        self.emit(code, inputs, [out], options)
        return out

    def emit(self, code: int, inputs: list[int], outputs: list[int], options: Any = None):
        if code not in self.opcodes:
            self.opcodes[code] = len(self.opcodes)
        operator = self.s.OperatorT()
        operator.opcodeIndex = self.opcodes[code]
        operator.inputs = list(inputs)
        operator.outputs = list(outputs)
        if options is not None:
            operator.builtinOptionsType = getattr(self.s.BuiltinOptions,
                                                  type(options).__name__[:-1])
            operator.builtinOptions = options
        self.operators.append(operator)

    # ------------------------------------------------------------------ the ops used
    def _options(self, kind: str, **fields: Any) -> Any:
        options = getattr(self.s, f"{kind}T")()
        for key, value in fields.items():
            setattr(options, key, value)
        return options

    def binary(self, kind: str, a: int, b: int) -> int:
        shape = tuple(np.broadcast_shapes(self.shapes[a], self.shapes[b]))
        code = getattr(self.s.BuiltinOperator, kind.upper())
        options = self._options(f"{kind.capitalize()}Options") if kind in (
            "add", "mul", "sub", "div") else None
        return self.op(code, [a, b], shape, options)

    def add(self, a: int, b: int) -> int:
        return self.binary("add", a, b)

    def mul(self, a: int, b: int) -> int:
        return self.binary("mul", a, b)

    def unary(self, kind: str, x: int) -> int:
        return self.op(getattr(self.s.BuiltinOperator, kind), [x], self.shapes[x])

    def reduce(self, kind: str, x: int, axis: int) -> int:
        shape = list(self.shapes[x])
        axis %= len(shape)
        shape[axis] = 1
        return self.op(getattr(self.s.BuiltinOperator, kind),
                       [x, self.const([axis], dtype=np.int32)], tuple(shape),
                       self._options("ReducerOptions", keepDims=True))

    def reshape(self, x: int, shape: tuple[int, ...]) -> int:
        return self.op(self.s.BuiltinOperator.RESHAPE,
                       [x, self.const(list(shape), dtype=np.int32)], tuple(shape),
                       self._options("ReshapeOptions", newShape=list(shape)))

    def transpose(self, x: int, perm: tuple[int, ...]) -> int:
        shape = tuple(self.shapes[x][p] for p in perm)
        return self.op(self.s.BuiltinOperator.TRANSPOSE,
                       [x, self.const(list(perm), dtype=np.int32)], shape)

    def matmul(self, a: int, b: int, adj_y: bool = False) -> int:
        sa, sb = self.shapes[a], self.shapes[b]
        n = sb[-2] if adj_y else sb[-1]
        batch = tuple(np.broadcast_shapes(sa[:-2], sb[:-2]))
        return self.op(self.s.BuiltinOperator.BATCH_MATMUL, [a, b], (*batch, sa[-2], n),
                       self._options("BatchMatMulOptions", adjX=False, adjY=adj_y))

    def fully_connected(self, x: int, weight: int, bias: int = -1) -> int:
        """x (..., K) · weightᵀ with weight (N, K) → (..., N)."""
        shape = (*self.shapes[x][:-1], self.shapes[weight][0])
        return self.op(self.s.BuiltinOperator.FULLY_CONNECTED, [x, weight, bias], shape,
                       self._options("FullyConnectedOptions", keepNumDims=True))

    def gather(self, table: int, indices: int) -> int:
        shape = (*self.shapes[indices], *self.shapes[table][1:])
        return self.op(self.s.BuiltinOperator.GATHER, [table, indices], shape,
                       self._options("GatherOptions", axis=0))

    def split(self, x: int, parts: int) -> list[int]:
        shape = list(self.shapes[x])
        shape[-1] //= parts
        outs = [self.tensor(tuple(shape), self.s.TensorType.FLOAT32, f"t{len(self.tensors)}")
                for _ in range(parts)]
        self.emit(self.s.BuiltinOperator.SPLIT,
                  [self.const(len(shape) - 1, dtype=np.int32), x], outs,
                  self._options("SplitOptions", numSplits=parts))
        return outs

    def concat(self, xs: list[int], axis: int) -> int:
        shape = list(self.shapes[xs[0]])
        axis %= len(shape)
        shape[axis] = sum(self.shapes[x][axis] for x in xs)
        return self.op(self.s.BuiltinOperator.CONCATENATION, xs, tuple(shape),
                       self._options("ConcatenationOptions", axis=axis))

    def softmax(self, x: int) -> int:
        return self.op(self.s.BuiltinOperator.SOFTMAX, [x], self.shapes[x],
                       self._options("SoftmaxOptions", beta=1.0))

    def gelu(self, x: int, approximate: bool) -> int:
        return self.op(self.s.BuiltinOperator.GELU, [x], self.shapes[x],
                       self._options("GeluOptions", approximate=approximate))


def _np(x: Any) -> np.ndarray:
    return np.asarray(x)


class _Weights:
    """Writes each kernel once in the form `plan_tflite` chose."""

    def __init__(self, g: _Graph, int8_matmul: str):
        self.g = g
        self.int8_matmul = int8_matmul

    def _int8(self, codes_kn: np.ndarray, scale: np.ndarray, path: str,
              dynamic: bool) -> int:
        g = self.g
        quantization = g.s.QuantizationParametersT()
        quantization.scale = [float(v) for v in scale]
        quantization.zeroPoint = [0] * len(scale)
        quantization.quantizedDimension = 0
        codes = np.ascontiguousarray(codes_kn.T.astype(np.int8))  # (N, K)
        weight = g.tensor(codes.shape, g.s.TensorType.INT8, f"{path}/codes", data=codes,
                          quantization=quantization)
        if dynamic:
            return weight
        return g.op(g.s.BuiltinOperator.DEQUANTIZE, [weight], codes.shape,
                    name=f"{path}/dequantized")

    def kernel(self, leaf: QuantizedWeight | np.ndarray, path: str) -> int:
        """The (N, K) weight tensor FULLY_CONNECTED reads for a (K, N) kernel."""
        g = self.g
        how, _ = _how(leaf, self.int8_matmul)
        dynamic = self.int8_matmul == "dynamic" or how == "int8-activations"
        if how in ("packed", "int8-activations"):
            scale = np.broadcast_to(_np(leaf.scale).astype(np.float32),
                                    (1, leaf.shape[1]))[0]
            codes = _np(leaf.codes()).astype(np.int32)
            if leaf.zero_point is not None:  # s·(q - z): the signed codes q - z
                codes = codes - np.rint(_np(leaf.zero_point)).astype(np.int32)
            return self._int8(codes, scale, path, dynamic)
        dense = _np(materialize(leaf)).astype(np.float32)
        if how == "requantized":
            absmax = np.abs(dense).max(axis=0)
            scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
            codes = np.clip(np.round(dense / scale), -127, 127)
            return self._int8(codes, scale, path, dynamic)
        return g.tensor(dense.T.shape, g.s.TensorType.FLOAT32, path,
                        data=np.ascontiguousarray(dense.T))

    def linear(self, x: int, leaf: Any, path: str, bias: Any = None) -> int:
        """x (…, K) @ the kernel `leaf` (+ bias)."""
        g = self.g
        how, _ = _how(leaf, self.int8_matmul)
        bias_index = -1 if bias is None else g.const(_np(bias).astype(np.float32),
                                                     f"{path}/bias")
        if isinstance(leaf, ScaledInputWeight):
            inverse = (1.0 / _np(leaf.input_scale)).astype(np.float32)
            return self.linear(g.mul(x, g.const(inverse, f"{path}/inverse_input_scale")),
                               leaf.weight, path, bias)
        if isinstance(leaf, LowRankWeight) and how != "widened":
            inner = self.linear(x, leaf.u, f"{path}/u")
            return self.linear(inner, leaf.v, f"{path}/v", bias)
        return g.fully_connected(x, self.kernel(leaf, path), bias_index)

    def projection(self, x: int, flat: dict[str, Any], path: str) -> int:
        """The linear at `path` ("…/q_proj"): its kernel, and its bias if it has one."""
        return self.linear(x, flat[f"{path}/kernel"], path, flat.get(f"{path}/bias"))


def _rms_norm(g: _Graph, x: int, scale: np.ndarray, eps: float, name: str) -> int:
    mean = g.reduce("MEAN", g.mul(x, x), -1)
    inv = g.unary("RSQRT", g.add(mean, g.const(np.float32(eps))))
    return g.mul(g.mul(x, inv), g.const(scale.astype(np.float32), name))


def _layer_norm(g: _Graph, x: int, scale: np.ndarray, bias: np.ndarray, eps: float,
                name: str) -> int:
    centred = g.binary("sub", x, g.reduce("MEAN", x, -1))
    variance = g.reduce("MEAN", g.mul(centred, centred), -1)
    normed = g.mul(centred, g.unary("RSQRT", g.add(variance, g.const(np.float32(eps)))))
    return g.add(g.mul(normed, g.const(scale.astype(np.float32), f"{name}/scale")),
                 g.const(bias.astype(np.float32), f"{name}/bias"))


def _heads(g: _Graph, x: int, heads: int, head_dim: int) -> int:
    """(B, T, H·D) → (B, H, T, D)."""
    b, t, _ = g.shapes[x]
    return g.transpose(g.reshape(x, (b, t, heads, head_dim)), (0, 2, 1, 3))


def _attention(g: _Graph, q: int, k: int, v: int, bias: int, heads: int, kv_heads: int,
               head_dim: int) -> int:
    """softmax(q·kᵀ/√D + bias)·v with q (B, H, T, D), k/v (B, Hkv, T, D) → (B, T, H·D).
    Grouped-query: the query heads of one kv head are stacked along T (B, Hkv, G·T, D), so
    every matmul stays 4-d; `bias` is (1, 1, G·T, T) or broadcastable to it."""
    b, _, t, _ = g.shapes[q]
    group = heads // kv_heads
    if group > 1:
        q = g.reshape(q, (b, kv_heads, group * t, head_dim))
    scores = g.mul(g.matmul(q, k, adj_y=True), g.const(np.float32(1 / math.sqrt(head_dim))))
    out = g.matmul(g.softmax(g.add(scores, bias)), v)  # (B, Hkv, G·T, D)
    if group > 1:
        out = g.reshape(out, (b, heads, t, head_dim))
    return g.reshape(g.transpose(out, (0, 2, 1, 3)), (b, t, heads * head_dim))


def _causal_bias(g: _Graph, config: ModelConfig, seq_len: int, group: int) -> int:
    """(1, 1, G·T, T): 0 where key j ≤ query t (and within the sliding window), else the
    float32 minimum; tiled G times for grouped-query attention."""
    query = np.arange(seq_len)[:, None]
    key = np.arange(seq_len)[None, :]
    visible = key <= query
    if config.sliding_window is not None:
        visible &= query - key < config.sliding_window
    bias = np.where(visible, np.float32(0), _NEG).astype(np.float32)
    return g.const(np.tile(bias, (group, 1))[None, None], "causal_bias")


def _input(g: _Graph, name: str, batch: int, seq_len: int) -> int:
    return g.tensor((batch, seq_len), g.s.TensorType.INT32, name)


def _int8_rows(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedWeight) and leaf.is_int8_row_table


def _table(w: _Weights, flat: dict[str, Any], path: str) -> int:
    """A token table (V, D): FLOAT32, or its INT8 codes (one scale per row) dequantized."""
    leaf = flat[path]
    if _int8_rows(leaf):  # codes() is (D, V) for a table: _int8 writes it back as (V, D)
        scale = _np(leaf.scale).astype(np.float32).reshape(-1)
        return w._int8(_np(leaf.codes()), scale, path, dynamic=False)
    table = _np(materialize(leaf)).astype(np.float32)
    return w.g.tensor(table.shape, w.g.s.TensorType.FLOAT32, path, data=table)


def _llama_graph(g: _Graph, w: _Weights, config: ModelConfig, flat: dict[str, Any],
                 batch: int, seq_len: int) -> tuple[dict, dict]:
    spec = family_spec(config)
    hd, heads, kv = config.head_dim, config.num_heads, config.num_kv_heads
    ids = _input(g, "input_ids", batch, seq_len)
    table = _table(w, flat, spec.embedding)
    x = g.gather(table, ids)
    bias = _causal_bias(g, config, seq_len, heads // kv)
    inv_freq = _np(rope_inverse_frequencies(hd, config.rope_theta,
                                            config.rope_scaling_dict)).astype(np.float64)
    angles = np.arange(seq_len)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    cos = g.const(np.cos(angles).astype(np.float32)[None, None], "rope_cos")  # (1,1,T,D)
    sin = g.const(np.sin(angles).astype(np.float32)[None, None], "rope_sin")

    def rope(t: int) -> int:
        first, second = g.split(t, 2)
        rotated = g.concat([g.unary("NEG", second), first], axis=-1)
        return g.add(g.mul(t, cos), g.mul(rotated, sin))

    for i in range(config.num_layers):
        block = spec.block(i)
        attn = f"{block}/{spec.attention}"
        h = _rms_norm(g, x, _np(flat[f"{block}/input_norm/scale"]), config.norm_eps,
                      f"{block}/input_norm/scale")
        q = rope(_heads(g, w.projection(h, flat, f"{attn}/q_proj"), heads, hd))
        k = rope(_heads(g, w.projection(h, flat, f"{attn}/k_proj"), kv, hd))
        v = _heads(g, w.projection(h, flat, f"{attn}/v_proj"), kv, hd)
        out = _attention(g, q, k, v, bias, heads, kv, hd)
        x = g.add(x, w.projection(out, flat, f"{attn}/o_proj"))
        h = _rms_norm(g, x, _np(flat[f"{block}/post_attention_norm/scale"]), config.norm_eps,
                      f"{block}/post_attention_norm/scale")
        mlp = f"{block}/{spec.mlp}"
        gate = w.projection(h, flat, f"{mlp}/gate_proj")
        up = w.projection(h, flat, f"{mlp}/up_proj")
        act = g.mul(g.mul(gate, g.unary("LOGISTIC", gate)), up)
        x = g.add(x, w.projection(act, flat, f"{mlp}/down_proj"))
    x = _rms_norm(g, x, _np(flat["norm/scale"]), config.norm_eps, "norm/scale")
    if config.tie_word_embeddings:
        logits = g.fully_connected(x, table)
    else:
        logits = w.linear(x, flat["lm_head/kernel"], "lm_head/kernel")
    g.rename(logits, "logits")
    return {"input_ids": ids}, {"logits": logits}


def _gpt2_graph(g: _Graph, w: _Weights, config: ModelConfig, flat: dict[str, Any],
                batch: int, seq_len: int) -> tuple[dict, dict]:
    hd, heads = config.head_dim, config.num_heads
    ids = _input(g, "input_ids", batch, seq_len)
    table = _table(w, flat, "wte/embedding")
    positions = g.const(np.minimum(np.arange(seq_len), config.max_position_embeddings - 1),
                        "positions", dtype=np.int32)
    x = g.add(g.gather(table, ids), g.gather(_table(w, flat, "wpe/embedding"), positions))
    bias = _causal_bias(g, config, seq_len, 1)

    for i in range(config.num_layers):
        block = f"h_{i}"
        h = _layer_norm(g, x, _np(flat[f"{block}/ln_1/scale"]), _np(flat[f"{block}/ln_1/bias"]),
                        config.norm_eps, f"{block}/ln_1")
        q, k, v = (_heads(g, part, heads, hd)
                   for part in g.split(w.projection(h, flat, f"{block}/attn/c_attn"), 3))
        out = _attention(g, q, k, v, bias, heads, heads, hd)
        x = g.add(x, w.projection(out, flat, f"{block}/attn/c_proj"))
        h = _layer_norm(g, x, _np(flat[f"{block}/ln_2/scale"]), _np(flat[f"{block}/ln_2/bias"]),
                        config.norm_eps, f"{block}/ln_2")
        hidden = g.gelu(w.projection(h, flat, f"{block}/mlp/c_fc"), approximate=True)
        x = g.add(x, w.projection(hidden, flat, f"{block}/mlp/c_proj"))
    x = _layer_norm(g, x, _np(flat["ln_f/scale"]), _np(flat["ln_f/bias"]), config.norm_eps,
                    "ln_f")
    logits = g.fully_connected(x, table)
    g.rename(logits, "logits")
    return {"input_ids": ids}, {"logits": logits}


def _bert_graph(g: _Graph, w: _Weights, config: ModelConfig, flat: dict[str, Any],
                batch: int, seq_len: int) -> tuple[dict, dict]:
    hd, heads = config.head_dim, config.num_heads
    ids = _input(g, "input_ids", batch, seq_len)
    mask = _input(g, "attention_mask", batch, seq_len)
    positions = g.const(np.arange(seq_len), "positions", dtype=np.int32)
    x = g.add(g.gather(_table(w, flat, "word_embeddings/embedding"), ids),
              g.gather(_table(w, flat, "position_embeddings/embedding"), positions))
    type0 = _np(materialize(flat["token_type_embeddings/embedding"]))[0].astype(np.float32)
    x = g.add(x, g.const(type0, "token_type_embeddings/row0"))
    x = _layer_norm(g, x, _np(flat["embeddings_norm/scale"]), _np(flat["embeddings_norm/bias"]),
                    config.norm_eps, "embeddings_norm")
    real = g.op(g.s.BuiltinOperator.CAST, [mask], (batch, seq_len))  # float32 0/1
    # (1 - real)·min: 0 for a real key, the float32 minimum for padding; (B, 1, 1, T)
    bias = g.reshape(g.mul(g.binary("sub", g.const(np.float32(1)), real), g.const(_NEG)),
                     (batch, 1, 1, seq_len))

    for i in range(config.num_layers):
        block = f"layer_{i}"
        q, k, v = (_heads(g, w.projection(x, flat, f"{block}/attn/{name}"), heads, hd)
                   for name in ("query", "key", "value"))
        out = w.projection(_attention(g, q, k, v, bias, heads, heads, hd), flat,
                           f"{block}/attn/output")
        x = _layer_norm(g, g.add(x, out), _np(flat[f"{block}/attn_norm/scale"]),
                        _np(flat[f"{block}/attn_norm/bias"]), config.norm_eps,
                        f"{block}/attn_norm")
        hidden = g.gelu(w.projection(x, flat, f"{block}/mlp/intermediate"), approximate=False)
        out = w.projection(hidden, flat, f"{block}/mlp/output")
        x = _layer_norm(g, g.add(x, out), _np(flat[f"{block}/mlp_norm/scale"]),
                        _np(flat[f"{block}/mlp_norm/bias"]), config.norm_eps,
                        f"{block}/mlp_norm")
    g.rename(x, "last_hidden_state")
    weights = g.reshape(real, (batch, seq_len, 1))
    summed = g.reduce("SUM", g.mul(x, weights), 1)  # (B, 1, H)
    count = g.binary("maximum", g.reduce("SUM", weights, 1), g.const(np.float32(1)))
    mean = g.binary("div", summed, count)
    squares = g.reduce("SUM", g.mul(mean, mean), -1)
    inverse = g.unary("RSQRT", g.binary("maximum", squares, g.const(np.float32(1e-24))))
    pooled = g.reshape(g.mul(mean, inverse), (batch, config.hidden_size))
    g.rename(pooled, "sentence_embedding")
    return ({"input_ids": ids, "attention_mask": mask},
            {"last_hidden_state": x, "sentence_embedding": pooled})


def tflite_model(config: ModelConfig, params: Any, *, batch: int = 1,
                 seq_len: int | None = None,
                 strict: bool = False, int8_matmul: str = "dynamic") -> tuple[bytes, list]:
    """The TFLite flatbuffer of a model (in memory), and `plan_tflite`'s rows.

    Args:
        config: the model config (Llama family, gpt2 or bert).
        params: the parameters (any representation `plan_tflite` accepts).
        batch: the graph's batch size (≥ 1).
        seq_len: the graph's sequence length (1 … the model's context); default
            min(128, the context).
        strict: refuse instead of widening or requantizing a compressed weight.
        int8_matmul: "dynamic" (LiteRT's dynamic-range kernels) or "float" (DEQUANTIZE,
            then a float matmul: equal to ours).

    Returns:
        (the .tflite bytes, rows).

    Raises:
        ValueError: a bad batch, seq_len, family or int8_matmul; a refusal under `strict`;
            a model over the 2 GiB a flatbuffer can hold.

    Example:
        >>> from jaxopt_llm.models import ModelConfig, init_params
        >>> import jax
        >>> data, rows = tflite_model(ModelConfig.tiny(), init_params(ModelConfig.tiny(),
        ...                                                           jax.random.key(0)))
        >>> data[4:8]
        b'TFL3'
    """
    schema = _schema()
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ParameterError("batch", batch, "TFLite export: expected an integer ≥ 1")
    context = config.max_position_embeddings
    seq_len = min(DEFAULT_SEQ_LEN, context) if seq_len is None else seq_len
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 1 <= seq_len <= context:
        raise ParameterError("seq_len", seq_len, f"TFLite export: expected an integer in "
                             f"[1, {context}] (the model's context)")
    rows = plan_tflite(config, params, strict=strict, int8_matmul=int8_matmul)
    import flatbuffers

    flat = tree.flatten(params)
    g = _Graph(schema)
    build = {"bert": _bert_graph, "gpt2": _gpt2_graph}.get(config.family, _llama_graph)
    inputs, outputs = build(g, _Weights(g, int8_matmul), config, flat, batch, seq_len)
    if g.data_bytes > MAX_BYTES:
        raise ValueError(f"TFLite export: the weights take {g.data_bytes / 2**30:.2f} GiB; a "
                         "flatbuffer holds at most 2 GiB (quantize the model first, e.g. "
                         "--recipe w8)")
    model = schema.ModelT()
    model.version = 3
    model.description = f"jaxopt-llm {config.model_type}"
    model.buffers = g.buffers
    codes = []
    for code in sorted(g.opcodes, key=g.opcodes.get):
        opcode = schema.OperatorCodeT()
        opcode.builtinCode = code
        opcode.deprecatedBuiltinCode = min(code, 127)  # 127: "see builtinCode"
        opcode.version = 1
        codes.append(opcode)
    model.operatorCodes = codes
    subgraph = schema.SubGraphT()
    subgraph.name = "main"
    subgraph.tensors = g.tensors
    subgraph.operators = g.operators
    subgraph.inputs = list(inputs.values())
    subgraph.outputs = list(outputs.values())
    model.subgraphs = [subgraph]

    def tensor_map(names: dict[str, int]) -> list:
        maps = []
        for name, index in names.items():
            entry = schema.TensorMapT()
            entry.name = name
            entry.tensorIndex = index
            maps.append(entry)
        return maps

    signature = schema.SignatureDefT()
    signature.signatureKey = SIGNATURE
    signature.subgraphIndex = 0
    signature.inputs = tensor_map(inputs)
    signature.outputs = tensor_map(outputs)
    model.signatureDefs = [signature]
    builder = flatbuffers.Builder(g.data_bytes + 2**20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), rows


def export_tflite(config: ModelConfig, params: Any, tokenizer: Tokenizer | None,
                  out: str | Path, *, batch: int = 1, seq_len: int | None = None,
                  strict: bool = False, int8_matmul: str = "dynamic",
                  ) -> tuple[Path, list[TFLiteTensor]]:
    """Write a TFLite export directory (atomically): model.tflite, config.json (our model
    config, with the graph's batch and seq_len in the marker), the tokenizer, and the
    export marker. Run it with `ai_edge_litert.interpreter.Interpreter(dir / "model.tflite")`.

    Args:
        config: the model config.
        params: the parameters.
        tokenizer: the tokenizer, or None.
        out: the directory: new, or a previous TFLite export (replaced whole).
        batch: the graph's batch size.
        seq_len: the graph's sequence length (default min(128, the context)).
        strict: refuse instead of widening or requantizing a compressed weight.
        int8_matmul: "dynamic" or "float" (see `tflite_model`).

    Returns:
        (the directory, `plan_tflite`'s rows).

    Example:
        >>> export_tflite(m.config, params, m.tokenizer, "smol-tflite")  # doctest: +SKIP
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not atomic.is_previous_export(out, "tflite"))):
        raise ValueError(f"TFLite export: {str(out)!r} exists and is not a previous TFLite "
                         "export; refusing to replace it")
    seq_len = min(DEFAULT_SEQ_LEN, config.max_position_embeddings) if seq_len is None \
        else seq_len
    data, rows = tflite_model(config, params, batch=batch, seq_len=seq_len, strict=strict,
                              int8_matmul=int8_matmul)
    with atomic.staged_dir(out) as tmp:
        (tmp / MODEL_FILE).write_bytes(data)
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / MARKER).write_text(json.dumps({
            "format": "tflite", "tensors": len(rows), "batch": batch, "seq_len": seq_len,
            "int8_matmul": int8_matmul}) + "\n")
    return out, rows



__all__ = ["INT8_MATMUL", "MARKER", "MODEL_FILE", "SIGNATURE", "TFLiteTensor",
           "export_tflite", "plan_tflite", "tflite_model"]
