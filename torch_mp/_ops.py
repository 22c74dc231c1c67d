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
    """Copies ``tensor`` to ``device``, differentiably: ``[*] -> [*]``, same dtype, on ``device``.

    forward: a copy on ``device`` (always a new tensor, even on the same device); backward: the
    gradient is copied back to the device ``tensor`` came from. ``device``: a ``torch.device``, a
    string (``"cuda:1"``) or an index; ``non_blocking``: as for ``Tensor.to``. The transfer between
    stages of ``split``, after torchgpipe's ``Copy`` (Kim et al., 2020, arXiv:2004.09910). Works
    in eager mode and under ``torch.compile(fullgraph=True)``; ``torch_mp::to_device`` in C++.

    Raises TypeError for a ``tensor`` that is not a tensor, a ``device`` of another type or a
    ``non_blocking`` that is not a bool; ValueError for a string that names no device or a device
    this process does not have.
    """
    _check_tensor("to_device", tensor)
    check_arg("to_device", "non_blocking", non_blocking, bool, "a bool")
    return torch.ops.torch_mp.to_device(tensor, parse_device(device, "to_device", "device"), non_blocking)


# --- tensor parallelism: conjugate pairs --------------------------------------------------------
# Each takes group=None (the default group), a ProcessGroup or a 1-D DeviceMesh. The pairs are
# Megatron-LM's f and g operators (Shoeybi et al., 2019, arXiv:1909.08053; Megatron-Core's
# tensor_parallel/mappings.py) and, for sequence parallelism, Korthikanti et al., 2022
# (arXiv:2205.05198). With a group of one each is the identity (a copy).

def copy_to_tp(tensor: torch.Tensor, group: GroupLike = None) -> torch.Tensor:
    """A replicated input entering the tensor-parallel region: ``[*] -> [*]``.

    forward: identity (a copy); backward: all-reduce (sum) of the gradient over ``group``, whose
    ranks each computed a partial input gradient. Megatron's ``f`` (``copy_to_tensor_model_parallel_region``).
    ``group``: a ProcessGroup, a 1-D DeviceMesh or None (the default group; a group of one when
    torch.distributed is not initialized).

    Raises TypeError for a ``tensor`` that is not a tensor or a ``group`` of another type;
    ``torch_mp.CollectiveError`` when a peer does not answer within the group's timeout.
    """
    _check_tensor("copy_to_tp", tensor)
    name, size, _ = resolve_group(group, "copy_to_tp(group=...)")
    return torch.ops.torch_mp.copy_to_tp(tensor, name, size)


def reduce_from_tp(tensor: torch.Tensor, group: GroupLike = None) -> torch.Tensor:
    """Partial results leaving the tensor-parallel region: ``[*] -> [*]``, summed over ``group``.

    forward: all-reduce (sum); backward: identity. Megatron's ``g``
    (``reduce_from_tensor_model_parallel_region``).
    ``group``: a ProcessGroup, a 1-D DeviceMesh or None (the default group; a group of one when
    torch.distributed is not initialized).

    Raises TypeError for a ``tensor`` that is not a tensor or a ``group`` of another type;
    ``torch_mp.CollectiveError`` when a peer does not answer within the group's timeout.
    """
    _check_tensor("reduce_from_tp", tensor)
    name, size, _ = resolve_group(group, "reduce_from_tp(group=...)")
    return torch.ops.torch_mp.reduce_from_tp(tensor, name, size)


def gather_from_tp(tensor: torch.Tensor, dim: int = -1, group: GroupLike = None) -> torch.Tensor:
    """Every rank's slice, concatenated in rank order along ``dim``:
    ``[..., n, ...] -> [..., n * world, ...]`` (``world``: the group size).

    forward: all-gather along ``dim``; backward: this rank's slice of the gradient along ``dim``.
    Megatron's ``gather_from_tensor_model_parallel_region`` (there along the last dim, the default
    here too). ``group``: a ProcessGroup, a 1-D DeviceMesh or None (the default group; a group of one when
    torch.distributed is not initialized).

    Raises TypeError for a ``tensor`` that is not a tensor, a ``dim`` that is not an int or a
    ``group`` of another type; IndexError for a ``dim`` out of range (or a 0-dim ``tensor``);
    ``torch_mp.CollectiveError`` when a peer does not answer within the group's timeout.
    """
    _check_dim("gather_from_tp", tensor, dim)
    name, size, _ = resolve_group(group, "gather_from_tp(group=...)")
    return torch.ops.torch_mp.gather_from_tp(tensor, dim, name, size)


def scatter_to_tp(tensor: torch.Tensor, dim: int = -1, group: GroupLike = None) -> torch.Tensor:
    """This rank's slice along ``dim``: ``[..., n * world, ...] -> [..., n, ...]``, rank r taking
    ``[r * n, (r + 1) * n)``.

    forward: this rank's slice (no communication); backward: all-gather of the gradient along
    ``dim``. Megatron's ``scatter_to_tensor_model_parallel_region``.
    ``group``: a ProcessGroup, a 1-D DeviceMesh or None (the default group; a group of one when
    torch.distributed is not initialized).

    Raises TypeError for a ``tensor`` that is not a tensor, a ``dim`` that is not an int or a
    ``group`` of another type; IndexError for a ``dim`` out of range (or a 0-dim ``tensor``);
    ValueError when ``tensor.shape[dim]`` is not a multiple of the group size.
    """
    _check_dim("scatter_to_tp", tensor, dim)
    name, size, _ = resolve_group(group, "scatter_to_tp(group=...)")
    return torch.ops.torch_mp.scatter_to_tp(tensor, dim, name, size)


def reduce_scatter_to_sp(tensor: torch.Tensor, dim: int = 0, group: GroupLike = None) -> torch.Tensor:
    """Sequence parallel: partial results summed over ``group`` and cut along the sequence ``dim``:
    ``[..., n * world, ...] -> [..., n, ...]``.

    forward: reduce-scatter (sum) along ``dim``; backward: all-gather of the gradient along ``dim``.
    Megatron's ``reduce_scatter_to_sequence_parallel_region`` (Korthikanti et al., 2022); it
    replaces a row-parallel layer's all-reduce.
    ``group``: a ProcessGroup, a 1-D DeviceMesh or None (the default group; a group of one when
    torch.distributed is not initialized).

    Raises TypeError for a ``tensor`` that is not a tensor, a ``dim`` that is not an int or a
    ``group`` of another type; IndexError for a ``dim`` out of range; ValueError when
    ``tensor.shape[dim]`` is not a multiple of the group size; ``torch_mp.CollectiveError`` when a
    peer does not answer within the group's timeout.
    """
    _check_dim("reduce_scatter_to_sp", tensor, dim)
    name, size, _ = resolve_group(group, "reduce_scatter_to_sp(group=...)")
    return torch.ops.torch_mp.reduce_scatter_to_sp(tensor, dim, name, size)


def gather_from_sp(tensor: torch.Tensor, dim: int = 0, group: GroupLike = None) -> torch.Tensor:
    """Sequence parallel: the whole sequence from every rank's part along ``dim``:
    ``[..., n, ...] -> [..., n * world, ...]``.

    forward: all-gather along ``dim``; backward: reduce-scatter (sum) of the gradient along ``dim``.
    Megatron's ``gather_from_sequence_parallel_region`` (Korthikanti et al., 2022); it replaces a
    column-parallel layer's ``copy_to_tp``.
    ``group``: a ProcessGroup, a 1-D DeviceMesh or None (the default group; a group of one when
    torch.distributed is not initialized).

    Raises TypeError for a ``tensor`` that is not a tensor, a ``dim`` that is not an int or a
    ``group`` of another type; IndexError for a ``dim`` out of range (or a 0-dim ``tensor``);
    ``torch_mp.CollectiveError`` when a peer does not answer within the group's timeout.
    """
    _check_dim("gather_from_sp", tensor, dim)
    name, size, _ = resolve_group(group, "gather_from_sp(group=...)")
    return torch.ops.torch_mp.gather_from_sp(tensor, dim, name, size)


def column_parallel_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                           gather_output: bool = False, group: GroupLike = None) -> torch.Tensor:
    """A column-parallel linear layer: ``input @ weight.T + bias`` with ``weight`` holding this
    rank's output features.

    Shapes: ``input [*, in]`` (replicated), ``weight [out / world, in]``, ``bias [out / world]`` ->
    ``[*, out / world]`` (this rank's features), or ``[*, out]`` with ``gather_output=True``.
    forward: ``copy_to_tp`` then the local matmul (then ``gather_from_tp`` with ``gather_output``);
    backward: the input gradient all-reduced (sum), overlapped with the weight-gradient matmul, and
    the weight and bias gradients local. Megatron-LM's ``ColumnParallelLinear`` (Shoeybi et al.,
    2019); the overlap as in Megatron-Core's ``LinearWithGradAccumulationAndAsyncCommunication``.
    ``group``: a ProcessGroup, a 1-D DeviceMesh or None (the default group; a group of one when
    torch.distributed is not initialized).

    Raises TypeError for arguments of the wrong type, or ``weight`` / ``bias`` of another dtype
    than ``input``; ValueError for a 0-dim ``input``, a ``weight`` that is not a matrix whose
    columns match ``input``'s last dim, a ``bias`` that is not one entry per row of ``weight``, or
    tensors on different devices; ``torch_mp.CollectiveError`` when a peer does not answer within
    the group's timeout.
    """
    _check_linear("column_parallel_linear", input, weight, bias, "gather_output", gather_output)
    name, size, _ = resolve_group(group, "column_parallel_linear(group=...)")
    return torch.ops.torch_mp.column_parallel_linear(input, weight, bias, gather_output, name, size)


def row_parallel_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        input_is_parallel: bool = True, group: GroupLike = None) -> torch.Tensor:
    """A row-parallel linear layer: ``all_reduce(input @ weight.T) + bias`` with ``weight`` holding
    this rank's input features; the bias, replicated, is added once, after the reduction.

    Shapes: ``input [*, in / world]`` (this rank's features; ``[*, in]`` with
    ``input_is_parallel=False``, sliced here by ``scatter_to_tp``), ``weight [out, in / world]``,
    ``bias [out]`` -> ``[*, out]``, whole on every rank. forward: the local matmul, then
    ``reduce_from_tp`` (all-reduce, sum); backward: identity for the output gradient, then the local
    matmuls. Megatron-LM's ``RowParallelLinear`` (Shoeybi et al., 2019).
    ``group``: a ProcessGroup, a 1-D DeviceMesh or None (the default group; a group of one when
    torch.distributed is not initialized).

    Raises TypeError for arguments of the wrong type, or ``weight`` / ``bias`` of another dtype
    than ``input``; ValueError for a 0-dim ``input``, a ``weight`` that is not a matrix whose
    columns match ``input``'s last dim (after the slice), a ``bias`` of another shape than
    ``[out]``, tensors on different devices, or a replicated ``input`` whose last dim is not a
    multiple of the group size; ``torch_mp.CollectiveError`` when a peer does not answer within
    the group's timeout.
    """
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
    Shapes: ``[..., S / world, ..., in] -> ([..., S, ..., in], [[..., S, ..., out_i / world], ...])``.

    forward: all-gather (overlapped with the matmuls); backward: the input gradient is
    ``matmul_reduce_scatter``'s decomposition (reduce-scatter), the weight gradients local matmuls.
    Raises ValueError for shapes, an empty ``weights`` or a ``chunks`` that does not divide,
    IndexError for ``dim``, ``torch_mp.CollectiveError`` when a peer does not answer."""
    _check_dim("all_gather_matmul", input, dim)
    check_arg("all_gather_matmul", "chunks", chunks, int, "an int")
    name, size, _ = resolve_group(group, "all_gather_matmul(group=...)")
    return torch.ops.torch_mp.all_gather_matmul(input, list(weights), dim, chunks, name, size)


def matmul_reduce_scatter(input: torch.Tensor, weight: torch.Tensor, dim: int = 1, chunks: int = 1,
                          group: GroupLike = None) -> torch.Tensor:
    """``reduce_scatter_to_sp(input @ weight.T, dim)`` decomposed (async TP): each rank's rows of
    each chunk multiply and are summed onto that rank while the next rows multiply.

    ``input``: ``[*, S, *, in_features / group size]``; ``weight``: ``[out_features, in_features /
    group size]`` (a row-parallel layer). Returns ``[*, S / group size, *, out_features]``.
    Shapes: ``[..., S, ..., in / world] -> [..., S / world, ..., out]``.

    forward: reduce-scatter (overlapped with the matmuls); backward: all-gather, as
    ``all_gather_matmul``. Raises ValueError for shapes, ``S`` not divisible by the group size times
    ``chunks``, IndexError for ``dim``, ``torch_mp.CollectiveError`` when a peer does not answer."""
    _check_dim("matmul_reduce_scatter", input, dim)
    _check_tensor("matmul_reduce_scatter", weight, "weight")
    check_arg("matmul_reduce_scatter", "chunks", chunks, int, "an int")
    name, size, _ = resolve_group(group, "matmul_reduce_scatter(group=...)")
    return torch.ops.torch_mp.matmul_reduce_scatter(input, weight, dim, chunks, name, size)


# --- expert parallelism --------------------------------------------------------------------------

def all_to_all(tensor: torch.Tensor, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int],
               group: GroupLike = None) -> torch.Tensor:
    """All-to-all along dim 0 with uneven split sizes, counted in rows, one per rank of ``group``:
    ``[sum(input_split_sizes), *] -> [sum(output_split_sizes), *]``.

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
