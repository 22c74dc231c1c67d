"""Tensor parallelism for stock modules: swap their Linear / Conv1D / Embedding layers for the
parallel ones by a plan, and divide the attributes that depend on the shard (head counts, widths),
so the stock forward runs.

A plan maps module-name patterns (globs: ``"layers.*.mlp.up_proj"``) to styles:

- ``colwise``: output features sharded (q, k, v, MLP up/gate); the output is this rank's slice. On an
  ``nn.MultiheadAttention``: its heads sharded (q, k, v by heads, the output projection rowwise).
  Key/value projections with fewer heads than ranks keep whole heads: each rank holds the KV heads
  its query heads use (replicated over ``ranks / kv heads`` ranks, their gradients summed).
- ``colwise_gather``: colwise, the output all-gathered (an LM head whose logits must stay whole).
- ``qkv``: a fused q, k, v projection, cut by heads in the layout the attention reads it: q|k|v in
  thirds (GPT-2), interleaved per head ``[heads, 3, head_dim]`` (Falcon, BLOOM), per KV group (Falcon's
  new decoder), or q heads then one shared k and v (Falcon multi-query: k and v replicated).
- ``packed_colwise``: a fused gate|up projection; each half sharded on its own.
- ``rowwise``: input features sharded (attention output, MLP down); one all-reduce, full output.
  ``rowwise_split_input``: the same, its input arriving whole (sharded here).
- ``vocab``: an embedding's rows sharded; full embeddings out. The embedding's own forward runs (a
  scaled embedding keeps its scale); ``padding_idx`` keeps its row's gradient at zero.
- ``heads``: an embedding whose columns are per-head values (T5's relative attention bias), cut with
  the heads; the output stays this rank's heads.
- ``replicated_with_grad_allreduce``: left whole, its parameters' gradients summed over the ranks (a
  norm applied per head, Qwen 3's q_norm / k_norm, sees only this rank's heads).
- ``replicate``: left as it is.
- ``sequence_parallel``: on a block (a pre-norm transformer layer): outside its attention and MLP the
  activations are sharded along the sequence, so norms, dropout and residual adds hold 1 / group size
  of them (Megatron's sequence parallelism). The attention and the MLP all-gather their input along
  the sequence and reduce-scatter their output; consecutive such blocks pass the sharded activations
  on, the first shards its input and the last gathers its output; the gradients of the parameters
  that see only this rank's tokens (norms, rowwise biases) are summed over the ranks.
"""
import dataclasses
import hashlib
import logging
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.optimizer import register_optimizer_step_pre_hook

from torch_mp._tensor_parallel import dtensor, moe
from torch_mp._tensor_parallel.dropout import DenseDropoutRegion
from torch_mp._checks import mark_replaced
from torch_mp._group import GroupInfo, GroupLike, all_gather_rows, process_group_of, resolve_group
from torch_mp._hooks import linear_hook
from torch_mp._tensor_parallel.sharding import COLWISE, HEADS, ROWWISE, VOCAB, ShardSpec, shard
from torch_mp._tensor_parallel.plan import (
    COLWISE_GATHER, GRAD_SUM, MOE, PACKED_COLWISE, QKV, REPLICATE, ROWWISE_SPLIT_INPUT, SEQUENCE_PARALLEL, Plan,
    auto_plan, head_count_attributes, is_conv1d, linear_dims, repeated_blocks, resolve_patterns,
)
from torch_mp.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelMultiheadAttention,
    VocabParallelEmbedding,
    share_input_copy,
)
from torch_mp._layers import inside
from torch_mp._state import TENSOR_PARALLEL, ParallelState, attach, check_not_parallelized

logger = logging.getLogger("torch_mp")

SEQUENCE_DIM = 1  # activations are [batch, sequence, features]

# Attributes holding a width that sharding divides, when they equal a sharded projection's width.
_WIDTH_ATTRIBUTES = ("split_size", "all_head_size", "inner_dim")
# Models whose fused q, k, v projection is laid out per head, [heads, 3, head_dim]: cut by heads.
_PER_HEAD_QKV = ("bloom", "falcon", "gpt_neox", "gpt_neox_japanese", "persimmon")


def tensor_parallel(module: nn.Module, plan: Union[str, Plan] = "auto", group: GroupLike = None,
                    sequence_parallel: bool = False, async_tp: Union[bool, int] = False) -> nn.Module:
    """Shards ``module`` in place across ``group`` and returns it.

    ``plan="auto"`` uses the model's own ``tp_plan`` where it has one (transformers models; every
    style transformers' plans use maps onto one of ours, others raise), and otherwise finds, inside
    each block of every stack of repeated blocks (an encoder's and a decoder's), attention (separate
    q, k, v or a fused qkv, then the output projection) and MLPs (up and gate, then down) from the
    order and shapes of their linear layers. What it does not shard stays replicated;
    ``module.torch_mp_replicated`` lists those layers. ``sequence_parallel=True`` adds the
    ``sequence_parallel`` style to the repeated blocks. A mixture-of-experts block (style ``moe``:
    transformers' Mixtral, Qwen2-MoE ...) keeps its router replicated and its 3-D experts whole per
    rank, tokens routed with ``all_to_all``, or cut within each expert (``torch_mp._moe``).

    Raises ValueError, before any collective, for what it cannot shard exactly: head counts not
    divisible by the group size, experts in another layout or neither their number nor their
    intermediate size divisible by the group size, MoE blocks under ``sequence_parallel=True``,
    embeddings with ``max_norm``, styles it does not implement.

    Once the ranks have compared their plans (one small all-gather), and before any layer runs,
    the sharded model runs once on fake tensors (an input built from its config or first layer). A
    module whose own forward fails on this rank's shards (code that reshapes with a full-width
    attribute, ``x.split(self.n_embd)``) is kept whole under ``plan="auto"``: its layers join
    ``module.torch_mp_replicated`` and ``module.torch_mp_kept_whole`` says why ({module: error});
    under a plan given as a dict it is a ValueError naming the module and the error.

    ``async_tp`` (sequence parallel blocks only; torchtitan's async TP, Wang et al., ASPLOS 2023):
    the all-gather before each attention's and MLP's column-parallel matmuls and the reduce-scatter
    after their row-parallel one are decomposed into chunks that overlap with the matmuls
    (``torch_mp.all_gather_matmul``, ``torch_mp.matmul_reduce_scatter``), in eager mode and under
    torch.compile. ``True``: one chunk per rank; an int ``n``: each rank's rows cut into ``n``
    chunks (one per rank where ``n`` does not divide them). The numbers are the same up to float
    rounding (a smaller matmul may be blocked differently by BLAS). Raises ValueError without
    sequence parallel blocks.

    The result has ``torch_mp_plan`` ({module name: style}) and keeps the stock parameter names;
    ``torch_mp.full_state_dict`` gathers a stock state_dict from it; ``torch_mp.state_of(module)``
    returns its record. Each rank's layers hold ``1 / group size`` of the sharded weights:
    ``[out, in] -> [out / world, in]`` colwise, ``[out, in / world]`` rowwise, ``[V / world, dim]``
    vocab. The styles follow Megatron-LM (Shoeybi et al., 2019, arXiv:1909.08053) and its sequence
    parallelism (Korthikanti et al., 2022, arXiv:2205.05198), named as in transformers' ``tp_plan``
    and ``torch.distributed.tensor.parallel``.

    A deep copy of the result (``copy.deepcopy``) is a sharded model of its own, in the same group,
    and trains as the original does: the gradient sums over ranks (sequence-parallel norms, key and
    value heads kept whole by several ranks) are hooks that each module owning such a parameter puts
    back on the parameter it holds at each forward, as after ``load_state_dict(..., assign=True)``.

    Raises TypeError for a ``module`` that is not an ``nn.Module``, a ``plan`` that is neither
    ``"auto"`` nor a dict or a ``group`` of another type; the ValueErrors above, and ValueError when
    the ranks resolve different plans or the module was returned by a torch_mp wrapper already.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"tensor_parallel: expected module to be a torch.nn.Module, got {type(module).__name__}")
    check_not_parallelized(module, "tensor_parallel")
    dense_parameters = list(module.parameters())
    info = resolve_group(group, "tensor_parallel(group=...)")
    if isinstance(plan, str):
        if plan != "auto":
            raise ValueError(f"tensor_parallel: plan={plan!r}; expected 'auto' or a {{pattern: style}} dict")
        resolved = auto_plan(module)
    elif isinstance(plan, Mapping):
        resolved = resolve_patterns(module, plan)
    else:
        raise TypeError(f"tensor_parallel: expected plan to be 'auto' or a dict, got {type(plan).__name__}")
    if sequence_parallel:
        blocks = repeated_blocks(module)
        if not blocks:
            raise ValueError(f"tensor_parallel: sequence_parallel=True but {type(module).__name__} has no repeated "
                             "blocks to make sequence parallel; expected transformer blocks, or plan={name: "
                             "'sequence_parallel'}")
        resolved.update({name: SEQUENCE_PARALLEL for name in blocks})
    sequence_blocks = [name for name, style in resolved.items() if style == SEQUENCE_PARALLEL]
    chunks = _async_tp_chunks(async_tp)
    if chunks is not None and not sequence_blocks:
        raise ValueError(f"tensor_parallel: async_tp={async_tp!r} without sequence parallel blocks; expected "
                         "sequence_parallel=True (or blocks with style 'sequence_parallel')")
    grad_sums = [name for name, style in resolved.items() if style == GRAD_SUM]
    moe_blocks = [name for name, style in resolved.items() if style == MOE]
    if moe_blocks and sequence_blocks:
        raise ValueError(f"tensor_parallel: sequence_parallel=True with mixture-of-experts blocks ({moe_blocks[0]!r} "
                         "...); expected sequence_parallel=False: MoE blocks take every token on every rank")
    specs: Dict[str, ShardSpec] = {}
    for name, style in resolved.items():
        if style not in (REPLICATE, SEQUENCE_PARALLEL, GRAD_SUM, MOE):
            specs.update(_specs(module, name, style, info.size))
    kv_replicas = _replicate_kv_heads(module, specs, info.size)
    _check_divisible(module, specs, info.size, kv_replicas)
    # The experts' shards, checked here (before any collective), applied after the dry run.
    expert_specs = {f"{name}.{key}" if name else key: spec for name in moe_blocks
                    for key, spec in moe.expert_specs(module.get_submodule(name), info.size, name=name)[1].items()}
    kept_early = _keep_undescribable_whole(specs, info.size, explicit=not isinstance(plan, str))
    _check_same_plan_on_every_rank({**specs, **expert_specs}, group, info.size)

    saved = _Saved(module, specs)
    attentions = [name for name in specs if isinstance(module.get_submodule(name), nn.MultiheadAttention)]
    shared: Dict[Tuple, nn.Parameter] = {}
    for name, spec in specs.items():
        if name in attentions:
            parent_name, _, child_name = name.rpartition(".")
            setattr(module.get_submodule(parent_name), child_name,
                    TensorParallelMultiheadAttention(module.get_submodule(name), group))
        elif not any(inside(name, attention) for attention in attentions):
            _swap(module, name, spec, group, info, shared)
    _divide_sharded_attributes(module, specs, info.size, kv_replicas)
    # The same plan on every rank fails the same way on each: what it keeps whole is the same too.
    with moe.shape_only(module, moe_blocks):
        kept_whole = {**kept_early, **_dry_run(module, specs, saved, explicit=not isinstance(plan, str))}
    grad_sums = [name for name in grad_sums if not any(_within(name, owner) for owner in kept_whole)]
    # Mixture-of-experts blocks: experts whole per rank or cut within each (torch_mp._moe), keyed by
    # parameter name; after the dry run, whose fake tensors have no counts to route tokens by.
    moe_blocks = [name for name in moe_blocks if not any(_within(name, owner) for owner in kept_whole)]
    specs.update(moe.parallelize_moe_blocks(module, group, blocks=moe_blocks))
    if info.size > 1:
        for name in grad_sums:
            child = module.get_submodule(name)
            _hook_gradients(child, {p: _SumOverRanks(info) for p, _ in child.named_parameters(recurse=False)})
    if sequence_blocks:
        # Norms applied per head inside the attention see every token (its input is gathered): their
        # gradients are summed once, over the heads.
        summed = {id(p) for name in grad_sums for p in module.get_submodule(name).parameters()}
        _sequence_parallel(module, sequence_blocks, info, summed, chunks)
    _share_input_copies(module)
    _dense_dropout_regions(module, specs, info, sequence_blocks)
    styles = {name: _style_name(spec) for name, spec in specs.items()}
    styles.update({name: GRAD_SUM for name in grad_sums})
    styles.update({name: MOE for name in moe_blocks})
    styles.update({name: SEQUENCE_PARALLEL for name in sequence_blocks})
    replicated = [name for name, child in module.named_modules()
                  if _is_shardable(child) and not any(inside(name, s) for s in specs)]
    _distribute_parameters(module, specs, group, info)
    _mark_replaced(dense_parameters, module)
    attach(module, ParallelState(TENSOR_PARALLEL, group=group, specs=specs, plan=styles, replicated=replicated,
                                 kept_whole=kept_whole), "tensor_parallel")
    logger.info("tensor_parallel: %d layers sharded across %d ranks; replicated: %s", len(specs), info.size,
                replicated)
    return module


# --- specs -------------------------------------------------------------------------------------

def _is_shardable(module: nn.Module) -> bool:
    return linear_dims(module) is not None or isinstance(module, (nn.Embedding, nn.MultiheadAttention))


def _specs(module: nn.Module, name: str, style: str, world: int) -> Dict[str, ShardSpec]:
    child = module.get_submodule(name)
    if isinstance(child, nn.MultiheadAttention):
        if style not in (COLWISE, QKV):
            raise ValueError(f"tensor_parallel: style {style!r} for {name!r}, an nn.MultiheadAttention; expected "
                             "'colwise' (its heads sharded) or 'replicate'")
        width = child.embed_dim
        return {name: ShardSpec(COLWISE, (width,) * 3, weight_name="in_proj_weight", bias_name="in_proj_bias"),
                f"{name}.out_proj": ShardSpec(ROWWISE, (width,))}
    if style in (VOCAB, HEADS):
        if not isinstance(child, nn.Embedding):
            raise ValueError(f"tensor_parallel: style {style!r} for {name!r}, a {type(child).__name__}; "
                             "expected an nn.Embedding")
        if child.max_norm is not None or child.scale_grad_by_freq or child.sparse:
            raise ValueError(f"tensor_parallel: {name!r} ({type(child).__name__}) has max_norm, scale_grad_by_freq "
                             "or sparse set, which need every row of the table; expected a plain embedding, or "
                             f"plan={{{name!r}: 'replicate'}}")
        if style == HEADS:
            return {name: ShardSpec(HEADS, (child.embedding_dim,))}
        return {name: ShardSpec(VOCAB, (child.num_embeddings,))}
    dims = linear_dims(child)
    if dims is None:
        raise ValueError(f"tensor_parallel: style {style!r} for {name!r}, a {type(child).__name__}; expected "
                         "an nn.Linear or transformers' Conv1D")
    if isinstance(child, nn.Linear) and not _computes_linear(child):
        raise ValueError(f"tensor_parallel: {name!r} is a {type(child).__name__}, an nn.Linear whose own forward "
                         f"computes something else than x @ weight.T + bias, which sharding would drop; expected an "
                         f"nn.Linear, or plan={{{name!r}: 'replicate'}}")
    in_features, out_features = dims
    transposed = is_conv1d(child)
    if style in (ROWWISE, ROWWISE_SPLIT_INPUT):
        return {name: ShardSpec(ROWWISE, (in_features,), transposed, input_is_parallel=style == ROWWISE)}
    if style == COLWISE_GATHER:
        return {name: ShardSpec(COLWISE, (out_features,), transposed, gather_output=True)}
    if style == PACKED_COLWISE:
        return {name: ShardSpec(COLWISE, (out_features // 2,) * 2, transposed)}
    if style == QKV:
        return {name: _fused_qkv_spec(module, name, out_features, transposed, world)}
    return {name: ShardSpec(COLWISE, (out_features,), transposed)}


def _computes_linear(layer: nn.Linear) -> bool:
    """Whether ``layer``'s forward is nn.Linear's computation (subclasses such as FalconLinear that
    only rewrite it are): checked on a copy with random weights, so meta weights do too."""
    if type(layer).forward is nn.Linear.forward:
        return True
    probe = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, dtype=torch.float64)
    copy = type(layer).__new__(type(layer))
    copy.__dict__.update({**layer.__dict__, "_parameters": dict(probe._parameters)})
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
    try:
        with torch.no_grad():
            return torch.allclose(copy(x), probe(x))
    except Exception:  # noqa: BLE001 (any failure means: not a linear layer we can shard)
        return False


def _fused_qkv_spec(module: nn.Module, name: str, out_features: int, transposed: bool, world: int) -> ShardSpec:
    """The cut of a fused q, k, v projection, from the layout its attention reads (its attributes,
    the model's config)."""
    owner = module.get_submodule(name.rpartition(".")[0])
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if getattr(owner, "multi_query", False) and not getattr(owner, "new_decoder_architecture", False):
        # Falcon multi-query: q heads, then one k and one v head that every rank keeps.
        head_dim = owner.head_dim
        return ShardSpec(COLWISE, (out_features - 2 * head_dim, head_dim, head_dim), transposed,
                         replicas=(1, world, world))
    if model_type in _PER_HEAD_QKV or hasattr(owner, "new_decoder_architecture"):
        # [heads, 3, head_dim] (or [kv groups, q per group + 2, head_dim]): whole heads in order.
        return ShardSpec(COLWISE, (out_features,), transposed)
    if out_features % 3:
        raise ValueError(f"tensor_parallel: style 'qkv' for {name!r} with {out_features} outputs; expected "
                         "q, k and v of equal width (a multiple of 3); give q, k, v as separate layers")
    return ShardSpec(COLWISE, (out_features // 3,) * 3, transposed)


def _style_name(spec: ShardSpec) -> str:
    if spec.style == ROWWISE:
        return ROWWISE if spec.input_is_parallel else ROWWISE_SPLIT_INPUT
    if spec.style != COLWISE or spec.weight_name != "weight":
        return spec.style
    return {3: QKV, 2: PACKED_COLWISE}.get(len(spec.parts), COLWISE_GATHER if spec.gather_output else COLWISE)


def _head_dim(owner: nn.Module, config) -> int:
    for key in ("head_dim", "head_size", "key_value_proj_dim", "attention_head_size"):
        value = getattr(owner, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(config, "head_dim", None)
    if isinstance(value, int) and value > 0:
        return value
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else 0


def _replicate_kv_heads(module: nn.Module, specs: Dict[str, ShardSpec], world: int) -> Dict[str, int]:
    """Key/value projections of an attention with fewer heads than ranks (a divisor of the group
    size): each of their heads kept whole by ``world / kv heads`` ranks, those whose query heads use
    it (as serving engines do). Returns {attention owner: ranks per KV head}."""
    config = getattr(module, "config", None)
    replicas: Dict[str, int] = {}
    for name, spec in list(specs.items()):
        owner_name = name.rpartition(".")[0]
        if spec.replicas is not None:  # a fused layout that already keeps its KV heads whole
            replicas[owner_name] = max(spec.replicas)
            continue
        if spec.style != COLWISE or spec.gather_output or len(spec.parts) != 1 or spec.weight_name != "weight":
            continue
        owner = module.get_submodule(owner_name)
        if not (head_count_attributes(owner) or "Attention" in type(owner).__name__):
            continue
        head_dim = _head_dim(owner, config)
        if not head_dim or spec.parts[0] % head_dim:
            continue
        heads = spec.parts[0] // head_dim
        if heads % world and world % heads == 0:
            # Each rank holds 1/world of the rows (a plain Shard(0)), all-gathered over the ranks
            # sharing a head; rows the group size does not divide: each head whole on its ranks.
            divides = spec.parts[0] % world == 0
            specs[name] = dataclasses.replace(spec, **({"weight_gather": world // heads} if divides
                                                       else {"replicas": (world // heads,)}))
            replicas[owner_name] = world // heads
    return replicas


def _is_kv_count(key: str) -> bool:
    return "kv" in key or "key_value" in key


# --- checks ------------------------------------------------------------------------------------

def _check_divisible(module: nn.Module, specs: Dict[str, ShardSpec], world: int, kv_replicas: Dict[str, int]) -> None:
    for name, spec in specs.items():
        for part, replicas in zip(spec.parts, spec.replicas or (1,) * len(spec.parts)):
            if (part * replicas) % world:
                raise ValueError(f"tensor_parallel: {name!r} ({spec.style}) has {part} "
                                 f"{'rows' if spec.style == VOCAB else 'features'} to shard, not divisible by the "
                                 f"group size {world}")
    for name, spec in specs.items():
        child = module.get_submodule(name)
        if isinstance(child, nn.MultiheadAttention) and child.num_heads % world:
            raise ValueError(f"tensor_parallel: {name!r} has num_heads={child.num_heads}, not divisible by the "
                             f"group size {world}; expected a multiple of {world}")
    for name, owner in _owners_of_shards(module, specs):
        replicas = kv_replicas.get(name, 1)
        for key, heads in head_count_attributes(owner).items():
            kept = heads * replicas if replicas > 1 and _is_kv_count(key) else heads
            if kept % world:
                raise ValueError(f"tensor_parallel: {name or type(module).__name__!r} has {key}={heads}, not "
                                 f"divisible by the group size {world}; expected a multiple of {world}"
                                 + ("" if _is_kv_count(key) or heads >= world else
                                    " (key/value heads fewer than the ranks are kept whole when they divide it)"))
    config = getattr(module, "config", None)
    for key in ("num_attention_heads", "num_key_value_heads", "n_head"):
        heads = getattr(config, key, None)
        if key == "num_key_value_heads" and isinstance(heads, int) and heads and kv_replicas and world % heads == 0:
            continue
        if specs and isinstance(heads, int) and heads % world:
            raise ValueError(f"tensor_parallel: the model's config has {key}={heads}, not divisible by the group "
                             f"size {world}; expected a multiple of {world}"
                             + (" or a divisor of it (key/value heads kept whole)" if "key_value" in key else ""))


def _owners_of_shards(module: nn.Module, specs: Dict[str, ShardSpec]):
    """The parents of column-sharded layers (attention modules, MLPs): the modules whose head counts
    and widths sharding divides."""
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


def _keep_undescribable_whole(specs: Dict[str, ShardSpec], world: int, explicit: bool) -> Dict[str, str]:
    """Every sharded weight becomes a DTensor whose placements must count each dense element once
    (else torch's clip_grad_norm_ would be silently wrong). A layout DTensor cannot describe (key/value
    heads kept whole by some ranks but not all: Falcon's multi-query q|k|v, fewer KV heads than ranks
    that do not equal one per rank) keeps the module holding it whole (its specs dropped) under
    ``plan="auto"``; under a plan given as a dict it is a ValueError naming it. Before any collective.
    Returns {kept module: why}."""
    kept: Dict[str, str] = {}
    for name, spec in list(specs.items()):
        if world == 1 or name not in specs or dtensor.placements(spec, world) is not None:
            continue
        what = (f"sharded query heads next to key/value heads several ranks hold whole (ranks per part "
                f"{spec.replicas})" if spec.replicas is not None else f"parts of unequal sizes {spec.parts}")
        why = (f"{name!r} ({_style_name(spec)}) would hold {what} on {world} ranks, which no DTensor placement "
               "describes (its gradient norm would count them wrong)")
        if explicit:
            raise ValueError(f"tensor_parallel: {why}; expected plan={{{name!r}: 'replicate'}} (and the layers of "
                             "its attention), or a group size equal to or dividing the key/value heads")
        owner = name.rpartition(".")[0]
        kept[owner] = why
        logger.warning("tensor_parallel: %s; %r stays whole (replicated)", why, owner)
        for inner in [inner for inner in specs if _within(inner, owner)]:
            del specs[inner]
    return kept


def _distribute_parameters(module: nn.Module, specs: Dict[str, ShardSpec], group: GroupLike,
                           info: GroupInfo) -> None:
    """Makes every parameter of ``module`` an ``nn.Parameter(DTensor)`` on the group's mesh: the
    sharded ones with the placements of their specs (keyed by module or parameter name), the others
    ``Replicate()``; stock modules holding them compute on local views (``dtensor.LocalViews``).
    Tied parameters stay one. Nothing without torch.distributed."""
    mesh = dtensor.device_mesh(group)
    if mesh is None:
        return
    dtensor.refuse_dtensor_broadcast()
    where: Dict[Tuple[str, str], List] = {}
    for name, spec in specs.items():
        owner_name, _, leaf = name.rpartition(".")
        if leaf in module.get_submodule(owner_name)._parameters and name not in dict(module.named_modules()):
            where[(owner_name, leaf)] = dtensor.placements(spec, info.size)
            continue
        where[(name, spec.weight_name)] = dtensor.placements(spec, info.size)
        if spec.shards_bias():
            where[(name, spec.bias_name)] = dtensor.placements(spec, info.size, dim=0)
    made: Dict[int, nn.Parameter] = {}
    for owner_name, owner in module.named_modules():
        distributed = False
        for leaf, param in list(owner._parameters.items()):
            if param is None:
                continue
            if isinstance(param, DTensor):
                distributed = True
                continue
            if id(param) not in made:
                placements = where.get((owner_name, leaf)) or [Replicate()]
                made[id(param)] = dtensor.distribute_parameter(
                    param, mesh, placements, dtensor.global_shape(param.shape, placements, info.size))
            owner._parameters[leaf] = made[id(param)]
            distributed = True
        if distributed and not isinstance(owner, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            dtensor.add_local_views(owner)


_FACTORED_HOOK = None
# Optimizers whose update reads whole tensors in ways DTensor has no rules for: Adafactor (torch's and
# transformers') factors the second moment into row and column statistics and scales by the update's
# RMS (on DTensor parameters torch's fails in an in-place pow of a partial norm, transformers' on its
# plain statistics next to DTensor gradients; per shard, as before DTensors, they were each rank's own).
_FACTORED = ("Adafactor",)


def _mark_replaced(dense: List[nn.Parameter], module: nn.Module) -> None:
    """Marks the parameters ``tensor_parallel`` replaced by their shards (``mark_replaced``: an
    optimizer built on them before raises at its next step), and makes a factored optimizer
    (Adafactor) holding DTensor parameters raise too, as it cannot step them to the dense numbers
    (``_check_optimizer``, a global optimizer step pre-hook registered once)."""
    global _FACTORED_HOOK
    mark_replaced(dense, module, "tensor_parallel(model)")
    if _FACTORED_HOOK is None:
        _FACTORED_HOOK = register_optimizer_step_pre_hook(_check_optimizer)


def _check_optimizer(optimizer: torch.optim.Optimizer, *_) -> None:
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        for param in group["params"]:
            if name in _FACTORED and isinstance(param, DTensor):
                raise ValueError(f"{name}.step: optimizer = {name}, whose update factors each parameter's second "
                                 "moment into row and column statistics of the whole tensor, holds the DTensor "
                                 f"parameter of shape {tuple(param.shape)} (placements {param.placements}; "
                                 "torch_mp.tensor_parallel's or FSDP2's), whose statistics it cannot compute as "
                                 "the dense model does; expected an elementwise optimizer (SGD, Adam, AdamW, RMSprop, "
                                 "Adagrad, ...)")


# --- swapping ----------------------------------------------------------------------------------

def _swap(module: nn.Module, name: str, spec: ShardSpec, group: GroupLike, info: GroupInfo,
          shared: Dict[Tuple, nn.Parameter]) -> None:
    """Replaces the dense layer ``name`` by its parallel counterpart. A weight the dense model ties
    between layers (an embedding and its LM head) and that both shard alike stays one parameter."""
    dense = module.get_submodule(name)
    parent_name, _, child_name = name.rpartition(".")

    def local(tensor: torch.Tensor, dim: int, transposed: bool = False, replicas=None) -> nn.Parameter:
        key = (id(tensor), dim, spec.parts, transposed, replicas)
        if key not in shared:
            full = tensor.detach().t() if transposed else tensor.detach()
            shared[key] = nn.Parameter(shard(full, dim, spec.parts, info.rank, info.size, replicas),
                                       requires_grad=tensor.requires_grad)
        return shared[key]

    if spec.style == HEADS:
        dense.weight = local(dense.weight, 1)
        dense.embedding_dim = dense.weight.shape[1]
        return
    if spec.style == VOCAB:
        layer = _vocab_parallel(dense, local(dense.weight, 0), group, info)
    else:
        in_features, out_features = linear_dims(dense)
        bias = getattr(dense, "bias", None)
        factory = {"device": "meta", "dtype": dense.weight.dtype}
        if spec.style == COLWISE:
            # The layer's shapes come from the parameters set below (fewer KV heads than ranks: whole heads).
            layer = ColumnParallelLinear(in_features, sum(spec.local_parts(info.size)) * info.size, bias is not None,
                                         spec.gather_output, group, **factory)
            layer.out_features = out_features
        else:
            layer = RowParallelLinear(in_features, out_features, bias is not None, spec.input_is_parallel,
                                      group, **factory)
        layer.weight = local(dense.weight, spec.dim, spec.transposed, spec.replicas)
        if bias is not None:
            layer.bias = local(bias, 0, replicas=spec.replicas) if spec.shards_bias() else bias
        if spec.replicas is not None and max(spec.replicas) > 1 and info.size > 1:
            _hook_gradients(layer, {"weight": _SumReplicated(spec, info), "bias": _SumReplicated(spec, info)})
        if spec.weight_gather > 1:
            layer.weight_gather = _head_sharing_group(group, info, spec.weight_gather)
    layer.tp_spec = spec
    setattr(module.get_submodule(parent_name), child_name, layer)


_HEAD_SHARING_GROUPS: Dict[Tuple[str, Tuple[int, ...]], str] = {}


def _head_sharing_group(group: GroupLike, info: GroupInfo, size: int) -> Tuple[str, int]:
    """(name, size) of the process group of the ``size`` consecutive ranks of ``group`` that this
    rank's key/value heads are shared by (the whole group when ``size`` is its size), made once per
    set of ranks, by its members only."""
    if size == info.size:
        return info.name, size
    ranks = dist.get_process_group_ranks(process_group_of(group) or dist.group.WORLD)
    start = info.rank // size * size
    members = tuple(ranks[start:start + size])
    key = (info.name, members)
    if key not in _HEAD_SHARING_GROUPS:
        _HEAD_SHARING_GROUPS[key] = dist.new_group(list(members), use_local_synchronization=True).group_name
    return _HEAD_SHARING_GROUPS[key], size


class _VocabParallelLookup(nn.Embedding):
    """Placed between an embedding's own class and ``nn.Embedding`` (or standing for a plain
    ``nn.Embedding`` with ``padding_idx``): the class's own forward runs, and its lookup reads this
    rank's rows of the vocabulary. ``padding_idx``'s row gets no gradient, as in ``nn.Embedding``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        row = -1 if self.padding_idx is None else self.padding_idx - self.vocab_start
        if 0 <= row < weight.shape[0]:
            keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
            keep[row] = 0
            weight = weight * keep + (weight * (1 - keep)).detach()
        return torch.ops.torch_mp.vocab_parallel_embedding(input, weight, self.vocab_start, self.group_name,
                                                           self.group_size)


_VOCAB_PARALLEL_CLASSES: Dict[type, type] = {nn.Embedding: _VocabParallelLookup}


def _vocab_parallel(dense: nn.Embedding, weight: nn.Parameter, group: GroupLike, info: GroupInfo) -> nn.Module:
    """``dense`` with its rows sharded: a VocabParallelEmbedding for a plain nn.Embedding; otherwise the
    module itself, its class given the vocab-parallel lookup under its own forward."""
    if type(dense) is nn.Embedding and dense.padding_idx is None:
        layer = VocabParallelEmbedding(dense.num_embeddings, dense.embedding_dim, group, device="meta",
                                       dtype=dense.weight.dtype)
        layer.weight = weight
        return layer
    cls = type(dense)
    if cls not in _VOCAB_PARALLEL_CLASSES:
        _VOCAB_PARALLEL_CLASSES[cls] = type(f"VocabParallel{cls.__name__}", (cls, _VocabParallelLookup),
                                            {"__module__": __name__})
    dense.__class__ = _VOCAB_PARALLEL_CLASSES[cls]
    dense.weight = weight
    dense.group_name, dense.group_size, dense.rank = info.name, info.size, info.rank
    dense.vocab_start = info.rank * weight.shape[0]
    return dense


def _hook_gradients(owner: nn.Module, hooks: Dict[str, Callable]) -> None:
    """Registers ``hooks[name]`` (linear in the gradient: a sum over ranks) on the parameter
    ``name`` of ``owner`` (a dotted name below it), now and on each forward of ``owner`` for the
    parameter then holding that name: ``load_full_state_dict`` and ``load_state_dict(assign=True)``
    put new ones there, and a deep copy of the module holds new parameters, without hooks or the
    mark of their owner, and its own ``owner``, which the forward pre-hook is called with."""
    install = _InstallGradientHooks(hooks)
    install(owner)
    owner.register_forward_pre_hook(install)


class _InstallGradientHooks:
    """A forward pre-hook (a class, so that a module holding it can be pickled): registers each
    ``hooks[name]`` on the parameter ``name`` of the module it is called with, unless it did on
    that very parameter. A copy of it (deepcopy, pickling) remembers none: the parameters of a
    copied or loaded module hold no hooks, though attributes set on them survive pickling."""

    def __init__(self, hooks: Dict[str, Callable]):
        self.hooks = {name: linear_hook(hook) for name, hook in hooks.items()}
        self.hooked: List[nn.Parameter] = []

    def __getstate__(self):
        return {"hooks": self.hooks}

    def __setstate__(self, state) -> None:
        self.hooks, self.hooked = state["hooks"], []

    def __call__(self, module: nn.Module, *_) -> None:
        for name, hook in self.hooks.items():
            parameter = _parameter_or_none(module, name)
            if parameter is not None:
                parameter = dtensor.autograd_leaf(parameter)  # after local_parameters: the plain leaf DDP holds
            if parameter is not None and parameter.requires_grad and not any(p is parameter for p in self.hooked):
                parameter.register_hook(hook)
                self.hooked.append(parameter)


def _parameter_or_none(module: nn.Module, name: str) -> Optional[nn.Parameter]:
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError:
        return None
    return owner._parameters.get(leaf)


class _SumReplicated:
    """A gradient hook for a colwise parameter holding replicated parts (KV heads kept whole by
    several ranks): each such block's gradient summed over the ranks holding it."""

    def __init__(self, spec: ShardSpec, info: GroupInfo):
        self.local_parts, self.replicas, self.info = spec.local_parts(info.size), spec.replicas, info

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return dtensor.rewrap(grad, self.sum)

    def sum(self, grad: torch.Tensor) -> torch.Tensor:
        info = self.info
        pieces = list(grad.split(self.local_parts, 0))
        for i, replicas in enumerate(self.replicas):
            if replicas > 1:
                slot = info.rank // replicas
                slots = grad.new_zeros((info.size // replicas,) + tuple(pieces[i].shape))
                slots[slot] = pieces[i]
                pieces[i] = torch.ops.torch_mp._all_reduce(slots, "sum", info.name, info.size)[slot]
        return torch.cat(pieces, 0)


def _divide_sharded_attributes(module: nn.Module, specs: Dict[str, ShardSpec], world: int,
                          kv_replicas: Dict[str, int]) -> None:
    """Divides the head counts, and the widths equal to a sharded projection's, of the modules that
    hold sharded layers, so the stock forward reshapes this rank's heads correctly. Where KV heads are
    kept whole by several ranks, KV counts become this rank's and query-per-KV group sizes shrink."""
    widths = {part for spec in specs.values() if spec.style == COLWISE for part in spec.parts}
    for name, owner in list(_owners_of_shards(module, specs)):
        replicas = kv_replicas.get(name, 1)
        for key, heads in head_count_attributes(owner).items():
            setattr(owner, key, heads * replicas // world if replicas > 1 and _is_kv_count(key) else heads // world)
        if replicas > 1:
            for key, value in list(vars(owner).items()):
                if "group" in key and isinstance(value, int) and not isinstance(value, bool):
                    setattr(owner, key, value // replicas)
        for key in _WIDTH_ATTRIBUTES:
            value = getattr(owner, key, None)
            if isinstance(value, int) and value in widths:
                setattr(owner, key, value // world)


# --- the dry run on fake tensors ---------------------------------------------------------------

class _Saved:
    """A snapshot of every module a plan changes, to put a module back as it was (kept whole)."""

    def __init__(self, module: nn.Module, specs: Dict[str, ShardSpec]):
        self.module = module
        self.layers = {name: self._snapshot(module.get_submodule(name)) for name in specs}
        self.owners = {name: self._snapshot(owner) for name, owner in _owners_of_shards(module, specs)}

    @staticmethod
    def _snapshot(module: nn.Module):
        return module, type(module), dict(module.__dict__), dict(module._parameters)

    @staticmethod
    def _restore(state) -> nn.Module:
        module, cls, attributes, parameters = state
        module.__class__ = cls
        module.__dict__.update(attributes)
        module._parameters = parameters
        return module

    def keep_whole(self, owner: str, specs: Dict[str, ShardSpec]) -> None:
        """Puts back the layers inside ``owner`` and its attributes; drops their specs."""
        for name in [name for name in specs if _within(name, owner)]:
            parent_name, _, child_name = name.rpartition(".")
            setattr(self.module.get_submodule(parent_name), child_name, self._restore(self.layers[name]))
            del specs[name]
        self._restore(self.owners[owner])


def _within(name: str, owner: str) -> bool:
    return owner == "" or inside(name, owner)


def _dry_run(module: nn.Module, specs: Dict[str, ShardSpec], saved: _Saved, explicit: bool) -> Dict[str, str]:
    """Runs the sharded model once on fake tensors (no memory, no compute, no collective). A failure
    inside a module holding sharded layers keeps that module whole (an ``explicit`` plan, the
    caller's: raises ValueError naming it instead), and the run is repeated; a failure elsewhere, or
    no input to try, leaves the plan as it is. Returns {kept module: error}."""
    inputs = _example_inputs(module)
    kept: Dict[str, str] = {}
    if inputs is None:
        logger.info("tensor_parallel: no example input for %s; the dry run on fake tensors is skipped",
                    type(module).__name__)
        return kept
    from torch._subclasses.fake_tensor import FakeTensorMode

    while True:
        owners = dict(_owners_of_shards(module, specs))
        active: List[str] = []
        handles = []

        def leave(*_):
            active.pop()

        for name, owner in owners.items():
            handles.append(owner.register_forward_pre_hook(lambda *_, name=name: active.append(name)))
            handles.append(owner.register_forward_hook(leave))
        training = {child: child.training for child in module.modules()}
        module.eval()
        try:
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                args, kwargs = _as_constants(inputs)
                module(*args, **kwargs)
            return kept
        except Exception as error:  # noqa: BLE001 (the failing module decides what happens)
            if not active or _data_dependent(error):
                logger.info("tensor_parallel: the dry run of %s on fake tensors was inconclusive: %s",
                            type(module).__name__, error)
                return kept
            owner = active[-1]
            if explicit or owner == "":
                raise ValueError(f"tensor_parallel: {owner or type(module).__name__!r} fails on this rank's shards "
                                 f"in a dry run on fake tensors ({type(error).__name__}: {error}); its forward "
                                 "probably reshapes with a full-width attribute or expects whole layers; expected "
                                 "a plan={pattern: style} that keeps it whole ('replicate') or shards all of its "
                                 "layers as its forward reads them") from error
            kept[owner] = f"{type(error).__name__}: {error}"
            logger.warning("tensor_parallel: %r fails on this rank's shards (%s: %s), probably reshaping with a "
                           "full-width attribute; it stays whole (replicated). Pass plan={...} naming its layers "
                           "to shard it another way.", owner, type(error).__name__, error)
            saved.keep_whole(owner, specs)
        finally:
            for handle in handles:
                handle.remove()
            for child, mode in training.items():
                child.training = mode


def _as_constants(inputs):
    """Integer inputs (token ids, masks) made inside the fake mode from their values, so that code
    reading them (``mask.all()`` deciding on a causal mask) sees those values; others stay as they are."""
    def constant(value):
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            return torch.tensor(value.tolist(), dtype=value.dtype)
        return value
    args, kwargs = inputs
    return [constant(value) for value in args], {key: constant(value) for key, value in kwargs.items()}


def _data_dependent(error: Exception) -> bool:
    """Errors of fake tensors themselves (a value read on data), not of the sharded shapes."""
    from torch._subclasses import fake_tensor

    kinds = tuple(getattr(fake_tensor, kind) for kind in
                  ("DataDependentOutputException", "DynamicOutputShapeException", "UnsupportedOperatorException")
                  if hasattr(fake_tensor, kind))
    return isinstance(error, kinds) or "data-dependent" in str(error).lower()


def _example_inputs(module: nn.Module):
    """(args, kwargs) for a dry run: a transformers model's dummy inputs (pixels for vision models),
    else token ids, images or features for its first embedding, convolution or linear layer; None
    when its forward needs more than one positional argument."""
    config = getattr(module, "config", None)
    if getattr(module, "main_input_name", None) == "pixel_values" and config is not None:
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return (), {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), size, size)}
    dummy = getattr(module, "dummy_inputs", None)
    if isinstance(dummy, Mapping) and dummy:
        return (), dict(dummy)
    import inspect

    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    required = [p for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1:
        return None
    for child in module.modules():
        if isinstance(child, nn.Embedding):
            return (torch.zeros(1, 4, dtype=torch.long),), {}
        if isinstance(child, nn.Conv2d):
            size = getattr(module, "image_size", 64)
            return (torch.zeros(1, child.in_channels, size, size),), {}
        if linear_dims(child) is not None:
            return (torch.zeros(1, 4, linear_dims(child)[0]),), {}
    return None


# --- sequence parallelism ----------------------------------------------------------------------

def _async_tp_chunks(async_tp) -> Optional[int]:
    if isinstance(async_tp, bool):
        return 1 if async_tp else None
    if not isinstance(async_tp, int) or async_tp < 1:
        raise ValueError(f"tensor_parallel: async_tp={async_tp!r}; expected a bool or a chunk count >= 1")
    return async_tp


def _sequence_parallel(module: nn.Module, blocks: List[str], info, summed=frozenset(),
                       chunks: Optional[int] = None) -> None:
    for name in blocks:
        block = module.get_submodule(name)
        layers = [(child_name, child) for child_name, child in block.named_modules()
                  if isinstance(child, (ColumnParallelLinear, RowParallelLinear, TensorParallelMultiheadAttention))]
        if any(isinstance(child, TensorParallelMultiheadAttention) for _, child in layers):
            raise ValueError(f"tensor_parallel: sequence_parallel for {name!r}, which holds an "
                             "nn.MultiheadAttention; expected blocks with separate projections")
        # Each rowwise layer closes a parallel region opened by the colwise layers before it; the
        # module holding both (an attention, an MLP) gathers its input along the sequence.
        owners, opened, columns = {}, None, []
        for child_name, child in layers:
            child.sequence_dim = SEQUENCE_DIM
            child.async_tp_chunks = chunks
            if isinstance(child, ColumnParallelLinear):
                opened = opened or child_name
                columns.append(child)
            elif opened is not None:
                owner = _common_prefix(opened, child_name)
                owners[owner] = (block.get_submodule(owner) if owner else block, columns)
                opened, columns = None, []
        for owner_name, (owner, owner_columns) in owners.items():
            if chunks is None:
                owner.register_forward_pre_hook(_MapHiddenStates(_SequenceOp("gather_from_sp", info)), with_kwargs=True)
            else:
                # The hooks find the columns by name in the module they are called with: a deep copy's.
                names = [_relative_name(child_name, owner_name) for child_name, child in layers
                         if any(child is column for column in owner_columns)]
                owner.register_forward_pre_hook(_GatherAndMultiply(info, names), with_kwargs=True)
                owner.register_forward_hook(_DropProducts(names))
        # Parameters other than this rank's slices see only this rank's tokens: sum their gradients.
        sliced = set(summed)
        for _, child in layers:
            sliced.update(id(p) for p in (child.weight, child.bias if isinstance(child, ColumnParallelLinear) else None)
                          if p is not None)
        summing = _SumOverRanks(info)
        _hook_gradients(block, {name: summing for name, parameter in block.named_parameters()
                                if id(parameter) not in sliced and parameter.requires_grad})
    first, last = module.get_submodule(blocks[0]), module.get_submodule(blocks[-1])
    first.register_forward_pre_hook(_MapHiddenStates(_SequenceOp("scatter_to_tp", info)), with_kwargs=True)
    last.register_forward_hook(_GatherOutput(info))


def _dense_dropout_regions(module: nn.Module, specs: Dict[str, ShardSpec], info: GroupInfo,
                           sequence_blocks: List[str]) -> None:
    """Dropout on sharded activations draws the dense model's masks (torch_mp._tensor_parallel.dropout):
    in attentions cut by heads (nn.MultiheadAttention's too), in the other modules holding
    column-parallel layers (MLPs: their widths on this rank) and in sequence-parallel blocks."""
    if info.size == 1:
        return
    for child in module.modules():
        if isinstance(child, TensorParallelMultiheadAttention):  # its probabilities: [batch, heads, L, S]
            DenseDropoutRegion(info, heads=True).install(child)
    modules = dict(module.named_modules())  # specs also name parameters (experts stored as 3-D tensors)
    for name, owner in _owners_of_shards(module, specs):
        if head_count_attributes(owner) or "Attention" in type(owner).__name__:
            DenseDropoutRegion(info, heads=True).install(owner)
        else:
            columns = {child: spec for child, spec in specs.items()
                       if child.rpartition(".")[0] == name and spec.style == COLWISE and not spec.gather_output
                       and isinstance(modules.get(child), ColumnParallelLinear)}
            widths = {part // info.size for spec in columns.values() for part in (*spec.parts, sum(spec.parts))}
            rows = [child for child in owner.modules() if isinstance(child, RowParallelLinear)]
            DenseDropoutRegion(info, widths=widths).install(
                owner, columns=[modules[child] for child in columns], rows=rows)
    for name in sequence_blocks:
        DenseDropoutRegion(info, sequence_dim=SEQUENCE_DIM).install(module.get_submodule(name))


def _share_input_copies(module: nn.Module) -> None:
    """One copy_to_tp for each set of column-parallel siblings (one parent, one input size, one
    group; q, k and v, or gate and up): their input gradient is all-reduced once, not once each.
    Siblings that turn out to read different inputs copy each their own (share_input_copy)."""
    siblings: Dict[Tuple, List[ColumnParallelLinear]] = {}
    for name, child in module.named_modules():
        if isinstance(child, ColumnParallelLinear) and child.sequence_dim is None and not child.input_is_copied:
            key = (name.rpartition(".")[0], child.in_features, child.group_name, child.group_size)
            siblings.setdefault(key, []).append(child)
    for layers in siblings.values():
        share_input_copy(layers)
    shared = {}  # one layer's name per shared copy
    for name, child in module.named_modules():
        if isinstance(child, ColumnParallelLinear) and child.shared_input_copy is not None:
            shared.setdefault(id(child.shared_input_copy), name)
    if shared:
        module.register_forward_pre_hook(_ResetSharedCopies(list(shared.values())))


class _ResetSharedCopies:
    """A forward pre-hook of the parallelized model: every shared input copy starts the forward
    empty (one left by a forward that skipped a sibling belongs to that forward's graph). Finds
    the layers by name in the module it is called with (a deep copy's)."""

    def __init__(self, layer_names: List[str]):
        self.layer_names = layer_names

    def __call__(self, module: nn.Module, *_) -> None:
        for name in self.layer_names:
            module.get_submodule(name).shared_input_copy.reset()


def _relative_name(name: str, owner: str) -> str:
    """``name`` (below ``owner``, both dotted names in one module) relative to ``owner``."""
    return name[len(owner) + 1:] if owner else name


def _common_prefix(a: str, b: str) -> str:
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


# The hooks of sequence parallelism and the gradient sums: classes, so that a module holding them
# can be pickled (torch.save of the whole module), and found by name in the module they are called
# with (a deep copy's).

class _SumOverRanks:
    """A gradient hook: the sum over the group's ranks."""

    def __init__(self, info: GroupInfo):
        self.info = info

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return dtensor.rewrap(grad, self.sum)

    def sum(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.ops.torch_mp._all_reduce(grad, "sum", self.info.name, self.info.size)


class _SequenceOp:
    """One of the sequence-dim conjugate ops (``scatter_to_tp``: this rank's part of the activations;
    ``gather_from_sp``: all of them) over the group."""

    def __init__(self, op: str, info: GroupInfo):
        self.op, self.info = op, info

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return getattr(torch.ops.torch_mp, self.op)(t, SEQUENCE_DIM, self.info.name, self.info.size)


class _MapHiddenStates:
    """A pre-hook applying ``fn`` to a module's activations: its first argument, or ``hidden_states``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(self, owner, args, kwargs):
        if args:
            return (self.fn(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.fn(kwargs["hidden_states"])}


class _GatherAndMultiply:
    """Async TP: gathers the module's activations along the sequence with all_gather_matmul, which
    multiplies them by the weights of its ``column_names`` (the column-parallel layers reading them:
    q, k, v; gate, up) as they arrive; each layer then returns its product when called with the
    gathered tensor. Under autocast (the op would hand the module its input gathered in the autocast
    dtype, where the dense module reads it as it came) or for layers reading another width, the
    plain gather."""

    def __init__(self, info: GroupInfo, column_names: List[str]):
        self.info, self.column_names = info, column_names

    def __call__(self, owner, args, kwargs):
        columns = [owner.get_submodule(name) for name in self.column_names]
        return _MapHiddenStates(lambda t: self.gather(t, columns))(owner, args, kwargs)

    def gather(self, t: torch.Tensor, columns) -> torch.Tensor:
        info = self.info
        readers = [c for c in columns if c.in_features == t.shape[-1]]
        if not readers or torch.is_autocast_enabled(t.device.type):
            return torch.ops.torch_mp.gather_from_sp(t, SEQUENCE_DIM, info.name, info.size)
        gathered, products = torch.ops.torch_mp.all_gather_matmul(
            t, [c.gathered(c.weight) for c in readers], SEQUENCE_DIM, readers[0]._chunks_for(t.shape[SEQUENCE_DIM]), info.name,
            info.size)
        for column, product in zip(readers, products):
            column.gathered_product = (gathered, product)
        return gathered


class _DropProducts:
    """Drops the products a module's layers did not use (a layer not called), after its forward."""

    def __init__(self, column_names: List[str]):
        self.column_names = column_names

    def __call__(self, owner, args, output) -> None:
        for name in self.column_names:
            owner.get_submodule(name).gathered_product = None


class _GatherOutput:
    """Gathers the block's activations (its output, or the output's first element) along the sequence."""

    def __init__(self, info: GroupInfo):
        self.info = info

    def __call__(self, block, args, output):
        info = self.info

        def gather(t):
            return torch.ops.torch_mp.gather_from_tp(t, SEQUENCE_DIM, info.name, info.size)
        if isinstance(output, torch.Tensor):
            return gather(output)
        return (gather(output[0]),) + tuple(output[1:])
