"""Where a model's parameters and buffers live, and how many bytes each rank or device holds."""
from dataclasses import dataclass
import ctypes
import os
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from torch_mp._group import all_gather_rows, resolve_group
from torch_mp._pipelining.engine import THREAD_CONTEXTS
from torch_mp._checks import check_arg
from torch_mp._planner.costs import CostTable
from torch_mp._planner.model import Layout, StagePeak, stage_peaks
from torch_mp._tensors import tensors_in
from torch_mp._state import PIPELINE, SPLIT, TENSOR_PARALLEL, ParallelState, state_of
from torch_mp._tensor_parallel.dtensor import local_tensor


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@dataclass
class MemoryRow:
    where: str          # "rank 1", "stage 0 (cuda:0)", "cpu"
    parameters: int     # bytes
    buffers: int        # bytes
    modules: int        # placed or sharded modules there
    predicted: Optional[StagePeak] = None  # the planner's predicted peak (memory_report(costs=, sample=))

    @property
    def total(self) -> int:
        return self.parameters + self.buffers


@dataclass
class MemoryReport:
    title: str
    rows: List[MemoryRow]

    def __str__(self) -> str:
        model_total = sum(row.total for row in self.rows) or 1
        lines = [self.title, f"{'':<22} {'parameters':>12} {'buffers':>12} {'total':>12} {'share':>6} {'modules':>7}"]
        for row in self.rows:
            lines.append(f"{row.where:<22} {_mib(row.parameters):>12} {_mib(row.buffers):>12} {_mib(row.total):>12} "
                         f"{row.total / model_total:>6.1%} {row.modules:>7}")
        if any(row.predicted for row in self.rows):
            lines.append(f"{'predicted train_step':<22} {'gradients':>12} {'optimizer':>12} {'activations':>12} "
                         f"{'peak':>12}")
            for row in self.rows:
                peak = row.predicted
                lines.append(f"{row.where:<22} {_mib(peak.gradients):>12} {_mib(peak.optimizer):>12} "
                             f"{_mib(peak.activations + peak.flat):>12} {_mib(peak.total):>12}")
        return "\n".join(lines)

    def save_png(self, path: str, limits: Optional[Sequence[int]] = None) -> None:
        """A bar chart of the bytes per rank or device (needs matplotlib: pip install torch_mp[plot]).

        ``limits``: the most bytes each row's device may hold (``split``'s ``max_memory``), one per
        row in order, drawn as a red mark across its bar. Bars are parameters and buffers, each in
        the legend only when some row has bytes of it.

        Raises ValueError for ``limits`` of another length than the rows; ImportError without matplotlib.
        """
        if limits is not None and len(limits) != len(self.rows):
            raise ValueError(f"save_png: limits has {len(limits)} entries; expected one per row ({len(self.rows)}: "
                             f"{[row.where for row in self.rows]})")
        try:
            import matplotlib

            matplotlib.use("Agg")
            from matplotlib import pyplot
        except ImportError as error:
            raise ImportError("memory_report(png=...) needs matplotlib: pip install matplotlib "
                              "(or torch_mp[plot])") from error
        figure = self._figure(pyplot, limits)
        figure.savefig(path, dpi=100)
        pyplot.close(figure)

    def _figure(self, pyplot, limits: Optional[Sequence[int]]):
        labels = [row.where for row in self.rows]
        parameters = [row.parameters / 2**20 for row in self.rows]
        buffers = [row.buffers / 2**20 for row in self.rows]
        figure, axes = pyplot.subplots(figsize=(8, 1.2 + 0.5 * len(labels)))
        axes.barh(labels, parameters, label="parameters" if any(parameters) else None)
        axes.barh(labels, buffers, left=parameters, label="buffers" if any(buffers) else None)
        for y, limit in enumerate(limits or []):
            axes.plot([limit / 2**20] * 2, [y - 0.45, y + 0.45], color="red", linewidth=2,
                      label="limit (max_memory)" if y == 0 else None)
        for y, row in enumerate(self.rows):  # right of the bar and of its limit
            right = max(row.total, limits[y] if limits else 0)
            axes.text(right / 2**20, y, f" {_mib(row.total)}, {row.modules} modules", va="center", fontsize=8)
        largest = max([row.total for row in self.rows] + list(limits or []), default=1)
        axes.set_xlim(0, largest / 2**20 * 1.45)
        axes.invert_yaxis()
        axes.set_xlabel("MiB")
        axes.set_title(self.title)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        figure.tight_layout()
        return figure


def memory_report(module: nn.Module, png: Optional[str] = None, costs: Optional[CostTable] = None, sample=None,
                  optimizer: Optional[torch.optim.Optimizer] = None) -> MemoryReport:
    """Parameters and buffers per rank (a ``tensor_parallel`` or ``pipeline`` model; a collective:
    every rank calls it and gets the whole report; a pipeline rank counts what it holds, not the
    meta stand-ins of other ranks' stages, and FSDP2's shard of its stage's parameters under
    ``pipeline(..., fully_shard=True)``; a pipeline with replicas (``data_parallel=``) or over
    ``tensor_parallel`` has a row per rank of the default group, ``report.rows[rank]`` for the
    global ``rank``, a collective over that group), per stage (a ``split`` model) or per device
    (any other model).
    Each row counts bytes (``numel * element_size``; tied tensors once per stage); printing the
    report shows MiB and each row's share. ``png``: also save a bar chart there (matplotlib needed);
    ``report.save_png(path, limits=[bytes per row])`` draws each device's limit (``max_memory``) too.

    With ``costs`` (the dense model's ``CostTable``: ``torch_mp.plan(...).costs``, whose activation
    bytes per layer autograd's ``saved_tensors_hooks`` measured) and ``sample`` (one
    ``train_step``'s inputs on this rank, as it takes them: the whole batch for a model from
    ``torch_mp.parallelize``, this replica's rows for a pipeline's own; its first tensor's dim 0
    counts the samples), each row of a
    ``tensor_parallel`` or ``pipeline`` model also gets ``predicted``, the planner's peak of a
    ``train_step`` on that rank (``torch_mp._planner.model.stage_peaks`` for the model's schedule,
    micro-batches, checkpoint policy and degrees, the computation ``torch_mp.plan`` makes: the
    same figures as ``plan.chosen.peak_bytes`` for a ``parallelize``'d plan): the rank's actions
    replayed, the most held at the start of one of them or at the data-parallel all-reduce:
    parameters, gradients, optimizer state, activations in flight (under 1F1B ``pp - stage``
    micro-batches; Narayanan et al., 2021; under ZB-H1 and ZB-V part of them until the W) with the
    loss's gradients of the logits and the input gradients the pipeline keeps of finished micro-batches; under
    ``fully_shard=True``, 1/dp of the parameters FSDP2 shards and of their optimizer state, their
    all-gathered copies held through the step and their unsharded gradients. It counts tensors, as
    ``measure_peak`` does (CUDA's
    ``max_memory_allocated``); a CPU process's resident peak (``measure_peak(what="resident")``) is
    also raised by the pages glibc keeps of freed blocks (8-13 MiB on a tiny Llama's step). The optimizer state is AdamW's two fp32 copies without ``optimizer``;
    with one, its actual state tensors once it has stepped, else its kind's (Adam/AdamW: 2, 3 with
    amsgrad; SGD: 1 with momentum, else 0 per parameter byte). Compare with ``measure_peak``.

    Raises TypeError for a ``module`` that is not an ``nn.Module`` or ``costs`` that is not a
    ``CostTable``; ValueError for ``costs`` without ``sample`` (or the reverse), ``costs`` on a
    model that is neither tensor-parallel nor a pipeline, ``costs.layers`` that are not this
    model's, or an optimizer other than Adam, AdamW or SGD before its first step (all before any
    collective); ImportError for ``png`` without matplotlib; ``torch_mp.CollectiveError`` when a
    peer does not answer."""
    check_arg("memory_report", "module", module, nn.Module, "a torch.nn.Module")
    state = state_of(module)
    predicted = None
    if costs is not None or sample is not None:
        predicted = _predict(module, state, costs, sample, optimizer)
    if state is not None and state.kind == TENSOR_PARALLEL:
        report = _per_rank(module, state)
    elif state is not None and state.kind == PIPELINE:
        report = _per_pipeline_rank(module, state)
    elif state is not None and state.kind == SPLIT:
        report = _per_stage(module, state)
    else:
        report = _per_device(module)
    if predicted is not None:
        everyone = all_gather_rows(torch.tensor(predicted), _row_group(state), "torch_mp.memory_report").tolist()
        for row, parts in zip(report.rows, everyone):
            row.predicted = StagePeak(*parts)
    if png is not None:
        report.save_png(png)
    return report


def _predict(module: nn.Module, state: Optional[ParallelState], costs, sample, optimizer) -> List[int]:
    """This rank's predicted peak, by kind (``StagePeak``'s fields in order)."""
    if costs is None or sample is None:
        raise ValueError(f"memory_report: got costs={'None' if costs is None else 'a CostTable'} and sample="
                         f"{'None' if sample is None else 'inputs'}; expected both (the prediction needs the "
                         "dense model's cost table and one train_step's inputs) or neither")
    check_arg("memory_report", "costs", costs, CostTable, "a torch_mp.CostTable")
    if state is None or state.kind not in (TENSOR_PARALLEL, PIPELINE):
        raise ValueError(f"memory_report: costs= predicts the peak of a tensor_parallel or pipeline model; got a "
                         f"{'plain' if state is None else state.kind} {type(module).__name__}")
    tensors = tensors_in(sample)
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("memory_report: sample has no tensor with a batch dim; expected one train_step's inputs "
                         "whose first tensor's dim 0 counts the samples")
    rows = tensors[0].shape[0]
    if state.kind == TENSOR_PARALLEL:
        tp = resolve_group(state.group).size
        layout = Layout(1, tp, 1, "1f1b", 1, "never", "sequence_parallel" in state.plan.values(),
                        (len(costs.layers),), rows)
        mine = [0]
    else:
        pipe, inner = state.pipe, state.inner
        missing = [name for name in costs.layers if name not in state.stage_of]
        if missing:
            raise ValueError(f"memory_report: costs.layers {missing[:3]} are not layers of this pipeline; expected "
                             "the cost table of the model it was made from")
        balance = [0] * pipe.num_stages
        for name in costs.layers:
            balance[state.stage_of[name]] += 1
        tp = resolve_group(inner.group).size if inner is not None else 1
        dp = resolve_group(state.data_parallel).size if state.data_parallel is not None else 1
        # pp counts pipeline ranks: interleaved 1F1B and ZB-V hold two stages on each.
        # A parallelize'd model's train_step takes the whole batch (the layout torch_mp.plan costed);
        # a pipeline's own, this replica's rows.
        layout = Layout(pipe.num_stages // pipe.stages_per_rank, tp, dp, pipe.schedule, pipe.chunks, pipe.checkpoint,
                        inner is not None and "sequence_parallel" in inner.plan.values(), tuple(balance),
                        rows if state.whole_batch is not None else rows * dp, fully_shard=bool(pipe.fully_sharded))
        mine = pipe.local_stages()
    peaks = stage_peaks(costs, layout)
    parts = [sum(getattr(peaks[stage], field) for stage in mine)
             for field in ("parameters", "gradients", "optimizer", "flat", "activations")]
    if optimizer is not None:
        parts[2] = _optimizer_bytes(optimizer)
    return parts


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of the optimizer's state on this rank: its tensors once it has stepped, else its
    kind's copies of its (local, non-meta) parameters."""
    state = [t for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t) and not t.is_meta]
    if state:
        return _bytes(state)
    total = 0
    for group in optimizer.param_groups:
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            copies = 3 if group.get("amsgrad") else 2
        elif isinstance(optimizer, torch.optim.SGD):
            copies = 1 if group.get("momentum") else 0
        else:
            raise ValueError(f"memory_report: optimizer is a {type(optimizer).__name__} that has not stepped; "
                             "expected Adam, AdamW or SGD, or any optimizer after its first step (its state is "
                             "then counted)")
        total += copies * _bytes(p for p in group["params"] if not p.is_meta)
    return total


def measure_peak(fn: Callable, *args, device: Optional[torch.device] = None, what: str = "tensors",
                 **kwargs) -> Tuple[object, int]:
    """``(fn(*args, **kwargs), bytes)``: what ``fn`` returns and how many bytes the peak rose by
    while it ran (add the bytes held before it, such as parameters and optimizer state, for the peak
    ``memory_report(costs=, sample=)`` predicts).

    ``what="tensors"`` (the default) counts tensors, on either device the same way:

    - CUDA ``device``: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, less
      what was allocated before;
    - CPU (``device`` None or cpu): torch's CPU allocator keeps no peak, so a dispatch mode
      (``TorchDispatchMode``) follows every CPU tensor the ops of ``fn`` make (an op's outputs that
      alias no input: in-place results and views are not new memory; a DTensor by its local tensor),
      each storage once, from the op that makes it until it is freed, and every CPU storage resized
      while ``fn`` runs (``UntypedStorage.resize_``, replaced meanwhile: FSDP2 allocates and frees
      its all-gathered parameters so; a storage made before that shrinks lowers the count). It sees
      the ops of this thread, of autograd's CPU backward and of the threads a pipeline rank runs its
      actions on while a forward waits (two stages per rank: interleaved 1F1B, ZB-V); not tensors
      other threads make
      (``split``'s stage threads) nor an op's temporaries inside its kernel.

    ``what="resident"`` counts the process's memory instead: on CUDA ``max_memory_reserved`` (the
    caching allocator's segments); on the CPU the rise of the resident high-water mark (``VmHWM`` in
    ``/proc/self/status``, reset to the current resident size by writing ``5`` to
    ``/proc/self/clear_refs``; Linux only), with glibc told to give large blocks back when freed
    (its mmap threshold fixed for the rest of the process). It also counts Python's small
    allocations and the pages glibc keeps of freed blocks: 8-12 MiB above the tensors on a tiny
    Llama's ``train_step``.

    Raises ValueError for ``what`` other than "tensors" or "resident", and for ``what="resident"``
    on a CPU where ``/proc/self/clear_refs`` is missing (not Linux)."""
    if what not in ("tensors", "resident"):
        raise ValueError(f"measure_peak: what={what!r}; expected 'tensors' or 'resident'")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        allocated = what == "tensors"
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device) if allocated else torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) if allocated else torch.cuda.max_memory_reserved(device)
        return result, peak - start
    if what == "tensors":
        with _TensorPeak() as tracker:
            def enter():
                return tracker
            THREAD_CONTEXTS.append(enter)
            try:
                result = fn(*args, **kwargs)
            finally:
                THREAD_CONTEXTS.remove(enter)
        return result, tracker.peak
    if not os.path.exists("/proc/self/clear_refs"):
        raise ValueError(f"measure_peak: what='resident' on device={device} needs /proc/self/clear_refs (Linux) "
                         "to reset the process's peak; expected Linux, a CUDA device or what='tensors'")
    _return_freed_memory()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    start = _status_kib("VmRSS")
    result = fn(*args, **kwargs)
    return result, (_status_kib("VmHWM") - start) * 1024


class _TensorPeak(TorchDispatchMode):
    """The peak bytes of the CPU tensors that the ops run under it make and that are alive at once
    (``measure_peak(what="tensors")`` on the CPU), and of the storages resized while it is active
    (``UntypedStorage.resize_``: how FSDP2 allocates and frees its all-gathered parameters, which
    no op makes; a storage held before shrinking lowers the count)."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, int] = {}
        self.refs: Dict[int, object] = {}
        self.total = self.peak = 0
        self.resize = None

    def __enter__(self):
        self.resize = resize = torch.UntypedStorage.resize_

        def counted(storage, size):
            if storage.device.type != "cpu":  # meta and fake storages (no data pointer) among them
                return resize(storage, size)
            key, before = storage.data_ptr(), storage.nbytes()
            result = resize(storage, size)
            if key in self.live and self.refs[key]() is storage:
                self._freed(key)  # made under the mode: counted again below at its new size
                self._add_storage(storage)
            else:
                self.total += storage.nbytes() - before
                self.peak = max(self.peak, self.total)
            return result

        torch.UntypedStorage.resize_ = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self.resize
        return super().__exit__(*exc)

    def _freed(self, key: int) -> None:
        self.total -= self.live.pop(key)
        del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if not returns:
            return out
        outputs = (out,) if len(returns) == 1 else out
        for declared, value in zip(returns, outputs):
            if declared.alias_info is not None:  # a view or an in-place result: no new memory
                continue
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    self._add(local_tensor(tensor))
        return out

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cpu":
            self._add_storage(tensor.untyped_storage())

    def _add_storage(self, storage) -> None:
        key = storage.data_ptr()
        if not storage.nbytes() or key in self.live:
            return
        self.live[key] = storage.nbytes()
        reference = None

        def freed(_, key=key):
            if self.refs.get(key) is reference:  # not a storage resized since, now at another address
                self._freed(key)

        reference = weakref.ref(storage, freed)
        self.refs[key] = reference
        self.total += storage.nbytes()
        self.peak = max(self.peak, self.total)


def _return_freed_memory() -> None:
    """Makes glibc give every block of 128 KiB or more its own ``mmap`` (returned to the system when
    freed: ``M_MMAP_THRESHOLD`` fixed, which turns off glibc's threshold that grows to 32 MiB after such
    frees and keeps later blocks in the heap) and returns the heap's free pages (``malloc_trim``), so
    that the resident size follows the live tensors. Without glibc (musl), nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"measure_peak: /proc/self/status has no {field}")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _bytes(tensors) -> int:
    # A DTensor parameter (tensor_parallel) weighs its local shard.
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def _unique_tensors(module: nn.Module, seen: set, parameters: bool):
    tensors = module.parameters() if parameters else module.buffers()
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def _per_rank(module: nn.Module, state: ParallelState) -> MemoryReport:
    info = resolve_group(state.group)
    mine = torch.tensor([_bytes(module.parameters()), _bytes(module.buffers()), len(state.specs)])
    everyone = all_gather_rows(mine, state.group, "torch_mp.memory_report").tolist()
    rows = [MemoryRow(f"rank {rank}", *entry) for rank, entry in enumerate(everyone)]
    return MemoryReport(f"{type(module).__name__}: tensor parallel over {info.size} ranks", rows)


def _row_group(state: ParallelState):
    """The group with a row per rank: the default group for a pipeline with replicas or over
    tensor parallelism (its stages' ranks hold different shares), else the model's own group."""
    if state.kind == PIPELINE and (state.data_parallel is not None or state.inner is not None):
        return None
    return state.group


def _per_pipeline_rank(module: nn.Module, state: ParallelState) -> MemoryReport:
    pipe = state.pipe
    held = [[t for t in tensors if not t.is_meta] for tensors in (module.parameters(), module.buffers())]
    placed = sum(1 for name, stage in state.stage_of.items() if name and pipe.rank_of(stage) == pipe.rank)
    mine = torch.tensor([_bytes(held[0]), _bytes(held[1]), placed])
    everyone = all_gather_rows(mine, _row_group(state), "torch_mp.memory_report").tolist()
    rows = [MemoryRow(f"rank {rank}", *entry) for rank, entry in enumerate(everyone)]
    return MemoryReport(f"{type(module).__name__}: pipeline over {pipe.world} ranks"
                        + (f", {len(rows)} ranks in all" if len(rows) != pipe.world else ""), rows)


def _per_stage(module: nn.Module, state: ParallelState) -> MemoryReport:
    rows: Dict[int, MemoryRow] = {}
    seen: set = set()
    for name, device in state.device_map.items():
        stage = state.stage_of.get(name, 0)
        row = rows.setdefault(stage, MemoryRow(f"stage {stage} ({device})", 0, 0, 0))
        placed = module.get_submodule(name)
        row.parameters += _bytes(_unique_tensors(placed, seen, parameters=True))
        row.buffers += _bytes(_unique_tensors(placed, seen, parameters=False))
        row.modules += 1
    return MemoryReport(f"{type(module).__name__}: split into {len(rows)} stages",
                        [rows[stage] for stage in sorted(rows)])


def _per_device(module: nn.Module) -> MemoryReport:
    rows: Dict[str, MemoryRow] = {}
    for parameters in (True, False):
        for tensor in (module.parameters() if parameters else module.buffers()):
            row = rows.setdefault(str(tensor.device), MemoryRow(str(tensor.device), 0, 0, 0))
            nbytes = tensor.numel() * tensor.element_size()
            if parameters:
                row.parameters += nbytes
            else:
                row.buffers += nbytes
    return MemoryReport(f"{type(module).__name__}: {len(rows)} device(s)", list(rows.values()))
