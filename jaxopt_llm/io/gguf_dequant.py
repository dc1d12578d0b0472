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


@functools.partial(jax.jit, static_argnames=("qtype", "shape", "rope_heads", "transpose"))
def _blocks_to_float32(blocks: jax.Array, *, qtype: Q, shape: tuple[int, ...],
                       rope_heads: int, transpose: bool) -> jax.Array:
    d = jax.lax.bitcast_convert_type(blocks[:, 0:2], jnp.float16).astype(jnp.float32)[:, None]
    codes = blocks[:, _HEADER[qtype]:]
    if qtype == Q.Q8_0:
        values = jax.lax.bitcast_convert_type(codes, jnp.int8).astype(jnp.float32) * d
    else:
        unsigned = jnp.concatenate([codes & 0x0F, codes >> 4], axis=1)
        if qtype == Q.Q4_1:
            m = jax.lax.bitcast_convert_type(blocks[:, 2:4], jnp.float16).astype(jnp.float32)
            values = d * unsigned.astype(jnp.float32) + m[:, None]
        else:
            values = d * (unsigned.astype(jnp.int8) - 8).astype(jnp.float32)
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


__all__ = ["XLA_DEQUANTIZED", "dequantize_blocks", "unpermute_rope_rows"]
