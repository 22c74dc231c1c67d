"""A pipeline in one process without tracing: the model's own forward runs once per micro-batch,
each micro-batch in a thread of its own, and a call of a placed module waits for its stage's turn
in the schedule. So the stages work on different micro-batches at once (each on its device), and
any Python the forward holds (``**kwargs``, flags, branches on shapes or on tensor values) runs
as it does without a pipeline.

Stage s of micro-batch m starts once every action before F(s, m) in its list of the schedule
(the stage's, or its rank's where a rank holds several) has finished; a micro-batch's forward on
stage s finishes when it calls a module of a later stage or its forward returns, its backward (one
call over all its stages) when that call returns. Under a zero-bubble schedule each list's W run in
a thread of their own, each at its turn; they and the backwards take turns on one lock, since a
parameter may take gradients from both (a weight tied to another module's). Every wait is for an
action the checked schedule puts earlier, so the threads cannot deadlock.
"""
import contextlib
import threading
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.checkpoint import checkpoint as checkpointed

from torch_mp._pipelining import zero_bubble
from torch_mp._pipelining.engine import (Action, drawing_from, get_rng_state, in_checkpoint, record_random_state,
                                         recorded_random_state, set_rng_state)
from torch_mp._tensors import move_tensors, tensors_in

_current = threading.local()
_rng_locks: Dict[torch.device, threading.Lock] = {}
_rng_locks_guard = threading.Lock()


class Aborted(Exception):
    """Another micro-batch failed; its error is the one raised."""


class StageGate:
    """Lets each micro-batch into each stage in the order of the stage's list of actions."""

    def __init__(self, schedule: List[List[Action]]):
        self._before = {action: actions[:i] for actions in schedule for i, action in enumerate(actions)}
        self._last = len(schedule) - 1
        self._done: set = set()
        self._ready = threading.Condition()
        self.failed = False

    def wait(self, action: Action) -> None:
        before = self._before.get(action, [])
        with self._ready:
            self._ready.wait_for(lambda: self.failed or all(a in self._done for a in before))
            if self.failed:
                raise Aborted()

    def finish(self, actions) -> None:
        with self._ready:
            self._done.update(actions)
            self._ready.notify_all()

    def fail(self) -> None:
        with self._ready:
            self.failed = True
            self._ready.notify_all()


class MicroBatch:
    """One micro-batch's forward in its thread: which stages it has entered and left."""

    def __init__(self, pipe, gate: StageGate, index: int, num_stages: int, recompute: bool,
                 first_slot: Optional[int], count: int, recorder=None):
        self.pipe, self.gate, self.index, self.num_stages = pipe, gate, index, num_stages
        self.recompute, self.recorder = recompute, recorder
        # Zero-bubble schedules: where this step's slots start (``zero_bubble.slot_of``).
        self.first_slot, self.count = first_slot, count
        self.depth = 0  # placed modules under way: those they call run as part of them
        self.entered: set = set()
        self.left: set = set()

    def enter(self, stage: int) -> None:
        if self.gate.failed:
            raise Aborted()
        self.leave(range(stage))
        if stage not in self.entered and stage not in self.left:
            self.gate.wait((False, stage, self.index))
            self.entered.add(stage)

    def leave(self, stages) -> None:
        finished = [s for s in stages if s not in self.left]
        if finished:
            if self.recorder is not None:
                self.recorder.left(finished, self.index)
            self.left.update(finished)
            self.gate.finish([(False, s, self.index) for s in finished])


def gated_forward(pipe, original: Callable, stage: int, device: torch.device, move: Callable,
                  module: torch.nn.Module) -> Callable:
    """The forward a placed module gets: its inputs moved to its device, its call let in at its
    stage's turn when a micro-batch of ``pipe`` makes it, and checkpointed where asked."""

    def forward(*args, **kwargs):
        given = tensors_in((args, kwargs))
        args, kwargs = move_tensors((args, kwargs), move)
        micro_batch: Optional[MicroBatch] = getattr(_current, "micro_batch", None)
        if micro_batch is None and given and torch._C._current_graph_task_id() != -1:
            state = recorded_random_state(module, given[0])
            if state is not None:  # a checkpoint of the model's own recomputes the call: its draws again
                with _rng_lock(device), drawing_from(state, device):
                    return original(*args, **kwargs)
        if micro_batch is None or micro_batch.pipe is not pipe or micro_batch.depth:
            return original(*args, **kwargs)  # outside a pipelined call, or inside a placed module's
        micro_batch.enter(stage)
        if micro_batch.recorder is not None:
            micro_batch.recorder.entered(stage, micro_batch.index, (args, kwargs))
        micro_batch.depth += 1
        try:
            if micro_batch.first_slot is not None:
                slot = zero_bubble.slot_of(micro_batch.first_slot, micro_batch.count, stage, micro_batch.index)
                with zero_bubble.deferring(slot):
                    return run(micro_batch, given, *args, **kwargs)
            return run(micro_batch, given, *args, **kwargs)
        finally:
            micro_batch.depth -= 1

    def run(micro_batch: MicroBatch, given: List[torch.Tensor], *args, **kwargs):
        if given and module.training and in_checkpoint():
            # torch.utils.checkpoint in the model's own code wraps this call and will recompute it
            # (ours would recompute it once more): its draws start from a state recorded here, since
            # other micro-batches draw between the checkpoint's start and this stage's turn.
            with _rng_lock(device):
                record_random_state(module, given[0], device)
                return original(*args, **kwargs)
        if pipe.checkpoint == "never" or not (module.training and torch.is_grad_enabled()):
            return original(*args, **kwargs)
        if micro_batch.recompute:
            return checkpointed(_own_random_stream(original, device), *args, use_reentrant=False,
                                preserve_rng_state=False, **kwargs)
        with _rng_lock(device):  # draws nothing while a recomputed module's draws are under way
            return original(*args, **kwargs)

    return forward


def _own_random_stream(original: Callable, device: torch.device) -> Callable:
    """``original`` run with its device's random generator to itself; its recomputation starts the
    generator where the first run started it, so both draw the same numbers although other stages
    and micro-batches draw from the generator in between."""
    start: List[torch.Tensor] = []
    lock = _rng_lock(device)

    def run(*args, **kwargs):
        with lock:
            if not start:
                start.append(get_rng_state(device))
                return original(*args, **kwargs)
            now = get_rng_state(device)
            set_rng_state(start[0], device)
            try:
                return original(*args, **kwargs)
            finally:
                set_rng_state(now, device)

    return run


def _rng_lock(device: torch.device) -> threading.Lock:
    with _rng_locks_guard:
        return _rng_locks.setdefault(device, threading.Lock())


class ThreadState:
    """The caller's thread-local state, entered again in each micro-batch's thread: grad mode,
    inference mode, autocast (per device type), saved-tensor hooks, and the intra-op thread count
    (OpenMP's is per thread: a new thread's BLAS and vector-math calls would otherwise start a
    team of every core's threads next to the caller's, and the processes of a pipeline on one
    machine would crowd each other's cores)."""

    def __init__(self):
        self.threads = torch.get_num_threads()
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        self.autocast = [(kind, torch.get_autocast_dtype(kind)) for kind in ("cpu", "cuda")
                         if torch.is_autocast_enabled(kind)]
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)

    def enter(self, stack: contextlib.ExitStack) -> None:
        torch.set_num_threads(self.threads)
        stack.enter_context(torch.inference_mode(self.inference))
        stack.enter_context(torch.set_grad_enabled(self.grad))
        for kind, dtype in self.autocast:
            stack.enter_context(torch.autocast(kind, dtype=dtype, cache_enabled=self.autocast_cache))
        if self.hooks is not None:
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(*self.hooks))


def run_micro_batches(pipe, schedule: List[List[Action]], count: int, work: Callable[[int], object],
                      backward: Optional[Callable[[int, object], None]], recompute: Callable[[int], bool],
                      first_slot: Optional[int] = None, recorder=None) -> List:
    """Runs ``work(m)`` (a micro-batch's forward, in the caller's thread-local state) for every
    micro-batch in a thread of its own, stages gated by ``schedule`` (one list per stage, or per
    rank of the schedule where a rank holds several); then, when given, ``backward(m, result)``
    at the turn of the micro-batch's backward on the last stage; and, under a zero-bubble
    schedule (``first_slot``: see ``MicroBatch``), each W at its turn. Returns the results in
    micro-batch order; the first error raised stops every other micro-batch at its next stage and
    is raised here. A ``timeline.Recorder`` given records when each micro-batch's forward entered
    and left each stage, and each W."""
    gate = StageGate(schedule)
    num_stages = pipe.num_stages
    state = ThreadState()
    results: List[object] = [None] * count
    errors: List[BaseException] = []
    grads = threading.Lock() if first_slot is not None else contextlib.nullcontext()

    def run(m: int) -> None:
        micro_batch = MicroBatch(pipe, gate, m, num_stages, recompute(m), first_slot, count, recorder)
        try:
            with contextlib.ExitStack() as stack:
                state.enter(stack)
                _current.micro_batch = micro_batch
                try:
                    result = work(m)
                finally:
                    _current.micro_batch = None
                micro_batch.leave(range(num_stages))
                if backward is not None:
                    gate.wait((True, num_stages - 1, m))
                    with grads:
                        backward(m, result)
                    gate.finish([(True, s, m) for s in range(num_stages)])
                results[m] = result
        except BaseException as error:  # noqa: B036 - every failure must stop the other micro-batches
            errors.append(error)
            gate.fail()

    def run_weights(actions: List[Action]) -> None:
        try:
            for action in actions:
                gate.wait(action)
                started = recorder.now() if recorder is not None else 0.0
                with grads:
                    zero_bubble.run_weight_gradients(zero_bubble.slot_of(first_slot, count, action[1], action[2]))
                if recorder is not None:
                    recorder.record(action[0], action[1], action[2], started)
                gate.finish([action])
        except BaseException as error:  # noqa: B036
            errors.append(error)
            gate.fail()

    threads = [threading.Thread(target=run, args=(m,), name=f"torch_mp-micro-batch-{m}") for m in range(count)]
    if first_slot is not None:
        weights = [[a for a in actions if a[0] == zero_bubble.WEIGHT] for actions in schedule]
        threads += [threading.Thread(target=run_weights, args=(actions,), name=f"torch_mp-weights-{i}")
                    for i, actions in enumerate(weights) if actions]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        if first_slot is not None:
            zero_bubble.discard(first_slot, num_stages * count)
    real = [error for error in errors if not isinstance(error, Aborted)]
    if real:
        raise real[0]
    return results
