"""``torch_mp.plan``: every layout of the world's ranks, costed, the fastest that fits chosen."""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from torch import nn

from torch_mp import _C
from torch_mp._pipelining.cut import UNLIMITED, MemoryLike, parse_bytes
from torch_mp._planner.costs import CostTable, measure_costs
from torch_mp._planner.model import Layout, peak_bytes, step_seconds

SCHEDULES = ("gpipe", "1f1b", "zb_h1")
CHECKPOINTS = ("never", "always")


@dataclass(frozen=True)
class Candidate:
    """A layout with its predicted ``step_s`` (seconds per ``train_step``) and ``peak_bytes`` per
    pipeline stage (every rank of a stage holds the same), and why it was not chosen ("" for the
    pick)."""
    layout: Layout
    step_s: float
    peak_bytes: Tuple[int, ...]
    reason: str = ""

    @property
    def peak(self) -> int:
        return max(self.peak_bytes)


def _size(nbytes: float) -> str:
    if nbytes >= 2**30 / 10:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 * 10 else f"{nbytes / 2**20:.3f} MiB"


@dataclass(frozen=True)
class Plan:
    """The planner's answer: the chosen layout (``pp``, ``tp``, ``dp``, ``ep``, ``schedule``,
    ``chunks``, ``checkpoint``, ``sequence_parallel``, ``balance``) with its predicted step time
    (``step_s``, seconds) and peak bytes per rank (``peak_bytes``), the ``alternatives`` that fit
    (slower, ranked), the ``rejected`` ones that do not fit (ranked by the memory they need), and the
    ``costs`` it was computed from. ``print(plan)`` shows them as a table: the pick, then up to 7
    faster-ranked alternatives ("slower by x%") and the 4 rejected layouts that need the least
    memory ("does not fit (needs X)"). Comparable with ``==`` (a plan is a pure function of the cost
    table and the arguments) and picklable, so one rank can plan and send it to the others.

    Raises ``dataclasses.FrozenInstanceError`` on assigning a field: make another plan instead.
    """
    world_size: int
    device_memory: int
    batch: int
    chosen: Candidate
    alternatives: Tuple[Candidate, ...]
    rejected: Tuple[Candidate, ...]
    costs: CostTable

    @property
    def pp(self) -> int:
        return self.chosen.layout.pp

    @property
    def tp(self) -> int:
        return self.chosen.layout.tp

    @property
    def dp(self) -> int:
        return self.chosen.layout.dp

    @property
    def schedule(self) -> str:
        return self.chosen.layout.schedule

    @property
    def chunks(self) -> int:
        return self.chosen.layout.chunks

    @property
    def checkpoint(self) -> str:
        return self.chosen.layout.checkpoint

    @property
    def sequence_parallel(self) -> bool:
        return self.chosen.layout.sequence_parallel

    @property
    def balance(self) -> Tuple[int, ...]:
        return self.chosen.layout.balance

    @property
    def ep(self) -> int:
        """Expert-parallel degree: the experts are cut over each stage's tensor-parallel group."""
        return self.chosen.layout.tp if self.costs.experts else 1

    @property
    def step_s(self) -> float:
        return self.chosen.step_s

    @property
    def peak_bytes(self) -> int:
        return self.chosen.peak

    def __str__(self) -> str:
        c = self.chosen.layout
        lines = [f"torch_mp.plan: {self.world_size} ranks, {_size(self.device_memory)} each, batch {self.batch}",
                 f"chosen: pp {c.pp} x tp {c.tp} x dp {c.dp}" + (f" (ep {self.ep})" if self.costs.experts else "") +
                 f", {c.schedule if c.pp > 1 else 'no pipeline'}, {c.chunks} micro-batch{'es' if c.chunks > 1 else ''}, checkpoint {c.checkpoint}, "
                 f"sequence parallel {'on' if c.sequence_parallel else 'off'}, layers per stage {list(c.balance)}",
                 f"predicted: {self.step_s * 1e3:.1f} ms per step, peak {_size(self.peak_bytes)} per rank",
                 "",
                 f"{'#':>3} {'pp':>2} {'tp':>2} {'dp':>2} {'schedule':<8} {'M':>2} {'ckpt':<6} {'sp':<3} "
                 f"{'step ms':>8} {'peak':>10}  verdict"]
        shown = [self.chosen] + list(self.alternatives[:7]) + list(self.rejected[:4])
        for i, candidate in enumerate(shown):
            layout = candidate.layout
            lines.append(f"{i:>3} {layout.pp:>2} {layout.tp:>2} {layout.dp:>2} "
                         f"{layout.schedule if layout.pp > 1 else '-':<8} {layout.chunks:>2} {layout.checkpoint:<6} "
                         f"{'on' if layout.sequence_parallel else 'off':<3} {candidate.step_s * 1e3:>8.1f} "
                         f"{_size(candidate.peak):>10}  {candidate.reason or 'chosen'}")
        hidden = len(self.alternatives) + len(self.rejected) + 1 - len(shown)
        if hidden:
            lines.append(f"    ... {hidden} more ({len(self.alternatives)} fit in all, {len(self.rejected)} do not)")
        return "\n".join(lines)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(costs: CostTable, world_size: int, batch: int, schedules: Sequence[str] = SCHEDULES,
            max_chunks: int = 8, checkpoints: Sequence[str] = CHECKPOINTS) -> List[Layout]:
    """Every layout the library can run: pp x tp x dp = ``world_size``; pp at most the layers;
    tp dividing every count in ``costs.tp_must_divide`` (heads, key-value heads, experts); dp
    dividing the batch and the micro-batches (up to ``max_chunks``) each group's rows; sequence
    parallel only with tp > 1 and no experts; a schedule only with a pipeline (pp > 1; without one
    the micro-batches run one after the other, "1f1b" in the layout). Each pipeline's stages are
    balanced by measured forward+backward time (``_C._balance_by_size``, as ``balance="time"``)."""
    count = len(costs.layers)
    layer_time = [max(1, int((f.at(1) + b.at(1)) * 1e6)) for f, b in zip(costs.forward, costs.backward)]
    found = []
    for pp in _divisors(world_size):
        if pp > count:
            continue
        balance = tuple(_C._balance_by_size(layer_time, [UNLIMITED] * pp))
        for tp in _divisors(world_size // pp):
            if any(n % tp for n in costs.tp_must_divide):
                continue
            dp = world_size // pp // tp
            if batch % dp:
                continue
            for chunks in [m for m in _divisors(batch // dp) if m <= max_chunks]:
                for schedule in (schedules if pp > 1 else ("1f1b",)):
                    for checkpoint in checkpoints:
                        for sp in ((False, True) if tp > 1 and costs.sequence_parallel else (False,)):
                            found.append(Layout(pp, tp, dp, schedule, chunks, checkpoint, sp, balance, batch))
    return found


def _rank_key(candidate: Candidate):
    layout = candidate.layout
    return (round(candidate.step_s, 9), candidate.peak, layout.pp, layout.tp, layout.chunks,
            layout.schedule, layout.checkpoint, layout.sequence_parallel)


def plan(model: nn.Module, world_size: int, device_memory: MemoryLike, batch: int, sample=None,
         costs: Optional[CostTable] = None, group=None, layers: Optional[Sequence[str]] = None,
         schedules: Sequence[str] = SCHEDULES, max_chunks: int = 8,
         collectives: Optional[Tuple[float, float]] = None) -> Plan:
    """Picks the parallel layout of ``model`` for ``world_size`` ranks of ``device_memory`` each
    (bytes, or a string such as ``"80GiB"`` as for ``max_memory``) and ``batch`` samples per step.

    The cost model (``torch_mp._planner``): each layer's forward and backward time measured on
    ``sample`` (inputs as for ``pipeline(balance="time")``: a tuple or a dict; its dim 0 the
    samples) and on its first row, a line in the rows per micro-batch; all-reduces and sends from an
    alpha-beta fit over ``group`` (every rank of it calls ``plan`` together: the default group when
    torch.distributed is initialized; all get the same table and plan); memory per rank from the
    parameters, their gradients, AdamW's two fp32 states, the flattened gradients the data-parallel
    average sends and the activations autograd saves, times the micro-batches in flight (GPipe:
    all; 1F1B: up to the stages), tensor parallel dividing matrices and (with sequence parallel
    all, else 24/34 of, Korthikanti et al. 2022) the activations; the pipeline bubble by replaying
    the C++ schedule with each action's duration. ``costs=``: a ``CostTable`` to plan from instead
    of measuring (the plan is then a pure function of its arguments). ``collectives``:
    ``(alpha_s, beta_s_per_byte)`` of the link instead of fitting them over ``group`` (for planning
    on one process for a cluster). ``layers``: the blocks to cut between (as for ``pipeline``);
    ``schedules``: the pipeline schedules to consider; ``max_chunks``: the most micro-batches. Candidates are ranked by
    predicted step time, ties by peak memory, then by the layout; those whose peak exceeds
    ``device_memory`` are rejected ("does not fit (needs X)"), the others listed as "slower by x%".
    After Alpa (Zheng et al., OSDI 2022) and Megatron-LM's rules of thumb (Narayanan et al., 2021),
    with a search small enough to enumerate.

    Returns a ``Plan``; apply it with ``torch_mp.parallelize(model, plan)``.

    Raises TypeError/ValueError naming the argument for a ``world_size`` or ``batch`` that is not
    an int >= 1 or a ``device_memory`` that is not a size; ValueError without ``sample`` or
    ``costs``, for a schedule outside ("gpipe", "1f1b", "zb_h1"), and when no layout fits,
    naming the smallest ``device_memory`` one would need.
    """
    for name, value in (("world_size", world_size), ("batch", batch), ("max_chunks", max_chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan: {name} = {value!r}; expected an int >= 1")
    memory = parse_bytes(device_memory, "device_memory")
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown or not schedules:
        raise ValueError(f"plan: schedules = {list(schedules)!r}; expected some of {list(SCHEDULES)}")
    if costs is None:
        if sample is None:
            raise ValueError("plan: sample = None and costs = None; expected sample= (inputs to time the layers on, "
                             "a tuple or a dict) or costs= (a CostTable)")
        costs = measure_costs(model, sample, group, list(layers) if layers is not None else None, collectives)
    elif not isinstance(costs, CostTable):
        raise TypeError(f"plan: costs is a {type(costs).__name__}; expected a torch_mp CostTable")
    candidates = sorted((Candidate(layout, step_seconds(costs, layout), tuple(peak_bytes(costs, layout)))
                         for layout in layouts(costs, world_size, batch, schedules, max_chunks)), key=_rank_key)
    if not candidates:
        raise ValueError(f"plan: no layout of {type(model).__name__} runs on world_size = {world_size} with batch = "
                         f"{batch} (tp must divide {list(costs.tp_must_divide)}, pp at most {len(costs.layers)} "
                         "layers, dp must divide the batch)")
    fitting = [c for c in candidates if c.peak <= memory]
    if not fitting:
        smallest = min(candidates, key=lambda c: (c.peak, _rank_key(c)))
        lay = smallest.layout
        raise ValueError(f"plan: device_memory = {_size(memory)} ({memory} bytes) fits no layout of "
                         f"{type(model).__name__} on {world_size} ranks with batch {batch}; the smallest needs "
                         f"{_size(smallest.peak)} ({smallest.peak} bytes: pp {lay.pp} x tp {lay.tp} x dp {lay.dp}, "
                         f"{lay.chunks} micro-batches, checkpoint {lay.checkpoint}); expected device_memory >= that")
    best = fitting[0]
    alternatives = tuple(Candidate(c.layout, c.step_s, c.peak_bytes,
                                   f"slower by {(c.step_s / best.step_s - 1) * 100:.0f}%") for c in fitting[1:])
    rejected = tuple(sorted((Candidate(c.layout, c.step_s, c.peak_bytes, f"does not fit (needs {_size(c.peak)})")
                             for c in candidates if c.peak > memory), key=lambda c: (c.peak, _rank_key(c))))
    return Plan(world_size, memory, batch, best, alternatives, rejected, costs)
