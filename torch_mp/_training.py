"""Training utilities that see the whole model: the dense model's gradient norm and fp16 overflow
decision on every rank of a split, pipelined, tensor-parallel or data-parallel model.

torch's ``clip_grad_norm_`` and ``GradScaler`` see the gradients one process holds: a pipeline
rank's stages, a tensor-parallel rank's shards next to whole copies of the replicated parameters.
Here each gradient element of the dense model counts exactly once, wherever it lives:

- a shard of a tensor-parallel parameter (``state_of(model).specs``) on the rank holding it; a
  block held by ``r`` ranks (key/value heads fewer than the ranks) on the first of them;
- a parameter every rank of a group holds whole (replicated under tensor parallelism, kept on
  several pipeline ranks, a DTensor's ``Replicate`` mesh dim) on the first rank of the group;
- a pipeline stage's parameters on the rank of the stage (the others hold meta tensors); under
  a pipeline over a tensor-parallel model, both rules: a stage's shard on the stage's rank;
- a DTensor gradient (FSDP2's ``fully_shard``, sharded parameters as DTensors) by its local shard,
  its ``Shard`` mesh dims summed over.

Each rank sums its elements' p-th powers (the max for ``inf``) and one all-reduce per group of the
model (the pipeline group, the tensor-parallel group, the DTensor meshes' dims) makes the total.
Data-parallel replicas (DDP) hold equal gradients after their all-reduce: each computes the same
total, without a collective (a pipeline's ``data_parallel`` replicas average theirs in ``train_step``;
with ``fully_shard=`` its layers' shards are summed over the replicas and the parameters the
replicas hold whole are counted on the first). After torchtitan's ``clip_grad_norm_`` (pipeline stages summed over the
pipeline group) and Megatron-LM's ``get_grad_norm_fp32`` / ``check_for_nan_in_grad`` (shards and
duplicates counted once over the model-parallel groups).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from torch_mp._checkpoint.state_dict import is_sharded, spec_of
from torch_mp._group import all_reduce, process_group_of
from torch_mp._state import PIPELINE, TENSOR_PARALLEL, states_of, unwrapped

ModelOrParameters = Union[nn.Module, torch.Tensor, Iterable[torch.Tensor]]


@dataclass
class _Layout:
    """What one rank counts of the model's gradients, and over which groups the counts add up."""

    grads: List[torch.Tensor] = field(default_factory=list)    # every local gradient (what clipping scales)
    counted: List[torch.Tensor] = field(default_factory=list)  # the parts of them this rank counts
    groups: Dict[Tuple[int, ...], object] = field(default_factory=dict)  # {global ranks: ProcessGroup}

    def add_group(self, group) -> Tuple[int, ...]:
        """Registers ``group`` (None: the default group) by its ranks; returns them."""
        group = dist.group.WORLD if group is None else group
        ranks = tuple(dist.get_process_group_ranks(group))
        if len(ranks) > 1:
            self.groups.setdefault(ranks, group)
        return ranks


def _is_first(ranks: Tuple[int, ...]) -> bool:
    return dist.get_rank() == min(ranks)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mesh_share(param: torch.Tensor, layout: _Layout) -> bool:
    """Registers the mesh dims of a DTensor parameter as groups of the model; whether this rank counts
    its local shard as far as they go (a ``Replicate`` dim counts on the dim's first rank)."""
    if not isinstance(param, DTensor):
        return True
    counted = True
    for dim, placement in enumerate(param.placements):
        layout.add_group(param.device_mesh.get_group(dim))
        counted = counted and not (placement.is_replicate() and param.device_mesh.get_local_rank(dim) != 0)
    return counted


def _local(grad: torch.Tensor) -> torch.Tensor:
    """A gradient's tensor on this rank: a DTensor's local shard (a pending sum made whole first)."""
    if not isinstance(grad, DTensor):
        return grad
    if any(p.is_partial() for p in grad.placements):
        grad = grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p for p in grad.placements])
    return grad.to_local()


def _tensor_parallel_parts(grad: torch.Tensor, name: str, state, ranks: Tuple[int, ...]) -> List[torch.Tensor]:
    """The parts of a tensor-parallel parameter's local gradient this rank counts: all of a shard
    (but of a block several ranks hold, on the first of them only); a replicated one on the group's
    first rank."""
    spec, role = spec_of(name, state.specs)
    if spec is None or not is_sharded(spec, role):
        return [grad] if _is_first(ranks) else []
    if spec.replicas is None:
        return [grad]
    world, rank = len(ranks), ranks.index(dist.get_rank())
    dim = spec.dim if role == "weight" else 0
    pieces = grad.split(list(spec.local_parts(world)), dim)
    return [piece for piece, r in zip(pieces, spec.replicas) if rank % r == 0]


def _layout_of_module(model: nn.Module) -> _Layout:
    root = unwrapped(model)
    distributed = _distributed()
    # The innermost module's torch_mp states holding each parameter (a pipeline's and the
    # tensor-parallel one under it), with its name there.
    owner: Dict[int, Tuple[List, str]] = {}
    for _, submodule in root.named_modules():
        states = states_of(submodule)
        if states:
            owner.update({id(param): (states, name) for name, param in submodule.named_parameters()})
    layout = _Layout()
    ranks_of: Dict[int, Tuple[int, ...]] = {}  # {id(state) or id(kept parameter): global ranks}
    every_state = {id(state): state for states, _ in owner.values() for state in states}
    for state in every_state.values():
        if distributed and state.kind in (PIPELINE, TENSOR_PARALLEL):
            ranks_of[id(state)] = layout.add_group(process_group_of(state.group))
            group = process_group_of(state.group)
            for params, ranks in state.pipe.ties if state.kind == PIPELINE else ():
                tied = tuple(dist.get_global_rank(group, r) if group is not None else r for r in ranks)
                ranks_of.update({id(param): tied for param in params})
    for param in root.parameters():
        if param.is_meta:  # another pipeline rank's stage
            continue
        counted = _mesh_share(param, layout) if distributed else True
        if param.grad is None:
            continue
        local = _local(param.grad)
        layout.grads.append(local)
        states, name = owner.get(id(param), ([], ""))
        if not counted:
            continue
        parts = [local]
        for state in states if distributed else ():
            if id(state) not in ranks_of:
                continue
            if state.kind == PIPELINE:  # a stage's parameter, or one kept on several ranks: on the first
                if not _is_first(ranks_of.get(id(param), (dist.get_rank(),))):
                    parts = []
                if state.pipe.fully_sharded and state.data_parallel is not None and not isinstance(param, DTensor):
                    # Beside FSDP2's shards, summed over the replicas, a parameter every replica
                    # holds whole (averaged in train_step): on the first replica.
                    if not _is_first(layout.add_group(state.data_parallel)):
                        parts = []
            else:
                parts = [piece for part in parts for piece in _tensor_parallel_parts(part, name, state,
                                                                                       ranks_of[id(state)])]
        layout.counted += parts
    return layout


def _layout_of_parameters(parameters: Iterable[torch.Tensor], caller: str) -> _Layout:
    """An iterable of parameters: unambiguous in one process, or when every one is a DTensor (its
    placements say what each rank holds)."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    for param in params:
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{caller}: expected model to be a module or parameters (tensors), got an iterable "
                            f"holding {type(param).__name__}")
    distributed = _distributed()
    if distributed and not all(isinstance(param, DTensor) for param in params):
        raise ValueError(f"{caller}: model is an iterable of {len(params)} parameters, not all DTensors, in a world "
                         f"of {dist.get_world_size()} ranks: which ones are shards, replicas or other ranks' stages "
                         "is unknown; expected the model itself (the module that split, pipeline or "
                         "tensor_parallel returned, or DDP / FSDP2 around it)")
    layout = _Layout()
    for param in params:
        counted = _mesh_share(param, layout) if distributed else True
        if param.grad is not None and not param.is_meta:
            layout.grads.append(_local(param.grad))
            if counted:
                layout.counted.append(layout.grads[-1])
    return layout


def _layout(model: ModelOrParameters, caller: str) -> _Layout:
    return _layout_of_module(model) if isinstance(model, nn.Module) else _layout_of_parameters(model, caller)


def _collective_device(layout: _Layout) -> torch.device:
    """Where the total travels: the first gradient's device; the current CUDA device for NCCL."""
    if layout.grads:
        return layout.grads[0].device
    groups = list(layout.groups.values())
    if groups and "nccl" in str(dist.get_backend(groups[0])):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_norm_type(norm_type, caller: str) -> float:
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not (
            norm_type > 0 or norm_type == math.inf):
        raise ValueError(f"{caller}: norm_type = {norm_type!r}; expected a number > 0 or math.inf")
    return float(norm_type)


def _total_norm(layout: _Layout, norm_type: float, foreach: Optional[bool], caller: str) -> torch.Tensor:
    device = _collective_device(layout)
    local = torch.nn.utils.get_total_norm(layout.counted, norm_type, foreach=foreach).to(device, torch.float32)
    if norm_type == math.inf:
        for group in layout.groups.values():
            local = all_reduce(local, "max", group, caller)
        return local
    total = local.pow(norm_type)
    for group in layout.groups.values():
        total = all_reduce(total, "sum", group, caller)
    return total.pow(1.0 / norm_type)


def get_total_norm(model: ModelOrParameters, norm_type: float = 2.0, foreach: Optional[bool] = None) -> torch.Tensor:
    """The dense model's gradient norm, the same on every rank: the ``norm_type``-norm of all its
    parameters' gradients as one vector (``inf``: the largest absolute element), each element
    counted once however the model is cut (the rules in ``torch_mp._training``). What
    ``torch.nn.utils.get_total_norm`` gives on the dense model; parameters without a gradient do
    not count. A collective over the model's groups: every rank of them must call it.

    Args:
        model: the module that ``split``, ``pipeline`` or ``tensor_parallel`` returned, DDP or
            FSDP2 (``fully_shard``) around one, or a plain module; or an iterable of parameters
            where that is unambiguous (one process, or every parameter a DTensor).
        norm_type: p of the p-norm, a number > 0 or ``math.inf``.
        foreach: as for torch's (None: the fast foreach kernels where the devices have them).

    Returns a 0-dim float32 tensor on the first gradient's device (the CPU when this rank holds none).

    Raises ValueError for a ``norm_type`` that is not > 0 nor inf, or an iterable of plain tensors
    in a distributed world (pass the model); TypeError for an iterable holding non-tensors;
    ``torch_mp.CollectiveError`` when a peer does not answer within the group's timeout.
    """
    caller = "torch_mp.get_total_norm"
    norm_type = _check_norm_type(norm_type, caller)
    return _total_norm(_layout(model, caller), norm_type, foreach, caller)


def clip_grad_norm_(model: ModelOrParameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: Optional[bool] = None) -> torch.Tensor:
    """Clips the gradients of ``model`` in place by the dense model's norm (:func:`get_total_norm`):
    every local gradient times ``min(1, max_norm / (total + 1e-6))``, torch's formula, so every rank
    scales by the same factor and the step is the dense model's. Call it instead of
    ``torch.nn.utils.clip_grad_norm_``, which sees only this rank's stages or shards (and counts a
    replicated parameter once per rank). A collective over the model's groups.

    Args:
        model, norm_type, foreach: as for :func:`get_total_norm`.
        max_norm: the largest norm the gradients keep (a number >= 0).
        error_if_nonfinite: raise RuntimeError (on every rank alike) when the total is nan or inf.

    Returns the total norm before clipping (a 0-dim float32 tensor, as torch's returns).

    Raises ValueError for a negative or non-numeric ``max_norm`` and as :func:`get_total_norm` does;
    RuntimeError for a non-finite total with ``error_if_nonfinite=True``.
    """
    caller = "torch_mp.clip_grad_norm_"
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"{caller}: max_norm = {max_norm!r}; expected a number >= 0")
    norm_type = _check_norm_type(norm_type, caller)
    layout = _layout(model, caller)
    total = _total_norm(layout, norm_type, foreach, caller)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"{caller}: the total norm of order {norm_type} of the gradients is {total.item()}; "
                           "expected a finite norm (error_if_nonfinite=True)")
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_device: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for grad in layout.grads:
        by_device.setdefault((grad.device, grad.dtype), []).append(grad)
    with torch.no_grad():
        for (device, _), grads in by_device.items():
            torch._foreach_mul_(grads, coefficient.to(device))
    return total


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose overflow check is the dense model's: ``found_inf`` (whether
    any gradient holds an inf or nan after unscaling) is reduced (max) over the model's groups, so
    every rank skips the step together and keeps the same scale. torch's own sees only this rank's
    gradients: a tensor-parallel shard or a pipeline stage that overflows alone makes its rank skip
    while the others step, and the ranks' scales and weights part ways. After Megatron-LM's
    ``found_inf`` all-reduce over the model-parallel group and FSDP1's ``ShardedGradScaler``.

    Use it as torch's: ``scaler.scale(loss).backward()`` (or ``model.train_step`` on the scaled
    loss), ``scaler.unscale_(opt)`` before :func:`clip_grad_norm_`, ``scaler.step(opt)``,
    ``scaler.update()``. Every rank of the groups must call ``unscale_``/``step`` (a collective);
    a pipeline rank whose stages hold no loss (its ``scale`` never called) starts at ``init_scale``
    too, so every rank keeps the same scale.

    Args:
        device, init_scale, growth_factor, backoff_factor, growth_interval, enabled: torch's.
        model: the model whose groups the decision spans (its pipeline, tensor-parallel and DTensor
            mesh groups, as :func:`clip_grad_norm_` finds them); None: the whole default group
            (every rank of the world decides together, right for any layout).

    Raises TypeError for a ``model`` that is not an ``nn.Module``; ``torch_mp.CollectiveError`` when
    a peer does not answer within the group's timeout.
    """

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True,
                 model: Optional[nn.Module] = None) -> None:
        super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"torch_mp.GradScaler: expected model to be a torch.nn.Module or None, got "
                            f"{type(model).__name__}")
        self._groups = None if model is None else list(_layout_of_module(model).groups.values())

    def _ensure_scale(self) -> None:
        """A pipeline rank without the last stage never scales a loss (``loss_fn`` runs on the last
        stage's rank): its scale starts where every rank's does, at ``init_scale``."""
        if self._enabled and self._scale is None:
            device = torch.device(self._device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            self._lazy_init_scale_growth_tracker(device)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self._ensure_scale()
        super().unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs) -> Optional[float]:
        self._ensure_scale()
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None) -> None:
        self._ensure_scale()
        super().update(new_scale)

    def _unscale_grads_(self, optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor,
                        allow_fp16: bool) -> Dict[torch.device, torch.Tensor]:
        per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        if not _distributed():
            return per_device
        combined = found_inf.new_zeros(())
        for value in per_device.values():
            combined = torch.maximum(combined, value.to(combined.device))
        for group in [None] if self._groups is None else self._groups:
            combined = all_reduce(combined, "max", group, "torch_mp.GradScaler (found_inf)")
        # Every device this rank holds gradients on (at least the scale's) records the shared decision.
        return {device: combined.to(device) for device in [*per_device, found_inf.device]}
