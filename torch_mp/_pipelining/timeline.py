"""A picture of a pipeline schedule as it ran: when each stage ran each forward (F), backward (B)
and weight-gradient (W) action and how long it waited for its peers' messages, recorded by
``train_step(..., timeline=True)`` and drawn by ``plot_timeline``.

Recording costs nothing when it is off: the pipeline's runners hold ``None`` instead of a
``Recorder`` and test for it where an action starts and ends and around a blocking receive.
"""
import dataclasses
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from torch_mp._pipelining.transport import ACTIVATION
from torch_mp._tensors import tensors_in

COMPUTE = ("F", "B", "W")
WAITS = ("recv-wait",)
LANES = ("stage", "rank")


@dataclasses.dataclass(frozen=True)
class TimelineEvent:
    """One interval of a pipeline step on one stage.

    Attributes:
        stage: the pipeline stage (0 = first).
        rank: the rank that ran it (``pipeline``); None in a one-process pipeline (``split``).
        kind: ``"F"`` (forward), ``"B"`` (backward; input and weight gradients unless a W follows),
            ``"W"`` (weight gradients deferred by a zero-bubble schedule) or ``"recv-wait"`` (the
            stage blocked receiving a peer's activations or gradients; it lies inside the F or B
            that needed them).
        micro_batch: the micro-batch's index (0 = first).
        start, end: seconds since the step's start (``time.perf_counter``); across ranks, since
            the barrier that started the step on every rank.

    Raises:
        dataclasses.FrozenInstanceError: on assigning a field (an event records what happened).
    """
    stage: int
    rank: Optional[int]
    kind: str
    micro_batch: int
    start: float
    end: float


@dataclasses.dataclass
class Timeline:
    """The actions of one ``train_step`` as they ran, on every stage (and every rank).

    Attributes:
        events: the intervals, sorted by lane then start time.
        schedule: the schedule's name (``"1f1b"``, ...).
        num_stages: the pipeline's stages.
        num_micro_batches: the micro-batches the batch was cut into.
        lanes: what runs concurrently: ``"stage"`` (one process: each stage's work proceeds in
            parallel with the others') or ``"rank"`` (``pipeline``: a rank runs its stages' actions
            one at a time). Idle time and the bubble are measured per lane.

    Summary numbers (seconds): ``busy()`` per stage, ``waiting()`` per stage, ``idle()`` per lane,
    ``bubble`` (the share of lane-time not spent computing over the step's span, from the first
    action's start to the last one's end): the measured counterpart of the (p-1)/(M+p-1) of GPipe
    (Huang et al., 2019) and of the pictures of schedules in the zero-bubble paper (Qi et al., 2023).

    Made by ``train_step(..., timeline=True)`` of a pipelined ``split`` or of ``pipeline``, and
    found at ``model.last_timeline`` (on every rank); drawn by ``torch_mp.plot_timeline``.

    Raises:
        ValueError: ``lanes`` other than ``"stage"`` or ``"rank"``.
    """
    events: List[TimelineEvent]
    schedule: str
    num_stages: int
    num_micro_batches: int
    lanes: str = "stage"

    def __post_init__(self):
        if self.lanes not in LANES:
            raise ValueError(f"Timeline: lanes = {self.lanes!r}; expected one of {list(LANES)}")
        self.events = sorted(self.events, key=lambda e: (self.lane(e), e.start, e.end))

    def lane(self, event: TimelineEvent) -> int:
        """The row ``event`` is drawn on: its stage, or its rank when lanes are ranks."""
        return event.rank if self.lanes == "rank" else event.stage

    @property
    def span(self) -> Tuple[float, float]:
        """(first start, last end) over every event, in seconds since the step's start."""
        if not self.events:
            return (0.0, 0.0)
        return (min(e.start for e in self.events), max(e.end for e in self.events))

    def actions(self, stage: int) -> List[Tuple[str, int]]:
        """``stage``'s F, B and W actions as (kind, micro-batch), in the order they started."""
        return [(e.kind, e.micro_batch) for e in self.events if e.stage == stage and e.kind in COMPUTE]

    def busy(self) -> Dict[int, float]:
        """Seconds each stage computed: its F, B and W time less the receive waits inside them."""
        return {stage: self._working(lambda e, s=stage: e.stage == s) for stage in range(self.num_stages)}

    def waiting(self) -> Dict[int, float]:
        """Seconds each stage blocked receiving."""
        return {stage: _length(_union([(e.start, e.end) for e in self.events
                                       if e.stage == stage and e.kind in WAITS]))
                for stage in range(self.num_stages)}

    def idle(self) -> Dict[int, float]:
        """Seconds each lane (stage or rank) did not compute within the step's span: the bubble,
        the receive waits, and whatever ran between the actions."""
        first, last = self.span
        lanes = sorted({self.lane(e) for e in self.events})
        return {lane: (last - first) - self._working(lambda e, lane=lane: self.lane(e) == lane) for lane in lanes}

    @property
    def bubble(self) -> float:
        """The measured bubble: idle lane-time / (lanes x the step's span), in [0, 1]."""
        first, last = self.span
        idle = self.idle()
        return sum(idle.values()) / (len(idle) * (last - first)) if idle and last > first else 0.0

    def summary(self) -> str:
        """One line per stage: busy, waiting and idle seconds; then the bubble."""
        busy, waiting, idle = self.busy(), self.waiting(), self.idle()
        stage_lane = {e.stage: self.lane(e) for e in self.events}
        lines = [f"{self.schedule}, {self.num_stages} stages, {self.num_micro_batches} micro-batches, "
                 f"span {self.span[1] - self.span[0]:.4f} s, bubble {self.bubble:.1%}"]
        for stage in range(self.num_stages):
            lane = stage_lane.get(stage)
            where = f" (rank {lane}, idle {idle[lane]:.4f} s)" if self.lanes == "rank" and lane is not None else \
                f", idle {idle.get(stage, 0.0):.4f} s"
            lines.append(f"  stage {stage}: busy {busy[stage]:.4f} s, waiting {waiting[stage]:.4f} s{where}")
        return "\n".join(lines)

    def _working(self, keep: Callable[[TimelineEvent], bool]) -> float:
        chosen = [e for e in self.events if keep(e)]
        computing = _union([(e.start, e.end) for e in chosen if e.kind in COMPUTE])
        # Waits on the same lane (the rank's thread) block whatever action is under way.
        lanes = {self.lane(e) for e in chosen}
        waits = _union([(e.start, e.end) for e in self.events if e.kind in WAITS and self.lane(e) in lanes])
        return _length(computing) - _overlap(computing, waits)


def _union(intervals: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    merged: List[Tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(merged: List[Tuple[float, float]]) -> float:
    return sum(end - start for start, end in merged)


def _overlap(a: List[Tuple[float, float]], b: List[Tuple[float, float]]) -> float:
    """The length of the intersection of two unions of disjoint sorted intervals."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def action_kind(backward) -> str:
    """An action's kind from the first field of a schedule's action: False/0 F, True/1 B, 2 W, or
    the kind's name."""
    return backward if isinstance(backward, str) else COMPUTE[int(backward)]


class Recorder:
    """Collects one rank's (or one process's) events during a step. Times are seconds since the
    recorder was made (the step's start). ``devices[stage]`` is each stage's device: on CUDA the
    stage's device is synchronized before an action's end is stamped, so the action's time is its
    kernels' and not their launch's, and around a receive, so its wait (NCCL's is the stream's) is
    the device's. In one process, when a backward's gradients reach a stage is stamped by a
    gradient hook, on the host."""

    def __init__(self, rank: Optional[int], devices: List[torch.device]):
        self.rank, self._devices = rank, devices
        self.events: List[TimelineEvent] = []
        self._started: Dict[Tuple[int, int], float] = {}  # one process: (stage, micro-batch) -> F start
        self._gradient_in: Dict[Tuple[int, int], float] = {}  # ... -> when stage's inputs got their gradients
        self._hooks: List = []
        self._origin = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._origin

    def started(self) -> float:
        """The time now, once the work queued on the devices is done."""
        self._synchronize(None)
        return self.now()

    def _synchronize(self, stage: Optional[int]) -> None:
        for device in set(self._devices if stage is None else [self._devices[stage]]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def record(self, backward, stage: int, micro_batch: int, start: float) -> None:
        """An action of a schedule (``backward`` as in the action: F, B or W) ran from ``start`` to now."""
        self._synchronize(stage)
        self.events.append(TimelineEvent(stage, self.rank, action_kind(backward), micro_batch, start, self.now()))

    def received(self, key, start: float) -> None:
        """The receive of message ``key`` (transport.Key) blocked from ``start`` to now."""
        kind, micro_batch, made_by, used_by, _ = key
        stage = used_by if kind == ACTIVATION else made_by
        self._synchronize(stage)
        self.events.append(TimelineEvent(stage, self.rank, "recv-wait", micro_batch, start, self.now()))

    # --- one process: a micro-batch's thread enters and leaves stages; its backward is one call ---

    def entered(self, stage: int, micro_batch: int, values) -> None:
        """A micro-batch's forward entered ``stage`` with ``values``, the first time if not seen
        before: its F starts; the gradients of the tensors it received will end its B."""
        if (stage, micro_batch) in self._started:
            return
        self._started[(stage, micro_batch)] = self.now()
        if stage == 0:
            return  # stage 0's backward ends with the backward call
        for tensor in tensors_in(values):
            if tensor.requires_grad:
                self._hooks.append(tensor.register_hook(lambda _, key=(stage, micro_batch): self._reached(key)))

    def _reached(self, key: Tuple[int, int]) -> None:
        self._gradient_in[key] = self.now()

    def left(self, stages, micro_batch: int) -> None:
        """A micro-batch's forward left ``stages``: the F of those it entered ends."""
        for stage in stages:
            start = self._started.get((stage, micro_batch))
            if start is not None:
                self.record(False, stage, micro_batch, start)

    def timed_backward(self, backward: Callable, num_stages: int) -> Callable:
        """``backward(m, loss)`` (one call over every stage, last to first) recording a B per
        stage: stage s's from when stage s + 1's inputs got their gradients (the call's start for
        the last stage) to when stage s's did (the call's end for stage 0)."""

        def run(micro_batch: int, loss) -> None:
            start = self.now()
            backward(micro_batch, loss)
            self._synchronize(None)
            end = self.now()
            for stage in reversed(range(num_stages)):
                if (stage, micro_batch) not in self._started:
                    continue  # the forward did not reach this stage
                reached = self._gradient_in.get((stage, micro_batch), start) if stage else end
                reached = min(max(reached, start), end)
                self.events.append(TimelineEvent(stage, self.rank, "B", micro_batch, start, reached))
                start = reached

        return run

    def close(self) -> None:
        """Removes the gradient hooks (on leaves a caller passed, they would outlive the step)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def plot_timeline(timeline: Timeline, path) -> None:
    """Draws ``timeline`` as a PNG file at ``path``: one row per stage (one process) or per rank
    (``pipeline``; a rank's stages in lighter and darker shades), time in seconds since the step's
    start on the x axis, each F, B and W a box in its colour numbered with its micro-batch, receive
    waits hatched grey over the action that waited, idle time left blank (each row's label gives
    its idle share), the schedule and the measured bubble in the title.

    Needs matplotlib (``pip install matplotlib``, or the ``plot`` extra); only this function imports it.

    Raises:
        TypeError: ``timeline`` is not a ``torch_mp.Timeline`` (e.g. ``None``: the step ran without
            ``timeline=True``), or ``path`` is not a str or os.PathLike.
        ValueError: ``path`` does not end in ``.png``, or the timeline has no events.
        OSError (FileNotFoundError, PermissionError, ...): ``path`` cannot be written (its folder
            does not exist, or is not writable); raised before anything is drawn.
        ImportError: matplotlib is not installed.
    """
    if not isinstance(timeline, Timeline):
        raise TypeError(f"plot_timeline: expected timeline to be a torch_mp.Timeline (from train_step(..., "
                        f"timeline=True), then model.last_timeline), got {type(timeline).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"plot_timeline: expected path to be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"plot_timeline: path = {path!r}; expected a file name ending in .png")
    if not timeline.events:
        raise ValueError("plot_timeline: the timeline has no events; expected a step's recorded actions")
    try:
        import matplotlib  # noqa: F401 - only checked here; _draw imports what it uses
    except ImportError as error:
        raise ImportError("plot_timeline needs matplotlib: pip install matplotlib (or torch_mp[plot])") from error
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as error:  # before drawing: the same error class, naming the path
        raise type(error)(error.errno, f"plot_timeline: cannot write path = {path!r} ({error.strerror})") from error
    try:
        _draw(timeline, path)
    except BaseException:
        if not existed:
            os.remove(path)
        raise


def _draw(timeline: Timeline, path: str) -> None:
    from matplotlib.figure import Figure  # pyplot is not used: no global state, no GUI backend
    from matplotlib.patches import Patch
    from matplotlib.patheffects import withStroke

    colours = {"F": "#4c72b0", "B": "#55a868", "W": "#dd8452"}
    outline = withStroke(linewidth=1.5, foreground="black")  # numbers readable over a hatched wait
    lanes = sorted({timeline.lane(e) for e in timeline.events})
    row = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}  # first lane at the top
    stages_of = {lane: sorted({e.stage for e in timeline.events if timeline.lane(e) == lane}) for lane in lanes}
    first, last = timeline.span
    width = last - first or 1.0
    figure = Figure(figsize=(min(40.0, 6.0 + 0.35 * timeline.num_micro_batches * timeline.num_stages),
                             1.2 + 0.7 * len(lanes)))
    axes = figure.subplots()
    for e in timeline.events:
        y = row[timeline.lane(e)]
        if e.kind in COMPUTE:
            shades = stages_of[timeline.lane(e)]
            alpha = 1.0 - 0.45 * shades.index(e.stage) / max(1, len(shades) - 1)
            axes.broken_barh([(e.start, e.end - e.start)], (y - 0.4, 0.8), facecolors=colours[e.kind],
                             edgecolors="black", linewidth=0.5, alpha=alpha, zorder=2)
            if (e.end - e.start) > width / 400:
                axes.text((e.start + e.end) / 2, y, str(e.micro_batch), ha="center", va="center", fontsize=7,
                          color="white", zorder=4, clip_on=True, path_effects=[outline])
        else:
            axes.broken_barh([(e.start, e.end - e.start)], (y - 0.25, 0.5), facecolors="#d0d0d0",
                             edgecolors="#606060", hatch="////", linewidth=0.3, zorder=3)
    idle = timeline.idle()
    name = "rank" if timeline.lanes == "rank" else "stage"
    labels = []
    for lane in lanes:
        held = stages_of[lane]
        stages = "" if timeline.lanes == "stage" or held == [lane] else f" (stages {', '.join(map(str, held))})"
        labels.append(f"{name} {lane}{stages}\nidle {idle[lane] / width:.0%}")
    axes.set_yticks([row[lane] for lane in lanes], labels)
    axes.set_ylim(-0.6, len(lanes) - 0.4)
    axes.set_xlim(first - 0.01 * width, last + 0.01 * width)
    axes.set_xlabel("seconds since the step's start")
    axes.grid(axis="x", linestyle=":", linewidth=0.5, zorder=0)
    axes.set_title(f"{timeline.schedule}: {timeline.num_stages} stages, {timeline.num_micro_batches} "
                   f"micro-batches; measured bubble {timeline.bubble:.1%}")
    present = {e.kind for e in timeline.events}
    handles = [Patch(facecolor=colours[k], edgecolor="black", label=k) for k in COMPUTE if k in present]
    handles.append(Patch(facecolor="#d0d0d0", edgecolor="#606060", hatch="////", label="recv wait"))
    handles.append(Patch(facecolor="white", edgecolor="black", label="idle"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
