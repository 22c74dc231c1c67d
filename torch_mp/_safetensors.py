"""Reads tensors, or slices of them, from a .safetensors file with positioned reads into the
destination tensors' memory: nothing is memory-mapped, so a rank's resident memory grows by the
slices it keeps and not by the pages of the checkpoint it passes over. Writes them one tensor at a
time, with a CRC-32 of each tensor's bytes, and fsyncs the file.

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

from torch_mp._sharding import take_slices

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_BLOCK_BYTES = 8 * 2**20  # rows read at once when taking columns
_ALIGN = 8  # the safetensors package pads the header so that the data starts 8-byte aligned


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"safetensors: dtype {dtype} has no safetensors name; expected one of {sorted(map(str, _NAMES))}")
    return _NAMES[dtype]


def dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
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
    def __init__(self, path: str):
        self.path = path
        self._fd = -1
        self._fd = os.open(path, os.O_RDONLY)
        (length,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        header = json.loads(os.pread(self._fd, length, 8))
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._entries: Dict[str, Tuple[torch.dtype, List[int], int]] = {}
        for name, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which torch_mp cannot read")
            self._entries[name] = (_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"][0])

    def keys(self):
        return self._entries.keys()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    def _read_into(self, tensor: torch.Tensor, offset: int) -> None:
        view = bytes_of(tensor)
        nbytes = len(view)
        done = 0
        while done < nbytes:  # a positioned read may return less than asked
            count = os.preadv(self._fd, [view[done:]], self._data_start + offset + done)
            if count == 0:
                raise ValueError(f"{self.path}: the file ends inside tensor data")
            done += count

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, offset = self._entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        self._read_into(tensor, offset)
        return tensor

    def read_slices(self, name: str, dim: int, bounds: List[Tuple[int, int]]) -> torch.Tensor:
        """The ranges ``bounds`` of dim ``dim`` (0 or 1), concatenated along it."""
        dtype, shape, offset = self._entries[name]
        widths = [stop - start for start, stop in bounds]
        out_shape = list(shape)
        out_shape[dim] = sum(widths)
        output = torch.empty(out_shape, dtype=dtype)
        row_bytes = (torch.Size(shape[1:]).numel() if len(shape) > 1 else 1) * output.element_size()
        if dim == 0:
            at = 0
            for (start, _), width in zip(bounds, widths):
                self._read_into(output.narrow(0, at, width), offset + start * row_bytes)
                at += width
            return output
        if dim != 1 or len(shape) != 2:
            return take_slices(self.read(name), dim, bounds)
        rows_per_block = max(1, _BLOCK_BYTES // max(row_bytes, 1))
        for first in range(0, shape[0], rows_per_block):
            rows = min(rows_per_block, shape[0] - first)
            block = torch.empty(rows, shape[1], dtype=dtype)
            self._read_into(block, offset + first * row_bytes)
            output[first:first + rows] = torch.cat([block[:, start:stop] for start, stop in bounds], 1)
        return output
