"""What each model family calls its parameters, in one place.

A `FamilySpec` is the only thing outside a family's module file that knows its
parameter names: sharding (default tensor-parallel rules), structured pruning
(which kernel slices belong to one head or one MLP neuron), the built-in
recipes (which parameters are attention / MLP), generation (which table sets
the activation dtype) and `build_model` all ask the spec of `config.family`.

Adding a third family touches only `jaxopt_llm/models/`:
  1. write `models/<family>.py` with a Flax module taking
     `(tokens, positions, mask, cache=None, cache_index=0, last_only=False)` and
     returning `(logits, cache)` (see `models/forward.py`);
  2. add its name to `config.SUPPORTED_FAMILIES` (and its HF `model_type`s to
     `config.HF_MODEL_TYPES`);
  3. add a `FamilySpec` to `FAMILIES` below.
(Reading a new checkpoint format's tensor names is the loaders' business, in `io/`.)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from jaxopt_llm.models import bert, gpt2, llama
from jaxopt_llm.models.config import SUPPORTED_FAMILIES, ModelConfig

# The three kinds of attention columns a projection can hold, in their fused order.
QKV_PARTS = ("q", "k", "v")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Projection:
    """An attention input projection as structured pruning sees it.

    `name` is the linear inside the attention scope; `parts` says what its output
    columns hold, in order: ("q",) for a separate query projection, ("q", "k", "v")
    for a fused one (q has num_heads·head_dim columns, k and v num_kv_heads·head_dim).
    """

    name: str
    parts: tuple[str, ...]

    def columns(self, config: ModelConfig) -> dict[str, tuple[int, int]]:
        """Each part's [start, stop) output columns: q has one block of `head_dim` per
        query head, k and v one per kv head, in `parts` order.

        Args:
            config: the model's config (head counts and head_dim).

        Returns:
            part → (start, stop).

        Example:
            >>> Projection(name="c_attn", parts=("q", "k", "v")).columns(ModelConfig.tiny())
            {'q': (0, 32), 'k': (32, 48), 'v': (48, 64)}
        """
        spans, start = {}, 0
        for part in self.parts:
            heads = config.num_heads if part == "q" else config.num_kv_heads
            spans[part] = (start, start + heads * config.head_dim)
            start = spans[part][1]
        return spans

    def __post_init__(self) -> None:
        if not self.parts or any(p not in QKV_PARTS for p in self.parts):
            raise ValueError(f"projection {self.name!r}: parts must be a non-empty subset of "
                             f"{QKV_PARTS}, got {self.parts!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalingGroup:
    """Linears of a block that read the same input, and the layer that produces it.

    Activation-aware scaling (AWQ, SmoothQuant) rewrites x·W as (x/s)·(diag(s)·W) for every
    linear in `linears` at once; the division by s folds into `source` when it is
    "norm" (a norm whose `scale` — and `bias`, if any — multiply its output channel-wise)
    or "linear" (a linear whose output columns reach these linears' inputs through
    channel-wise linear operations only, e.g. v → attention → o, or up → act(gate)·up →
    down). `source_part` names the columns of a fused qkv `source` ("v"); a linear source
    folds only when its column count matches the inputs (not with grouped-query heads).
    `source` None: nothing to fold into (a nonlinearity is in between).

    Paths are relative to the block, e.g. "input_norm", "attn/q_proj".
    """

    source: str | None
    source_kind: Literal["norm", "linear"] | None
    linears: tuple[str, ...]
    source_part: str | None = None

    def __post_init__(self) -> None:
        if (self.source is None) != (self.source_kind is None):
            raise ValueError(f"scaling group {self.linears}: source and source_kind go together")
        if self.source_kind not in (None, "norm", "linear"):
            raise ValueError(f"scaling group {self.linears}: source_kind must be 'norm' or "
                             f"'linear', got {self.source_kind!r}")
        if self.source_part not in (None, *QKV_PARTS):
            raise ValueError(f"scaling group {self.linears}: source_part must be one of "
                             f"{QKV_PARTS}, got {self.source_part!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """A model family's parameter names and the knowledge derived from them.

    Paths are "/"-joined like `tree.flatten` keys. A block's parameters live
    under `block(i)` = f"{block_prefix}_{i}"; inside it, attention under
    `attention`, the MLP under `mlp`. Kernels are stored (d_in, d_out).

    Structured-pruning units (what belongs to one head / one neuron):
      query head h  columns h·hd:(h+1)·hd of every "q" part of `qkv` (+ bias),
                    rows h·hd:(h+1)·hd of `attn_out`;
      kv head g     the same columns of every "k" and "v" part;
      MLP neuron j  column j of every `mlp_in` kernel (+ bias), row j of `mlp_out`.
    """

    name: str
    model: Callable[[ModelConfig], nn.Module]
    block_prefix: str
    attention: str  # scope of the attention linears inside a block
    mlp: str  # scope of the MLP linears inside a block
    qkv: tuple[Projection, ...]  # attention input projections, column-sliced per head
    attn_out: str  # attention output projection, row-sliced per query head
    mlp_in: tuple[str, ...]  # MLP input projections, column-sliced per neuron
    mlp_out: str  # MLP output projection, row-sliced per neuron
    embedding: str  # the token table: vocab-parallel, and the dtype activations run in
    position_table: str | None  # learned absolute positions, if any
    # Layer-wise execution (calibration, GPTQ/AWQ/SparseGPT): the block module, called as
    # block(x, *args, mask) -> (x, cache), and what block 0 receives: block_inputs(config,
    # params, tokens, positions) -> (x (B, T, D), args).
    block_module: Callable[[ModelConfig], nn.Module]
    block_inputs: Callable[..., tuple[Any, tuple[Any, ...]]]
    shard_rules: tuple[tuple[str, str], ...]  # default (regex, layout), first match wins
    # Activation-aware scaling (AWQ, SmoothQuant): each block linear's input producer,
    # in the block's execution order.
    scaling_groups: tuple[ScalingGroup, ...] = ()

    def __post_init__(self) -> None:
        parts = [p for projection in self.qkv for p in projection.parts]
        if sorted(parts) != sorted(QKV_PARTS):
            raise ValueError(f"family {self.name!r}: qkv projections must hold q, k and v "
                             f"exactly once, got {parts}")

    def block(self, index: int) -> str:
        """Path of block `index`, e.g. "layers_3"."""
        return f"{self.block_prefix}_{index}"

    @property
    def block_regex(self) -> str:
        """A regex matching every block path, e.g. r"layers_\\d+"."""
        return rf"{re.escape(self.block_prefix)}_\d+"

    def activation_dtype(self, params: Mapping[str, Any]) -> Any:
        """The dtype activations run in: the token table's when it is a floating array
        (a bf16 model keeps a bf16 KV cache, so attention does not promote the residual
        stream to float32), a typed table's `compute` dtype when it has one (an int8 table
        under `compute_in(params, "bfloat16")`), float32 otherwise (absent, other typed or
        integer table)."""
        node: Any = params
        for key in self.embedding.split("/"):
            if not isinstance(node, Mapping) or key not in node:
                return jnp.dtype(jnp.float32)
            node = node[key]
        if getattr(node, "compute", None) == "bfloat16":
            return jnp.dtype(jnp.bfloat16)
        dtype = jnp.dtype(getattr(node, "dtype", jnp.float32))
        return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


LLAMA = FamilySpec(
    name="llama",
    model=llama.LlamaModel,
    block_prefix="layers",
    attention="attn",
    mlp="mlp",
    qkv=(Projection(name="q_proj", parts=("q",)), Projection(name="k_proj", parts=("k",)),
         Projection(name="v_proj", parts=("v",))),
    attn_out="o_proj",
    mlp_in=("gate_proj", "up_proj"),
    mlp_out="down_proj",
    embedding="embed_tokens/embedding",
    position_table=None,
    block_module=llama.Block,
    block_inputs=llama.block_inputs,
    shard_rules=(
        (r"(.*/)?attn/(q_proj|k_proj|v_proj)/kernel", "column"),
        (r"(.*/)?attn/(q_proj|k_proj|v_proj)/bias", "column"),
        (r"(.*/)?mlp/(gate_proj|up_proj)/kernel", "column"),
        (r"(.*/)?(attn/o_proj|mlp/down_proj)/kernel", "row"),
        (r"embed_tokens/embedding", "vocab"),
        (r"lm_head/kernel", "column"),
    ),
    scaling_groups=(
        ScalingGroup(source="input_norm", source_kind="norm",
                     linears=("attn/q_proj", "attn/k_proj", "attn/v_proj")),
        ScalingGroup(source="attn/v_proj", source_kind="linear", linears=("attn/o_proj",)),
        ScalingGroup(source="post_attention_norm", source_kind="norm",
                     linears=("mlp/gate_proj", "mlp/up_proj")),
        ScalingGroup(source="mlp/up_proj", source_kind="linear", linears=("mlp/down_proj",)),
    ),
)

GPT2 = FamilySpec(
    name="gpt2",
    model=gpt2.GPT2Model,
    block_prefix="h",
    attention="attn",
    mlp="mlp",
    qkv=(Projection(name="c_attn", parts=("q", "k", "v")),),
    attn_out="c_proj",
    mlp_in=("c_fc",),
    mlp_out="c_proj",
    embedding="wte/embedding",
    position_table="wpe/embedding",
    block_module=gpt2.Block,
    block_inputs=gpt2.block_inputs,
    shard_rules=(
        (r"(.*/)?attn/c_attn/(kernel|bias)", "column"),
        (r"(.*/)?mlp/c_fc/(kernel|bias)", "column"),
        (r"(.*/)?(attn|mlp)/c_proj/kernel", "row"),
        (r"wte/embedding", "vocab"),
    ),
    scaling_groups=(
        ScalingGroup(source="ln_1", source_kind="norm", linears=("attn/c_attn",)),
        ScalingGroup(source="attn/c_attn", source_kind="linear", source_part="v",
                     linears=("attn/c_proj",)),
        ScalingGroup(source="ln_2", source_kind="norm", linears=("mlp/c_fc",)),
        ScalingGroup(source=None, source_kind=None, linears=("mlp/c_proj",)),  # after GELU
    ),
)

# Post-LayerNorm: each norm's output is also the residual stream, so scaling cannot fold
# into a norm; only the value → output path folds (heads equal kv heads in BERT).
BERT = FamilySpec(
    name="bert",
    model=bert.BertModel,
    block_prefix="layer",
    attention="attn",
    mlp="mlp",
    qkv=(Projection(name="query", parts=("q",)), Projection(name="key", parts=("k",)),
         Projection(name="value", parts=("v",))),
    attn_out="output",
    mlp_in=("intermediate",),
    mlp_out="output",
    embedding="word_embeddings/embedding",
    position_table="position_embeddings/embedding",
    block_module=bert.Block,
    block_inputs=bert.block_inputs,
    shard_rules=(
        (r"(.*/)?attn/(query|key|value)/(kernel|bias)", "column"),
        (r"(.*/)?mlp/intermediate/(kernel|bias)", "column"),
        (r"(.*/)?(attn|mlp)/output/kernel", "row"),
        (r"word_embeddings/embedding", "vocab"),
    ),
    scaling_groups=(
        ScalingGroup(source=None, source_kind=None, linears=("attn/query", "attn/key",
                                                              "attn/value")),
        ScalingGroup(source="attn/value", source_kind="linear", linears=("attn/output",)),
        ScalingGroup(source=None, source_kind=None, linears=("mlp/intermediate",)),
        ScalingGroup(source=None, source_kind=None, linears=("mlp/output",)),  # after GELU
    ),
)

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (LLAMA, GPT2, BERT)}
if tuple(FAMILIES) != SUPPORTED_FAMILIES:  # the config validates against SUPPORTED_FAMILIES
    raise ImportError(f"models/family.py FAMILIES {tuple(FAMILIES)} must list "
                      f"config.SUPPORTED_FAMILIES {SUPPORTED_FAMILIES} in the same order")


def family_spec(config: ModelConfig) -> FamilySpec:
    """The spec of `config.family`.

    Args:
        config: a model's config.

    Returns:
        Its family's `FamilySpec` (parameter names, shard rules, block module).

    Raises:
        ValueError: for a family without a spec.

    Example:
        >>> from jaxopt_llm.models.config import ModelConfig
        >>> config = ModelConfig.tiny()
        >>> family_spec(config).block(3), family_spec(config).mlp_out
        ('layers_3', 'down_proj')
    """
    spec = FAMILIES.get(config.family)
    if spec is None:
        raise ValueError(f"unknown family {config.family!r}; supported: {tuple(FAMILIES)}")
    return spec


def blocks_regex(part: Literal["attention", "mlp"]) -> str:
    """A regex for the `part` parameters of every block of every family (built-in recipes
    do not know the family): r"(layers|h|layer)_\\d+/attn/.*" for attention.

    Args:
        part: "attention" or "mlp".

    Returns:
        The regex.

    Example:
        >>> print(blocks_regex("mlp"))
        (layers|h|layer)_\\d+/mlp/.*
    """
    scopes = {getattr(spec, part) for spec in FAMILIES.values()}
    if len(scopes) == 1:
        prefixes = "|".join(re.escape(spec.block_prefix) for spec in FAMILIES.values())
        return rf"({prefixes})_\d+/{re.escape(scopes.pop())}/.*"
    return "|".join(rf"{spec.block_regex}/{re.escape(getattr(spec, part))}/.*"
                    for spec in FAMILIES.values())


def token_tables_regex() -> str:
    """A regex for the token table of every family (built-in recipes do not know the family;
    a tied output head reads this same table).

    Returns:
        The regex.

    Example:
        >>> print(token_tables_regex())
        embed_tokens/embedding|wte/embedding|word_embeddings/embedding
    """
    return "|".join(re.escape(spec.embedding) for spec in FAMILIES.values())


__all__ = ["FAMILIES", "FamilySpec", "Projection", "ScalingGroup", "blocks_regex", "family_spec",
           "token_tables_regex"]
