"""Cuts a model's forward into pipeline stages.

The forward is traced with torch.fx, the placed modules (layers, embeddings, heads) kept whole as
leaves. Each node then belongs to a stage: a placed module's to the later of its own stage and its
inputs', any other node's to the latest stage among its inputs. Nodes that depend on the model's
inputs alone (masks, positions) belong to no stage: every stage that needs one computes it. Every
value made on stage s and used past it travels s -> s + 1 -> ... as part of the stage's outputs,
so each stage talks only to its neighbours.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

from torch import fx, nn

from torch_mp._pipeline_batch import forward_signature
from torch_mp.split import _join, _map_tensors


@dataclass
class StageGraph:
    """One stage's share of the forward: ``module(*model_inputs, *received)`` returns the tuple of
    values to send on, or, on the last stage, the model's output."""
    module: fx.GraphModule
    received: List[str]
    sent: List[str]
    tensors: Set[str]  # the parameters and buffers it uses (stock names, every alias)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return name in self.leaves or super().is_leaf_module(module, name)


def bind_inputs(module: nn.Module, args: Sequence, kwargs: Dict) -> Tuple[List, Set[str]]:
    """The value of every forward parameter, defaults included, in order, and the names given."""
    signature = forward_signature(module)
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            stars = "*" if parameter.kind == parameter.VAR_POSITIONAL else "**"
            raise ValueError(f"pipeline: {type(module).__name__}.forward takes {stars}{parameter.name}; across ranks "
                             "the forward is cut into stages with torch.fx, which needs named parameters only "
                             "(transformers models take **kwargs: pipeline them in one process with "
                             "split(model, devices, chunks=M))")
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"pipeline: the inputs do not match {type(module).__name__}.forward{signature}: "
                        f"{error}") from None
    given = set(bound.arguments)
    bound.apply_defaults()
    return list(bound.arguments.values()), given


def concrete_inputs(module: nn.Module, values: Sequence, given: Set[str]) -> Dict[str, object]:
    """The forward parameters traced as constants: those left to their defaults, and those given
    values that hold no tensor (Python flags, sizes, strings)."""
    concrete = {}
    for (name, parameter), value in zip(forward_signature(module).parameters.items(), values):
        if name not in given or not _holds_tensor(value):
            concrete[name] = value
    return concrete


def _holds_tensor(value) -> bool:
    found = []
    _map_tensors(value, lambda t: found.append(t))
    return bool(found)


def trace_stages(module: nn.Module, stage_of: Dict[str, int], num_stages: int,
                 concrete: Dict[str, object]) -> List[StageGraph]:
    """Splits ``module``'s forward into ``num_stages`` graphs. ``stage_of`` maps each placed module
    to its stage; ``concrete`` gives the forward parameters traced as constants."""
    try:
        graph = _Tracer(set(stage_of)).trace(module, concrete_args=concrete)
    except Exception as error:
        raise ValueError(
            f"pipeline: torch.fx cannot trace {type(module).__name__}.forward outside its layers ({error}); "
            "expected a forward without control flow on tensor values between the layers (the layers "
            "themselves are not traced). nn.Sequential models always work") from error

    stage: Dict[fx.Node, Optional[int]] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            stage[node] = None
        elif node.op == "output":
            stage[node] = num_stages - 1
        else:
            owner = stage_of.get(node.target) if node.op == "call_module" else None
            inputs = [stage[n] for n in node.all_input_nodes if stage[n] is not None]
            stage[node] = max(inputs + ([owner] if owner is not None else []), default=None)

    sent: List[List[fx.Node]] = []
    for s in range(num_stages):
        made_by_now = [n for n in graph.nodes if stage[n] is not None and stage[n] <= s and n.op != "output"]
        sent.append([n for n in made_by_now if any(stage[user] > s for user in n.users)]
                    if s < num_stages - 1 else [])

    root_tensors = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    root_tensors |= {name for name, _ in module.named_buffers(remove_duplicate=False)}
    stages = []
    for s in range(num_stages):
        received = sent[s - 1] if s > 0 else []
        own = [n for n in graph.nodes if stage[n] == s]
        local: Set[fx.Node] = set()

        def compute_here(node: fx.Node) -> None:
            for n in node.all_input_nodes:
                if stage[n] is None and n not in local and n.op != "placeholder":
                    local.add(n)
                    compute_here(n)

        for node in own:
            compute_here(node)
        new = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                env[node] = new.placeholder(node.name)
        for i, node in enumerate(received):
            env[node] = new.placeholder(f"received_{i}_{node.name}")
        for node in graph.nodes:
            if (node in own or node in local) and node.op != "output" and node not in env:
                env[node] = new.node_copy(node, lambda n: env[n])
        if s < num_stages - 1:
            new.output(tuple(env[n] for n in sent[s]))
        else:
            output = next(n for n in graph.nodes if n.op == "output")
            new.output(fx.map_arg(output.args[0], lambda n: env[n]))
        stage_module = fx.GraphModule(module, new, class_name=f"Stage{s}")
        stage_module.graph.eliminate_dead_code()
        stage_module.recompile()
        used = {n.target for n in new.nodes if n.op == "get_attr" and n.target in root_tensors}
        for node in (n for n in new.nodes if n.op == "call_module"):
            submodule = module.get_submodule(node.target)
            used |= {_join(node.target, name) for name, _ in submodule.named_parameters(remove_duplicate=False)}
            used |= {_join(node.target, name) for name, _ in submodule.named_buffers(remove_duplicate=False)}
        stages.append(StageGraph(stage_module, [n.name for n in received], [n.name for n in sent[s]], used))
    return stages

