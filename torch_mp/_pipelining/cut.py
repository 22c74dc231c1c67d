"""The cut: which layers go to which stage (and device), balanced by bytes, by measured time or by
the user's counts, with every module that owns tensors placed with a layer."""
import re
from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from torch_mp import _C
from torch_mp._devices import DeviceLike, check_device
from torch_mp._layers import direct_tensors, inside, subtree_bytes, unique_bytes

Balance = Union[str, Sequence[int], Mapping[str, DeviceLike]]


MemoryLike = Union[int, str]


UNLIMITED = 2**63 - 1


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: MemoryLike, what: str) -> int:
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


def parse_max_memory(max_memory, devices: List[torch.device]) -> List[int]:
    if max_memory is None:
        return [UNLIMITED] * len(devices)
    if isinstance(max_memory, Mapping):
        limits = {check_device(key, "split", f"max_memory key {key!r}"): parse_bytes(value, f"max_memory[{key!r}]")
                  for key, value in max_memory.items()}
        unknown = [str(device) for device in limits if device not in devices]
        if unknown:
            raise ValueError(f"split: max_memory names devices {unknown} that are not in devices "
                             f"{[str(d) for d in devices]}")
        return [limits.get(device, UNLIMITED) for device in devices]
    if len(max_memory) != len(devices):
        raise ValueError(f"split: max_memory has {len(max_memory)} entries but there are {len(devices)} "
                         "devices; expected one byte limit per device")
    return [parse_bytes(value, f"max_memory[{i}]") for i, value in enumerate(max_memory)]


def balanced_device_map(module, layer_names, devices, balance, capacities, layer_costs=None):
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
        if inside_layer is not None and inside(name, inside_layer):
            continue
        inside_layer = None
        if name in layer_index:
            current, inside_layer = layer_index[name], name
            sizes[current] += subtree_bytes(child, seen)
        elif direct_tensors(child):
            extras[current].append(name)
            sizes[current] += unique_bytes([child], seen)

    if isinstance(balance, str):
        if balance not in ("auto", "time"):
            raise ValueError(f"split: balance={balance!r}; expected 'auto', 'time', a list of layer counts per "
                             "device, or a {module name: device} map")
        if len(layer_names) < len(devices):
            raise ValueError(f"split: balance={balance!r} cuts {len(layer_names)} layer(s) {layer_names} into "
                             f"{len(devices)} stages, which leaves a stage without layers; expected at least "
                             f"{len(devices)} layers (pass layers=[...] naming more modules, or fewer devices)")
        counts = (_C._balance_by_size(sizes, capacities) if balance == "auto"
                  else _C._balance_by_size(layer_costs, [UNLIMITED] * len(devices)))
    else:
        counts = check_counts(balance, len(devices), len(layer_names))

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


def check_counts(balance, num_devices: int, num_layers: int) -> List[int]:
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


def explicit_device_map(module: nn.Module, balance: Mapping[str, DeviceLike]) -> Dict[str, torch.device]:
    names = dict(module.named_modules())
    device_map = {}
    for name, device in balance.items():
        if name not in names:
            raise ValueError(f"split: balance places {name!r}, which is not a submodule of "
                             f"{type(module).__name__}; expected names from module.named_modules()")
        device_map[name] = check_device(device, "split", f"balance[{name!r}]")
    uncovered = [name for name, child in names.items()
                 if direct_tensors(child) and not any(inside(name, placed) for placed in device_map)]
    if uncovered:
        raise ValueError(f"split: balance leaves modules with parameters or buffers unplaced: {uncovered}; "
                         "expected every one of them inside a placed module")
    return device_map


def place(module: nn.Module, device_map: Dict[str, torch.device]) -> Dict[str, torch.device]:
    """Moves every module's own tensors to the device of the deepest device_map entry over it.
    A tensor shared by several modules stays with its first owner; a later owner then runs on that
    device and gets its own device_map entry."""
    placed: Dict[int, torch.device] = {}
    result = dict(device_map)
    for name, child in module.named_modules():
        owners = [placed_name for placed_name in device_map if inside(name, placed_name)]
        tensors = direct_tensors(child)
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
        for tensor in direct_tensors(child):
            placed[id(tensor)] = device
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    return dict(sorted(result.items(), key=lambda item: order[item[0]]))
