import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from torch_mp._group import GroupLike
from torch_mp._checks import check_arg
from torch_mp._tensor_parallel.sharding import shard
from torch_mp.nn.layers import RowParallelLinear, _TensorParallel


class TensorParallelMultiheadAttention(_TensorParallel):
    """``nn.MultiheadAttention`` with its heads sharded across the group, built from ``dense``
    (Megatron-LM's parallel attention, Shoeybi et al., 2019, arXiv:1909.08053): this rank holds its
    heads' rows of q, k and v (``in_proj_weight``, ``[3 * embed_dim / world, embed_dim]``) and its
    columns of ``out_proj`` (a ``RowParallelLinear``, ``[embed_dim, embed_dim / world]``).

    Same call, shapes and parameter names as ``nn.MultiheadAttention``: ``query [L, N, E]`` (``[N,
    L, E]`` with ``batch_first``, ``[L, E]`` unbatched), ``key`` and ``value [S, N, E]`` -> output
    ``[L, N, E]``, complete on every rank, and the attention weights ``[N, L, S]`` (averaged over all
    heads) or ``[N, heads, L, S]``. forward: q, k, v column-parallel, attention on this rank's
    heads, ``out_proj`` row-parallel (one all-reduce); the weights are all-reduced (averaged) or
    all-gathered over the heads. backward: the input gradients all-reduced (sum) once per input,
    the parameter gradients local to this rank's heads.

    Raises TypeError when ``dense`` is not an ``nn.MultiheadAttention``; ValueError for ``kdim`` /
    ``vdim`` other than ``embed_dim``, ``add_bias_kv`` or ``add_zero_attn``, or a ``num_heads`` that
    is not a multiple of the group size."""

    # Keeps nn.TransformerEncoderLayer off its fused fast path, which would read the sharded weights
    # as whole ones.
    _qkv_same_embed_dim = False

    def __init__(self, dense: nn.MultiheadAttention, group: GroupLike = None):
        super().__init__()
        check_arg(type(self).__name__, "dense", dense, nn.MultiheadAttention, "an nn.MultiheadAttention")
        self._set_group(group)
        if not dense._qkv_same_embed_dim:
            raise ValueError("TensorParallelMultiheadAttention: kdim/vdim other than embed_dim are not supported; "
                             "expected nn.MultiheadAttention(embed_dim, num_heads) with one in_proj_weight")
        if dense.num_heads % self.group_size:
            raise ValueError(f"TensorParallelMultiheadAttention: num_heads={dense.num_heads}, not divisible by the "
                             f"group size {self.group_size}")
        if dense.bias_k is not None or dense.add_zero_attn:
            raise ValueError("TensorParallelMultiheadAttention: add_bias_kv and add_zero_attn are not supported")
        self.embed_dim, self.batch_first, self.dropout = dense.embed_dim, dense.batch_first, dense.dropout
        self.num_heads = dense.num_heads
        self.local_heads = dense.num_heads // self.group_size
        self.head_dim = dense.embed_dim // dense.num_heads
        parts = (dense.embed_dim,) * 3
        self.in_proj_weight = nn.Parameter(shard(dense.in_proj_weight.detach(), 0, parts, self.rank, self.group_size))
        self.in_proj_bias = None if dense.in_proj_bias is None else nn.Parameter(
            shard(dense.in_proj_bias.detach(), 0, parts, self.rank, self.group_size))
        self.out_proj = RowParallelLinear.from_dense(dense.out_proj, group)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # [seq, batch, embed] from here on, as nn.MultiheadAttention computes.
        q, k, v = self._project(query, key, value)
        mask = self._mask(attn_mask, key_padding_mask, q)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        seq, batch = query.shape[0], query.shape[1]
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(seq, batch, -1))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, self._gather_weights(weights, average_attn_weights, batched)

    def _project(self, query, key, value):
        """q, k and v of this rank's heads, [batch, local heads, seq, head dim]."""
        width = self.local_heads * self.head_dim
        weights = self.in_proj_weight.split(width)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.split(width)
        if query is key and key is value:
            fused = torch.ops.torch_mp.column_parallel_linear(query, self.in_proj_weight, self.in_proj_bias, False,
                                                              self.group_name, self.group_size)
            projected = fused.split(width, -1)
        else:
            projected = [torch.ops.torch_mp.column_parallel_linear(x, w, b, False, self.group_name, self.group_size)
                         for x, w, b in zip((query, key, value), weights, biases)]
        return [p.reshape(p.shape[0], p.shape[1], self.local_heads, self.head_dim).permute(1, 2, 0, 3)
                for p in projected]

    def _mask(self, attn_mask, key_padding_mask, q) -> Optional[torch.Tensor]:
        """One additive float mask broadcastable to [batch, local heads, seq, key seq], or None."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            if mask.dim() == 3:  # [batch * heads, seq, key seq]: keep this rank's heads
                mask = mask.view(-1, self.num_heads, *mask.shape[1:])
                mask = mask[:, self.rank * self.local_heads:(self.rank + 1) * self.local_heads]
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(q.shape[0], 1, 1, -1)
            mask = padding if mask is None else mask + padding
        return mask

    def _gather_weights(self, weights, average, batched):
        if average:
            weights = torch.ops.torch_mp.reduce_from_tp(weights.sum(1) / self.num_heads, self.group_name,
                                                        self.group_size)
        else:
            weights = torch.ops.torch_mp.gather_from_tp(weights, 1, self.group_name, self.group_size)
        return weights if batched else weights.squeeze(0)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, group_size={self.group_size}"


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
