import math
from typing import Optional, Tuple

import torch
from torch import nn

from torch_mp._group import GroupLike, resolve_group
from torch_mp._checks import check_arg
from torch_mp._tensor_parallel.dtensor import device_mesh, distribute_parameter, global_shape, local
from torch_mp._tensor_parallel.sharding import shard
from torch.distributed.tensor import Replicate, Shard


def _check_size(layer: str, what: str, value) -> None:
    check_arg(layer, what, value, int, "an int")
    if value < 0:
        raise ValueError(f"{layer}: {what}={value}; expected a size >= 0")


def _shard_size(layer: str, what: str, total: int, group_size: int) -> int:
    _check_size(layer, what, total)
    if total % group_size:
        raise ValueError(f"{layer}: {what} {total} is not divisible by the group size {group_size}; "
                         f"expected a multiple of {group_size}")
    return total // group_size


def _init_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], fan_in: int) -> None:
    # nn.Linear's initialization, with the fan-in of the whole (unsharded) layer.
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class _TensorParallel(nn.Module):
    # Sequence parallel (Megatron): the activations around the module holding this layer are sharded
    # along this dim (None: they are not). That module all-gathers its input, so a colwise layer
    # computes locally and a rowwise one reduce-scatters. Set by tensor_parallel.
    sequence_dim: Optional[int] = None
    # Async TP (sequence parallel only; set by tensor_parallel(async_tp=...)): the collective around
    # this layer's matmul is decomposed into chunks that overlap with it (torch_mp.all_gather_matmul,
    # torch_mp.matmul_reduce_scatter), each rank's rows cut into this many chunks. None: not decomposed.
    async_tp_chunks: Optional[int] = None

    def _chunks_for(self, rows: int) -> int:
        # A chunk count that does not divide this rank's rows falls back to one chunk per rank.
        return self.async_tp_chunks if rows % self.async_tp_chunks == 0 else 1

    def _set_group(self, group: GroupLike) -> None:
        info = resolve_group(group, f"{type(self).__name__}(group=...)")
        # Plain attributes, so the forward hands the operators constants (nothing for compile to trace).
        self.group_name, self.group_size, self.rank = info.name, info.size, info.rank

    def _distribute(self, group: GroupLike, where) -> None:
        """Makes the parameters named in ``where`` ({name: placements}) DTensors on the group's mesh
        (see torch_mp._tensor_parallel.dtensor); nothing without torch.distributed."""
        mesh = device_mesh(group)
        if mesh is None:
            return
        for name, placements in where.items():
            param = self._parameters.get(name)
            if param is not None:
                self._parameters[name] = distribute_parameter(
                    param, mesh, placements, global_shape(param.shape, placements, self.group_size))


class _SharedInputCopy:
    """One ``copy_to_tp`` for column-parallel siblings that read one input (q, k and v; gate and up),
    Megatron's byte minimum: each sibling's input gradient is a partial sum on each rank; autograd
    adds them up in the gradient of the one copy, whose backward all-reduces them once instead of
    once per layer.

    The first sibling called with an input copies it; the others reuse that copy while they are
    called with the same tensor, unchanged since (its version counter). Another input gets a copy of
    its own, so siblings that do not share their input stay correct. The copy is dropped after as
    many calls as there are siblings (one forward), when a sibling that used it is called again (a
    new forward that skipped a sibling in the last one), and at each forward of the model that
    ``tensor_parallel`` parallelized (``reset``): a copy never outlives its forward.

    Under torch.compile the version counter is a symbol of the traced graph, which cannot choose
    between reusing and copying: the siblings share the copy and the trace asserts that the input
    was not modified in between. An input modified in place between two siblings' calls (which the
    dense model allows) then fails to compile (an error whose trace names this check) instead of
    giving stale numbers; modify a copy of it, or run that module eagerly. Eager mode copies it
    again. A change through ``.data`` bumps no version counter and goes unseen, as by autograd."""

    def __init__(self, members: int, group_name: str, group_size: int):
        self.members, self.group_name, self.group_size = members, group_name, group_size
        self.reset()

    def reset(self) -> None:
        """Drops the copy: the next sibling called copies its input."""
        self.calls, self.entry, self.used = 0, None, []

    def __deepcopy__(self, memo) -> "_SharedInputCopy":
        # A copied model's siblings share a copy of their own, without this forward's input (a
        # forward that skipped a sibling leaves one here; it belongs to the original's graph).
        return _SharedInputCopy(self.members, self.group_name, self.group_size)

    def __call__(self, layer: "ColumnParallelLinear", input: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return input  # copy_to_tp is the identity forward; without a backward it has nothing to do
        if any(used is layer for used in self.used):
            self.reset()  # this layer used the copy already: another forward
        entry, version = self.entry, input._version
        if entry is not None and entry[0] is input and torch.compiler.is_compiling():
            # Inductor reports a failed check by its source line: the line says what went wrong.
            torch._check(entry[1] == version, lambda: "shared input modified in place between sibling layers")
        elif entry is None or entry[0] is not input or entry[1] != version:
            entry = self.entry = (input, version, torch.ops.torch_mp.copy_to_tp(input, self.group_name, self.group_size))
            self.used = []
        self.used.append(layer)
        self.calls += 1
        if self.calls == self.members:
            self.reset()
        return entry[2]


def share_input_copy(layers) -> None:
    """Makes column-parallel ``layers`` that read one input (q, k and v of an attention; gate and up
    of an MLP) all-reduce its gradient once in backward, instead of once each: the first layer
    called applies ``copy_to_tp`` to the input and the others reuse it (see ``_SharedInputCopy``).
    A layer called with another input copies that one itself, so the result is the same either way.
    It saves ``len(layers) - 1`` all-reduces of ``[*, in_features]`` per backward; Megatron-LM's
    fused qkv projection does the same with one layer (Shoeybi et al., 2019).

    Raises TypeError when a layer is not a ``ColumnParallelLinear``; ValueError for layers of
    different groups, sequence-parallel ones or ones built with ``input_is_copied=True``."""
    layers = list(layers)
    for layer in layers:
        check_arg("share_input_copy", "layers", layer, ColumnParallelLinear, "ColumnParallelLinear layers")
        if layer.sequence_dim is not None or layer.input_is_copied:
            raise ValueError("share_input_copy: a layer is sequence parallel or has input_is_copied=True; its "
                             "input gradient is already reduced elsewhere")
    if len({(layer.group_name, layer.group_size) for layer in layers}) > 1:
        raise ValueError("share_input_copy: the layers belong to different groups; expected one group")
    if len(layers) > 1:
        shared = _SharedInputCopy(len(layers), layers[0].group_name, layers[0].group_size)
        for layer in layers:
            layer.shared_input_copy = shared


class ColumnParallelLinear(_TensorParallel):
    """``nn.Linear`` with the output features sharded across the group (Megatron-LM's column-parallel
    linear layer, Shoeybi et al., 2019, arXiv:1909.08053).

    Shapes: ``weight [out_features / world, in_features]``, ``bias [out_features / world]``; input
    ``[*, in_features]``, replicated on every rank -> output ``[*, out_features / world]`` (this
    rank's features), or ``[*, out_features]`` with ``gather_output=True``. forward: identity on the
    input, the local matmul (then all-gather with ``gather_output``); backward: the input gradient
    all-reduced (sum) over the group; see :func:`torch_mp.column_parallel_linear`. Initialized as
    ``nn.Linear`` with the whole layer's fan-in.

    ``input_is_copied=True``: the input is already the output of ``copy_to_tp`` (whose backward
    all-reduces the input gradient), so the layer reduces nothing itself: one ``copy_to_tp`` then
    serves several layers that read the same input (Megatron's mappings). ``share_input_copy``
    arranges the same for sibling layers of a stock model.

    Raises TypeError for sizes that are not ints or an ``input_is_copied`` that is not a bool;
    ValueError for negative sizes or an ``out_features`` that is not a multiple of the group size.
    Calls raise as :func:`torch_mp.column_parallel_linear` does."""

    # Set by share_input_copy: the copy_to_tp this layer shares with its siblings.
    shared_input_copy: Optional[_SharedInputCopy] = None
    # Async TP: (gathered input, gathered input @ weight.T), computed by all_gather_matmul in the
    # hook that gathers the input of the module holding this layer (with its siblings' products);
    # used once, by a call with that very input.
    gathered_product: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    # Set by tensor_parallel for key/value heads fewer than the ranks: (group name, size) of the ranks
    # whose query heads use this rank's KV heads. Each holds its share of their rows (Shard(0) over the
    # whole group) and the forward all-gathers them over that group (its backward a reduce-scatter: the
    # gradient summed over the ranks using the heads), as ZeRO-3 gathers a shard before use.
    weight_gather: Optional[Tuple[str, int]] = None

    def gathered(self, tensor: torch.Tensor) -> torch.Tensor:
        """The weight (or bias) this rank computes with: ``tensor``'s local rows, all-gathered over
        ``weight_gather``'s group when set (``[rows * size, ...]``)."""
        tensor = local(tensor)
        if self.weight_gather is None:
            return tensor
        name, size = self.weight_gather
        return torch.ops.torch_mp.gather_from_sp(tensor, 0, name, size)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 group: GroupLike = None, device=None, dtype=None, input_is_copied: bool = False):
        super().__init__()
        self._set_group(group)
        check_arg(type(self).__name__, "input_is_copied", input_is_copied, bool, "a bool")
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        self.input_is_copied = input_is_copied
        local = _shard_size(type(self).__name__, "out_features", out_features, self.group_size)
        _check_size(type(self).__name__, "in_features", in_features)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(local, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(local, **factory)) if bias else None
        _init_linear(self.weight, self.bias, in_features)
        self._distribute(group, {"weight": [Shard(0)], "bias": [Shard(0)]})

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: GroupLike = None, gather_output: bool = False):
        """This rank's rows of ``linear`` (``[out / world, in]``, copied): the layer computes this
        rank's slice of ``linear(x)``. Raises TypeError when ``linear`` is not an ``nn.Linear``;
        ValueError when its ``out_features`` is not a multiple of the group size."""
        check_arg(f"{cls.__name__}.from_dense", "linear", linear, nn.Linear, "an nn.Linear")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output, group,
                    device="meta", dtype=linear.weight.dtype)
        parts, rank, world = (linear.out_features,), layer.rank, layer.group_size
        layer.weight = nn.Parameter(shard(linear.weight.detach(), 0, parts, rank, world))
        if linear.bias is not None:
            layer.bias = nn.Parameter(shard(linear.bias.detach(), 0, parts, rank, world))
        layer._distribute(group, {"weight": [Shard(0)], "bias": [Shard(0)]})
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.gathered(self.bias)
        if self.sequence_dim is not None:
            # The input was all-gathered along the sequence; that gather's backward (a reduce-scatter)
            # sums the input gradient's partial products across ranks.
            product, self.gathered_product = self.gathered_product, None
            if product is not None and product[0] is input:
                return product[1] if bias is None else product[1] + bias
            return torch.nn.functional.linear(input, self.gathered(self.weight), bias)
        weight = self.gathered(self.weight)
        copied = input if self.input_is_copied else None
        if self.shared_input_copy is not None:
            copied = self.shared_input_copy(self, input)
        if copied is not None:
            # copy_to_tp's backward all-reduces the input gradient: a local matmul here.
            output = torch.nn.functional.linear(copied, weight, bias)
            if self.gather_output:
                output = torch.ops.torch_mp.gather_from_tp(output, -1, self.group_name, self.group_size)
            return output
        return torch.ops.torch_mp.column_parallel_linear(
            input, weight, bias, self.gather_output, self.group_name, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, input_is_copied={self.input_is_copied}, "
                f"group_size={self.group_size}")


class RowParallelLinear(_TensorParallel):
    """``nn.Linear`` with the input features sharded across the group (Megatron-LM's row-parallel
    linear layer, Shoeybi et al., 2019, arXiv:1909.08053).

    Shapes: ``weight [out_features, in_features / world]``, ``bias [out_features]`` (replicated);
    input ``[*, in_features / world]`` (this rank's features, as a ``ColumnParallelLinear`` leaves
    them), or ``[*, in_features]`` with ``input_is_parallel=False`` -> output ``[*, out_features]``,
    complete on every rank. forward: the local matmul, then all-reduce (sum), then the bias, added
    once; backward: identity for the output gradient; see :func:`torch_mp.row_parallel_linear`.
    Under sequence parallelism the all-reduce becomes a reduce-scatter along the sequence.

    Raises TypeError for sizes that are not ints; ValueError for negative sizes or an
    ``in_features`` that is not a multiple of the group size. Calls raise as
    :func:`torch_mp.row_parallel_linear` does."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 group: GroupLike = None, device=None, dtype=None):
        super().__init__()
        self._set_group(group)
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, input_is_parallel
        local = _shard_size(type(self).__name__, "in_features", in_features, self.group_size)
        _check_size(type(self).__name__, "out_features", out_features)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, local, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        _init_linear(self.weight, self.bias, in_features)
        self._distribute(group, {"weight": [Shard(1)], "bias": [Replicate()]})

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: GroupLike = None, input_is_parallel: bool = True):
        """This rank's columns of ``linear`` (``[out, in / world]``, copied), and its whole bias.
        Raises TypeError when ``linear`` is not an ``nn.Linear``; ValueError when its
        ``in_features`` is not a multiple of the group size."""
        check_arg(f"{cls.__name__}.from_dense", "linear", linear, nn.Linear, "an nn.Linear")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, input_is_parallel, group,
                    device="meta", dtype=linear.weight.dtype)
        layer.weight = nn.Parameter(shard(linear.weight.detach(), 1, (linear.in_features,), layer.rank,
                                          layer.group_size))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        layer._distribute(group, {"weight": [Shard(1)], "bias": [Replicate()]})
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = local(self.weight), None if self.bias is None else local(self.bias)
        if self.sequence_dim is not None:
            # The output leaves sharded along the sequence: reduce-scatter instead of all-reduce.
            if not self.input_is_parallel:
                input = torch.ops.torch_mp.scatter_to_tp(input, -1, self.group_name, self.group_size)
            if self.async_tp_chunks is not None:
                rows = input.shape[self.sequence_dim] // self.group_size
                output = torch.ops.torch_mp.matmul_reduce_scatter(
                    input, weight, self.sequence_dim, self._chunks_for(rows), self.group_name, self.group_size)
            else:
                partial = torch.nn.functional.linear(input, weight)
                output = torch.ops.torch_mp.reduce_scatter_to_sp(partial, self.sequence_dim, self.group_name,
                                                                 self.group_size)
            return output if bias is None else output + bias
        return torch.ops.torch_mp.row_parallel_linear(
            input, weight, bias, self.input_is_parallel, self.group_name, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, group_size={self.group_size}")


class VocabParallelEmbedding(_TensorParallel):
    """``nn.Embedding`` with the vocabulary sharded across the group (Megatron-LM's
    ``VocabParallelEmbedding``, Shoeybi et al., 2019): rank r holds rows
    ``[r * V / world, (r + 1) * V / world)`` of the ``[V, embedding_dim]`` table.

    Shapes: ``weight [V / world, embedding_dim]``; input: integer ids ``[*]`` -> output
    ``[*, embedding_dim]``, the full embeddings on every rank. forward: each rank looks up the ids
    in its rows (zeros for the others), then all-reduce (sum); backward: identity for the output
    gradient, each rank's rows getting the gradients of their ids. Initialized as ``nn.Embedding``
    (normal).

    Raises TypeError for sizes that are not ints, or ids that are not integers when called;
    ValueError for negative sizes or a ``num_embeddings`` that is not a multiple of the group size;
    ``torch_mp.CollectiveError`` when a peer does not answer within the group's timeout."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group: GroupLike = None, device=None, dtype=None):
        super().__init__()
        self._set_group(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local = _shard_size(type(self).__name__, "num_embeddings", num_embeddings, self.group_size)
        _check_size(type(self).__name__, "embedding_dim", embedding_dim)
        self.vocab_start = self.rank * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight)
        self._distribute(group, {"weight": [Shard(0)]})

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, group: GroupLike = None):
        """This rank's rows of ``embedding`` (``[V / world, embedding_dim]``, copied). Raises
        TypeError when ``embedding`` is not an ``nn.Embedding``; ValueError when its
        ``num_embeddings`` is not a multiple of the group size."""
        check_arg(f"{cls.__name__}.from_dense", "embedding", embedding, nn.Embedding, "an nn.Embedding")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, group, device="meta",
                    dtype=embedding.weight.dtype)
        layer.weight = nn.Parameter(shard(embedding.weight.detach(), 0, (embedding.num_embeddings,), layer.rank,
                                          layer.group_size))
        layer._distribute(group, {"weight": [Shard(0)]})
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.torch_mp.vocab_parallel_embedding(
            input, local(self.weight), self.vocab_start, self.group_name, self.group_size)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: GroupLike = None,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy over logits sharded on the vocabulary (last) dim, equal shards in rank order,
    as ``ColumnParallelLinear`` produces them; the full logits are never gathered.

    Shapes: ``logits [*, V / world]`` (float), ``target [*]`` (integer class ids in ``[0, V)`` or
    ``ignore_index``) -> ``[*]`` with ``reduction="none"``, else a scalar: ``"mean"`` (over the
    targets that are not ``ignore_index``) or ``"sum"``. forward: the max, the sum of exponentials
    and the target's logit, each all-reduced over the group (three all-reduces of ``[*]``); backward:
    ``softmax - one_hot(target)`` on this rank's shard, no communication. Megatron-LM's
    ``vocab_parallel_cross_entropy`` (Shoeybi et al., 2019); reduced-precision logits are summed in
    float32.

    Raises TypeError for ``logits`` or ``target`` that are not tensors, ``logits`` that are not
    floating point or a ``target`` that is not integer; ValueError for shapes that do not fit or
    another ``reduction``; ``torch_mp.CollectiveError`` when a peer does not answer within the
    group's timeout."""
    check_arg("vocab_parallel_cross_entropy", "logits", logits, torch.Tensor, "a torch.Tensor")
    check_arg("vocab_parallel_cross_entropy", "target", target, torch.Tensor, "a torch.Tensor")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction={reduction!r}; expected 'mean', 'sum' or 'none'")
    name, size, rank = resolve_group(group, "vocab_parallel_cross_entropy(group=...)")
    # A 0-dim logits has no vocabulary dim: the operator's shape check says so.
    local_vocab = logits.shape[-1] if logits.dim() else 0
    losses = torch.ops.torch_mp.vocab_parallel_cross_entropy(
        logits, target, rank * local_vocab, ignore_index, name, size)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum()
