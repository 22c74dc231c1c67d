"""The one record of what ``split``, ``pipeline`` or ``tensor_parallel`` did to a module.

Each wrapper stores a :class:`ParallelState` under the module's one attribute ``_torch_mp_state``;
every reader (state dicts, checkpoints, ``memory_report``, a second ``split``) fetches it with
:func:`state_of`. ``pipeline`` over ``tensor_parallel`` composes (torchtitan's order: tensor parallel,
then pipeline): the pipeline's record holds the tensor-parallel one as its ``inner`` state. The attributes documented for users (``device_map``, ``output_device``,
``torch_mp_plan``, ``torch_mp_replicated``, ``torch_mp_kept_whole``) are plain views: the same
objects as the record's fields. One state object per module follows FSDP2 (``fully_shard.state``).
"""
import copy
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from torch_mp._checks import check_arg

if TYPE_CHECKING:
    from torch_mp._tensor_parallel.sharding import ShardSpec

SPLIT, PIPELINE, TENSOR_PARALLEL = "split", "pipeline", "tensor_parallel"
KINDS = (SPLIT, PIPELINE, TENSOR_PARALLEL)

_ATTRIBUTE = "_torch_mp_state"
# The views each kind publishes on the module: {attribute: field}.
_VIEWS = {
    SPLIT: {"device_map": "device_map", "output_device": "output_device"},
    PIPELINE: {},
    TENSOR_PARALLEL: {"torch_mp_plan": "plan", "torch_mp_replicated": "replicated",
                      "torch_mp_kept_whole": "kept_whole"},
}


@dataclass
class ParallelState:
    """What a torch_mp wrapper did to a module; :func:`state_of` returns it.

    Fields, by ``kind``:

    - every kind: ``kind`` (``"split"``, ``"pipeline"`` or ``"tensor_parallel"``).
    - ``split``: ``device_map`` ({module name: device}, in layer order), ``stage_of`` ({module
      name: stage index}), ``output_device``, ``pipe`` (with ``chunks > 1``: the micro-batch
      runner) and ``hooks`` (the removable handles of the hooks that move tensors).
    - ``pipeline``: ``group`` (the ProcessGroup, None for the default one), ``stage_of`` and ``pipe``.
    - ``pipeline`` over ``tensor_parallel``: ``inner`` is the tensor-parallel record;
      ``data_parallel`` the group of the pipeline's replicas (None: no replicas).
    - a model ``parallelize`` returned (a pipeline): ``whole_batch``, the rows its ``train_step``
      takes (the whole batch, every data-parallel group's; None elsewhere: a replica's own rows).
    - ``tensor_parallel``: ``group``, ``specs`` ({module or parameter name: how its weight is
      sharded}), ``plan`` ({module name: style}), ``replicated`` (the names of shardable layers
      left whole) and ``kept_whole`` ({module name: the error that kept it whole}).

    Raises ValueError for a ``kind`` other than those three.
    """

    kind: str
    group: Any = None
    specs: Dict[str, "ShardSpec"] = field(default_factory=dict)
    plan: Dict[str, str] = field(default_factory=dict)
    replicated: List[str] = field(default_factory=list)
    kept_whole: Dict[str, str] = field(default_factory=dict)
    device_map: Dict[str, torch.device] = field(default_factory=dict)
    stage_of: Dict[str, int] = field(default_factory=dict)
    output_device: Optional[torch.device] = None
    pipe: Any = None
    hooks: List[Any] = field(default_factory=list)
    inner: Optional["ParallelState"] = None
    data_parallel: Any = None
    whole_batch: Optional[int] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ParallelState: kind = {self.kind!r}; expected one of {list(KINDS)}")

    def __deepcopy__(self, memo):
        """A deep copy of the module (``copy.deepcopy``) copies its record, which names the same
        process group: a group is the process's, not the module's. A pipeline's runner holds the
        original's modules, threads and transport: copying a pipelined module is a TypeError."""
        if self.pipe is not None:
            what = "split(..., chunks > 1)" if self.kind == SPLIT else self.kind
            raise TypeError(f"copy.deepcopy: the module was returned by torch_mp.{what}, whose pipeline runs the "
                            f"original's stages; expected a deep copy of the module before torch_mp.{self.kind}, "
                            f"then torch_mp.{self.kind} of the copy")
        copied = copy.copy(self)
        memo[id(self)] = copied
        for name in (f.name for f in fields(self) if f.name not in ("group", "data_parallel")):
            setattr(copied, name, copy.deepcopy(getattr(self, name), memo))
        return copied


def state_of(module: nn.Module, required: Union[None, str, Sequence[str]] = None) -> Optional[ParallelState]:
    """The :class:`ParallelState` that ``split``, ``pipeline`` or ``tensor_parallel`` stored on
    ``module``; None for a module none of them returned.

    ``required``: a kind or a sequence of kinds (``"split"``, ``"pipeline"``, ``"tensor_parallel"``):
    then the module must hold a state of one of them. Raises TypeError when ``module`` is not an
    ``nn.Module``; ValueError naming the kinds expected and what the module holds when it holds no
    state of a required kind, or for an unknown kind."""
    caller = "torch_mp.state_of"
    check_arg(caller, "module", module, nn.Module, "a torch.nn.Module")
    state = module.__dict__.get(_ATTRIBUTE)
    if required is None:
        return state
    kinds = (required,) if isinstance(required, str) else tuple(required)
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"{caller}: required = {required!r}; expected kinds among {list(KINDS)}")
    found = next((held for held in states_of(module) if held.kind in kinds), None)
    if found is None:
        held = "no torch_mp state" if state is None else f"the state of torch_mp.{state.kind}"
        expected = " or ".join(f"torch_mp.{kind}" for kind in kinds)
        raise ValueError(f"{caller}: {type(module).__name__} holds {held}; expected a module returned by {expected}")
    return found


def states_of(module: nn.Module) -> List[ParallelState]:
    """Every record on ``module``, the latest wrapper's first (a pipeline's, then the
    tensor-parallel one under it); empty for a module no wrapper returned."""
    chain, state = [], module.__dict__.get(_ATTRIBUTE)
    while state is not None:
        chain.append(state)
        state = state.inner
    return chain


def held_state(module: nn.Module, kind: str) -> Optional[ParallelState]:
    """The record of ``kind`` on ``module`` (the outer one or one under it); None when it has none."""
    return next((state for state in states_of(module) if state.kind == kind), None)


def unwrapped(module: nn.Module) -> nn.Module:
    """The module inside data-parallel (DDP, DataParallel) and torch.compile wrappers: the one a
    torch_mp wrapper parallelized, whose names are the stock ones (DDP's add ``module.``)."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


# (outer, inner): the wrappers that may be applied over another's result.
_COMPOSES = {(PIPELINE, TENSOR_PARALLEL)}


def check_not_parallelized(module: nn.Module, caller: str) -> None:
    """A module holds one state, or a pipeline's over a tensor-parallel one (``_COMPOSES``): any
    other already there (another wrapper's, a second ``pipeline`` / ``tensor_parallel``,
    ``tensor_parallel`` over ``pipeline``) is a ValueError, raised before the wrapper changes anything."""
    held = module.__dict__.get(_ATTRIBUTE)
    if held is None or (caller, held.kind) in _COMPOSES:
        return
    if (held.kind, caller) in _COMPOSES:
        raise ValueError(f"{caller}: {type(module).__name__} was already returned by torch_mp.{held.kind}; "
                         f"expected torch_mp.{caller} first, then torch_mp.{held.kind} (torchtitan's order: "
                         f"tensor_parallel(model, group=mesh['tp']), then pipeline(model, group=mesh['pp']))")
    raise ValueError(f"{caller}: {type(module).__name__} was already returned by torch_mp.{held.kind}; "
                     "expected a module no torch_mp wrapper has parallelized yet")


def attach(module: nn.Module, state: ParallelState, caller: str) -> ParallelState:
    """Stores ``state`` on ``module`` and sets its views; a record already there (``_COMPOSES``)
    becomes ``state.inner``, its views staying."""
    check_not_parallelized(module, caller)
    state.inner = module.__dict__.get(_ATTRIBUTE)
    module.__dict__[_ATTRIBUTE] = state
    for attribute, name in _VIEWS[state.kind].items():
        setattr(module, attribute, getattr(state, name))
    return state


def detach(module: nn.Module) -> Optional[ParallelState]:
    """Removes the outer state and its views from ``module`` (the one under it, if any, stays);
    returns the state (None if it had none)."""
    state = module.__dict__.pop(_ATTRIBUTE, None)
    if state is not None:
        for attribute in _VIEWS[state.kind]:
            module.__dict__.pop(attribute, None)
        if state.inner is not None:
            module.__dict__[_ATTRIBUTE] = state.inner
    return state
