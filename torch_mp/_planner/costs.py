"""The planner's cost table: what one layout's step time and memory are computed from, measured once
on this device (or given). Every figure here is per sample row or per layer of the plain model; the
arithmetic that turns them into a layout's cost is in ``model.py``."""
import dataclasses
import datetime
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torch_mp._group import all_reduce, process_group_of, resolve_group
from torch_mp._layers import find_layers
from torch_mp._pipelining.pipeline import average_over_replicas, time_layers
from torch_mp._pipelining.transport import GroupTransport
from torch_mp._tensor_parallel.dtensor import local_tensor
from torch_mp._tensors import map_tensors, tensors_in


@dataclass(frozen=True)
class Line:
    """Seconds as a function of the rows of a micro-batch: ``fixed + per_row * rows`` (the fixed
    part is what small micro-batches pay per call: kernel launches, Python)."""
    fixed: float
    per_row: float

    def at(self, rows: float) -> float:
        return self.fixed + self.per_row * rows

    @staticmethod
    def through(one_row: float, rows: int, at_rows: float) -> "Line":
        """The line through (1, ``one_row``) and (``rows``, ``at_rows``); proportional for one row;
        a measured slope below zero (noise) is flattened to zero."""
        if rows <= 1:
            return Line(0.0, at_rows)
        per_row = max(0.0, (at_rows - one_row) / (rows - 1))
        return Line(max(0.0, one_row - per_row), per_row)


@dataclass(frozen=True)
class CostTable:
    """What the planner's cost model reads, for one model, one device and the links of its mesh.

    Times are seconds on this device, per layer (``layers`` in order) and for what runs outside the
    layers (embeddings, final norm, head: charged to the last stage). Bytes of parameters are
    per layer and outside (``first_param_bytes`` with the first stage: embeddings; ``last_param_bytes``
    with the last: final norm, head), each with the part tensor parallelism divides (matrices; norms
    and biases of row-parallel layers stay whole); ``tied_param_bytes`` (and its divided part,
    ``tied_sharded_bytes``), those of ``first_param_bytes`` tied to a module after the layers (GPT-2's
    head, the embedding's weight), which a pipeline's last stage holds too. Activation bytes are those autograd saves per
    sample row in each layer's forward (``saved_tensors_hooks``), ``boundary_bytes`` a layer's
    output per row (what a stage sends, what a tensor-parallel all-reduce carries) and
    ``output_bytes`` the model's floating-point output per row (the logits: what the loss's backward
    makes two gradients of, and what the loss saves of it, the log-probabilities; 0: not
    counted). Collectives
    follow the alpha-beta model (Hockney 1994; ring all-reduce as in Thakur et al. 2005):
    ``2 (n - 1) (alpha_s + beta_s_per_byte * bytes / n)`` for an all-reduce over n ranks (the
    2 (n - 1) steps of a ring's reduce-scatter and all-gather),
    ``alpha_s + beta_s_per_byte * bytes`` for a send; each mesh dim over its own link (past one
    node, tensor parallel within a node, data parallel and the pipeline's sends across them):
    ``tp_link``, ``dp_link``, ``pp_link`` as ``(alpha_s, beta_s_per_byte)`` (``measure_costs``
    fits each on its own group: ``fit_links``), or None for ``alpha_s`` and ``beta_s_per_byte``.
    ``tp_must_divide``: the counts tensor
    parallelism must divide (heads, key-value heads, experts); ``all_reduces_per_layer``: a
    transformer block's 2 (attention, MLP); ``experts``: per MoE layer (0: none);
    ``sequence_parallel``: whether the layers take (batch, sequence, hidden) activations, which
    sequence parallelism can cut along the sequence.
    ``host_cores`` and ``host_ranks``: CPU ranks sharing one host's processors: how many of them
    compute at full speed at once (the host's cores over each rank's threads) and how many ranks
    a host runs. The times are measured with every rank of a host computing at once; in a pipeline
    whose other ranks wait, a rank computes faster, up to ``host_ranks / host_cores`` times
    (``torch_mp::planner::CostTable::speedup``). ``host_cores=0`` (GPUs): a device per rank.

    ``torch_mp.plan(..., sample=)`` measures one (``torch_mp._planner.costs.measure_costs``);
    pass your own as ``plan(..., costs=)`` (``dataclasses.replace`` of a measured one, or made from
    another device's figures) for a plan that is a pure function of it.

    Raises TypeError for a missing field (a dataclass); ``dataclasses.FrozenInstanceError`` on
    assigning one.
    """
    layers: Tuple[str, ...]
    forward: Tuple[Line, ...]
    backward: Tuple[Line, ...]
    outside_forward: Line
    outside_backward: Line
    param_bytes: Tuple[int, ...]
    sharded_param_bytes: Tuple[int, ...]
    first_param_bytes: int
    first_sharded_bytes: int
    last_param_bytes: int
    last_sharded_bytes: int
    activation_bytes: Tuple[int, ...]
    outside_activation_bytes: int
    boundary_bytes: int
    output_bytes: int = 0
    param_element_size: int = 4
    alpha_s: float = 50e-6
    beta_s_per_byte: float = 1e-9
    tp_must_divide: Tuple[int, ...] = ()
    all_reduces_per_layer: int = 2
    experts: int = 0
    sequence_parallel: bool = False
    tp_link: Optional[Tuple[float, float]] = None
    dp_link: Optional[Tuple[float, float]] = None
    pp_link: Optional[Tuple[float, float]] = None
    tied_param_bytes: int = 0
    tied_sharded_bytes: int = 0
    host_cores: float = 0.0
    host_ranks: int = 1

    def link(self, dim: str) -> Tuple[float, float]:
        """``(alpha_s, beta_s_per_byte)`` of mesh dim ``dim`` ("tp", "dp" or "pp")."""
        own = {"tp": self.tp_link, "dp": self.dp_link, "pp": self.pp_link}[dim]
        return own if own is not None else (self.alpha_s, self.beta_s_per_byte)

    def all_reduce_s(self, nbytes: float, ranks: int, dim: str) -> float:
        """Seconds of a ring all-reduce of ``nbytes`` over ``ranks`` ranks of mesh dim ``dim``."""
        alpha, beta = self.link(dim)
        return 0.0 if ranks <= 1 else 2 * (ranks - 1) * (alpha + beta * nbytes / ranks)

    def send_s(self, nbytes: float) -> float:
        """Seconds of a send of ``nbytes`` between pipeline ranks (the "pp" link)."""
        alpha, beta = self.link("pp")
        return alpha + beta * nbytes


MESH_DIMS = ("tp", "dp", "pp")
Collectives = Union[Tuple[float, float], Dict[str, Tuple[float, float]]]


def _links(collectives, name: str) -> Dict[str, Tuple[float, float]]:
    """``collectives`` as ``{dim: (alpha_s, beta_s_per_byte)}``: a pair for every dim, or a dict of
    some dims."""
    def pair(value) -> bool:
        return isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)

    if pair(collectives):
        return {dim: (float(collectives[0]), float(collectives[1])) for dim in MESH_DIMS}
    if isinstance(collectives, dict) and collectives and set(collectives) <= set(MESH_DIMS) \
            and all(pair(v) for v in collectives.values()):
        return {dim: (float(v[0]), float(v[1])) for dim, v in collectives.items()}
    raise ValueError(f"{name}: collectives = {collectives!r}; expected (alpha_s, beta_s_per_byte), two numbers >= 0, "
                     f"or a dict of such pairs by mesh dim, keys among {list(MESH_DIMS)}")


def with_links(costs: CostTable, collectives: Collectives) -> CostTable:
    """``costs`` with the links of ``collectives`` (as for ``measure_costs``) in place of its own."""
    return dataclasses.replace(costs, **{f"{dim}_link": link for dim, link in _links(collectives, "plan").items()})


def _rows(sample) -> int:
    tensors = tensors_in(sample)
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("plan: sample has no tensor with a batch dim; expected inputs (a tuple or a dict) whose "
                         "first tensor's dim 0 counts the samples")
    return tensors[0].shape[0]


def _saved_bytes(module: nn.Module, layer_names: List[str], sample) -> Tuple[List[int], int, int, int]:
    """Bytes autograd saves in each layer's forward on ``sample`` and outside the layers (each
    storage once, parameters not counted), the bytes of the largest layer output and of the
    output's floating-point tensors; of a DTensor, its local tensor (what this rank holds)."""
    args, kwargs = (sample, {}) if isinstance(sample, tuple) else ((), sample) if isinstance(sample, dict) \
        else ((sample,), {})
    params = {local_tensor(p).untyped_storage().data_ptr() for p in module.parameters()}
    seen: set = set()
    # The counted storages stay alive until the forward ends: a freed one's address, reused by a
    # later saved tensor, would count that one as seen.
    kept: List[torch.UntypedStorage] = []
    per_layer = [0] * len(layer_names)
    outside = [0]
    boundary = [0]
    current: List[int] = []
    handles = []
    for i, name in enumerate(layer_names):
        layer = module.get_submodule(name)

        def enter(*_, i=i):
            current.append(i)

        def leave(_module, _inputs, output):
            current.pop()
            boundary[0] = max([boundary[0]] + [local_tensor(t).nbytes for t in tensors_in(output)])

        handles += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]

    def pack(tensor):
        storage = local_tensor(tensor).untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen and storage.device.type != "meta":
            seen.add(storage.data_ptr())
            kept.append(storage)
            if current:
                per_layer[current[-1]] += storage.nbytes()
            else:
                outside[0] += storage.nbytes()
        # The graph keeps nothing: this forward never runs backward, and a saved parameter would keep
        # a reference to it that outlives the graph (torch.utils.swap_tensors, which pipeline() uses on
        # the same model afterwards, then refuses it).

    try:
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            output = module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    kept.clear()
    # The loss keeps the output (a log-softmax over the logits, for cross entropy) once more.
    output_bytes = sum(t.numel() * t.element_size() for t in tensors_in(output) if t.is_floating_point())
    return per_layer, outside[0] + output_bytes, boundary[0], output_bytes


def _param_bytes(module: nn.Module, layer_names: List[str]):
    """(per layer total, per layer sharded, first total, first sharded, last total, last sharded,
    tied total, tied sharded): matrices count as sharded (in a tensor-parallel model: the DTensors
    sharded on some dim, counted at their global size); tensors outside the layers go with the
    first stage when their module comes before the first layer, else with the last (as the
    pipeline's cut places them); a first-stage tensor that a module after the layers holds too
    (a tied head) counts once more as tied."""
    seen: set = set()
    index = {name: i for i, name in enumerate(layer_names)}
    totals = [[0, 0] for _ in layer_names]
    first, last, tied = [0, 0], [0, 0], [0, 0]
    firsts: set = set()
    before_first = True
    for name, param in module.named_parameters(remove_duplicate=False):
        owner = next((index[layer] for layer in layer_names if name.startswith(layer + ".")), None)
        if owner is not None:
            before_first = False
        if id(param) in seen:
            if id(param) in firsts and owner is None and not before_first:
                firsts.discard(id(param))  # once, however many modules after the layers hold it
                slot = tied
            else:
                continue
        elif owner is not None:
            slot = totals[owner]
        else:
            slot = first if before_first else last
            if before_first:
                firsts.add(id(param))
        seen.add(id(param))
        nbytes = param.numel() * param.element_size()
        slot[0] += nbytes
        placements = getattr(param, "placements", None)
        sharded = any(p.is_shard() for p in placements) if placements is not None else param.dim() >= 2
        slot[1] += nbytes if sharded else 0
    return ([t for t, _ in totals], [s for _, s in totals], first[0], first[1], last[0], last[1], tied[0], tied[1])


def _tp_constraints(module: nn.Module) -> Tuple[Tuple[int, ...], int, int]:
    """What tensor parallelism must divide (heads, key-value heads, experts or their width), the
    all-reduces per layer (attention and MLP: 2; a plain MLP block: 1) and the experts (0: none),
    read from a transformers config when there is one (a transformer: sequence parallel applies),
    else from the widths of the linear layers."""
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "num_attention_heads", None):
        divide = [config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads]
        experts = getattr(config, "num_local_experts", 0) or 0
        if experts:
            divide.append(experts)
        return tuple(divide), 2, experts
    widths = sorted({m.out_features for m in module.modules() if isinstance(m, nn.Linear)})
    return (widths[-1],) if widths else (), 1, 0


def _line_through(xs: List[float], ys: List[float], group) -> Tuple[float, float]:
    """``(alpha_s, beta_s_per_byte)``: the line through (bytes, seconds) of least relative squared
    error (each point weighted by 1 / seconds^2, so the small sizes fix alpha as the large ones fix
    beta), the slowest rank's seconds of each size (so every rank of ``group`` fits alike)."""
    slowest = all_reduce(torch.tensor(ys, dtype=torch.float64), "max", group, "plan").tolist()
    weights = [1 / y ** 2 for y in slowest]
    total = sum(weights)
    mean_x = sum(w * x for w, x in zip(weights, xs)) / total
    mean_y = sum(w * y for w, y in zip(weights, slowest)) / total
    beta = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in zip(weights, xs, slowest)) / \
        sum(w * (x - mean_x) ** 2 for w, x in zip(weights, xs))
    beta = max(beta, 1e-12)
    return max(mean_y - beta * mean_x, 1e-6), beta


def _device_of(group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(process_group_of(group)) == "nccl" else torch.device("cpu")


SIZES = (256, 16384, 262144, 4194304)


def _median_seconds(op: Callable[[], object], pg, device: torch.device) -> float:
    """The median seconds of five runs of ``op`` after a warm-up, each after a barrier of ``pg``
    and, on CPU, a burst of compute (a 256 x 256 matmul, ten times) that is not counted: as in a
    training step, the ranks come to the collective from their computations, and on a host whose
    ranks share cores the collective waits for each to be scheduled again."""
    burst = torch.ones(256, 256) if device.type == "cpu" else None
    times = []
    for _ in range(6):
        dist.barrier(pg)
        if burst is not None:
            for _ in range(10):
                torch.mm(burst, burst)
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[2]


def fit_collectives(group=None, sizes=SIZES) -> Tuple[float, float]:
    """``(alpha_s, beta_s_per_byte)`` of one step of a ring all-reduce (``CostTable.all_reduce_s``:
    2 (n - 1) of them, each of bytes / n): a line (``_line_through``) through the median time of
    five float32 all-reduces of each size (elements; up to 16 MiB) over ``group``, over its steps
    (every rank calls it; the slowest rank's times count, so every rank fits alike). With one rank,
    the defaults of ``CostTable``."""
    info = resolve_group(group, "plan(group=...)")
    if info.size == 1:
        return CostTable.alpha_s, CostTable.beta_s_per_byte
    pg = process_group_of(group)
    device = _device_of(group)
    xs, ys = [], []
    for size in sizes:
        tensor = torch.ones(size, device=device)
        xs.append(size * 4 / info.size)
        ys.append(_median_seconds(lambda: dist.all_reduce(tensor, group=pg), pg, device) / (2 * (info.size - 1)))
    return _line_through(xs, ys, group)


def fit_gradient_average(group=None, sizes=SIZES + (16777216,)) -> Tuple[float, float]:
    """``(alpha_s, beta_s_per_byte)`` of the data-parallel average of a rank's gradients over
    ``group`` as a pipeline's step runs it (``average_over_replicas``: the gradients flattened,
    all-reduced in place, divided and copied back), a line (``_line_through``) through the median
    time of five on float32 gradients of each size (elements; up to 64 MiB: past 32 MiB each
    step's flat buffer is new memory), per step of a ring all-reduce as ``fit_collectives`` (every
    rank calls it). With one rank, the defaults of ``CostTable``."""
    info = resolve_group(group, "plan(group=...)")
    if info.size == 1:
        return CostTable.alpha_s, CostTable.beta_s_per_byte
    pg = process_group_of(group)
    device = _device_of(group)
    transport = GroupTransport(pg, info.rank, device, datetime.timedelta(minutes=5))
    xs, ys = [], []
    for size in sizes:
        param = nn.Parameter(torch.ones(size, device=device))
        param.grad = torch.ones_like(param)
        xs.append(size * 4 / info.size)
        ys.append(_median_seconds(lambda: average_over_replicas([param], pg, transport), pg, device) /
                  (2 * (info.size - 1)))
    return _line_through(xs, ys, group)


def fit_sends(group=None, sizes=SIZES) -> Tuple[float, float]:
    """``(alpha_s, beta_s_per_byte)`` of a send between neighbouring ranks of ``group`` (a
    pipeline's stages): half the median round trip of five float32 tensors of each size (elements)
    between its ranks 2i and 2i + 1 (an odd last rank waits), a line (``_line_through``) through
    the slowest pair's (every rank calls it). With one rank, the defaults of ``CostTable``."""
    info = resolve_group(group, "plan(group=...)")
    if info.size == 1:
        return CostTable.alpha_s, CostTable.beta_s_per_byte
    pg = process_group_of(group)
    device = _device_of(group)
    partner = info.rank ^ 1
    peer = dist.get_global_rank(pg, partner) if partner < info.size else None
    def round_trip(tensor):
        if peer is not None and info.rank % 2 == 0:
            dist.send(tensor, peer, group=pg)
            dist.recv(tensor, peer, group=pg)
        elif peer is not None:
            dist.recv(tensor, peer, group=pg)
            dist.send(tensor, peer, group=pg)

    xs, ys = [], []
    for size in sizes:
        tensor = torch.ones(size, device=device)
        xs.append(size * 4)
        ys.append(_median_seconds(lambda: round_trip(tensor), pg, device) / 2)
    return _line_through(xs, ys, group)


def _dim_groups(group) -> Dict[str, object]:
    """The group each mesh dim's link is fitted on: of a DeviceMesh whose dims are named among
    ``MESH_DIMS``, each such dim of 2 or more ranks (``mesh[dim]``); the others, or all for a
    process group (None: the default one) of n ranks, as ``init_mesh`` lays out a pipeline of 2
    stages (pp outermost, tp innermost): "tp" over ranks next to each other (n/2 of them: within a
    node), "pp" between ranks n/2 apart, "dp" over all n (the widest data-parallel group). With
    fewer than 4 ranks, the whole group for each."""
    mesh = group if _is_mesh(group) else None
    dims = {dim: mesh[dim] for dim in (mesh.mesh_dim_names if mesh is not None else ())
            if dim in MESH_DIMS and mesh[dim].size() > 1}
    if len(dims) == len(MESH_DIMS):
        return dims
    world = None if mesh is not None else group
    size = resolve_group(world, "plan(group=...)").size
    if size < 4 or size % 2:
        return {dim: dims.get(dim, world) for dim in MESH_DIMS}
    halves = init_device_mesh(_device_of(world).type, (2, size // 2), mesh_dim_names=("pp", "tp")) \
        if world is None or world is dist.group.WORLD else None
    if halves is None:  # a subgroup: its own ranks, not the world's layout
        return {dim: dims.get(dim, world) for dim in MESH_DIMS}
    return {"tp": dims.get("tp", halves["tp"]), "dp": dims.get("dp", world), "pp": dims.get("pp", halves["pp"])}


def host_sharing(group=None) -> Tuple[float, int]:
    """``(host_cores, host_ranks)`` of ``CostTable`` for the ranks of ``group`` (every rank calls
    it): for CPU ranks, the cores this process may run on over its torch threads, and the ranks of
    the group on this host (by host name, the most on any host); ``(0.0, 1)`` for one rank or GPU
    ranks (a device each)."""
    info = resolve_group(group, "plan(group=...)")
    if info.size == 1 or _device_of(group).type != "cpu":
        return 0.0, 1
    names = [None] * info.size
    dist.all_gather_object(names, socket.gethostname(), group=process_group_of(group))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # not on macOS
    return cores / torch.get_num_threads(), max(names.count(name) for name in set(names))


def _is_mesh(group) -> bool:
    """A DeviceMesh of named dims among ``MESH_DIMS`` (``init_mesh``'s), not a 1-D group."""
    names = getattr(group, "mesh_dim_names", None) if isinstance(group, DeviceMesh) else None
    return bool(names) and set(names) <= set(MESH_DIMS)


def fit_links(group=None, dims: Sequence[str] = MESH_DIMS) -> Dict[str, Tuple[float, float]]:
    """``{dim: (alpha_s, beta_s_per_byte)}`` for each of ``dims`` ("tp", "dp", "pp"), each fitted on its own group
    (``_dim_groups``), each by what a step runs over it: all-reduces for "tp"
    (``fit_collectives``), the gradients' average for "dp" (``fit_gradient_average``), sends
    between neighbours for "pp" (``fit_sends``), each after a burst of compute
    (``_median_seconds``). Every rank of ``group`` (a process group, None: the default one, or an
    ``init_mesh`` DeviceMesh) calls it and gets the same fits."""
    groups = _dim_groups(group)
    fits = {"tp": fit_collectives, "dp": fit_gradient_average, "pp": fit_sends}
    return {dim: fits[dim](groups[dim]) for dim in dims}


def measure_costs(module: nn.Module, sample, group=None, layers: Optional[List[str]] = None,
                  collectives: Optional[Collectives] = None) -> CostTable:
    """The cost table of ``module`` on this device: each layer's forward and backward time on
    ``sample`` and on its first row (a line in the rows), the bytes autograd saves, the parameter
    bytes, and an alpha-beta fit per mesh dim, each on its own group of ``group`` (``fit_links``:
    a process group, None for the default one, or an ``init_mesh`` DeviceMesh spanning the world;
    "tp" by all-reduces, "dp" by the gradients' average, "pp" by sends between neighbours); or
    ``collectives`` given:
    ``(alpha_s, beta_s_per_byte)`` for every dim, or a dict of them by dim (``{"tp": ..., "dp":
    ..., "pp": ...}``; a dim left out gets its fit). With a group, every rank calls it (all at
    once, so the times include what the ranks take from each other on a shared host) and gets the
    same table: the times are averaged over the ranks, and ``host_sharing`` says how many share a
    host's cores. A ``tensor_parallel`` module is measured as this rank runs
    it: its times and saved bytes are one rank's, its parameters count at their global size (sharded
    as placed), the dense model's bytes.

    Raises ValueError for a sample without a batch dim, a model whose output on it has no
    differentiable tensor, ``collectives`` of another form, or a DeviceMesh ``group`` that does
    not span the world (before any collective)."""
    links = _links(collectives, "plan") if collectives is not None else {}
    mesh, group = (group, None) if _is_mesh(group) else (None, group)
    if mesh is not None and mesh.size() != dist.get_world_size():
        raise ValueError(f"plan: group = a DeviceMesh of {mesh.size()} ranks {tuple(mesh.mesh_dim_names)}; expected one "
                         f"spanning the world's {dist.get_world_size()} ranks (init_mesh), whose dims' links are fitted")
    layer_names = list(layers) if layers is not None else find_layers(module)
    rows = _rows(sample)
    full = time_layers(module, layer_names, sample, "plan")
    one = time_layers(module, layer_names, map_tensors(sample, lambda t: t[:1] if t.dim() else t), "plan") \
        if rows > 1 else full
    info = resolve_group(group, "plan(group=...)")
    measured = torch.tensor(full.forward + full.backward + one.forward + one.backward +
                            [full.total_forward, full.total_backward, one.total_forward, one.total_backward],
                            dtype=torch.float64)
    measured = (all_reduce(measured, "sum", group, "plan") / info.size).tolist()
    count = len(layer_names)
    f_n, b_n = measured[:count], measured[count:2 * count]
    f_1, b_1 = measured[2 * count:3 * count], measured[3 * count:4 * count]
    tf_n, tb_n, tf_1, tb_1 = measured[4 * count:]
    saved, outside_saved, boundary, output = _saved_bytes(module, layer_names, sample)
    params, sharded, first, first_sharded, last, last_sharded, tied, tied_sharded = _param_bytes(module, layer_names)
    divide, all_reduces, experts = _tp_constraints(module)
    if len(links) < len(MESH_DIMS):
        links = {**fit_links(mesh if mesh is not None else group, [d for d in MESH_DIMS if d not in links]), **links}
    alpha, beta = links["dp"]
    host_cores, host_ranks = host_sharing(group)
    element = next(module.parameters()).element_size()
    return CostTable(
        layers=tuple(layer_names),
        forward=tuple(Line.through(a, rows, b) for a, b in zip(f_1, f_n)),
        backward=tuple(Line.through(a, rows, b) for a, b in zip(b_1, b_n)),
        outside_forward=Line.through(max(0.0, tf_1 - sum(f_1)), rows, max(0.0, tf_n - sum(f_n))),
        outside_backward=Line.through(max(0.0, tb_1 - sum(b_1)), rows, max(0.0, tb_n - sum(b_n))),
        param_bytes=tuple(params), sharded_param_bytes=tuple(sharded),
        first_param_bytes=first, first_sharded_bytes=first_sharded,
        last_param_bytes=last, last_sharded_bytes=last_sharded, tied_param_bytes=tied, tied_sharded_bytes=tied_sharded,
        activation_bytes=tuple(-(-s // rows) for s in saved), outside_activation_bytes=-(-outside_saved // rows),
        boundary_bytes=-(-boundary // rows), output_bytes=-(-output // rows), param_element_size=element, alpha_s=alpha, beta_s_per_byte=beta,
        tp_must_divide=divide, all_reduces_per_layer=all_reduces, experts=experts,
        sequence_parallel=all_reduces == 2 and not experts, host_cores=host_cores, host_ranks=host_ranks,
        **{f"{dim}_link": link for dim, link in links.items()})
