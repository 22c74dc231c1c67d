"""The B/W split of the zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR
2024): a stage's backward (B) computes the input gradient the previous stage waits for, and the
weight gradients wait for the schedule's W of that (stage, micro-batch).

Under ``schedule="zb_h1"`` or ``"zbv"``, every ``nn.Linear`` inside a stage (one whose forward is
``nn.Linear.forward``: the bulk of a transformer's weights) and every transformers ``Conv1D`` (GPT-2's
linears, their weight stored [in, out]) computes through
``torch.ops.torch_mp.deferred_linear``, whose C++ backward returns the input gradient and queues
the weight and bias gradients' work under the slot of its (stage, micro-batch); W runs that work
(``torch_mp::pipeline::run_weight_gradients``). Every other module's weight gradient (embeddings,
norms, convolutions, a Linear subclass with its own forward, a weight that is not a leaf) is
computed in B, with the input gradient: the joint backward. So is a Linear's under autocast, under
torch.compile, and one whose weight or bias has a gradient hook (``register_hook``,
``register_post_accumulate_grad_hook``): W writes ``.grad`` directly, where no hook would see the
gradient. Other schedules never patch a module.
"""
import sys
import threading
import types
from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from torch_mp import _C

ZERO_BUBBLE = ("zb_h1", "zbv")
WEIGHT = 2  # the kind of a W action in a schedule from _C._pipeline_schedule (F: 0, B: 1)

_current = threading.local()  # .slot: where the running stage's linears defer their work; -1: nowhere


def allocate_slots(count: int) -> int:
    """The first of ``count`` fresh slots, unique in this process (C++ pipelines take theirs from
    the same counter): one per (stage, micro-batch) of a step."""
    return _C._allocate_weight_gradient_slots(count)


def slot_of(first_slot: int, count: int, stage: int, microbatch: int) -> int:
    """The slot of (stage, micro-batch) in a step of ``count`` micro-batches whose slots start at
    ``first_slot`` (``allocate_slots(num_stages * count)``)."""
    return first_slot + stage * count + microbatch


class deferring:
    """While a stage runs a micro-batch's forward: its linears' weight gradients go to ``slot``."""

    __slots__ = ("slot", "outer")

    def __init__(self, slot: int):
        self.slot = slot

    def __enter__(self):
        self.outer = getattr(_current, "slot", -1)
        _current.slot = self.slot

    def __exit__(self, *_):
        _current.slot = self.outer


def run_weight_gradients(slot: int) -> int:
    """The W of a (stage, micro-batch): its linears' weight and bias gradients, added to ``.grad``.
    Returns how many linear calls it finished."""
    return _C._run_weight_gradients(slot)


def discard(first: int, count: int) -> None:
    """Drops the work still queued in ``count`` slots from ``first`` (a step that failed)."""
    for slot in range(first, first + count):
        _C._discard_weight_gradients(slot)


def defer_linears(modules: Iterable[nn.Module]) -> None:
    """Routes the ``nn.Linear`` and transformers ``Conv1D`` layers inside ``modules`` (those with
    their class's own forward) through ``deferred_linear`` while a stage's forward runs with a slot
    (``deferring``); elsewhere (no grad, autocast, torch.compile) they compute as before."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)  # imported by the model
    for module in modules:
        for layer in module.modules():
            if "forward" in layer.__dict__:
                continue
            # Bound methods: a deep copy of the model rebinds them to the copied layer.
            if isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
                layer.forward = types.MethodType(_deferring_linear, layer)
            elif conv1d is not None and type(layer) is conv1d:
                layer.forward = types.MethodType(_deferring_conv1d, layer)


def _has_gradient_hooks(param) -> bool:
    return param is not None and bool(param._backward_hooks or param._post_accumulate_grad_hooks)


def _defers(layer: nn.Module, input: torch.Tensor) -> bool:
    """Whether ``layer`` computes through ``deferred_linear``. Outside a stage's forward (slot -1)
    the op has F.linear's backward; a checkpointed stage's recomputation lands there too, and saves
    what the first forward saved."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(input.device.type)
            and not _has_gradient_hooks(layer.weight) and not _has_gradient_hooks(layer.bias))


def _deferring_linear(layer: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    if not _defers(layer, input):
        return F.linear(input, layer.weight, layer.bias)
    return torch.ops.torch_mp.deferred_linear(input, layer.weight, layer.bias, getattr(_current, "slot", -1))


def _deferring_conv1d(layer: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """transformers' Conv1D (``input @ weight + bias``, weight [in, out]) as a linear layer of the
    transposed weight, whose gradient W writes in the stored layout."""
    if not _defers(layer, input):
        return type(layer).forward(layer, input)
    return torch.ops.torch_mp.deferred_linear(input, layer.weight.t(), layer.bias, getattr(_current, "slot", -1))
