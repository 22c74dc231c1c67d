"""Plans for tensor_parallel: the styles, a model's own transformers ``tp_plan`` read into them, and
the structural plan found from the order and shapes of the linear layers in every stack of blocks.

Mixture-of-experts blocks are recognised in one place, ``_moe_plan``: every path that meets experts
(a ``tp_plan`` naming expert parameters or MoE styles, a block holding ``experts``) hands them to it.
"""
import fnmatch
import logging
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from torch_mp._tensor_parallel import moe
from torch_mp._tensor_parallel.sharding import COLWISE, HEADS, ROWWISE, VOCAB
# The same notions of "repeated blocks" and "inside a module" as split.
from torch_mp._layers import find_layers, inside

logger = logging.getLogger("torch_mp")

QKV, COLWISE_GATHER, REPLICATE, SEQUENCE_PARALLEL = "qkv", "colwise_gather", "replicate", "sequence_parallel"
PACKED_COLWISE = "packed_colwise"            # a fused gate|up projection: each half sharded on its own
ROWWISE_SPLIT_INPUT = "rowwise_split_input"  # rowwise, its input arriving whole (split here)
GRAD_SUM = "replicated_with_grad_allreduce"  # replicated, but sees only this rank's heads: gradients summed
MOE = "moe"  # a mixture-of-experts block: experts sharded by torch_mp._moe, the router replicated
STYLES = (COLWISE, COLWISE_GATHER, QKV, PACKED_COLWISE, ROWWISE, ROWWISE_SPLIT_INPUT, VOCAB, HEADS, GRAD_SUM,
          REPLICATE, SEQUENCE_PARALLEL, MOE)
Plan = Mapping[str, str]

# transformers' tp_plan styles (transformers/distributed/tensor_parallel.py, ParallelInterface), ours for each.
_TRANSFORMERS_STYLES = {
    "colwise": COLWISE, "local_colwise": COLWISE, "rowwise": ROWWISE, "local_rowwise": ROWWISE,
    "embedding_rowwise": VOCAB, "colwise_gather_output": COLWISE_GATHER, "colwise_rep": COLWISE_GATHER,
    "rowwise_split_input": ROWWISE_SPLIT_INPUT, "rowwise_rep": ROWWISE_SPLIT_INPUT,
    "packed_colwise": PACKED_COLWISE, "replicated_with_grad_allreduce": GRAD_SUM, "replicate": REPLICATE,
}
# Their styles for experts and routers: handed to _moe_plan with the blocks holding them.
_TRANSFORMERS_MOE_STYLES = {"moe_tp_experts", "ep_dispatch_experts", "grouped_gemm", "moe_identity_expert",
                            "ep_router", "isolated", "packed_rowwise", "local_packed_rowwise", "gather", "all_reduce"}


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D: a linear layer whose weight is stored [in, out] (``nf`` outputs)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and getattr(module, "nf", None) == weight.shape[1]


def linear_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def resolve_patterns(module: nn.Module, plan: Plan) -> Dict[str, str]:
    names = [name for name, _ in module.named_modules() if name]
    resolved: Dict[str, str] = {}
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ValueError(f"tensor_parallel: plan[{pattern!r}] = {style!r}; expected one of {', '.join(STYLES)}")
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"tensor_parallel: plan pattern {pattern!r} matches no module of "
                             f"{type(module).__name__}; expected a glob over names from named_modules()")
        for name in matched:
            resolved[name] = style
    return resolved


def auto_plan(module: nn.Module) -> Dict[str, str]:
    """The model's own transformers ``tp_plan`` where it has one, else the structural plan."""
    hf_plan = getattr(module, "tp_plan", None)
    if isinstance(hf_plan, Mapping) and hf_plan:
        return _transformers_plan(module, hf_plan)
    plan: Dict[str, str] = {}
    moe = _expert_blocks(module)
    if moe:
        plan.update(_moe_plan(module, moe, {}))
    for stack in stacks(module):
        for block_name in stack:
            block = module.get_submodule(block_name)
            attentions = [name for name, child in block.named_modules() if isinstance(child, nn.MultiheadAttention)]
            plan.update({f"{block_name}.{name}": COLWISE for name in attentions})
            linears = [(f"{block_name}.{name}", *linear_dims(child)) for name, child in block.named_modules()
                       if linear_dims(child) is not None and not any(inside(name, a) for a in attentions)
                       and not any(inside(f"{block_name}.{name}", m) for m in moe)]
            plan.update(_match_block(linears))
    if not plan:
        raise ValueError(f"tensor_parallel: found no attention or MLP to shard in {type(module).__name__}; "
                         "pass plan={pattern: style}")
    plan.update(_per_head_embeddings(module, plan))
    return plan


def _transformers_plan(module: nn.Module, hf_plan: Plan) -> Dict[str, str]:
    names = [name for name, _ in module.named_modules() if name]
    parameters = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    plan: Dict[str, str] = {}
    moe: Dict[str, str] = {}
    for pattern, style in hf_plan.items():
        on_modules = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        on_parameters = [name for name in parameters if fnmatch.fnmatchcase(name, pattern)]
        if style in _TRANSFORMERS_MOE_STYLES or (on_parameters and not on_modules):
            moe[pattern] = style  # experts stored as 3-D parameters, or an MoE style
        elif style not in _TRANSFORMERS_STYLES:
            raise ValueError(f"tensor_parallel: the tp_plan of {type(module).__name__} gives {pattern!r} the style "
                             f"{style!r}, which torch_mp does not implement; expected one of "
                             f"{', '.join(sorted(_TRANSFORMERS_STYLES))}; pass plan={{pattern: style}} with "
                             f"torch_mp's styles ({', '.join(STYLES)})")
        elif on_modules:
            plan.update({name: _TRANSFORMERS_STYLES[style] for name in on_modules})
    if moe:
        blocks = sorted({_expert_block_of(name) for pattern in moe for name in names + parameters
                         if fnmatch.fnmatchcase(name, pattern)})
        plan.update(_moe_plan(module, blocks, moe))
    plan.update(_per_head_embeddings(module, plan))
    return plan


def _expert_block_of(name: str) -> str:
    """The module holding the experts that ``name`` (a parameter or module of theirs) belongs to."""
    parts = name.split(".")
    return ".".join(parts[:parts.index("experts")]) if "experts" in parts else name.rpartition(".")[0]


def _expert_blocks(module: nn.Module) -> List[str]:
    """Modules holding a child named ``experts`` (a ModuleList of MLPs, or 3-D expert parameters)."""
    return [name for name, child in module.named_modules() if isinstance(getattr(child, "experts", None), nn.Module)]


def _moe_plan(module: nn.Module, blocks: List[str], transformers_styles: Dict[str, str]) -> Dict[str, str]:
    """The plan for mixture-of-experts ``blocks`` (names of the modules holding the router and the
    experts): ``{block: "moe"}``, which tensor_parallel hands to ``torch_mp._moe`` (experts whole per
    rank or cut within each, the router replicated). ``transformers_styles``, the model's tp_plan
    entries for them ({pattern: style}), only locate the blocks: torch_mp picks how the experts are sharded.
    Raises ValueError naming the blocks whose experts are not one module of 3-D weights."""
    unsupported = [name for name in blocks if not moe.is_moe_block(module.get_submodule(name))]
    if unsupported:
        raise ValueError(f"tensor_parallel: mixture-of-experts blocks {unsupported[:4]}"
                         f"{' ...' if len(unsupported) > 4 else ''} of {type(module).__name__} (tp_plan "
                         f"{dict(list(transformers_styles.items())[:3])}) hold their experts in another layout; "
                         "expected an `experts` module of 3-D gate_up_proj and down_proj weights, or "
                         "plan={pattern: style} that leaves them out")
    return {name: MOE for name in blocks}


def stacks(module: nn.Module) -> List[List[str]]:
    """Every stack of repeated blocks (an encoder's and a decoder's): the children of a ModuleList or
    Sequential, two or more, all of one class and each holding modules; none inside another stack.
    Falls back on split's largest group of repeated modules."""
    found: List[List[str]] = []
    for prefix, parent in module.named_modules():
        if not isinstance(parent, (nn.ModuleList, nn.Sequential)) or any(inside(prefix, b) for s in found for b in s):
            continue
        children = list(parent.named_children())
        if (len(children) >= 2 and len({type(child) for _, child in children}) == 1
                and all(next(child.children(), None) is not None for _, child in children)):
            found.append([f"{prefix}.{name}" if prefix else name for name, _ in children])
    if not found:
        blocks = repeated_blocks(module)
        found = [blocks] if blocks else []
    return found


def repeated_blocks(module: nn.Module) -> List[str]:
    """split's repeated blocks, or none: the caller's error then says what tensor_parallel looked for
    instead of split's advice."""
    try:
        return find_layers(module)
    except ValueError:
        return []


def _match_block(linears: List[Tuple[str, int, int]]) -> Dict[str, str]:
    """Attention and MLPs from the linears of one block, in registration order (name, in, out)."""
    plan: Dict[str, str] = {}
    i = 0
    while i < len(linears):
        name, d, out = linears[i]
        nxt = linears[i + 1: i + 4]
        if (len(nxt) == 3 and nxt[0][1] == d and nxt[1][1] == d and nxt[0][2] == nxt[1][2]
                and nxt[2][1] == out and nxt[2][2] == d):
            # q, k, v (k and v alike, fewer heads under grouped-query attention), then the output.
            plan.update({name: COLWISE, nxt[0][0]: COLWISE, nxt[1][0]: COLWISE, nxt[2][0]: ROWWISE})
            i += 4
            continue
        if nxt and nxt[0][2] == d and d <= nxt[0][1] < out and (out - nxt[0][1]) % 2 == 0:
            # a fused q|k|v projection (q as wide as the output projection's input), then the output.
            plan.update({name: QKV, nxt[0][0]: ROWWISE})
            i += 2
            continue
        j = i
        while j < len(linears) and linears[j][1] == d and linears[j][2] == out:
            j += 1
        if j < len(linears) and j > i and linears[j][1] == out and linears[j][2] == d and out != d:
            # an MLP: up (and gate), then down.
            plan.update({linears[k][0]: COLWISE for k in range(i, j)})
            plan[linears[j][0]] = ROWWISE
            i = j + 1
            continue
        i += 1
    return plan


def head_count_attributes(module: nn.Module) -> Dict[str, int]:
    """A module's integer attributes that count heads (``n_heads``, ``num_key_value_heads``)."""
    return {key: value for key, value in vars(module).items()
            if isinstance(value, int) and not isinstance(value, bool) and "head" in key
            and "dim" not in key and "size" not in key}


def _per_head_embeddings(module: nn.Module, plan: Dict[str, str]) -> Dict[str, str]:
    """Embeddings inside a sharded attention whose columns are per-head values (T5's relative position
    bias: [buckets, heads]): cut with the heads."""
    owners = {name.rpartition(".")[0] for name, style in plan.items() if style in (COLWISE, QKV)}
    found = {}
    for owner_name in owners:
        owner = module.get_submodule(owner_name)
        heads = set(head_count_attributes(owner).values())
        for child_name, child in owner.named_children():
            if isinstance(child, nn.Embedding) and child.embedding_dim in heads:
                found[f"{owner_name}.{child_name}"] = HEADS
    return found
