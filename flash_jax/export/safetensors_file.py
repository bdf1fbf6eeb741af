"""The safetensors file format, written and read with numpy alone (no torch, no JAX).

A safetensors file (https://github.com/huggingface/safetensors) is

    8 bytes          N, the header's length, an unsigned little-endian 64-bit integer
    N bytes          a JSON header: {name: {"dtype": "F32", "shape": [...], "data_offsets": [a, b]},
                     ..., "__metadata__": {str: str}}  (padded with spaces to a multiple of 8)
    the rest         every tensor's raw little-endian bytes, C order, at [a, b) of this buffer

This module writes and reads F64, F32, F16 and BF16 (bfloat16: the upper 16 bits of a float32).
Arrays of `ml_dtypes.bfloat16` (what `np.asarray` gives for a JAX bfloat16 array) are written as
BF16, which is read back widened to float32 (exact), so that reading needs numpy alone.
"""

from __future__ import annotations

import json
import struct

import numpy as np

_HEADER_ALIGN = 8
# safetensors dtype codes of the numpy dtypes this module writes and reads (BF16: see below).
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16"}
_NUMPY = {code: np.dtype(name).newbyteorder("<") for name, code in _CODES.items()}


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Writes `tensors` (name -> array) to `path`, in the order given; `metadata` is str -> str."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.asarray(array)  # (np.ascontiguousarray would make a scalar 1-d)
        if array.dtype.name == "bfloat16":
            code = "BF16"
            raw = np.ascontiguousarray(array).view(np.uint16).astype("<u2").tobytes()
        elif array.dtype.name in _CODES:
            code = _CODES[array.dtype.name]
            raw = array.astype(_NUMPY[code]).tobytes()  # C order
        else:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} is not written (float only)")
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _HEADER_ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in chunks:
            f.write(raw)


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> array, metadata) of a safetensors file; BF16 comes back as exact float32."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if 8 + header_len > len(blob):
        raise ValueError(f"{path} is not a safetensors file (header length {header_len})")
    header = json.loads(blob[8 : 8 + header_len])
    metadata = header.pop("__metadata__", {}) or {}
    data = memoryview(blob)[8 + header_len :]
    tensors = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        shape, code = tuple(entry["shape"]), entry["dtype"]
        raw = data[start:end]
        if code == "BF16":
            # bfloat16 is the top half of a float32: shift it back into place.
            bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif code in _NUMPY:
            array = np.frombuffer(raw, _NUMPY[code]).astype(_NUMPY[code].newbyteorder("="))
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code}, which is not read here")
        tensors[name] = array.reshape(shape)
    return tensors, metadata
