"""Argument checks shared by every public function: errors that name the function, the argument
and what was expected."""
import torch

def check_arg(op: str, name: str, value, kind, expected: str) -> None:
    """A TypeError naming ``op``, the argument and what was expected unless ``value`` is a ``kind``
    (bools do not count as ints)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        shown = type(value).__name__ if isinstance(value, torch.Tensor) else f"{type(value).__name__} {value!r:.60}"
        raise TypeError(f"{op}: expected {name} to be {expected}, got {shown}")
