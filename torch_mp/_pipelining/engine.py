"""One rank's share of a pipeline schedule, without tracing the forward.

Every rank runs the model's own forward once per micro-batch. The placed modules of this rank's
stages compute; those of other ranks' stages run as stand-ins on meta tensors (their parameters
are meta on this rank), so shapes flow and nothing is computed. A real tensor made by a local
stage is sent when it flows into another rank's module; a local module handed a meta tensor
receives the real one from the rank whose stage made it. Between the modules, an operation with
a meta operand (``_Follow``) is computed by the rank of the latest stage that made one of its
operands, which receives the others' real operands from the ranks that made them; the other
ranks follow it on meta. Every rank runs the same program, so sends and receives pair up.

A micro-batch's forward runs only when this rank's list of actions says ``F(stage,
micro-batch)``, in the thread that runs the actions then, and pauses there (that thread waits,
another runs the actions on) when it enters a later local stage (``RankStep.run``).
``B(stage, micro-batch)`` runs the backward of what that stage sent (with the gradients its
receivers send back) and sends the gradients of what it received. Under a zero-bubble schedule,
``W(stage, micro-batch)`` runs the weight gradients that stage's linears left for it in B
(``zero_bubble``).
"""
import contextlib
import sys
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode, _pop_mode_temporarily
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointFunction
from torch.utils.checkpoint import checkpoint as checkpointed
from torch.utils.weak import WeakIdKeyDictionary

from torch_mp._hooks import replaying_state_hooks
from torch_mp._pipelining import zero_bubble
from torch_mp._pipelining.transport import ACTIVATION, GRADIENT
from torch_mp._tensors import copy_tensors, map_tensors, tensors_in

def current() -> "MicroBatch":
    """The micro-batch whose forward runs in this thread."""
    return _current.micro_batch


Action = Tuple[int, int, int]  # (kind: 0 F, 1 B, 2 W; stage, micro-batch)
CHECKPOINTS = ("never", "except_last", "always")
_current = threading.local()
# Each meta placeholder a local stage was handed -> the real tensor it received for it: where a
# checkpoint wrapped the stage's call from outside (``torch.utils.checkpoint`` in the parent's
# forward), its recomputation calls the stage again with the placeholder (``_recomputed``).
_received_values = WeakIdKeyDictionary()
# A placed module's first tensor input inside a checkpoint of the model's own -> {module: random
# state its draws started from} (``record_random_state``).
_recorded_states = WeakIdKeyDictionary()
_recorded_guard = threading.Lock()
_VALUE_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__int__,
                torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}
# Functions drawing from the device's random generator: {function: (name and position of its
# training flag, the flag's default, position of its probability)}; None: it always draws.
_DRAWS = {**{f: ("training", 2, True, 1) for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)},
          **{f: ("training", 2, False, 1) for f in (F.alpha_dropout, F.feature_alpha_dropout)},
          torch.dropout: ("train", 2, False, 1), F.scaled_dot_product_attention: None,
          torch.bernoulli: None, torch.Tensor.bernoulli_: None}


def _argument(args, kwargs, name: str, position: int, default):
    return kwargs[name] if name in kwargs else args[position] if len(args) > position else default


def _draws(func, args, kwargs) -> bool:
    """Whether ``func(*args, **kwargs)`` draws random numbers (a dropout in training, ...)."""
    if func is F.scaled_dot_product_attention:
        return _argument(args, kwargs, "dropout_p", 4, 0.0) > 0
    if _DRAWS[func] is None:
        return True
    flag, position, default, p = _DRAWS[func]
    return bool(_argument(args, kwargs, flag, position, default)) and _argument(args, kwargs, "p", p, 0.5) > 0


def _draw(func, args, kwargs, device: torch.device) -> None:
    """Draws what ``func`` on the meta operands ``args`` and ``kwargs`` (another rank's stage)
    draws from this rank's generator, by running it on zeros of their shapes here: every rank's
    generator then follows the dense model's sequence of draws, so each dropout of its own stages
    draws the dense model's mask. Recorded for a stand-in replaying its call (``_StandIn``)."""
    recording = getattr(_current, "draws", None)
    if recording is not None:
        recording.append((func, args, kwargs))
    real = pytree.tree_map_only(torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device)
                                if t.is_meta else t, (args, kwargs))
    with torch._C.DisableTorchFunction(), torch.no_grad():
        func(*real[0], **real[1])


class Aborted(Exception):
    """The step failed elsewhere; this micro-batch's forward stops."""


def _to_meta(tensor: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunction():  # a copy: no operation of the forward's
        meta = tensor.detach().to("meta")
    return meta.requires_grad_(tensor.requires_grad) if meta.is_floating_point() or meta.is_complex() else meta


class _Follow(TorchFunctionMode):
    """Between the placed modules: every result is marked with the latest stage that made one of
    its operands (its origin). An operation with a meta operand is computed by that stage's rank,
    which receives the meta operands' real values; the other ranks send it what they made and run
    the operation on meta."""

    def __init__(self, step: "RankStep"):
        super().__init__()
        self.step = step

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        metas = any(t.is_meta for t in tensors)
        if func in _DRAWS and _draws(func, args, kwargs):
            self.step.drew = True
            if metas:
                _draw(func, args, kwargs, self.step.device)
        if not metas and not _current.micro_batch.depth and any(map(_is_meta_device, leaves)):
            # A tensor made or moved to the device of one this rank follows on meta (``arange(...,
            # device=hidden.device)``, ``mask.to(hidden.device)``) is made on this rank's device.
            args, kwargs = pytree.tree_unflatten([self.step.device if _is_meta_device(x) else x for x in leaves], spec)
        if not tensors:
            return func(*args, **kwargs)
        origins = self.step.origin
        if metas:
            if func in _VALUE_READS:
                raise ValueError(
                    f"pipeline: the forward reads the value of a tensor ({getattr(func, '__name__', func)}) that "
                    f"rank {self.step.rank} does not compute (a meta stand-in of another rank's stage made "
                    "it); expected no Python branch on tensor values between the placed modules: move "
                    "that code into a layer, or pass layers=[...] so that one stage holds it")
            origin = max((o for o in map(origins.get, tensors) if o is not None), default=None)
            micro_batch = _current.micro_batch
            if origin is None:
                # Real operands follow on meta; meta ones stay the tensors they are, so an in-place
                # operation on one (Mixtral's router: ``top /= top.sum(...)``) is not applied to a
                # fresh leaf that requires grad, which autograd refuses.
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t if t.is_meta else _to_meta(t),
                                                    (args, kwargs))
            elif self.step.rank_of(origin) == self.step.rank:
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: micro_batch.fetch(t, origin),
                                                    (args, kwargs))
            else:
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: micro_batch.follow(t, origin),
                                                    (args, kwargs))
            # A data-dependent shape (a boolean mask's selection) on meta takes every element: a
            # placeholder, replaced by the real tensor where a stage receives it.
            with _assume_all_nonzero():
                out = _on_meta(func, args, kwargs)
        else:
            origin = max((o for o in map(origins.get, tensors) if o is not None), default=None)
            out = func(*args, **kwargs)
        used = self.step.pipe.used
        if (used is not None and not _current.micro_batch.depth
                and (not metas or (origin is not None and self.step.rank_of(origin) == self.step.rank))):
            # Computed here (``pipe.used``: recorded on the first call): what it read is this rank's to hold.
            used.update(i for i in map(id, tensors) if i in self.step.pipe.tracked)
        if origin is not None:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    origins[t] = origin
        return out


def _on_meta(func, args, kwargs):
    """``func(*args, **kwargs)``, its tensors on the meta device or fetched. A grouped matmul
    (transformers' MoE experts) has a meta kernel for bf16 and fp16 only, the CUDA kernel's dtypes,
    though the CPU runs it in fp32: on meta operands it runs in bf16 and its result is cast back,
    the shapes being all a stand-in needs."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if func is not torch._grouped_mm or not all(t.is_meta for t in tensors) or args[0].dtype in _GROUPED_MM_DTYPES:
        return func(*args, **kwargs)
    dtype = kwargs.get("out_dtype") or args[0].dtype
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t,
                                        (args, {**kwargs, "out_dtype": None}))
    return func(*args, **kwargs).to(dtype)


_GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16)


def _is_meta_device(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "meta") or (isinstance(value, str) and value == "meta")


def _assume_all_nonzero():
    from torch.fx.experimental import _config
    return _config.patch(meta_nonzero_assume_all_nonzero=True)


class MicroBatch:
    """One micro-batch's forward, run by the thread that holds its rank's step at its first local
    stage's turn; it pauses there (the thread waits) when it enters a later local stage, and that
    thread runs it on at the stage's turn."""

    def __init__(self, step: "RankStep", index: int, work: Callable[[], object]):
        self.step, self.index, self.work = step, index, work
        self.stage: Optional[int] = None  # the local stage whose turn it is
        self.paused_at: Optional[int] = None
        self.started_at = 0.0  # when the running F action started (for a timeline)
        self.depth = 0
        self.entered: Optional[torch.nn.Module] = None  # the last local module called (for errors)
        self.calls: List[Tuple[torch.nn.Module, int]] = []  # (placed module, stage) in call order, every rank's
        self.sent: List[Tuple[torch.Tensor, int, tuple]] = []  # (tensor, dst rank, key)
        self.received: List[Tuple[torch.Tensor, int, tuple]] = []  # (leaf, src rank, key)
        self._sent_to: set = set()
        self._received: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._counts: Dict[tuple, int] = {}
        self.wake: Optional[threading.Semaphore] = None  # that of the thread running the forward
        self.done = False
        self.result = None

    def run(self, wake: threading.Semaphore) -> None:
        """Runs the forward in this thread (whose semaphore is ``wake``) to its end, pausing at
        each later local stage until its turn."""
        self.wake = wake
        try:
            with contextlib.ExitStack() as stack:
                self.step.state.enter(stack)
                _current.micro_batch = self
                stack.callback(lambda: setattr(_current, "micro_batch", None))
                stack.enter_context(_Follow(self.step))
                self.result = self.work()
        finally:
            self.done = True
        self.step.recorded(self)

    def _pause(self, stage: int) -> None:
        self.paused_at = stage
        self.step.recorded(self)
        self.step.hand_on()
        self.wake.acquire()
        if self.step.error is not None:
            raise Aborted()

    def _key(self, kind: int, made_by: int, used_by: int) -> tuple:
        pair = (made_by, used_by)
        self._counts[pair] = self._counts.get(pair, -1) + 1
        return (kind, self.index, made_by, used_by, self._counts[pair])

    def enter_local(self, stage: int, values, module: torch.nn.Module):
        """A local ``module`` of ``stage`` is called with ``values``: waits for the stage's turn, and
        receives the real tensors of the meta ones given."""
        if stage > self.stage:
            self._pause(stage)
        elif stage < self.stage:
            names = {m: n for n, m in self.step.pipe.module.named_modules()}
            raise ValueError(
                f"pipeline: micro-batch {self.index}'s forward calls module {names.get(module, '?')!r} (stage {stage}) "
                f"after module {names.get(self.entered, '?')!r} (stage {self.stage}) on rank {self.step.rank}; "
                "across ranks the placed modules must be called in stage order. A module outside the layers is "
                "cut with the layer before it (or the first): one the forward calls earlier (a rotary embedding "
                "with persistent buffers), or a module called twice, belongs in layers=, in the order the "
                "forward calls it")
        self.entered = module

        return map_tensors(values, lambda t: self.fetch(t, stage))

    def fetch(self, tensor: torch.Tensor, stage: int) -> torch.Tensor:
        """``tensor`` where local ``stage`` uses it: a meta one's real value, received from the rank
        whose stage made it (once per micro-batch)."""
        if not tensor.is_meta:
            return tensor
        if id(tensor) in self._received:
            return self._received[id(tensor)][1]
        origin = self.step.origin.get(tensor)
        if origin is None or self.step.rank_of(origin) == self.step.rank:
            raise ValueError(
                f"pipeline: on rank {self.step.rank}, stage {stage} uses a {list(tensor.shape)} tensor that no "
                "stage made (made on the meta device from another rank's value, e.g. by a factory given its "
                "device); expected tensors made from the inputs, parameters or stages' outputs")
        src = self.step.rank_of(origin)
        key = self._key(ACTIVATION, origin, stage)
        leaf = self.step.transport.recv(src, key)
        self.received.append((leaf, src, key))
        self._received[id(tensor)] = (tensor, leaf)
        _received_values[tensor] = leaf
        return leaf

    def to_stand_in(self, stage: int, values):
        """A module of another rank's ``stage`` is called with ``values``: what a local stage made
        is sent to that rank, and the stand-in gets meta tensors."""
        return map_tensors(values, lambda t: self.follow(t, stage))

    def follow(self, tensor: torch.Tensor, stage: int) -> torch.Tensor:
        """``tensor`` where another rank's ``stage`` uses it: sent there if a local stage made it
        (once per micro-batch and rank), and made meta."""
        if tensor.is_meta:
            return tensor
        dst = self.step.rank_of(stage)
        origin = self.step.origin.get(tensor)
        if (origin is not None and self.step.rank_of(origin) == self.step.rank
                and (id(tensor), dst) not in self._sent_to):
            key = self._key(ACTIVATION, origin, stage)
            self.step.transport.send(dst, key, tensor)
            self.sent.append((tensor, dst, key))
            self._sent_to.add((id(tensor), dst))
        return _to_meta(tensor)

    def to_last_stage(self, output):
        """The forward's ``output`` where the last stage's rank returns it: what other ranks' stages
        made (a T5 encoder's last hidden state) is sent there."""
        last = self.step.last
        with torch._C.DisableTorchFunction():
            if self.step.rank_of(last) != self.step.rank:
                return copy_tensors(output, lambda t: self.follow(t, last))
            return copy_tensors(output, lambda t: self.fetch(t, last) if self.step.origin.get(t) is not None else t)

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


class _Alias:
    """In a recorded output: the tensor at ``index`` of the call's inputs, or of its output."""
    __slots__ = ("of_input", "index")

    def __init__(self, of_input: bool, index: int):
        self.of_input, self.index = of_input, index


def _meta_like(meta: torch.Tensor) -> torch.Tensor:
    fresh = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device="meta")
    return fresh.requires_grad_(meta.requires_grad)


class _StandIn:
    """Another rank's module on this rank: its forward on meta tensors, run once per kind of call.
    Called again (by a later micro-batch, or step) with inputs of the same shapes, dtypes and
    plain arguments, in the same modes (training, grad, inference, autocast) and with its
    parameters requiring grad alike, it returns fresh meta tensors of the shapes it returned
    then, without running its forward: what a module returns on meta is taken to depend on these
    alone. A call is recorded only when its arguments and output hold nothing but tensors and
    plain values, and when it neither sent nor received anything."""

    def __init__(self, module: torch.nn.Module, original: Callable):
        self.module, self.original = module, original
        self._outputs: Dict[tuple, Optional[tuple]] = {}  # key: (spec, leaves), or None: not recorded

    def _key(self, args, kwargs) -> Tuple[Optional[tuple], list]:
        """The call's key (None: not to be recorded) and its leaves."""
        if not kwargs and all(type(arg) is torch.Tensor for arg in args):
            leaves, spec = args, len(args)  # the usual call, tensors only: no tree to flatten
        else:
            leaves, spec = pytree.tree_flatten((args, kwargs))
        signature = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                signature.append((leaf.shape, leaf.stride(), leaf.dtype, leaf.requires_grad, leaf.is_meta))
            elif type(leaf) in _PLAIN:
                signature.append((type(leaf), leaf))
            else:
                return None, leaves
        modes = (self.module.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                 *((kind, torch.get_autocast_dtype(kind)) for kind in ("cpu", "cuda") if torch.is_autocast_enabled(kind)))
        trained = tuple(param.requires_grad for param in self.module.parameters())
        key = (spec, modes, trained, tuple(signature))
        try:
            hash(key)
        except TypeError:  # an unhashable tree spec
            return None, leaves
        return key, leaves

    def call(self, micro_batch: "MicroBatch", args, kwargs):
        """The module's forward on meta ``args`` and ``kwargs``, or what it returned for the same key."""
        with torch._C.DisableTorchFunction():
            key, inputs = self._key(args, kwargs)
            recorded = self._outputs.get(key) if key is not None else None
            if recorded is not None:
                spec, leaves, draws = recorded
                for func, draw_args, draw_kwargs in draws:
                    _draw(func, draw_args, draw_kwargs, micro_batch.step.device)
                made = []
                for leaf in leaves:
                    made.append((inputs if leaf.of_input else made)[leaf.index] if isinstance(leaf, _Alias)
                                else _meta_like(leaf) if isinstance(leaf, torch.Tensor) else leaf)
                return made[0] if spec is None else pytree.tree_unflatten(made, spec)
        messages = len(micro_batch.sent) + len(micro_batch.received)
        outer, _current.draws = getattr(_current, "draws", None), []
        try:
            out = self.original(*args, **kwargs)
        finally:
            draws, _current.draws = _current.draws, outer
        if outer is not None:  # a stand-in inside another: the outer one replays these draws too
            outer.extend(draws)
        with torch._C.DisableTorchFunction():
            out = map_tensors(out, lambda t: t if t.is_meta else _to_meta(t))
            if key is not None and key not in self._outputs:
                recorded = self._record(out, inputs) \
                    if messages == len(micro_batch.sent) + len(micro_batch.received) else None
                self._outputs[key] = recorded and (*recorded, tuple(draws))
        return out

    @staticmethod
    def _record(out, inputs: list) -> Optional[tuple]:
        position = {id(t): i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)}
        leaves, spec = pytree.tree_flatten(out)
        recorded, seen = [], {}
        for k, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                # An input handed back (a pass-through) stays that input; a tensor returned twice
                # stays one tensor.
                recorded.append(_Alias(True, position[id(leaf)]) if id(leaf) in position
                                else _Alias(False, seen[id(leaf)]) if id(leaf) in seen else _meta_like(leaf))
                seen.setdefault(id(leaf), k)
            elif type(leaf) in _PLAIN:
                recorded.append(leaf)
            else:
                return None
        return (None if isinstance(out, torch.Tensor) else spec), recorded  # None: the output is one tensor


def placed_forward(pipe, original: Callable, stage: int, module: torch.nn.Module) -> Callable:
    """The forward a placed module gets: on a micro-batch of ``pipe``, computed on this rank's
    stages and a meta stand-in on the others'."""
    stand_in = _StandIn(module, original)

    def forward(*args, **kwargs):
        micro_batch: Optional[MicroBatch] = getattr(_current, "micro_batch", None)
        if micro_batch is None and torch._C._current_graph_task_id() != -1:
            return _recomputed(pipe, stage, module, original, args, kwargs)
        if micro_batch is None or micro_batch.step.pipe is not pipe or micro_batch.depth:
            return original(*args, **kwargs)
        step = micro_batch.step
        _check_flows_forward(micro_batch, module, stage, (args, kwargs))
        micro_batch.depth += 1
        try:
            if step.rank_of(stage) == step.rank:
                if pipe.used is not None:
                    pipe.used.update(map(id, (*module.parameters(), *module.buffers())))
                given = tensors_in((args, kwargs))
                with torch._C.DisableTorchFunction():
                    args, kwargs = micro_batch.enter_local(stage, (args, kwargs), module)
                with _pop_mode_temporarily(), step.deferring(stage, micro_batch.index):
                    if given and module.training and in_checkpoint():
                        # A checkpoint of the model's own recomputes the call (ours would once more);
                        # other micro-batches may draw while the forward waits for this stage's turn.
                        record_random_state(module, given[0], step.device)
                        out = original(*args, **kwargs)
                    elif step.recompute(micro_batch.index) and module.training and torch.is_grad_enabled():
                        # The recompute calls the bare forward: the module's hooks ran around this call only.
                        out = checkpointed(replaying_state_hooks(module, original), *args, use_reentrant=False,
                                           **kwargs)
                    else:
                        out = original(*args, **kwargs)
            else:
                if step.losses is not None and pipe.stages_per_rank > 1 and in_checkpoint(reentrant_only=True):
                    raise ValueError(
                        f"pipeline: schedule {pipe.schedule!r} runs {pipe.stages_per_rank} stages per rank, and the "
                        "forward calls a layer of another rank's stage inside torch.utils.checkpoint(..., "
                        "use_reentrant=True), whose backward would reach this rank's other stage through the "
                        "stand-in; expected use_reentrant=False (transformers: gradient_checkpointing_enable("
                        "gradient_checkpointing_kwargs={'use_reentrant': False})), or schedule '1f1b', 'gpipe' or "
                        "'zb_h1'")
                with torch._C.DisableTorchFunction():
                    args, kwargs = micro_batch.to_stand_in(stage, (args, kwargs))
                out = stand_in.call(micro_batch, args, kwargs)
            for tensor in tensors_in(out):
                step.origin[tensor] = stage
            return out
        finally:
            micro_batch.depth -= 1

    return forward


def in_checkpoint(reentrant_only: bool = False) -> bool:
    """Whether this call runs inside the forward of ``torch.utils.checkpoint`` (with
    ``reentrant_only``: of ``use_reentrant=True`` alone), called by the model's own code."""
    if not reentrant_only:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        pack = hooks[0] if hooks is not None else None
        if getattr(pack, "__module__", None) == "torch.utils.checkpoint":
            return True
    if torch.is_grad_enabled():  # an autograd Function's forward (the reentrant checkpoint's) runs without
        return False
    code = CheckpointFunction.forward.__code__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` is ``a`` or a detached copy of it (what a reentrant checkpoint recomputes on)."""
    return a is b or (a.untyped_storage() is b.untyped_storage() and a.shape == b.shape
                      and a.stride() == b.stride() and a.storage_offset() == b.storage_offset())


def get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def record_random_state(module: torch.nn.Module, given: torch.Tensor, device: torch.device) -> None:
    """Records where ``module``'s draws on ``device`` start in its call on ``given`` (its first
    tensor input) inside a checkpoint of the model's own (``in_checkpoint``): other micro-batches
    draw between the checkpoint's start, whose random state it restores to recompute, and the
    stage's turn, so the recomputation starts from this one instead (``recorded_random_state``)."""
    with _recorded_guard:
        _recorded_states.setdefault(given, {})[module] = get_rng_state(device)


def recorded_random_state(module: torch.nn.Module, given: torch.Tensor) -> Optional[torch.Tensor]:
    """The random state ``module``'s call on ``given`` (or on a detached copy of it) started from."""
    with _recorded_guard:
        states = _recorded_states.get(given)
        if states is None:
            states = next((found for tensor, found in _recorded_states.items() if same_view(tensor, given)), {})
        return states.get(module)


@contextlib.contextmanager
def drawing_from(state: torch.Tensor, device: torch.device):
    """Draws on ``device`` from ``state`` meanwhile; the generator's state is restored after."""
    now = get_rng_state(device)
    set_rng_state(state, device)
    try:
        yield
    finally:
        set_rng_state(now, device)


def _recomputed(pipe, stage: int, module: torch.nn.Module, original: Callable, args, kwargs):
    """A placed module called during a backward: a checkpoint around its call (``torch.utils.checkpoint``
    in the parent's forward, or transformers' gradient checkpointing) recomputes it. A local stage
    runs on the real tensors its meta placeholders stood for. Another rank's stage returns fresh
    meta tensors: a reentrant checkpoint around a stand-in is reached through the placeholders'
    meta history with no gradient (the real one crossed ranks), and what it returns is discarded."""
    if pipe.rank_of(stage) != pipe.rank:
        args, kwargs = map_tensors((args, kwargs), _to_meta)
        with torch.no_grad():
            out = original(*args, **kwargs)
        return map_tensors(out, lambda t: _meta_like(t).requires_grad_(t.is_floating_point() or t.is_complex()))

    def real(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_meta:
            return tensor
        value = _received_values.get(tensor)
        if value is None:  # a reentrant checkpoint recomputes on a detached copy: the same storage and view
            value = next((leaf for meta, leaf in _received_values.items() if same_view(meta, tensor)), None)
        if value is None:
            name = next((n for n, m in pipe.module.named_modules() if m is module), "?")
            raise ValueError(
                f"pipeline: a checkpoint (torch.utils.checkpoint) recomputes module {name!r} of stage {stage} on rank "
                f"{pipe.rank} with a {list(tensor.shape)} meta tensor it was not called with in the forward: the "
                "checkpointed function calls layers of several ranks' stages; expected each checkpoint around "
                "layers of one stage (one layer, as transformers' gradient_checkpointing_enable() does)")
        return value

    given = tensors_in((args, kwargs))
    state = recorded_random_state(module, given[0]) if given else None
    args, kwargs = map_tensors((args, kwargs), real)
    if state is None:
        return original(*args, **kwargs)
    with drawing_from(state, pipe.device):
        return original(*args, **kwargs)


def _check_flows_forward(micro_batch: MicroBatch, module: torch.nn.Module, stage: int, values) -> None:
    """A placed module of ``stage`` called on a tensor a later stage made (a layer applied again
    after the last block) would send activations back to an earlier stage, whose backward then
    waits for the later stage's and the later stage's for it: a ValueError on every rank (each
    runs the same forward, so each raises here, before any backward) instead of a hang."""
    origins = [micro_batch.step.origin.get(t) for t in tensors_in(values)]
    late = max((o for o in origins if o is not None), default=stage)
    micro_batch.calls.append((module, stage))
    if late <= stage:
        return
    names = {m: n for n, m in micro_batch.step.pipe.module.named_modules()}
    positions = [i + 1 for i, (called, _) in enumerate(micro_batch.calls) if called is module]
    maker = next(names.get(m, "?") for m, s in reversed(micro_batch.calls[:-1]) if s == late)
    uses = (f"; it was called at call {', '.join(map(str, positions[:-1]))} of the forward too"
            if len(positions) > 1 else "")
    raise ValueError(
        f"pipeline: micro-batch {micro_batch.index}'s forward calls module {names.get(module, '?')!r} (stage {stage}) "
        f"at call {positions[-1]} of its placed modules on a tensor that stage {late} made (module {maker!r}){uses}: "
        "its activations would flow back to an earlier stage, whose backward then waits for the later one's "
        "and the later one's for it. Expected each placed module to take only what earlier stages made: a "
        "module used at two places belongs with both in one stage (pass balance= or layers= so that they "
        "are), or run the model with torch_mp.split in one process")


# What every pooled action thread enters around each task it runs, as the thread that started the
# step would have: a dispatch mode is its thread's own (torch_mp.measure_peak's tensor tracker adds
# itself here while it runs, so the tensors these threads make count too).
THREAD_CONTEXTS: List[Callable[[], contextlib.AbstractContextManager]] = []


class _Pooled:
    """A thread that runs a step's actions on for a thread whose forward paused, kept for later ones."""

    def __init__(self):
        self.wake = threading.Semaphore(0)
        self.task: Optional[Callable[[threading.Semaphore], None]] = None
        threading.Thread(target=self._main, name="torch_mp-pipeline-actions", daemon=True).start()

    def _main(self) -> None:
        while True:
            self.wake.acquire()
            task, self.task = self.task, None
            with contextlib.ExitStack() as entered:
                for context in list(THREAD_CONTEXTS):
                    entered.enter_context(context())
                task(self.wake)
            with _pool_guard:
                _pool.append(self)


_pool: List[_Pooled] = []
_pool_guard = threading.Lock()


def _start_pooled(task: Callable[[threading.Semaphore], None]) -> None:
    with _pool_guard:
        pooled = _pool.pop() if _pool else None
    if pooled is None:
        pooled = _Pooled()
    pooled.task = task
    pooled.wake.release()


class RankStep:
    """One step (a batch) on one rank: the forwards of its micro-batches and the backwards of its
    stages, in the order of its list of actions."""

    def __init__(self, pipe, state, recompute: Callable[[int], bool]):
        self.pipe, self.rank, self.transport, self.device = pipe, pipe.rank, pipe.transport, pipe.device
        self.rank_of, self.last = pipe.rank_of, pipe.num_stages - 1
        self.state, self.recompute = state, recompute
        self.origin = WeakIdKeyDictionary()
        self.drew = False  # whether a forward drew random numbers (a dropout in training)
        # Zero-bubble schedules: where this step's slots start and the micro-batch count
        # (``zero_bubble.slot_of``); a slot holds the weight gradients its W runs.
        self.first_slot: Optional[int] = None
        self.count = 0

    def deferring(self, stage: int, microbatch: int):
        """Where the linears of ``stage`` leave their weight gradients on ``microbatch``'s backward."""
        if self.first_slot is None:
            return contextlib.nullcontext()
        return zero_bubble.deferring(zero_bubble.slot_of(self.first_slot, self.count, stage, microbatch))

    def run(self, actions: List[Action], works: List[Callable[[], object]],
            losses: Optional[List[torch.Tensor]] = None, recorder=None) -> List[MicroBatch]:
        """Runs ``actions``; ``works[m]()`` is micro-batch m's forward (returning its loss on the
        last stage when ``losses`` is wanted, weighted in ``losses[m]`` by the caller). A
        ``timeline.Recorder`` given records each action's start and end.

        One thread at a time runs the actions, the caller's to begin with: an F starts its
        micro-batch's forward in that thread, which runs it to its end, or, where the forward
        pauses at a later local stage, hands the actions on to the caller's thread if it waits,
        or else to a pooled one; the F of the stage where a forward paused hands them to the
        thread it paused in. So a rank with one stage runs all in the caller's thread."""
        self.actions, self.losses, self.recorder = actions, losses, recorder
        self.micro_batches = [MicroBatch(self, m, work) for m, work in enumerate(works)]
        self.next, self.error, self.aborting = 0, None, False
        self.caller = threading.Semaphore(0)
        self.caller_waits = False
        self.unwound = threading.Semaphore(0)
        try:
            self._drive(self.caller, True)
        finally:
            if self.first_slot is not None:
                zero_bubble.discard(self.first_slot, (self.last + 1) * self.count)
            # Each micro-batch refers to this step: dropping the step's list of them leaves no
            # cycle, so what they hold (outputs, received activations) is freed with the caller's
            # last reference, not at the garbage collector's next pass.
            micro_batches, self.micro_batches = self.micro_batches, []
        if self.error is not None:
            raise self.error
        return micro_batches

    def _drive(self, wake: threading.Semaphore, caller: bool) -> None:
        """Runs the actions in this thread (whose semaphore is ``wake``) while it holds them. The
        caller's thread returns when the step ends or fails (once the other threads' forwards
        have stopped); a pooled one when it hands them on."""
        try:
            while self.error is None and self.next < len(self.actions):
                kind, stage, m = self.actions[self.next]
                self.next += 1
                if not self._act(kind, stage, self.micro_batches[m], wake, caller):
                    if not caller:
                        return
                    wake.acquire()  # until the actions, the step's end or its failure come back
        except BaseException as error:  # noqa: B036 - raised by the caller's thread, once all stopped
            if self.error is None:
                self.error = error
        if caller:
            if self.error is not None:
                self._abort()
        elif self.aborting:
            self.unwound.release()
        else:  # the step ended or failed here: the caller's thread takes over
            self.caller_waits = False
            self.caller.release()

    def _act(self, kind: int, stage: int, micro_batch: MicroBatch, wake: threading.Semaphore, caller: bool) -> bool:
        """Runs one action; False when it handed the actions to another thread."""
        started = self.recorder.now() if self.recorder is not None else 0.0
        if kind == zero_bubble.WEIGHT:
            zero_bubble.run_weight_gradients(zero_bubble.slot_of(self.first_slot, self.count, stage, micro_batch.index))
        elif kind:
            self._backward(stage, micro_batch, self.losses)
        elif micro_batch.done or (micro_batch.paused_at is not None and micro_batch.paused_at > stage):
            pass  # no module of ``stage`` was called on this micro-batch
        else:
            micro_batch.stage, micro_batch.started_at = stage, started
            if micro_batch.wake is not None:  # paused in another thread: it runs on
                self.caller_waits = caller
                micro_batch.wake.release()
                return False
            micro_batch.run(wake)
            return True
        if self.recorder is not None:
            self.recorder.record(kind, stage, micro_batch.index, started)
        return True

    def recorded(self, micro_batch: MicroBatch) -> None:
        """``micro_batch``'s forward paused or ended: its F action ended."""
        if self.recorder is not None:
            self.recorder.record(0, micro_batch.stage, micro_batch.index, micro_batch.started_at)

    def hand_on(self) -> None:
        """The forward running paused: the caller's thread, when it waits for the actions, or a
        pooled one runs them on."""
        if self.caller_waits:
            self.caller_waits = False
            self.caller.release()
        else:
            _start_pooled(self._drive_pooled)

    def _drive_pooled(self, wake: threading.Semaphore) -> None:
        with contextlib.ExitStack() as stack:  # the caller's modes and thread count, for B and W
            self.state.enter(stack)
            self._drive(wake, False)

    def _abort(self) -> None:
        """Stops the forwards paused in other threads (each raises ``Aborted``) and waits for them."""
        self.aborting = True
        for micro_batch in self.micro_batches:
            if micro_batch.wake is not None and micro_batch.wake is not self.caller and not micro_batch.done:
                micro_batch.wake.release()
                self.unwound.acquire()

    def _backward(self, stage: int, micro_batch: MicroBatch, losses) -> None:
        roots, grads = [], []
        if stage == self.last:
            roots.append(losses[micro_batch.index])
            grads.append(None)
        for tensor, dst, key in micro_batch.sent:
            if key[2] == stage and tensor.requires_grad:
                roots.append(tensor)
                grads.append(self.transport.recv(dst, (GRADIENT,) + key[1:]))
        if roots:
            self.pipe.before_backward(stage, micro_batch.index == len(self.micro_batches) - 1)
            torch.autograd.backward(roots, grads)
        for leaf, src, key in micro_batch.received:
            if key[3] == stage and leaf.requires_grad:
                self.transport.send(src, (GRADIENT,) + key[1:],
                                    leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
