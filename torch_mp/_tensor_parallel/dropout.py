"""Dropout under tensor parallelism with the dense model's masks.

The ranks of a tensor-parallel group share one random stream, as the dense model has one generator
(seed every rank alike, ``torch.manual_seed(s)``): dropout on replicated activations (after a rowwise
layer, on embeddings) then draws the same mask on every rank, the dense model's. Dropout on sharded
activations must not: each rank would drop the same positions of its own heads (rank 0's head 0 and
rank 1's head 0 alike). Inside a module that holds sharded activations (an attention cut by heads, an
MLP cut by features, a sequence-parallel block) each Bernoulli draw of a dropout is made at the dense
shape, from the shared stream, and this rank keeps its block: the mask the dense model draws, the
generator advancing as in the dense model, so outputs, gradients and steps are the dense model's. The
cost: every rank draws the whole mask (``group size`` times its share). This is the exact counterpart
of Megatron-Core's ``CudaRNGStatesTracker`` (a per-rank stream for sharded regions, the shared one for
replicated ones), whose masks differ from the dense model's.

What is recognized as sharded, by the module the dropout runs in:
- an attention whose heads are cut: a 4-D draw ``[batch, heads, query, key]``, along dim 1;
- a module holding column-parallel layers (an MLP), between a column-parallel layer's call and the
  next row-parallel layer's: a draw whose last dim is one of those layers' output widths on this
  rank, along the last dim (after the row-parallel layer the activations are whole again);
- a sequence-parallel block: a draw of the shape of the block's input (``[batch, sequence / group
  size, hidden]``), along the sequence.
Other draws are left as they are (replicated activations). The draws are intercepted at the
dispatcher (``aten::bernoulli_``, the CPU dropout's mask, also inside scaled_dot_product_attention's
math path; ``aten::native_dropout``, the fused GPU dropout) while such a module's forward runs in
training mode and holds a dropout with ``p > 0``; not under torch.compile.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from torch_mp._group import GroupInfo

# (dim, group size, rank): where a draw is sharded; None: replicated.
Where = Optional[Tuple[int, int, int]]

_BERNOULLI = torch.ops.aten.bernoulli_.float
_NATIVE_DROPOUT = torch.ops.aten.native_dropout.default


def _may_drop(module: nn.Module) -> bool:
    """Whether ``module`` can drop anything: an ``nn.Dropout``-like child with ``p > 0``, or a float
    attribute named like a dropout rate (``attention_dropout``, ``dropout``) above 0."""
    for child in module.modules():
        if isinstance(child, nn.modules.dropout._DropoutNd) and child.p > 0:
            return True
        if any("drop" in key and isinstance(value, float) and value > 0 for key, value in vars(child).items()):
            return True
    return False


def _empty_like_layout(like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An empty tensor of ``shape`` whose dims lie in memory in the order ``like``'s do (dropout's
    mask is ``empty_like(input)``; the CPU draw fills it in memory order)."""
    order = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))
    storage = torch.empty([shape[d] for d in order], dtype=like.dtype, device=like.device)
    return storage.permute([order.index(d) for d in range(like.dim())])


def _dense_block(where: Tuple[int, int, int], like: torch.Tensor, draw) -> torch.Tensor:
    """``draw(dense)`` filled into a dense-shaped tensor laid out as ``like``; this rank's block."""
    dim, size, rank = where
    shape = list(like.shape)
    local = shape[dim]
    shape[dim] = local * size
    with _disable_current_modes():  # an enclosing region must not cut the dense draw again
        return draw(_empty_like_layout(like, shape)).narrow(dim, rank * local, local)


class _DenseMasks(TorchDispatchMode):
    """While active: Bernoulli draws that ``where`` finds sharded are drawn at the dense shape."""

    def __init__(self, where):
        super().__init__()
        self.where = where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _BERNOULLI:
            target, p = args[0], args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            where = self.where(target)
            if where is not None:
                generator = kwargs.get("generator")
                return target.copy_(_dense_block(where, target, lambda t: t.bernoulli_(p, generator=generator)))
        elif func is _NATIVE_DROPOUT:
            input, p, train = (list(args) + [kwargs.get("p"), kwargs.get("train")])[:3]
            where = self.where(input)
            if where is not None and train and 0 < p < 1:
                mask = _dense_block(where, input, lambda t: torch.native_dropout(t.fill_(1), p, True)[1])
                return input * mask * (1.0 / (1.0 - p)), mask
        return func(*args, **kwargs)


class DenseDropoutRegion:
    """A forward pre-hook and an always-called forward hook of a module holding sharded
    activations: the pre-hook enters ``_DenseMasks`` (training mode, a dropout with ``p > 0``, eager),
    the hook leaves it. Holds no module: a deep copy of the model copies it along."""

    def __init__(self, info: GroupInfo, heads: bool = False, widths: Sequence[int] = (),
                 sequence_dim: Optional[int] = None):
        self.size, self.rank = info.size, info.rank
        self.heads, self.widths, self.sequence_dim = heads, frozenset(widths), sequence_dim
        self.modes: List[Optional[_DenseMasks]] = []
        self.hidden_shape: Optional[torch.Size] = None
        self.features_sharded = False  # between a column-parallel layer's call and a row-parallel one's

    def where(self, t: torch.Tensor) -> Where:
        if self.heads and t.dim() == 4:
            return 1, self.size, self.rank
        if self.features_sharded and t.dim() >= 2 and t.shape[-1] in self.widths:
            return t.dim() - 1, self.size, self.rank
        if self.sequence_dim is not None and t.shape == self.hidden_shape:
            return self.sequence_dim, self.size, self.rank
        return None

    def install(self, module: nn.Module, columns: Sequence[nn.Module] = (), rows: Sequence[nn.Module] = ()) -> None:
        """Hooks ``module``, and its ``columns`` and ``rows`` (the parallel layers that open and close
        the region whose features are sharded)."""
        module.register_forward_pre_hook(self.enter, with_kwargs=True)
        module.register_forward_hook(self.leave, always_call=True)
        for layer in columns:
            layer.register_forward_hook(self.open_features)
        for layer in rows:
            layer.register_forward_hook(self.close_features)

    # Under torch.compile the hooks do nothing (a traced forward keeps no mode), without a graph break.
    def open_features(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self.features_sharded = True

    def close_features(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self.features_sharded = False

    def enter(self, module: nn.Module, args, kwargs) -> None:
        if torch.compiler.is_compiling():
            return
        mode = None
        self.features_sharded = False
        if module.training and _may_drop(module):
            if self.sequence_dim is not None:
                hidden = args[0] if args else kwargs.get("hidden_states")
                self.hidden_shape = hidden.shape if isinstance(hidden, torch.Tensor) else None
            mode = _DenseMasks(self.where)
            mode.__enter__()
        self.modes.append(mode)

    def leave(self, module: nn.Module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        mode = self.modes.pop() if self.modes else None
        if mode is not None:
            mode.__exit__(None, None, None)
