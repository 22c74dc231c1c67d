"""The cost model: a layout's step time and peak memory per rank from a ``CostTable``. The
arithmetic is C++ (``torch_mp/planner.h``: ``torch_mp::planner::stage_peaks``, ``step_seconds``,
...), the one implementation ``torch_mp::plan`` uses too, so the two plan alike; these wrappers pass
it Python's tables. The bubble is not a formula but the C++ schedule itself, replayed with each
action's duration."""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from torch_mp import _C
from torch_mp._planner.costs import CostTable


@dataclass(frozen=True)
class Layout:
    """One candidate: the degrees, the schedule and its micro-batches (``chunks``), the checkpoint
    policy, sequence parallelism, the layer counts per stage (``balance``: ``pp`` entries, or
    ``2 pp`` for the schedules with two stages per rank: interleaved 1F1B and ZB-V), the samples
    per step (``batch``, all data-parallel groups together) and ``fully_shard``: FSDP2 shards each
    stage's parameters over the ``dp`` replicas (``pipeline(..., fully_shard=True)``; costed, never
    proposed by the search). ``torch_mp::planner::Layout`` in C++."""
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


@dataclass(frozen=True)
class StagePeak:
    """Predicted bytes one rank of a stage holds at its rank's peak, by kind: ``parameters``,
    their ``gradients`` (those held at that moment: none before the stage's first backward), the
    ``optimizer`` state, the ``flat`` gradients of the data-parallel all-reduce (reduced in place)
    and the ``activations`` (with the loss's gradients, the zero-bubble schedules' pending weight
    gradients' inputs and the finished micro-batches' input gradients) held then."""
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
    tensor-parallel and data-parallel groups holds the same); a rank's stages sum to its peak
    (``torch_mp::planner::stage_peaks``).

    Always held: the parameters and AdamW's two fp32 states. The rank's actions (the C++
    schedule, which every rank runs in order; without a pipeline, each micro-batch's forward then
    its backward) are replayed, and the peak is the largest of what is held at the start of each
    action and of the data-parallel all-reduce:

    - a forward adds one micro-batch's saved tensors of the stage (on the last stage also what is
      saved outside the layers; with ``checkpoint="always"`` only the stage input,
      ``boundary_bytes``); its backward (B) frees them;
    - under the zero-bubble schedules (ZB-H1, ZB-V) B leaves a third of a micro-batch's layer
      activations (the linears' inputs, which the deferred weight gradients read: measured on
      the benchmark's Llama at pp 4), and on the last stage the head's output gradient
      (``output_bytes``), to its weight-gradient action (W), which frees them (nothing under
      ``checkpoint="always"``: the recomputed linears' B computes their weight gradients);
    - a B (or W) that adds to the stage's existing gradients: half of its largest layer's (or
      embedding's, or head's) parameter bytes (autograd computes each weight's gradient before
      adding it; measured on the test's Llama);
    - at a B: the loss's two gradients of the output on the last stage (cross entropy: of the
      log-probabilities and of the logits, ``2 * output_bytes``), and under checkpointing the
      micro-batch's saved tensors, recomputed;
    - a stage's gradients exist from its first B on;
    - the step's end: every gradient made (with one micro-batch the only backward makes them all
      while freeing the activations, more than were held at its start), with what is kept of the
      finished micro-batches (not under ``fully_shard``, whose last backward reshards);
    - what the pipeline keeps of each finished micro-batch until the step ends: on every stage
      but the first the gradient of its received input (``boundary_bytes``); the last stage's
      output is dropped once its loss is made;
    - with data parallelism, the all-reduce after the backwards: every gradient of the rank, the
      flattened copy it reduces in place (one copy of the rank's gradients), and what is
      kept of every finished micro-batch (the step has not ended).

    With ``fully_shard`` (FSDP2 over the ``dp`` replicas, torchtitan's composition) each rank
    stores 1/dp of its stage's parameters and of their optimizer state (a tied head's stays whole),
    and holds them all-gathered from its first forward to its last backward (each layer is its own
    FSDP2 root, which keeps its parameters after its forward, and the pipeline reshards them only
    in the last micro-batch's backward), with their gradients unsharded until that backward
    reduce-scatters them; only the whole ones are all-reduced. (With ``fully_shard={
    "reshard_after_forward": True}`` a layer reshards after each forward: less is held than
    predicted.)

    Tensor parallelism divides the layers' saved tensors (with sequence parallelism all of them,
    else 24/34: Korthikanti et al., 2022, table 2); what is saved outside the layers (embedding
    output, final norm, the logits the column-parallel head gathers, the loss's
    log-probabilities) is held whole on every rank. Peaks of one stage's activations over a
    micro-batch: Korthikanti et al., 2022; 1F1B's in-flight count (``pp - stage``): Narayanan et
    al., 2021; the B/W split: Qi et al., 2024.

    Raises ValueError for a ``layout`` whose balance does not add up to ``costs.layers``."""
    return [StagePeak(*peak) for peak in _C._plan_stage_peaks(costs, layout)]


def peak_bytes(costs: CostTable, layout: Layout) -> List[int]:
    """Predicted peak bytes per pipeline rank: the sum of ``stage_peaks`` over its stages."""
    return list(_C._plan_peak_bytes(costs, layout))


def stage_times(costs: CostTable, layout: Layout) -> Tuple[List[float], List[float], List[float]]:
    """Seconds of one micro-batch's forward, backward and (zero-bubble schedules) weight-gradient
    action per stage: the layers' compute divided by the tensor-parallel degree, plus its
    all-reduces of the layer outputs over the "tp" link (forward and backward alike), plus the
    recomputed forward under ``checkpoint="always"``; what runs outside the layers goes to the last
    stage; ZB-H1 and ZB-V give half of each backward to W (Qi et al., ICLR 2024, section 2)."""
    forwards, backwards, weights = _C._plan_stage_times(costs, layout)
    return list(forwards), list(backwards), list(weights)


def simulate(schedule: str, ranks: int, chunks: int, durations: Dict[int, List[float]], send_s: float,
             speedup: Sequence[float] = ()) -> float:
    """Seconds from the first action to the last of the C++ schedule (``_C._pipeline_schedule``:
    the order every rank runs; ``len(durations[0]) // ranks`` stages per rank), each rank running
    its actions in order, each action starting once its rank is free and its input has arrived
    (``send_s`` after its producer on another rank ended): F(s, m) after F(s - 1, m); B(s, m) after
    B(s + 1, m), the last stage's after its F; W(s, m) after B(s, m). ``durations[kind][stage]``,
    kind 0 F, 1 B, 2 W. While b ranks run an action each, each runs ``speedup[b - 1]`` times as fast
    as its duration says (ranks sharing a host's cores; empty: 1).

    Raises ValueError for durations whose lengths differ or do not divide into ``ranks``, or a
    ``speedup`` of another length than ``ranks`` or not > 0."""
    return _C._plan_simulate(schedule, ranks, chunks, durations[0], durations[1], durations[2], send_s, list(speedup))


def step_seconds(costs: CostTable, layout: Layout) -> float:
    """Predicted seconds of one ``train_step``: the simulated schedule over the stage times (with a
    send of the stage output between ranks, over the "pp" link; ranks that share a host's cores
    compute faster while others wait: ``CostTable.host_cores``), then the data-parallel average of
    the largest rank's gradients (one ring all-reduce over the "dp" link)."""
    return _C._plan_step_seconds(costs, layout)
