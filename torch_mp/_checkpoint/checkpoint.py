"""Sharded checkpoints: ``torch_mp.save`` and ``torch_mp.load``.

Each rank writes only what it holds, in the stock layout (stock names; slices of the stock tensors
with the ranges they cover), into one safetensors file; rank 0 then writes a JSON index and renames
the folder into place. Loading cuts each rank's slices out of those pieces whatever the
tensor-parallel size that wrote them, so a checkpoint saved on 2 ranks loads on 1 or 4, and no rank
ever holds more than its own slices and one piece. No pickle: tensors in safetensors, everything
else (optimizer hyperparameters, step counts that are not tensors, ``extra``) in JSON. The format is
described in ``torch_mp/_checkpoint/format.py``.
"""
import json
import logging
import os
import shutil
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
    Union,
)

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from torch_mp._checkpoint.format import (
    FORMAT,
    INCOMPLETE,
    INDEX,
    OLD,
    VERSION,
    CheckpointReader,
    find_checkpoint,
    rank_file,
)
from torch_mp._group import all_reduce_sum, resolve_group
from torch_mp._state import unwrapped
from torch_mp._checkpoint.safetensors import dtype_name, write_file
from torch_mp._tensor_parallel.dtensor import dp_local, dp_shard_range, like, local_tensor, tp_local, tp_local_shape
from torch_mp._tensor_parallel.sharding import ShardSpec, slice_bounds
from torch_mp._checkpoint.state_dict import (
    first_holders,
    holds,
    load_full_state_dict,
    read_local,
    spec_of,
    stock_layout,
    tp_state,
)

logger = logging.getLogger("torch_mp")
PathLike = Union[str, os.PathLike]


def save(module: nn.Module, path: PathLike, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Optional[Mapping[str, Any]] = None) -> None:
    """Saves ``module`` (plain, ``split``, ``pipeline`` or ``tensor_parallel``; DDP or torch.compile
    around one saves the module inside, under the stock names), and ``optimizer``'s state if given,
    to the folder ``path``, atomically: written as ``path.incomplete``, every file fsynced, then
    renamed to ``path``, replacing an earlier checkpoint there only once the new one is complete.

    Also saved: each rank's CPU random number generator state (and the current CUDA device's, once
    CUDA is initialized), which ``load`` restores, and ``extra``: JSON values (a step count, a
    scheduler's ``state_dict()``), which ``load`` returns.

    With torch.distributed initialized, a collective over the default group: every rank calls it
    with the same ``path``, on a file system all ranks share. A tensor-parallel rank writes its own
    slices; each whole tensor is written by the lowest rank holding it (rank 0 for replicated ones;
    a pipeline rank writes its stages' tensors, whole); data-parallel replicas other than rank 0's
    write only their random state, unless FSDP2 shards the tensor over them (``pipeline(...,
    fully_shard=True)``): then each replica writes its shard (torch.chunk's range of dim 0), with
    its optimizer state, and the checkpoint loads into the plain model or any other layout alike;
    over ``tensor_parallel`` (2-D DTensors on (dp, tp)) each tensor-parallel shard is gathered over
    the replicas first and written as without FSDP2.
    Each tensor is stored whole-shaped in the index (its stock shape), each rank's pieces in a
    safetensors file of its own; resharding on load as in PyTorch's distributed checkpoint
    (``torch.distributed.checkpoint``). Optimizer state of its
    parameter's shape (Adam's moments) is stored as the parameter is; state of another shape
    (Adafactor's row and column statistics) of a parameter cut across ranks is stored per rank, as
    each rank holds it (state of replicated parameters is the same on every rank: stored once).

    Raises TypeError for a ``module`` that is not an ``nn.Module``, an ``optimizer`` that is not a
    ``torch.optim.Optimizer``, an ``extra`` that is not a dict, or DTensor parameters on a 2-D mesh
    of a model without tensor parallelism (HSDP: save ``full_state_dict`` instead);
    ValueError for values that are not JSON or tensors on the meta device on every rank; FileExistsError when
    ``path`` holds something other than a checkpoint; RuntimeError on every rank when another rank
    failed; ``torch_mp.CollectiveError`` when a peer does not answer within the group's timeout.
    """
    rank, world = _world()
    module = unwrapped(module)
    final = os.path.abspath(os.fspath(path))
    temp = final + INCOMPLETE
    pieces, states, meta = _on_every_rank("preparing the save",
                                          lambda: _prepare(module, optimizer, extra, final, temp, rank))
    # Which rank writes each whole tensor: the lowest holding it (a pipeline rank holds its stages).
    holders = first_holders(module.state_dict(), None, "torch_mp.save")
    mine, states = _pieces_to_write(module, pieces, states, holders, rank)
    _on_every_rank("writing its checkpoint file", lambda: _write_rank(temp, mine, states, rank, world))
    _on_every_rank("writing the index and renaming the checkpoint into place",
                   lambda: rank == 0 and _finish(temp, final, world, meta))


def load(module: nn.Module, path: PathLike, optimizer: Optional[torch.optim.Optimizer] = None,
         strict: bool = True, restore_rng: bool = True) -> Dict[str, Any]:
    """Loads a ``torch_mp.save`` checkpoint into ``module`` (plain, ``split``, ``pipeline`` with any
    split of the layers, or ``tensor_parallel`` at any tensor-parallel size that divides the
    model, whichever of them saved it; parameters on the meta device are materialized with this
    rank's slices, and ``optimizer`` is given the new ones; a pipeline rank loads its stages and
    leaves the stand-ins of the others; under ``pipeline(..., fully_shard=True)`` each replica its
    FSDP2 shard of them and of their optimizer state), and into ``optimizer`` if given. Returns the ``extra``
    saved with it. Optimizer state of another shape than its parameter (Adafactor's statistics)
    loads where the parameter is held as when saved (whole, or cut across as many ranks); a scalar
    that every rank saved alike (a step count) loads anywhere.

    Checks before loading: every key present (``strict``: and no other), stock shapes equal; and
    while reading, the shape and CRC-32 of every piece. ``restore_rng`` restores this rank's random
    state when the checkpoint was saved by as many ranks. Needs no collective.

    Raises TypeError for a ``module`` that is not an ``nn.Module`` or an ``optimizer`` that is not
    a ``torch.optim.Optimizer``; FileNotFoundError when ``path`` holds no checkpoint; ValueError for
    missing or unexpected keys, other stock shapes, a piece whose CRC-32 or shape does not match,
    an index that does not follow the format, or optimizer state of another shape than its
    parameter that this layout cannot take (raised before any weight is loaded).
    """
    _check_module(module, "load", optimizer)
    module = unwrapped(module)
    reader = CheckpointReader(os.fspath(path))
    specs, group, tp_world = tp_state(module)
    tp_rank = resolve_group(group).rank if specs else 0
    targets = module.state_dict(keep_vars=True)
    if strict:
        missing = [key for key in targets if key not in reader.model_keys]
        unexpected = [key for key in reader.model_keys if key not in targets]
        if missing or unexpected:
            raise ValueError(f"torch_mp.load: the checkpoint at {reader.folder} lacks keys {missing[:10]} of the model"
                             f" and holds keys {unexpected[:10]} the model does not have; expected a checkpoint of "
                             "this model (or strict=False)")
    for key, target in targets.items():
        if key in reader.model_keys:
            expected = _target_stock_shape(target, *spec_of(key, specs), bool(specs))
            if reader.shape(key) != expected:
                raise ValueError(f"torch_mp.load: {key!r} has shape {reader.shape(key)} in the checkpoint at "
                                 f"{reader.folder}; the model expects {expected} (the stock shape)")
    # The optimizer state is read and checked before any weight is loaded; parameters on the meta
    # device are filled in place, so the optimizer holds them still.
    state = None if optimizer is None else _read_optimizer(reader, module, optimizer, specs, tp_rank, tp_world)
    load_full_state_dict(module, reader.folder, strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(state)
    if restore_rng:
        _restore_rng(reader)
    return reader.index["extra"]


# --- saving --------------------------------------------------------------------------------------

# Who writes a piece: every rank its own (random state); the tensor-parallel group holding rank 0
# its shards and each of its ranks' own optimizer state (Adafactor's statistics); the lowest rank
# holding a whole tensor (rank 0, or the pipeline rank of its stage) that tensor.
OWN, SHARDS, WHOLE = "own", "shards", "whole"


class _Piece(NamedTuple):
    name: str                      # the stock name (or optimizer/<parameter>/<key>, rng/<device>/<rank>)
    tensor: torch.Tensor           # what this rank holds, in the stock layout
    shape: List[int]               # the stock tensor's shape
    dim: Optional[int]             # the dim it is cut along; None: the tensor is whole
    bounds: Optional[List[Tuple[int, int]]]  # the ranges of the stock tensor along dim it concatenates
    writer: str                    # OWN, SHARDS or WHOLE
    owner: str                     # the state_dict key whose holders write a WHOLE piece


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_module(module: nn.Module, what: str, optimizer=None) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"torch_mp.{what}: expected module to be a torch.nn.Module, got {type(module).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"torch_mp.{what}: expected optimizer to be a torch.optim.Optimizer or None, got "
                        f"{type(optimizer).__name__}")


def _stock_shape(value: torch.Tensor, spec: Optional[ShardSpec], role: str) -> Tuple[int, ...]:
    dim, transposed = stock_layout(spec, role)
    shape = list(value.t().shape if transposed else value.shape)
    if dim is not None:
        shape[dim] = sum(spec.parts)
    return tuple(shape)


def _target_stock_shape(target: torch.Tensor, spec: Optional[ShardSpec], role: str,
                        tensor_parallel: bool) -> Tuple[int, ...]:
    """The stock shape of the model's tensor ``target``: an FSDP2 DTensor's own shape (a model
    without tensor parallelism), else that of its tensor-parallel shard (FSDP2's over it
    gathered) in the stock layout."""
    if isinstance(target, DTensor) and not tensor_parallel:
        return tuple(target.shape)
    if isinstance(target, DTensor):
        return _stock_shape(torch.empty(tp_local_shape(target), device="meta"), spec, role)
    return _stock_shape(target, spec, role)


def _stock_piece(name: str, owner: str, value: torch.Tensor, spec: Optional[ShardSpec], role: str, rank: int,
                 world: int) -> _Piece:
    if isinstance(value, DTensor):  # FSDP2's (a tensor-parallel one is this rank's local tensor by now)
        return _data_parallel_piece(name, owner, value)
    dim, transposed = stock_layout(spec, role)
    value = local_tensor(value).detach()
    return _Piece(name, value.t() if transposed else value, list(_stock_shape(value, spec, role)), dim,
                  None if dim is None else slice_bounds(spec.parts, rank, world, spec.replicas),
                  WHOLE if dim is None else SHARDS, owner)


def _data_parallel_piece(name: str, owner: str, value: DTensor) -> _Piece:
    """This rank's shard of an FSDP2 DTensor of a model without tensor parallelism
    (``pipeline(..., fully_shard=True)``: its data-parallel replicas each hold torch.chunk's piece
    of dim 0): the range of the stock tensor it covers, written by every replica holding it, as
    tensor-parallel shards are. TypeError for a DTensor on a mesh of more dims (HSDP)."""
    if value.device_mesh.ndim != 1:
        raise TypeError(f"torch_mp.save: {name!r} is a DTensor on a {value.device_mesh.ndim}-D mesh placed "
                        f"{value.placements} in a model without tensor_parallel (HSDP); expected FSDP2 on a 1-D "
                        "data-parallel mesh (pipeline(..., fully_shard=True)), over tensor_parallel or not: save "
                        "torch_mp.full_state_dict(model) instead")
    local = value._local_tensor.detach()
    cut = dp_shard_range(value)
    if cut is None:
        return _Piece(name, local, list(value.shape), None, None, WHOLE, owner)
    dim, start, stop = cut
    return _Piece(name, local, list(value.shape), dim, [(start, stop)], SHARDS, owner)


def _pieces_of_this_rank(module: nn.Module, optimizer, rank: int) -> Tuple[List[_Piece], Dict[str, dict]]:
    """The pieces this rank holds (tensors on the meta device, other pipeline ranks' stages, are
    not held), and {parameter name: its optimizer state's JSON entry} for the parameters it holds."""
    specs, group, tp_world = tp_state(module)
    tp_rank = resolve_group(group).rank if specs else 0
    pieces = [_stock_piece(key, key, _tp_shard(value, bool(specs)), *spec_of(key, specs), tp_rank, tp_world)
              for key, value in module.state_dict().items() if not local_tensor(value).is_meta]
    states = {}
    if optimizer is not None:
        params = dict(module.named_parameters())
        for name, state in _optimizer_state_by_name(module, optimizer).items():
            param = params[name]
            if local_tensor(param).is_meta:
                continue
            shape = tp_local_shape(param) if isinstance(param, DTensor) and specs else list(local_tensor(param).shape)
            spec, role = spec_of(name, specs)
            sharded = stock_layout(spec, role)[0] is not None
            entry = {"values": {}, "tensors": {}, "per_rank": {}}
            for key, value in state.items():
                stock = f"optimizer/{name}/{key}"
                if not isinstance(value, torch.Tensor):
                    entry["values"][key] = value
                    continue
                value = _tp_shard(value, bool(specs))
                if list(local_tensor(value).shape) == shape:  # Adam's moments: cut like the parameter
                    pieces.append(_stock_piece(stock, name, value, spec, role, tp_rank, tp_world))
                    entry["tensors"][key] = stock
                elif sharded:  # another shape (Adafactor's row and column statistics): each rank's own
                    names = [f"{stock}/rank-{r:05d}-of-{tp_world:05d}" for r in range(tp_world)]
                    pieces.append(_as_held(names[tp_rank], local_tensor(value).detach(), SHARDS, name))
                    entry["per_rank"][key] = names
                else:  # of a whole parameter: whole, as the parameter
                    pieces.append(_stock_piece(stock, name, value, None, "", 0, 1))
                    entry["tensors"][key] = stock
            states[name] = entry
    # Every rank's own random state, for a resume that draws the same numbers.
    pieces.append(_as_held(f"rng/cpu/{rank}", torch.get_rng_state(), OWN, ""))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pieces.append(_as_held(f"rng/cuda/{rank}", torch.cuda.get_rng_state(), OWN, ""))
    return pieces, states


def _as_held(name: str, tensor: torch.Tensor, writer: str, owner: str) -> _Piece:
    """A piece stored whole, as this rank holds it (no stock tensor it is a slice of)."""
    return _Piece(name, tensor, list(tensor.shape), None, None, writer, owner)


def _pieces_to_write(module: nn.Module, pieces: List[_Piece], states: Dict[str, dict], holders: Dict[str, int],
                     rank: int) -> Tuple[List[_Piece], Dict[str, dict]]:
    """One copy of each tensor: its shards from the tensor-parallel group that holds the lowest rank
    holding the tensor (rank 0's, or under a pipeline its stage's; the other data-parallel
    replicas hold the same), each whole tensor and its optimizer state from the lowest rank holding
    it; every rank's random state."""
    _, group, _ = tp_state(module)
    tp_ranks = _ranks_of_group(group)
    mine = [piece for piece in pieces if piece.writer == OWN or
            (piece.writer == SHARDS and holders.get(piece.owner, 0) in tp_ranks) or
            (piece.writer == WHOLE and holders.get(piece.owner, 0) == rank)]
    written = {piece.owner for piece in mine}
    return mine, {name: entry for name, entry in states.items() if name in written}


def _tp_shard(value: torch.Tensor, tensor_parallel: bool) -> torch.Tensor:
    """This rank's shard of a tensor-parallel DTensor parameter (or its optimizer state), FSDP2's
    shards over it gathered (a collective over the data-parallel group: FSDP2 over tensor
    parallelism, 2-D DTensors); anything else as it is (FSDP2's DTensors without tensor
    parallelism: ``_data_parallel_piece`` writes their shards)."""
    if isinstance(value, DTensor) and tensor_parallel:
        return tp_local(value, tensor_parallel)
    return value


def _ranks_of_group(group) -> List[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return [0]
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def _optimizer_state_by_name(module: nn.Module, optimizer) -> Dict[str, Dict[str, Any]]:
    names = _parameter_names(module, optimizer, "save")
    return {names[i]: state for i, state in optimizer.state_dict()["state"].items()}


def _parameter_names(module: nn.Module, optimizer, what: str) -> List[str]:
    """The module's names of the optimizer's parameters, in the order ``state_dict()`` numbers them."""
    names = {id(param): name for name, param in module.named_parameters()}
    result = []
    for number, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(f"torch_mp.{what}: optimizer.param_groups[{number}] holds a parameter of shape "
                                 f"{tuple(param.shape)} that module does not have; expected an optimizer over "
                                 "module's parameters")
            result.append(names[id(param)])
    return result


def _optimizer_groups(module: nn.Module, optimizer) -> List[Dict[str, Any]]:
    """The optimizer's param_groups, with the parameters' names: rank 0's go into the index."""
    names = _parameter_names(module, optimizer, "save")
    return [{**{k: v for k, v in group.items() if k != "params"}, "params": [names[i] for i in group["params"]]}
            for group in optimizer.state_dict()["param_groups"]]


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"torch_mp.save: {what} must hold only JSON values (dicts with string keys, lists, "
                        f"strings, numbers, booleans, None); {error}") from None


def _on_every_rank(step: str, action: Callable[[], Any]) -> Any:
    """Runs ``action``, then every rank learns whether any rank failed, so that none waits forever
    for the others at the next step."""
    failure, result = None, None
    try:
        result = action()
    except Exception as error:  # noqa: BLE001  (raised below, once every rank knows)
        failure = error
    rank, world = _world()
    failed = [rank] if failure is not None else []
    if world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flags = torch.zeros(world, dtype=torch.int32, device=device)
        flags[rank] = int(failure is not None)
        failed = all_reduce_sum(flags, None, "torch_mp.save").nonzero().flatten().tolist()
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"torch_mp.save: rank(s) {failed} failed {step}; see their errors")
    return result


def _prepare(module: nn.Module, optimizer, extra, final: str, temp: str, rank: int):
    """Checks the arguments and collects this rank's pieces and the JSON metadata; rank 0 makes the
    temporary folder."""
    _check_module(module, "save", optimizer)
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"torch_mp.save: expected extra to be a dict of JSON values, got {type(extra).__name__}")
    pieces, states = _pieces_of_this_rank(module, optimizer, rank)
    meta = {"model": list(module.state_dict().keys()),
            "optimizer": None if optimizer is None else _optimizer_groups(module, optimizer), "extra": dict(extra or {})}
    _json([meta["optimizer"], states], "optimizer.state_dict() (everything but tensors)")
    _json(meta["extra"], "extra")
    if rank == 0:
        if os.path.lexists(final) and find_checkpoint(final) != final and not (os.path.isdir(final) and
                                                                               not os.listdir(final)):
            raise FileExistsError(f"torch_mp.save: {final!r} exists and is not a torch_mp checkpoint; expected a new "
                                  "path, an empty folder or an earlier checkpoint, which the save replaces")
        shutil.rmtree(temp, ignore_errors=True)  # left by a save that did not finish
        os.makedirs(temp)
    return pieces, states, meta


def _write_rank(temp: str, pieces: List[_Piece], states: Dict[str, dict], rank: int, world: int) -> None:
    """This rank's safetensors file, and a JSON manifest of its pieces and of the optimizer state
    of the parameters it writes, for rank 0 to merge. Tensors held under several names (tied
    weights) are written once."""
    keys, seen, unique = {}, {}, []
    for piece in pieces:
        tensor = piece.tensor
        identity = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() == 0 or identity not in seen:
            seen[identity] = piece.name
            unique.append((piece.name, tensor))
        keys[piece.name] = seen[identity] if tensor.numel() else piece.name
    file = rank_file(rank, world)
    checksums = write_file(os.path.join(temp, file), unique)
    manifest = {piece.name: {"dtype": dtype_name(piece.tensor.dtype), "shape": piece.shape, "dim": piece.dim,
                             "pieces": [{"file": file, "key": keys[piece.name], "bounds": piece.bounds,
                                         "crc32": checksums[keys[piece.name]]}]}
                for piece in pieces}
    with open(os.path.join(temp, f"rank-{rank:05d}.json"), "w") as handle:
        json.dump({"tensors": manifest, "optimizer_state": states}, handle)


def _finish(temp: str, final: str, world: int, meta: Dict[str, Any]) -> None:
    """Rank 0, once every rank wrote its file: merges the manifests into the index, then renames."""
    tensors: Dict[str, dict] = {}
    states: Dict[str, dict] = {}
    for rank in range(world):
        manifest_path = os.path.join(temp, f"rank-{rank:05d}.json")
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        for name, entry in manifest["tensors"].items():
            tensors.setdefault(name, {**entry, "pieces": []})["pieces"].extend(entry["pieces"])
        for name, entry in manifest["optimizer_state"].items():
            states.setdefault(name, entry)  # the lowest rank writing the parameter's state
        os.remove(manifest_path)
    if meta["optimizer"] is not None:
        meta = {**meta, "optimizer": {"param_groups": meta["optimizer"], "state": states}}
    for name, entry in tensors.items():
        if entry["dim"] is None and len(entry["pieces"]) != 1:
            raise RuntimeError(f"torch_mp.save: {len(entry['pieces'])} ranks wrote the whole tensor {name!r}; "
                               "expected one")
        if entry["dim"] is not None:
            # A range held by several ranks (KV heads kept whole by each of them) is the same bytes each time.
            covered = sorted({tuple(bounds) for piece in entry["pieces"] for bounds in piece["bounds"]})
            if [stop for _, stop in covered[:-1]] != [start for start, _ in covered[1:]] or \
                    covered[0][0] != 0 or covered[-1][1] != entry["shape"][entry["dim"]]:
                raise RuntimeError(f"torch_mp.save: the ranks' pieces of {name!r} cover {covered} along dim "
                                   f"{entry['dim']}; expected each range of [0, {entry['shape'][entry['dim']]}) once")
    index = {"format": FORMAT, "version": VERSION, "checksum": "crc32 (zlib) of each piece's bytes",
             "world_size": world, "tensors": tensors, **meta}
    with open(os.path.join(temp, INDEX), "w") as handle:
        json.dump(index, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_folder(temp)
    _replace(temp, final)


def _replace(temp: str, final: str) -> None:
    """Renames the complete ``temp`` to ``final``. rename(2) cannot replace a non-empty folder, so an
    earlier checkpoint is first renamed to ``final.old``, which loading falls back to until the
    second rename, and removed after it."""
    old = final + OLD
    if os.path.isdir(final) and os.listdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    elif os.path.isdir(final):
        os.rmdir(final)
    os.rename(temp, final)
    _fsync_folder(os.path.dirname(final))
    shutil.rmtree(old, ignore_errors=True)


def _fsync_folder(folder: str) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


# --- loading -------------------------------------------------------------------------------------

def _read_optimizer(reader: CheckpointReader, module: nn.Module, optimizer, specs, rank: int,
                    world: int) -> Dict[str, Any]:
    """This rank's ``optimizer.state_dict()`` from the checkpoint, checked against ``optimizer``."""
    meta = reader.index["optimizer"]
    if meta is None:
        raise ValueError(f"torch_mp.load: the checkpoint at {reader.folder} holds no optimizer state; expected one "
                         "saved with torch_mp.save(..., optimizer=...), or load without optimizer=")
    names = iter(_parameter_names(module, optimizer, "load"))
    current = [[next(names) for _ in group["params"]] for group in optimizer.param_groups]
    saved = [group["params"] for group in meta["param_groups"]]
    if current != saved:
        raise ValueError(f"torch_mp.load: the optimizer's param_groups hold {[len(g) for g in current]} parameters "
                         f"({current[0][:3]}...); the checkpoint's hold {[len(g) for g in saved]} "
                         f"({saved[0][:3] if saved else []}...); expected the same parameters in the same groups")
    number = {name: i for i, name in enumerate(name for group in current for name in group)}
    params = dict(module.named_parameters())
    state = {}
    for name, entries in meta["state"].items():
        if not holds(module, params[name]):  # another pipeline rank's stage: its state loads there
            continue
        spec, role = spec_of(name, specs)
        sharded = stock_layout(spec, role)[0] is not None
        loaded = dict(entries["values"])
        for key, tensor_key in entries["tensors"].items():
            if reader.shape(tensor_key) == _target_stock_shape(params[name], spec, role, bool(specs)):
                # Cut like its parameter (tensor-parallel shards, then FSDP2's).
                value = read_local(tensor_key, spec, role, rank, world, reader.read_full, reader.read_slices)
                loaded[key] = like(params[name], dp_local(params[name], value, bool(specs)))
            else:
                loaded[key] = _state_of_another_shape(reader, name, key, [tensor_key], sharded, rank, world)
        for key, copies in entries.get("per_rank", {}).items():
            loaded[key] = _state_of_another_shape(reader, name, key, copies, sharded, rank, world)
        state[number[name]] = loaded
    groups = []
    for group, saved_group in zip(optimizer.param_groups, meta["param_groups"]):
        # JSON has no tuples: give back the optimizer's own type (Adam's betas).
        restored = {k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved_group.items()}
        groups.append({**restored, "params": [number[name] for name in saved_group["params"]]})
    return {"state": state, "param_groups": groups}


def _state_of_another_shape(reader: CheckpointReader, name: str, key: str, copies: List[str], sharded: bool,
                            rank: int, world: int) -> torch.Tensor:
    """Optimizer state ``key`` of parameter ``name`` whose shape is not the parameter's (Adafactor's
    row and column statistics, step counts), saved whole (one copy) or by each of ``len(copies)``
    tensor-parallel ranks: this rank's copy when the parameter is held as when saved (whole, or cut
    across as many ranks); otherwise, only a scalar that every copy holds (a step count) fits any
    layout. ValueError for anything else: nothing says how to cut it."""
    if (not sharded and len(copies) == 1) or (sharded and len(copies) == world):
        return reader.read_full(copies[rank if sharded else 0])
    values = [reader.read_full(copy) for copy in copies]
    if all(value.numel() <= 1 and torch.equal(value, values[0]) for value in values):
        return values[0]
    layout = f"cut across {world} tensor-parallel ranks" if sharded else "whole"
    raise ValueError(f"torch_mp.load: the optimizer state {key!r} of {name!r} in {reader.folder} has another shape "
                     f"than its parameter ({[tuple(value.shape) for value in values]}), saved by "
                     f"{len(copies)} tensor-parallel rank(s); this model holds the parameter {layout}, and such "
                     "state cannot be resharded; expected to load at the tensor-parallel size that saved it, or "
                     "an optimizer whose state has its parameter's shape (Adam, SGD)")


def _restore_rng(reader: CheckpointReader) -> None:
    rank, world = _world()
    if reader.index["world_size"] != world:
        logger.warning("torch_mp.load: %s was saved by %d ranks, not %d: random states left as they are",
                       reader.folder, reader.index["world_size"], world)
        return
    if f"rng/cpu/{rank}" in reader.tensors:
        torch.set_rng_state(reader.read_full(f"rng/cpu/{rank}"))
    if f"rng/cuda/{rank}" in reader.tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(reader.read_full(f"rng/cuda/{rank}"))
