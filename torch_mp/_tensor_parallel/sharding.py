"""How a dense weight maps onto the ranks of a tensor-parallel layer, both ways.

A ShardSpec says which dim of the weight, in nn.Linear layout ``[out, in]``, is sharded, and into
which consecutive parts (a fused q|k|v projection has three, each sharded by heads on its own). A part
with ``replicas`` r > 1 is cut into ``world / r`` blocks, rank k holding block ``k // r``: key/value
heads fewer than the ranks, each kept by the ranks whose query heads use it.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

COLWISE, ROWWISE, VOCAB = "colwise", "rowwise", "vocab"
# An embedding whose columns are per-head values (T5's relative attention bias): its columns are cut
# with the heads and its output stays this rank's heads (no collective).
HEADS = "heads"

Replicas = Optional[Sequence[int]]


@dataclass(frozen=True)
class ShardSpec:
    style: str                  # colwise (output features), rowwise (input features), vocab (rows), heads (columns)
    parts: Tuple[int, ...]      # sizes of the consecutive parts along the sharded dim
    transposed: bool = False    # the dense weight is stored [in, out] (transformers' Conv1D)
    weight_name: str = "weight"  # the parameter names in the module (nn.MultiheadAttention: in_proj_*)
    bias_name: str = "bias"
    gather_output: bool = False  # colwise only: all-gather the output (an LM head whose logits stay whole)
    replicas: Optional[Tuple[int, ...]] = None  # per part: how many ranks hold each block (None: 1 each)
    input_is_parallel: bool = True  # rowwise only: False when the input arrives whole (transformers' rowwise_split_input)
    shard_dim: Optional[int] = None  # the dim cut of a weight not in nn.Linear layout (3-D expert weights)
    # colwise key/value heads fewer than the ranks: the ranks sharing each head, which all-gather their
    # rows of it (each rank holds 1/world of the rows, as for weight_gather=1) before computing
    weight_gather: int = 1

    @property
    def dim(self) -> int:
        if self.shard_dim is not None:
            return self.shard_dim
        return 1 if self.style in (ROWWISE, HEADS) else 0

    def shards_bias(self) -> bool:
        return self.style == COLWISE

    def local_parts(self, world: int) -> Tuple[int, ...]:
        return tuple(part * r // world for part, r in zip(self.parts, _replicas(self.parts, self.replicas)))


def _replicas(parts: Sequence[int], replicas: Replicas) -> Sequence[int]:
    return replicas if replicas is not None else (1,) * len(parts)


def shard(tensor: torch.Tensor, dim: int, parts: Sequence[int], rank: int, world: int,
          replicas: Replicas = None) -> torch.Tensor:
    """This rank's slice: each part cut into ``world / replicas`` blocks, block ``rank // replicas``
    of each, in order."""
    return take_slices(tensor, dim, slice_bounds(parts, rank, world, replicas)).contiguous()


def unshard(locals_: List[torch.Tensor], dim: int, parts: Sequence[int], replicas: Replicas = None) -> torch.Tensor:
    """The inverse of ``shard``: the full tensor from every rank's slice, in rank order."""
    world = len(locals_)
    replicas = _replicas(parts, replicas)
    local_parts = [part * r // world for part, r in zip(parts, replicas)]
    per_rank = [local.split(local_parts, dim) for local in locals_]
    return torch.cat([torch.cat([per_rank[rank][i] for rank in range(0, world, replicas[i])], dim)
                      for i in range(len(parts))], dim)


def slice_bounds(parts: Sequence[int], rank: int, world: int, replicas: Replicas = None) -> List[Tuple[int, int]]:
    """The [start, stop) ranges of the dense tensor that ``shard`` takes, to read only those."""
    bounds, offset = [], 0
    for part, r in zip(parts, _replicas(parts, replicas)):
        block = part * r // world
        index = rank // r
        bounds.append((offset + index * block, offset + (index + 1) * block))
        offset += part
    return bounds


def take_slices(tensor: torch.Tensor, dim: int, bounds: List[Tuple[int, int]]) -> torch.Tensor:
    """The ranges ``bounds`` of ``tensor`` along ``dim``, concatenated: what ``slice_bounds`` names."""
    pieces = [tensor.narrow(dim, start, stop - start) for start, stop in bounds]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
