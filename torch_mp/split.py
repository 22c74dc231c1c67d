"""Layer-wise split of a stock ``nn.Module`` across devices.

The model keeps its own forward. Its layers are moved to their devices, and a forward pre-hook on
each placed module moves every tensor entering it (positional, keyword, nested in tuples, lists and
dicts) to that module's device with :func:`torch_mp.to_device`, whose backward sends gradients back.
"""
import re
from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from torch_mp import _C
from torch_mp._ops import DeviceLike, parse_device, to_device

Balance = Union[str, Sequence[int], Mapping[str, DeviceLike]]
MemoryLike = Union[int, str]

_UNLIMITED = 2**63 - 1
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def split(
    module: nn.Module,
    devices: Sequence[DeviceLike],
    balance: Balance = "auto",
    max_memory: Optional[Union[Sequence[MemoryLike], Mapping[DeviceLike, MemoryLike]]] = None,
    layers: Optional[Sequence[str]] = None,
    output_device: Optional[DeviceLike] = None,
    chunks: int = 1,
    schedule: str = "gpipe",
    checkpoint: str = "never",
    batch_dim: int = 0,
    chunk_spec=None,
    output_merge=None,
    sample=None,
) -> nn.Module:
    """Places the layers of ``module`` on ``devices``, in place, and returns it.

    Args:
        module: any ``nn.Module``; its forward is kept as it is.
        devices: the devices, in layer order; one may appear several times (``["cpu", "cpu"]``).
        balance: ``"auto"``: contiguous runs of layers that even out parameter and buffer bytes,
            within ``max_memory``; ``"time"``: runs that even out forward+backward time measured on
            ``sample``; a list of layer counts per device; or a ``{module name: device}`` map that
            places modules explicitly and must cover every parameter and buffer.
        max_memory: the most bytes each device may hold (ints, or strings such as ``"2GiB"``), as
            a list aligned with ``devices`` or a ``{device: bytes}`` map.
        layers: the names of the modules that are the layers, in order. By default: the largest
            group of repeated blocks (a ``ModuleList`` of transformer blocks, a ResNet's stages).
        output_device: where the output lands; by default the first device.
        chunks: micro-batches per batch. Above 1 the devices work at once: the model's own forward
            runs once per micro-batch, each in a thread of its own, and a placed module's call
            waits for its stage's turn in the schedule. ``model(...)`` then returns the merged
            output (backward through it works, as one GPipe pass), and ``model.train_step(...,
            target=..., loss_fn=..., normalizer=None)`` runs forward and backward by ``schedule``
            and returns the loss (with ``chunks=1`` too: one forward and backward).
        schedule: ``"gpipe"`` or ``"1f1b"``, for ``train_step``.
        checkpoint: ``"never"``, ``"except_last"`` or ``"always"``: which micro-batches recompute
            their placed modules' forwards during backward instead of keeping activations (in
            training; each recomputation replays the random numbers its forward drew).
        batch_dim: the dimension of the inputs (and targets) cut into micro-batches.
        chunk_spec: ``{forward input name: dim or None}``: inputs cut along another dimension, or
            passed whole to every micro-batch (None). Without it an input whose role is ambiguous
            (an ``[S, S]`` bias with S equal to the batch size) raises ValueError.
        output_merge: how a scalar output (0-dim in each micro-batch: a loss the model computes)
            merges into the batch's: ``"mean"`` (weighted by micro-batch sizes), ``"sum"``, or a
            callable ``(values, sizes) -> value``; one for every scalar, or a ``{output path:
            merge}`` map (``"loss"``, ``"extra.mean"``, ``"0"``). Without it a scalar output raises
            ValueError naming its path: a mean over samples is wrong for a sum or a token mean.
        sample: inputs to time the layers on for ``balance="time"`` (a tuple, or a dict of keywords).

    The result has ``device_map``: ``{module name: device}`` for every placed module. Parameter
    names, and so the state_dict, are the stock ones. Modules outside the layers (embeddings, final
    norms, heads) go with the layer nearest before them (the first layer for those before any);
    parameters tied between modules stay on the device of their first owner, and the later owners run
    there too.

    With ``chunks > 1`` outputs are merged field by field (tensors with one row per sample
    concatenated, scalars averaged by micro-batch size; tuples, lists, dicts, ModelOutput,
    dataclasses), what the forward writes into lists and dicts passed in reaches the caller's, and
    the gradients equal the unpipelined ones up to summation order. The forward must treat samples
    independently. Batch norm normalizes each micro-batch with its own statistics in training (what
    a layer sees of the batch), while its running statistics are updated once per batch from the
    whole batch's statistics, as without a pipeline. Pipelining after GPipe (Huang et al., 2019) and
    PipeDream's 1F1B (Narayanan et al., 2019).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"split: expected module to be a torch.nn.Module, got {type(module).__name__}")
    devices = _parse_devices(devices)
    output_device = devices[0] if output_device is None else _parse_device(output_device, "output_device")
    from torch_mp.pipeline import LocalPipe, check_options, install_pipe, layer_costs, plain_train_step
    check_options(chunks, schedule, checkpoint, batch_dim, allowed=("gpipe", "1f1b"))
    _remove_split_hooks(module)

    if isinstance(balance, Mapping):
        if layers is not None:
            raise ValueError("split: pass either layers= or a {module name: device} balance, not both")
        device_map = _explicit_device_map(module, balance)
        distinct = list(dict.fromkeys(device_map.values()))
        stage_of = {name: distinct.index(device) for name, device in device_map.items()}
    else:
        layer_names = _check_layers(module, layers) if layers is not None else _find_layers(module)
        costs = layer_costs(module, layer_names, sample) if balance == "time" else None
        device_map, stage_of = _balanced_device_map(module, layer_names, devices, balance,
                                                    _parse_max_memory(max_memory, devices), costs)

    device_map = _place(module, device_map)
    for name, device in device_map.items():  # modules moved to a tied parameter's device
        stage_of.setdefault(name, min(stage_of[other] for other, d in device_map.items()
                                      if d == device and other in stage_of))
    module.device_map = device_map
    module._torch_mp_stage_of = stage_of
    module.output_device = output_device
    if chunks > 1:
        stages = {name: stage for name, stage in stage_of.items() if name in device_map}
        install_pipe(module, LocalPipe(module, stages, len(devices), chunks, schedule, checkpoint, batch_dim, chunk_spec,
                                       output_merge, devices=devices, output_device=output_device))
        return module
    # A device named more than once holds several stages; inputs entering them are copied all the
    # same, so the split behaves (and is tested) as it would across distinct devices.
    repeated = {device for device in devices if devices.count(device) > 1}
    handles = [
        module.get_submodule(name).register_forward_pre_hook(_inputs_to(device, device in repeated),
                                                             with_kwargs=True)
        for name, device in device_map.items()
    ]
    handles.append(module.register_forward_hook(_outputs_to(output_device, output_device in repeated)))
    module._torch_mp_split_handles = handles
    module.train_step = plain_train_step(module)
    return module


# --- devices and sizes -------------------------------------------------------------------------

def _parse_device(device: DeviceLike, what: str, who: str = "split") -> torch.device:
    parsed = parse_device(device, who, what)
    _C._check_device_available(parsed, f"{who}({what})")
    return _C._normalize_device(parsed)


def _parse_devices(devices: Sequence[DeviceLike]) -> List[torch.device]:
    if isinstance(devices, (str, torch.device, int)) or not isinstance(devices, Sequence):
        raise TypeError(f"split: expected devices to be a list of devices, got {devices!r}")
    if not devices:
        raise ValueError("split: devices is empty; expected at least one device")
    return [_parse_device(device, f"devices[{i}]") for i, device in enumerate(devices)]


def _parse_bytes(value: MemoryLike, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"split: {what} = {value!r}; expected a byte count or a string such as '2GiB'")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", value, re.IGNORECASE)
        if match is None:
            raise ValueError(f"split: {what} = {value!r} is not a size; expected e.g. 1000000, '500MB', '2GiB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value < 0:
        raise ValueError(f"split: {what} = {value} is negative; expected a byte count >= 0")
    return value


def _parse_max_memory(max_memory, devices: List[torch.device]) -> List[int]:
    if max_memory is None:
        return [_UNLIMITED] * len(devices)
    if isinstance(max_memory, Mapping):
        limits = {_parse_device(key, f"max_memory key {key!r}"): _parse_bytes(value, f"max_memory[{key!r}]")
                  for key, value in max_memory.items()}
        unknown = [str(device) for device in limits if device not in devices]
        if unknown:
            raise ValueError(f"split: max_memory names devices {unknown} that are not in devices "
                             f"{[str(d) for d in devices]}")
        return [limits.get(device, _UNLIMITED) for device in devices]
    if len(max_memory) != len(devices):
        raise ValueError(f"split: max_memory has {len(max_memory)} entries but there are {len(devices)} "
                         "devices; expected one byte limit per device")
    return [_parse_bytes(value, f"max_memory[{i}]") for i, value in enumerate(max_memory)]


def _direct_tensors(module: nn.Module) -> List[torch.Tensor]:
    return [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]


def _unique_bytes(modules: List[nn.Module], seen: set) -> int:
    total = 0
    for module in modules:
        for tensor in _direct_tensors(module):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def _subtree_bytes(module: nn.Module, seen: set) -> int:
    return _unique_bytes(list(module.modules()), seen)


# --- which modules are the layers ------------------------------------------------------------

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _find_layers(module: nn.Module) -> List[str]:
    """The largest group of repeated blocks: the children of a ModuleList/Sequential, or siblings of
    one class. Groups of blocks (modules with children) win over groups of leaves, so a
    transformer's blocks are chosen over its token and position embeddings."""
    best_key, best = None, None
    for prefix, parent in module.named_modules():
        children = list(parent.named_children())
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            groups = [children]
        else:
            by_class = defaultdict(list)
            for name, child in children:
                by_class[type(child)].append((name, child))
            groups = list(by_class.values())
        for group in groups:
            if len(group) < 2:
                continue
            blocks = all(next(child.children(), None) is not None for _, child in group)
            size = sum(_subtree_bytes(child, set()) for _, child in group)
            key = (blocks, size, len(group))
            if best_key is None or key > best_key:
                best_key, best = key, [_join(prefix, name) for name, _ in group]
    if best is None or best_key[1] == 0:
        raise ValueError(f"split: {type(module).__name__} has nothing to split: no group of two or more "
                         "repeated layers holding parameters was found; pass layers=[...] with the names "
                         "of the modules to place, or balance={module name: device}")
    return best


def _check_layers(module: nn.Module, layers: Sequence[str]) -> List[str]:
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"split: expected layers to be a list of module names, got {layers!r}")
    if not layers:
        raise ValueError("split: layers is empty: nothing to split; expected the names of the modules to place")
    names = dict(module.named_modules())
    for name in layers:
        if name not in names or not name:
            raise ValueError(f"split: layers names {name!r}, which is not a submodule of "
                             f"{type(module).__name__}; expected names from module.named_modules()")
    for a in layers:
        for b in layers:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"split: layers names both {a!r} and {b!r}, which lies inside it; "
                                 "expected layers that do not contain each other")
    return list(layers)


# --- device maps ------------------------------------------------------------------------------

def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _balanced_device_map(module, layer_names, devices, balance, capacities, layer_costs=None):
    """Layers get devices by ``balance`` (``"time"``: by ``layer_costs``); every other module owning
    tensors goes with the layer before it (or the first layer), and its bytes count towards that
    layer's device. Returns the device map and the stage (index into devices) of each entry."""
    layer_index = {name: i for i, name in enumerate(layer_names)}
    extras: Dict[int, List[str]] = defaultdict(list)
    sizes = [0] * len(layer_names)
    seen: set = set()
    current = 0
    inside_layer: Optional[str] = None
    for name, child in module.named_modules():
        if inside_layer is not None and _inside(name, inside_layer):
            continue
        inside_layer = None
        if name in layer_index:
            current, inside_layer = layer_index[name], name
            sizes[current] += _subtree_bytes(child, seen)
        elif _direct_tensors(child):
            extras[current].append(name)
            sizes[current] += _unique_bytes([child], seen)

    if isinstance(balance, str):
        if balance not in ("auto", "time"):
            raise ValueError(f"split: balance={balance!r}; expected 'auto', 'time', a list of layer counts per "
                             "device, or a {module name: device} map")
        counts = (_C._balance_by_size(sizes, capacities) if balance == "auto"
                  else _C._balance_by_size(layer_costs, [_UNLIMITED] * len(devices)))
    else:
        counts = _check_counts(balance, len(devices), len(layer_names))

    device_map: Dict[str, torch.device] = {}
    stage_of: Dict[str, int] = {}
    layer = 0
    for d, count in enumerate(counts):
        load = sum(sizes[layer:layer + count])
        if load > capacities[d]:
            raise ValueError(f"split: device {d} ({devices[d]}) gets {count} layers of {load} bytes but its "
                             f"max_memory is {capacities[d]} bytes")
        for _ in range(count):
            for name in [layer_names[layer]] + extras[layer]:
                device_map[name], stage_of[name] = devices[d], d
            layer += 1
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    return dict(sorted(device_map.items(), key=lambda item: order[item[0]])), stage_of


def _check_counts(balance, num_devices: int, num_layers: int) -> List[int]:
    if not isinstance(balance, Sequence) or not all(isinstance(c, int) and not isinstance(c, bool)
                                                    for c in balance):
        raise TypeError(f"split: balance={balance!r}; expected 'auto', a list of layer counts per device, "
                        "or a {module name: device} map")
    if len(balance) != num_devices:
        raise ValueError(f"split: balance {list(balance)} has {len(balance)} entries but there are "
                         f"{num_devices} devices; expected one layer count per device")
    if any(c < 1 for c in balance):
        raise ValueError(f"split: balance {list(balance)} leaves a stage without layers; expected a count >= 1 "
                         "for every device (name a device fewer instead)")
    if sum(balance) != num_layers:
        raise ValueError(f"split: balance {list(balance)} adds up to {sum(balance)} layers but the model has "
                         f"{num_layers} layers; expected the counts to add up to {num_layers}")
    return list(balance)


def _explicit_device_map(module: nn.Module, balance: Mapping[str, DeviceLike]) -> Dict[str, torch.device]:
    names = dict(module.named_modules())
    device_map = {}
    for name, device in balance.items():
        if name not in names:
            raise ValueError(f"split: balance places {name!r}, which is not a submodule of "
                             f"{type(module).__name__}; expected names from module.named_modules()")
        device_map[name] = _parse_device(device, f"balance[{name!r}]")
    uncovered = [name for name, child in names.items()
                 if _direct_tensors(child) and not any(_inside(name, placed) for placed in device_map)]
    if uncovered:
        raise ValueError(f"split: balance leaves modules with parameters or buffers unplaced: {uncovered}; "
                         "expected every one of them inside a placed module")
    return device_map


def _place(module: nn.Module, device_map: Dict[str, torch.device]) -> Dict[str, torch.device]:
    """Moves every module's own tensors to the device of the deepest device_map entry over it.
    A tensor shared by several modules stays with its first owner; a later owner then runs on that
    device and gets its own device_map entry."""
    placed: Dict[int, torch.device] = {}
    result = dict(device_map)
    for name, child in module.named_modules():
        owners = [placed_name for placed_name in device_map if _inside(name, placed_name)]
        tensors = _direct_tensors(child)
        if not owners or not tensors:
            continue
        device = device_map[max(owners, key=len)]
        tied = {placed[id(t)] for t in tensors if id(t) in placed}
        if len(tied) > 1:
            raise ValueError(f"split: module {name!r} shares tensors with modules on several devices "
                             f"{sorted(map(str, tied))}; expected its tensors on one device")
        if tied and device not in tied:
            device = tied.pop()
            result[name] = device
        child._apply(lambda t: t.to(device), recurse=False)
        for tensor in _direct_tensors(child):
            placed[id(tensor)] = device
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    return dict(sorted(result.items(), key=lambda item: order[item[0]]))


# --- hooks ------------------------------------------------------------------------------------

def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map_tensors(item, fn) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        if type(value) is dict:
            return {key: _map_tensors(item, fn) for key, item in value.items()}
        # Subclasses such as transformers' ModelOutput keep their type; setting an item updates both
        # the item and its attribute.
        for key in list(value.keys()):
            value[key] = _map_tensors(value[key], fn)
        return value
    return value


def _move_tensors(value, fn):
    """``value`` with ``fn`` applied to every tensor in it. Lists and dicts are updated in place, so
    what the callee writes into them (a KV cache, a list of auxiliary losses) reaches the caller;
    tuples are rebuilt."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_move_tensors(item, fn) for item in value))
    if isinstance(value, tuple):
        return type(value)(_move_tensors(item, fn) for item in value)
    if isinstance(value, list):
        for i, item in enumerate(value):
            moved = _move_tensors(item, fn)
            if moved is not item:
                value[i] = moved
        return value
    if isinstance(value, dict):
        for key in list(value.keys()):
            moved = _move_tensors(value[key], fn)
            if moved is not value[key]:
                value[key] = moved
        return value
    return value


def _mover(device: torch.device, always: bool):
    if always:
        return lambda tensor: to_device(tensor, device)
    return lambda tensor: tensor if tensor.device == device else to_device(tensor, device)


def _inputs_to(device: torch.device, always: bool):
    move = _mover(device, always)

    def hook(module, args, kwargs):
        return _move_tensors(args, move), _move_tensors(kwargs, move)

    return hook


def _outputs_to(device: torch.device, always: bool):
    move = _mover(device, always)

    def hook(module, args, output):
        return _move_tensors(output, move)

    return hook


def _remove_split_hooks(module: nn.Module) -> None:
    for handle in getattr(module, "_torch_mp_split_handles", []):
        handle.remove()
    module._torch_mp_split_handles = []
    module.__dict__.pop("train_step", None)
    if "_torch_mp_pipe" in module.__dict__:  # a pipelined split's
        from torch_mp._batch_norm import restore_batch_norms
        restore_batch_norms(module)
        for submodule in module.modules():
            if getattr(submodule.__dict__.get("forward"), "_torch_mp_gated", False):
                del submodule.forward
        for name in ("forward", "_torch_mp_pipe"):
            module.__dict__.pop(name, None)
