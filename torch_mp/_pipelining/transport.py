"""Activations and gradients between pipeline ranks over c10d send/recv, and the step's own
collectives (its checks, the loss, tied gradients); each wait bounded by the pipeline's timeout."""
import contextlib
import datetime
import re
import time
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from torch_mp import _C
from torch_mp._group import resolve_group

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]
_HEADER_SLOTS = 32
ACTIVATION, GRADIENT = 0, 1
# (ACTIVATION | GRADIENT, micro-batch, stage that made the tensor, stage that uses it, index among
# the tensors that pass between those two stages in that micro-batch)
Key = Tuple[int, int, int, int, int]


class GroupTransport:
    """One tensor per message, with c10d send/recv. Each message is preceded by a header giving its
    key, shape, dtype and whether it requires grad, so a receiver reads the messages of a peer in
    the order they were sent (what NCCL requires; tags number them for Gloo) and keeps those it
    does not need yet until it does."""

    def __init__(self, group, rank: int, device: torch.device, timeout: datetime.timedelta):
        self.group, self.rank = group, rank
        info = resolve_group(group, "pipeline(group=...)")
        self.group_name, self.group_size = info.name, info.size
        self.device, self.timeout = device, timeout

    def begin(self, recorder=None) -> None:
        """Starts a step; a ``timeline.Recorder`` given records each receive's wait."""
        self.recorder = recorder
        self._inbox: Dict[Tuple[int, Key], torch.Tensor] = {}
        self._pending: List = []
        self._sequence_out: Dict[int, int] = {}
        self._sequence_in: Dict[int, int] = {}

    def _tag(self, table: Dict[int, int], peer: int) -> int:
        table[peer] = table.get(peer, 0) + 1
        return table[peer]

    def send(self, dst: int, key: Key, tensor: torch.Tensor) -> None:
        self._post_send(_encode_header(key, tensor, self.device), dst)
        self._post_send(tensor.detach().contiguous(), dst)

    def _post_send(self, tensor: torch.Tensor, dst: int) -> None:
        with self._failing(f"sending to rank {dst}"):
            work = dist.isend(tensor, self._global(dst), group=self.group, tag=self._tag(self._sequence_out, dst))
        self._pending.append((work, tensor, dst))

    def recv(self, src: int, key: Key) -> torch.Tensor:
        """The tensor of message ``key`` from rank ``src``; an activation is a leaf that requires
        grad when the sender's tensor did."""
        started = self.recorder.started() if self.recorder is not None else 0.0
        while (src, key) not in self._inbox:
            doing = _receiving(key, src)
            header = torch.empty(_HEADER_SLOTS, dtype=torch.int64, device=self.device)
            self._wait(self._irecv(header, src, doing), doing)
            got, shape, dtype, requires_grad = _decode_header(header)
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            self._wait(self._irecv(buffer, src, doing), doing)
            self._inbox[(src, got)] = buffer.requires_grad_(requires_grad and got[0] == ACTIVATION)
        if self.recorder is not None:
            self.recorder.received(key, started)
        return self._inbox.pop((src, key))

    def _irecv(self, buffer: torch.Tensor, src: int, doing: str):
        with self._failing(doing):
            return dist.irecv(buffer, self._global(src), group=self.group, tag=self._tag(self._sequence_in, src))

    def _where(self) -> str:
        return f"rank {self.rank} of {self.group_size} in group '{self.group_name}'"

    @contextlib.contextmanager
    def _failing(self, doing: str):
        """The backend's error while posting or waiting for a send or receive (a peer that died or
        left closed the connection) as a CollectiveError."""
        try:
            yield
        except RuntimeError as error:
            # The backend's first line, without its source location ("[.../pair.cc:561] ").
            cause = re.sub(r"^\[[^\]]*\]\s*", "", (str(error) or type(error).__name__).splitlines()[0])
            raise _C.CollectiveError(f"torch_mp.pipeline: {self._where()} failed {doing}: a peer rank has died or "
                                     f"left the group ({dist.get_backend(self.group)}: {cause})") from error

    def _wait(self, work, doing: str) -> None:
        start = time.monotonic()
        try:
            completed = work.wait(self.timeout)
        except RuntimeError:
            # Gloo reports its timeout as an error too: what tells them apart is the time waited.
            if time.monotonic() - start < 0.95 * self.timeout.total_seconds():
                with self._failing(doing):
                    raise
            completed = False
        if completed is False:
            raise _C.CollectiveError(f"torch_mp.pipeline: {self._where()} got no answer within "
                                     f"{self.timeout.total_seconds():g} s {doing}: a peer rank has died or "
                                     "runs a different schedule")

    def all_gather_rows(self, tensor: torch.Tensor, doing: str) -> torch.Tensor:
        """Every rank's ``tensor`` stacked along a new dim 0, in rank order; the wait bounded by the
        pipeline's timeout (a CollectiveError past it), as every other wait of a step is."""
        tensor = tensor.to(self.device).contiguous()
        rows = [torch.empty_like(tensor) for _ in range(self.group_size)]
        with self._failing(doing):
            work = dist.all_gather(rows, tensor, group=self.group, async_op=True)
        self._wait(work, doing)
        return torch.stack(rows)

    def all_reduce_sum(self, tensor: torch.Tensor, group, doing: str) -> torch.Tensor:
        """The sum of ``tensor`` over ``group`` (this pipeline's, or a subgroup of it), bounded as
        ``all_gather_rows`` is."""
        summed = tensor.to(self.device).contiguous().clone()
        with self._failing(doing):
            work = dist.all_reduce(summed, group=group, async_op=True)
        self._wait(work, doing)
        return summed

    def sum_among(self, tensor: torch.Tensor, ranks, doing: str) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks ``ranks`` of this pipeline's group (sorted, this rank
        among them), by send/recv between just them: each sends its tensor to the others and adds
        theirs in rank order, so that every one holds the same sum, bit for bit, and they need no
        process group of their own (Megatron-Core's embedding group, without creating one on every
        rank of the world). Over the whole group: one all-reduce. Bounded as ``all_gather_rows``
        is; only within a step (between ``begin`` and ``finish``), after the schedule's messages."""
        if len(ranks) == self.group_size:
            return self.all_reduce_sum(tensor, self.group, doing)
        tensor = tensor.to(self.device).contiguous()
        for peer in ranks:
            if peer != self.rank:
                self._post_send(tensor, peer)
        parts = []
        for peer in ranks:
            if peer == self.rank:
                parts.append(tensor)
                continue
            buffer = torch.empty_like(tensor)
            self._wait(self._irecv(buffer, peer, f"{doing} from rank {peer}"), f"{doing} from rank {peer}")
            parts.append(buffer)
        self.finish()
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def broadcast(self, tensor: torch.Tensor, src: int, doing: str) -> torch.Tensor:
        """``tensor`` of rank ``src`` of this pipeline's group, on every rank (in place), bounded as
        ``all_gather_rows`` is."""
        tensor = tensor.to(self.device).contiguous()
        with self._failing(doing):
            work = dist.broadcast(tensor, self._global(src), group=self.group, async_op=True)
        self._wait(work, doing)
        return tensor

    def finish(self) -> None:
        for work, _, dst in self._pending:
            self._wait(work, f"sending to rank {dst}")
        self._pending = []

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank


def _receiving(key: Key, src: int) -> str:
    kind, microbatch, made_by, used_by, _ = key
    if kind == ACTIVATION:
        return f"receiving the activations of micro-batch {microbatch} for stage {used_by} from rank {src}"
    return f"receiving the gradients of micro-batch {microbatch} for stage {made_by} from rank {src}"


def _encode_header(key: Key, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"pipeline: a {tensor.dtype} tensor passes from stage {key[2]} to stage {key[3]}; expected "
                        f"one of {[str(d) for d in _DTYPES]}")
    values = [*key, _DTYPES.index(tensor.dtype), int(tensor.requires_grad), tensor.dim(), *tensor.shape]
    if len(values) > _HEADER_SLOTS:
        raise ValueError(f"pipeline: a tensor of {tensor.dim()} dims passes from stage {key[2]} to stage {key[3]}; "
                         f"expected at most {_HEADER_SLOTS - 8}")
    return torch.tensor(values + [0] * (_HEADER_SLOTS - len(values)), dtype=torch.int64, device=device)


def _decode_header(header: torch.Tensor):
    values = header.tolist()
    dtype, requires_grad, ndim = values[5:8]
    return tuple(values[:5]), torch.Size(values[8:8 + ndim]), _DTYPES[dtype], bool(requires_grad)
