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
# The share of a micro-batch's saved layer activations that a zero-bubble B leaves to its W (the
# linears' inputs, which the deferred weight gradients read): measured on the benchmark's Llama at
# pp 4, ZB-H1 held a third of a block's saved bytes per pending W more than 1F1B (0.9 MiB on its
# third rank, 2.9 on its last with the head's output gradients).
WEIGHT_HELD = 1 / 3
# A backward that adds to existing gradients computes each weight's gradient before adding it to
# ``.grad`` (autograd's AccumulateGrad; a zero-bubble W likewise): the share of a stage's largest
# layer (or its embedding, or its head) whose gradients are in flight at once, measured on the
# test's Llama (2.25 MiB above the activations in a second backward, a block of 3.75 MiB).
ACCUMULATED = 0.5


@dataclass(frozen=True)
class Layout:
    """One candidate: the degrees, the schedule and its micro-batches (``chunks``), the checkpoint
    policy, sequence parallelism, the layer counts per stage (``balance``: ``pp`` entries, or
    ``2 pp`` for the schedules with two stages per rank, ``TWO_STAGES_PER_RANK``) and the samples
    per step (``batch``, all data-parallel groups together)."""
    pp: int
    tp: int
    dp: int
    schedule: str
    chunks: int
    checkpoint: str
    sequence_parallel: bool
    balance: Tuple[int, ...]
    batch: int

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
    return total - sharded + sharded / tp


def _actions(layout: Layout) -> List[List[Tuple[int, int, int]]]:
    """Each pipeline rank's actions in order, ``(kind, stage, micro-batch)`` (kind 0 F, 1 B, 2 W):
    the C++ schedule's (``_C._pipeline_schedule``); without a pipeline, each micro-batch's forward
    then its backward."""
    if layout.pp == 1:
        return [[(kind, 0, m) for m in range(layout.chunks) for kind in (0, 1)]]
    return [list(a) for a in _C._pipeline_schedule(layout.schedule, layout.pp, layout.stages_per_rank, layout.chunks)]


@dataclass(frozen=True)
class StagePeak:
    """Predicted bytes one rank of a stage holds at its rank's peak, by kind: ``parameters``,
    their ``gradients`` (those held at that moment: none before the stage's first backward), the
    ``optimizer`` state, the ``flat`` gradients of the data-parallel all-reduce (and its result)
    and the ``activations`` (with the loss's gradients, the zero-bubble schedules' pending weight
    gradients' inputs and the finished micro-batches' outputs and input gradients) held then."""
    parameters: int
    gradients: int
    optimizer: int
    flat: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.flat + self.activations


def stage_peaks(costs: CostTable, layout: Layout) -> List[StagePeak]:
    """Predicted bytes per pipeline stage at its rank's peak, by kind (each rank of that stage's
    tensor-parallel and data-parallel groups holds the same); a rank's stages sum to its peak.

    Always held: the parameters and AdamW's two fp32 states. The rank's actions (``_actions``:
    the C++ schedule, which every rank runs in order) are replayed, and the peak is the largest
    of what is held at the start of each action and of the data-parallel all-reduce:

    - a forward adds one micro-batch's saved tensors of the stage (``_activations``; on the last
      stage also what is saved outside the layers; with ``checkpoint="always"`` only the stage
      input, ``boundary_bytes``); its backward (B) frees them;
    - under the zero-bubble schedules (ZB-H1, ZB-V) B leaves ``WEIGHT_HELD`` of a micro-batch's
      layer activations (the linears' inputs), and on the last stage the head's output gradient
      (``output_bytes``), to its weight-gradient action (W), which frees them (nothing under
      ``checkpoint="always"``: the recomputed linears' B computes their weight gradients);
    - a B (or W) that adds to the stage's existing gradients: ``ACCUMULATED`` of its largest
      layer's (or embedding's, or head's) parameter bytes;
    - at a B: the loss's two gradients of the output on the last stage (cross entropy: of the
      log-probabilities and of the logits, ``2 * output_bytes``), and under checkpointing the
      micro-batch's saved tensors, recomputed;
    - a stage's gradients exist from its first B on;
    - what the pipeline keeps of each finished micro-batch until the step ends: on the last
      stage its output (``output_bytes``), on every stage but the first the gradient of its
      received input (``boundary_bytes``);
    - with data parallelism, the all-reduce after the backwards: every gradient of the rank, the
      flattened copy it sends and its result (two copies of the rank's gradients), and what is
      kept of every finished micro-batch (the step has not ended).

    Tensor parallelism divides the layers' saved tensors (``_activations``); what is saved
    outside the layers (embedding output, final norm, the logits the column-parallel head
    gathers, the loss's log-probabilities) is held whole on every rank. Peaks of one stage's
    activations over a micro-batch: Korthikanti et al., 2022; 1F1B's in-flight count (``pp -
    stage``): Narayanan et al., 2021; the B/W split: Qi et al., 2024."""
    rows = layout.rows
    ranges = stage_layers(layout.balance)
    last = len(ranges) - 1
    params = [_params(costs, layers, s == 0, s == last, layout.tp) for s, layers in enumerate(ranges)]
    layer_part = [_activations(costs, layers, rows, layout) for layers in ranges]
    one = [part + (costs.outside_activation_bytes * rows if s == last else 0.0) for s, part in enumerate(layer_part)]
    kept = one if layout.checkpoint != "always" else [costs.boundary_bytes * rows] * len(ranges)
    zero_bubble = layout.schedule in ZERO_BUBBLE and layout.pp > 1
    # A recomputed stage's linears run outside the stage's forward: their B computes the weight
    # gradients (zero_bubble._defers), and W keeps nothing.
    pending = [0.0 if layout.checkpoint == "always" else WEIGHT_HELD * part + (costs.output_bytes * rows if s == last
                                                                               else 0.0)
               for s, part in enumerate(layer_part)]
    finished = [rows * ((costs.output_bytes if s == last else 0.0) + (costs.boundary_bytes if s > 0 else 0.0))
                for s in range(len(ranges))]
    widest = [max([_params(costs, range(i, i + 1), False, False, layout.tp) for i in layers] +
                  [_params(costs, range(0), s == 0, s == last, layout.tp)]) for s, layers in enumerate(ranges)]
    stage_ranks = layout.stage_ranks()
    peaks: List[StagePeak] = [StagePeak(0, 0, 0, 0, 0)] * len(ranges)
    for rank, actions in enumerate(_actions(layout)):
        mine = [s for s, owner in enumerate(stage_ranks) if owner == rank]
        forwarded = {s: 0 for s in mine}
        waiting = {s: 0 for s in mine}
        done = {s: 0 for s in mine}
        graded = {s: False for s in mine}

        def held(kind: int, stage: int) -> Dict[int, Tuple[float, float]]:
            """{stage: (gradient bytes, activation bytes)} at the start of the action."""
            now = {}
            for s in mine:
                activations = forwarded[s] * kept[s] + waiting[s] * pending[s] + done[s] * finished[s]
                if kind == 1 and s == stage:
                    activations += (2 * costs.output_bytes * rows if s == last else 0.0) + \
                        (one[s] if layout.checkpoint == "always" else 0.0)
                if s == stage and graded[s] and kind != 0:
                    activations += ACCUMULATED * widest[s]
                now[s] = (params[s] if graded[s] else 0.0, activations)
            return now

        best, best_total = None, -1.0
        for kind, stage, _ in actions:
            now = held(kind, stage)
            total = sum(g + a for g, a in now.values())
            if total > best_total:
                best, best_total = now, total
            if kind == 0:
                forwarded[stage] += 1
            elif kind == 1:
                forwarded[stage] -= 1
                done[stage] += 1
                waiting[stage] += zero_bubble
                graded[stage] = True
            else:
                waiting[stage] -= 1
        everything = sum(params[s] for s in mine)
        outputs = {s: layout.chunks * finished[s] for s in mine}
        flat = layout.dp > 1 and 3 * everything + sum(outputs.values()) > best_total
        for s in mine:
            optimizer = params[s] / costs.param_element_size * 8  # 2 x fp32
            if flat:
                peaks[s] = StagePeak(int(params[s]), int(params[s]), int(optimizer), int(2 * params[s]), int(outputs[s]))
            else:
                peaks[s] = StagePeak(int(params[s]), int(best[s][0]), int(optimizer), 0, int(best[s][1]))
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
