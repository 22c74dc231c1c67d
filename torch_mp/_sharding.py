"""How a dense weight maps onto the ranks of a tensor-parallel layer, both ways.

A ShardSpec says which dim of the weight, in nn.Linear layout ``[out, in]``, is split, and into
which consecutive parts (a fused q|k|v projection has three, each split by heads on its own).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

COLWISE, ROWWISE, VOCAB = "colwise", "rowwise", "vocab"


@dataclass(frozen=True)
class ShardSpec:
    style: str                  # colwise (output features), rowwise (input features), vocab (rows)
    parts: Tuple[int, ...]      # sizes of the consecutive parts along the split dim
    transposed: bool = False    # the dense weight is stored [in, out] (transformers' Conv1D)
    weight_name: str = "weight"  # the parameter names in the module (nn.MultiheadAttention: in_proj_*)
    bias_name: str = "bias"
    gather_output: bool = False  # colwise only: all-gather the output (an LM head whose logits stay whole)
    split_dim: Optional[int] = None  # the split dim of a weight not in nn.Linear layout (3-D expert weights)

    @property
    def dim(self) -> int:
        if self.split_dim is not None:
            return self.split_dim
        return 1 if self.style == ROWWISE else 0

    def shards_bias(self) -> bool:
        return self.style == COLWISE


def shard(tensor: torch.Tensor, dim: int, parts: Sequence[int], rank: int, world: int) -> torch.Tensor:
    """This rank's slice: each part cut into ``world`` blocks, this rank's block of each, in order."""
    pieces = [part.chunk(world, dim)[rank] for part in tensor.split(list(parts), dim)]
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)).contiguous()


def unshard(locals_: List[torch.Tensor], dim: int, parts: Sequence[int]) -> torch.Tensor:
    """The inverse of ``shard``: the full tensor from every rank's slice, in rank order."""
    world = len(locals_)
    local_parts = [part // world for part in parts]
    per_rank = [local.split(local_parts, dim) for local in locals_]
    return torch.cat([torch.cat([pieces[i] for pieces in per_rank], dim) for i in range(len(parts))], dim)


def slice_bounds(parts: Sequence[int], rank: int, world: int) -> List[Tuple[int, int]]:
    """The [start, stop) ranges of the dense tensor that ``shard`` takes, to read only those."""
    bounds, offset = [], 0
    for part in parts:
        block = part // world
        bounds.append((offset + rank * block, offset + (rank + 1) * block))
        offset += part
    return bounds


def take_slices(tensor: torch.Tensor, dim: int, bounds: List[Tuple[int, int]]) -> torch.Tensor:
    """The ranges ``bounds`` of ``tensor`` along ``dim``, concatenated: what ``slice_bounds`` names."""
    return torch.cat([tensor.narrow(dim, start, stop - start) for start, stop in bounds], dim)
