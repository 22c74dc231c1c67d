"""Stock state dicts for sharded models: gather one the unsharded model loads, load one into shards.

Sources for loading: a state_dict, a ``.safetensors`` file or a folder of them, or a transformers
index (each rank reads only its slice of each sharded tensor, through the safetensors library; every
file a folder or an index names must lie inside the folder), a ``torch_mp.save``
checkpoint, or a ``torch.save`` file (loaded with ``weights_only=True``, memory-mapped).
"""
import contextlib
import json
import os
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from torch_mp._checkpoint.format import CheckpointReader, file_in_folder, find_checkpoint
from torch_mp._group import all_gather_rows, process_group_of, resolve_group
from torch_mp._checks import check_arg
from torch_mp._checkpoint.safetensors import SafetensorsFile
from torch_mp._state import PIPELINE, TENSOR_PARALLEL, held_state, unwrapped
from torch_mp._tensor_parallel.dtensor import dp_local, like, local_tensor, swap_in, tp_local
from torch_mp._tensor_parallel.sharding import ShardSpec, slice_bounds, take_slices, unshard

StateSource = Union[Mapping[str, torch.Tensor], str, os.PathLike]
_PROGRESS_BYTES = 256 * 2**20  # show a progress bar for loads larger than this


def full_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The stock state_dict of a model sharded by ``tensor_parallel``, split by ``split`` or
    ``pipeline``, with FSDP2's ``fully_shard`` on top or not: stock names and shapes, on the CPU,
    loadable by the unsharded model with ``strict=True``. A collective: every rank of the model's
    groups must call it. A pipeline over a tensor-parallel model gathers each tensor's shard from
    its stage's rank first, then the shards over the tensor-parallel group. Each sharded tensor is all-gathered (``[out / world, in] -> [out, in]`` for
    a colwise weight) and stored once per key; each tensor of a pipeline comes from the lowest rank
    of its group holding it (the others hold a meta stand-in): one all-gather per tensor. Memory:
    the whole model on the CPU of every rank.

    Raises TypeError for a ``module`` that is not an ``nn.Module``; ValueError for a tensor no rank
    holds (on the meta device on every rank); ``torch_mp.CollectiveError`` when a peer does not
    answer within the group's timeout."""
    check_arg("full_state_dict", "module", module, nn.Module, "a torch.nn.Module")
    module = unwrapped(module)
    specs, group, world = tp_state(module)
    # This rank's shard of each tensor-parallel DTensor (FSDP2's data-parallel shards gathered).
    state = {key: tp_local(value.detach(), bool(specs)) for key, value in module.state_dict().items()}
    if is_pipeline(module):
        state = _gather_from_holders(state, held_state(module, PIPELINE).group)
    result = {}
    for key, value in state.items():
        spec, attr = spec_of(key, specs)
        if spec is not None and is_sharded(spec, attr) and world > 1:
            pieces = all_gather_rows(value, group, "torch_mp.full_state_dict").unbind(0)
            value = unshard(pieces, spec.dim if attr == "weight" else 0, spec.parts, spec.replicas)
        if spec is not None and spec.transposed and attr == "weight":
            value = value.t()
        result[key] = value.cpu().contiguous().clone()
    return result


def first_holders(tensors: Mapping[str, torch.Tensor], group, op: str) -> Dict[str, int]:
    """{key: the lowest rank of ``group`` holding ``tensors[key]``}: the rank whose copy is written
    or sent. A rank holds a tensor that is not on the meta device (a pipeline rank holds its stages'
    tensors and meta stand-ins of the others'). One all-gather of a flag per key: every rank of
    ``group`` calls it with the same keys. Raises ValueError naming the keys no rank holds."""
    held = torch.tensor([not local_tensor(value).is_meta for value in tensors.values()], dtype=torch.int32)
    flags = all_gather_rows(held, group, op).cpu().t()
    nowhere = [key for key, ranks in zip(tensors, flags) if not ranks.any()]
    if nowhere:
        raise ValueError(f"{op}: {nowhere[:10]} are on the meta device on every rank; expected real tensors "
                         "(load weights first)")
    return {key: int(ranks.nonzero()[0]) for key, ranks in zip(tensors, flags)}


def _gather_from_holders(state: Dict[str, torch.Tensor], group) -> Dict[str, torch.Tensor]:
    """A pipeline's state_dict with every tensor real, each sent by the lowest rank holding it."""
    op = "torch_mp.full_state_dict"
    holders = first_holders(state, group, op)
    if resolve_group(group).size == 1:
        return state
    result = {}
    for key, value in state.items():
        mine = value.detach() if not value.is_meta else torch.zeros(value.shape, dtype=value.dtype)
        result[key] = all_gather_rows(mine, group, op)[holders[key]]
    return result


@contextlib.contextmanager
def init_empty_weights():
    """Builds modules with their parameters on the meta device (no memory, no initialization) and
    their buffers as usual. Shard the model with ``tensor_parallel``, then ``load_full_state_dict``
    materializes only this rank's slices::

        with torch_mp.init_empty_weights():
            model = LlamaForCausalLM(config)
        torch_mp.tensor_parallel(model)
        torch_mp.load_full_state_dict(model, "checkpoint/")

    As accelerate's ``init_empty_weights``: the parameters take no bytes until loaded. Raises
    nothing itself; while it is active ``nn.Module.register_parameter`` is replaced (not
    thread-safe).
    """
    register = nn.Module.register_parameter

    def register_on_meta(self, name, param):
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_full_state_dict(module: nn.Module, state_dict_or_path: StateSource, strict: bool = True,
                         device: Union[str, torch.device, None] = None) -> nn.Module:
    """Loads a stock state_dict (or checkpoint file or folder) into a model sharded by
    ``tensor_parallel``, split by ``split`` or ``pipeline``: each rank takes its slices (a pipeline
    rank its stages' tensors; the meta stand-ins of other ranks' stages stay as they are), read
    slice by slice from safetensors files. The inverse of ``full_state_dict``.

    Parameters still on the meta device (``init_empty_weights``) are materialized on ``device``
    (default: a pipeline's device, else the CPU), holding only this rank's slice (a pipeline rank
    only its stages' tensors), in place: tied parameters stay tied and an optimizer built before
    steps them. Each rank reads
    ``1 / group size`` of each sharded tensor's bytes (safetensors slices, as transformers'
    tensor-parallel loading does); a progress bar shows loads over 256 MiB.

    Raises TypeError for a ``module`` that is not an ``nn.Module`` or a source of another type;
    FileNotFoundError for a path that does not exist; ValueError for missing or unexpected keys
    (``strict``), shapes that differ from the model's, meta tensors the source does not hold, or
    files a folder or index names outside the folder."""
    check_arg("load_full_state_dict", "module", module, nn.Module, "a torch.nn.Module")
    check_arg("load_full_state_dict", "state_dict_or_path", state_dict_or_path, (Mapping, str, os.PathLike),
              "a state_dict or the path of a checkpoint file or folder")
    module = unwrapped(module)
    specs, group, world = tp_state(module)
    rank = resolve_group(group).rank if specs else 0
    keys, read_full, read_slices = open_source(state_dict_or_path)
    # Tensors read from files are this call's own; a caller's state_dict is copied, never aliased.
    borrowed = isinstance(state_dict_or_path, Mapping)
    targets = module.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(targets) - set(keys)), sorted(set(keys) - set(targets))
    if strict and (missing or unexpected):
        raise ValueError(f"load_full_state_dict: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}; "
                         "expected the stock state_dict of this model (or strict=False)")
    pipe = getattr(held_state(module, PIPELINE), "pipe", None)
    if pipe is not None:  # other ranks' stages: meta stand-ins, loaded there
        targets = {key: target for key, target in targets.items() if holds(module, target)}
        device = pipe.device if device is None else device
    _check_no_meta_outside(module, targets, keys)
    materialized: set = set()
    targets = {key: (target, local_tensor(target)) for key, target in targets.items()}
    total = sum(t.numel() * t.element_size() for k, (_, t) in targets.items() if k in keys)
    with _progress(total, rank) as progress, torch.no_grad():
        for key, (target, shard) in targets.items():
            if key not in keys:
                continue
            # This rank's slice, then its FSDP2 shard (a data-parallel mesh dim of a DTensor).
            value = dp_local(target, read_local(key, *spec_of(key, specs), rank, world, read_full, read_slices),
                             bool(specs))
            if value.shape != shard.shape:
                raise ValueError(f"load_full_state_dict: {key!r} has shape {tuple(value.shape)} in the source but "
                                 f"{tuple(shard.shape)} is expected on this rank")
            if shard.device.type == "meta":
                _materialize(target, value, shard.dtype, device, borrowed, materialized)
            else:
                shard.copy_(value)
            progress(shard.numel() * shard.element_size())
    return module


def read_local(key: str, spec: Optional[ShardSpec], role: str, rank: int, world: int, read_full: "Reader",
               read_slices: "SliceReader") -> torch.Tensor:
    """This rank's part of the stock tensor ``key``, in the layout of the parameter with ``spec`` and
    ``role`` (see ``spec_of``): its slices when that parameter is sharded, else the whole tensor."""
    dim, transposed = stock_layout(spec, role)
    value = read_full(key) if dim is None else read_slices(key, dim, slice_bounds(spec.parts, rank, world, spec.replicas))
    return value.t() if transposed else value


def stock_layout(spec: Optional[ShardSpec], role: str) -> Tuple[Optional[int], bool]:
    """The dim of the stock tensor along which a parameter with ``spec`` and ``role`` is cut (None:
    it holds the whole tensor), and whether it holds it transposed (transformers' Conv1D weights)."""
    if spec is None or not is_sharded(spec, role):
        return None, False
    transposed = spec.transposed and role == "weight"
    dim = spec.dim if role == "weight" else 0
    return (1 - dim if transposed else dim), transposed


def _materialize(target, value, dtype: torch.dtype, device, borrowed, materialized: set) -> None:
    """Makes the meta parameter ``target`` hold ``value`` in place (``swap_in``): modules it is tied
    to, an optimizer built before and the pipeline's records of it keep the same object. The value
    takes the parameter's ``dtype``, as ``load_state_dict``'s copy does (a bf16 checkpoint into a
    model built in fp32 stays fp32)."""
    if id(target) in materialized:
        return
    materialized.add(id(target))
    swap_in(target, like(target, value.to(device or "cpu", dtype, copy=borrowed).contiguous()))


def _check_no_meta_outside(module, targets, keys) -> None:
    left = [key for key, tensor in targets.items() if tensor.device.type == "meta" and key not in keys]
    if not is_pipeline(module):
        left += [f"{name} (buffer)" for name, buffer in module.named_buffers() if buffer.device.type == "meta"]
    if left:
        raise ValueError(f"load_full_state_dict: {left[:10]} are on the meta device and the source does not hold "
                         "them; expected a source with every parameter, and buffers built for real (build the "
                         "model under torch_mp.init_empty_weights(), which keeps buffers off the meta device)")


def tp_state(module: nn.Module):
    """``(specs, process group, group size)`` of a ``tensor_parallel`` module (pipelined after or
    not); ``({}, None, 1)`` for any other."""
    state = held_state(module, TENSOR_PARALLEL)
    if state is None:
        return {}, None, 1
    group = process_group_of(state.group)
    return state.specs, group, resolve_group(group).size if state.specs else 1


def holds(module: nn.Module, tensor: torch.Tensor) -> bool:
    """Whether this rank holds ``tensor`` of ``module``: a pipeline rank its stages' tensors (real,
    or still on the meta device until ``load_full_state_dict`` fills them), not the meta stand-ins
    of other ranks' stages; a rank of any other model all of its tensors."""
    pipe = getattr(held_state(module, PIPELINE), "pipe", None)
    return pipe is None or not local_tensor(tensor).is_meta or pipe.holds(tensor)


def is_pipeline(module: nn.Module) -> bool:
    """Whether ``module`` was returned by ``pipeline``: its other ranks' tensors are meta stand-ins."""
    return held_state(module, PIPELINE) is not None


def spec_of(key: str, specs: Mapping[str, ShardSpec]) -> Tuple[Optional[ShardSpec], str]:
    """The spec of the module owning ``key`` and the parameter's role in it: "weight", "bias" or "".
    A spec keyed by the parameter's own name (an MoE block's 3-D expert weights) makes it a weight."""
    if key in specs:
        return specs[key], "weight"
    owner, _, attr = key.rpartition(".")
    spec = specs.get(owner)
    if spec is None:
        return None, ""
    return spec, {spec.weight_name: "weight", spec.bias_name: "bias"}.get(attr, "")


def is_sharded(spec: ShardSpec, role: str) -> bool:
    return role == "weight" or (role == "bias" and spec.shards_bias())


# --- sources -----------------------------------------------------------------------------------

Reader = Callable[[str], torch.Tensor]
SliceReader = Callable[[str, int, List[Tuple[int, int]]], torch.Tensor]


def open_source(source: StateSource) -> Tuple[Iterable[str], Reader, SliceReader]:
    if isinstance(source, Mapping):
        return set(source), lambda key: source[key], lambda key, dim, bounds: take_slices(source[key], dim, bounds)
    path = os.fspath(source)
    if find_checkpoint(path) is not None:
        reader = CheckpointReader(path)
        return reader.model_keys, reader.read_full, reader.read_slices
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_full_state_dict: state_dict_or_path={path!r} does not exist; expected a "
                                "checkpoint file or folder")
    files = _safetensors_files(path)
    if files is None:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return open_source(state)
    handles = {file: SafetensorsFile(file, "load_full_state_dict") for file in set(files.values())}
    return (set(files), lambda key: handles[files[key]].read(key),
            lambda key, dim, bounds: handles[files[key]].read_slices(key, dim, bounds))


def _safetensors_files(path: str) -> Optional[Dict[str, str]]:
    """{tensor name: file} for a .safetensors file, a folder of them, or a transformers index; None
    for any other file. Every file the index or the folder names must lie inside the folder."""
    what = "load_full_state_dict"
    if os.path.isdir(path):
        index = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        if index:
            index_path = file_in_folder(path, index[0], f"{what}: the listing of {path}")
            with open(index_path, "rb") as handle:
                text = handle.read()
            try:
                weight_map = json.loads(text)["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, TypeError, KeyError) as error:
                raise ValueError(f"{what}: {index_path} is not a transformers index ({type(error).__name__}: "
                                 f"{error}); expected JSON holding a 'weight_map'") from None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{what}: {index_path} has a weight_map that is a {type(weight_map).__name__}; "
                                 "expected an object {tensor name: file}")
            return {key: file_in_folder(path, file, f"{what}: {index_path}: weight_map[{key!r}]")
                    for key, file in weight_map.items()}
        files = sorted(file_in_folder(path, f, f"{what}: the listing of {path}")
                       for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"{what}: folder {path!r} holds no .safetensors files")
    elif path.endswith(".safetensors"):
        files = [path]
    else:
        return None
    mapping = {}
    for file in files:
        reader = SafetensorsFile(file, what)
        mapping.update({key: file for key in reader.keys()})
        reader.close()
    return mapping


class _progress:
    """A tqdm bar on rank 0 for large loads; nothing otherwise."""

    def __init__(self, total_bytes: int, rank: int):
        self.bar = None
        if total_bytes >= _PROGRESS_BYTES and rank == 0:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading")
            except ImportError:
                pass

    def __enter__(self):
        return lambda nbytes: self.bar.update(nbytes) if self.bar is not None else None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
