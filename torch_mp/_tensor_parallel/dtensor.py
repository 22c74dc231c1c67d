"""Parameters of tensor-parallel modules as DTensors (``torch.distributed.tensor``), the language of
PyTorch's ecosystem (FSDP2 and torchtitan hold their parameters so): a parameter is an
``nn.Parameter(DTensor)`` on the TP group's DeviceMesh, ``Shard(dim)`` where its layer shards it,
``_StridedShard`` for fused layouts cut in equal parts (q|k|v in thirds, gate|up in halves: each part
sharded on its own) and ``Replicate()`` where every rank holds all of it. torch's
``clip_grad_norm_``, ``get_total_norm``, optimizers and DCP then see the global values.

The layers compute with the local tensors: ours call ``local()`` in forward, and a stock module
holding DTensor parameters (a norm, a router, an embedding cut by heads) sees plain tensors during
its forward: ``LocalViews`` puts ``param.to_local()`` in the module's ``__dict__`` (which attribute
lookup reads before ``_parameters``) and takes it away after. ``to_local`` is differentiable: the
gradient reaches the DTensor parameter with its placements.

``DistributedDataParallel`` needs plain tensors (its broadcast of the module's states and its
gradient buckets have no DTensor rules): ``local_parameters`` shows it each parameter's local tensor
as a plain ``nn.Parameter``, which the layers then compute with (the autograd leaf DDP hooks), and
makes the DTensor parameter's ``.grad`` that leaf's gradient wrapped with its placements.
"""
import contextlib
import gc
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from torch_mp._group import all_gather_rows
from torch_mp._hooks import forward_state_hook
from torch_mp._tensor_parallel.sharding import ShardSpec

_MESHES: Dict[str, DeviceMesh] = {}


def device_mesh(group) -> Optional[DeviceMesh]:
    """The 1-D DeviceMesh of ``group`` (a ProcessGroup, a 1-D DeviceMesh, or None: the default
    group): the mesh itself when one is given (so that FSDP2 finds the root mesh of
    ``torch_mp.init_mesh``), else ``DeviceMesh.from_group``, one per group. None when
    torch.distributed is not initialized (a group of one: parameters stay plain tensors)."""
    if isinstance(group, DeviceMesh):
        return group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if group is None else group
    mesh = _MESHES.get(group.group_name)
    if mesh is None:
        device_type = "cuda" if dist.get_backend(group) == "nccl" and torch.cuda.is_available() else "cpu"
        mesh = _MESHES[group.group_name] = DeviceMesh.from_group(group, device_type)
    return mesh


def placements(spec: ShardSpec, world: int, dim: Optional[int] = None) -> Optional[List[Placement]]:
    """The placement describing a weight (or, with ``dim=0``, a colwise bias) sharded by ``spec``
    exactly, so that its norm counts every element of the dense tensor once and ``full_tensor()``
    gives the dense layout: ``Shard(dim)`` for one part; ``_StridedShard(dim, split_factor=parts)``
    for equal parts each sharded on its own; ``Replicate()`` where every rank holds all of every
    part (key/value heads kept whole by every rank). None for layouts DTensor cannot describe
    (unequal parts, or blocks kept by some ranks but not all)."""
    dim = spec.dim if dim is None else dim
    if spec.replicas is not None and any(r > 1 for r in spec.replicas):
        return [Replicate()] if all(r == world for r in spec.replicas) else None
    if len(spec.parts) == 1:
        return [Shard(dim)]
    if len(set(spec.parts)) == 1:
        return [_StridedShard(dim, split_factor=len(spec.parts))]
    return None


class _ToLocal(torch.autograd.Function):
    """``DTensor.to_local()`` for a parameter, about 4x cheaper in eager mode (measured on a 64 x 64
    linear, forward and backward): the gradient is wrapped with the parameter's own spec (the same
    placements, mesh, global shape) instead of one recomputed per call."""

    @staticmethod
    def forward(ctx, param: DTensor) -> torch.Tensor:
        ctx.spec = param._spec
        return param._local_tensor.view_as(param._local_tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> DTensor:
        return DTensor(grad.contiguous(), ctx.spec, requires_grad=False)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (differentiable: its gradient reaches the DTensor with the same
    placements, or, after ``local_parameters``, the plain leaf a data-parallel wrapper holds), a plain
    tensor as it is."""
    if not isinstance(tensor, DTensor):
        return tensor
    leaf = getattr(tensor, _LEAF, None)
    if leaf is not None:
        if tensor.grad is None and leaf.grad is not None:  # zero_grad(set_to_none=True) set the DTensor's
            leaf.grad = None
        return leaf
    if torch.compiler.is_compiling():
        return tensor.to_local()  # what the compiler traces
    return _ToLocal.apply(tensor)


def autograd_leaf(param: torch.Tensor) -> torch.Tensor:
    """The tensor whose gradient the backward accumulates for ``param``: the plain leaf of a DTensor
    parameter after ``local_parameters``, else ``param`` (where gradient hooks go)."""
    return getattr(param, _LEAF, param) if isinstance(param, DTensor) else param


_LEAF = "_torch_mp_leaf"


class _LeafGrads:
    """The post-accumulate-grad hook of the plain leaves ``local_parameters`` made: at the end of the
    backward each DTensor parameter's ``.grad`` becomes its leaf's gradient (the same storage) with
    the parameter's placements. Queued twice, so that it runs after DDP's end-of-backward callback
    (queued when its last bucket is ready), which writes the averaged gradients into the leaves."""

    def __init__(self) -> None:
        self.pairs: List[Tuple[DTensor, nn.Parameter]] = []
        self.queued = False

    def __call__(self, _leaf: torch.Tensor) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_wrap)

    def _queue_wrap(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._wrap)

    def _wrap(self) -> None:
        self.queued = False
        for param, leaf in self.pairs:
            grad = leaf.grad
            if grad is not None and (param.grad is None or param.grad._local_tensor is not grad):
                param.grad = DTensor(grad, param._spec, requires_grad=False)


@contextlib.contextmanager
def local_parameters(module: nn.Module) -> Iterator[nn.Module]:
    """A context in which every DTensor parameter of ``module`` (a ``tensor_parallel`` model: its
    sharded and replicated parameters on the TP group's 1-D mesh) is replaced by a plain
    ``nn.Parameter`` holding its local tensor (the same storage, shape ``[out / ranks, in]`` for a
    colwise weight), for wrappers that need plain tensors when they are built:
    ``DistributedDataParallel``, whose broadcast of the module's states and gradient buckets have no
    DTensor rules. On leaving it the DTensor parameters are back (what optimizers, ``state_dict`` and
    ``torch.nn.utils.clip_grad_norm_`` see: the dense norm), while the forward computes with the
    plain leaves the wrapper holds; at the end of each backward (after DDP's averaging) each DTensor
    parameter's ``.grad`` is its leaf's gradient with the DTensor's placements. Tied parameters stay
    one; other parameters are left as they are. After torch's ``_pre_dp_module_transform``
    (``torch.distributed.tensor.parallel.ddp``), which instead swaps DTensors in around each forward.

    Use: ``with torch_mp.local_parameters(model): ddp = DistributedDataParallel(model, process_group=
    mesh["dp"].get_group())``. The backward then reaches the leaves, not the DTensor parameters: a
    ``register_hook`` hook of the user's on a DTensor parameter no longer runs (torch_mp's own, the
    gradient sums of sequence parallelism, go to the leaves); ``torch_mp.clip_grad_norm_`` and
    ``torch.nn.utils.clip_grad_norm_`` on ``ddp.parameters()`` both give the dense norm.

    Yields ``module``. Raises TypeError for a ``module`` that is not an ``nn.Module``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"local_parameters: expected module to be a torch.nn.Module, got {type(module).__name__}")
    grads = _LeafGrads()
    swapped = []
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if not (isinstance(param, DTensor) and param.device_mesh.ndim == 1):
                continue
            leaf = param.__dict__.get(_LEAF)
            if leaf is None:
                leaf = nn.Parameter(param._local_tensor, requires_grad=param.requires_grad)
                if param.grad is not None:
                    leaf.grad = param.grad._local_tensor
                if leaf.requires_grad:
                    leaf.register_post_accumulate_grad_hook(grads)
                grads.pairs.append((param, leaf))
                param.__dict__[_LEAF] = leaf
            owner._parameters[name] = leaf
            swapped.append((owner, name, param))
    try:
        yield module
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


def _refuse_broadcast(op_call, args, kwargs):
    raise ValueError("c10d.broadcast_ of DTensors (DistributedDataParallel broadcasting the module's states when it "
                     "is built): the parameters of a torch_mp.tensor_parallel model are DTensors, which DDP can "
                     "neither broadcast nor put in its gradient buckets; expected DDP built inside "
                     "torch_mp.local_parameters(model): `with torch_mp.local_parameters(model): ddp = "
                     "DistributedDataParallel(model, ...)`")


def refuse_dtensor_broadcast() -> None:
    """Makes a broadcast of DTensors (which DTensor has no rule for: a NotImplementedError) a
    ValueError naming ``local_parameters``: DDP built on a tensor-parallel model without plain
    buffers hits it first (with them, the cat of its broadcast bucket raises DTensor's "got mixed
    torch.Tensor and DTensor" before). A custom op handler of DTensor's dispatcher, as torch's
    ``loss_parallel`` registers its own."""
    DTensor._op_dispatcher._custom_op_handlers.setdefault(torch.ops.c10d.broadcast_.default, _refuse_broadcast)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor, outside autograd (checkpoints, reports); a plain tensor as it is."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def distribute_parameter(param: nn.Parameter, mesh: DeviceMesh, where: Sequence[Placement],
                         global_shape: Sequence[int]) -> nn.Parameter:
    """``param`` (this rank's shard, a plain tensor) as an ``nn.Parameter(DTensor)`` of global shape
    ``global_shape``, sharing its storage unless it is a slice of a larger one."""
    contiguous = torch.empty(global_shape, device="meta").stride()
    shard = param.detach()
    if shard.storage_offset() or shard.untyped_storage().nbytes() != shard.numel() * shard.element_size():
        # A slice of the dense tensor (a colwise shard taken by narrow): its own copy, so that the
        # dense storage is freed and the DTensor's data_ptr is 0 (deepcopy of a wrapper relies on it).
        shard = shard.clone()
    value = DTensor.from_local(shard, mesh, list(where), run_check=False, shape=torch.Size(global_shape),
                               stride=contiguous)
    return nn.Parameter(value, requires_grad=param.requires_grad)


def global_shape(local_shape: Sequence[int], where: Sequence[Placement], world: int) -> List[int]:
    shape = list(local_shape)
    for placement in where:
        if isinstance(placement, (Shard, _StridedShard)):
            shape[placement.dim] *= world
    return shape


@forward_state_hook
class LocalViews:
    """A forward pre-hook for a stock module holding DTensor parameters: each one's local tensor
    (``local``, differentiable) stands in the module's ``__dict__`` during its forward, so the
    module's own code computes with plain tensors. ``drop_local_views``, a forward hook run even
    when the forward raises, removes them. Both are forward state hooks: a pipeline's recompute of
    the bare forward replays them. A class, so a module holding it can be pickled."""

    def __call__(self, module: nn.Module, *_) -> None:
        for name, param in module._parameters.items():
            if isinstance(param, DTensor):
                module.__dict__[name] = local(param)


@forward_state_hook
def drop_local_views(module: nn.Module, *_) -> None:
    for name in module._parameters:
        module.__dict__.pop(name, None)


def add_local_views(module: nn.Module) -> None:
    """Registers ``LocalViews`` on ``module`` once."""
    if not any(isinstance(hook, LocalViews) for hook in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(LocalViews(), prepend=True)
        module.register_forward_hook(drop_local_views, always_call=True)


def rewrap(grad: torch.Tensor, fn) -> torch.Tensor:
    """A gradient hook's ``fn`` (on plain tensors) applied to a DTensor gradient's local tensor,
    the result wrapped with the same placements; a plain gradient goes to ``fn`` as it is."""
    if not isinstance(grad, DTensor):
        return fn(grad)
    result = fn(grad._local_tensor)
    return DTensor.from_local(result, grad.device_mesh, grad.placements, run_check=False, shape=grad.shape,
                              stride=grad.stride())


def tp_local(value: torch.Tensor, tensor_parallel: bool) -> torch.Tensor:
    """What this rank of a tensor-parallel group holds of ``value`` (outside autograd): a DTensor's
    local tensor along the TP mesh dim (the last), FSDP2's data-parallel shards of it gathered first;
    a DTensor of a model without tensor parallelism (``tensor_parallel`` False: FSDP2 alone) whole;
    a plain tensor as it is. A collective over the data-parallel mesh dims for FSDP2's shards."""
    if not isinstance(value, DTensor):
        return value
    if not tensor_parallel:
        return value.full_tensor()
    mesh, local = value.device_mesh, value._local_tensor
    if mesh.ndim == 1:
        return local  # a tensor-parallel model's parameter (FSDP2 on top makes it 2-D)
    # FSDP2 over tensor parallelism (init_mesh's (dp, tp) order): each data-parallel dim that shards
    # holds torch.chunk's pieces of the TP-local tensor along its dim (the last rank's maybe shorter
    # or empty). Gathered directly: DTensor's redistribute of FSDP2's _StridedShard over our own
    # fused-layout _StridedShard gives the whole tensor, not the TP shard.
    shape = tp_local_shape(value)
    for mesh_dim in range(mesh.ndim - 2, -1, -1):
        placement = value.placements[mesh_dim]
        if not isinstance(placement, (Shard, _StridedShard)):
            continue
        dim, ranks = placement.dim, mesh.size(mesh_dim)
        piece = -(-shape[dim] // ranks)
        padded = local.new_zeros([piece if d == dim else n for d, n in enumerate(local.shape)])
        padded.narrow(dim, 0, local.shape[dim]).copy_(local)
        gathered = all_gather_rows(padded, mesh.get_group(mesh_dim), "torch_mp.full_state_dict")
        local = torch.cat(gathered.unbind(0), dim).narrow(dim, 0, shape[dim])
    return local


def tp_local_shape(value: DTensor) -> List[int]:
    """The shape of what this rank of the tensor-parallel group holds of the DTensor ``value``
    (``tp_local``'s result, without communication): its local tensor's on a 1-D mesh; on FSDP2's
    (dp, tp) mesh the global shape cut along the TP dim (the last mesh dim)."""
    mesh = value.device_mesh
    if mesh.ndim == 1:
        return list(value._local_tensor.shape)
    tp, shape = value.placements[-1], list(value.shape)
    if isinstance(tp, (Shard, _StridedShard)):
        shape[tp.dim] //= mesh.size(mesh.ndim - 1)
    return shape


def dp_local(target: torch.Tensor, value: torch.Tensor, tensor_parallel: bool) -> torch.Tensor:
    """The inverse of ``tp_local``, without communication: what this rank holds of ``value`` (a
    stock tensor, or the tensor-parallel shard of one when ``tensor_parallel``) for the DTensor
    ``target``, cut along each of its mesh dims that FSDP2 shards (every dim of a model without
    tensor parallelism; all but the last, the TP dim, with it) into torch.chunk's pieces (the last
    rank's maybe shorter or empty), as FSDP2 holds them. A plain ``target``: ``value`` as it is."""
    if not isinstance(target, DTensor):
        return value
    mesh, coordinate = target.device_mesh, target.device_mesh.get_coordinate()
    if tensor_parallel and mesh.ndim == 1:
        return value  # a tensor-parallel model's parameter: read as its TP shard already
    for mesh_dim in range(mesh.ndim - 1 if tensor_parallel else mesh.ndim):
        placement = target.placements[mesh_dim]
        if isinstance(placement, (Shard, _StridedShard)):
            start, stop = chunk_range(value.shape[placement.dim], mesh.size(mesh_dim), coordinate[mesh_dim])
            value = value.narrow(placement.dim, start, stop - start)
    return value


def chunk_range(size: int, ranks: int, index: int) -> Tuple[int, int]:
    """``[start, stop)``: the range of ``size`` elements that piece ``index`` of ``torch.chunk`` into
    ``ranks`` pieces holds, as FSDP2 shards a dim (pieces of ``ceil(size / ranks)``, the last ones
    shorter or empty)."""
    piece = -(-size // ranks)
    start = min(size, piece * index)
    return start, min(size, start + piece)


def dp_shard_range(value: DTensor) -> Optional[Tuple[int, int, int]]:
    """``(dim, start, stop)``: the range along ``dim`` of the global tensor that this rank's local
    tensor of ``value`` holds, for a DTensor on a 1-D mesh placed ``Shard(dim)`` (FSDP2's parameters
    and their optimizer state without tensor parallelism: ``chunk_range``'s pieces); None for a
    replicated one. Raises ValueError for a DTensor on a mesh of more dims or placed otherwise
    (``_StridedShard``'s ranges are not one range)."""
    placement = value.placements[0]
    if value.device_mesh.ndim != 1 or not (type(placement) is Shard or placement.is_replicate()):
        raise ValueError(f"dp_shard_range: a DTensor on a {value.device_mesh.ndim}-D mesh placed {value.placements}; "
                         "expected a 1-D mesh, Shard(dim) or Replicate()")
    if placement.is_replicate():
        return None
    start, stop = chunk_range(value.shape[placement.dim], value.device_mesh.size(0), value.device_mesh.get_coordinate()[0])
    return placement.dim, start, stop


def like(param: torch.Tensor, local_value: torch.Tensor) -> torch.Tensor:
    """``local_value`` (shaped as ``param``'s local tensor) as a DTensor placed as ``param`` is, for
    a DTensor ``param`` (optimizer state loaded from a checkpoint; FSDP2 over tensor parallelism's
    on a 2-D mesh too); else as it is."""
    if not isinstance(param, DTensor) or local_value.shape != param._local_tensor.shape:
        return local_value
    return DTensor.from_local(local_value, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def swap_in(param: torch.nn.Parameter, value: torch.Tensor, grad: Optional[torch.Tensor] = None) -> None:
    """Makes ``param`` hold ``value`` (and ``grad``) in place, keeping the Python object
    (``torch.utils.swap_tensors``): optimizers, gradient hooks and their handles, tied modules and
    anything keyed by ``id(param)`` keep working on it. ``value`` is of ``param``'s kind (``like``)."""
    moved = torch.nn.Parameter(value, param.requires_grad)
    if grad is not None:
        moved.grad = grad
    hooks = param._backward_hooks, getattr(param, "_post_accumulate_grad_hooks", None)
    if weakref.getweakrefcount(param):
        # swap_tensors refuses a tensor with weak references; those of dead reference cycles (the
        # fake-tensor conversion of tensor_parallel's dry run) go with a collection.
        gc.collect()
    try:
        torch.utils.swap_tensors(param, moved)
    except RuntimeError as error:
        if "use_count" not in str(error):
            raise
        raise ValueError(
            f"torch_mp: a {list(param.shape)} parameter is still referenced by something holding its tensor, "
            "most often an autograd graph not yet run backward (a loss kept for logging) or a tensor saved from "
            "it; expected loss.backward() or del loss (and no other tensor holding the parameter) before "
            "torch_mp.pipeline / tensor_parallel / load_full_state_dict move it") from error
    # The hook dicts stay on the Python object; setting them again registers them with the moved tensor.
    param._backward_hooks, param._post_accumulate_grad_hooks = hooks
