"""Typed Python wrappers over torch.ops.torch_mp.*, and the fake kernels torch.compile traces with."""
from typing import Union

import torch

DeviceLike = Union[torch.device, str, int]


@torch.library.register_fake("torch_mp::to_device")
def _to_device_fake(self: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    # The output lives on `device`, not on the input's device: only a Python fake kernel can say so.
    return torch.empty_like(self, device=device)


def to_device(tensor: torch.Tensor, device: DeviceLike, non_blocking: bool = False) -> torch.Tensor:
    """Copies ``tensor`` to ``device``, differentiably.

    forward: a copy on ``device`` (always a new tensor); backward: the gradient goes back to the
    device ``tensor`` came from. Works in eager mode, under ``torch.compile(fullgraph=True)`` and is
    ``torch_mp::to_device`` in C++.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_device: expected tensor to be a torch.Tensor, got {type(tensor).__name__}")
    return torch.ops.torch_mp.to_device(tensor, torch.device(device), non_blocking)
