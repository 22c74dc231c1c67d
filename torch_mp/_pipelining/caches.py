"""Caches under micro-batches: a transformers ``Cache`` (``DynamicCache``, ``StaticCache``,
``EncoderDecoderCache``, their layers) passed to a pipelined forward is cut into one cache per
micro-batch holding that micro-batch's rows, and what the micro-batches' caches hold afterwards is
merged back into the caller's (so that decoding goes on from it); a cache the forward makes
(a causal LM's output in eval mode) is merged along the batch into a new one.

A cache keeps one row per sample along dim 0 of its tensors (keys and values ``[batch, heads,
sequence, head dim]``, recurrent and convolution states ``[batch, ...]``): transformers' convention,
whatever the pipeline's ``batch_dim``. Its other tensors (a static cache's position counter) are
copied into each micro-batch's cache and must come back equal in every one; counts equal to the
micro-batch sizes (a static layer's ``batch_size``) are summed. Anything else that differs across
the micro-batches is a ValueError naming it. After transformers' ``batch_select_indices`` /
``reorder_cache`` (the cache's rows are its samples)."""
import contextlib
import copy
from typing import List, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

_CACHE_MODULE = "transformers.cache_utils"
# A micro-batch's cache -> [the caller's cache it was cut from, whether merged back already].
_cut_from = WeakIdKeyDictionary()


def is_cache(value) -> bool:
    """Whether ``value`` is a transformers cache or a part of one (a layer), by its classes:
    transformers need not be imported."""
    return (not isinstance(value, (type, torch.Tensor)) and hasattr(value, "__dict__")
            and any(cls.__module__ == _CACHE_MODULE for cls in type(value).__mro__))


@contextlib.contextmanager
def training_without_cache(module: torch.nn.Module, kwargs: dict):
    """Within: the configurations of ``module``'s submodules that set ``use_cache=True`` (transformers'
    default for causal LMs) set it False, and back to True on the way out, errors included. A
    training step needs no cache, and with one a pipeline's stand-ins replay the other ranks' layers
    on meta tensors to fill it (seconds per micro-batch for a small Llama). A ``use_cache`` passed
    to the step itself (``kwargs``) is the caller's choice and is left alone; so is a ``use_cache``
    the forward takes only as an argument."""
    configs = {} if "use_cache" in kwargs else {
        id(config): config for config in (getattr(submodule, "config", None) for submodule in module.modules())
        if getattr(config, "use_cache", None) is True}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def cut_cache(cache, start: int, size: int, batch: int):
    """A copy of ``cache`` holding rows ``start:start + size`` of its ``batch`` rows (views: a static
    cache's writes reach the caller's tensors); its other tensors cloned."""
    part = _cut(cache, start, size, batch)
    _cut_from[part] = [cache, False]
    return part


def _cut(value, start: int, size: int, batch: int):
    if isinstance(value, torch.Tensor):
        return value.narrow(0, start, size) if value.dim() > 0 and value.shape[0] == batch else value.clone()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_cut(item, start, size, batch) for item in value)
    if isinstance(value, dict):
        copied = copy.copy(value)
        for key, item in value.items():
            copied[key] = _cut(item, start, size, batch)
        return copied
    if is_cache(value):
        copied = copy.copy(value)
        for key, item in vars(value).items():
            setattr(copied, key, _cut(item, start, size, batch))
        return copied
    return value


def merge_caches(parts: List, sizes: List[int], path: str):
    """The batch's cache from the micro-batches' ``parts``: the caller's cache they were cut from,
    updated in place (once), or else a new cache of their type."""
    origins = [_cut_from.get(part) for part in parts]
    if origins[0] is not None and all(origin is not None and origin[0] is origins[0][0] for origin in origins):
        original = origins[0][0]
        if not origins[0][1]:
            _merge(parts, sizes, original, path)
            for origin in origins:
                origin[1] = True
        return original
    return _merge(parts, sizes, None, path)


def _merge(parts: List, sizes: List[int], original, path: str):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return _merge_tensors(parts, sizes, original, path)
    if isinstance(first, (list, tuple)) and not hasattr(first, "_fields"):
        if any(not isinstance(part, type(first)) or len(part) != len(first) for part in parts):
            raise ValueError(f"pipeline: the micro-batches' caches hold {path} of lengths "
                             f"{[len(part) for part in parts]}; expected the same in every micro-batch")
        olds = original if isinstance(original, type(first)) else ()
        merged = [_merge([part[i] for part in parts], sizes, olds[i] if i < len(olds) else None, _at(path, i))
                  for i in range(len(first))]
        if isinstance(original, list) and isinstance(first, list):
            original[:] = merged
            return original
        return type(first)(merged)
    if isinstance(first, dict):
        target = original if isinstance(original, dict) else copy.copy(first)
        for key in first:
            target[key] = _merge([part[key] for part in parts], sizes,
                                 original.get(key) if isinstance(original, dict) else None, _at(path, key))
        return target
    if is_cache(first):
        target = original if type(original) is type(first) else copy.copy(first)
        for key in vars(first):
            setattr(target, key, _merge([getattr(part, key) for part in parts], sizes,
                                        getattr(original, key, None) if original is not None else None,
                                        _at(path, key)))
        return target
    if all(part is first or _equal(part, first) for part in parts):
        return first
    if all(isinstance(part, int) and part == size for part, size in zip(parts, sizes)):
        return sum(sizes)  # a count of samples (a static layer's batch_size)
    raise ValueError(f"pipeline: the micro-batches' caches hold {path} = {parts}, which differ; expected the same "
                     "value in every micro-batch, or its micro-batch size")


def _merge_tensors(parts: List[torch.Tensor], sizes: List[int], original: Optional[torch.Tensor], path: str):
    if isinstance(original, torch.Tensor) and original.dim() > 0 and original.shape[0] == sum(sizes):
        start, views = 0, True
        for part, size in zip(parts, sizes):
            row = original.narrow(0, start, size)
            views = views and (part.shape == row.shape and part.stride() == row.stride()
                               and part.data_ptr() == row.data_ptr())
            start += size
        if views:
            return original  # written in place (a static cache), or unchanged
    if all(part.dim() > 0 and part.shape[0] == size for part, size in zip(parts, sizes)):
        return torch.cat(parts, dim=0)
    first = parts[0]
    if all(part.shape == first.shape and torch.equal(part, first) for part in parts):
        if (isinstance(original, torch.Tensor) and original.shape == first.shape and original.dtype == first.dtype
                and original.device == first.device):
            with torch.no_grad():
                original.copy_(first)  # keeps its address (a static cache's counter, marked for torch.compile)
            return original
        return first
    raise ValueError(f"pipeline: the micro-batches' caches hold {path} of shapes "
                     f"{[list(part.shape) for part in parts]} in micro-batches of {sizes} samples: neither one row "
                     "per sample along dim 0 (transformers' caches: [batch, heads, sequence, head dim]) nor the "
                     "same in every micro-batch; expected a cache with the batch along dim 0")


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object that cannot say: not equal
        return False


def _at(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)
