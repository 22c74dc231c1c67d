"""Which modules of a model are its layers (the repeated blocks), and what their tensors weigh."""
from collections import defaultdict
from typing import List, Sequence

import torch
from torch import nn

def direct_tensors(module: nn.Module) -> List[torch.Tensor]:
    return [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]


def unique_bytes(modules: List[nn.Module], seen: set) -> int:
    total = 0
    for module in modules:
        for tensor in direct_tensors(module):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def subtree_bytes(module: nn.Module, seen: set) -> int:
    return unique_bytes(list(module.modules()), seen)


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_layers(module: nn.Module) -> List[str]:
    """The largest group of repeated blocks: the children of a ModuleList/Sequential, or siblings of
    one class. Groups of blocks (modules with children) win over groups of leaves, so a
    transformer's blocks are chosen over its token and position embeddings."""
    best_key, best = None, None
    for prefix, parent in module.named_modules():
        children = list(parent.named_children())
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            groups = [children]
        else:
            by_class = defaultdict(list)
            for name, child in children:
                by_class[type(child)].append((name, child))
            groups = list(by_class.values())
        for group in groups:
            if len(group) < 2:
                continue
            blocks = all(next(child.children(), None) is not None for _, child in group)
            size = sum(subtree_bytes(child, set()) for _, child in group)
            key = (blocks, size, len(group))
            if best_key is None or key > best_key:
                best_key, best = key, [join_name(prefix, name) for name, _ in group]
    if best is None or best_key[1] == 0:
        raise ValueError(f"split: {type(module).__name__} has nothing to split: no group of two or more "
                         "repeated layers holding parameters was found; pass layers=[...] with the names "
                         "of the modules to place, or balance={module name: device}")
    return best


def check_layers(module: nn.Module, layers: Sequence[str]) -> List[str]:
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"split: expected layers to be a list of module names, got {layers!r}")
    if not layers:
        raise ValueError("split: layers is empty: nothing to split; expected the names of the modules to place")
    names = dict(module.named_modules())
    for name in layers:
        if name not in names or not name:
            raise ValueError(f"split: layers names {name!r}, which is not a submodule of "
                             f"{type(module).__name__}; expected names from module.named_modules()")
    for a in layers:
        for b in layers:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"split: layers names both {a!r} and {b!r}, which lies inside it; "
                                 "expected layers that do not contain each other")
    return list(layers)


def inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")
