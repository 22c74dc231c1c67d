"""Activations and gradients between pipeline ranks over c10d send/recv, and the step's own
collectives (its checks, the loss, tied gradients); each wait bounded by the pipeline's timeout."""
import contextlib
import datetime
import re
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from torch_mp import _C
from torch_mp._group import resolve_group

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]
_HEADER_SLOTS = 32
_HEADER_BYTES = _HEADER_SLOTS * 8
ACTIVATION, GRADIENT = 0, 1
# Over Gloo, which matches a receive with the send of the same tag from that rank whatever the order
# they were posted in, a message whose key fits these bits goes under a tag made of its key (bit
# 30 set; the sequence-numbered messages stay below it). Bits, from the highest: kind 1,
# micro-batch 10, stage that made the tensor 6, stage that uses it 6, index 7.
_KEYED = 1 << 30
_KEY_BITS = (1, 10, 6, 6, 7)
# (ACTIVATION | GRADIENT, micro-batch, stage that made the tensor, stage that uses it, index among
# the tensors that pass between those two stages in that micro-batch)
Key = Tuple[int, int, int, int, int]


class GroupTransport:
    """One tensor per message, with c10d send/recv.

    Over NCCL (which matches sends and receives in the order posted) each message is preceded by
    a header giving its key, shape, dtype and whether it requires grad, so a receiver reads the
    messages of a peer in the order they were sent and keeps those it does not need yet until it
    does.

    Over Gloo each key has its own tag (``_KEYED``), and a message whose key passed in the step
    before with the same shape, dtype and requires-grad goes alone, without its header: the
    receiver posts a buffer of that shape with 8 bytes more, which such a message leaves as they
    were. Otherwise the sender knows (both ranks remember what passed, ``commit``) what the
    receiver expects: for a key new to it, the header alone first; for a key whose tensor changed,
    a message of the expected size and 8 bytes, the new header at its start and those 8 bytes set,
    then the tensor. In a training loop of one shape every step after the first sends one
    message per tensor, as torch.distributed.pipelining does with the shapes its stages infer
    before the first step (here nothing is inferred: shapes computed on meta tensors can differ
    from the real ones, a dtype under autocast for one)."""

    def __init__(self, group, rank: int, device: torch.device, timeout: datetime.timedelta):
        self.group, self.rank = group, rank
        info = resolve_group(group, "pipeline(group=...)")
        self.group_name, self.group_size = info.name, info.size
        self.device, self.timeout = device, timeout
        self.keyed = device.type == "cpu" and "gloo" in str(dist.get_backend(group))
        # (peer, key) -> (shape, dtype, requires grad) of what passed in the last step committed,
        # and in this one.
        self._known: Dict[Tuple[int, Key], tuple] = {}
        self._passing: Dict[Tuple[int, Key], tuple] = {}

    def begin(self, recorder=None) -> None:
        """Starts a step; a ``timeline.Recorder`` given records each receive's wait."""
        self.recorder = recorder
        self._inbox: Dict[Tuple[int, Key], torch.Tensor] = {}
        self._pending: List = []
        self._sequence_out: Dict[int, int] = {}
        self._sequence_in: Dict[int, int] = {}
        self._passing = {}

    def commit(self) -> None:
        """The step ended on every rank: what passed in it is what a step's messages next expect."""
        self._known, self._passing = self._passing, {}

    def _tag(self, table: Dict[int, int], peer: int) -> int:
        table[peer] = table.get(peer, 0) + 1
        return table[peer]

    def _keyed_tag(self, key: Key) -> Optional[int]:
        """The tag of message ``key`` over Gloo; None where it is sequence-numbered, with a header."""
        if not self.keyed:
            return None
        tag = 0
        for value, bits in zip(key, _KEY_BITS):
            if not 0 <= value < 1 << bits:
                return None
            tag = (tag << bits) | value
        return _KEYED | tag

    def send(self, dst: int, key: Key, tensor: torch.Tensor) -> None:
        tag = self._keyed_tag(key)
        header = _encode_header(key, tensor, self.device) if tag is None else self._keyed_header(dst, key, tensor)
        if header is not None:
            self._post_send(header, dst, tag)
        self._post_send(tensor.detach().contiguous(), dst, tag)

    def _keyed_header(self, dst: int, key: Key, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """What goes before ``tensor`` under its own tag (``send``): None when rank ``dst`` expects it."""
        passing = (tensor.shape, tensor.dtype, tensor.requires_grad)
        known = self._known.get((dst, key))
        self._passing[(dst, key)] = passing
        if known == passing and _nbytes(known) >= _HEADER_BYTES:
            return None
        header = _encode_header(key, tensor, self.device)
        if known is None or _nbytes(known) < _HEADER_BYTES:
            return header
        # The buffer the receiver posted: the new header at its start, its last 8 bytes set.
        changed = torch.zeros(_nbytes(known) + 8, dtype=torch.uint8, device=self.device)
        changed[:_HEADER_BYTES].view(torch.int64).copy_(header)
        changed[-8:] = 1
        return changed

    def _post_send(self, tensor: torch.Tensor, dst: int, tag: Optional[int] = None) -> None:
        with self._failing(f"sending to rank {dst}"):
            work = dist.isend(tensor, self._global(dst), group=self.group,
                              tag=self._tag(self._sequence_out, dst) if tag is None else tag)
        self._pending.append((work, tensor, dst))

    def _recv_keyed(self, src: int, key: Key, tag: int) -> torch.Tensor:
        """The tensor of message ``key`` from ``src``, under its own tag (``send``)."""
        doing = _receiving(key, src)
        known = self._known.get((src, key))
        header = None
        if known is None or _nbytes(known) < _HEADER_BYTES:
            header = torch.empty(_HEADER_SLOTS, dtype=torch.int64, device=self.device)
            self._wait(self._irecv(header, src, doing, tag), doing)
        else:
            shape, dtype, requires_grad = known
            received = torch.empty(_nbytes(known) + 8, dtype=torch.uint8, device=self.device)
            received[-8:] = 0
            self._wait(self._irecv(received, src, doing, tag), doing)
            if received[-8:].any():  # the tensor changed: its header, then the tensor
                header = received[:_HEADER_BYTES].view(torch.int64).clone()
            else:  # a tensor of its own (no view) on the buffer's storage, as a header's receive makes
                buffer = torch.empty(0, dtype=dtype, device=self.device).set_(received.untyped_storage(), 0, shape)
        if header is not None:
            got, shape, dtype, requires_grad = _decode_header(header)
            if got != key:
                raise _C.CollectiveError(f"torch_mp.pipeline: {self._where()} expected message {key} from rank {src} "
                                         f"and got {got}: the ranks run different schedules")
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            self._wait(self._irecv(buffer, src, doing, tag), doing)
        self._passing[(src, key)] = (buffer.shape, buffer.dtype, requires_grad)
        return buffer.requires_grad_(requires_grad and key[0] == ACTIVATION)

    def recv(self, src: int, key: Key) -> torch.Tensor:
        """The tensor of message ``key`` from rank ``src``; an activation is a leaf that requires
        grad when the sender's tensor did."""
        started = self.recorder.started() if self.recorder is not None else 0.0
        tag = self._keyed_tag(key)
        if tag is not None:
            self._inbox[(src, key)] = self._recv_keyed(src, key, tag)
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

    def _irecv(self, buffer: torch.Tensor, src: int, doing: str, tag: Optional[int] = None):
        with self._failing(doing):
            return dist.irecv(buffer, self._global(src), group=self.group,
                              tag=self._tag(self._sequence_in, src) if tag is None else tag)

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

    def all_reduce_sum(self, tensor: torch.Tensor, group, doing: str, in_place: bool = False) -> torch.Tensor:
        """The sum of ``tensor`` over ``group`` (this pipeline's, or a subgroup of it), bounded as
        ``all_gather_rows`` is; ``in_place``: into ``tensor`` itself (a contiguous buffer of the
        caller's on this device), returned, instead of a copy."""
        summed = tensor if in_place else tensor.to(self.device).contiguous().clone()
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


def _nbytes(passing: tuple) -> int:
    shape, dtype, _ = passing
    return shape.numel() * dtype.itemsize


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
