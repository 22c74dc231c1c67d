"""The cost model: a layout's step time and peak memory per rank from a ``CostTable``. Pure
arithmetic (Python for now: it runs once per candidate, thousands in a second); the bubble is not a
formula but the C++ schedule itself, replayed with each action's duration."""
from dataclasses import dataclass
from typing import Dict, List, Tuple

from torch_mp import _C
from torch_mp._planner.costs import CostTable

# ZB-H1 splits each backward into the input gradient (B) and the weight gradient (W); for the
# linear layers that dominate a block they cost about the same (Qi et al., ICLR 2024, section 2).
WEIGHT_SHARE = 0.5
# Activations a transformer layer saves that tensor parallelism does not divide without sequence
# parallelism: 10 of 34 bytes per token and hidden unit (Korthikanti et al., 2022, table 2).
REPLICATED_ACTIVATIONS = 10 / 34
# Schedules that run two stages on each rank (the pipeline's default for them): stage s on rank
# s % ranks for interleaved 1F1B, a V for ZB-V (rank r: stages r and 2 ranks - 1 - r).
TWO_STAGES_PER_RANK = ("interleaved_1f1b", "zbv")
ZERO_BUBBLE = ("zb_h1", "zbv")


@dataclass(frozen=True)
class Layout:
    """One candidate: the degrees, the schedule and its micro-batches (``chunks``), the checkpoint
    policy, sequence parallelism, the layer counts per stage (``balance``: ``pp`` entries, or
    ``2 pp`` for the schedules with two stages per rank, ``TWO_STAGES_PER_RANK``), the samples
    per step (``batch``, all data-parallel groups together) and ``fully_shard``: FSDP2 shards each
    stage's parameters over the ``dp`` replicas (``pipeline(..., fully_shard=True)``)."""
    pp: int
    tp: int
    dp: int
    schedule: str
    chunks: int
    checkpoint: str
    sequence_parallel: bool
    balance: Tuple[int, ...]
    batch: int
    fully_shard: bool = False

    @property
    def rows(self) -> float:
        """Samples per micro-batch on one data-parallel group."""
        return self.batch / self.dp / self.chunks

    @property
    def stages_per_rank(self) -> int:
        """Stages on each pipeline rank: ``len(balance) // pp``."""
        return len(self.balance) // self.pp

    def stage_ranks(self) -> List[int]:
        """The pipeline rank of each stage (``_C._pipeline_stage_ranks``, as the pipeline places them)."""
        return list(_C._pipeline_stage_ranks(self.schedule, self.pp, self.stages_per_rank)) \
            if self.stages_per_rank > 1 else list(range(self.pp))


def stage_layers(balance: Tuple[int, ...]) -> List[range]:
    start, ranges = 0, []
    for count in balance:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def _activations(costs: CostTable, layers: range, rows: float, layout: Layout) -> float:
    """Bytes one micro-batch of ``rows`` leaves saved in a stage's layers."""
    saved = sum(costs.activation_bytes[i] for i in layers) * rows
    if layout.tp == 1:
        return saved
    if layout.sequence_parallel:
        return saved / layout.tp
    return saved * (REPLICATED_ACTIVATIONS + (1 - REPLICATED_ACTIVATIONS) / layout.tp)


def _params(costs: CostTable, layers: range, first: bool, last: bool, tp: int) -> float:
    total = sum(costs.param_bytes[i] for i in layers)
    sharded = sum(costs.sharded_param_bytes[i] for i in layers)
    if first:
        total, sharded = total + costs.first_param_bytes, sharded + costs.first_sharded_bytes
    if last:
        total, sharded = total + costs.last_param_bytes, sharded + costs.last_sharded_bytes
    if last and not first:  # a pipeline's last stage holds its own copy of a tied head
        total, sharded = total + costs.tied_param_bytes, sharded + costs.tied_sharded_bytes
    return total - sharded + sharded / tp


def _in_flight_at_rank_peaks(layout: Layout, stage_bytes: List[float]) -> List[int]:
    """For several stages per rank: the micro-batches each stage holds when its rank holds the most
    activations (``stage_bytes`` a micro-batch), replaying the rank's actions of the C++ schedule (a
    forward takes one micro-batch's, its input-gradient backward frees them)."""
    held = [0] * len(stage_bytes)
    for actions in _C._pipeline_schedule(layout.schedule, layout.pp, layout.stages_per_rank, layout.chunks):
        count: Dict[int, int] = {}
        best, best_bytes = {}, -1.0
        for kind, stage, _ in actions:
            if kind == 2:
                continue
            count[stage] = count.get(stage, 0) + (1 if kind == 0 else -1)
            total = sum(n * stage_bytes[s] for s, n in count.items())
            if total > best_bytes:
                best, best_bytes = dict(count), total
        for stage, n in best.items():
            held[stage] = n
    return held


def in_flight(layout: Layout, stage: int) -> int:
    """Micro-batches whose activations a stage holds at once: all of them under GPipe; under 1F1B
    and ZB-H1 the ones started before the first backward reaches it (``pp - stage``, at most
    ``chunks``)."""
    return layout.chunks if layout.schedule == "gpipe" else min(layout.chunks, layout.pp - stage)


@dataclass(frozen=True)
class StagePeak:
    """Predicted bytes one rank of a stage holds at its peak, by kind: ``parameters``, their
    ``gradients`` (those held at that moment: none where the peak comes before the first
    backward), the ``optimizer`` state, the ``flat`` gradients of the data-parallel all-reduce
    (and its result) and the ``activations`` (with the loss's gradients and the finished
    micro-batches' outputs and input gradients) held then."""
    parameters: int
    gradients: int
    optimizer: int
    flat: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.flat + self.activations


def stage_peaks(costs: CostTable, layout: Layout) -> List[StagePeak]:
    """Predicted peak per pipeline stage, by kind (each rank of that stage's tensor-parallel and
    data-parallel groups holds the same): the largest of the step's phases, each the sum of what
    is held then.

    Always held: the parameters and AdamW's two fp32 states. Phases:

    - a backward's start, before any gradient exists (the first backward): the activations of the
      micro-batches in flight (``in_flight``; with ``checkpoint="always"`` each one's stage input,
      and one micro-batch's saved tensors while it is recomputed), on the last stage with the
      loss's two gradients of the output (cross entropy: of the log-probabilities and of the
      logits, ``2 * output_bytes``);
    - the last micro-batch's backward start, the gradients all allocated: the parameters'
      gradients plus the activations in flight then (``in_flight`` where a forward runs after a
      backward, as in 1F1B's steady state; one fewer where all forwards ran first: GPipe, or
      ``chunks <= pp - stage``), the loss's gradients, and what the pipeline keeps of each
      finished micro-batch until the step ends: on the last stage its output
      (``output_bytes``), on every stage but the first the gradient of its received input
      (``boundary_bytes``);
    - with data parallelism, the all-reduce after the backwards: the gradients, the flattened
      copy it sends and its result (two copies of the gradients).

    With ``fully_shard`` (FSDP2 over the ``dp`` replicas, torchtitan's composition) each rank
    stores 1/dp of its stage's parameters and of their optimizer state (a tied head's stays whole),
    and holds them all-gathered from its first forward to its last backward (each layer is its own
    FSDP2 root, which keeps its parameters after its forward, and the pipeline reshards them only
    in the last micro-batch's backward), with their gradients unsharded until that backward
    reduce-scatters them; only the whole ones are all-reduced. (With ``fully_shard={
    "reshard_after_forward": True}`` a layer reshards after each forward: the first backward's
    phase holds less than predicted.)

    Tensor parallelism divides the layers' saved tensors (``_activations``); what is saved
    outside the layers (embedding output, final norm, the logits the column-parallel head
    gathers, the loss's log-probabilities) is held whole on every rank. With several stages per
    rank (interleaved 1F1B, ZB-V), each stage's in-flight count is the one it has when its rank
    holds the most (``_in_flight_at_rank_peaks``), so a rank's stages sum to its peak. Peaks of one stage's
    activations over a micro-batch: Korthikanti et al., 2022; 1F1B's in-flight count:
    Narayanan et al., 2021."""
    rows = layout.rows
    peaks = []
    ranges = stage_layers(layout.balance)
    ones = []
    for stage, layers in enumerate(ranges):
        one = _activations(costs, layers, rows, layout)
        if stage == len(ranges) - 1:
            one += costs.outside_activation_bytes * rows
        ones.append(one)
    at_peaks = _in_flight_at_rank_peaks(layout, ones) if layout.stages_per_rank > 1 else None
    for stage, layers in enumerate(ranges):
        first, last = stage == 0, stage == len(ranges) - 1
        params = _params(costs, layers, first, last, layout.tp)
        # fully_shard: 1/dp of what FSDP2 shards stored (not a tied head: whole on both ends), all of
        # it gathered through the step.
        gathered = params - (costs.tied_param_bytes if first or last else 0) if layout.fully_shard else 0.0
        stored = params - gathered + gathered / layout.dp
        optimizer = stored / costs.param_element_size * 8  # 2 x fp32
        held = in_flight(layout, stage) if at_peaks is None else at_peaks[stage]
        one = ones[stage]
        loss_gradients = finished = 0.0
        if last:
            loss_gradients = 2 * costs.output_bytes * rows
        if layout.pp > 1:
            finished = (layout.chunks - 1) * rows * ((costs.output_bytes if last else 0) +
                                                     (costs.boundary_bytes if stage > 0 else 0))
        if layout.checkpoint == "always":
            def activations(count):
                return count * costs.boundary_bytes * rows + one if count else 0.0
        else:
            def activations(count):
                return count * one
        steady = layout.schedule != "gpipe" and layout.chunks > held
        phases = [StagePeak(int(stored + gathered), 0, int(optimizer), 0, int(activations(held) + loss_gradients)),
                  StagePeak(int(stored + gathered), int(params), int(optimizer), 0,
                            int(activations(held if steady else held - 1) + loss_gradients + finished))]
        if layout.dp > 1:  # the flattened gradients and the all-reduce's result (FSDP2's: reduce-scattered)
            phases.append(StagePeak(int(stored), int(stored if layout.fully_shard else params), int(optimizer),
                                    int(2 * (params - gathered)), 0))
        peaks.append(max(phases, key=lambda peak: peak.total))
    return peaks


def peak_bytes(costs: CostTable, layout: Layout) -> List[int]:
    """Predicted peak bytes per pipeline rank: the sum of ``stage_peaks`` over its stages."""
    totals = [0] * layout.pp
    for rank, peak in zip(layout.stage_ranks(), stage_peaks(costs, layout)):
        totals[rank] += peak.total
    return totals


def stage_times(costs: CostTable, layout: Layout) -> Tuple[List[float], List[float], List[float]]:
    """Seconds of one micro-batch's forward, backward and (zero-bubble schedules) weight-gradient
    action per stage: the layers' compute divided by the tensor-parallel degree, plus its
    all-reduces of the layer outputs over the "tp" link (forward and backward alike), plus the
    recomputed forward under ``checkpoint="always"``; what runs outside the layers goes to the last stage."""
    rows = layout.rows
    forwards, backwards, weights = [], [], []
    for stage, layers in enumerate(stage_layers(layout.balance)):
        forward = sum(costs.forward[i].at(rows) for i in layers) / layout.tp
        backward = sum(costs.backward[i].at(rows) for i in layers) / layout.tp
        collectives = len(layers) * costs.all_reduces_per_layer * costs.all_reduce_s(
            costs.boundary_bytes * rows, layout.tp, "tp")
        forward += collectives
        backward += collectives
        if stage == len(layout.balance) - 1:
            forward += costs.outside_forward.at(rows) / layout.tp
            backward += costs.outside_backward.at(rows) / layout.tp
        if layout.checkpoint == "always":
            backward += forward
        weight = backward * WEIGHT_SHARE if layout.schedule in ZERO_BUBBLE else 0.0
        forwards.append(forward)
        backwards.append(backward - weight)
        weights.append(weight)
    return forwards, backwards, weights


def simulate(schedule: str, ranks: int, chunks: int, durations: Dict[int, List[float]], send_s: float) -> float:
    """Seconds from the first action to the last of the C++ schedule (``_C._pipeline_schedule``:
    the order every rank runs; ``len(durations[0]) // ranks`` stages per rank), each rank running
    its actions in order, each action starting once its rank is free and its input has arrived
    (``send_s`` after its producer on another rank ended): F(s, m) after F(s - 1, m); B(s, m) after
    B(s + 1, m), the last stage's after its F; W(s, m) after B(s, m). ``durations[kind][stage]``,
    kind 0 F, 1 B, 2 W."""
    per_rank = len(durations[0]) // ranks
    actions = _C._pipeline_schedule(schedule, ranks, per_rank, chunks)
    rank_of = _C._pipeline_stage_ranks(schedule, ranks, per_rank) if per_rank > 1 else list(range(ranks))
    stages = ranks * per_rank
    ended: Dict[Tuple[int, int, int], float] = {}
    position = [0] * ranks
    free = [0.0] * ranks
    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for rank in range(ranks):
            while position[rank] < len(actions[rank]):
                kind, stage, microbatch = actions[rank][position[rank]]
                if kind == 0:
                    producer = (0, stage - 1, microbatch) if stage > 0 else None
                elif kind == 1:
                    producer = (1, stage + 1, microbatch) if stage < stages - 1 else (0, stage, microbatch)
                else:
                    producer = (1, stage, microbatch)
                if producer is not None and producer not in ended:
                    break
                ready = 0.0 if producer is None else \
                    ended[producer] + (send_s if rank_of[producer[1]] != rank_of[stage] else 0.0)
                ended[(kind, stage, microbatch)] = max(free[rank], ready) + durations[kind][stage]
                free[rank] = ended[(kind, stage, microbatch)]
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"plan: the {schedule} schedule on {ranks} ranks with {chunks} micro-batches does not "
                               "progress in the simulation (a schedule the C++ check should have refused)")
    return max(free)


def step_seconds(costs: CostTable, layout: Layout) -> float:
    """Predicted seconds of one ``train_step``: the simulated schedule over the stage times (with a
    send of the stage output between ranks, over the "pp" link), then the data-parallel average of
    the largest rank's gradients (one ring all-reduce over the "dp" link)."""
    forwards, backwards, weights = stage_times(costs, layout)
    rows = layout.rows
    send = costs.send_s(costs.boundary_bytes * rows / (layout.tp if layout.sequence_parallel else 1)) \
        if layout.pp > 1 else 0.0
    if layout.pp == 1:
        compute = layout.chunks * (forwards[0] + backwards[0] + weights[0])
    else:
        compute = simulate(layout.schedule, layout.pp, layout.chunks, {0: forwards, 1: backwards, 2: weights}, send)
    ranges = stage_layers(layout.balance)
    held = [0.0] * layout.pp
    for rank, (stage, layers) in zip(layout.stage_ranks(), enumerate(ranges)):
        held[rank] += _params(costs, layers, stage == 0, stage == len(ranges) - 1, layout.tp)
    gradients = max(held)
    return compute + costs.all_reduce_s(gradients, layout.dp, "dp")
