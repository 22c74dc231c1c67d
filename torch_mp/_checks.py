"""Argument checks shared by every public function: errors that name the function, the argument
and what was expected."""
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

def check_arg(op: str, name: str, value, kind, expected: str) -> None:
    """A TypeError naming ``op``, the argument and what was expected unless ``value`` is a ``kind``
    (bools do not count as ints)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        shown = type(value).__name__ if isinstance(value, torch.Tensor) else f"{type(value).__name__} {value!r:.60}"
        raise TypeError(f"{op}: expected {name} to be {expected}, got {shown}")


_REPLACED = "_torch_mp_replaced"
_STEP_HOOK = None


def mark_replaced(dense, module: torch.nn.Module, by: str) -> None:
    """Marks the parameters of ``dense`` that ``module`` no longer holds, ``by`` (the call, e.g.
    ``"torch_mp.tensor_parallel"``) having replaced them by shards: an optimizer built on them before
    would step tensors the model no longer reads (and no gradient reaches), so its next ``step``
    raises a ValueError naming ``by`` (a global optimizer step pre-hook, registered once)."""
    global _STEP_HOOK
    kept = {id(p) for p in module.parameters()}
    for param in dense:
        if id(param) not in kept:
            setattr(param, _REPLACED, by)
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_pre_hook(_check_replaced)


def _check_replaced(optimizer: torch.optim.Optimizer, *_) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            by = getattr(param, _REPLACED, None)
            if by:
                raise ValueError(f"{type(optimizer).__name__}.step: the optimizer holds a parameter of shape "
                                 f"{tuple(param.shape)} that {by} replaced by its DTensor shard (the model no "
                                 "longer reads it: the step would change nothing); expected an optimizer built "
                                 f"after {by}, on model.parameters()")
