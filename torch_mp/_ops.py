"""Typed Python wrappers over torch.ops.torch_mp.*, and the fake kernels torch.compile traces with."""
from typing import Optional, Sequence

import torch

from torch_mp._checks import check_arg
from torch_mp._devices import DeviceLike, parse_device
from torch_mp._group import GroupLike, resolve_group


def _check_tensor(op: str, tensor, name: str = "tensor") -> None:
    check_arg(op, name, tensor, torch.Tensor, "a torch.Tensor")


def _check_dim(op: str, tensor: torch.Tensor, dim) -> None:
    _check_tensor(op, tensor)
    check_arg(op, "dim", dim, int, "an int")


def _check_linear(op: str, input, weight, bias, flag: str, flag_value) -> None:
    _check_tensor(op, input, "input")
    _check_tensor(op, weight, "weight")
    if bias is not None:
        _check_tensor(op, bias, "bias")
    check_arg(op, flag, flag_value, bool, "a bool")


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
    _check_tensor("to_device", tensor)
    check_arg("to_device", "non_blocking", non_blocking, bool, "a bool")
    return torch.ops.torch_mp.to_device(tensor, parse_device(device, "to_device", "device"), non_blocking)


# --- tensor parallelism: conjugate pairs --------------------------------------------------------
# Each takes group=None (the default group), a ProcessGroup or a 1-D DeviceMesh.

def copy_to_tp(tensor: torch.Tensor, group: GroupLike = None) -> torch.Tensor:
    """forward: identity; backward: all-reduce (sum). A replicated input entering the parallel region."""
    _check_tensor("copy_to_tp", tensor)
    name, size, _ = resolve_group(group, "copy_to_tp(group=...)")
    return torch.ops.torch_mp.copy_to_tp(tensor, name, size)


def reduce_from_tp(tensor: torch.Tensor, group: GroupLike = None) -> torch.Tensor:
    """forward: all-reduce (sum); backward: identity. Partial results leaving the parallel region."""
    _check_tensor("reduce_from_tp", tensor)
    name, size, _ = resolve_group(group, "reduce_from_tp(group=...)")
    return torch.ops.torch_mp.reduce_from_tp(tensor, name, size)


def gather_from_tp(tensor: torch.Tensor, dim: int = -1, group: GroupLike = None) -> torch.Tensor:
    """forward: all-gather along ``dim``; backward: this rank's slice."""
    _check_dim("gather_from_tp", tensor, dim)
    name, size, _ = resolve_group(group, "gather_from_tp(group=...)")
    return torch.ops.torch_mp.gather_from_tp(tensor, dim, name, size)


def scatter_to_tp(tensor: torch.Tensor, dim: int = -1, group: GroupLike = None) -> torch.Tensor:
    """forward: this rank's slice along ``dim``; backward: all-gather."""
    _check_dim("scatter_to_tp", tensor, dim)
    name, size, _ = resolve_group(group, "scatter_to_tp(group=...)")
    return torch.ops.torch_mp.scatter_to_tp(tensor, dim, name, size)


def reduce_scatter_to_sp(tensor: torch.Tensor, dim: int = 0, group: GroupLike = None) -> torch.Tensor:
    """Sequence parallel. forward: reduce-scatter along ``dim``; backward: all-gather."""
    _check_dim("reduce_scatter_to_sp", tensor, dim)
    name, size, _ = resolve_group(group, "reduce_scatter_to_sp(group=...)")
    return torch.ops.torch_mp.reduce_scatter_to_sp(tensor, dim, name, size)


def gather_from_sp(tensor: torch.Tensor, dim: int = 0, group: GroupLike = None) -> torch.Tensor:
    """Sequence parallel. forward: all-gather along ``dim``; backward: reduce-scatter."""
    _check_dim("gather_from_sp", tensor, dim)
    name, size, _ = resolve_group(group, "gather_from_sp(group=...)")
    return torch.ops.torch_mp.gather_from_sp(tensor, dim, name, size)


def column_parallel_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                           gather_output: bool = False, group: GroupLike = None) -> torch.Tensor:
    """``input @ weight.T + bias`` with ``weight`` holding this rank's output features; ``input`` is
    replicated. ``gather_output``: all-gather the result along its last dim. The backward overlaps the
    all-reduce of the input gradient with the weight-gradient matmul."""
    _check_linear("column_parallel_linear", input, weight, bias, "gather_output", gather_output)
    name, size, _ = resolve_group(group, "column_parallel_linear(group=...)")
    return torch.ops.torch_mp.column_parallel_linear(input, weight, bias, gather_output, name, size)


def row_parallel_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        input_is_parallel: bool = True, group: GroupLike = None) -> torch.Tensor:
    """``all_reduce(input @ weight.T) + bias`` with ``weight`` holding this rank's input features; the
    bias is added once, after the reduction. ``input_is_parallel=False``: ``input`` is replicated and
    this rank takes its slice of the last dim first."""
    _check_linear("row_parallel_linear", input, weight, bias, "input_is_parallel", input_is_parallel)
    name, size, _ = resolve_group(group, "row_parallel_linear(group=...)")
    return torch.ops.torch_mp.row_parallel_linear(input, weight, bias, input_is_parallel, name, size)


# --- async tensor parallelism (sequence parallel) --------------------------------------------------

def all_gather_matmul(input: torch.Tensor, weights: Sequence[torch.Tensor], dim: int = 1, chunks: int = 1,
                      group: GroupLike = None):
    """``gathered = gather_from_sp(input, dim)`` and ``[gathered @ w.T for w in weights]``, the
    all-gather decomposed into chunks that overlap with the matmuls (async TP: Wang et al., ASPLOS
    2023; torchtitan, PyTorch's ``fused_all_gather_matmul``): this rank's rows multiply while the
    first chunk travels, then each chunk's rows of the other ranks while the next one travels.

    ``input``: ``[*, S / group size, *, in_features]`` (``dim`` the sequence, not the last dim);
    ``weights``: ``[out_features_i / group size, in_features]`` each (column-parallel layers reading one
    input: q, k, v). ``chunks`` cuts each rank's rows further and must divide them. Returns
    ``(gathered, outputs)``: ``[*, S, *, in_features]`` and ``[*, S, *, out_features_i / group size]``.
    backward: the input gradient is ``matmul_reduce_scatter``'s decomposition. Raises ValueError for
    shapes, an empty ``weights`` or a ``chunks`` that does not divide, IndexError for ``dim``."""
    _check_dim("all_gather_matmul", input, dim)
    check_arg("all_gather_matmul", "chunks", chunks, int, "an int")
    name, size, _ = resolve_group(group, "all_gather_matmul(group=...)")
    return torch.ops.torch_mp.all_gather_matmul(input, list(weights), dim, chunks, name, size)


def matmul_reduce_scatter(input: torch.Tensor, weight: torch.Tensor, dim: int = 1, chunks: int = 1,
                          group: GroupLike = None) -> torch.Tensor:
    """``reduce_scatter_to_sp(input @ weight.T, dim)`` decomposed (async TP): each rank's rows of
    each chunk multiply and are summed onto that rank while the next rows multiply.

    ``input``: ``[*, S, *, in_features / group size]``; ``weight``: ``[out_features, in_features /
    group size]`` (a row-parallel layer). Returns ``[*, S / group size, *, out_features]``. backward:
    ``all_gather_matmul``. Raises ValueError for shapes, ``S`` not divisible by the group size times
    ``chunks``."""
    _check_dim("matmul_reduce_scatter", input, dim)
    _check_tensor("matmul_reduce_scatter", weight, "weight")
    check_arg("matmul_reduce_scatter", "chunks", chunks, int, "an int")
    name, size, _ = resolve_group(group, "matmul_reduce_scatter(group=...)")
    return torch.ops.torch_mp.matmul_reduce_scatter(input, weight, dim, chunks, name, size)


# --- expert parallelism --------------------------------------------------------------------------

def all_to_all(tensor: torch.Tensor, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int],
               group: GroupLike = None) -> torch.Tensor:
    """All-to-all along dim 0 with uneven split sizes, counted in rows, one per rank of ``group``.

    ``tensor``: ``[sum(input_split_sizes), *]``; its rows ``[sum(input_split_sizes[:r]),
    +input_split_sizes[r])`` go to rank ``r``. Returns ``[sum(output_split_sizes), *]``: the rows from
    each rank in rank order, ``output_split_sizes[r]`` of them from rank ``r`` (which must be what rank
    ``r`` sends here). forward: this all-to-all; backward: the reverse all-to-all (the split sizes
    swapped), each row's gradient back to the rank that sent it. Expert parallelism (GShard,
    arXiv:2006.16668) dispatches tokens to their experts' ranks with it and combines them back.

    Raises ValueError for a split list whose length is not the group size, a negative size, or input
    split sizes that do not sum to ``tensor.shape[0]``; ``torch_mp.CollectiveError`` when a peer does
    not answer within the group's timeout. ``torch.ops.torch_mp.all_to_all`` in ``torch.compile``
    graphs (no graph break), ``torch_mp::all_to_all`` in C++.
    """
    _check_tensor("all_to_all", tensor)
    for name, sizes in (("output_split_sizes", output_split_sizes), ("input_split_sizes", input_split_sizes)):
        check_arg("all_to_all", name, sizes, (list, tuple), "a list of ints")
        for size in sizes:
            check_arg("all_to_all", name, size, int, "a list of ints")
    name, size, _ = resolve_group(group, "all_to_all(group=...)")
    return torch.ops.torch_mp.all_to_all(tensor, list(output_split_sizes), list(input_split_sizes), name, size)
