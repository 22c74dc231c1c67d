"""Parameter gradient hooks where a parameter's gradient arrives in parts.

A pipeline's ``train_step`` runs one backward per micro-batch, and a parameter held by several
ranks (``pipeline``'s tied and shared parameters) gets each rank's part, summed after the step. A
hook on such a parameter would see each part instead of the whole batch's gradient:

- ``param.register_hook(h)`` hooks see each part. A linear hook (a sum over ranks, a constant scale)
  gives the same sum; any other (a clamp, a clip by norm) does not, so a step refuses it, naming the
  parameter, before anything runs. torch_mp's own hooks are linear and say so (:func:`linear_hook`).
- ``param.register_post_accumulate_grad_hook(h)`` hooks are held back while the parts accumulate
  and run once per step, in their order of registration, when the parameter's gradient is whole
  (:class:`held_post_accumulate_hooks`): what the dense model's backward does.

Also the forward hooks a pipeline's recompute replays (:func:`forward_state_hook`).
"""
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

_LINEAR = "_torch_mp_linear"


def linear_hook(hook: Callable) -> Callable:
    """Marks ``hook`` (a ``Tensor.register_hook`` hook on a parameter) linear in the gradient:
    ``hook(a + b) == hook(a) + hook(b)`` (a constant scale, a sum over ranks, a fixed mask), so
    applied to each micro-batch's part of the gradient it adds up to what it gives on the whole
    batch's. ``split``/``pipeline`` with ``chunks > 1`` then let it run on each part instead of
    refusing it. Use it as ``param.register_hook(torch_mp.linear_hook(lambda g: g * 0.5))``.

    ``hook``: any callable taking and returning a gradient tensor of the parameter's shape (or
    None). Returns ``hook`` itself, marked (an attribute set on it).

    Raises:
        TypeError: ``hook`` is not callable.
        AttributeError: ``hook`` takes no attributes (a builtin; wrap it in a function).
    """
    if not callable(hook):
        raise TypeError(f"linear_hook: {hook!r} is not callable; expected a gradient hook")
    setattr(hook, _LINEAR, True)
    return hook


def is_linear_hook(hook: Callable) -> bool:
    return getattr(hook, _LINEAR, False)


def refused_gradient_hooks(named_parameters: Iterable[Tuple[str, torch.nn.Parameter]], caller: str,
                           why: str, remedy: str) -> Optional[str]:
    """The error message for the parameters among ``named_parameters`` (whose gradients arrive in
    parts, ``why``) holding a ``register_hook`` hook not known to be linear, ending with ``remedy``;
    None when none does."""
    refused = [name for name, param in named_parameters
               if param._backward_hooks and not all(map(is_linear_hook, param._backward_hooks.values()))]
    if not refused:
        return None
    shown = ", ".join(repr(name) for name in refused[:4]) + (f" and {len(refused) - 4} more" if len(refused) > 4 else "")
    return (f"{caller}: a gradient hook (Tensor.register_hook) on parameter {shown} would see the gradient in "
            f"parts ({why}) and, unless linear, give other numbers than one backward of the whole batch; {remedy}; "
            "a linear hook (a constant scale, a mask) registered as torch_mp.linear_hook(hook) runs on the parts")


class held_post_accumulate_hooks:
    """While a step runs: the post-accumulate-grad hooks of ``parameters`` only note which
    parameters took a gradient. On a clean exit every hook runs once, in registration order, on the
    parameters that took one (in the order their gradients were last added to) and on ``whole``
    (parameters whose gradient the step completes after its backwards: summed over ranks) that
    hold one."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], whole: Iterable[torch.nn.Parameter] = ()):
        self._held: List[Tuple[torch.nn.Parameter, Dict, Dict]] = []  # (parameter, its hooks, those held)
        for param in dict.fromkeys(parameters):
            if param._post_accumulate_grad_hooks:
                self._held.append((param, param._post_accumulate_grad_hooks, {}))
        held = {id(param) for param, _, _ in self._held}
        self._whole = [param for param in dict.fromkeys(whole) if id(param) in held]
        self._took: Dict[int, torch.nn.Parameter] = {}

    def _took_gradient(self, param: torch.nn.Parameter) -> None:
        self._took.pop(id(param), None)
        self._took[id(param)] = param

    def __enter__(self):
        for _, hooks, held in self._held:
            held.update(hooks)
            hooks.clear()
            hooks[self] = self._took_gradient  # the C++ side calls the values of the same dict
        return self

    def __exit__(self, error_type, *_):
        for _, hooks, held in self._held:
            added = {key: hook for key, hook in hooks.items() if key is not self}  # registered meanwhile
            hooks.clear()
            hooks.update(held)
            hooks.update(added)
        if error_type is not None:
            return
        for param in self._whole:
            if param.grad is not None:
                self._took_gradient(param)
        hooks_of = {id(param): hooks for param, hooks, _ in self._held}
        for param in self._took.values():
            for hook in list(hooks_of[id(param)].values()):
                if hook(param) is not None:
                    raise RuntimeError("Tensor post accumulate grad hooks should return None.")


# Forward hooks that set up what a module's forward reads for its duration and return nothing
# (tensor parallelism's local views of DTensor parameters): a recomputation that calls the bare
# forward (a pipeline's checkpoint of a placed module, whose hooks ran around the first call only)
# replays them around each later call, as torch.utils.checkpoint around ``module(...)`` would.
_STATE = "_torch_mp_forward_state"


def forward_state_hook(hook: Callable) -> Callable:
    """Marks ``hook`` (a forward pre-hook or forward hook, returning None) as one that sets up or
    takes down the state the module's forward reads (``replaying_state_hooks`` replays it).
    Returns ``hook`` itself; a method is marked through its function."""
    setattr(getattr(hook, "__func__", hook), _STATE, True)
    return hook


def replaying_state_hooks(module: torch.nn.Module, forward: Callable) -> Callable:
    """``forward`` (the bare forward of ``module``, called inside its hooks the first time) for a
    checkpoint to recompute: each later call runs the module's ``forward_state_hook`` pre-hooks
    before it and its marked forward hooks after it (even when it raises), in their order of
    registration, as ``module(...)`` would. The inputs are as the first call got them: the
    checkpoint saved them after every pre-hook ran."""
    calls = [0]

    def replayed(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            return forward(*args, **kwargs)
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, _STATE, False):
                hook(module, *((args, kwargs) if key in module._forward_pre_hooks_with_kwargs else (args,)))
        out = None
        try:
            out = forward(*args, **kwargs)
            return out
        finally:
            for key, hook in list(module._forward_hooks.items()):
                if getattr(hook, _STATE, False):
                    hook(module, *((args, kwargs) if key in module._forward_hooks_with_kwargs else (args,)), out)

    return replayed
