"""Micro-batches: which inputs are batched (the chunk spec), cutting a batch into micro-batches,
merging the micro-batches' outputs (and what they wrote into the caller's containers) back into the
batch's, and the weight of each micro-batch's loss."""
import copy
import dataclasses
import inspect
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from torch_mp._pipelining.caches import cut_cache, is_cache, merge_caches
from torch_mp._tensors import copy_tensors, map_tensors, tensors_in

ChunkSpec = Optional[Mapping[str, Optional[int]]]
ScalarMerge = Union[str, Callable[[List[torch.Tensor], List[int]], torch.Tensor]]
OutputMerge = Optional[Union[ScalarMerge, Mapping[str, ScalarMerge]]]
SCALAR_MERGES = ("mean", "sum")
ROWS = "cat"  # an output whose other dims follow the micro-batch size too, declared one row per sample


def forward_signature(module: nn.Module) -> inspect.Signature:
    """The signature of the class's forward (the instance's may be a pipelined wrapper), less self."""
    signature = inspect.signature(type(module).forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def check_chunk_spec(chunk_spec: ChunkSpec) -> Dict[str, Optional[int]]:
    if chunk_spec is None:
        return {}
    if not isinstance(chunk_spec, Mapping) or not all(
            isinstance(name, str) and (dim is None or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0))
            for name, dim in chunk_spec.items()):
        raise TypeError(f"pipeline: chunk_spec = {chunk_spec!r}; expected a {{forward parameter name: batch dim "
                        "(an int >= 0) or None (passed whole to every micro-batch)}} map")
    return dict(chunk_spec)


def check_output_merge(output_merge: OutputMerge) -> OutputMerge:
    def valid(how) -> bool:
        return (isinstance(how, str) and how in SCALAR_MERGES + (ROWS,)) or (callable(how) and not isinstance(how, str))

    if output_merge is None or valid(output_merge):
        return output_merge
    if isinstance(output_merge, Mapping) and all(isinstance(path, str) and valid(how)
                                                 for path, how in output_merge.items()):
        return dict(output_merge)
    raise TypeError(f"pipeline: output_merge = {output_merge!r}; expected 'mean', 'sum', a callable (values, "
                    "micro-batch sizes) -> value (for scalar outputs), 'cat' (for outputs with one row per sample whose "
                    "other dims follow the micro-batch size too), or a {output path ('loss', 'extra.mean', '0'): "
                    "one of those} map")


def _merge_scalars(outputs: List[torch.Tensor], sizes: List[int], merge: OutputMerge, path: str) -> torch.Tensor:
    """The batch's value of a scalar output, as ``merge`` says; without a word on it, an error: a
    mean over samples is wrong for a sum, or for a mean over tokens with padding."""
    how = _merge_for(merge, path)
    if how == ROWS:
        raise ValueError(f"pipeline: output_merge says 'cat' for output {path!r}, which is a scalar in each "
                         "micro-batch; expected 'mean', 'sum' or a callable (values, micro-batch sizes) -> value")
    if how is None:
        name = repr(path) if path else "(the whole output)"
        example = f"{{{path!r}: 'mean'}}" if path else "'mean'"
        raise ValueError(
            f"pipeline: output {name} is a scalar in each micro-batch, and the batch's value cannot be told from "
            "them without knowing what it is (a mean over samples, a sum, a mean over tokens with padding); "
            f"pass output_merge={example} (weighted by micro-batch sizes), 'sum', or a callable (values, "
            "micro-batch sizes) -> value; for a loss to train on, use train_step(..., normalizer=...)")
    if how == "mean":
        batch = sum(sizes)
        return sum(out * (size / batch) for out, size in zip(outputs, sizes))
    if how == "sum":
        return sum(outputs)
    return how(outputs, list(sizes))


def _merge_for(merge: OutputMerge, path: str):
    return merge.get(path) if isinstance(merge, dict) else merge


def _coupled_dims(outputs: List[torch.Tensor], sizes: List[int], batch_dim: int) -> List[int]:
    """The dims other than ``batch_dim`` whose size is the micro-batch size in every micro-batch
    (never those of micro-batches of one sample each, where a dim of 1 says nothing)."""
    if all(size == 1 for size in sizes):
        return []
    return [d for d in range(outputs[0].dim()) if d != batch_dim
            and all(out.dim() == outputs[0].dim() and out.shape[d] == size for out, size in zip(outputs, sizes))]


def non_batch_sizes(part, batch_dim: int) -> frozenset:
    """The sizes an output may take from a micro-batch's inputs: those of its tensors' dims other than
    ``batch_dim``, and its Python ints (a length to keep, a number of new tokens)."""
    leaves = torch.utils._pytree.tree_leaves(part)
    ints = {leaf for leaf in leaves if isinstance(leaf, int) and not isinstance(leaf, bool)}
    return frozenset(ints | {size for t in tensors_in(part) for d, size in enumerate(t.shape) if d != batch_dim})


def _path(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _named_inputs(module: nn.Module, args: Sequence, kwargs: Mapping) -> List[Tuple[str, object]]:
    """(forward parameter name, value) for every input given; the entries of **kwargs by their
    keyword, those of *args as ``name[i]``."""
    signature = forward_signature(module)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"pipeline: the inputs do not match {type(module).__name__}.forward{signature}: "
                        f"{error}") from None
    named = []
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            named += list(value.items())
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            named += [(f"{name}[{i}]", item) for i, item in enumerate(value)]
        else:
            named.append((name, value))
    return named


class BatchPlan:
    """Which tensors of a call are cut along which dimension, and the batch size.

    A tensor named in the chunk spec is cut along the dimension it gives (None: passed whole).
    Otherwise a tensor is passed whole when its ``batch_dim`` does not have the batch size, and
    cut along it when it is the first such input, has the first one's shape, or has the batch size
    in no other dimension; otherwise (an ``[S, S]`` bias with S equal to the batch size) its role
    is ambiguous and the call an error. The batch size is that of the first tensor the chunk spec
    cuts, else of the first tensor input along ``batch_dim``."""

    def __init__(self, module: nn.Module, args: Sequence, kwargs: Mapping, batch_dim: int, chunk_spec: Dict):
        self.batch_dim = batch_dim
        named = _named_inputs(module, args, kwargs)
        unknown = sorted(set(chunk_spec) - {name for name, _ in named}
                         - set(forward_signature(module).parameters))
        if unknown:
            raise ValueError(f"pipeline: chunk_spec names {unknown}, which are not inputs of "
                             f"{type(module).__name__}.forward; expected names of its parameters or keywords")
        self.dims: Dict[int, Optional[int]] = {}  # id(tensor) -> dim to cut along, or None
        unnamed = [(name, tensor) for name, value in named if name not in chunk_spec
                   for tensor in tensors_in(value) if tensor.dim() > batch_dim]
        # The first input not in the chunk spec is surely batched; the batch size comes from the
        # inputs the chunk spec cuts, or else from it.
        primary = unnamed[0] if unnamed else (None, None)
        specified = [(name, tensor, chunk_spec[name]) for name, value in named
                     if chunk_spec.get(name) is not None for tensor in tensors_in(value)]
        if specified:
            name, tensor, dim = specified[0]
            if tensor.dim() <= dim:
                raise ValueError(f"pipeline: chunk_spec cuts {name} {list(tensor.shape)} along dim {dim}, which it "
                                 "does not have")
            self.batch = tensor.shape[dim]
        elif unnamed:
            self.batch = primary[1].shape[batch_dim]
        else:
            raise ValueError(f"pipeline: none of the inputs is a tensor with a batch dimension {batch_dim}; "
                             "expected at least one, to cut into micro-batches")
        for name, value in named:
            for tensor in tensors_in(value):
                self.dims[id(tensor)] = self._role(name, tensor, chunk_spec, primary)

    def _role(self, name: str, tensor: torch.Tensor, chunk_spec: Dict, primary) -> Optional[int]:
        if name in chunk_spec:
            dim = chunk_spec[name]
            if dim is not None and (tensor.dim() <= dim or tensor.shape[dim] != self.batch):
                raise ValueError(f"pipeline: chunk_spec cuts {name} {list(tensor.shape)} along dim {dim}, which does "
                                 f"not have the batch size {self.batch}; expected a tensor batched along that dim")
            return dim
        dim = self.batch_dim
        if tensor.dim() <= dim or tensor.shape[dim] != self.batch:
            return None
        others = [d for d in range(tensor.dim()) if d != dim and tensor.shape[d] == self.batch]
        if others and tensor is not primary[1] and tensor.shape != primary[1].shape:
            raise ValueError(
                f"pipeline: cannot tell whether input {name} {list(tensor.shape)} is batched: dims {[dim] + others} "
                f"all have the batch size {self.batch} (from {primary[0]} {list(primary[1].shape)}); pass "
                f"chunk_spec={{'{name}': None}} if every sample shares it, or chunk_spec={{'{name}': {dim}}} if "
                f"it holds one row per sample along dim {dim}")
        return dim

    def cut(self, values, sizes: List[int]) -> List:
        """One copy of ``values`` per micro-batch (containers copied, the caller's left as they are;
        a transformers cache cut into one holding the micro-batch's rows: ``caches``)."""
        parts, start = [], 0
        for size in sizes:
            parts.append(copy_tensors(
                values, lambda t, start=start, size=size: self._narrow(t, start, size),
                lambda v, start=start, size=size: cut_cache(v, start, size, self.batch) if is_cache(v) else v))
            start += size
        return parts

    def _narrow(self, tensor: torch.Tensor, start: int, size: int) -> torch.Tensor:
        dim = self.dims.get(id(tensor))
        return tensor if dim is None else tensor.narrow(dim, start, size)


def cut_target(target, sizes: List[int], batch_dim: int) -> List:
    """The targets of each micro-batch: tensors whose ``batch_dim`` has the batch size are cut."""
    batch = sum(sizes)
    parts, start = [], 0
    for size in sizes:
        parts.append(copy_tensors(target, lambda t, start=start, size=size: t.narrow(batch_dim, start, size)
                                   if t.dim() > batch_dim and t.shape[batch_dim] == batch else t))
        start += size
    return parts


def micro_batch_sizes(batch: int, chunks: int) -> List[int]:
    """``chunks`` micro-batch sizes differing by at most one; fewer when the batch holds fewer
    samples (one micro-batch for an empty batch)."""
    count = max(1, min(chunks, batch))
    base, extra = divmod(batch, count)
    return [base + (1 if m < extra else 0) for m in range(count)]


def merge_outputs(outputs: List, sizes: List[int], batch_dim: int, merge: OutputMerge = None, path: str = "",
                  input_sizes: Sequence[frozenset] = ()):
    """The batch's output from its micro-batches': tensors with one row per sample are concatenated,
    scalars (a loss the model computes itself) merged as ``merge`` says for their path (``"loss"``,
    ``"extra.mean"``, ``"0"``: "mean" weighted by micro-batch sizes, "sum", or a callable (values,
    sizes) -> value; ValueError without it), values equal in every micro-batch taken once; tuples,
    lists, dicts (transformers' ModelOutput too) and dataclasses field by field. Anything else is
    an error (ValueError, TypeError). ``input_sizes``: the sizes of the inputs' dims other than the
    batch dim per micro-batch (``non_batch_sizes``); an output dim that has one of those sizes in
    every micro-batch comes from the inputs (a sequence as long as the micro-batch), not from
    coupling the samples."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return _merge_scalars(outputs, sizes, merge, path)
        if first.dim() > batch_dim and all(out.shape[batch_dim] == size for out, size in zip(outputs, sizes)):
            coupled = [d for d in _coupled_dims(outputs, sizes, batch_dim)
                       if not input_sizes or not all(out.shape[d] in known for out, known in zip(outputs, input_sizes))]
            if coupled and _merge_for(merge, path) != ROWS:
                name = repr(path) if path else "(the whole output)"
                example = f"{{{path!r}: 'cat'}}" if path else "'cat'"
                raise ValueError(
                    f"pipeline: output {name} has shapes {[list(out.shape) for out in outputs]} in micro-batches of "
                    f"{sizes} samples: besides batch_dim {batch_dim}, dims {coupled} follow the micro-batch size too, "
                    "as in an output that couples the samples of a batch (contrastive logits [B, B], a statistic "
                    "over the batch), which no merge of the micro-batches' outputs gives; expected outputs with one "
                    "row per sample (compute such a value from them outside the pipeline, or use chunks=1), or pass "
                    f"output_merge={example} if it does hold one row per sample along batch_dim {batch_dim}")
            return torch.cat(outputs, dim=batch_dim)
        if all(out is first or (out.shape == first.shape and torch.equal(out, first)) for out in outputs):
            return first  # the same in every micro-batch: not per sample
        raise ValueError(f"pipeline: an output has shapes {[list(out.shape) for out in outputs]} in micro-batches of "
                         f"{sizes} samples: neither one row per sample along batch_dim {batch_dim} nor the same in "
                         "every micro-batch, so the batch's cannot be told; expected outputs with a batch dimension")
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(merge_outputs(list(parts), sizes, batch_dim, merge, _path(path, name), input_sizes)
                             for name, parts in zip(first._fields, zip(*outputs))))
    if isinstance(first, (list, tuple)):
        return type(first)(merge_outputs(list(parts), sizes, batch_dim, merge, _path(path, i), input_sizes)
                           for i, parts in enumerate(zip(*outputs)))
    if isinstance(first, dict):
        merged = copy.copy(first)
        for key in first:
            merged[key] = merge_outputs([out[key] for out in outputs], sizes, batch_dim, merge, _path(path, key), input_sizes)
        return merged
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{
            field.name: merge_outputs([getattr(out, field.name) for out in outputs], sizes, batch_dim, merge,
                                      _path(path, field.name), input_sizes)
            for field in dataclasses.fields(first) if field.init})
    if is_cache(first):
        return merge_caches(outputs, sizes, path)
    if all(_same(out, first) for out in outputs):  # Python values: flags, sizes, strings, None
        return first
    raise TypeError(f"pipeline: the micro-batches' outputs hold {type(first).__name__} objects that differ, which "
                    "cannot be merged into the batch's; expected tensors, tuples, lists, dicts, dataclasses or "
                    "Python values equal in every micro-batch (for transformers models: use_cache=False)")


def _same(a, b) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - an object that cannot say: not the same
        return False


def write_back(original, parts: List, sizes: List[int], batch_dim: int, merge: OutputMerge = None,
               path: str = "", input_sizes: Sequence[frozenset] = ()) -> None:
    """What the micro-batches wrote into their copies of the caller's lists and dicts (a KV cache,
    a list collecting auxiliary losses) goes into the caller's, merged as outputs are (scalars by
    ``merge`` at paths such as ``"args.2.0"``, ``"kwargs.aux.0"``; ``input_sizes`` as for
    ``merge_outputs``: a [B, S] input with S equal to the micro-batch size is not taken for a
    value coupling the samples)."""
    if len(parts) == 1 and parts[0] is original:
        return
    if isinstance(original, dict):
        for key in parts[0]:
            values = [part[key] for part in parts]
            if key in original and isinstance(original[key], (dict, list, tuple)):
                write_back(original[key], values, sizes, batch_dim, merge, _path(path, key), input_sizes)
            else:
                original[key] = merge_outputs(values, sizes, batch_dim, merge, _path(path, key), input_sizes)
    elif isinstance(original, list):
        for i in range(len(parts[0])):
            values = [part[i] for part in parts]
            if i < len(original) and isinstance(original[i], (dict, list, tuple)):
                write_back(original[i], values, sizes, batch_dim, merge, _path(path, i), input_sizes)
            elif i < len(original):
                original[i] = merge_outputs(values, sizes, batch_dim, merge, _path(path, i), input_sizes)
            else:
                original.append(merge_outputs(values, sizes, batch_dim, merge, _path(path, i), input_sizes))
    elif isinstance(original, tuple):
        for i, item in enumerate(original):
            if isinstance(item, (dict, list, tuple)):
                write_back(item, [part[i] for part in parts], sizes, batch_dim, merge, _path(path, i), input_sizes)
            elif is_cache(item):
                merge_caches([part[i] for part in parts], sizes, _path(path, i))


def loss_weights(sizes: List[int], target, normalizer) -> List[float]:
    """Each micro-batch's loss weight: with no normalizer, ``loss_fn`` returns a micro-batch's mean
    and the weights are the micro-batch sizes over the batch size; with one (a number, or a callable
    taking the whole batch's target, e.g. its count of real tokens), ``loss_fn`` returns a
    micro-batch's sum and every weight is 1 / normalizer."""
    if normalizer is None:
        batch = sum(sizes)
        return [size / batch if batch else 1.0 for size in sizes]
    value = normalizer(target) if callable(normalizer) else normalizer
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    if value <= 0:
        raise ValueError(f"pipeline: the normalizer is {value:g}; expected a positive count (of samples or tokens)")
    return [1.0 / value] * len(sizes)


def check_loss(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"pipeline: loss_fn returned {shape}; expected a scalar tensor, the micro-batch's loss")
    return loss


def shapes_of(values) -> str:
    """The shapes and dtypes of every tensor in ``values``, in order."""
    described: List[str] = []
    map_tensors(values, lambda t: described.append(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"))
    return ", ".join(described)


def check_batch_wide_outputs(module: nn.Module, kwargs: Mapping, micro_batches: int) -> None:
    """Raises ValueError, before anything runs, when ``micro_batches`` > 1 and the model derives an
    output from the whole batch's router logits: transformers' MoE models with
    ``output_router_logits`` (from the call or the config: Mixtral, Qwen-MoE, OLMoE, ...) return the
    load-balancing loss of Switch Transformers (Fedus et al., 2021), a product of per-expert token
    fractions and mean router probabilities over the batch, and add it to ``loss``. It is not a sum
    over samples, so no merge or loss weighting of micro-batches gives the batch's (a 1F1B schedule
    runs a micro-batch's backward before the next one's router logits exist)."""
    if micro_batches < 2:
        return
    requested = kwargs.get("output_router_logits")
    config = getattr(module, "config", None)
    if requested is None:
        requested = getattr(config, "output_router_logits", False)
    if requested:
        coefficient = getattr(config, "router_aux_loss_coef", None)
        raise ValueError(
            f"pipeline: {type(module).__name__} computes its load-balancing loss over the batch's router logits "
            f"(output_router_logits=True, router_aux_loss_coef={coefficient}), which is not a sum over samples: "
            f"the {micro_batches} micro-batches' losses cannot add up to it; expected chunks=1 (or "
            "tensor_parallel, which sees the whole batch), or output_router_logits=False")
