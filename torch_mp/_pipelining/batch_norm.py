"""Batch norm in a pipeline: each micro-batch is normalized with its own statistics (what a layer
sees of the batch), while the running statistics are updated once per batch with the statistics of
the whole batch, as the unpipelined model updates them."""
import threading
from typing import List

import torch
from torch import nn
from torch.nn import functional as F

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _in_backward() -> bool:
    # A forward run inside a backward is a checkpoint's recomputation: its statistics were counted.
    return torch._C._current_graph_task_id() != -1


_counting = threading.Lock()


class _DeferredStatistics:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(input)
        self._check_input_dim(input)
        if not _in_backward():
            dims = [d for d in range(input.dim()) if d != 1]
            with torch.no_grad(), _counting:  # micro-batches run in threads of their own
                values = input.detach().double()
                self._sum = self._sum + values.sum(dims)
                self._squares = self._squares + values.square().sum(dims)
                self._count += input.numel() // input.shape[1]
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def reset_batch(self) -> None:
        self._sum, self._squares, self._count = 0.0, 0.0, 0

    def finish_batch(self) -> None:
        """Folds the whole batch's statistics into the running ones, as one batch-norm step would."""
        if self._count == 0:
            return
        mean = self._sum / self._count
        variance = (self._squares / self._count - mean.square()) * (self._count / max(self._count - 1, 1))
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        with torch.no_grad():
            self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(variance.to(self.running_var.dtype), alpha=momentum)
        self.reset_batch()


def defer_batch_norms(module: nn.Module) -> List[nn.Module]:
    """Turns the batch norms in ``module`` (in place: same parameters, buffers and names) into
    deferred ones and returns them."""
    found = []
    for child in module.modules():
        if type(child) in _BATCH_NORMS:
            child.__class__ = type(f"Deferred{type(child).__name__}", (_DeferredStatistics, type(child)), {})
            child.reset_batch()
            found.append(child)
        elif isinstance(child, _DeferredStatistics):
            found.append(child)
    return found


def restore_batch_norms(module: nn.Module) -> None:
    for child in module.modules():
        if isinstance(child, _DeferredStatistics):
            child.__class__ = next(cls for cls in type(child).__mro__ if cls in _BATCH_NORMS)


def check_batch_statistics(module: nn.Module, micro_batches: int) -> None:
    """Raises ValueError, before anything runs, when ``micro_batches`` > 1 and a norm in ``module``
    would compute, in its present mode, a statistic over the batch that no micro-batch sees: a
    batch norm without running statistics (``track_running_stats=False``: batch statistics in eval
    mode too), a batch norm in training that is not deferred here (``nn.SyncBatchNorm``, a lazy or
    subclassed one), or an instance norm updating running statistics in training (one update per
    micro-batch). A deferred batch norm in training (see ``defer_batch_norms``) is handled."""
    if micro_batches < 2:
        return
    for name, child in module.named_modules():
        if not isinstance(child, nn.modules.batchnorm._NormBase):
            continue
        mode = "training" if child.training else "eval"
        if isinstance(child, nn.modules.instancenorm._InstanceNorm):
            why = "updates its running statistics from the batch" if child.training and child.track_running_stats \
                else None
        elif child.running_mean is None:
            why = f"normalizes with the batch's statistics in {mode} mode (track_running_stats=False)"
        elif child.training and not isinstance(child, _DeferredStatistics):
            why = "normalizes with the batch's statistics in training"
        else:
            why = None
        if why:
            raise ValueError(
                f"pipeline: {type(child).__name__} {name!r} {why}, and each of the {micro_batches} micro-batches "
                "would see only its own rows, giving other numbers than the whole batch; expected chunks=1, "
                "a batch norm with track_running_stats=True (deferred in training, its running statistics in "
                "eval), or a per-sample norm (LayerNorm, GroupNorm)")
