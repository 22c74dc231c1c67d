"""Tensor parallelism for stock modules: swap their Linear / Conv1D / Embedding layers for the
parallel ones by a plan, and fix the attributes that depend on the split, so the stock forward runs.

A plan maps module-name patterns (globs: ``"layers.*.mlp.up_proj"``) to styles:

- ``colwise``: output features split (q, k, v, MLP up/gate); the output is this rank's slice. On an
  ``nn.MultiheadAttention``: its heads split (q, k, v by heads, the output projection rowwise).
- ``colwise_gather``: colwise, the output all-gathered (an LM head whose logits must stay whole).
- ``qkv``: a fused q|k|v projection; each of q, k and v is split by heads.
- ``rowwise``: input features split (attention output, MLP down); one all-reduce, full output.
- ``vocab``: an embedding's rows split; full embeddings out.
- ``replicate``: left as it is.
- ``sequence_parallel``: on a block (a pre-norm transformer layer): outside its attention and MLP the
  activations are split along the sequence, so norms, dropout and residual adds hold 1 / group size
  of them (Megatron's sequence parallelism). The attention and the MLP all-gather their input along
  the sequence and reduce-scatter their output; consecutive such blocks pass the split activations
  on, the first splits its input and the last gathers its output; the gradients of the parameters
  that see only this rank's tokens (norms, rowwise biases) are summed over the ranks.
"""
import fnmatch
import hashlib
import logging
import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from torch_mp import _moe
from torch_mp._group import GroupLike, all_gather_rows, resolve_group
from torch_mp._sharding import COLWISE, ROWWISE, VOCAB, ShardSpec, shard
from torch_mp.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelMultiheadAttention,
    VocabParallelEmbedding,
)
# The same notions of "repeated blocks" and "inside a module" as split.
from torch_mp.split import _find_layers, _inside

logger = logging.getLogger("torch_mp")

QKV, COLWISE_GATHER, REPLICATE, SEQUENCE_PARALLEL = "qkv", "colwise_gather", "replicate", "sequence_parallel"
STYLES = (COLWISE, COLWISE_GATHER, QKV, ROWWISE, VOCAB, REPLICATE, SEQUENCE_PARALLEL)
SEQUENCE_DIM = 1  # activations are [batch, sequence, features]
# transformers' tp_plan styles that mean one of ours; the others stay replicated.
_TRANSFORMERS_STYLES = {"colwise": COLWISE, "rowwise": ROWWISE, "embedding_rowwise": VOCAB,
                        "colwise_gather_output": COLWISE_GATHER}
Plan = Mapping[str, str]

# Attributes holding a width that the split divides, when they equal a sharded projection's width.
_WIDTH_ATTRIBUTES = ("split_size", "all_head_size", "inner_dim")


def tensor_parallel(module: nn.Module, plan: Union[str, Plan] = "auto", group: GroupLike = None,
                    sequence_parallel: bool = False) -> nn.Module:
    """Shards ``module`` in place across ``group`` and returns it.

    ``plan="auto"`` uses the model's own ``tp_plan`` where it has one (transformers models), and otherwise
    finds, inside each repeated block, attention (separate q, k, v or a fused qkv, then the output
    projection) and MLPs (up and gate, then down) from the order and shapes of their linear layers.
    What it does not shard stays replicated; ``module.torch_mp_replicated`` lists those layers.
    ``sequence_parallel=True`` adds the ``sequence_parallel`` style to the repeated blocks.

    The result has ``torch_mp_plan`` ({module name: style}) and keeps the stock parameter names;
    ``torch_mp.full_state_dict`` gathers a stock state_dict from it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"tensor_parallel: expected module to be a torch.nn.Module, got {type(module).__name__}")
    info = resolve_group(group, "tensor_parallel(group=...)")
    if isinstance(plan, str):
        if plan != "auto":
            raise ValueError(f"tensor_parallel: plan={plan!r}; expected 'auto' or a {{pattern: style}} dict")
        resolved = _auto_plan(module)
    elif isinstance(plan, Mapping):
        resolved = _resolve_patterns(module, plan)
    else:
        raise TypeError(f"tensor_parallel: expected plan to be 'auto' or a dict, got {type(plan).__name__}")
    if sequence_parallel:
        blocks = _repeated_blocks(module)
        if not blocks:
            raise ValueError(f"tensor_parallel: sequence_parallel=True but {type(module).__name__} has no repeated "
                             "blocks to make sequence parallel; expected transformer blocks, or plan={name: "
                             "'sequence_parallel'}")
        resolved.update({name: SEQUENCE_PARALLEL for name in blocks})
    sequence_blocks = [name for name, style in resolved.items() if style == SEQUENCE_PARALLEL]
    specs: Dict[str, ShardSpec] = {}
    for name, style in resolved.items():
        if style not in (REPLICATE, SEQUENCE_PARALLEL):
            specs.update(_specs(module, name, style))
    _check_divisible(module, specs, info.size)
    _check_same_plan_on_every_rank(specs, group, info.size)

    attentions = [name for name in specs if isinstance(module.get_submodule(name), nn.MultiheadAttention)]
    shared: Dict[Tuple, nn.Parameter] = {}
    for name, spec in specs.items():
        if name in attentions:
            parent_name, _, child_name = name.rpartition(".")
            setattr(module.get_submodule(parent_name), child_name,
                    TensorParallelMultiheadAttention(module.get_submodule(name), group))
        elif not any(_inside(name, attention) for attention in attentions):
            _swap(module, name, spec, group, shared)
    _fix_split_attributes(module, specs, info.size)
    # Mixture-of-experts blocks (plan="auto"): their experts whole per rank or cut, by torch_mp._moe.
    if isinstance(plan, str):
        specs.update(_moe.parallelize_moe_blocks(module, group, sequence_parallel=bool(sequence_blocks)))
    if sequence_blocks:
        _sequence_parallel(module, sequence_blocks, info)
    module.torch_mp_plan = {name: _style_name(spec) for name, spec in specs.items()}
    module.torch_mp_plan.update({name: SEQUENCE_PARALLEL for name in sequence_blocks})
    module._torch_mp_specs = specs
    module._torch_mp_group = group
    module.torch_mp_replicated = [name for name, child in module.named_modules()
                            if _is_shardable(child) and not any(_inside(name, s) for s in specs)]
    logger.info("tensor_parallel: %d layers sharded across %d ranks; replicated: %s", len(specs), info.size,
                module.torch_mp_replicated)
    return module


# --- plans -------------------------------------------------------------------------------------

def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D: a linear layer whose weight is stored [in, out] (``nf`` outputs)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and getattr(module, "nf", None) == weight.shape[1]


def _linear_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _is_shardable(module: nn.Module) -> bool:
    return _linear_dims(module) is not None or isinstance(module, (nn.Embedding, nn.MultiheadAttention))


def _resolve_patterns(module: nn.Module, plan: Plan) -> Dict[str, str]:
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


def _auto_plan(module: nn.Module) -> Dict[str, str]:
    # transformers models carry their own plan (tp_plan: full names, their base model's prefixed).
    hf_plan = getattr(module, "tp_plan", None)
    if isinstance(hf_plan, Mapping) and hf_plan:
        hf_plan = _moe.without_expert_patterns(module, hf_plan)  # MoE experts: see tensor_parallel()
        known = {pattern: _TRANSFORMERS_STYLES[style] for pattern, style in hf_plan.items()
                 if style in _TRANSFORMERS_STYLES}
        skipped = sorted(set(hf_plan.values()) - set(_TRANSFORMERS_STYLES))
        if skipped:
            logger.info("tensor_parallel: styles %s of the model's tp_plan are left replicated", skipped)
        return _resolve_patterns(module, known)

    plan: Dict[str, str] = {}
    for block_name in _repeated_blocks(module):
        block = module.get_submodule(block_name)
        attentions = [name for name, child in block.named_modules() if isinstance(child, nn.MultiheadAttention)]
        plan.update({f"{block_name}.{name}": COLWISE for name in attentions})
        linears = [(f"{block_name}.{name}", *_linear_dims(child)) for name, child in block.named_modules()
                   if _linear_dims(child) is not None and not any(_inside(name, a) for a in attentions)]
        plan.update(_match_block(linears))
    if not plan:
        raise ValueError(f"tensor_parallel: found no attention or MLP to shard in {type(module).__name__}; "
                         "pass plan={pattern: style}")
    return plan


def _repeated_blocks(module: nn.Module) -> List[str]:
    """split's repeated blocks, or none: the caller's error then says what tensor_parallel looked for
    instead of split's advice."""
    try:
        return _find_layers(module)
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


def _specs(module: nn.Module, name: str, style: str) -> Dict[str, ShardSpec]:
    child = module.get_submodule(name)
    if isinstance(child, nn.MultiheadAttention):
        if style not in (COLWISE, QKV):
            raise ValueError(f"tensor_parallel: style {style!r} for {name!r}, an nn.MultiheadAttention; expected "
                             "'colwise' (its heads split) or 'replicate'")
        width = child.embed_dim
        return {name: ShardSpec(COLWISE, (width,) * 3, weight_name="in_proj_weight", bias_name="in_proj_bias"),
                f"{name}.out_proj": ShardSpec(ROWWISE, (width,))}
    if style == VOCAB:
        if not isinstance(child, nn.Embedding):
            raise ValueError(f"tensor_parallel: style 'vocab' for {name!r}, a {type(child).__name__}; "
                             "expected an nn.Embedding")
        return {name: ShardSpec(VOCAB, (child.num_embeddings,))}
    dims = _linear_dims(child)
    if dims is None:
        raise ValueError(f"tensor_parallel: style {style!r} for {name!r}, a {type(child).__name__}; expected "
                         "an nn.Linear or transformers' Conv1D")
    in_features, out_features = dims
    transposed = _is_conv1d(child)
    if style == ROWWISE:
        return {name: ShardSpec(ROWWISE, (in_features,), transposed)}
    if style == COLWISE_GATHER:
        return {name: ShardSpec(COLWISE, (out_features,), transposed, gather_output=True)}
    if style == QKV:
        if out_features % 3:
            raise ValueError(f"tensor_parallel: style 'qkv' for {name!r} with {out_features} outputs; expected "
                             "q, k and v of equal width (a multiple of 3); give q, k, v as separate layers")
        return {name: ShardSpec(COLWISE, (out_features // 3,) * 3, transposed)}
    return {name: ShardSpec(COLWISE, (out_features,), transposed)}


def _style_name(spec: ShardSpec) -> str:
    fused = len(spec.parts) == 3 and spec.style == COLWISE and spec.weight_name == "weight"
    return QKV if fused else COLWISE_GATHER if spec.gather_output else spec.style


# --- checks ------------------------------------------------------------------------------------

def _head_attributes(module: nn.Module) -> Dict[str, int]:
    return {key: value for key, value in vars(module).items()
            if isinstance(value, int) and not isinstance(value, bool) and "head" in key
            and not re.search(r"dim|size", key)}


def _check_divisible(module: nn.Module, specs: Dict[str, ShardSpec], world: int) -> None:
    for name, spec in specs.items():
        for part in spec.parts:
            if part % world:
                raise ValueError(f"tensor_parallel: {name!r} ({spec.style}) has {part} "
                                 f"{'rows' if spec.style == VOCAB else 'features'} to split, not divisible by the "
                                 f"group size {world}")
    for name, spec in specs.items():
        child = module.get_submodule(name)
        if isinstance(child, nn.MultiheadAttention) and child.num_heads % world:
            raise ValueError(f"tensor_parallel: {name!r} has num_heads={child.num_heads}, not divisible by the "
                             f"group size {world}; expected a multiple of {world}")
    for name, owner in _owners_of_splits(module, specs):
        for key, heads in _head_attributes(owner).items():
            if heads % world:
                raise ValueError(f"tensor_parallel: {name or type(module).__name__!r} has {key}={heads}, not "
                                 f"divisible by the group size {world}; expected a multiple of {world}")
    config = getattr(module, "config", None)
    for key in ("num_attention_heads", "num_key_value_heads", "n_head"):
        heads = getattr(config, key, None)
        if specs and isinstance(heads, int) and heads % world:
            raise ValueError(f"tensor_parallel: the model's config has {key}={heads}, not divisible by the group "
                             f"size {world}; expected a multiple of {world}")


def _owners_of_splits(module: nn.Module, specs: Dict[str, ShardSpec]):
    """The parents of column-split layers (attention modules, MLPs): the modules whose head counts
    and widths the split divides."""
    parents = dict.fromkeys(name.rpartition(".")[0] for name, spec in specs.items()
                            if spec.style == COLWISE and not spec.gather_output)
    for name in parents:
        yield name, module.get_submodule(name)


def _check_same_plan_on_every_rank(specs: Dict[str, ShardSpec], group: GroupLike, world: int) -> None:
    """Every rank must shard the same layers the same way; a mismatch would hang or corrupt the first
    collective, so ranks compare a digest of their plans before any layer runs."""
    if world == 1:
        return
    digest = torch.frombuffer(bytearray(hashlib.sha256(repr(sorted(specs.items())).encode()).digest()),
                              dtype=torch.uint8)
    digests = all_gather_rows(digest, group, "torch_mp.tensor_parallel (plan check)").cpu()
    differing = [rank for rank, other in enumerate(digests) if not torch.equal(other, digests[0])]
    if differing:
        raise ValueError(f"tensor_parallel: ranks {differing} resolved a different plan than rank 0; expected the "
                         "same model and plan on every rank")


# --- swapping ----------------------------------------------------------------------------------

def _swap(module: nn.Module, name: str, spec: ShardSpec, group: GroupLike, shared: Dict[Tuple, nn.Parameter]) -> None:
    """Replaces the dense layer ``name`` by its parallel counterpart. A weight the dense model ties
    between layers (an embedding and its LM head) and that both split alike stays one parameter."""
    dense = module.get_submodule(name)
    parent_name, _, child_name = name.rpartition(".")
    info = resolve_group(group)

    def local(tensor: torch.Tensor, dim: int, transposed: bool = False) -> nn.Parameter:
        key = (id(tensor), dim, spec.parts, transposed)
        if key not in shared:
            full = tensor.detach().t() if transposed else tensor.detach()
            shared[key] = nn.Parameter(shard(full, dim, spec.parts, info.rank, info.size),
                                       requires_grad=tensor.requires_grad)
        return shared[key]

    if spec.style == VOCAB:
        layer = VocabParallelEmbedding(dense.num_embeddings, dense.embedding_dim, group, device="meta",
                                       dtype=dense.weight.dtype)
        layer.weight = local(dense.weight, 0)
    else:
        in_features, out_features = _linear_dims(dense)
        bias = getattr(dense, "bias", None)
        if spec.style == COLWISE:
            layer = ColumnParallelLinear(in_features, out_features, bias is not None, spec.gather_output, group,
                                         device="meta", dtype=dense.weight.dtype)
        else:
            layer = RowParallelLinear(in_features, out_features, bias is not None, True, group, device="meta",
                                      dtype=dense.weight.dtype)
        layer.weight = local(dense.weight, spec.dim, spec.transposed)
        if bias is not None:
            layer.bias = local(bias, 0) if spec.shards_bias() else bias
    layer.tp_spec = spec
    setattr(module.get_submodule(parent_name), child_name, layer)


def _fix_split_attributes(module: nn.Module, specs: Dict[str, ShardSpec], world: int) -> None:
    """Divides the head counts, and the widths equal to a split projection's, of the modules that
    hold split layers, so the stock forward reshapes this rank's heads correctly."""
    widths = {part for spec in specs.values() if spec.style == COLWISE for part in spec.parts}
    for name, owner in list(_owners_of_splits(module, specs)):
        for key in _head_attributes(owner):
            setattr(owner, key, getattr(owner, key) // world)
        for key in _WIDTH_ATTRIBUTES:
            value = getattr(owner, key, None)
            if isinstance(value, int) and value in widths:
                setattr(owner, key, value // world)


# --- sequence parallelism ----------------------------------------------------------------------

def _sequence_parallel(module: nn.Module, blocks: List[str], info) -> None:
    for name in blocks:
        block = module.get_submodule(name)
        layers = [(child_name, child) for child_name, child in block.named_modules()
                  if isinstance(child, (ColumnParallelLinear, RowParallelLinear, TensorParallelMultiheadAttention))]
        if any(isinstance(child, TensorParallelMultiheadAttention) for _, child in layers):
            raise ValueError(f"tensor_parallel: sequence_parallel for {name!r}, which holds an "
                             "nn.MultiheadAttention; expected blocks with separate projections")
        # Each rowwise layer closes a parallel region opened by the colwise layers before it; the
        # module holding both (an attention, an MLP) gathers its input along the sequence.
        owners, opened = {}, None
        for child_name, child in layers:
            child.sequence_dim = SEQUENCE_DIM
            if isinstance(child, ColumnParallelLinear):
                opened = opened or child_name
            elif opened is not None:
                owner = _common_prefix(opened, child_name)
                owners[owner] = block.get_submodule(owner) if owner else block
                opened = None
        for owner in owners.values():
            owner.register_forward_pre_hook(_gather_input(info), with_kwargs=True)
        # Parameters other than this rank's slices see only this rank's tokens: sum their gradients.
        sliced = set()
        for _, child in layers:
            sliced.update(id(p) for p in (child.weight, child.bias if isinstance(child, ColumnParallelLinear) else None)
                          if p is not None)
        for parameter in block.parameters():
            if id(parameter) not in sliced and parameter.requires_grad:
                parameter.register_hook(_sum_over_ranks(info))
    first, last = module.get_submodule(blocks[0]), module.get_submodule(blocks[-1])
    first.register_forward_pre_hook(_map_hidden_states(_split(info)), with_kwargs=True)
    last.register_forward_hook(_gather_output(info))


def _common_prefix(a: str, b: str) -> str:
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _sum_over_ranks(info):
    return lambda grad: torch.ops.torch_mp._all_reduce(grad, "sum", info.name, info.size)


def _split(info):
    return lambda t: torch.ops.torch_mp.scatter_to_tp(t, SEQUENCE_DIM, info.name, info.size)


def _map_hidden_states(fn):
    """A pre-hook applying ``fn`` to a module's activations: its first argument, or ``hidden_states``."""
    def hook(owner, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


def _gather_input(info):
    return _map_hidden_states(
        lambda t: torch.ops.torch_mp.gather_from_sp(t, SEQUENCE_DIM, info.name, info.size))


def _gather_output(info):
    """Gathers the block's activations (its output, or the output's first element) along the sequence."""
    def hook(block, args, output):
        gather = lambda t: torch.ops.torch_mp.gather_from_tp(t, SEQUENCE_DIM, info.name, info.size)  # noqa: E731
        if isinstance(output, torch.Tensor):
            return gather(output)
        return (gather(output[0]),) + tuple(output[1:])
    return hook
