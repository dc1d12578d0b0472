"""Bit packing of unsigned integer codes along one axis, for any width 1–8.

Widths that divide 8 (1, 2, 4) put 8/bits consecutive values in one byte, value j
of a byte in bits [j·bits, (j+1)·bits). Other widths (3, 5, 6, 7) use bit planes:
every 8 consecutive values become `bits` bytes, byte p holding bit p of each of
the 8 values, so storage is exactly bits/8 bytes per value. Width 8 is stored
as is. Packing runs along one axis and keeps every other axis, so a shard of the
packed axis in whole units (8/bits values, or 8 values for planes) stays whole
bytes. The packed axis is zero-padded up to a whole unit; `unpack` trims it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def values_per_unit(bits: int) -> int:
    """Values that share one packing unit: a byte for 1/2/4 bits, 8 values for bit planes.

    Args:
        bits: the code width, 1..8.

    Returns:
        8/bits for 1, 2 and 4 bits; 8 for 3, 5, 6 and 7 (bit planes); 1 for 8.

    Example:
        >>> values_per_unit(4), values_per_unit(3)
        (2, 8)
    """
    _check_bits(bits)
    if bits == 8:
        return 1
    return 8 // bits if 8 % bits == 0 else 8


def packed_length(length: int, bits: int) -> int:
    """Bytes along the packed axis for `length` values of `bits` bits.

    Args:
        length: values along the packed axis.
        bits: the code width, 1..8.

    Returns:
        The packed axis's length in bytes (the last unit zero-padded).

    Example:
        >>> packed_length(10, 3)  # two units of 8 values, 3 bytes each
        6
    """
    unit = values_per_unit(bits)
    units = -(-length // unit)
    return units * (bits if (8 % bits and bits != 8) else 1)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack(codes: jax.Array, bits: int, axis: int = 0) -> jax.Array:
    """Unsigned codes in [0, 2^bits) (any int dtype) → uint8, packed along `axis`.

    Args:
        codes: integer codes, each in [0, 2^bits).
        bits: the code width, 1..8.
        axis: the axis to pack (every other axis is kept).

    Returns:
        uint8 bytes, `packed_length(codes.shape[axis], bits)` long along `axis`.

    Example:
        >>> pack(jnp.array([1, 2, 3]), 4).tolist()  # 1 | 2 << 4, then 3
        [33, 3]
    """
    _check_bits(bits)
    codes = jnp.moveaxis(jnp.asarray(codes), axis, 0).astype(jnp.uint8)
    if bits == 8:
        return jnp.moveaxis(codes, 0, axis)
    unit = values_per_unit(bits)
    length, rest = codes.shape[0], codes.shape[1:]
    pad = -length % unit
    if pad:
        codes = jnp.concatenate([codes, jnp.zeros((pad, *rest), jnp.uint8)], axis=0)
    grouped = codes.reshape(-1, unit, *rest)  # (units, unit, ...)
    lanes = jnp.arange(unit, dtype=jnp.uint8).reshape(1, unit, *([1] * len(rest)))
    if 8 % bits == 0:
        packed = jnp.sum(grouped << (lanes * jnp.uint8(bits)), axis=1, dtype=jnp.uint8)
    else:
        planes = [
            jnp.sum(((grouped >> jnp.uint8(p)) & jnp.uint8(1)) << lanes, axis=1, dtype=jnp.uint8)
            for p in range(bits)
        ]
        packed = jnp.stack(planes, axis=1).reshape(-1, *rest)  # (units·bits, ...)
    return jnp.moveaxis(packed, 0, axis)


def unpack(packed: jax.Array, bits: int, length: int, axis: int = 0) -> jax.Array:
    """Inverse of `pack`: uint8 bytes → uint8 codes, `length` values along `axis`.

    Args:
        packed: the bytes `pack` returned.
        bits: the code width they were packed with.
        length: the number of values along `axis` before packing (the padding is cut).
        axis: the packed axis.

    Returns:
        uint8 codes, `length` long along `axis`.

    Example:
        >>> unpack(pack(jnp.array([1, 2, 3]), 4), 4, 3).tolist()
        [1, 2, 3]
    """
    _check_bits(bits)
    packed = jnp.moveaxis(packed, axis, 0)
    if bits == 8:
        return jnp.moveaxis(packed[:length], 0, axis)
    unit = values_per_unit(bits)
    rest = packed.shape[1:]
    lanes = jnp.arange(unit, dtype=jnp.uint8).reshape(1, unit, *([1] * len(rest)))
    if 8 % bits == 0:
        mask = jnp.uint8((1 << bits) - 1)
        codes = (packed[:, None] >> (lanes * jnp.uint8(bits))) & mask  # (units, unit, ...)
    else:
        planes = packed.reshape(-1, bits, *rest)  # (units, bits, ...)
        codes = jnp.zeros((planes.shape[0], unit, *rest), jnp.uint8)
        for p in range(bits):
            bit = (planes[:, p][:, None] >> lanes) & jnp.uint8(1)
            codes = codes | (bit << jnp.uint8(p))
    codes = codes.reshape(-1, *rest)[:length]
    return jnp.moveaxis(codes, 0, axis)

