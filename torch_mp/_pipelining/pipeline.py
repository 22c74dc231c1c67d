"""Pipeline parallelism: micro-batches flowing through the stages of a split model, in one process
(``split(..., chunks=M)``) or with one stage per rank (``pipeline``)."""
import contextlib
import datetime
import functools
import os
import time
import types
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from torch_mp import _C
from torch_mp._checks import mark_replaced
from torch_mp._devices import check_device
from torch_mp._group import GroupLike, all_gather_rows, all_reduce_sum, process_group_of, resolve_group
from torch_mp._hooks import held_post_accumulate_hooks, refused_gradient_hooks
from torch_mp._layers import check_layers, find_layers
from torch_mp._pipelining.batch_norm import check_batch_statistics, defer_batch_norms
from torch_mp._pipelining.caches import training_without_cache
from torch_mp._pipelining.compiled import StageCompilation, install_entries
from torch_mp._pipelining.cut import UNLIMITED, Balance, balanced_device_map
from torch_mp._pipelining.engine import CHECKPOINTS, RankStep, placed_forward
from torch_mp._pipelining.engine import current as current_micro_batch
from torch_mp._pipelining.local import ThreadState, gated_forward, run_micro_batches
from torch_mp._pipelining.microbatch import (BatchPlan, ChunkSpec, OutputMerge, check_batch_wide_outputs,
                                             check_chunk_spec, check_loss, check_output_merge, cut_target, loss_weights, merge_outputs,
                                             micro_batch_sizes, non_batch_sizes, shapes_of, write_back)
from torch_mp._pipelining.timeline import Recorder, Timeline
from torch_mp._pipelining.transport import GroupTransport
from torch_mp._tensor_parallel.dtensor import like, local_tensor, swap_in
from torch_mp._state import PIPELINE, SPLIT, ParallelState, attach, check_not_parallelized, state_of
from torch_mp._pipelining.zero_bubble import ZERO_BUBBLE, allocate_slots, defer_linears
from torch_mp._training import clip_grad_norm_
from torch_mp._tensors import copy_tensors, map_tensors, move_tensors, mover, tensors_in

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv")
# Why a rank refuses a step, compared across the ranks before it runs (``_check_agreement``).
REFUSED_HOOK, REFUSED_FULLY_SHARD, REFUSED_UNLOADED = 1, 2, 3


def check_options(chunks: int, schedule: str, checkpoint: str, batch_dim: int, allowed=SCHEDULES) -> None:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"pipeline: chunks = {chunks!r}; expected an int >= 1 (micro-batches per batch)")
    if schedule not in allowed:
        raise ValueError(f"pipeline: schedule = {schedule!r}; expected one of {list(allowed)}")
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"pipeline: checkpoint = {checkpoint!r}; expected one of {list(CHECKPOINTS)}")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise ValueError(f"pipeline: batch_dim = {batch_dim!r}; expected an int >= 0")


def _check_loss_fn(loss_fn) -> None:
    if not callable(loss_fn):
        raise TypeError(f"pipeline: loss_fn = {loss_fn!r}; expected a callable (output, target) -> loss")


def fully_sharded_refusal(module: nn.Module, caller: str, own: Sequence[nn.Module] = ()) -> Optional[str]:
    """The error message for a ``module`` some of whose submodules (or itself) FSDP2's
    ``torch.distributed.fsdp.fully_shard`` has sharded, other than ``own`` (those
    ``pipeline(..., fully_shard=)`` sharded); None when none is. A pipeline moves each
    parameter to the ranks of its stage (the meta device elsewhere, the tensors outside the layers
    after the first call), runs one backward per micro-batch and averages the gradients over
    ``data_parallel`` itself: FSDP2's parameters, hooks and reduce-scatters are not its, and would
    train other weights than the dense model's (the sharded layers moved to the meta device, their
    gradients lost, or shards of different rows averaged together)."""
    from torch.distributed.fsdp import FSDPModule

    own_ids = {id(submodule) for submodule in own}
    sharded = [repr(name) if name else "the root module" for name, submodule in module.named_modules()
               if isinstance(submodule, FSDPModule) and id(submodule) not in own_ids]
    if not sharded:
        return None
    shown = ", ".join(sharded[:4]) + (f" and {len(sharded) - 4} more" if len(sharded) > 4 else "")
    return (f"{caller}: {shown} {'was' if len(sharded) == 1 else 'were'} sharded by torch.distributed.fsdp.fully_shard, "
            "which does not compose with "
            "a pipeline (the pipeline places each stage's parameters on its ranks and runs a backward per "
            "micro-batch, so FSDP2's sharded parameters and gradient reduce-scatters would train other weights than "
            "the dense model's); expected pipeline(model, group=mesh['pp'], data_parallel=mesh['dp']) on a model "
            "fully_shard has not touched (the pipeline averages the gradients over the replicas), with "
            "fully_shard=True to shard each stage's layers over the replicas")


class _Pipe:
    """What a pipelined module runs instead of its own forward: its forward on micro-batches, by a
    schedule. Subclasses say where the stages run."""

    def __init__(self, module: nn.Module, stage_of: Dict[str, int], num_stages: int, chunks: int,
                 schedule: str, checkpoint: str, batch_dim: int, chunk_spec: ChunkSpec, output_merge: OutputMerge):
        module.last_timeline = None  # the Timeline of the latest train_step(..., timeline=True)
        self.module, self.stage_of, self.num_stages = module, stage_of, num_stages
        self.chunks, self.schedule, self.checkpoint, self.batch_dim = chunks, schedule, checkpoint, batch_dim
        self.chunk_spec = check_chunk_spec(chunk_spec)
        self.output_merge = check_output_merge(output_merge)
        self.batch_norms = defer_batch_norms(module)
        self.compilation = StageCompilation()

    def _plan(self, args, kwargs):
        """The micro-batches of a call: their sizes and their (args, kwargs)."""
        plan = BatchPlan(self.module, args, kwargs, self.batch_dim, self.chunk_spec)
        sizes = micro_batch_sizes(plan.batch, self.chunks)
        # Statistics over the batch that no micro-batch sees: refused on every rank alike.
        check_batch_statistics(self.module, len(sizes))
        check_batch_wide_outputs(self.module, kwargs, len(sizes))
        return sizes, plan.cut((args, kwargs), sizes)

    def _write_back(self, args, kwargs, parts, sizes) -> None:
        input_sizes = [non_batch_sizes(part, self.batch_dim) for part in parts]
        for i, name in enumerate(("args", "kwargs")):
            write_back((args, kwargs)[i], [part[i] for part in parts], sizes, self.batch_dim, self.output_merge, name,
                       input_sizes)

    def _train_plan(self, args, kwargs, target, loss_fn: Callable, normalizer):
        """The micro-batches of a ``train_step``: their sizes, (args, kwargs), targets and loss weights."""
        _check_loss_fn(loss_fn)
        sizes, parts = self._plan(args, kwargs)
        targets = cut_target(target, sizes, self.batch_dim) if target is not None else [None] * len(sizes)
        return sizes, parts, targets, loss_weights(sizes, target, normalizer)

    def _recompute(self, microbatch: int, count: int) -> bool:
        return self.checkpoint == "always" or (self.checkpoint == "except_last" and microbatch < count - 1)

    def _batch(self, run: Callable):
        """Runs one batch; batch norms see its micro-batches and update their running statistics
        once, from all of them."""
        for batch_norm in self.batch_norms:
            batch_norm.reset_batch()
        results = run()
        for batch_norm in self.batch_norms:
            batch_norm.finish_batch()
        return results


class LocalPipe(_Pipe):
    """One process: the model's own forward runs once per micro-batch, each in a thread of its own,
    and each placed module's call waits for its stage's turn (``_pipeline_local``)."""

    def __init__(self, *args, devices: List[torch.device], output_device: torch.device):
        super().__init__(*args)
        self.devices, self.output_device = devices, output_device
        repeated = {device for device in devices if devices.count(device) > 1}
        device_map = state_of(self.module, SPLIT).device_map
        if self.schedule in ZERO_BUBBLE:
            defer_linears(self.module.get_submodule(name) for name in device_map)
        for name, device in device_map.items():
            submodule = self.module.get_submodule(name)
            submodule.forward = gated_forward(self, self.compilation.stage(submodule.forward), self.stage_of[name],
                                              device, mover(device, device in repeated), submodule)
        self._to_output = mover(output_device, output_device in repeated)

    def _own_forward(self, args, kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    def forward(self, *args, **kwargs):
        sizes, parts = self._plan(args, kwargs)
        count = len(sizes)
        forwards = [[(False, s, m) for m in range(count)] for s in range(self.num_stages)]
        outputs = self._batch(lambda: run_micro_batches(
            self, forwards, count, lambda m: self._own_forward(*parts[m]), None,
            lambda m: self._recompute(m, count)))
        self._write_back(args, kwargs, parts, sizes)
        return move_tensors(merge_outputs(outputs, sizes, self.batch_dim, self.output_merge,
                                          input_sizes=[non_batch_sizes(part, self.batch_dim) for part in parts]), self._to_output)

    def train_step(self, *args, target=None, loss_fn: Callable, normalizer=None, timeline: bool = False,
                   max_norm: Optional[float] = None, **kwargs) -> torch.Tensor:
        """One training step over the batch: forward and backward of every micro-batch in the
        schedule's order, gradients accumulated in ``.grad`` as one backward of the whole batch
        would. ``loss_fn(output, target)`` returns a micro-batch's mean loss (weighted by the
        micro-batch sizes), or, with ``normalizer`` (a number, or a callable of the whole batch's
        target: e.g. its count of tokens that are not ``ignore_index``), a micro-batch's summed
        loss, every one divided by the normalizer. Returns the batch's loss, detached. The
        optimizer step is the caller's. With ``timeline=True`` the step also records when each
        stage ran each action and sets ``module.last_timeline`` (a ``torch_mp.Timeline``; draw it
        with ``torch_mp.plot_timeline``); the numbers are the same either way. With ``max_norm``
        (a number >= 0) the step ends with ``torch_mp.clip_grad_norm_(module, max_norm)``: the
        gradients clipped by the dense model's norm (ValueError before anything runs for another
        value). A transformers model's ``config.use_cache`` is False during the step (a cache serves
        decoding, not training), True again after it; ``use_cache=`` passed to ``train_step``
        goes to the forward as given."""
        _check_timeline_flag(timeline)
        _check_max_norm(max_norm)
        sizes, parts, targets, weights = self._train_plan(args, kwargs, target, loss_fn, normalizer)
        recorder = Recorder(None, self.devices) if timeline else None
        count = len(sizes)
        # One gate list per rank of the schedule: per stage, except ZB-V's V of two stages per list.
        per_rank = 2 if self.schedule == "zbv" else 1
        schedule = _C._pipeline_schedule(self.schedule, self.num_stages // per_rank, per_rank, count)
        first_slot = allocate_slots(self.num_stages * count) if self.schedule in ZERO_BUBBLE else None
        in_parts = count > 1  # one backward per micro-batch: each parameter's gradient arrives in parts
        refusal = in_parts and refused_gradient_hooks(
            self.module.named_parameters(), "split", f"one backward per micro-batch, {count} micro-batches",
            "expected chunks=1, or the hook registered with register_post_accumulate_grad_hook (run once per step, "
            "on the whole gradient)")
        if refusal:
            raise ValueError(refusal)

        def forward(m: int) -> torch.Tensor:
            output = self._own_forward(*parts[m])
            found = tensors_in(output)
            device = found[0].device if found else self.output_device
            return check_loss(loss_fn(output, map_tensors(targets[m], lambda t: t.to(device))))

        def backward(m: int, loss: torch.Tensor) -> None:
            (loss * weights[m]).backward()

        try:
            with held_post_accumulate_hooks(self.module.parameters() if in_parts else ()), \
                    training_without_cache(self.module, kwargs):
                losses = self._batch(lambda: run_micro_batches(
                    self, schedule, count, forward,
                    backward if recorder is None else recorder.timed_backward(backward, self.num_stages),
                    lambda m: self._recompute(m, count), first_slot, recorder))
        finally:
            if recorder is not None:
                recorder.close()
        self._write_back(args, kwargs, parts, sizes)
        if recorder is not None:
            self.module.last_timeline = Timeline(recorder.events, self.schedule, self.num_stages, count, "stage")
        if max_norm is not None:
            clip_grad_norm_(self.module, max_norm)
        return sum(loss.detach() * weight for loss, weight in zip(losses, weights))


class DistributedPipe(_Pipe):
    """One rank per stage (several with an interleaved schedule), over c10d send/recv. Every rank
    runs the model's own forward per micro-batch, other ranks' stages as meta stand-ins
    (``_pipeline_engine``)."""

    def __init__(self, *args, group, stages_per_rank: int, device: torch.device, timeout: datetime.timedelta,
                 data_parallel=None):
        super().__init__(*args)
        self.group, self.data_parallel = group, data_parallel
        info = resolve_group(group, "pipeline(group=...)")
        self.world, self.rank = info.size, info.rank
        self.stages_per_rank, self.device = stages_per_rank, device
        self.stage_ranks: List[int] = _C._pipeline_stage_ranks(self.schedule, self.world, stages_per_rank)
        self.transport = GroupTransport(group, self.rank, device, timeout)
        self.plan_checksum = zlib.crc32(repr(sorted(self.stage_of.items())).encode())
        self.ties: List = []
        # {stage: its layers FSDP2 shards over the replicas} (``pipeline(..., fully_shard=)``), this rank's stages.
        self.fully_sharded: Dict[int, List[nn.Module]] = {}
        # Tensors outside the layers (by id): held by every rank until the first call records, in
        # ``used``, those each rank computes with (``_hold_share``).
        self.ranks_using: Dict[int, set] = {}
        self.tracked: set = set()
        self.used: Optional[set] = None
        # Whether every tensor this rank holds is off the meta device (``unloaded``), once found.
        self.loaded = False
        if self.schedule in ZERO_BUBBLE:
            defer_linears(self.module.get_submodule(name) for name, stage in self.stage_of.items()
                          if name and self.rank_of(stage) == self.rank)
        for name, stage in self.stage_of.items():
            if name:
                submodule = self.module.get_submodule(name)
                own = self.compilation.stage(submodule.forward, self.rank_of(stage) == self.rank)
                submodule.forward = placed_forward(self, own, stage, submodule)

    def rank_of(self, stage: int) -> int:
        return self.stage_ranks[stage]

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether this rank holds ``tensor`` (its stages', or one outside the layers it uses); the
        others' are meta stand-ins."""
        return self.rank in self.ranks_using.get(id(tensor), ())

    def unloaded(self) -> List[str]:
        """Names of the tensors this rank holds that are still on the meta device (a model built
        under ``init_empty_weights`` and not loaded yet); empty once they all hold values."""
        if self.loaded:
            return []
        names = [name for name, tensor in (*self.module.named_parameters(), *self.module.named_buffers())
                 if tensor.is_meta and self.holds(tensor)]
        self.loaded = not names
        return names

    def local_stages(self) -> List[int]:
        return [stage for stage in range(self.num_stages) if self.stage_ranks[stage] == self.rank]

    def claim_ends(self, layer_names: List[str]) -> List[str]:
        """The placed modules outside the layers that ``shard_stages`` shards (the embedding, the
        final norm, the head): those none of whose tensors another module holds (a tied
        embedding and head stay whole on both ends' ranks, their gradient summed between them).
        Each is held by its stage's rank from now on, not only after the first call, alike on
        every rank."""
        holders: Dict[int, set] = {}
        for owner, submodule in self.module.named_modules(remove_duplicate=False):
            for tensor in (*submodule._parameters.values(), *submodule._buffers.values()):
                if tensor is not None:
                    holders.setdefault(id(tensor), set()).add(owner)
        ends = []
        for name, stage in self.stage_of.items():
            if not name or any(layer == name or layer.startswith(name + ".") for layer in layer_names):
                continue
            inside = {owner for owner, _ in self.module.named_modules(remove_duplicate=False)
                      if owner == name or owner.startswith(name + ".")}
            tensors = [*self.module.get_submodule(name).parameters(), *self.module.get_submodule(name).buffers()]
            if tensors and all(holders[id(tensor)] <= inside for tensor in tensors):
                ends.append(name)
                for tensor in tensors:
                    self.ranks_using[id(tensor)] = {self.rank_of(stage)}
                    self.tracked.discard(id(tensor))
        return ends

    def shard_stages(self, names: List[str], mesh, options: dict) -> None:
        """FSDP2's ``fully_shard(module, mesh=mesh, **options)`` on each of the placed modules
        ``names`` (layers, and the ends ``claim_ends`` returned) of this rank's stages
        (torchtitan's per-block wrapping): each replica keeps 1/mesh.size() of their parameters,
        gradients and optimizer state. FSDP2 places their parameters from then on
        (``_keep_local_tensors`` leaves them); other ranks' stay meta stand-ins."""
        from torch.distributed.fsdp import fully_shard

        dense = list(self.module.parameters())
        for name in names:
            stage = self.stage_of[name]
            if name and self.rank_of(stage) == self.rank:
                placed = fully_shard(self.module.get_submodule(name), mesh=mesh, **options)
                self.fully_sharded.setdefault(stage, []).append(placed)
        # An optimizer built before on the parameters FSDP2 replaced would step nothing the model reads.
        mark_replaced(dense, self.module, "pipeline(..., fully_shard=True)")

    def before_backward(self, stage: int, last: bool) -> None:
        """Before a backward of ``stage``: its sharded layers keep their gradients unsharded and
        their parameters gathered, without communication, until its ``last`` micro-batch's backward
        reduce-scatters the sum (as ``torch.distributed.pipelining``'s stages do with FSDP2)."""
        for layer in self.fully_sharded.get(stage, ()):
            layer.set_is_last_backward(last)
            layer.set_reshard_after_backward(last)
            layer.set_requires_gradient_sync(last)

    def _own_forward(self, args, kwargs):
        return current_micro_batch().to_last_stage(type(self.module).forward(self.module, *args, **kwargs))

    def forward(self, *args, **kwargs):
        sizes, parts = self._plan(args, kwargs)
        count = len(sizes)
        actions = [(False, s, m) for s in self.local_stages() for m in range(count)]
        works = [lambda m=m: self._own_forward(*parts[m]) for m in range(count)]
        with torch.no_grad():
            micro_batches = self._batch(lambda: self._run(actions, works, parts, None, count, train=False))
        for layers in self.fully_sharded.values():
            for layer in layers:  # no backward reshards them: each rank holds its shards again
                layer.reshard()
        last = self.rank_of(self.num_stages - 1)
        outputs = [self._output(mb.result, mb.index) if last == self.rank else mb.result for mb in micro_batches]
        merged = merge_outputs(outputs, sizes, self.batch_dim, self.output_merge,
                               input_sizes=[non_batch_sizes(part, self.batch_dim) for part in parts])
        # The output on every rank (generate() runs on each and picks the same tokens from it): its
        # tensors broadcast from the last stage's rank, where the other ranks hold meta stand-ins.
        # A cache in it is the caller's, each rank's holding the keys and values of its own layers.
        output = copy_tensors(merged, lambda t: self.transport.broadcast(
            t if last == self.rank else torch.empty(t.shape, dtype=t.dtype, device=self.device), last,
            "while sending the output from the last stage's rank"))
        if self.module.training and torch.is_grad_enabled():
            # A training loop's forward: a backward through it would leave every gradient of the
            # pipeline's parameters out (with another loss term, silently); it raises instead.
            anchor = torch.zeros((), device=self.device, requires_grad=True)
            output = copy_tensors(output, lambda t: _ForwardOnly.apply(t, anchor) if t.is_floating_point() else t)
        return output

    def _output(self, output, microbatch: int):
        for tensor in tensors_in(output):
            if tensor.is_meta:
                raise ValueError(
                    f"pipeline: micro-batch {microbatch}'s output holds a {list(tensor.shape)} tensor that no stage "
                    f"made (made on the meta device from another rank's value); expected outputs made from the "
                    "inputs, parameters or stages' outputs")
        return output

    def train_step(self, *args, target=None, loss_fn: Callable, normalizer=None, timeline: bool = False,
                   max_norm: Optional[float] = None, **kwargs) -> torch.Tensor:
        """As ``LocalPipe.train_step``; the loss is returned on every rank. With ``timeline=True``
        every rank's records are gathered to every rank (one all-gather of objects after the step)
        and ``module.last_timeline`` is set on every rank; each rank's times count from a barrier
        that starts the step on all of them, so no clock is assumed shared beyond the barrier's
        exit (its skew, tens of microseconds on one machine, is the picture's error). Every rank
        must pass the same ``timeline`` and ``max_norm`` (checked with the other options).

        With ``data_parallel``, each replica passes its own batch and ``normalizer`` divides the
        sum over all of them, as the dense model's loss over the replicas' batches concatenated
        would: a number as given, a callable's value summed over the replicas (a count of rows or
        tokens adds up), and the replicas' losses and gradients then sum."""
        _check_timeline_flag(timeline)
        _check_max_norm(max_norm)
        sizes, parts, targets, weights = self._train_plan(args, kwargs, target, loss_fn, normalizer)
        count = len(sizes)
        last = self.rank_of(self.num_stages - 1) == self.rank
        if normalizer is not None and self.data_parallel is not None:
            weights = self._normalized_over_replicas(weights, callable(normalizer) and last)
        losses: List = [None] * count

        def work(m: int) -> None:
            # The output is dropped once its loss is made: the loss's graph keeps what its backward
            # needs, and a kept output (an LLM's logits) would stay until the step ends.
            output = self._own_forward(*parts[m])
            if last:
                output = self._output(output, m)
                target_m = map_tensors(targets[m], lambda t: t.to(self.device))
                losses[m] = check_loss(loss_fn(output, target_m)) * weights[m]

        actions = _C._pipeline_schedule(self.schedule, self.world, self.stages_per_rank, count)[self.rank]
        works = [lambda m=m: work(m) for m in range(count)]
        with torch.enable_grad(), training_without_cache(self.module, kwargs):
            self._batch(lambda: self._run(actions, works, (parts, targets), losses, count, train=True,
                                          timeline=timeline, max_norm=max_norm))
        if max_norm is not None:
            clip_grad_norm_(self.module, max_norm)
        loss = sum(loss.detach() for loss in losses) if last else None
        # The batch's loss on every rank, sent from the rank holding the last stage.
        buffer = loss.reshape(1).float() if loss is not None else torch.zeros(1, device=self.device)
        loss = self.transport.all_reduce_sum(buffer, self.group, "while summing the batch's loss")[0]
        if self.data_parallel is None:
            return loss
        replicas = resolve_group(self.data_parallel).size
        return self.transport.all_reduce_sum(loss, self.data_parallel, "while averaging the replicas' loss") / replicas

    def _normalized_over_replicas(self, weights: List[float], count_over_replicas: bool) -> List[float]:
        """The loss weights of a normalized (summed) loss under data parallelism: the step ends by
        averaging the replicas' losses and gradients, so each replica's sum is weighted by their
        number to make that average the sum. With ``count_over_replicas`` (a callable normalizer,
        on the last stage's ranks: the weights' only users) this replica's count is summed with the
        others' over the data-parallel group first."""
        replicas = resolve_group(self.data_parallel).size
        if count_over_replicas:
            mine = torch.tensor([1.0 / weights[0]], dtype=torch.float64, device=self.device)
            total = float(self.transport.all_reduce_sum(mine, self.data_parallel,
                                                        "while summing the replicas' normalizers")[0])
            weights = [1.0 / total] * len(weights)
        return [weight * replicas for weight in weights]

    def _check_agreement(self, signature: int, shapes: str, timeline: bool,
                         refusal: Optional[Tuple[int, str]] = None, max_norm: Optional[float] = None) -> None:
        """Every rank runs the same schedule on the same shapes, or none runs anything; a rank
        refusing the step (``refusal``: ``(REFUSED_HOOK, REFUSED_FULLY_SHARD or REFUSED_UNLOADED,
        its message)``) stops every rank."""
        fields = ["schedule", "stages", "stages_per_rank", "chunks", "input shapes", "stage plan", "timeline",
                  "max_norm"]
        clip = zlib.crc32(repr(max_norm if max_norm is None else float(max_norm)).encode())
        mine = [SCHEDULES.index(self.schedule), self.num_stages, self.stages_per_rank, self.chunks, signature,
                self.plan_checksum, int(timeline), clip, refusal[0] if refusal else 0]
        rows = self.transport.all_gather_rows(torch.tensor(mine, dtype=torch.int64),
                                              "while comparing the ranks' options and batch shapes").tolist()
        if refusal:
            raise ValueError(refusal[1])
        refusing = [r for r, row in enumerate(rows) if row[-1]]
        if any(rows[r][-1] == REFUSED_UNLOADED for r in refusing):
            raise ValueError(f"pipeline: rank(s) {[r for r in refusing if rows[r][-1] == REFUSED_UNLOADED]} hold "
                             "parameters still on the meta device (their error names them); expected "
                             "torch_mp.load_full_state_dict(model, state_dict_or_path) on every rank first")
        if any(rows[r][-1] == REFUSED_FULLY_SHARD for r in refusing):
            raise ValueError(f"pipeline: rank(s) {[r for r in refusing if rows[r][-1] == REFUSED_FULLY_SHARD]} hold "
                             "modules sharded by torch.distributed.fsdp.fully_shard (their error names them); expected "
                             "pipeline(model, group=mesh['pp'], data_parallel=mesh['dp']) without fully_shard")
        if refusing:
            raise ValueError(f"pipeline: rank(s) {refusing} refuse a gradient hook on a parameter of their stages "
                             "(their error names it); expected chunks=1, or post-accumulate-grad hooks")
        differ = [(field, [row[i] for row in rows]) for i, field in enumerate(fields)
                  if any(row[i] != rows[0][i] for row in rows)]
        if any(field == "max_norm" for field, _ in differ):
            differ = [(field, values if field != "max_norm" else [max_norm if row[7] == mine[7] else "another value"
                                                                   for row in rows]) for field, values in differ]
        if differ:
            described = "; ".join(f"{field}: {_describe(field, values, shapes, self.rank)}" for field, values in differ)
            raise ValueError(f"pipeline: the ranks disagree before running the schedule ({described}); "
                             "expected every rank to call with the same options and the same batch shapes")

    def _run(self, actions, works, inputs, losses, count, train, timeline=False, max_norm=None):
        if train:
            parts, targets = inputs
            shapes = f"inputs {shapes_of(parts[0])}, targets {shapes_of(targets[0])}"
            signature = zlib.crc32(repr((shapes_of(parts), shapes_of(targets), True)).encode())
        else:
            shapes = f"inputs {shapes_of(inputs[0])}"
            signature = zlib.crc32(repr((shapes_of(inputs), False)).encode())
        # A parameter's gradient arrives in parts: one per micro-batch, and one per rank holding it.
        # Frozen ones (requires_grad False, alike on every rank) take no gradient and no sum.
        tied = [param for params, _ in self.ties for param in params if param.requires_grad] if train else []
        tied_ids = {id(param) for param in tied}
        in_parts = [(name, param) for name, param in self.module.named_parameters()
                    if train and not param.is_meta and (count > 1 or id(param) in tied_ids)]
        refusal = fully_sharded_refusal(self.module, "pipeline: train_step" if train else "pipeline: forward",
                                        [module for modules in self.fully_sharded.values() for module in modules])
        kind = REFUSED_FULLY_SHARD if refusal else REFUSED_HOOK
        unloaded = self.unloaded() if not refusal else []
        if unloaded:
            kind, refusal = REFUSED_UNLOADED, (
                f"pipeline: {'train_step' if train else 'forward'} on rank {self.rank}: {unloaded[:5]}"
                f"{f' and {len(unloaded) - 5} more' if len(unloaded) > 5 else ''} of this rank's stages are on "
                "the meta device (the model was built under torch_mp.init_empty_weights()); expected "
                "torch_mp.load_full_state_dict(model, state_dict_or_path) first, which fills this rank's share")
        refusal = refusal or refused_gradient_hooks(
            in_parts, "pipeline", f"{count} micro-batches" if count > 1 else "one per rank holding it",
            "expected the hook registered with register_post_accumulate_grad_hook (run once per step, on the whole "
            "gradient)" + (", or chunks=1" if count > 1 else ""))
        self._check_agreement(signature, shapes, timeline, refusal and (kind, refusal), max_norm)
        recorder = None
        if timeline:  # every rank's times count from the barrier's exit
            self.transport.all_gather_rows(torch.zeros(1), "while starting a timeline (a barrier)")
            recorder = Recorder(self.rank, [self.device] * self.num_stages)
        # Tied parameters sum this step's gradients across their ranks; what earlier steps left in
        # .grad (gradient accumulation) was summed already and is set aside meanwhile.
        earlier = [param.grad for param in tied]
        for param in tied:
            param.grad = None
        with held_post_accumulate_hooks([param for _, param in in_parts], whole=tied):
            self.transport.begin(recorder)
            step = RankStep(self, ThreadState(), lambda m: train and self._recompute(m, count))
            if train and self.schedule in ZERO_BUBBLE:
                step.first_slot, step.count = allocate_slots(self.num_stages * count), count
            try:
                micro_batches = step.run(actions, works, losses, recorder)
            except ValueError:
                # Raised by the forward on every rank alike: what this rank sent before lets the
                # others reach the same error, instead of waiting for it past the timeout.
                with contextlib.suppress(_C.CollectiveError):
                    self.transport.finish()
                raise
            self.transport.finish()
            self.transport.commit()
            if train and count > 1 and step.drew:
                warnings.warn(
                    f"pipeline: train_step draws random numbers (a dropout in training) in each of its {count} "
                    "micro-batches: each draws its own masks, a valid dropout but not the dense model's masks of "
                    "the whole batch; chunks=1 draws the dense model's (every rank seeded alike)", stacklevel=3)
            for (params, ranks) in self.ties if train else []:
                _sum_tied_gradients([param for param in params if param.requires_grad], ranks, self.transport)
            for param, grad in zip(tied, earlier):
                if grad is not None:
                    param.grad = grad if param.grad is None else grad + param.grad
            if train and self.data_parallel is not None:
                # The sharded layers' gradients are the replicas' mean already (FSDP2's reduce-scatter).
                sharded = {id(param) for layers in self.fully_sharded.values() for layer in layers
                           for param in layer.parameters()}
                average_over_replicas([param for param in self.module.parameters()
                                       if not param.is_meta and id(param) not in sharded],
                                      self.data_parallel, self.transport)
        if self.used is not None:
            self._hold_share()
        if recorder is not None:
            gathered: List = [None] * self.world
            dist.all_gather_object(gathered, recorder.events, group=self.group)
            self.module.last_timeline = Timeline([e for events in gathered for e in events], self.schedule,
                                                 self.num_stages, count, "rank")
        return micro_batches


    def _hold_share(self) -> None:
        """After the first call: each parameter and buffer outside the layers stays only on the ranks
        that computed with it (the embedding on the first stage's, the final norm and head on the
        last's; a weight tied across them on both, its gradient summed between just them, as
        Megatron-Core's embedding group does) and becomes meta on the others. One all-gather of a
        flag per tensor, so every rank places alike. A tensor no rank used stays on every rank."""
        tensors = [t for t in (*self.module.parameters(), *self.module.buffers()) if id(t) in self.tracked]
        flags = torch.tensor([id(t) in self.used for t in tensors], dtype=torch.int32)
        self.used = None
        rows = self.transport.all_gather_rows(flags, "while finding which ranks use the tensors outside the layers")
        for tensor, column in zip(tensors, rows.t().tolist()):
            if any(column):
                self.ranks_using[id(tensor)] = {rank for rank, used in enumerate(column) if used}
        self.ties = _keep_local_tensors(self.module, self.ranks_using, self, self.device)


class _ForwardOnly(torch.autograd.Function):
    """An output of ``model(...)`` of a pipeline across ranks in training mode: computed without a
    graph across the ranks, so a backward through it raises instead of giving no gradients."""

    @staticmethod
    def forward(ctx, tensor, anchor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "pipeline: backward through the output of model(...): across ranks the model's call runs the "
            "forward only (no graph spans the ranks, so no gradient would reach the stages' parameters); "
            "expected loss = model.train_step(inputs, target=..., loss_fn=...), which runs the forward and "
            "backward of every micro-batch (extra loss terms go inside loss_fn)")


def _sum_tied_gradients(params: List[nn.Parameter], ranks: Tuple[int, ...], transport) -> None:
    """Sums the gradients of parameters held by the pipeline ranks ``ranks`` (of its group) between
    just them, over the pipeline's own send/recv (``GroupTransport.sum_among``: no process group of
    their own, so a mesh's pipeline groups need no world-wide call), each wait bounded by the
    pipeline's timeout. One that no rank's step gave a gradient (unused by this batch's forward)
    keeps ``.grad`` None, as in the dense model: an optimizer then skips it (no weight decay on it)."""
    if not params:
        return
    took = torch.tensor([param.grad is not None for param in params], dtype=torch.int32, device=params[0].device)
    took = transport.sum_among(took, ranks, "while finding which tied parameters have gradients").tolist()
    for param, ranks_with_grad in zip(params, took):
        if ranks_with_grad:  # a DTensor's (tensor parallel's) local tensor, wrapped back after
            grad = local_tensor(param.grad) if param.grad is not None else torch.zeros_like(local_tensor(param))
            param.grad = like(param, transport.sum_among(grad, ranks, "while summing tied parameters' gradients"))


def average_over_replicas(params: List[nn.Parameter], group, transport) -> None:
    """The gradients averaged over the pipeline's data-parallel replicas (``group``): one all-reduce
    per device and dtype, of the gradients flattened, each wait bounded by the pipeline's timeout.
    A parameter no replica's step gave a gradient keeps ``.grad`` None; one that some replicas' did
    not (a branch on their data) takes zeros from them, as DDP's reducer does."""
    params = [param for param in params if param.requires_grad]
    if not params:
        return
    took = torch.tensor([param.grad is not None for param in params], dtype=torch.int32)
    took = transport.all_reduce_sum(took, group, "while finding which parameters have gradients on the replicas")
    params = [param for param, replicas in zip(params, took.tolist()) if replicas]
    replicas = resolve_group(group).size
    by_kind: Dict[tuple, List[nn.Parameter]] = {}
    for param in params:
        if param.grad is None:
            param.grad = like(param, torch.zeros_like(local_tensor(param)))
        by_kind.setdefault((param.grad.device, param.grad.dtype), []).append(param)
    for kind_params in by_kind.values():
        grads = [local_tensor(param.grad) for param in kind_params]  # a DTensor's local tensor
        flat = torch._utils._flatten_dense_tensors(grads)
        transport.all_reduce_sum(flat, group, "while averaging gradients over the data-parallel replicas",
                                 in_place=True)
        flat.div_(replicas)
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)


def _describe(field: str, values: List[int], shapes: str, rank: int) -> str:
    if field == "input shapes":
        groups = {}
        for r, value in enumerate(values):
            groups.setdefault(value, []).append(r)
        return (" / ".join(f"ranks {ranks}" for ranks in groups.values()) + f" differ; rank {rank}'s first "
                f"micro-batch has {shapes}")
    if field == "schedule":
        values = [SCHEDULES[v] for v in values]
    if field == "timeline":
        values = [bool(v) for v in values]
    return ", ".join(f"rank {r} has {value}" for r, value in enumerate(values))


def pipeline(
    module: nn.Module,
    group: GroupLike = None,
    balance: Balance = "auto",
    chunks: int = 1,
    schedule: str = "1f1b",
    stages_per_rank: Optional[int] = None,
    checkpoint: str = "never",
    layers: Optional[Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    batch_dim: int = 0,
    chunk_spec: ChunkSpec = None,
    output_merge: OutputMerge = None,
    sample=None,
    timeout: Optional[float] = None,
    data_parallel: GroupLike = None,
    fully_shard: Union[bool, dict] = False,
) -> nn.Module:
    """Runs ``module`` as a pipeline with one stage per rank of ``group``, in place, and returns it.

    Every rank calls this with the same full model (built from the same seed or loaded from the
    same checkpoint); each keeps the parameters its stages use and frees the others (they stay as
    meta tensors of the stock shapes). Then, on every rank with the same batch:

        loss = model.train_step(inputs, target=labels, loss_fn=F.cross_entropy)
        optimizer.step()

    Args:
        group: a ProcessGroup or 1-D DeviceMesh; None: the default group.
        balance: ``"auto"`` (even parameter bytes), ``"time"`` (even forward+backward time measured on
            ``sample``), or a list of layer counts per stage.
        chunks: micro-batches per batch; fewer than the stages works (with a larger bubble).
        schedule: ``"gpipe"``, ``"1f1b"`` (default), ``"interleaved_1f1b"``, or the zero-bubble
            ``"zb_h1"`` and ``"zbv"`` (Qi et al., ICLR 2024): each stage's backward computes the
            input gradient and leaves the ``nn.Linear`` weight gradients to a later W action that
            fills the bubble (other modules' weight gradients are computed with the input
            gradient; ``torch_mp._pipelining.zero_bubble``).
        stages_per_rank: stages on each rank (stage s on rank s % ranks; for ``"zbv"`` in a V: rank
            r holds stages r and 2 * ranks - 1 - r); 2 by default for the interleaved schedule and
            ZB-V (which runs only 2), 1 otherwise (``"1f1b"`` and ``"zb_h1"`` run only 1).
        checkpoint: ``"never"``, ``"except_last"`` or ``"always"``: recompute the forward of those
            micro-batches during their backward instead of keeping their activations.
        layers: the names of the layers to cut between, as for ``split``.
        device: this rank's device; by default ``cuda:<LOCAL_RANK % device count>`` for an NCCL group
            and the CPU otherwise.
        batch_dim: the dimension of the inputs (and targets) cut into micro-batches.
        chunk_spec: ``{forward input name: dim or None}``, as for ``split``.
        output_merge: how scalar outputs merge over micro-batches, as for ``split``.
        sample: inputs (a tuple of positional ones, or a dict) for ``balance="time"``.
        timeout: seconds a rank waits for a peer's activations or gradients before raising
            ``torch_mp.CollectiveError``; by default the group's timeout (10 minutes for NCCL,
            whose own watchdog bounds its work).
        data_parallel: the group of this pipeline's replicas (``mesh["dp"]``: the ranks holding the
            same stages and shards, each given its own batch), or None. ``train_step`` then ends by
            averaging every gradient over it (one all-reduce of the flattened gradients per device
            and dtype, after the sums across pipeline ranks, before ``max_norm`` clipping) and
            returns the mean of the replicas' losses: with batches of equal size and a mean loss,
            the dense model's gradients of the replicas' batches concatenated. The pipeline runs its
            own backward, one per micro-batch, so DDP's gradient hooks do not fit; the average after
            the schedule is Megatron-Core's ``finalize_model_grads``.
        fully_shard: with ``data_parallel`` a 1-D DeviceMesh (``mesh["dp"]``): True, or a dict of
            keyword arguments for it (``{"reshard_after_forward": False}``, ``mp_policy`` ...),
            applies FSDP2's ``torch.distributed.fsdp.fully_shard(layer, mesh=data_parallel,
            **options)`` to each layer of this rank's stages and to the placed modules outside the
            layers it holds (embedding on the first stage, final norm and head on the last; those
            are held by their stage's ranks from ``pipeline`` on), torchtitan's composition of
            FSDP2 with pipelining: each rank holds 1/(pp * dp) of the parameters, gradients and
            optimizer state (build the optimizer after ``pipeline``: FSDP2 replaces the
            parameters). Each module's gradient stays unsharded over the micro-batches and is
            reduce-scattered (the replicas' mean) in its stage's last backward
            (``set_requires_gradient_sync``, as ``torch.distributed.pipelining`` does). A module
            sharing a tensor with another (a tied embedding and head) stays whole on the ranks
            using it, its gradient averaged over the replicas after the schedule; so does a
            parameter the code outside the placed modules uses. Over ``tensor_parallel`` (on
            ``mesh["tp"]`` of the same ``init_mesh``), torch's 2-D composition: FSDP2 shards the
            tensor-parallel DTensor parameters over ``dp`` (2-D DTensors on (dp, tp)), each rank
            holding 1/(pp * dp * tp). ValueError without a DeviceMesh ``data_parallel``, for a dict
            holding ``mesh``, with a zero-bubble schedule (its deferred weight gradients bypass
            FSDP2's hooks) or ``checkpoint`` other than ``"never"``.

    Three-dimensional parallelism (torchtitan's order: tensor parallel, then pipeline, then data
    parallel) on a ``torch_mp.init_mesh(pp=, dp=, tp=)`` mesh::

        torch_mp.tensor_parallel(model, group=mesh["tp"])
        torch_mp.pipeline(model, group=mesh["pp"], data_parallel=mesh["dp"], chunks=4)

    Each rank keeps its stages' shards; the layers of other ranks' stages run as meta stand-ins, whose
    tensor-parallel collectives run on meta tensors (no communication); this rank's stages run theirs
    over its tensor-parallel group. ``pipeline`` before ``tensor_parallel`` is refused (ValueError
    naming this order). Before anything else runs, the options are compared over the
    tensor-parallel and data-parallel groups (one small all-gather each): ranks that disagree
    (``chunks``, ``schedule``, ``balance`` ...) raise ValueError naming the option and the ranks.

    The schedule is computed on every rank and checked (every message has its receiver, no
    deadlock) and the ranks compare their options and batch shapes before each step, so a mismatch
    is an error, not a hang. ``model(inputs)`` runs the forward only (without grad) and returns the
    output on every rank (its tensors broadcast from the rank holding the last stage, so that
    ``generate()``, called on every rank, picks the same tokens on each; a cache passed in keeps on
    each rank the keys and values of its own layers, meta tensors for the others'). Nothing is
    traced: every rank runs the model's own forward per micro-batch, other ranks' layers as stand-ins on meta tensors
    (``_pipeline_engine``), so ``**kwargs``, Python flags and branches on shapes work; a branch on
    the value of a tensor another rank computes raises ValueError. ``train_step`` takes
    ``normalizer=`` as ``split``'s does. Parameters and buffers outside the layers (embeddings,
    heads, norms, the root's own) live on every rank until the first call (``model(...)`` or
    ``train_step``) records which ranks compute with each; from then on each stays only there and
    is meta on the others: the embedding with the first stage's rank, the final norm and head with
    the last's, a weight tied across the ends (GPT-2's head, T5's shared embedding) on both, its
    gradient summed between just them after each step (Megatron-Core's embedding group). One used
    by code between the layers that every rank runs alike (a value computed from parameters alone)
    stays on every rank, its gradient summed over all of them. A later call that computes with a
    tensor on a rank where the first did not (a branch on a Python flag) fails: ValueError on that
    rank, ``torch_mp.CollectiveError`` on its peers past ``timeout``; call first the way that uses
    the most. ``model.compile(...)`` or ``torch.compile(model, ...)`` compiles
    the placed modules of this rank's stages with those options (one graph each, its backward by
    AOT autograd); the schedule, the sends and receives and the stand-ins stay eager. Schedules after GPipe (Huang et al., 2019), 1F1B (PipeDream,
    Narayanan et al., 2019) and interleaved 1F1B (Narayanan et al., 2021, Megatron-LM).

    Gradient hooks: with ``chunks > 1`` every parameter's gradient arrives in parts (one backward
    per micro-batch), and so does a parameter held by several ranks at any ``chunks`` (summed
    across them after the step). Their ``register_post_accumulate_grad_hook`` hooks are held back
    and run once per step, in their order of registration, on the whole gradient (after the sum
    across ranks); a ``register_hook`` hook on them, which would see each part, is refused as for
    ``split`` (on every rank, before anything runs). Hooks registered before ``pipeline`` stay on
    the parameters, which keep their identity (so does an optimizer built before it). Module
    backward hooks see each micro-batch's rows of the activations' gradients. ``copy.deepcopy`` of
    the result raises TypeError: copy the module before ``pipeline``.

    Raises TypeError for a ``module`` that is not an ``nn.Module`` or a ``group`` of another type;
    ValueError for an unknown ``schedule``, ``stages_per_rank`` that does not fit it, a ``balance``
    without one entry per stage, bad ``chunks`` / ``checkpoint`` / ``batch_dim`` values, or a
    module another torch_mp wrapper returned already, or a module FSDP2's ``fully_shard`` sharded
    (or one of its submodules: at ``pipeline``, or, sharded after it, at the next ``train_step`` or
    forward on every rank before the schedule runs; use ``data_parallel=``), or fewer layers than stages under
    ``balance="auto"`` / ``"time"``; during a step, ValueError when the ranks disagree on options or
    batch shapes, a rank refuses a gradient hook, the model computes a statistic over the whole batch
    in more than one micro-batch (as for ``split``), a reentrant ``torch.utils.checkpoint`` wraps
    another rank's layer with several stages per rank, or a placed module takes a tensor a later
    stage made (a layer applied again after the last: on every rank, before any backward, naming the
    module and its calls); and ``torch_mp.CollectiveError`` when a peer does not answer within
    ``timeout`` (every wait of the step: sends, receives, and its own collectives).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"pipeline: expected module to be a torch.nn.Module, got {type(module).__name__}")
    check_not_parallelized(module, "pipeline")
    refusal = fully_sharded_refusal(module, "pipeline")
    if refusal:
        raise ValueError(refusal)
    info = resolve_group(group, "pipeline(group=...)")
    dim_name = _dim_name(group, "group")
    group = process_group_of(group)
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline: schedule = {schedule!r}; expected one of {list(SCHEDULES)}")
    if stages_per_rank is None:
        stages_per_rank = 2 if schedule in ("interleaved_1f1b", "zbv") else 1
    if isinstance(stages_per_rank, bool) or not isinstance(stages_per_rank, int) or stages_per_rank < 1:
        raise ValueError(f"pipeline: stages_per_rank = {stages_per_rank!r}; expected an int >= 1")
    if schedule == "1f1b" and stages_per_rank != 1:
        raise ValueError(f"pipeline: schedule '1f1b' runs one stage per rank but stages_per_rank = "
                         f"{stages_per_rank}; expected 1, or schedule 'interleaved_1f1b'")
    stage_ranks = _C._pipeline_stage_ranks(schedule, info.size, stages_per_rank)  # ValueError for zb_h1/zbv
    check_options(chunks, schedule, checkpoint, batch_dim)
    device = _default_device(group) if device is None else check_device(device, "pipeline", "device")
    num_stages = info.size * stages_per_rank
    if not isinstance(balance, str) and isinstance(balance, Sequence) and len(balance) != num_stages:
        raise ValueError(f"pipeline: balance {list(balance)} has {len(balance)} entries but there are {num_stages} "
                         f"stages ({info.size} ranks x {stages_per_rank}); expected one layer count per stage")

    layer_names = check_layers(module, layers) if layers is not None else find_layers(module)
    if len(layer_names) < num_stages and (isinstance(balance, str) or not isinstance(balance, Sequence)):
        raise ValueError(f"pipeline: {dim_name} = {info.size} ranks x {stages_per_rank} stage(s) "
                         f"per rank = {num_stages} stages but {type(module).__name__} has {len(layer_names)} layers "
                         f"to cut (a stage holds one layer or more); expected at most "
                         f"{len(layer_names) // stages_per_rank} pipeline ranks for schedule '{schedule}'"
                         + (f", or a schedule with one stage per rank ('1f1b', 'zb_h1', 'gpipe') on up to "
                            f"{len(layer_names)} ranks" if stages_per_rank > 1 else ""))
    inner = state_of(module)
    replicas = _check_replica_group(data_parallel, group, inner)
    shard_options = _check_fully_shard(fully_shard, data_parallel, schedule, checkpoint, chunks, info.size)
    if shard_options is not None and any(param.is_meta for param in module.parameters()):
        raise ValueError(f"pipeline: fully_shard = {fully_shard!r} on a {type(module).__name__} whose parameters are on "
                         "the meta device (torch_mp.init_empty_weights()), not supported yet; expected a model with "
                         "its weights, or fully_shard=False and then torch_mp.load_full_state_dict")
    _check_same_options([("schedule", SCHEDULES.index(schedule)), ("chunks", chunks),
                         ("stages_per_rank", stages_per_rank), ("checkpoint", CHECKPOINTS.index(checkpoint)),
                         ("batch_dim", batch_dim), ("balance", zlib.crc32(repr(balance).encode())),
                         ("pipeline ranks", info.size), ("layers", zlib.crc32(repr(layer_names).encode())),
                         ("data_parallel size", replicas), ("fully_shard", shard_options is not None)],
                        ([inner.group] if inner is not None else []) + ([data_parallel] if replicas > 1 else []))
    costs = layer_costs(module, layer_names, sample, group, device) if balance == "time" else None
    _, stage_of = balanced_device_map(module, layer_names, [device] * num_stages, balance,
                                       [UNLIMITED] * num_stages, costs)
    stage_of = {name: stage for name, stage in stage_of.items() if name in layer_names or not _derived_only(module, name)}
    pipe = DistributedPipe(module, stage_of, num_stages, chunks, schedule, checkpoint, batch_dim, chunk_spec, output_merge,
                           group=group,
                           stages_per_rank=stages_per_rank, device=device,
                           timeout=datetime.timedelta(seconds=_timeout_of(info, device) if timeout is None else timeout),
                           data_parallel=process_group_of(data_parallel) if replicas > 1 else None)
    pipe.ranks_using, pipe.tracked = _ranks_using(module, stage_of, layer_names, stage_ranks)
    ends = pipe.claim_ends(layer_names) if shard_options is not None else []
    # Each rank's share is found at the first call (over the pipeline's group only: a mesh's other
    # pipeline groups find theirs meanwhile).
    pipe.used = set() if info.size > 1 and pipe.tracked else None
    pipe.ties = _keep_local_tensors(module, pipe.ranks_using, pipe, device)
    if shard_options is not None:
        pipe.shard_stages(layer_names + ends, data_parallel, shard_options)
    attach(module, ParallelState(PIPELINE, group=group, stage_of=stage_of, pipe=pipe, data_parallel=pipe.data_parallel),
           "pipeline")
    install_pipe(module, pipe)
    return module


def _dim_name(group: GroupLike, default: str) -> str:
    """A mesh dim's name (``"pp"``), else ``default``: what errors call the group."""
    names = getattr(group, "mesh_dim_names", None) if isinstance(group, dist.device_mesh.DeviceMesh) else None
    return names[0] if names else default


def _check_fully_shard(fully_shard, data_parallel: GroupLike, schedule: str, checkpoint: str, chunks: int,
                       ranks: int) -> Optional[dict]:
    """The keyword arguments of ``pipeline(..., fully_shard=)`` for FSDP2's ``fully_shard`` (None:
    no sharding); TypeError / ValueError for what it does not run with, before any collective."""
    if fully_shard is False:
        return None
    if fully_shard is not True and not isinstance(fully_shard, dict):
        raise TypeError(f"pipeline: fully_shard = {fully_shard!r}; expected True, False or a dict of keyword "
                        "arguments for torch.distributed.fsdp.fully_shard")
    options = {} if fully_shard is True else dict(fully_shard)
    if "mesh" in options:
        raise ValueError("pipeline: fully_shard holds 'mesh'; expected the mesh as data_parallel=mesh['dp'] "
                         "(the layers are sharded over it)")
    if not isinstance(data_parallel, dist.device_mesh.DeviceMesh):
        raise ValueError(f"pipeline: fully_shard = {fully_shard!r} with data_parallel a {type(data_parallel).__name__}; "
                         "expected data_parallel a 1-D DeviceMesh (mesh['dp']) to shard the stages' layers over")
    if schedule in ZERO_BUBBLE:
        raise ValueError(f"pipeline: fully_shard with schedule = {schedule!r}, whose deferred weight gradients "
                         "bypass FSDP2's gradient hooks; expected schedule 'gpipe', '1f1b' or 'interleaved_1f1b'")
    if schedule == "interleaved_1f1b" and chunks > ranks:
        raise ValueError(f"pipeline: fully_shard with schedule = 'interleaved_1f1b' and chunks = {chunks} > {ranks} "
                         "pipeline ranks, not supported yet (a rank's two stages interleave their micro-batches and "
                         "a layer runs on its resharded DTensor parameters); expected chunks <= the pipeline ranks "
                         "or schedule '1f1b'")
    if checkpoint != "never":
        raise ValueError(f"pipeline: fully_shard with checkpoint = {checkpoint!r}; expected checkpoint 'never' (the "
                         "pipeline's recompute runs a layer's forward outside FSDP2's hooks)")
    return options


def _check_replica_group(data_parallel: GroupLike, group, inner) -> int:
    """The size of the replicas' group (1 without one). Raises ValueError when it shares a rank other
    than this one with the pipeline's ``group`` or the tensor-parallel group under it (mesh["pp"]
    passed as data_parallel): the replicas must hold the same stages and shards."""
    if data_parallel is None:
        return 1
    replicas = resolve_group(data_parallel, "pipeline(data_parallel=...)")
    if replicas.size == 1:
        return 1
    mine = set(dist.get_process_group_ranks(process_group_of(data_parallel)))
    others = [("group", group)] + ([("the tensor-parallel group", inner.group)] if inner is not None else [])
    for what, other in others:
        shared = mine & set(dist.get_process_group_ranks(process_group_of(other) or dist.group.WORLD))
        if shared != {dist.get_rank()}:
            raise ValueError(f"pipeline: data_parallel = {_dim_name(data_parallel, 'a group')} of ranks {sorted(mine)} "
                             f"shares ranks {sorted(shared - {dist.get_rank()})} with {what}; expected the replicas' "
                             "group, orthogonal to the pipeline and tensor-parallel groups (mesh['dp'])")
    return replicas.size


def _check_same_options(options: List[tuple], groups: List) -> None:
    """Every rank of each of ``groups`` (a tensor-parallel and a data-parallel group) passes the
    same options to ``pipeline``: one all-gather of them per group; a ValueError naming the options
    and the ranks that differ, on every rank alike, before anything else runs."""
    mine = torch.tensor([value for _, value in options], dtype=torch.int64)
    for group in groups:
        rows = all_gather_rows(mine, group, "torch_mp.pipeline (options check)").cpu()
        ranks = dist.get_process_group_ranks(process_group_of(group) or dist.group.WORLD)
        differ = [i for i in range(len(options)) if not bool((rows[:, i] == rows[0, i]).all())]
        if differ:
            by_rank = "; ".join(f"{options[i][0]}: {rows[:, i].tolist()}" for i in differ)
            raise ValueError(f"pipeline: the ranks {ranks} of {_dim_name(group, 'a group')} pass different "
                             f"{', '.join(options[i][0] for i in differ)} (by rank: {by_rank}); expected the same "
                             "options on every rank of the mesh")


def _derived_only(module: nn.Module, name: str) -> bool:
    """Whether the module ``name`` owns only non-persistent buffers (tables derived from its
    configuration: rotary embeddings' frequencies). Outside the layers, such a module is held by
    every rank (``_ranks_using``) and left to no stage: its forward runs where its inputs are, as
    the code between the placed modules does. The stage it was cut with may come later in the call
    order (Llama's rotary embedding, defined after the layers, runs before the first), which a rank
    running two stages in turn could not wait for."""
    submodule = module.get_submodule(name)
    return (all(param is None for param in submodule._parameters.values())
            and all(name in submodule._non_persistent_buffers_set
                    for name, buffer in submodule._buffers.items() if buffer is not None))


def _timeout_of(info, device: torch.device) -> float:
    seconds = _C._group_timeout(info.name, info.size, device) if info.size > 1 else None
    return 600.0 if seconds is None else seconds


def _default_device(group) -> torch.device:
    backend = dist.get_backend(group) if dist.is_available() and dist.is_initialized() else "gloo"
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _ranks_using(module: nn.Module, stage_of: Dict[str, int], layer_names: List[str],
                 stage_ranks: List[int]) -> Tuple[Dict[int, set], set]:
    """The ranks holding each parameter and buffer (by id) when ``pipeline`` returns: a layer's, the
    rank of its stage; every rank for the others (embeddings, heads, norms, the root's own, and a
    layer's tensor that a module outside the layers holds too: a head tied to a layer's weight),
    which the forward may also use outside their modules (a head computed from the embedding's
    weight): the ranks that compute with them sum their gradients. Also the ids of those others:
    the first call finds which ranks compute with each (``DistributedPipe._hold_share``)."""
    ranks_using: Dict[int, set] = {}
    for name in layer_names:
        stage = stage_of[name]
        if name:
            submodule = module.get_submodule(name)
            for tensor in [*submodule.parameters(), *submodule.buffers()]:
                ranks_using.setdefault(id(tensor), set()).add(stage_ranks[stage])
    # Every tensor reachable outside the layers, a layer's own too (a head outside them tied to a
    # layer's weight): the code there may run on any rank.
    outside = set()
    for name, tensor in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if not any(_within(name, layer) for layer in layer_names):
            ranks_using[id(tensor)] = set(stage_ranks)
            outside.add(id(tensor))
    return ranks_using, outside


def _within(name: str, module_name: str) -> bool:
    """Whether the tensor ``name`` belongs to the module ``module_name`` ("" is the root)."""
    return not module_name or name.startswith(module_name + ".")


def _keep_local_tensors(module: nn.Module, ranks_using: Dict[int, set], pipe: DistributedPipe,
                        device: torch.device) -> List:
    """Moves the tensors this rank's stages use to ``device`` and the others to the meta device.
    Parameters stay the same Python objects (``_move_parameter``): an optimizer built before
    ``pipeline`` steps them, and it skips the other ranks' (meta, never given a ``.grad``).
    Returns the tied parameters (held on several ranks) that this rank holds, as ``(parameters,
    ranks)`` per set of ranks (of the pipeline's group), in the same order on every rank."""
    # Parameters by their first stock name: the same on every rank, so tied ones pair up in order.
    canonical = {id(param): name for name, param in module.named_parameters()}
    replaced: Dict[int, torch.Tensor] = {}
    tied: Dict[tuple, List] = {}
    # The layers FSDP2 shards (``pipeline(..., fully_shard=)``) hold what FSDP2 puts there: theirs to place.
    sharded = {id(submodule) for layers in pipe.fully_sharded.values() for layer in layers
               for submodule in layer.modules()}
    for submodule in module.modules():
        if id(submodule) in sharded:
            continue
        for table in (submodule._parameters, submodule._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in replaced:
                    ranks = tuple(sorted(ranks_using.get(id(tensor), ())))
                    target = device if pipe.rank in ranks else torch.device("meta")
                    if isinstance(tensor, nn.Parameter):
                        _move_parameter(tensor, target)
                        if len(ranks) > 1:
                            tied.setdefault(ranks, []).append((canonical[id(tensor)], tensor))
                        replaced[id(tensor)] = tensor
                    else:
                        with torch.no_grad():  # a buffer built on the meta device stays there, as parameters do
                            replaced[id(tensor)] = tensor if tensor.is_meta else tensor.to(target)
                table[name] = replaced[id(tensor)]
    # Sorted alike on every rank: the sums between overlapping sets of ranks run in one order.
    return [([param for _, param in sorted(tied[ranks], key=lambda item: item[0])], ranks)
            for ranks in sorted(tied) if pipe.rank in ranks]


def _move_parameter(param: nn.Parameter, device: torch.device) -> None:
    """Moves ``param`` to ``device`` in place, keeping the Python object (``swap_in``): optimizers,
    gradient hooks and their handles keep working on it. A gradient it holds moves with it; to the
    meta device it is dropped. One still on the meta device (built under ``init_empty_weights``)
    stays there: ``load_full_state_dict`` materializes this rank's share of it."""
    if param.device == device or param.is_meta:
        return
    with torch.no_grad():
        # A DTensor (tensor parallel's) moves its local tensor, keeping its mesh and placements.
        grad = like(param, local_tensor(param.grad).to(device)) \
            if param.grad is not None and device.type != "meta" else None
        swap_in(param, like(param, local_tensor(param).to(device)), grad)


def plain_train_step(module: nn.Module) -> Callable:
    """``train_step`` of a split without micro-batches: one forward and backward, with the loss
    conventions of the pipelined one. A method of ``module``: a deep copy's is the copy's."""
    return types.MethodType(_plain_train_step, module)


def _plain_train_step(module: nn.Module, *args, target=None, loss_fn: Callable, normalizer=None,
                      timeline: bool = False, max_norm: Optional[float] = None, **kwargs) -> torch.Tensor:
    _check_loss_fn(loss_fn)
    _check_max_norm(max_norm)
    if _check_timeline_flag(timeline):
        raise ValueError("split: train_step(..., timeline=True) records a pipeline's schedule, and this split "
                         "runs no schedule (chunks=1); expected split(..., chunks=M) with M > 1")
    output = module(*args, **kwargs)
    found = tensors_in(output)
    if target is not None and found:
        target = map_tensors(target, lambda t: t.to(found[0].device))
    loss = check_loss(loss_fn(output, target)) * loss_weights([1], target, normalizer)[0]
    loss.backward()
    if max_norm is not None:
        clip_grad_norm_(module, max_norm)
    return loss.detach()


def install_pipe(module: nn.Module, pipe: _Pipe) -> None:
    """The module's calls go through the pipeline from now on; ``train_step`` runs a schedule;
    ``compile(...)`` compiles the stages (``_pipelining/compiled.py``)."""
    install_entries(module, pipe)


def _check_max_norm(max_norm) -> None:
    if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                                 or not max_norm >= 0):
        raise ValueError(f"pipeline: train_step(..., max_norm={max_norm!r}); expected None or a number >= 0 (the "
                         "largest gradient norm, as for torch_mp.clip_grad_norm_)")


def _check_timeline_flag(timeline) -> bool:
    if not isinstance(timeline, bool):
        raise TypeError(f"pipeline: train_step(..., timeline={timeline!r}); expected True or False")
    return timeline


def layer_costs(module: nn.Module, layer_names: List[str], sample, group=None,
                 device: torch.device = torch.device("cpu")) -> List[int]:
    """Each layer's forward+backward time in microseconds on ``sample`` (the fastest of three runs
    after a warm-up), summed over the ranks of ``group`` so that every rank balances alike. What
    runs outside the layers goes with the stage that runs it: before the first layer (an
    embedding) with the first layer, after the last (final norm, an LLM's head over the
    vocabulary, often more than a layer) with the last."""
    times = time_layers(module, layer_names, sample, "balance='time'")
    seconds = [f + b for f, b in zip(times.forward, times.backward)]
    seconds[0] += times.before
    seconds[-1] += times.after
    costs = torch.tensor([max(1, int(s * 1e6)) for s in seconds], dtype=torch.int64, device=device)
    return all_reduce_sum(costs, group, "torch_mp.pipeline(balance='time')").tolist()


@dataclass
class LayerTimes:
    """Seconds on one sample, each the fastest of three runs after a warm-up: per layer ``forward``
    and ``backward``, and the whole model's (``total_forward``, ``total_backward``: the layers and
    what runs outside them, embeddings, heads); of that outside part, forward and backward,
    ``before`` the first layer starts its forward (and after its backward ends) and ``after`` the
    last layer's forward ends (and before its backward starts)."""
    forward: List[float]
    backward: List[float]
    total_forward: float
    total_backward: float
    before: float
    after: float


def time_layers(module: nn.Module, layer_names: List[str], sample, what: str) -> LayerTimes:
    """Times each layer's forward and backward (hooks around each) and the whole model's on
    ``sample`` (a tuple of positional inputs, a dict of keyword ones, or one input), the backward of
    the sum of the output's differentiable tensors. The model is left as found: its gradients,
    buffers (batch-norm statistics), modes, and the random generator's state. ``what`` names the
    caller in errors (ValueError without a sample or without a differentiable output)."""
    if sample is None:
        raise ValueError(f"{what} needs sample=: inputs to time the layers on (a tuple of positional "
                         "inputs or a dict of keyword inputs)")
    args, kwargs = (sample, {}) if isinstance(sample, tuple) else ((), sample) if isinstance(sample, dict) \
        else ((sample,), {})
    layers = [module.get_submodule(name) for name in layer_names]
    spent = {"forward": [0.0] * len(layers), "backward": [0.0] * len(layers)}
    started: Dict[int, float] = {}
    # Per run: the first layer start and the last layer end, of the forward and of the backward.
    edges: Dict[str, float] = {}
    handles = []
    for i, layer in enumerate(layers):
        def start(*_, i=i, kind="forward"):
            started[i] = time.perf_counter()
            edges.setdefault(kind, started[i])

        def stop(*_, i=i, kind="forward"):
            now = time.perf_counter()
            spent[kind][i] += now - started[i]
            edges[kind + " end"] = now

        handles += [layer.register_forward_pre_hook(start), layer.register_forward_hook(stop),
                    layer.register_full_backward_pre_hook(functools.partial(start, i=i, kind="backward")),
                    layer.register_full_backward_hook(functools.partial(stop, i=i, kind="backward"))]
    best = {"forward": [float("inf")] * len(layers), "backward": [float("inf")] * len(layers),
            "total_forward": float("inf"), "total_backward": float("inf"), "before": float("inf"),
            "after": float("inf")}
    grads = [(param, param.grad) for param in module.parameters()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            # Backward hooks on a first layer whose inputs need no grad fire on its outputs' grads, which
            # is what is timed; the warning about it says nothing to the user.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for run in range(4):  # a warm-up, then the fastest of three: a preempted run does not count
                for kind in ("forward", "backward"):
                    spent[kind][:] = [0.0] * len(layers)
                edges.clear()
                module.zero_grad(set_to_none=True)
                begin = time.perf_counter()
                output = module(*args, **kwargs)
                forward_done = time.perf_counter()
                floats: List[torch.Tensor] = []
                map_tensors(output, lambda t: floats.append(t) if t.is_floating_point() and t.requires_grad else None)
                if not floats:
                    raise ValueError(f"{what}: the model's output on sample has no tensor that requires grad; "
                                     "expected a differentiable output to time the backward")
                backward_begin = time.perf_counter()
                sum(t.float().sum() for t in floats).backward()
                backward_done = time.perf_counter()
                if run > 0:
                    for kind in ("forward", "backward"):
                        best[kind] = [min(b, s) for b, s in zip(best[kind], spent[kind])]
                    best["total_forward"] = min(best["total_forward"], forward_done - begin)
                    best["total_backward"] = min(best["total_backward"], backward_done - forward_done)
                    before = (edges.get("forward", begin) - begin) + (backward_done - edges.get("backward end",
                                                                                              backward_done))
                    after = (forward_done - edges.get("forward end", forward_done)) + (edges.get("backward", backward_done)
                                                                                     - backward_begin)
                    best["before"], best["after"] = min(best["before"], before), min(best["after"], after)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for param, grad in grads:
                param.grad = grad
            for buffer, value in buffers:
                buffer.copy_(value)
        for submodule, training in modes:
            submodule.training = training
    return LayerTimes(best["forward"], best["backward"], best["total_forward"], best["total_backward"],
                      best["before"], best["after"])
