"""``torch_mp.plan``: every layout of the world's ranks, costed, the fastest that fits chosen. The
enumeration, the ranking and the verdicts are C++ (``torch_mp::planner::search``, the one
``torch_mp::plan`` runs too); measuring the cost table and ``measure=`` stay here."""
import functools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch.distributed as dist
from torch import nn

from torch_mp import _C
from torch_mp._pipelining.cut import MemoryLike, parse_bytes
from torch_mp._tensors import map_tensors
from torch_mp._planner.apply import measure_steps
from torch_mp._planner.costs import Collectives, CostTable, measure_costs, with_links
from torch_mp._planner.model import Layout
from torch_mp._planner.plans import Candidate, Plan

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv")
CHECKPOINTS = ("never", "always")


def layouts(costs: CostTable, world_size: int, batch: int, schedules: Sequence[str] = SCHEDULES,
            max_chunks: int = 8, checkpoints: Sequence[str] = CHECKPOINTS) -> List[Layout]:
    """Every layout the library can run (``torch_mp::planner::layouts``): pp x tp x dp =
    ``world_size``; the stages (pp, or 2 pp for interleaved 1F1B and ZB-V) at most the layers;
    tp dividing every count in ``costs.tp_must_divide`` (heads, key-value heads, experts); dp
    dividing the batch and the micro-batches (up to ``max_chunks``) each group's rows; sequence
    parallel only with tp > 1 and no experts; a schedule only with a pipeline (pp > 1; without one
    the micro-batches run one after the other, "1f1b" in the layout); checkpoint "never" and
    "always" (recompute) with any degrees. Each pipeline's stages are
    balanced by measured forward+backward time (``_C._balance_by_size``, as ``balance="time"``)."""
    return [Layout(*fields) for fields in _C._plan_layouts(costs, world_size, batch, list(schedules), max_chunks,
                                                            list(checkpoints))]


def _candidate(fields, suffix: str = "") -> Candidate:
    layout, step_s, peaks, reason = fields
    return Candidate(Layout(*layout), step_s, peaks, reason + suffix)


def plan(model: nn.Module, world_size: int, device_memory: MemoryLike, batch: int, sample=None,
         costs: Optional[CostTable] = None, group=None, layers: Optional[Sequence[str]] = None,
         schedules: Sequence[str] = SCHEDULES, max_chunks: int = 8,
         collectives: Optional[Collectives] = None, measure: Union[bool, int] = False,
         loss_fn: Optional[Callable] = None, target=None) -> Plan:
    """Picks the parallel layout of ``model`` for ``world_size`` ranks of ``device_memory`` each
    (bytes, or a string such as ``"80GiB"`` as for ``max_memory``) and ``batch`` samples per step.

    The cost model (``torch_mp._planner``): each layer's forward and backward time measured on
    ``sample`` (inputs as for ``pipeline(balance="time")``: a tuple or a dict; its dim 0 the
    samples) and on its first row, a line in the rows per micro-batch; all-reduces and sends from an
    alpha-beta fit per mesh dim, each on its own group of ``group`` (every rank of it calls ``plan``
    together: the default group when torch.distributed is initialized, or an ``init_mesh``
    DeviceMesh; all get the same table and plan): "tp" and "dp" by all-reduces, "pp" by sends
    between neighbours (``torch_mp._planner.costs.fit_links``); memory per rank from the
    parameters, their gradients, AdamW's two fp32 states, the flattened gradients the data-parallel
    average sends and the activations autograd saves, held as each pipeline rank's actions in the
    C++ schedule replay them (a forward to its backward; under ZB-H1 and ZB-V part of them to the
    weight-gradient action), tensor parallel dividing matrices and (with sequence parallel
    all, else 24/34 of, Korthikanti et al. 2022) the activations; the pipeline bubble by replaying
    the C++ schedule with each action's duration. ``costs=``: a ``CostTable`` to plan from instead
    of measuring (the plan is then a pure function of its arguments). ``collectives``:
    ``(alpha_s, beta_s_per_byte)`` of the link instead of fitting them over ``group`` (for planning
    on one process for a cluster), or a dict of them by mesh dim, ``{"tp": ..., "dp": ...,
    "pp": ...}`` (tensor parallel's all-reduces, data parallel's gradient average, the pipeline's
    sends: within a node and across nodes are different links; a dim left out gets its fit). A
    ``costs=`` table holds them as ``tp_link``, ``dp_link``, ``pp_link``; ``collectives`` with ``costs=`` replaces those it names. ``layers``:
    the blocks to cut between (as for ``pipeline``); ``schedules``: the pipeline schedules to
    consider (those of ``pipeline``); ``max_chunks``: the most micro-batches. Candidates are ranked by
    predicted step time, ties by peak memory, then by the layout; those whose peak exceeds
    ``device_memory`` are rejected ("does not fit (needs X)"), the others listed as "slower by x%".
    After Alpa (Zheng et al., OSDI 2022) and Megatron-LM's rules of thumb (Narayanan et al., 2021),
    with a search small enough to enumerate.

    ``measure``: True (3) or a count: run that many of the best-ranked layouts that fit for a few
    steps each (every rank of the default group calls ``plan``; each layout applied to a deep copy
    of ``model``, on ``sample`` tiled to ``batch`` rows, with ``loss_fn`` and ``target``, tiled
    likewise when it has the sample's rows) and keep the fastest measured; ``plan.measured`` holds
    their seconds.

    Returns a ``Plan``; apply it with ``torch_mp.parallelize(model, plan)``.

    Raises TypeError/ValueError naming the argument for a ``world_size`` or ``batch`` that is not
    an int >= 1, a ``device_memory`` that is not a size or ``collectives`` of another form;
    ValueError without ``sample`` or ``costs``, for a schedule outside ("gpipe", "1f1b",
    "interleaved_1f1b", "zb_h1", "zbv"), and when no layout fits, naming the smallest
    ``device_memory`` one would need, and for a DeviceMesh ``group`` that does not span the world;
    with ``measure``, ValueError without
    ``loss_fn`` or ``sample``, or when torch.distributed's world is not ``world_size`` (before any
    collective).
    """
    for name, value in (("world_size", world_size), ("batch", batch), ("max_chunks", max_chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan: {name} = {value!r}; expected an int >= 1")
    memory = parse_bytes(device_memory, "device_memory")
    trials = 3 if measure is True else 0 if measure is False else measure
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ValueError(f"plan: measure = {measure!r}; expected True, False or a count of layouts >= 0")
    if trials:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world != world_size or loss_fn is None or sample is None:
            raise ValueError(f"plan: measure = {measure!r} runs the layouts on this world ({world} ranks) with sample= "
                             f"and loss_fn=; expected world_size = {world} (got {world_size}), sample and loss_fn given "
                             f"(sample {'given' if sample is not None else 'None'}, loss_fn {loss_fn!r})")
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
    elif collectives is not None:
        costs = with_links(costs, collectives)
    search = functools.partial(_C._plan_search, costs, world_size, memory, batch, list(schedules), max_chunks,
                               type(model).__name__)
    chosen, alternatives, rejected = search()
    plan = Plan(world_size, memory, batch, _candidate(chosen), tuple(map(_candidate, alternatives)),
                tuple(map(_candidate, rejected)), costs)
    if not trials:
        return plan
    fitting = [plan.chosen, *plan.alternatives]
    tried = fitting[:trials]
    seconds = measure_steps(model, plan, tried, _tiled(sample, batch), _tiled(target, batch, _rows_of(sample)),
                            loss_fn)
    fastest = min(range(len(tried)), key=lambda i: (seconds[i], i))
    chosen, alternatives, rejected = search(fastest)
    # The alternatives in rank order without the chosen: fitting's indices but ``fastest``.
    others = [i for i in range(len(fitting)) if i != fastest]
    alternatives = tuple(_candidate(fields, f" (measured {seconds[i] * 1e3:.1f} ms)" if i < len(tried) else "")
                         for i, fields in zip(others, alternatives))
    return Plan(world_size, memory, batch, _candidate(chosen), alternatives, tuple(map(_candidate, rejected)), costs,
                tuple((c.layout, s) for c, s in zip(tried, seconds)))


def _rows_of(sample) -> int:
    found: list = []
    map_tensors(sample, lambda t: found.append(t.shape[0]) if t.dim() else None)
    return found[0] if found else 0


def _tiled(value, batch: int, rows: Optional[int] = None):
    """``value``'s tensors repeated along dim 0 to ``batch`` rows (those of ``rows`` rows, or all)."""
    def tile(t):
        if not t.dim() or (rows is not None and t.shape[0] != rows):
            return t
        return t.repeat(*([-(-batch // t.shape[0])] + [1] * (t.dim() - 1)))[:batch]
    if isinstance(value, dict):
        return {key: map_tensors(item, tile) for key, item in value.items()}
    if isinstance(value, tuple):
        raise ValueError("plan: measure= needs sample as a dict of keyword inputs (train_step's **inputs)")
    return map_tensors(value, tile)
