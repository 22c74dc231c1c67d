"""The on-disk format of ``torch_mp.save`` checkpoints, and reading them back slice by slice.

A checkpoint is a folder::

    ckpt/torch_mp_checkpoint.json            the index, written last
    ckpt/rank-00000-of-00002.safetensors     what rank 0 wrote: its slices, replicated tensors, its RNG
    ckpt/rank-00001-of-00002.safetensors

The index names the format and version, and for every tensor its stock name, stock shape and dtype,
the dim along which it was cut (``null``: whole) and its pieces: which file holds each, under which
key, which ``[start, stop)`` ranges of the stock tensor along that dim it concatenates, and the
CRC-32 (zlib) of the piece's bytes. Loading cuts the ranges a rank needs out of the pieces, whatever
the tensor-parallel size that wrote them, reading only the pieces that overlap them. Each whole tensor
is written once, by the lowest rank holding it (a pipeline rank holds its stages' tensors).

The index's ``optimizer`` (null without one): ``param_groups`` (hyperparameters, parameters by
stock name) and ``state`` {parameter: {"values": JSON values, "tensors": {key: tensor name},
"per_rank": {key: [tensor name of tensor-parallel rank 0, 1, ...]}}}. State of its parameter's shape
(Adam's moments) is stored as the parameter is, ``optimizer/<parameter>/<key>``; state of another
shape (Adafactor's row and column statistics, step counts) of a parameter cut across ranks is each
rank's own, ``optimizer/<parameter>/<key>/rank-<r>-of-<n>``, listed under ``per_rank``.

While being written the folder is ``<path>.incomplete``; renamed to ``<path>`` once complete. When a
save replaces an older checkpoint, the older one is ``<path>.old`` for a moment between two renames:
``find_checkpoint`` falls back to it, so a crash at any point leaves a complete checkpoint.

What a loader trusts: nothing in the folder. The index is checked whole before any tensor is read
(types, known dtypes, dims in range, ranges within the shape and covering it once); every file it
names must resolve inside the folder (``file_in_folder``); the safetensors library checks each
file's header against the file's size; each piece's shape and CRC-32 are checked as it is read.
"""
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from torch_mp._checkpoint.safetensors import SafetensorsFile, crc32, dtype_of
from torch_mp._tensor_parallel.sharding import take_slices

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


def file_in_folder(folder: str, name, what: str) -> str:
    """The real path of the file ``name`` that an index or a listing of ``folder`` names (``what``
    says which entry), once checked to lie inside ``folder``: a relative path, no ``..``, and no
    symlink on the way that leads out of the folder's real path. ValueError otherwise."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name) or ".." in name.split(os.sep):
        raise ValueError(f"{what} names the file {name!r}; expected a relative path inside {folder} "
                         "(no absolute path, no '..')")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if path == root or os.path.commonpath([root, path]) != root:
        raise ValueError(f"{what} names the file {name!r}, which resolves to {path}, outside the checkpoint "
                         f"folder {root}; expected a file inside it")
    return path


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
        index_path = file_in_folder(folder, INDEX, f"{what}: the checkpoint folder {folder}")
        with open(index_path, "rb") as handle:
            text = handle.read()
        try:
            self.index = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{what}: {index_path} is not valid JSON ({error}); the checkpoint is corrupted") from None
        self._paths = _check_index(self.index, folder, f"{what}: {index_path}")
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
        path = self._paths[piece["file"]]
        if piece["file"] not in self._files:
            if not os.path.isfile(path):
                raise ValueError(f"{self.what}: {path} is missing; the index of {self.folder} names it: the checkpoint "
                                 "is incomplete")
            self._files[piece["file"]] = SafetensorsFile(path, self.what)
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


def _check_index(index, folder: str, where: str) -> Dict[str, str]:
    """Checks the parsed index ``index`` of ``folder`` whole (``where`` begins each error) and
    returns {file named: its checked path}: what ``CheckpointReader`` then reads without checking."""

    def fail(problem: str):
        raise ValueError(f"{where}: {problem}; the checkpoint is corrupted or not written by torch_mp.save")

    def is_int(value, low=0, high=None) -> bool:
        return type(value) is int and value >= low and (high is None or value <= high)

    if not isinstance(index, dict):
        fail(f"the index is a JSON {type(index).__name__}, not an object")
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{where} is format {index.get('format')!r} version {index.get('version')!r}; expected "
                         f"{FORMAT!r} version {VERSION}")
    tensors, model = index.get("tensors"), index.get("model")
    if not isinstance(tensors, dict) or not isinstance(model, list):
        fail("'tensors' is not an object or 'model' is not a list")
    if not is_int(index.get("world_size"), 1) or not isinstance(index.get("extra"), dict):
        fail(f"'world_size' is {index.get('world_size')!r} (expected an int >= 1) or 'extra' is not an object")
    for key in model:
        if not isinstance(key, str) or key not in tensors:
            fail(f"'model' names {key!r}, which 'tensors' lacks")
    paths: Dict[str, str] = {}
    for name, entry in tensors.items():
        at = f"tensor {name!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("pieces"), list) or not entry["pieces"]:
            fail(f"{at} has no list of pieces")
        try:
            dtype_of(entry.get("dtype"))
        except ValueError as error:
            fail(f"{at}: {error}")
        shape, dim = entry.get("shape"), entry.get("dim")
        if not isinstance(shape, list) or not all(is_int(size) for size in shape):
            fail(f"{at} has shape {shape!r}; expected a list of sizes >= 0")
        if not (dim is None or is_int(dim, 0, len(shape) - 1)) or (dim is None and len(entry["pieces"]) != 1):
            fail(f"{at} has dim {dim!r} and {len(entry['pieces'])} pieces; expected one piece, or a dim of its "
                 f"shape {shape}")
        ranges = []
        for number, piece in enumerate(entry["pieces"]):
            piece_at = f"{at} piece {number}"
            if not isinstance(piece, dict) or not isinstance(piece.get("key"), str) or \
                    not isinstance(piece.get("file"), str) or not is_int(piece.get("crc32"), 0, 2**32 - 1):
                fail(f"{piece_at} is {piece!r}; expected an object with a file, a key and a CRC-32")
            bounds = piece.get("bounds")
            if dim is None and bounds is not None or dim is not None and not (isinstance(bounds, list) and all(
                    isinstance(b, list) and len(b) == 2 and is_int(b[0]) and is_int(b[1], b[0], shape[dim])
                    for b in bounds)):
                fail(f"{piece_at} has bounds {bounds!r}; expected null for a whole tensor, else [start, stop] "
                     f"ranges within [0, {shape[dim] if dim is not None else 0}]")
            ranges.extend(bounds or [])
            if piece["file"] not in paths:
                paths[piece["file"]] = file_in_folder(folder, piece["file"], f"{where}: {piece_at}")
        if dim is not None:
            # A range several ranks wrote (KV heads each of them kept whole) is listed once per rank.
            ranges = sorted({tuple(b) for b in ranges if b[0] < b[1]})
            ends = [0] + [stop for _, stop in ranges]
            if [start for start, _ in ranges] != ends[:-1] or ends[-1] != shape[dim]:
                fail(f"{at}: its pieces cover {ranges} along dim {dim}; expected each range of [0, {shape[dim]}) once")
    _check_optimizer(index.get("optimizer"), tensors, fail)
    return paths


def _check_optimizer(meta, tensors: Dict[str, dict], fail) -> None:
    if meta is None:
        return
    groups, state = (meta.get("param_groups"), meta.get("state")) if isinstance(meta, dict) else (None, None)
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(
            isinstance(group, dict) and isinstance(group.get("params"), list) and
            all(isinstance(name, str) for name in group["params"]) for group in groups):
        fail("'optimizer' is not {'param_groups': [{'params': [names], ...}], 'state': {...}}")
    grouped = {name for group in groups for name in group["params"]}
    for name, entries in state.items():
        if name not in grouped or not isinstance(entries, dict) or not isinstance(entries.get("values"), dict) or \
                not isinstance(entries.get("tensors"), dict) or \
                not all(isinstance(key, str) and key in tensors for key in entries["tensors"].values()) or \
                not isinstance(entries.get("per_rank", {}), dict) or \
                not all(isinstance(copies, list) and copies and all(isinstance(key, str) and key in tensors
                                                                    for key in copies)
                        for copies in entries.get("per_rank", {}).values()):
            fail(f"the optimizer state of {name!r} is {entries!r}; expected values, tensors of the index and lists "
                 "of them (per_rank) for a parameter of its param_groups")
