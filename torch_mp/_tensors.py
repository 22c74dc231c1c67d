"""Tensors nested in arguments and outputs (tuples, named tuples, lists, dicts, dataclasses,
transformers' ModelOutput): found, mapped, moved."""
import copy
import dataclasses
from typing import List

import torch

from torch_mp._ops import to_device

def map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(item, fn) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        if type(value) is dict:
            return {key: map_tensors(item, fn) for key, item in value.items()}
        # Subclasses such as transformers' ModelOutput keep their type; setting an item updates both
        # the item and its attribute.
        for key in list(value.keys()):
            value[key] = map_tensors(value[key], fn)
        return value
    return value


def move_tensors(value, fn):
    """``value`` with ``fn`` applied to every tensor in it. Lists and dicts are updated in place, so
    what the callee writes into them (a KV cache, a list of auxiliary losses) reaches the caller;
    tuples are rebuilt."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(move_tensors(item, fn) for item in value))
    if isinstance(value, tuple):
        return type(value)(move_tensors(item, fn) for item in value)
    if isinstance(value, list):
        for i, item in enumerate(value):
            moved = move_tensors(item, fn)
            if moved is not item:
                value[i] = moved
        return value
    if isinstance(value, dict):
        for key in list(value.keys()):
            moved = move_tensors(value[key], fn)
            if moved is not value[key]:
                value[key] = moved
        return value
    return value


def mover(device: torch.device, always: bool):
    if always:
        return lambda tensor: to_device(tensor, device)
    return lambda tensor: tensor if tensor.device == device else to_device(tensor, device)


def tensors_in(value) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    copy_tensors(value, lambda t: found.append(t) or t)
    return found


def copy_tensors(value, fn, other=None):
    """``value`` with ``fn`` applied to every tensor in it; containers are copies, dataclasses too.
    ``other``, when given, maps every value of another type (by default kept as it is)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(copy_tensors(item, fn, other) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(copy_tensors(item, fn, other) for item in value)
    if isinstance(value, dict):
        copied = copy.copy(value)
        for key in list(value.keys()):
            copied[key] = copy_tensors(value[key], fn, other)
        return copied
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{field.name: copy_tensors(getattr(value, field.name), fn, other)
                                             for field in dataclasses.fields(value) if field.init})
    return value if other is None else other(value)
