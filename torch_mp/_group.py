"""What the operators need of a process group: its registered name, its size and this rank."""
from typing import NamedTuple, Union

import torch
import torch.distributed as dist

from torch_mp import _C


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
    if dist.is_available() and isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{what}: rank {dist.get_rank()} is not a member of this group (new_group(ranks) returns "
                         "a placeholder on the ranks it leaves out); expected a group that holds this rank")
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"{what}: expected a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")
    return GroupInfo(group.group_name, group.size(), group.rank())


def all_gather_rows(tensor: torch.Tensor, group: GroupLike, op: str) -> torch.Tensor:
    """Every rank's ``tensor`` stacked along a new dim 0, in rank order, through torch_mp's own
    all-gather: bounded by the group's timeout, and failing with a CollectiveError that names ``op``
    when a peer does not answer. Small host-side values travel on the device the backend needs."""
    info = resolve_group(group, f"{op}(group=...)")
    if info.size == 1:
        return tensor.unsqueeze(0)
    if tensor.device.type == "cpu" and dist.get_backend(process_group_of(group)) == "nccl":
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    with _C._op_scope(op):
        return torch.ops.torch_mp._all_gather(tensor.unsqueeze(0).contiguous(), 0, info.name, info.size)


def all_reduce(tensor: torch.Tensor, op: str, group: GroupLike, what: str) -> torch.Tensor:
    """Every rank's ``tensor`` reduced by ``op`` ("sum" or "max"), through torch_mp's own all-reduce
    (bounded and named as all_gather_rows is)."""
    info = resolve_group(group, f"{what}(group=...)")
    if info.size == 1:
        return tensor
    with _C._op_scope(what):
        return torch.ops.torch_mp._all_reduce(tensor.contiguous(), op, info.name, info.size)


def all_reduce_sum(tensor: torch.Tensor, group: GroupLike, op: str) -> torch.Tensor:
    """The sum of every rank's ``tensor`` (``all_reduce``)."""
    return all_reduce(tensor, "sum", group, op)
