"""Activations and gradients between pipeline ranks over c10d send/recv, each wait bounded by the
group's timeout."""
import datetime
import re
import time
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from torch_mp import _C
from torch_mp._group import resolve_group
from torch_mp._pipeline_engine import Action, Key

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]
_HEADER_SLOTS = 64


class GroupTransport:
    """Activations and gradients between ranks with c10d send/recv. Messages on each pair of ranks
    are received in the order they were sent (what NCCL requires; tags number them for Gloo). Each
    activation message is preceded by a header giving the shapes and dtypes of what crosses this
    time (they may change with the forward's Python arguments or with the data); gradients take
    the shapes of the activations they answer."""

    def __init__(self, group, rank: int, rank_of_stage: Callable[[int], int], device: torch.device,
                 timeout: datetime.timedelta):
        self.group, self.rank, self.rank_of_stage = group, rank, rank_of_stage
        info = resolve_group(group, "pipeline(group=...)")
        self.group_name, self.group_size = info.name, info.size
        self.device, self.timeout = device, timeout

    def begin(self, schedule: List[List[Action]], num_stages: int) -> None:
        """Starts a step."""
        self._specs: Dict[Key, List[Tuple[torch.Size, torch.dtype, bool]]] = {}
        self._expected: Dict[int, deque] = {}
        for src, actions in enumerate(schedule):
            for key in (self._sent_key(a, num_stages) for a in actions):
                if key is not None and src != self.rank and self._rank_of_key(key) == self.rank:
                    self._expected.setdefault(src, deque()).append(key)
        self._inbox: Dict[Key, List[torch.Tensor]] = {}
        self._posted: Dict[int, Tuple[Key, List[torch.Tensor], List]] = {}
        self._pending: List = []
        self._sequence_out: Dict[int, int] = {}
        self._sequence_in: Dict[int, int] = {}

    @staticmethod
    def _sent_key(action: Action, num_stages: int) -> Optional[Key]:
        backward, stage, microbatch = action
        if backward:
            return ("grad", stage - 1, microbatch) if stage > 0 else None
        return ("act", stage + 1, microbatch) if stage < num_stages - 1 else None

    def _rank_of_key(self, key: Key) -> int:
        return self.rank_of_stage(key[1])

    def _source_of(self, key: Key) -> int:
        return self.rank_of_stage(key[1] - 1 if key[0] == "act" else key[1] + 1)

    def _tag(self, table: Dict[int, int], peer: int) -> int:
        table[peer] = table.get(peer, 0) + 1
        return table[peer]

    def send(self, key: Key, tensors: List[torch.Tensor]) -> None:
        dst = self._rank_of_key(key)
        if dst == self.rank:
            self._inbox[key] = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
            return
        if key[0] == "act":
            spec = [(t.shape, t.dtype, t.requires_grad) for t in tensors]
            self._specs[key] = spec
            self._post_send(_encode_header(spec, self.device), dst)
        for tensor in tensors:
            self._post_send(tensor.detach().contiguous(), dst)

    def _post_send(self, tensor: torch.Tensor, dst: int) -> None:
        work = dist.isend(tensor, self._global(dst), group=self.group, tag=self._tag(self._sequence_out, dst))
        self._pending.append((work, tensor, dst))

    def recv(self, key: Key) -> List[torch.Tensor]:
        if key not in self._inbox:
            src = self._source_of(key)
            if src == self.rank:
                raise RuntimeError(f"pipeline: {key} was never produced on this rank (internal error)")
            while key not in self._inbox:
                self._read_next(src, key)
        return self._inbox.pop(key)

    def _read_next(self, src: int, wanted: Key) -> None:
        """Receives the next message from ``src``; when its shapes are known already (gradients) the
        one after it is posted at once, so its transfer overlaps the compute until it is needed."""
        self._post_next(src)
        if src in self._posted:
            key, buffers, works = self._posted.pop(src)
            for work in works:
                self._wait(work, self._receiving(key, src))
        else:  # a header comes first: read it, then the tensors it describes
            key = self._expected[src].popleft()
            header = torch.empty(_HEADER_SLOTS, dtype=torch.int64, device=self.device)
            self._wait(self._irecv(header, src), self._receiving(key, src))
            self._specs[key] = _decode_header(header)
            buffers = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype, _ in self._spec(key)]
            for buffer in buffers:
                self._wait(self._irecv(buffer, src), self._receiving(key, src))
        self._inbox[key] = [buffer.requires_grad_(requires_grad and key[0] == "act")
                            for buffer, (_, _, requires_grad) in zip(buffers, self._spec(key))]
        self._post_next(src)

    def _spec(self, key: Key):
        """The shapes, dtypes and requires-grad flags of message ``key``, where known: activations
        from their header, gradients from the activations they answer (those that require grad)."""
        if key[0] == "act":
            return self._specs.get(key)
        answered = self._specs.get(("act", key[1] + 1, key[2]))
        return None if answered is None else [s for s in answered if s[2]]

    def _post_next(self, src: int) -> None:
        expected = self._expected.get(src)
        if src in self._posted or not expected or self._spec(expected[0]) is None:  # its header is to come
            return
        key = expected.popleft()
        buffers = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype, _ in self._spec(key)]
        self._posted[src] = (key, buffers, [self._irecv(buffer, src) for buffer in buffers])

    def _irecv(self, buffer: torch.Tensor, src: int):
        return dist.irecv(buffer, self._global(src), group=self.group, tag=self._tag(self._sequence_in, src))

    @staticmethod
    def _receiving(key: Key, src: int) -> str:
        what = "activations" if key[0] == "act" else "gradients"
        return f"receiving the {what} of micro-batch {key[2]} for stage {key[1]} from rank {src}"

    def _wait(self, work, doing: str) -> None:
        where = f"rank {self.rank} of {self.group_size} in group '{self.group_name}'"
        start = time.monotonic()
        try:
            completed = work.wait(self.timeout)
        except RuntimeError as error:
            # Gloo reports its timeout as an error too: what tells them apart is the time waited.
            if time.monotonic() - start < 0.95 * self.timeout.total_seconds():
                # The backend's first line, without its source location ("[.../pair.cc:561] ").
                cause = re.sub(r"^\[[^\]]*\]\s*", "", (str(error) or type(error).__name__).splitlines()[0])
                raise _C.CollectiveError(f"torch_mp.pipeline: {where} failed {doing}: a peer rank has died or "
                                         f"left the group ({dist.get_backend(self.group)}: {cause})") from error
            completed = False
        if completed is False:
            raise _C.CollectiveError(f"torch_mp.pipeline: {where} got no answer within "
                                     f"{self.timeout.total_seconds():g} s {doing}: a peer rank has died or "
                                     "runs a different schedule")

    def finish(self) -> None:
        for work, _, dst in self._pending:
            self._wait(work, f"sending to rank {dst}")
        self._pending = []

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank


def _encode_header(spec, device: torch.device) -> torch.Tensor:
    values = [len(spec)]
    for shape, dtype, requires_grad in spec:
        if dtype not in _DTYPES:
            raise TypeError(f"pipeline: a stage sends a {dtype} tensor to the next; expected one of "
                            f"{[str(d) for d in _DTYPES]}")
        values += [_DTYPES.index(dtype), int(requires_grad), len(shape), *shape]
    if len(values) > _HEADER_SLOTS:
        raise ValueError(f"pipeline: a stage sends {len(spec)} tensors with {len(values)} header entries; "
                         f"expected at most {_HEADER_SLOTS} (fewer or lower-rank tensors between stages)")
    return torch.tensor(values + [0] * (_HEADER_SLOTS - len(values)), dtype=torch.int64, device=device)


def _decode_header(header: torch.Tensor):
    values = header.tolist()
    spec, i = [], 1
    for _ in range(values[0]):
        dtype, requires_grad, ndim = values[i:i + 3]
        spec.append((torch.Size(values[i + 3:i + 3 + ndim]), _DTYPES[dtype], bool(requires_grad)))
        i += 3 + ndim
    return spec
