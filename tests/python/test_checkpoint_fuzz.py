"""Property tests of the checkpoint loaders against files from strangers: hypothesis mutates valid
safetensors files (their header length, header JSON, bytes, length), torch_mp.save indexes (any
field replaced by any JSON value, file names that leave the folder) and transformers indexes, and
feeds them to ``torch_mp.load`` and ``load_full_state_dict``. Each input must load the saved
numbers exactly or raise a ValueError naming the file (or folder) at fault; nothing else: no other
exception, no allocation beyond a small bound (the address space is capped while loading), no file
opened outside the checkpoint folder."""
import contextlib
import json
import os
import re
import resource
import shutil
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_mp
import torch_mp._checkpoint.safetensors as safetensors_module
from torch_mp._checkpoint.safetensors import write_file

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ALLOCATION_BOUND = 256 * 2**20  # bytes of address space a load of these tiny files may add
MISMATCH = r"load_full_state_dict: (missing keys \[.*\], unexpected keys|'.*' has shape .* in the source)"


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


SAVED = model(0)
OTHER = model(1)  # the weights a file outside the folder holds


@contextlib.contextmanager
def guarded(folder: str):
    """Caps the address space while loading and fails on any safetensors file opened outside
    ``folder``."""
    root = os.path.realpath(folder)
    original = safetensors_module.safe_open

    def safe_open(path, *args, **kwargs):
        assert os.path.commonpath([root, os.path.realpath(path)]) == root, f"opened {path} outside {root}"
        return original(path, *args, **kwargs)

    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    safetensors_module.safe_open = safe_open
    resource.setrlimit(resource.RLIMIT_AS, (used + ALLOCATION_BOUND, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        safetensors_module.safe_open = original


def check_load(load, folder: str, named: str) -> None:
    """``load()`` gives SAVED's numbers, or a ValueError whose message names ``named`` (or, for a
    source well formed but holding other keys or shapes than the model, names those)."""
    target = model(2)
    try:
        with guarded(folder):
            load(target)
    except ValueError as error:
        assert named in str(error) or re.match(MISMATCH, str(error)), f"the error does not name {named}: {error}"
        return
    for key, value in SAVED.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), f"{key} loaded without an error but differs"


# --- safetensors files --------------------------------------------------------------------------

def valid_file() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        write_file(path, list(SAVED.state_dict().items()))
        with open(path, "rb") as handle:
            return handle.read()


VALID_FILE = valid_file()
HEADER_LENGTH = struct.unpack("<Q", VALID_FILE[:8])[0]
HEADER = json.loads(VALID_FILE[8:8 + HEADER_LENGTH])
DATA = VALID_FILE[8 + HEADER_LENGTH:]

sizes = st.one_of(st.integers(-2, 40), st.sampled_from([2**31, 2**40, 2**63 - 1, 2**63, 2**64, -(2**63)]))
json_scalars = st.one_of(st.none(), st.booleans(), sizes, st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


def tensor_entries():
    dtypes = st.sampled_from(["F32", "F16", "I64", "BOOL", "Q8", "", "f32"]) | json_values
    return st.fixed_dictionaries({"dtype": dtypes, "shape": st.lists(sizes, max_size=3) | json_values,
                                  "data_offsets": st.lists(sizes, min_size=0, max_size=3) | json_values})


@st.composite
def malformed_files(draw) -> bytes:
    kind = draw(st.sampled_from(["length", "header", "entry", "bytes", "truncate"]))
    if kind == "length":  # the header length alone: beyond the file, 10^12, 0, ...
        length = draw(st.sampled_from([0, 1, 7, 10**12, 2**63, 2**64 - 1]) | st.integers(0, 2 * len(VALID_FILE)))
        return struct.pack("<Q", length) + VALID_FILE[8:]
    if kind == "header":  # any JSON, or any bytes, as the header
        text = draw(st.binary(max_size=64) | json_values.map(lambda value: json.dumps(value).encode()))
        return struct.pack("<Q", len(text)) + text + DATA
    if kind == "entry":  # one tensor's entry replaced
        header = dict(HEADER)
        header[draw(st.sampled_from(sorted(header)))] = draw(tensor_entries() | json_values)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + DATA
    if kind == "bytes":  # a few bytes of the header overwritten
        data = bytearray(VALID_FILE)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, 8 + HEADER_LENGTH - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return VALID_FILE[:draw(st.integers(0, len(VALID_FILE) - 1))]


@SETTINGS
@given(data=malformed_files(), as_folder=st.booleans())
def test_malformed_safetensors_files(data, as_folder):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        with open(path, "wb") as handle:
            handle.write(data)
        check_load(lambda target: torch_mp.load_full_state_dict(target, folder if as_folder else path), folder, path)


# --- torch_mp.save checkpoints ------------------------------------------------------------------

def json_paths(value, prefix=()):
    """Every path into a JSON value: the keys and list positions leading to each node."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from json_paths(inner, prefix + (key,))


def replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


def sharded_checkpoint(folder: str) -> None:
    """SAVED as two ranks would write it: each Linear's weight cut along dim 0 (unevenly), the rest
    whole in rank 0's file; the index by hand, in the format of torch_mp/_checkpoint_format.py."""
    os.makedirs(folder)
    state = SAVED.state_dict()
    files = [f"rank-0000{rank}-of-00002.safetensors" for rank in range(2)]
    held = [[], []]
    tensors = {}
    for key, value in state.items():
        if key.endswith("weight"):
            cut = 1
            held[0].append((key, value[:cut].contiguous()))
            held[1].append((key, value[cut:].contiguous()))
            tensors[key] = {"dim": 0, "bounds": [[[0, cut]], [[cut, value.shape[0]]]], "ranks": [0, 1]}
        else:
            held[0].append((key, value))
            tensors[key] = {"dim": None, "bounds": [None], "ranks": [0]}
    checksums = [write_file(os.path.join(folder, files[rank]), held[rank]) for rank in range(2)]
    index = {"format": "torch_mp.checkpoint", "version": 1, "checksum": "crc32 (zlib) of each piece's bytes",
             "world_size": 2, "model": list(state), "optimizer": None, "extra": {"step": 3},
             "tensors": {key: {"dtype": "F32", "shape": list(state[key].shape), "dim": entry["dim"],
                               "pieces": [{"file": files[rank], "key": key, "bounds": bounds,
                                           "crc32": checksums[rank][key]}
                                          for rank, bounds in zip(entry["ranks"], entry["bounds"])]}
                         for key, entry in tensors.items()}}
    with open(os.path.join(folder, "torch_mp_checkpoint.json"), "w") as handle:
        json.dump(index, handle)


@pytest.fixture(scope="module")
def checkpoints():
    with tempfile.TemporaryDirectory() as root:
        torch_mp.save(SAVED, os.path.join(root, "plain"))
        sharded_checkpoint(os.path.join(root, "sharded"))
        torch_mp.save(OTHER, os.path.join(root, "outside"))  # what an escaping name would read
        yield root


ESCAPES = ["../outside/rank-00000-of-00001.safetensors", "/etc/passwd", "link.safetensors", "a/../../outside/x",
           "", ".", "rank-00000-of-00001.safetensors/..", "\0", "missing.safetensors", "sub/"]


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["plain", "sharded"]))
def test_malformed_indexes(checkpoints, data, which):
    with tempfile.TemporaryDirectory(dir=checkpoints) as scratch:
        folder = os.path.join(scratch, "ckpt")
        shutil.copytree(os.path.join(checkpoints, which), folder)
        os.symlink(os.path.join(checkpoints, "outside", "rank-00000-of-00001.safetensors"),
                   os.path.join(folder, "link.safetensors"))
        index_path = os.path.join(folder, "torch_mp_checkpoint.json")
        with open(index_path) as handle:
            index = json.load(handle)
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(list(json_paths(index))))
            new = data.draw(json_values | st.sampled_from(ESCAPES) if path and path[-1] == "file" else json_values)
            index = replaced(index, path, new)
        text = json.dumps(index).encode()
        if data.draw(st.booleans()):  # or cut short
            text = text[:data.draw(st.integers(0, len(text)))]
        with open(index_path, "wb") as handle:
            handle.write(text)
        check_load(lambda target: torch_mp.load(target, folder, restore_rng=False), folder, folder)
        check_load(lambda target: torch_mp.load_full_state_dict(target, folder), folder, folder)


@SETTINGS
@given(data=st.data())
def test_truncated_rank_files(checkpoints, data):
    with tempfile.TemporaryDirectory(dir=checkpoints) as scratch:
        folder = os.path.join(scratch, "ckpt")
        shutil.copytree(os.path.join(checkpoints, "sharded"), folder)
        file = os.path.join(folder, data.draw(st.sampled_from(["rank-00000-of-00002.safetensors",
                                                              "rank-00001-of-00002.safetensors"])))
        size = os.path.getsize(file)
        os.truncate(file, data.draw(st.integers(0, size - 1)))
        check_load(lambda target: torch_mp.load(target, folder, restore_rng=False), folder, file)


# --- transformers indexes -----------------------------------------------------------------------

@SETTINGS
@given(weight_map=st.dictionaries(st.sampled_from(list(SAVED.state_dict())), st.sampled_from(ESCAPES) |
                                  st.just("model.safetensors")) | json_values, cut=st.integers(0, 200))
def test_malformed_transformers_indexes(checkpoints, weight_map, cut):
    with tempfile.TemporaryDirectory(dir=checkpoints) as folder:
        with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
            handle.write(VALID_FILE)
        os.symlink(os.path.join(checkpoints, "outside", "rank-00000-of-00001.safetensors"),
                   os.path.join(folder, "link.safetensors"))
        text = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
        with open(os.path.join(folder, "model.safetensors.index.json"), "wb") as handle:
            handle.write(text[:cut] if cut < len(text) else text)
        check_load(lambda target: torch_mp.load_full_state_dict(target, folder), folder, folder)
