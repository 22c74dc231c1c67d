"""Runs pipeline schedules: micro-batches in and out, one rank's (or one stage worker's) actions,
and the stage threads of a pipeline in one process (``_pipeline_comm`` moves tensors between ranks).

A stage's forward cuts the autograd graph at its inputs (leaves that require grad), so its backward
is its own call, run when the schedule says, and what it leaves in those leaves' ``.grad`` is sent
to the previous stage.
"""
import contextlib
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint as checkpointed

from torch_mp._ops import to_device
from torch_mp._pipeline_graph import StageGraph
from torch_mp.split import _map_tensors

Action = Tuple[bool, int, int]  # (backward, stage, micro-batch)
Key = Tuple[str, int, int]  # ("act" | "grad", receiving stage, micro-batch)
CHECKPOINTS = ("never", "except_last", "always")


# --- micro-batches --------------------------------------------------------------------------

def batch_size_of(values: Sequence, batch_dim: int) -> int:
    found: List[int] = []
    _map_tensors(list(values), lambda t: found.append(t.shape[batch_dim]) if t.dim() > batch_dim else None)
    if not found:
        raise ValueError(f"pipeline: none of the inputs is a tensor with a batch dimension {batch_dim}; "
                         "expected at least one, to cut into micro-batches")
    return found[0]


def micro_batch_sizes(batch: int, chunks: int) -> List[int]:
    if chunks > batch:
        raise ValueError(f"pipeline: chunks = {chunks} but the batch holds {batch} samples; expected "
                         f"chunks <= the batch size")
    base, extra = divmod(batch, chunks)
    return [base + (1 if m < extra else 0) for m in range(chunks)]


def cut_batch(values, sizes: List[int], batch_dim: int) -> List:
    """One copy of ``values`` per micro-batch: tensors whose batch dimension has the batch size are
    narrowed to the micro-batch, everything else is passed whole."""
    batch = sum(sizes)
    parts, start = [], 0
    for size in sizes:
        parts.append(_map_tensors(values, lambda t, start=start, size=size: t.narrow(batch_dim, start, size)
                                  if t.dim() > batch_dim and t.shape[batch_dim] == batch else t))
        start += size
    return parts


def merge_outputs(outputs: List, sizes: List[int], batch_dim: int):
    """The inverse of cut_batch for a forward's outputs: batch-shaped tensors are concatenated,
    scalars (a loss the model computes itself) averaged with the micro-batch sizes as weights."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return sum(out * (size / sum(sizes)) for out, size in zip(outputs, sizes))
        if first.dim() > batch_dim and all(out.shape[batch_dim] == size for out, size in zip(outputs, sizes)):
            return torch.cat(outputs, dim=batch_dim)
        return first
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(merge_outputs(list(parts), sizes, batch_dim) for parts in zip(*outputs)))
    if isinstance(first, (list, tuple)):
        return type(first)(merge_outputs(list(parts), sizes, batch_dim) for parts in zip(*outputs))
    if isinstance(first, dict):
        merged = {key: merge_outputs([out[key] for out in outputs], sizes, batch_dim) for key in first}
        return merged if type(first) is dict else type(first)(**merged)
    return first


def shapes_of(values) -> str:
    """The shapes and dtypes of every tensor in ``values``, in order."""
    described: List[str] = []
    _map_tensors(values, lambda t: described.append(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"))
    return ", ".join(described)


# --- one rank's actions ---------------------------------------------------------------------

class StageRunner:
    """Runs a list of actions for the stages in ``stages``, talking through ``transport``."""

    def __init__(self, stages: Dict[int, StageGraph], devices: Dict[int, torch.device], num_stages: int,
                 transport, checkpoint: str, chunks: int):
        self.stages, self.devices, self.num_stages = stages, devices, num_stages
        self.transport, self.checkpoint, self.chunks = transport, checkpoint, chunks

    def _checkpointed(self, microbatch: int) -> bool:
        return self.checkpoint == "always" or (self.checkpoint == "except_last" and microbatch < self.chunks - 1)

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
                target = _map_tensors(targets[microbatch], lambda t: t.to(device))
                loss = loss_fn(out, target)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ValueError(f"pipeline: loss_fn returned {shape}; expected a scalar tensor, the "
                                     "micro-batch's mean loss")
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


# --- one process, a thread per stage --------------------------------------------------------

class _Aborted(Exception):
    """Another stage worker failed; its error is the one raised."""


class LocalTransport:
    """Hands tensors between the stage threads of one process, moved to the receiver's device. On
    CUDA the receiver's stream waits for the sender's work before using them."""

    def __init__(self, devices: Dict[int, torch.device], cut: bool):
        self.devices, self.cut = devices, cut
        self._ready = threading.Condition()
        self._box: Dict[Key, Tuple[List[torch.Tensor], Optional[torch.cuda.Event]]] = {}
        self._failed = False

    def send(self, key: Key, tensors: List[torch.Tensor]) -> None:
        device = self.devices[key[1]]
        if self.cut:
            moved = [t.detach().to(device).requires_grad_(t.requires_grad) for t in tensors]
        else:
            moved = [t if t.device == device else to_device(t, device) for t in tensors]
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        with self._ready:
            self._box[key] = (moved, event)
            self._ready.notify_all()

    def recv(self, key: Key) -> List[torch.Tensor]:
        with self._ready:
            self._ready.wait_for(lambda: key in self._box or self._failed)
            if key not in self._box:
                raise _Aborted()
            tensors, event = self._box.pop(key)
        if event is not None:
            torch.cuda.current_stream(self.devices[key[1]]).wait_event(event)
        return tensors

    def fail(self) -> None:
        with self._ready:
            self._failed = True
            self._ready.notify_all()


def run_local(stages: List[StageGraph], devices: List[torch.device], schedule: List[List[Action]],
              inputs: List[List], targets: Optional[List], loss_fn: Optional[Callable], weights: List[float],
              checkpoint: str, cut: bool) -> Dict[int, object]:
    """Runs ``schedule`` with one thread per stage (each on its own CUDA stream when its device is a
    GPU); the caller's grad mode carries over into the threads."""
    device_of = dict(enumerate(devices))
    transport = LocalTransport(device_of, cut)
    results: Dict[int, object] = {}
    errors: List[BaseException] = []
    grad_enabled = torch.is_grad_enabled()

    def work(stage: int) -> None:
        try:
            runner = StageRunner({stage: stages[stage]}, device_of, len(stages), transport, checkpoint,
                                 len(inputs))
            stream = torch.cuda.Stream(devices[stage]) if devices[stage].type == "cuda" else None
            on_stream = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with torch.set_grad_enabled(grad_enabled), on_stream:
                results.update(runner.run(schedule[stage], inputs, targets, loss_fn, weights, cut))
            if stream is not None:
                stream.synchronize()
        except BaseException as error:  # noqa: B036 - every failure must stop the other workers
            errors.append(error)
            transport.fail()

    threads = [threading.Thread(target=work, args=(stage,), name=f"torch_mp-stage-{stage}")
               for stage in range(len(stages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    real = [error for error in errors if not isinstance(error, _Aborted)]
    if real:
        raise real[0]
    return results
