"""Devices as users name them (``"cuda:1"``, ``1``, ``torch.device``), parsed in one place."""
from typing import Union

import torch

from torch_mp import _C
from torch_mp._checks import check_arg

DeviceLike = Union[torch.device, str, int]


def parse_device(device: DeviceLike, op: str, name: str) -> torch.device:
    """``device`` as a torch.device, or an error naming ``op`` and ``name``. Whether this process has
    that device is the kernels' check (a call into _C here would break torch.compile graphs)."""
    check_arg(op, name, device, (torch.device, str, int), "a torch.device, a string such as 'cuda:1' or an index")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"{op}: {name} = {device!r} is not a device ({error}); expected a torch.device, "
                         "a string such as 'cpu' or 'cuda:1', or a device index") from None


def check_device(device: DeviceLike, op: str, name: str) -> torch.device:
    """``device`` parsed as by :func:`parse_device`, checked to exist in this process and normalized
    (``"cuda"`` -> ``"cuda:0"``); for the wrappers, which run outside compiled graphs."""
    parsed = parse_device(device, op, name)
    _C._check_device_available(parsed, f"{op}({name})")
    return _C._normalize_device(parsed)
