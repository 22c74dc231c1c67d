"""Where a model's parameters and buffers live, and how many bytes each rank or device holds."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from torch_mp._group import all_gather_rows, resolve_group
from torch_mp._checks import check_arg
from torch_mp._state import PIPELINE, SPLIT, TENSOR_PARALLEL, ParallelState, state_of
from torch_mp._tensor_parallel.dtensor import local_tensor


@dataclass
class MemoryRow:
    where: str          # "rank 1", "stage 0 (cuda:0)", "cpu"
    parameters: int     # bytes
    buffers: int        # bytes
    modules: int        # placed or sharded modules there

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


def memory_report(module: nn.Module, png: Optional[str] = None) -> MemoryReport:
    """Parameters and buffers per rank (a ``tensor_parallel`` or ``pipeline`` model; a collective:
    every rank calls it and gets the whole report; a pipeline rank counts what it holds, not the
    meta stand-ins of other ranks' stages), per stage (a ``split`` model) or per device (any other
    model).
    Each row counts bytes (``numel * element_size``; tied tensors once per stage); printing the
    report shows MiB and each row's share. ``png``: also save a bar chart there (matplotlib needed);
    ``report.save_png(path, limits=[bytes per row])`` draws each device's limit (``max_memory``) too.

    Raises TypeError for a ``module`` that is not an ``nn.Module``; ImportError for ``png`` without
    matplotlib; ``torch_mp.CollectiveError`` when a tensor-parallel peer does not answer."""
    check_arg("memory_report", "module", module, nn.Module, "a torch.nn.Module")
    state = state_of(module)
    if state is not None and state.kind == TENSOR_PARALLEL:
        report = _per_rank(module, state)
    elif state is not None and state.kind == PIPELINE:
        report = _per_pipeline_rank(module, state)
    elif state is not None and state.kind == SPLIT:
        report = _per_stage(module, state)
    else:
        report = _per_device(module)
    if png is not None:
        report.save_png(png)
    return report


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


def _per_pipeline_rank(module: nn.Module, state: ParallelState) -> MemoryReport:
    pipe = state.pipe
    held = [[t for t in tensors if not t.is_meta] for tensors in (module.parameters(), module.buffers())]
    placed = sum(1 for name, stage in state.stage_of.items() if name and pipe.rank_of(stage) == pipe.rank)
    mine = torch.tensor([_bytes(held[0]), _bytes(held[1]), placed])
    everyone = all_gather_rows(mine, state.group, "torch_mp.memory_report").tolist()
    rows = [MemoryRow(f"rank {rank}", *entry) for rank, entry in enumerate(everyone)]
    return MemoryReport(f"{type(module).__name__}: pipeline over {len(rows)} ranks", rows)


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
