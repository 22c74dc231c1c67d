"""Tensor-parallel layers. Each can be built from a dense layer by taking this rank's slice, so a
sharded model computes exactly what the dense one does."""
from torch_mp.nn.attention import TensorParallelMultiheadAttention
from torch_mp.nn.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    share_input_copy,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelMultiheadAttention",
    "VocabParallelEmbedding",
    "share_input_copy",
    "vocab_parallel_cross_entropy",
]
