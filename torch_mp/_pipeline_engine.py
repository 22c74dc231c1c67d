"""Runs one rank's actions of a pipeline schedule (``_pipeline_comm`` moves tensors between ranks).

A stage's forward cuts the autograd graph at its inputs (leaves that require grad), so its backward
is its own call, run when the schedule says, and what it leaves in those leaves' ``.grad`` is sent
to the previous stage.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint as checkpointed

from torch_mp._ops import to_device
from torch_mp._pipeline_batch import check_loss
from torch_mp._pipeline_graph import StageGraph
from torch_mp.split import _map_tensors

Action = Tuple[bool, int, int]  # (backward, stage, micro-batch)
Key = Tuple[str, int, int]  # ("act" | "grad", receiving stage, micro-batch)
CHECKPOINTS = ("never", "except_last", "always")


# --- one rank's actions ---------------------------------------------------------------------

class StageRunner:
    """Runs a list of actions for the stages in ``stages``, talking through ``transport``."""

    def __init__(self, stages: Dict[int, StageGraph], devices: Dict[int, torch.device], num_stages: int,
                 transport, checkpoint: str, chunks: int, training: bool):
        self.stages, self.devices, self.num_stages = stages, devices, num_stages
        self.transport, self.checkpoint, self.chunks, self.training = transport, checkpoint, chunks, training

    def _checkpointed(self, microbatch: int) -> bool:
        """Whether the micro-batch's forward is recomputed in its backward: in training only."""
        return self.training and (self.checkpoint == "always" or
                                  (self.checkpoint == "except_last" and microbatch < self.chunks - 1))

    def run(self, actions: Sequence[Action], inputs: List[List], targets: Optional[List],
            loss_fn: Optional[Callable], weights: List[float], cut: bool) -> Dict[int, object]:
        """Forward-only when ``loss_fn`` is None (the last stage's outputs are returned per
        micro-batch); otherwise the last stage returns each micro-batch's loss."""
        saved: Dict[Tuple[int, int], Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
        results: Dict[int, object] = {}
        last = self.num_stages - 1
        for backward, stage, microbatch in actions:
            if backward:
                self._backward(stage, microbatch, saved.pop((stage, microbatch)))
                continue
            device = self.devices[stage]
            received = self.transport.recv(("act", stage, microbatch)) if stage > 0 else []
            if cut:
                received = [t.detach().requires_grad_(t.requires_grad) for t in received]
            model_inputs = _map_tensors(inputs[microbatch], lambda t: t if t.device == device else
                                        to_device(t, device) if t.requires_grad and not cut else t.to(device))
            run = self.stages[stage].module
            if torch.is_grad_enabled() and self._checkpointed(microbatch):
                out = checkpointed(run, *model_inputs, *received, use_reentrant=False)
            else:
                out = run(*model_inputs, *received)
            if stage == last:
                if loss_fn is None:
                    results[microbatch] = out
                    continue
                target = None if targets is None else _map_tensors(targets[microbatch], lambda t: t.to(device))
                loss = check_loss(loss_fn(out, target))
                results[microbatch] = loss.detach()
                saved[(stage, microbatch)] = (received, [loss * weights[microbatch]])
            else:
                self.transport.send(("act", stage + 1, microbatch), _tensors(out, self.stages[stage].sent, stage))
                if loss_fn is not None:
                    saved[(stage, microbatch)] = (received, list(out))
        return results

    def _backward(self, stage: int, microbatch: int, saved) -> None:
        received, outputs = saved
        if stage == self.num_stages - 1:
            tensors, grads = outputs, [None]
        else:
            grads = self.transport.recv(("grad", stage, microbatch))
            tensors = [t for t in outputs if t.requires_grad]
        if tensors:
            torch.autograd.backward(tensors, grads)
        if stage > 0:
            self.transport.send(("grad", stage - 1, microbatch),
                                [t.grad if t.grad is not None else torch.zeros_like(t)
                                 for t in received if t.requires_grad])


def _tensors(values, names: List[str], stage: int) -> List[torch.Tensor]:
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"pipeline: stage {stage} passes {name} = {type(value).__name__} on to the next "
                            "stage; expected only tensors to cross stage boundaries")
    return list(values)
