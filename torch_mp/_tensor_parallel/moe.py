"""Mixture-of-experts blocks across a group: the experts placed whole on ranks (expert parallelism,
GShard arXiv:2006.16668, Switch Transformer arXiv:2101.03961) or each expert cut like an MLP (tensor
parallelism, Megatron-LM arXiv:1909.08053).

A block is a module with a router and an ``experts`` module holding every expert's weights as 3-D
tensors, as transformers' MoE models have them (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE ...):
``gate_up_proj`` ``[experts, 2 * intermediate, hidden]`` (gate, then up) and ``down_proj``
``[experts, hidden, intermediate]``, called as ``experts(hidden_states [tokens, hidden], top_k_index
[tokens, k], top_k_weights [tokens, k])``. The router (``gate``) and anything else in the block (a
shared expert is sharded by the plan like any MLP) stay as they are: the router runs replicated on
every rank, so its logits, the load-balancing loss computed from them and its gradient are the
dense model's on every rank.

- ``"ep"``: rank r holds experts [r * E / world, (r + 1) * E / world) whole. Each rank takes a
  contiguous 1 / world of the tokens, sends each (token, choice) to the rank of its expert with
  ``torch_mp.all_to_all``, runs its experts on what it received, sends the results back with the
  reverse all-to-all, weights and sums them per token, and one all-reduce makes the output whole.
- ``"tp"``: every rank holds every expert, each cut within: this rank's slice of the gate and of
  the up rows (colwise), the matching columns of down (rowwise); one all-reduce at the output.

Both leave the stock parameter names; the specs they return (keyed by parameter name) let
``full_state_dict`` and ``load_full_state_dict`` convert between the shards and the stock 3-D tensors.
"""
import contextlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from torch_mp._group import GroupInfo, GroupLike, resolve_group
from torch_mp._tensor_parallel.sharding import COLWISE, ROWWISE, ShardSpec, shard

EXPERT_PARALLEL, EXPERT_TENSOR_PARALLEL, AUTO = "ep", "tp", "auto"
STYLES = (EXPERT_PARALLEL, EXPERT_TENSOR_PARALLEL, AUTO)
_WEIGHTS = ("gate_up_proj", "down_proj")


def is_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` holds its experts as one ``experts`` module of 3-D weights."""
    experts = getattr(module, "experts", None)
    return isinstance(experts, nn.Module) and any(
        isinstance(getattr(experts, name, None), torch.Tensor) and getattr(experts, name).dim() == 3
        for name in _WEIGHTS)


def moe_blocks(module: nn.Module) -> List[str]:
    """The names of the MoE blocks in ``module`` ("" for ``module`` itself)."""
    return [name for name, child in module.named_modules() if is_moe_block(child)]


def parallelize_moe_blocks(module: nn.Module, group: GroupLike = None, style: str = AUTO,
                           blocks: Optional[List[str]] = None) -> Dict[str, ShardSpec]:
    """Shards the MoE blocks ``blocks`` of ``module`` (default: every one, ``moe_blocks``; see
    ``parallelize_moe_block``); returns the specs of the sharded parameters keyed by their names in
    ``module``."""
    specs: Dict[str, ShardSpec] = {}
    for name in moe_blocks(module) if blocks is None else blocks:
        prefix = f"{name}." if name else ""
        block_specs = parallelize_moe_block(module.get_submodule(name), group, style, name=name or "the module")
        specs.update({prefix + key: spec for key, spec in block_specs.items()})
    return specs


def expert_specs(block: nn.Module, world: int, style: str = AUTO,
                 name: str = "block") -> Tuple[str, Dict[str, ShardSpec]]:
    """The style (``"ep"`` or ``"tp"``) and the specs ``parallelize_moe_block`` would apply to
    ``block`` on ``world`` ranks, keyed ``"experts.gate_up_proj"`` and ``"experts.down_proj"``;
    changes nothing. Raises the ValueErrors of ``parallelize_moe_block``."""
    if style not in STYLES:
        raise ValueError(f"torch_mp: MoE style {style!r} for {name!r}; expected one of {', '.join(STYLES)}")
    if not is_moe_block(block):
        raise ValueError(f"torch_mp: {name!r} ({type(block).__name__}) is not a mixture-of-experts block; expected "
                         "a module whose `experts` holds 3-D gate_up_proj and down_proj weights")
    num_experts, intermediate = _check_experts(block.experts, name)
    if style == AUTO:
        style = EXPERT_PARALLEL if num_experts % world == 0 else EXPERT_TENSOR_PARALLEL
    if style == EXPERT_PARALLEL:
        if num_experts % world:
            raise ValueError(f"torch_mp: {name!r} has {num_experts} experts, not divisible by the group size "
                             f"{world}; expected a multiple of {world} for expert parallelism ('ep'), or 'tp'")
        return style, {f"experts.{weight}": ShardSpec(EXPERT_PARALLEL, (num_experts,), shard_dim=0)
                       for weight in _WEIGHTS}
    if intermediate % world:
        raise ValueError(f"torch_mp: {name!r} has experts of intermediate size {intermediate}, not divisible by "
                         f"the group size {world}; expected a multiple of {world} to cut each expert ('tp'), or 'ep'")
    return style, {"experts.gate_up_proj": ShardSpec(COLWISE, (intermediate, intermediate), shard_dim=1),
                   "experts.down_proj": ShardSpec(ROWWISE, (intermediate,), shard_dim=2)}


def parallelize_moe_block(block: nn.Module, group: GroupLike = None, style: str = AUTO,
                          name: str = "block") -> Dict[str, ShardSpec]:
    """Shards the MoE block ``block`` in place across ``group``: its experts whole per rank
    (``style="ep"``) or cut within each expert (``"tp"``); ``"auto"``: ``"ep"`` when the number of
    experts is a multiple of the group size, else ``"tp"``. The block's outputs stay the dense
    block's on every rank (forward and backward). Returns the specs of the sharded weights, keyed
    ``"experts.gate_up_proj"`` and ``"experts.down_proj"``.

    Raises ValueError (naming ``name``) for a block whose experts are not laid out as described in
    this module's docstring, or whose experts (``"ep"``) or intermediate size (``"tp"``) do not divide
    by the group size, before any collective.
    """
    info = resolve_group(group, "parallelize_moe_block(group=...)")
    style, specs = expert_specs(block, info.size, style, name)
    experts = block.experts
    total = specs["experts.down_proj"].parts[0]  # experts ("ep") or each expert's intermediate size ("tp")
    setattr(experts, "num_experts" if style == EXPERT_PARALLEL else "intermediate_dim", total // info.size)
    for key, spec in specs.items():
        weight = key.rpartition(".")[2]
        dense = getattr(experts, weight)
        setattr(experts, weight, nn.Parameter(shard(dense.detach(), spec.dim, spec.parts, info.rank, info.size),
                                              requires_grad=dense.requires_grad))
    experts.torch_mp_group = info
    experts.__class__ = _parallel_class(type(experts), style)
    return specs


@contextlib.contextmanager
def shape_only(module: nn.Module, blocks: List[str]):
    """Within it, the experts of ``blocks`` return their input's shape without routing on values:
    the dry run on fake tensors then reaches past them (the stock experts pick the experts hit with
    ``nonzero``, the sharded ones read split sizes with ``tolist``; fake tensors have no values)."""
    experts = [module.get_submodule(name).experts for name in blocks]
    for child in experts:
        child.forward = _shape_only_forward
    try:
        yield
    finally:
        for child in experts:
            del child.forward


def _shape_only_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    return hidden_states * top_k_weights.sum(-1, keepdim=True).to(hidden_states.dtype)


def _check_experts(experts: nn.Module, name: str):
    """(number of experts, intermediate size) of a supported experts module; a ValueError otherwise."""
    gate_up, down = (getattr(experts, weight, None) for weight in _WEIGHTS)
    own = sorted(n for n, _ in experts.named_parameters())
    layout = ("expected experts holding exactly gate_up_proj [experts, 2 * intermediate, hidden] (gate, then up) "
              "and down_proj [experts, hidden, intermediate]")
    if own != sorted(_WEIGHTS) or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"torch_mp: {name!r}.experts ({type(experts).__name__}) has parameters "
                         f"{[(n, tuple(p.shape)) for n, p in experts.named_parameters()]}; {layout}")
    num_experts, intermediate = down.shape[0], down.shape[2]
    unsupported = [flag for flag, bad in (("is_transposed", True), ("has_bias", True), ("is_concatenated", False))
                   if getattr(experts, flag, not bad) == bad]
    if (unsupported or tuple(gate_up.shape) != (num_experts, 2 * intermediate, down.shape[1])
            or getattr(experts, "num_experts", num_experts) != num_experts):
        raise ValueError(f"torch_mp: {name!r}.experts ({type(experts).__name__}) has gate_up_proj "
                         f"{tuple(gate_up.shape)}, down_proj {tuple(down.shape)}"
                         f"{', ' + ', '.join(unsupported) if unsupported else ''}; {layout}")
    return num_experts, intermediate


_CLASSES: Dict[tuple, type] = {}


def _parallel_class(cls: type, style: str) -> type:
    """A subclass of the stock experts class whose forward runs ``style``; the stock forward (and
    whichever experts implementation its config selects) runs on this rank's weights."""
    key = (cls, style)
    if key not in _CLASSES:
        forward = _expert_parallel_forward if style == EXPERT_PARALLEL else _tensor_parallel_forward
        prefix = "ExpertParallel" if style == EXPERT_PARALLEL else "TensorParallel"
        _CLASSES[key] = type(prefix + cls.__name__, (cls,), {"forward": forward, "_stock_forward": cls.forward})
    return _CLASSES[key]


def _tensor_parallel_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """Each rank's slice of every expert on every token: partial outputs, summed by one all-reduce.
    The replicated inputs enter through copy_to_tp, whose backward sums the ranks' partial gradients
    (the router's gradient through ``top_k_weights`` included)."""
    if hidden_states.is_meta:  # a pipeline's stand-in of another rank's stage: shapes only, no collective
        return _shape_only_forward(hidden_states, top_k_index, top_k_weights)
    info: GroupInfo = self.torch_mp_group
    ops = torch.ops.torch_mp
    partial = self._stock_forward(ops.copy_to_tp(hidden_states, info.name, info.size), top_k_index,
                                  ops.copy_to_tp(top_k_weights, info.name, info.size))
    return ops.reduce_from_tp(partial, info.name, info.size)


def _expert_parallel_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states ``[tokens, hidden]``, top_k_index and top_k_weights ``[tokens, k]``, replicated;
    returns ``[tokens, hidden]``, replicated. Every rank knows every token's experts, so each computes
    the all-to-all's split sizes for every rank without exchanging them."""
    if hidden_states.is_meta:  # a pipeline's stand-in of another rank's stage: shapes only, no collective
        return _shape_only_forward(hidden_states, top_k_index, top_k_weights)
    info: GroupInfo = self.torch_mp_group
    ops = torch.ops.torch_mp
    tokens, k = top_k_index.shape
    local_experts = self.num_experts
    num_experts = local_experts * info.size
    # This rank's tokens: a contiguous block, the first (tokens % world) ranks one more.
    base, extra = divmod(tokens, info.size)
    token_counts = [base + (r < extra) for r in range(info.size)]
    start = sum(token_counts[:info.rank])
    stop = start + token_counts[info.rank]
    device = top_k_index.device
    source = torch.repeat_interleave(torch.arange(info.size, device=device),
                                     torch.tensor(token_counts, device=device)).repeat_interleave(k)
    expert = top_k_index.reshape(-1)
    destination = torch.div(expert, local_experts, rounding_mode="floor")
    # sends[r][d]: the (token, choice) rows rank r sends to rank d.
    sends = torch.zeros(info.size * info.size, dtype=torch.long, device=device).index_add_(
        0, source * info.size + destination, torch.ones_like(expert)).view(info.size, info.size).tolist()
    input_splits = sends[info.rank]
    output_splits = [sends[r][info.rank] for r in range(info.size)]

    # Dispatch: this rank's rows sorted by expert (so by destination rank, then local expert).
    mine = expert[start * k:stop * k]
    order = torch.argsort(mine, stable=True)
    tokens_in = ops.copy_to_tp(hidden_states, info.name, info.size)[start:stop]
    received = ops.all_to_all(tokens_in[order // k], output_splits, input_splits, info.name, info.size)
    # The local expert of each received row: by source rank, then expert, as each source sorted them.
    keep = destination == info.rank
    received_experts = torch.sort((source * num_experts + expert)[keep]).values % num_experts
    local_index = (received_experts - info.rank * local_experts).unsqueeze(1)
    ones = torch.ones(local_index.shape, dtype=top_k_weights.dtype, device=device)
    outputs = self._stock_forward(received, local_index, ones)

    # Combine: the results back to the ranks that sent them, in their rows' order, weighted per token.
    returned = ops.all_to_all(outputs, input_splits, output_splits, info.name, info.size)
    per_choice = returned[torch.argsort(order)].view(stop - start, k, hidden_states.shape[-1])
    weights = ops.copy_to_tp(top_k_weights, info.name, info.size)[start:stop]
    combined = (per_choice * weights.unsqueeze(-1)).to(hidden_states.dtype).sum(1)
    whole = torch.nn.functional.pad(combined, (0, 0, start, tokens - stop))
    return ops.reduce_from_tp(whole, info.name, info.size)
