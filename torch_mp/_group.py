"""What the operators need of a process group: its registered name, its size and this rank."""
from typing import NamedTuple, Union

import torch.distributed as dist


class GroupInfo(NamedTuple):
    name: str
    size: int
    rank: int


GroupLike = Union[None, "dist.ProcessGroup", "dist.device_mesh.DeviceMesh"]


def process_group_of(group: GroupLike):
    """The ProcessGroup behind ``group`` for torch.distributed calls (None: the default group)."""
    if dist.is_available() and isinstance(group, dist.device_mesh.DeviceMesh):
        return group.get_group()
    return group


def resolve_group(group: GroupLike, what: str = "group") -> GroupInfo:
    """``None``: the default group, or a group of one when torch.distributed is not initialized
    (every operator then is a local computation); a ProcessGroup; or a 1-D DeviceMesh."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return GroupInfo("", 1, 0)
        group = dist.group.WORLD
    if dist.is_available() and isinstance(group, dist.device_mesh.DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"{what}: a DeviceMesh with {group.ndim} dims; expected a 1-D mesh, such as "
                             "mesh['tp']")
        group = group.get_group()
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"{what}: expected a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")
    return GroupInfo(group.group_name, group.size(), group.rank())

