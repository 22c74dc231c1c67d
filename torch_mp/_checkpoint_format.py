"""The on-disk format of ``torch_mp.save`` checkpoints, and reading them back slice by slice.

A checkpoint is a folder::

    ckpt/torch_mp_checkpoint.json            the index, written last
    ckpt/rank-00000-of-00002.safetensors     what rank 0 wrote: its slices, replicated tensors, its RNG
    ckpt/rank-00001-of-00002.safetensors

The index names the format and version, and for every tensor its stock name, stock shape and dtype,
the dim along which it was cut (``null``: whole) and its pieces: which file holds each, under which
key, which ``[start, stop)`` ranges of the stock tensor along that dim it concatenates, and the
CRC-32 (zlib) of the piece's bytes. Loading cuts the ranges a rank needs out of the pieces, whatever
the tensor-parallel size that wrote them, reading only the pieces that overlap them.

While being written the folder is ``<path>.incomplete``; renamed to ``<path>`` once complete. When a
save replaces an older checkpoint, the older one is ``<path>.old`` for a moment between two renames:
``find_checkpoint`` falls back to it, so a crash at any point leaves a complete checkpoint.
"""
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from torch_mp._safetensors import SafetensorsFile, crc32, dtype_of
from torch_mp._sharding import take_slices

INDEX = "torch_mp_checkpoint.json"
FORMAT = "torch_mp.checkpoint"
VERSION = 1
INCOMPLETE, OLD = ".incomplete", ".old"


def find_checkpoint(path: str) -> Optional[str]:
    """The complete checkpoint folder ``path`` stands for: ``path`` itself, or the older checkpoint
    a save interrupted between its two renames left at ``path.old``; None when there is none."""
    for folder in (path, path + OLD):
        if os.path.isfile(os.path.join(folder, INDEX)):
            return folder
    return None


def rank_file(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


class CheckpointReader:
    """The tensors of a checkpoint by stock name: whole, or ranges of one dim. Every piece read is
    checked against the index: its shape and the CRC-32 of its bytes."""

    def __init__(self, path: str, what: str = "torch_mp.load"):
        folder = find_checkpoint(path)
        if folder is None:
            pending = " (found a save that did not finish: " + path + INCOMPLETE + ")" if os.path.isdir(
                path + INCOMPLETE) else ""
            raise FileNotFoundError(f"{what}: no complete checkpoint found at {path!r}{pending}; expected a folder "
                                    f"written by torch_mp.save, holding {INDEX}")
        self.folder, self.what = folder, what
        with open(os.path.join(folder, INDEX)) as handle:
            self.index = json.load(handle)
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ValueError(f"{what}: {os.path.join(folder, INDEX)} is format {self.index.get('format')!r} version "
                             f"{self.index.get('version')!r}; expected {FORMAT!r} version {VERSION}")
        self.tensors: Dict[str, dict] = self.index["tensors"]
        self.model_keys: List[str] = self.index["model"]
        self._files: Dict[str, SafetensorsFile] = {}

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def read_full(self, key: str) -> torch.Tensor:
        entry = self.tensors[key]
        if entry["dim"] is None:
            return self._piece(key, entry["pieces"][0])
        return self.read_slices(key, entry["dim"], [(0, entry["shape"][entry["dim"]])])

    def read_slices(self, key: str, dim: int, bounds: List[Tuple[int, int]]) -> torch.Tensor:
        """The ranges ``bounds`` of the stock tensor ``key`` along ``dim``, concatenated."""
        entry = self.tensors[key]
        if entry["dim"] != dim:  # whole, or cut along another dim than the one asked
            return take_slices(self.read_full(key), dim, bounds)
        pieces: Dict[int, torch.Tensor] = {}  # each piece is read (and checked) once per call
        out = []
        for start, stop in bounds:
            found = []
            for number, piece in enumerate(entry["pieces"]):
                at = 0
                for first, last in piece["bounds"]:
                    low, high = max(start, first), min(stop, last)
                    if low < high:
                        if number not in pieces:
                            pieces[number] = self._piece(key, piece)
                        found.append((low, pieces[number].narrow(dim, at + low - first, high - low)))
                    at += last - first
            # A range several ranks wrote (KV heads each of them kept whole) is taken once.
            kept, end = [], start
            for low, part in sorted(found, key=lambda item: item[0]):
                if low >= end:
                    kept.append(part)
                    end = low + part.shape[dim]
            if sum(part.shape[dim] for part in kept) != stop - start:
                raise ValueError(f"{self.what}: {self.folder} holds no complete range [{start}, {stop}) of {key!r} "
                                 f"along dim {dim}; the index's pieces do not cover it")
            out.extend(kept)
        return torch.cat(out, dim)

    def _piece(self, key: str, piece: dict) -> torch.Tensor:
        entry = self.tensors[key]
        path = os.path.join(self.folder, piece["file"])
        if piece["file"] not in self._files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{self.what}: {path} is missing; the index of {self.folder} names it")
            self._files[piece["file"]] = SafetensorsFile(path)
        tensor = self._files[piece["file"]].read(piece["key"])
        expected = list(entry["shape"])
        if entry["dim"] is not None:
            expected[entry["dim"]] = sum(last - first for first, last in piece["bounds"])
        if list(tensor.shape) != expected or tensor.dtype != dtype_of(entry["dtype"]):
            raise ValueError(f"{self.what}: {path} holds {piece['key']!r} as {tensor.dtype} {tuple(tensor.shape)}; "
                             f"the index says {entry['dtype']} {tuple(expected)}: the checkpoint is corrupted")
        found = crc32(tensor)
        if found != piece["crc32"]:
            raise ValueError(f"{self.what}: checksum mismatch in {path} for {piece['key']!r} (CRC-32 {found:#010x}, "
                             f"the index says {piece['crc32']:#010x}): the file is corrupted")
        return tensor
