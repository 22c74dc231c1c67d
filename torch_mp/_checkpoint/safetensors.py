"""Reads tensors, or slices of them, from .safetensors files through the safetensors library
(``safe_open``; ``get_slice`` reads only a rank's slices), which checks each header before anything
is read: its length against the file's, valid JSON, known dtypes, shapes whose byte sizes do not
overflow, and data_offsets that tile the data exactly. Any such fault is a ValueError naming the
file. Writes them ours: one tensor at a time through the CPU, with a CRC-32 of each tensor's bytes,
then an fsync (the library's ``save_file`` needs every tensor in CPU memory at once); the library
reads what this writes.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the data, row-major.
"""
import ctypes
import json
import os
import struct
import zlib
from typing import Dict, List, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_ALIGN = 8  # the safetensors package pads the header so that the data starts 8-byte aligned


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"safetensors: dtype {dtype} has no safetensors name; expected one of {sorted(map(str, _NAMES))}")
    return _NAMES[dtype]


def dtype_of(name: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"safetensors: dtype {name!r} is not one torch_mp reads; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy. The view holds the tensor, so that a
    temporary (``t.contiguous()``) lives as long as its bytes are read or written."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    array.tensor = tensor
    return memoryview(array).cast("B")


def crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(bytes_of(tensor.contiguous()))


def write_file(path: str, tensors: Sequence[Tuple[str, torch.Tensor]]) -> Dict[str, int]:
    """Writes ``tensors`` (on any device) to ``path``, one at a time through the CPU, fsyncs the file
    and returns the CRC-32 of each tensor's bytes."""
    header, offset = {}, 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % _ALIGN)
    checksums = {}
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, tensor in tensors:
            data = bytes_of(tensor.detach().cpu().contiguous())
            checksums[name] = zlib.crc32(data)
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return checksums


class SafetensorsFile:
    """A .safetensors file opened through the safetensors library; ``what`` begins every error."""

    def __init__(self, path: str, what: str = "torch_mp"):
        self.path, self.what = path, what
        try:
            self._handle = safe_open(path, framework="pt")
        except SafetensorError as error:
            raise ValueError(f"{what}: {path} is not a valid safetensors file: {error}") from None
        except OSError as error:  # a name an index gave: missing, a folder, unreadable
            raise ValueError(f"{what}: cannot read {path}: {error}") from None
        self._keys = set(self._handle.keys())

    def keys(self):
        return self._keys

    def close(self) -> None:
        self._handle = None

    def _slice(self, name: str):
        if name not in self._keys:
            raise ValueError(f"{self.what}: {self.path} holds no tensor {name!r}; expected one of "
                             f"{sorted(self._keys)[:10]}")
        return self._handle.get_slice(name)

    def read(self, name: str) -> torch.Tensor:
        part = self._slice(name)
        return self._read(name, part, (Ellipsis,))

    def read_slices(self, name: str, dim: int, bounds: List[Tuple[int, int]]) -> torch.Tensor:
        """The ranges ``bounds`` of dim ``dim``, concatenated along it; only their bytes are read."""
        part = self._slice(name)
        shape = part.get_shape()
        if not 0 <= dim < len(shape) or any(not 0 <= start <= stop <= shape[dim] for start, stop in bounds):
            raise ValueError(f"{self.what}: {self.path} holds {name!r} with shape {tuple(shape)}; expected one with "
                             f"the ranges {bounds} along dim {dim}")
        lead = (slice(None),) * dim
        return torch.cat([self._read(name, part, lead + (slice(start, stop),)) for start, stop in bounds], dim)

    def _read(self, name: str, part, index: tuple) -> torch.Tensor:
        try:
            return part[index]
        except (SafetensorError, TypeError) as error:  # a dtype the library knows but this torch lacks
            raise ValueError(f"{self.what}: cannot read {name!r} from {self.path}: {error}") from None
