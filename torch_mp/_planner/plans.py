"""A plan: the chosen layout, its alternatives and the rejected layouts, each with its predicted
cost; printed as a table."""
from dataclasses import dataclass
from typing import Tuple

from torch_mp import _C
from torch_mp._planner.costs import CostTable
from torch_mp._planner.model import Layout


@dataclass(frozen=True)
class Candidate:
    """A layout with its predicted ``step_s`` (seconds per ``train_step``) and ``peak_bytes`` per
    pipeline rank (its stages together; each tensor- and data-parallel rank alike), and why it was
    not chosen ("" for the pick)."""
    layout: Layout
    step_s: float
    peak_bytes: Tuple[int, ...]
    reason: str = ""

    @property
    def peak(self) -> int:
        return max(self.peak_bytes)


def size(nbytes: float) -> str:
    """Bytes as the plans print them ("1.50 GiB", "12.0 MiB", "0.500 MiB"; C++'s
    ``torch_mp::planner::format_bytes``, which writes the verdicts)."""
    return _C._plan_format_bytes(nbytes)


@dataclass(frozen=True)
class Plan:
    """The planner's answer: the chosen layout (``pp``, ``tp``, ``dp``, ``ep``, ``schedule``,
    ``chunks``, ``checkpoint``, ``sequence_parallel``, ``balance``) with its predicted step time
    (``step_s``, seconds) and peak bytes per rank (``peak_bytes``), the ``alternatives`` that fit
    (slower, ranked), the ``rejected`` ones that do not fit (ranked by the memory they need), and the
    ``costs`` it was computed from. ``print(plan)`` shows them as a table: the pick, then up to 7
    alternatives by predicted step time ("slower by x%") and the 4 rejected layouts that need the least
    memory ("does not fit (needs X, Y over)", and how much faster than the pick a faster one would
    be), under a line of their own. Comparable with ``==`` (a plan is a pure function of the cost
    table and the arguments; with ``measure=`` the ``measured`` seconds per step of the top
    candidates, (layout, seconds) pairs, decide) and picklable, so one rank can plan and send it to the others.

    Raises ``dataclasses.FrozenInstanceError`` on assigning a field: make another plan instead.
    """
    world_size: int
    device_memory: int
    batch: int
    chosen: Candidate
    alternatives: Tuple[Candidate, ...]
    rejected: Tuple[Candidate, ...]
    costs: CostTable
    measured: Tuple[Tuple[Layout, float], ...] = ()

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
        lines = [f"torch_mp.plan: {self.world_size} ranks, {size(self.device_memory)} each, batch {self.batch}",
                 f"chosen: pp {c.pp} x tp {c.tp} x dp {c.dp}" + (f" (ep {self.ep})" if self.costs.experts else "") +
                 f", {c.schedule if c.pp > 1 else 'no pipeline'}, {c.chunks} micro-batch{'es' if c.chunks > 1 else ''}, checkpoint {c.checkpoint}, "
                 f"sequence parallel {'on' if c.sequence_parallel else 'off'}, layers per stage {list(c.balance)}",
                 f"predicted: {self.step_s * 1e3:.1f} ms per step, peak {size(self.peak_bytes)} per rank",
                 "",
                 f"{'#':>3} {'pp':>2} {'tp':>2} {'dp':>2} {'schedule':<16} {'M':>2} {'ckpt':<6} {'sp':<3} "
                 f"{'step ms':>8} {'peak':>10}  verdict"]
        shown = [self.chosen] + list(self.alternatives[:7]) + list(self.rejected[:4])
        for i, candidate in enumerate(shown):
            layout = candidate.layout
            if i == len(shown) - len(self.rejected[:4]):
                lines.append(f"    does not fit {size(self.device_memory)}, least over first:")
            lines.append(f"{i:>3} {layout.pp:>2} {layout.tp:>2} {layout.dp:>2} "
                         f"{layout.schedule if layout.pp > 1 else '-':<16} {layout.chunks:>2} {layout.checkpoint:<6} "
                         f"{'on' if layout.sequence_parallel else 'off':<3} {candidate.step_s * 1e3:>8.1f} "
                         f"{size(candidate.peak):>10}  {candidate.reason or 'chosen'}")
        for layout, seconds in self.measured:
            lines.append(f"    measured: pp {layout.pp} x tp {layout.tp} x dp {layout.dp}, {layout.schedule}, "
                         f"{layout.chunks} micro-batches, checkpoint {layout.checkpoint}: {seconds * 1e3:.1f} ms")
        hidden = len(self.alternatives) + len(self.rejected) + 1 - len(shown)
        if hidden:
            lines.append(f"    ... {hidden} more ({len(self.alternatives)} fit in all, {len(self.rejected)} do not)")
        return "\n".join(lines)
