"""Bring your own Flax model: run standard layers on transformed (typed-leaf) weights.

The passes of this project replace weight arrays by typed leaves (`QuantizedWeight`,
`LowRankWeight`, ...). Our own models call `jaxopt_llm.weights.linear` / `embed` /
`attend`, which dispatch on the leaf's type. A user's model built from the standard Flax
layers does not, so this module routes those layers through the same dispatch without
editing the model:

- Linen: `linen_apply(model, variables, x)` (or `with dispatch_standard_layers(): ...`) runs
  `model.apply` under `nn.intercept_methods`. `nn.Dense`, `nn.DenseGeneral` and `nn.Embed`
  (`__call__` and `attend`) whose kernel / embedding is a typed leaf compute through
  `linear` / `embed` / `attend`; every other call, plain arrays included, runs the original
  Flax code unchanged (bit-identical). The param tree is `variables["params"]`, with paths
  such as "Dense_0/kernel" and "Embed_0/embedding".
- NNX: `nnx_params(model)` gives the `nnx.Param` values as a nested dict (paths such as
  "layers/0/kernel"); `nnx_with_params(model, params)` returns a NEW model carrying them, in
  which every `nnx.Linear` / `nnx.Embed` whose weight is a typed leaf is replaced by a
  `DispatchLinear` / `DispatchEmbed`. `nnx_transform(model, fn)` composes the two.

Typed kernels are 2-D, (d_in, d_out); an embedding table is (vocab, d). For a
`DenseGeneral` with tuple features the typed kernel must represent the 2-D view
(d_in, prod(features)) of Flax's (d_in, *features) kernel.

For typed leaves the layer's `dtype` / `param_dtype` keep Flax's meaning (the computation
dtype is `dtype`, else inferred from the inputs, the bias and `param_dtype`, which stands in
for the kernel's dtype); `precision`, `dot_general` and `preferred_element_type` are not
used (the leaf's own implementation decides how to multiply).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta

from jaxopt_llm import tree
from jaxopt_llm.weights import attend, embed, is_weight_leaf, linear

__all__ = [
    "DispatchEmbed",
    "DispatchLinear",
    "dispatch_standard_layers",
    "linen_apply",
    "nnx_params",
    "nnx_transform",
    "nnx_with_params",
]

Params = Mapping[str, Any]


def _is_plain(value: Any) -> bool:
    """A plain array (tracers included), as opposed to a typed weight leaf."""
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def _compute_dtype(dtype: Any, *dtypes: Any, inexact: bool = True) -> jnp.dtype:
    """Flax's `canonicalize_dtype`, on dtypes instead of arrays (a typed leaf has none)."""
    if dtype is None:
        dtype = jnp.result_type(*[d for d in dtypes if d is not None])
        if inexact and not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    return jnp.dtype(dtype)


def _check_kernel_shape(kernel: Any, expected: tuple[int, ...], where: str) -> None:
    shape = getattr(kernel, "shape", None)
    if shape is not None and tuple(shape) != tuple(expected):
        raise ValueError(
            f"{where}: the {type(kernel).__name__} kernel has shape {tuple(shape)} but the "
            f"layer needs the 2-D kernel {tuple(expected)} (d_in, d_out); reshape the "
            "weight to this 2-D view before transforming it."
        )


def _project(
    inputs: jax.Array, kernel: Any, bias: jax.Array | None, *, dtype: Any, param_dtype: Any
) -> jax.Array:
    """inputs (..., d_in) @ kernel (d_in, d_out) + bias (d_out,) -> (..., d_out), via `linear`."""
    dtype = _compute_dtype(dtype, inputs.dtype, param_dtype,
                           None if bias is None else bias.dtype)
    y = linear(inputs.astype(dtype), kernel).astype(dtype)
    if bias is not None:
        y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def _lookup(table: Any, ids: jax.Array, num_embeddings: int, dtype: Any) -> jax.Array:
    """ids (...,) -> rows (..., d) of a typed (vocab, d) table, via `embed`."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    if num_embeddings == 1:  # Flax broadcasts the single row whatever the ids are.
        ids = jnp.zeros_like(ids)
    rows = embed(table, ids)
    return rows if dtype is None else rows.astype(dtype)


def _logits(query: jax.Array, table: Any, *, dtype: Any, param_dtype: Any) -> jax.Array:
    """query (..., d) against a typed (vocab, d) table -> (..., vocab), via `attend`."""
    dtype = _compute_dtype(dtype, query.dtype, param_dtype)
    return attend(query.astype(dtype), table).astype(dtype)


# --------------------------------------------------------------------------------------
# Linen: intercept the standard layers.
# --------------------------------------------------------------------------------------


def _only_arg(args: tuple, kwargs: dict, name: str, where: str) -> Any:
    if len(args) + len(kwargs) != 1 or (kwargs and name not in kwargs):
        raise TypeError(f"{where}: expected the single argument {name!r} with a typed "
                        f"weight, got {len(args)} positional and {sorted(kwargs)} keyword")
    return args[0] if args else kwargs[name]


def _typed_param(module: nn.Module, name: str) -> Any | None:
    """The module's param `name` if it is a typed leaf, else None (absent or plain array)."""
    if not module.has_variable("params", name):
        return None
    value = meta.unbox(module.get_variable("params", name))
    return None if _is_plain(value) else value


def _where(module: nn.Module) -> str:
    path = "/".join(module.scope.path) if module.scope is not None else ""
    return f"{type(module).__name__} at {path or '<root>'!r}"


def _dense(module: nn.Dense, kernel: Any, args: tuple, kwargs: dict) -> jax.Array:
    inputs = _only_arg(args, kwargs, "inputs", _where(module))
    _check_kernel_shape(kernel, (inputs.shape[-1], module.features), _where(module))
    bias = meta.unbox(module.get_variable("params", "bias")) if module.use_bias else None
    return _project(inputs, kernel, bias, dtype=module.dtype, param_dtype=module.param_dtype)


def _dense_general(module: nn.DenseGeneral, kernel: Any, args: tuple, kwargs: dict) -> jax.Array:
    where = _where(module)
    inputs = _only_arg(args, kwargs, "inputs", where)
    features = tuple(module.features) if isinstance(module.features, (tuple, list)) else (
        module.features,)
    axis = tuple(module.axis) if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axis = tuple(a % inputs.ndim for a in axis)
    if tuple(module.batch_dims) or axis != (inputs.ndim - 1,):
        raise ValueError(
            f"{where}: a typed kernel is supported only for axis=-1 without batch_dims (got "
            f"axis={module.axis!r}, batch_dims={module.batch_dims!r}). Keep this kernel a "
            "plain array (exclude it from the recipe) or use a DenseGeneral over the last axis."
        )
    d_out = math.prod(features)
    full = (inputs.shape[-1], *features)
    if is_weight_leaf(kernel) and tuple(getattr(kernel, "shape", ())) == full:
        # Transformed in Flax's own (d_in, *features) layout: run it as (d_in, prod(features)).
        kernel = kernel.viewed_as((inputs.shape[-1], d_out))
    _check_kernel_shape(kernel, (inputs.shape[-1], d_out), where)
    bias = None
    if module.use_bias:
        bias = jnp.reshape(meta.unbox(module.get_variable("params", "bias")), (d_out,))
    y = _project(inputs, kernel, bias, dtype=module.dtype, param_dtype=module.param_dtype)
    return jnp.reshape(y, inputs.shape[:-1] + features)  # (..., *features)


def _embed_setup(module: nn.Embed, table: Any, args: tuple, kwargs: dict) -> None:
    # Embed.setup calls self.param, which checks the stored leaf's children against the
    # initializer's shape and rejects e.g. a LowRankWeight; bind the typed table directly.
    module.embedding = table


def _embed_call(module: nn.Embed, table: Any, args: tuple, kwargs: dict) -> jax.Array:
    ids = _only_arg(args, kwargs, "inputs", _where(module))
    return _lookup(table, ids, module.num_embeddings, module.dtype)


def _embed_attend(module: nn.Embed, table: Any, args: tuple, kwargs: dict) -> jax.Array:
    query = _only_arg(args, kwargs, "query", _where(module))
    return _logits(query, table, dtype=module.dtype, param_dtype=module.param_dtype)


# (layer class, method name) -> (param holding the weight, handler for a typed weight)
_LINEN_HANDLERS: dict[tuple[type, str], tuple[str, Callable[..., Any]]] = {
    (nn.Dense, "__call__"): ("kernel", _dense),
    (nn.DenseGeneral, "__call__"): ("kernel", _dense_general),
    (nn.Embed, "setup"): ("embedding", _embed_setup),
    (nn.Embed, "__call__"): ("embedding", _embed_call),
    (nn.Embed, "attend"): ("embedding", _embed_attend),
}


def _interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict,
                 context: nn.module.InterceptorContext) -> Any:
    module, name = context.module, context.method_name
    for (klass, method), (param, handler) in _LINEN_HANDLERS.items():
        # A subclass that overrides the method keeps its own code: we only stand in for
        # Flax's implementation.
        if (method == name and isinstance(module, klass)
                and getattr(type(module), name, None) is getattr(klass, name)):
            weight = _typed_param(module, param)
            if weight is not None:
                return handler(module, weight, args, kwargs)
            break
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def dispatch_standard_layers() -> Iterator[None]:
    """Within this context, Linen `Dense` / `DenseGeneral` / `Embed` run typed weight leaves.

    Must be active while the model is traced (inside or around the `jax.jit`-ed function).
    Layers whose weights are plain arrays run Flax's own code, bit for bit.

    Returns:
        A context manager.

    Example:
        >>> with dispatch_standard_layers():  # doctest: +SKIP
        ...     y = model.apply({"params": typed_params}, x)
    """
    with nn.intercept_methods(_interceptor):
        yield


def linen_apply(model: nn.Module, variables: Mapping[str, Any], *args: Any,
                method: Callable[..., Any] | str | None = None, **kwargs: Any) -> Any:
    """`model.apply(variables, *args, method=method, **kwargs)` that accepts typed leaves.

    Args:
        model: any Linen module built from standard layers; not modified.
        variables: {"params": tree, ...}; kernels (d_in, d_out) and embedding tables
            (vocab, d) may be typed leaves (`jaxopt_llm.weights.WeightLeaf`).
        *args, method, **kwargs: as for `model.apply` (`rngs`, `mutable`, ... included).

    Returns:
        What `model.apply` returns.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from jaxopt_llm.weights import quantize_weight, QuantSpec
        >>> model = nn.Dense(4)
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
        >>> typed = {**params, "kernel": quantize_weight(params["kernel"], QuantSpec(bits=8))}
        >>> linen_apply(model, {"params": typed}, jnp.ones((1, 8))).shape
        (1, 4)
    """
    with dispatch_standard_layers():
        return model.apply(variables, *args, method=method, **kwargs)


# --------------------------------------------------------------------------------------
# NNX: out-of-place module surgery.
# --------------------------------------------------------------------------------------


def _no_out_sharding(out_sharding: Any, layer: nnx.Module) -> None:
    if out_sharding is not None:
        raise ValueError(f"{type(layer).__name__} does not support out_sharding; constrain "
                         "the output with jax.sharding.reshard after the call instead")


class DispatchLinear(nnx.Module):
    """Stand-in for `nnx.Linear` whose kernel is a typed leaf: x (..., d_in) -> (..., d_out)."""

    def __init__(self, kernel: Any, bias: nnx.Param | None, *, in_features: int,
                 out_features: int, dtype: Any = None, param_dtype: Any = jnp.float32):
        self.kernel = nnx.Param(kernel)  # (d_in, d_out), any registered representation
        self.bias = nnx.data(bias)  # Param (d_out,) or None
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = bias is not None
        self.dtype = dtype
        self.param_dtype = param_dtype

    @classmethod
    def from_linear(cls, layer: nnx.Linear, kernel: Any) -> DispatchLinear:
        """`layer` with `kernel` (its bias Variable is reused, not copied).

        Args:
            layer: the `nnx.Linear` being replaced.
            kernel: the typed (d_in, d_out) kernel.

        Returns:
            The stand-in.
        """
        return cls(kernel, layer.bias, in_features=layer.in_features,
                   out_features=layer.out_features, dtype=layer.dtype,
                   param_dtype=layer.param_dtype)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        _no_out_sharding(out_sharding, self)
        kernel = self.kernel.get_value()
        bias = None if self.bias is None else self.bias.get_value()
        return _project(inputs, kernel, bias, dtype=self.dtype, param_dtype=self.param_dtype)


class DispatchEmbed(nnx.Module):
    """Stand-in for `nnx.Embed` whose table is a typed leaf: ids (...,) -> (..., features)."""

    def __init__(self, embedding: Any, *, num_embeddings: int, features: int,
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        self.embedding = nnx.Param(embedding)  # (vocab, features)
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype
        self.param_dtype = param_dtype

    @classmethod
    def from_embed(cls, layer: nnx.Embed, embedding: Any) -> DispatchEmbed:
        """`layer` with `embedding` in place of its table.

        Args:
            layer: the `nnx.Embed` being replaced.
            embedding: the typed (vocab, features) table.

        Returns:
            The stand-in.
        """
        return cls(embedding, num_embeddings=layer.num_embeddings, features=layer.features,
                   dtype=layer.dtype, param_dtype=layer.param_dtype)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        _no_out_sharding(out_sharding, self)
        return _lookup(self.embedding.get_value(), inputs, self.num_embeddings, self.dtype)

    def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
        """query (..., features) -> logits (..., num_embeddings) (tied output head).

        Args:
            query: the hidden states.
            out_sharding: must be None (not supported).

        Returns:
            The logits.
        """
        _no_out_sharding(out_sharding, self)
        return _logits(query, self.embedding.get_value(), dtype=self.dtype,
                       param_dtype=self.param_dtype)


def nnx_params(model: nnx.Module) -> dict[Any, Any]:
    """The model's `nnx.Param` values as a nested dict, e.g. {"layers": {0: {"kernel": ...}}}.

    Keys are NNX's own (attribute names; ints for list items); a shared module appears once,
    under its first path. Join with "/" for the rule paths ("layers/0/kernel").

    Args:
        model: an NNX module.

    Returns:
        The nested dict of arrays.

    Example:
        >>> from flax import nnx
        >>> sorted(nnx_params(nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        ['bias', 'kernel']
    """
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _standard(node: Any, klass: type) -> bool:
    """An instance of `klass` (subclasses too) still running `klass`'s own `__call__`."""
    return isinstance(node, klass) and type(node).__call__ is klass.__call__


def _replacement(node: Any, path: tuple, want: dict[tuple, Any]) -> tuple[Any, str] | None:
    """(stand-in module, weight name) if `node` must be swapped for a DispatchLinear/Embed."""
    if _standard(node, nnx.Linear):
        kernel = want.get(path + ("kernel",))
        if kernel is not None and not _is_plain(kernel):
            _check_kernel_shape(kernel, (node.in_features, node.out_features),
                                f"nnx.Linear at {tree.path_of(path)!r}")
            return DispatchLinear.from_linear(node, kernel), "kernel"
    elif _standard(node, nnx.Embed):
        table = want.get(path + ("embedding",))
        if table is not None and not _is_plain(table):
            return DispatchEmbed.from_embed(node, table), "embedding"
    return None


def _set_child(parent: Any, key: Any, child: Any, where: str) -> None:
    impl = nnx.graph.get_node_impl(parent)
    if impl is None or impl.set_key is None:
        raise ValueError(f"cannot replace the layer at {where!r}: it sits in an immutable "
                         f"{type(parent).__name__}; hold layers in attributes or nnx.List")
    impl.set_key(parent, key, child)


def nnx_with_params(model: nnx.Module, params: Mapping[Any, Any]) -> nnx.Module:
    """A copy of `model` carrying `params` (the structure `nnx_params(model)` returns).

    `model` is not modified. Plain arrays are assigned to the corresponding `nnx.Param`s
    (their shapes may change). Each `nnx.Linear` whose kernel (d_in, d_out), or `nnx.Embed`
    whose embedding (vocab, d), is a typed leaf becomes a `DispatchLinear` / `DispatchEmbed`
    (bias and hyper-parameters kept), at every place the layer is referenced from.

    Args:
        model: an NNX module.
        params: the new parameter values (typed leaves allowed as above).

    Returns:
        The new model.

    Raises:
        ValueError: `params` does not have the model's paths, or a typed leaf sits anywhere
            but the kernel of an `nnx.Linear` or the embedding of an `nnx.Embed`.

    Example:
        >>> from flax import nnx
        >>> from jaxopt_llm.weights import quantize_weight, QuantSpec
        >>> layer = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> params = nnx_params(layer)
        >>> params["kernel"] = quantize_weight(params["kernel"], QuantSpec(bits=8))
        >>> type(nnx_with_params(layer, params)).__name__
        'DispatchLinear'
    """
    new = nnx.clone(model)
    have = set(tree.flatten_keys(nnx_params(new)))
    # Recipes see "/"-joined string paths, so list indices may come back as "0": re-key
    # every path by its string form onto the model's own (int or str) keys.
    by_name = {tree.path_of(p): p for p in have}
    want = {by_name.get(tree.path_of(p), p): leaf
            for p, leaf in tree.flatten_keys(params).items()}
    if set(want) != have:
        missing = sorted(map(tree.path_of, have - set(want)))
        unexpected = sorted(map(tree.path_of, set(want) - have))
        raise ValueError(f"params do not match the model: missing {missing}, unexpected "
                         f"{unexpected}; start from nnx_params(model)")

    swaps: dict[int, Any] = {}  # id(old layer) -> stand-in
    handled: set[tuple] = set()  # paths of typed leaves that a layer can run
    nodes: list[tuple[tuple, Any]] = []
    for path, node in nnx.iter_graph(new):
        if nnx.graph.get_node_impl(node) is None:
            continue
        nodes.append((path, node))
        if isinstance(node, DispatchLinear):
            handled.add(path + ("kernel",))
        elif isinstance(node, DispatchEmbed):
            handled.add(path + ("embedding",))
        elif (found := _replacement(node, path, want)) is not None:
            swaps[id(node)] = found[0]
            handled.add(path + (found[1],))
    typed = {path for path, leaf in want.items() if not _is_plain(leaf)}
    if typed - handled:
        raise ValueError(
            f"typed leaves at {sorted(map(tree.path_of, typed - handled))} are not the kernel "
            "of an nnx.Linear or the embedding of an nnx.Embed, so no layer can run them; keep "
            "those weights plain arrays"
        )

    # Rewire every reference (a shared layer is visited once but may have several parents).
    root = swaps.get(id(new), new)
    edges = [(parent, key, child, path + (key,)) for path, parent in nodes
             for key, child in nnx.graph.iter_children(parent) if id(child) in swaps]
    for parent, key, child, path in edges:
        _set_child(parent, key, swaps[id(child)], tree.path_of(path))

    for path, variable in nnx.iter_graph(root):
        if isinstance(variable, nnx.Param) and path in want:
            variable.set_value(want[path])
    return root


def nnx_transform(model: nnx.Module,
                  transform: Callable[[dict[Any, Any]], Mapping[Any, Any]]) -> nnx.Module:
    """`nnx_with_params(model, transform(nnx_params(model)))`: a pass applied to an NNX model.

    Args:
        model: an NNX module (not modified).
        transform: maps the parameter dict to a new one (e.g. a recipe's params step).

    Returns:
        The new model.

    Example:
        >>> new = nnx_transform(model, lambda params: recipe(None, params)[1])  # doctest: +SKIP
    """
    return nnx_with_params(model, transform(nnx_params(model)))
