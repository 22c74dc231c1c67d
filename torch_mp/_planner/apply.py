"""``torch_mp.parallelize``: a plan applied, behind one ``train_step`` whatever the layout; and the
measured step time of candidate layouts (``plan(..., measure=)``)."""
import copy
import functools
import statistics
import time
from typing import Callable, List

import torch
import torch.distributed as dist
from torch import nn

from torch_mp._checks import check_arg
from torch_mp._mesh import init_mesh
from torch_mp._pipelining.pipeline import pipeline
from torch_mp._group import all_reduce
from torch_mp._planner.plans import Candidate, Plan
from torch_mp._state import PIPELINE, state_of
from torch_mp._tensor_parallel.parallelize import tensor_parallel
from torch_mp._tensors import map_tensors, tensors_in


def parallelize(model: nn.Module, plan: Plan) -> nn.Module:
    """Applies ``plan`` (from ``torch_mp.plan``) to ``model`` in place and returns it; every rank
    of the default group calls it with the same model (same seed or checkpoint) and plan.

    A mesh ``init_mesh(pp=, dp=, tp=)`` of the plan's degrees; tensor parallel over ``mesh["tp"]``
    (with the plan's sequence parallelism; experts cut over it too) when tp > 1; then the pipeline
    over ``mesh["pp"]`` with the plan's schedule, micro-batches, checkpoint policy and layer counts,
    its replicas averaged over ``mesh["dp"]`` (a one-rank pipeline without a pipeline in the plan:
    its micro-batches one after the other). torchtitan's order (TP, PP, DP).

    The model's ``train_step(*inputs, target=, loss_fn=, **kw)`` then takes the whole batch
    (``plan.batch`` rows in dim 0 of every input and target tensor) on every rank: each
    data-parallel group takes its rows, and the batch's loss (the mean of the groups' mean losses)
    comes back on every rank, so a training script does not change with the plan.

    Raises TypeError for a ``plan`` that is not a ``Plan``; RuntimeError when torch.distributed is
    not initialized; ValueError when the world size is not ``plan.world_size`` (before any
    collective), and from ``train_step`` for a batch of another size than ``plan.batch``.
    """
    check_arg("parallelize", "model", model, nn.Module, "a torch.nn.Module")
    check_arg("parallelize", "plan", plan, Plan, "a torch_mp Plan (from torch_mp.plan)")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("parallelize: torch.distributed is not initialized; expected init_process_group() first")
    if dist.get_world_size() != plan.world_size:
        raise ValueError(f"parallelize: the plan is for world_size = {plan.world_size} but the world has "
                         f"{dist.get_world_size()} ranks; expected torch_mp.plan(..., world_size="
                         f"{dist.get_world_size()})")
    layout = plan.chosen.layout
    mesh = init_mesh(pp=layout.pp, dp=layout.dp, tp=layout.tp)
    if layout.tp > 1:
        tensor_parallel(model, group=mesh["tp"], sequence_parallel=layout.sequence_parallel)
    pipeline(model, group=mesh["pp"], data_parallel=mesh["dp"], chunks=layout.chunks, schedule=layout.schedule,
             checkpoint=layout.checkpoint, balance=list(layout.balance), layers=list(plan.costs.layers))
    model.train_step = functools.partial(_whole_batch_step, model.train_step, plan.batch, layout.dp,
                                         mesh["dp"].get_local_rank())
    state_of(model, PIPELINE).whole_batch = plan.batch
    return model


def _whole_batch_step(step, batch: int, replicas: int, replica: int, *args, target=None, **kwargs) -> torch.Tensor:
    """``step`` on this data-parallel group's rows of the whole batch."""
    found = tensors_in((args, kwargs, target))
    sizes = sorted({t.shape[0] for t in found if t.dim()})
    if sizes != [batch]:
        raise ValueError(f"parallelize: train_step got tensors of {sizes} rows in dim 0; expected the whole batch of "
                         f"{batch} rows the plan was made for, in every input and target tensor")
    rows = batch // replicas

    def mine(t):
        return t.narrow(0, rows * replica, rows) if t.dim() else t

    return step(*map_tensors(args, mine), target=map_tensors(target, mine), **map_tensors(kwargs, mine))


def measure_steps(model: nn.Module, plan: Plan, candidates: List[Candidate], inputs: dict, target,
                  loss_fn: Callable, steps: int = 2) -> List[float]:
    """Seconds per ``train_step`` of each candidate, applied to a deep copy of ``model``: the median
    of ``steps`` after a warm-up, the slowest rank's (every rank of the default group calls it)."""
    seconds = []
    for candidate in candidates:
        trial = parallelize(copy.deepcopy(model), Plan(plan.world_size, plan.device_memory, plan.batch, candidate,
                                                       (), (), plan.costs))
        times = []
        for _ in range(steps + 1):
            dist.barrier()
            start = time.perf_counter()
            trial.train_step(**inputs, target=target, loss_fn=loss_fn)
            times.append(time.perf_counter() - start)
        slowest = all_reduce(torch.tensor([statistics.median(times[1:])], dtype=torch.float64), "max", None,
                             "plan(measure=...)")
        seconds.append(float(slowest[0]))
        del trial
    return seconds
