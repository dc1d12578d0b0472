"""A small, strict safetensors reader and atomic writer.

We parse the format ourselves (8-byte little-endian header length, JSON
header, raw little-endian data) so that truncated or corrupted files fail with
a message naming the file and the tensor, and bf16 is read via ml_dtypes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one file as read-only numpy arrays backed by a memory map.

    Args:
        path: the .safetensors file.

    Returns:
        name → array.

    Example:
        >>> import numpy as np, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write_safetensors(path, {"w": np.arange(3, dtype=np.int8)})
        >>> read_safetensors(path)["w"].tolist()
        [0, 1, 2]
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER):
            raise ValueError(
                f"{path}: corrupted or truncated safetensors file (header claims {header_len} "
                f"bytes, file has {size})"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: corrupted safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupted safetensors header (expected a JSON object)")
    data_start = 8 + header_len
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{path}: tensor {name!r} has a malformed entry {info!r}; expected dtype in "
                f"{sorted(_DTYPES)}, shape and data_offsets"
            ) from None
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or data_start + end > size or begin < 0:
            raise ValueError(
                f"{path}: tensor {name!r} is truncated or corrupted (needs bytes {begin}..{end} "
                f"of the data section, {expected} bytes for shape {shape}; file data section "
                f"has {size - data_start})"
            )
        tensors[name] = raw[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return tensors


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically: a temp file in the same folder, then rename.

    Args:
        path: the file to write.
        tensors: name → numpy array (dtypes safetensors names).
        metadata: optional string → string header metadata.

    Example:
        >>> import numpy as np, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write_safetensors(path, {"w": np.zeros((2, 2), np.float32)})
        >>> path.stat().st_size > 16
        True
    """
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    arrays = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be saved")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(blob)))
            handle.write(blob)
            for array in arrays:
                handle.write(array.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
