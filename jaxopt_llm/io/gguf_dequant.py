"""GGUF Q8_0 / Q4_0 / Q4_1 blocks dequantized by XLA, straight into float32 device arrays.

Loading a GGUF file spends most of its time turning blocks into float32: numpy's block
arithmetic (the `gguf` package's `dequantize_blocks`, one thread) and then a copy into a
JAX array. Here one jitted program per (type, shape) reads the raw blocks and writes the
float32 weight, fused and on every core, with llama.cpp's q/k row order undone and the
head transposed in the same pass. The arithmetic is the package's, value for value
(a test checks bit equality on the real model): Q8_0 w = d·q, Q4_0 w = d·(u − 8),
Q4_1 w = d·u + m, with d and m float16 widened to float32 and the 32 values of a block
stored as 2 bytes of d (4 with m) then the codes (4-bit: value j in the low nibble of
byte j, value j + 16 in its high nibble).
"""

from __future__ import annotations

import functools
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q

BLOCK_VALUES = 32
# bytes before the codes in a block: float16 d (and, for Q4_1, float16 m)
_HEADER = {Q.Q8_0: 2, Q.Q4_0: 2, Q.Q4_1: 4}
XLA_DEQUANTIZED = frozenset(_HEADER)


def _view(x: Any, dtype: Any) -> Any:
    """The bytes of x's last axis reinterpreted (numpy or JAX): two bytes → one float16
    (the axis goes), one byte → one int8."""
    if isinstance(x, np.ndarray):
        out = np.ascontiguousarray(x).view(dtype)
        return out[..., 0] if np.dtype(dtype).itemsize > 1 else out
    return jax.lax.bitcast_convert_type(x, dtype)


def split_blocks(blocks: Any, qtype: Q) -> tuple[Any, Any, Any]:
    """A tensor's raw blocks (n, bytes per block), numpy or JAX, taken apart.

    Args:
        blocks: uint8 (n, bytes): float16 d (and, for Q4_1, float16 m), then the codes.
        qtype: one of `XLA_DEQUANTIZED`.

    Returns:
        (codes (n, 32) in value order: int8 for Q8_0, unsigned 0..15 (uint8) for Q4_0 and
        Q4_1; d (n,) float16; m (n,) float16 for Q4_1, else None).

    Example:
        >>> import gguf
        >>> data = gguf.quants.quantize(np.arange(-127.0, 129.0, 8.0)[None], Q.Q8_0)
        >>> codes, d, m = split_blocks(data.reshape(1, -1), Q.Q8_0)
        >>> codes[0, :3].tolist(), float(d[0]), m
        ([-127, -119, -111], 1.0, None)
    """
    xp = np if isinstance(blocks, np.ndarray) else jnp
    d = _view(blocks[:, 0:2], xp.float16)
    codes = blocks[:, _HEADER[qtype]:]
    if qtype == Q.Q8_0:
        return _view(codes, xp.int8), d, None
    m = _view(blocks[:, 2:4], xp.float16) if qtype == Q.Q4_1 else None
    return xp.concatenate([codes & 0x0F, codes >> 4], axis=1), d, m


@functools.partial(jax.jit, static_argnames=("qtype", "shape", "rope_heads", "transpose"))
def _blocks_to_float32(blocks: jax.Array, *, qtype: Q, shape: tuple[int, ...],
                       rope_heads: int, transpose: bool) -> jax.Array:
    codes, d, m = split_blocks(blocks, qtype)
    d = d.astype(jnp.float32)[:, None]
    if qtype == Q.Q8_0:
        values = codes.astype(jnp.float32) * d
    elif qtype == Q.Q4_1:
        values = d * codes.astype(jnp.float32) + m.astype(jnp.float32)[:, None]
    else:
        values = d * (codes.astype(jnp.int8) - 8).astype(jnp.float32)
    weight = values.reshape(shape)
    if rope_heads:
        weight = unpermute_rope_rows(weight, rope_heads)
    return weight.T if transpose else weight


def unpermute_rope_rows(weight: Any, heads: int) -> Any:
    """Undo llama.cpp's q/k row order (rotary pairs interleaved per head): HF's
    rotate-half order. numpy or JAX arrays; rows (axis 0) a multiple of 2·heads.

    Args:
        weight: (rows, ...) as the GGUF file stores it.
        heads: the number of heads the rows hold.

    Returns:
        The rows reordered, same shape and type.

    Example:
        >>> unpermute_rope_rows(np.arange(4), 1).tolist()
        [0, 2, 1, 3]
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def dequantize_blocks(data: np.ndarray, qtype: Q, shape: tuple[int, ...], *,
                      rope_heads: int = 0, transpose: bool = False) -> jax.Array:
    """The float32 weight of a Q8_0 / Q4_0 / Q4_1 tensor's raw blocks, as a device array.

    Args:
        data: the tensor's bytes (uint8), blocks of 32 values, as stored in the file.
        qtype: one of `XLA_DEQUANTIZED`.
        shape: the weight's shape, slowest axis first (numpy order).
        rope_heads: undo llama.cpp's q/k row order for this many heads (0: leave rows).
        transpose: return the transposed weight (a head stored (vocab, hidden)).

    Returns:
        float32 array of `shape` (transposed if asked).

    Raises:
        ValueError: the bytes do not hold whole blocks for `shape`.

    Example:
        >>> import gguf
        >>> data = gguf.quants.quantize(np.arange(-127.0, 129.0, 8.0)[None], Q.Q8_0)
        >>> dequantize_blocks(data, Q.Q8_0, (1, 32))[0, :3].tolist()  # d = 1.0
        [-127.0, -119.0, -111.0]
    """
    size = gguf.GGML_QUANT_SIZES[qtype][1]  # bytes per block
    raw = np.asarray(data, np.uint8).reshape(-1)
    values = int(np.prod(shape))
    if values % BLOCK_VALUES or raw.size != values // BLOCK_VALUES * size:
        raise ValueError(f"{raw.size} bytes are not the {qtype.name} blocks of a {shape} "
                         "weight")
    return _blocks_to_float32(jax.device_put(raw.reshape(-1, size)), qtype=qtype,
                              shape=tuple(shape), rope_heads=rope_heads,
                              transpose=transpose)


__all__ = ["XLA_DEQUANTIZED", "dequantize_blocks", "split_blocks", "unpermute_rope_rows"]
