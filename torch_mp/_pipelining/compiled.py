"""Compiled pipelines: each stage's placed modules compiled, the schedule eager.

``model.compile(...)`` on a pipelined module, or ``torch.compile(model, ...)`` (PyTorch's wrapper,
noticed when it takes the module in), compiles the own forward of every placed module of this
process's stages with those options, the way torchtitan compiles each transformer block: the
micro-batching, the threads, the stage gates, sends and receives stay eager Python, and dynamo never
traces them (the pipeline's entry points are ``torch._dynamo.disable``-d). Each placed module's call
is one graph (fullgraph when asked), its backward compiled by AOT autograd where the backend does
it. Modules of one class share their compiled code (parameters are graph inputs); a micro-batch
size seen for the second time compiles once more with a dynamic batch dimension (dynamo's automatic
dynamic shapes), and not again.
"""
import sys
import types
import weakref
from typing import Callable, Dict, Optional

import torch
from torch import nn

from torch_mp._pipelining.microbatch import forward_signature
from torch_mp._state import state_of

Compiler = Callable[[Callable], Callable]


class StageCompilation:
    """Whether and how a pipeline's stages are compiled: by ``model.compile``'s options, else by the
    latest ``torch.compile`` wrapper of the module still alive, else not at all."""

    def __init__(self):
        self._compiler: Optional[Compiler] = None
        self._wrappers: list = []  # weak references to torch.compile's wrappers, oldest first
        self._runners: Dict[tuple, Callable] = {}

    def compiler(self) -> Optional[Compiler]:
        if self._compiler is not None:
            return self._compiler
        self._wrappers = [ref for ref in self._wrappers if ref() is not None]
        return self._wrappers[-1]().dynamo_ctx if self._wrappers else None

    def compile_with(self, *args, **kwargs) -> None:
        self._compiler = lambda fn: torch.compile(fn, *args, **kwargs)

    def wrapped_by(self, wrapper: nn.Module) -> None:
        self._wrappers.append(weakref.ref(wrapper))

    def stage(self, forward: Callable, local: bool = True) -> Callable:
        """``forward`` (a placed module's own), compiled while the pipeline is when ``local``: this
        process computes it (another rank's stage runs as an eager stand-in on meta tensors)."""
        return StageForward(self, forward) if local else forward

    def runner(self, compiler: Compiler, forward: Callable) -> Callable:
        """``compiler(run)`` for a ``run(forward, *args, **kwargs)`` of its own per module class and
        parameter shapes. Dynamo keeps at most ``recompile_limit`` (8) compiled versions of a code
        object, and every torch.nn module's forward compiles as one shared code object: a model's
        Linear layers of different widths would use them up and run eagerly. One code object per
        kind of module keeps that count at the few versions one module needs (grad mode, a
        dynamic batch size), while identical blocks share their compiled code."""
        module = getattr(forward, "__self__", None)
        if isinstance(module, nn.Module):
            kind = (type(module), *((name, t.shape, t.dtype) for name, t in
                                    [*module.named_parameters(), *module.named_buffers()]))
        else:
            kind = (forward,)
        key = (compiler, kind)
        if key not in self._runners:
            label = f"torch_mp_stage_{len(self._runners)}_{type(module).__name__}"
            code = _run.__code__.replace(co_name=label)
            self._runners.setdefault(key, compiler(types.FunctionType(code, _run.__globals__, label)))
        return self._runners[key]


def _run(forward, *args, **kwargs):
    return forward(*args, **kwargs)


class StageForward:
    """A placed module's own forward, compiled by its pipeline's compiler."""

    def __init__(self, compilation: StageCompilation, forward: Callable):
        self.compilation, self.eager = compilation, forward
        self._compiled = (None, None)  # (the compiler, its runner)

    def __call__(self, *args, **kwargs):
        compiler = self.compilation.compiler()
        if compiler is None:
            return self.eager(*args, **kwargs)
        made_by, runner = self._compiled
        if made_by is not compiler:
            runner = self.compilation.runner(compiler, self.eager)
            self._compiled = (compiler, runner)
        return runner(self.eager, *args, **kwargs)


def install_entries(module: nn.Module, pipe) -> None:
    """``module``'s forward and ``train_step`` run ``pipe``'s, never traced by dynamo; its
    ``compile(...)`` compiles the stages."""
    def compile_stages(*args, **kwargs) -> None:
        """Compiles the own forward of each placed module of this process's stages with
        ``torch.compile(..., *args, **kwargs)``; the schedule stays eager."""
        pipe.compilation.compile_with(*args, **kwargs)
        _run_eagerly(module, pipe)

    module.forward, module.train_step = _forward_entry(module, pipe), pipe.train_step
    module.compile = compile_stages
    if "torch._dynamo" in sys.modules:  # otherwise done when a compiler first takes the module in
        _run_eagerly(module, pipe)


def _forward_entry(module: nn.Module, pipe) -> Callable:
    """``pipe.forward`` with the signature of the module's own forward: callers read it
    (transformers' ``generate`` passes ``position_ids`` and ``attention_mask`` only to a forward
    that names them)."""
    def forward(*args, **kwargs):
        return pipe.forward(*args, **kwargs)

    forward.__signature__ = forward_signature(module)
    return forward


def _run_eagerly(module: nn.Module, pipe) -> None:
    import torch._dynamo

    module.forward = torch._dynamo.disable(_forward_entry(module, pipe),
                                           reason="torch_mp: a pipeline's schedule runs eagerly")
    module.train_step = torch._dynamo.disable(pipe.train_step,
                                              reason="torch_mp: a pipeline's schedule runs eagerly")


def _on_module_registered(parent: nn.Module, name: str, child: nn.Module) -> None:
    """``torch.compile(model)`` registers ``model`` as ``_orig_mod`` of its wrapper: the pipelines
    inside compile their stages with the wrapper's options from then on."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if name != "_orig_mod" or eval_frame is None or not isinstance(parent, eval_frame.OptimizedModule):
        return None
    for submodule in child.modules():
        state = state_of(submodule)
        pipe = state.pipe if state is not None else None
        if pipe is not None:
            pipe.compilation.wrapped_by(parent)
            _run_eagerly(submodule, pipe)
    return None


nn.modules.module.register_module_module_registration_hook(_on_module_registered)
