"""Weight representations and the dispatch every model calls (`linear`, `embed`, `attend`).

A plain weight is an array; a transformed one is a `WeightLeaf` subclass (a typed pytree
leaf, one file per representation) whose arrays are children and whose recipe (bits,
group size, pattern, …) is static; the leaf owns its math, size and sharding.
`param_bytes` (alias `nbytes`) counts what is really stored.
"""

from jaxopt_llm.weights.base import WeightLeaf, axis_spec, leaf_classes
from jaxopt_llm.weights.dispatch import (
    attend,
    embed,
    is_weight_leaf,
    linear,
    materialize,
    param_bytes,
)
from jaxopt_llm.weights.fake_quant import FakeQuantWeight
from jaxopt_llm.weights.lora import LoRAWeight, add_lora, merge_lora
from jaxopt_llm.weights.lowrank import LowRankWeight
from jaxopt_llm.weights.quant_math import QuantSpec
from jaxopt_llm.weights.quantized import QuantizedWeight, quantize_weight, quantize_with_scale
from jaxopt_llm.weights.scaled_input import ScaledInputWeight
from jaxopt_llm.weights.sparse import MaskedWeight, NMSparseWeight, masked_weight, nm_sparse_weight

nbytes = param_bytes

__all__ = [
    "FakeQuantWeight",
    "LoRAWeight",
    "LowRankWeight",
    "MaskedWeight",
    "NMSparseWeight",
    "QuantSpec",
    "QuantizedWeight",
    "ScaledInputWeight",
    "WeightLeaf",
    "add_lora",
    "attend",
    "axis_spec",
    "embed",
    "is_weight_leaf",
    "leaf_classes",
    "linear",
    "masked_weight",
    "materialize",
    "merge_lora",
    "nbytes",
    "nm_sparse_weight",
    "param_bytes",
    "quantize_weight",
    "quantize_with_scale",
]
