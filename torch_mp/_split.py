"""Layer-wise split of a stock ``nn.Module`` across devices.

The model keeps its own forward. Its layers are moved to their devices, and a forward pre-hook on
each placed module moves every tensor entering it (positional, keyword, nested in tuples, lists and
dicts) to that module's device with :func:`torch_mp.to_device`, whose backward sends gradients back.
"""
from typing import List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from torch_mp._devices import DeviceLike, check_device
from torch_mp._layers import check_layers, find_layers
from torch_mp._pipelining.batch_norm import restore_batch_norms
from torch_mp._pipelining.cut import Balance, MemoryLike, balanced_device_map, explicit_device_map, parse_max_memory, place
from torch_mp._pipelining.pipeline import LocalPipe, check_options, install_pipe, layer_costs, plain_train_step
from torch_mp._state import SPLIT, ParallelState, attach, check_not_parallelized, detach, state_of
from torch_mp._tensors import move_tensors, mover


def split(
    module: nn.Module,
    devices: Sequence[DeviceLike],
    balance: Balance = "auto",
    max_memory: Optional[Union[Sequence[MemoryLike], Mapping[DeviceLike, MemoryLike]]] = None,
    layers: Optional[Sequence[str]] = None,
    output_device: Optional[DeviceLike] = None,
    chunks: int = 1,
    schedule: str = "gpipe",
    checkpoint: str = "never",
    batch_dim: int = 0,
    chunk_spec=None,
    output_merge=None,
    sample=None,
) -> nn.Module:
    """Places the layers of ``module`` on ``devices``, in place, and returns it.

    Args:
        module: any ``nn.Module``; its forward is kept as it is.
        devices: the devices, in layer order; one may appear several times (``["cpu", "cpu"]``).
        balance: ``"auto"``: contiguous runs of layers that even out parameter and buffer bytes,
            within ``max_memory``; ``"time"``: runs that even out forward+backward time measured on
            ``sample``; a list of layer counts per device; or a ``{module name: device}`` map that
            places modules explicitly and must cover every parameter and buffer.
        max_memory: the most bytes each device may hold (ints, or strings such as ``"2GiB"``), as
            a list aligned with ``devices`` or a ``{device: bytes}`` map.
        layers: the names of the modules that are the layers, in order. By default: the largest
            group of repeated blocks (a ``ModuleList`` of transformer blocks, a ResNet's stages).
        output_device: where the output lands; by default the first device.
        chunks: micro-batches per batch. Above 1 the devices work at once: the model's own forward
            runs once per micro-batch, each in a thread of its own, and a placed module's call
            waits for its stage's turn in the schedule. ``model(...)`` then returns the merged
            output (backward through it works, as one GPipe pass), and ``model.train_step(...,
            target=..., loss_fn=..., normalizer=None)`` runs forward and backward by ``schedule``
            and returns the loss (with ``chunks=1`` too: one forward and backward).
            ``model.compile(...)`` or ``torch.compile(model, ...)`` then compiles each placed module
            with those options (one graph each, its backward by AOT autograd), the schedule and
            micro-batching staying eager: ``model(...)`` and ``train_step`` run compiled stages.
        schedule: ``"gpipe"``, ``"1f1b"``, or the zero-bubble ``"zb_h1"`` and ``"zbv"`` (an even number
            of devices, stages s and n - 1 - s taking turns), for ``train_step``. The zero-bubble
            schedules compute each ``nn.Linear``'s weight gradient in a W action of its own, after
            the backward that sends the input gradient on (other modules' weight gradients come
            with their input gradient); in one process the W of every stage and the backwards take
            turns on one lock.
        checkpoint: ``"never"``, ``"except_last"`` or ``"always"``: which micro-batches recompute
            their placed modules' forwards during backward instead of keeping activations (in
            training; each recomputation replays the random numbers its forward drew).
        batch_dim: the dimension of the inputs (and targets) cut into micro-batches.
        chunk_spec: ``{forward input name: dim or None}``: inputs cut along another dimension, or
            passed whole to every micro-batch (None). Without it an input whose role is ambiguous
            (an ``[S, S]`` bias with S equal to the batch size) raises ValueError.
        output_merge: how a scalar output (0-dim in each micro-batch: a loss the model computes)
            merges into the batch's: ``"mean"`` (weighted by micro-batch sizes), ``"sum"``, or a
            callable ``(values, sizes) -> value``; one for every scalar, or a ``{output path:
            merge}`` map (``"loss"``, ``"extra.mean"``, ``"0"``). Without it a scalar output raises
            ValueError naming its path: a mean over samples is wrong for a sum or a token mean.
            ``"cat"`` for a path declares an output whose other dims follow the micro-batch size too
            (``[B, S]`` with S equal to it) one row per sample; without it such an output (CLIP's
            ``[B, B]`` logits, which compare the samples of a batch) raises ValueError naming it.
        sample: inputs to time the layers on for ``balance="time"`` (a tuple, or a dict of keywords).

    The result has ``device_map``: ``{module name: device}`` for every placed module. Parameter
    names, and so the state_dict, are the stock ones. Modules outside the layers (embeddings, final
    norms, heads) go with the layer nearest before them (the first layer for those before any);
    parameters tied between modules stay on the device of their first owner, and the later owners run
    there too.

    With ``chunks > 1`` outputs are merged field by field (tensors with one row per sample
    concatenated, scalars averaged by micro-batch size; tuples, lists, dicts, ModelOutput,
    dataclasses), what the forward writes into lists and dicts passed in reaches the caller's, and
    the gradients equal the unpipelined ones up to summation order. The forward must treat samples
    independently. A transformers ``Cache`` passed in is cut into one per micro-batch holding its
    rows (dim 0) and merged back into the caller's afterwards, and caches the forward returns are
    merged along the batch, so ``model.generate(...)`` gives the dense tokens (after transformers'
    ``batch_select_indices``); the pipelined forward keeps the model's signature, which
    ``generate`` reads. Batch norm normalizes each micro-batch with its own statistics in training (what
    a layer sees of the batch), while its running statistics are updated once per batch from the
    whole batch's statistics, as without a pipeline. Pipelining after GPipe (Huang et al., 2019,
    arXiv:1811.06965) and PipeDream's 1F1B (Narayanan et al., 2019); the placement by bytes after
    accelerate's ``device_map="auto"``. ``torch_mp.state_of(module)`` returns the split's record.

    Gradient hooks with ``chunks > 1``: ``train_step`` runs one backward per micro-batch, so each
    parameter's gradient arrives in parts. Hooks registered with
    ``param.register_post_accumulate_grad_hook`` are held back meanwhile and run once per step, in
    their order of registration, on the whole batch's gradient (what the dense model's backward
    does). A ``param.register_hook`` hook would see each part, and unless linear give other numbers
    (a clamp, a clip by norm): ``train_step`` refuses it before anything runs (torch_mp's own hooks
    are linear). ``model(...)``'s merged output has one backward, in which every hook sees the whole
    gradient. Module backward hooks (``register_full_backward_hook``) see each micro-batch's rows of
    the activations' gradients: like the forward, they must treat samples independently.

    ``copy.deepcopy`` of a split with ``chunks=1`` is a split of its own (its ``train_step`` trains
    the copy); with ``chunks > 1`` it raises TypeError, since the pipeline runs the original's
    stages: copy the module first, then split the copy.

    Raises TypeError for a ``module`` that is not an ``nn.Module`` or ``devices`` that are not a
    list of devices; ValueError for an empty or unknown device, layers that do not fit in
    ``max_memory``, a ``balance`` that does not match the layers, bad ``chunks`` / ``schedule`` /
    ``checkpoint`` / ``batch_dim`` values, or a module another torch_mp wrapper (``pipeline``,
    ``tensor_parallel``) returned already. A second ``split`` of a split module replaces the first.
    ``train_step`` with ``chunks > 1`` raises ValueError naming the parameters that hold a
    ``register_hook`` hook (expected: ``chunks=1``, or a post-accumulate-grad hook). A call or
    ``train_step`` in more than one micro-batch raises ValueError, before anything runs, where the
    model computes a statistic over the whole batch: a norm using batch statistics that is not a
    deferred batch norm (``track_running_stats=False``, in eval mode too), or transformers' MoE
    load-balancing loss (``output_router_logits=True``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"split: expected module to be a torch.nn.Module, got {type(module).__name__}")
    devices = _parse_devices(devices)
    output_device = devices[0] if output_device is None else check_device(output_device, "split", "output_device")
    check_options(chunks, schedule, checkpoint, batch_dim, allowed=("gpipe", "1f1b", "zb_h1", "zbv"))
    if schedule == "zbv" and len(devices) % 2:
        raise ValueError(f"split: schedule 'zbv' pairs the stages in a V (stages s and {len(devices)} - 1 - s take "
                         f"turns) but there are {len(devices)} devices; expected an even number of devices")
    _remove_split_hooks(module)
    check_not_parallelized(module, "split")

    if isinstance(balance, Mapping):
        if layers is not None:
            raise ValueError("split: pass either layers= or a {module name: device} balance, not both")
        device_map = explicit_device_map(module, balance)
        distinct = list(dict.fromkeys(device_map.values()))
        stage_of = {name: distinct.index(device) for name, device in device_map.items()}
    else:
        layer_names = check_layers(module, layers) if layers is not None else find_layers(module)
        costs = layer_costs(module, layer_names, sample) if balance == "time" else None
        device_map, stage_of = balanced_device_map(module, layer_names, devices, balance,
                                                    parse_max_memory(max_memory, devices), costs)

    device_map = place(module, device_map)
    for name, device in device_map.items():  # modules moved to a tied parameter's device
        stage_of.setdefault(name, min(stage_of[other] for other, d in device_map.items()
                                      if d == device and other in stage_of))
    state = attach(module, ParallelState(SPLIT, device_map=device_map, stage_of=stage_of,
                                         output_device=output_device), "split")
    if chunks > 1:
        stages = {name: stage for name, stage in stage_of.items() if name in device_map}
        state.pipe = LocalPipe(module, stages, len(devices), chunks, schedule, checkpoint, batch_dim, chunk_spec,
                               output_merge, devices=devices, output_device=output_device)
        install_pipe(module, state.pipe)
        return module
    # A device named more than once holds several stages; inputs entering them are copied all the
    # same, so the split behaves (and is tested) as it would across distinct devices.
    repeated = {device for device in devices if devices.count(device) > 1}
    state.hooks = [
        module.get_submodule(name).register_forward_pre_hook(_inputs_to(device, device in repeated),
                                                             with_kwargs=True)
        for name, device in device_map.items()
    ]
    state.hooks.append(module.register_forward_hook(_outputs_to(output_device, output_device in repeated)))
    module.train_step = plain_train_step(module)
    return module


# --- devices and sizes -------------------------------------------------------------------------


def _parse_devices(devices: Sequence[DeviceLike]) -> List[torch.device]:
    if isinstance(devices, (str, torch.device, int)) or not isinstance(devices, Sequence):
        raise TypeError(f"split: expected devices to be a list of devices, got {devices!r}")
    if not devices:
        raise ValueError("split: devices is empty; expected at least one device")
    return [check_device(device, "split", f"devices[{i}]") for i, device in enumerate(devices)]


# --- which modules are the layers ------------------------------------------------------------


# --- device maps ------------------------------------------------------------------------------


# --- hooks ------------------------------------------------------------------------------------


def _inputs_to(device: torch.device, always: bool):
    move = mover(device, always)

    def hook(module, args, kwargs):
        return move_tensors(args, move), move_tensors(kwargs, move)

    return hook


def _outputs_to(device: torch.device, always: bool):
    move = mover(device, always)

    def hook(module, args, output):
        return move_tensors(output, move)

    return hook


def _remove_split_hooks(module: nn.Module) -> None:
    """Undoes an earlier ``split`` of ``module`` (a module returned by another wrapper stays as it
    is; ``attach`` then refuses it)."""
    state = state_of(module)
    if state is None or state.kind != SPLIT:
        return
    detach(module)
    for handle in state.hooks:
        handle.remove()
    module.__dict__.pop("train_step", None)
    if state.pipe is not None:  # a pipelined split's: its placed modules' forwards are gated
        restore_batch_norms(module)
        for name in state.device_map:
            module.get_submodule(name).__dict__.pop("forward", None)
        for name in ("forward", "compile", "last_timeline"):
            module.__dict__.pop(name, None)
