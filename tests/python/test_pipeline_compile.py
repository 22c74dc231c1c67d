"""Compiled pipelines: ``model.compile(...)`` or ``torch.compile(model, ...)`` on a pipelined model
compiles each placed module of each stage (one graph, its backward by AOT autograd) and keeps the
schedule eager, with the eager numbers: the loss, every gradient and an SGD step against the dense
model, in one process and on 2 Gloo ranks. The batches are ones the chunks do not divide."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch import nn
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from models import mlp
from test_pipeline_models import MEAN_LOSS, _model_loss, assert_outputs_close, gpt2_case


class CountingBackend:
    """aot_eager that counts the graphs dynamo hands it and the forward and backward graphs AOT
    autograd makes of them."""

    def __init__(self):
        self.graphs = self.forward_graphs = self.backward_graphs = 0

        def forward(graph, _):
            self.forward_graphs += 1
            return make_boxed_func(graph.forward)

        def backward(graph, _):
            self.backward_graphs += 1
            return make_boxed_func(graph.forward)

        self._aot = aot_autograd(fw_compiler=forward, bw_compiler=backward)

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return self._aot(graph, example_inputs)


def _compile(piped, how, backend):
    """The module to call: ``piped`` compiled by its own ``compile`` or wrapped by torch.compile."""
    torch._dynamo.reset()
    counters.clear()
    if how == "model.compile":
        piped.compile(backend=backend, fullgraph=True)
        return piped
    return torch.compile(piped, backend=backend, fullgraph=True)


def _assert_stages_compiled(backend, kinds):
    """Each kind of placed module compiled at most twice (its first micro-batch size, then a dynamic
    one), each graph with a backward, and no graph break."""
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 0 < backend.graphs <= 2 * kinds, backend.graphs
    assert backend.backward_graphs == backend.forward_graphs == backend.graphs


def _assert_step_matches(piped, runner, model, args, kwargs, loss_of, target=None, rtol=1e-5, atol=1e-6):
    """train_step's loss and gradients, then an SGD step, against the dense model's."""
    model.zero_grad(set_to_none=True)
    expected = loss_of(model(*args, **kwargs), target)
    expected.backward()
    loss = runner.train_step(*args, **kwargs, target=target, loss_fn=loss_of)
    torch.testing.assert_close(loss, expected.detach(), rtol=rtol, atol=atol)
    held = [(name, p, q) for (name, p), q in zip(piped.named_parameters(), model.parameters()) if not p.is_meta]
    assert held
    for name, p, q in held:
        torch.testing.assert_close(p.grad, q.grad, rtol=max(rtol, 1e-4), atol=max(atol, 1e-5), msg=name)
    for m in (piped, model):
        torch.optim.SGD([p for p in m.parameters() if not p.is_meta], lr=0.5).step()
        m.zero_grad(set_to_none=True)
    for name, p, q in held:
        torch.testing.assert_close(p, q, rtol=rtol, atol=max(atol, 1e-5), msg=name)


# --- one process ------------------------------------------------------------------------------


MLP_KINDS = 4  # Linear 16->32, Linear 32->32 (twice), Linear 32->8, ReLU (three times)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("how", ["model.compile", "torch.compile"])
def test_compiled_split_matches_eager(schedule, how):
    torch.manual_seed(0)
    model = mlp()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=4, schedule=schedule)
    backend = CountingBackend()
    runner = _compile(piped, how, backend)
    x, y = torch.randn(10, 16), torch.randn(10, 8)  # micro-batches of 3, 3, 2, 2
    _assert_step_matches(piped, runner, model, (x,), {}, F.mse_loss, y)
    _assert_stages_compiled(backend, MLP_KINDS)
    graphs = backend.graphs
    # Other micro-batch sizes (4, 3, 3, 3) and the forward alone: no recompile.
    x, y = torch.randn(13, 16), torch.randn(13, 8)
    _assert_step_matches(piped, runner, model, (x,), {}, F.mse_loss, y)
    torch.testing.assert_close(runner(x), model(x))
    assert backend.graphs == graphs
    assert not counters["graph_break"]


def test_compiled_split_on_gpt2_matches_eager():
    model, kwargs = gpt2_case()  # a batch of 5: micro-batches of 3 and 2
    # Micro-batch 0 recomputes its placed modules' compiled forwards in its backward.
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2, schedule="1f1b", checkpoint="except_last",
                           output_merge=MEAN_LOSS)
    backend = CountingBackend()
    runner = _compile(piped, "model.compile", backend)
    _assert_step_matches(piped, runner, model, (), kwargs, _model_loss)
    # wte, wpe, drop, the blocks (one kind), ln_f, lm_head
    _assert_stages_compiled(backend, 6)
    assert_outputs_close(runner(**kwargs), model(**kwargs))


def test_compiled_split_with_inductor_matches_eager():
    torch.manual_seed(0)
    model = mlp()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=4, schedule="1f1b")
    torch._dynamo.reset()
    counters.clear()
    piped.compile(fullgraph=True)
    x, y = torch.randn(12, 16), torch.randn(12, 8)
    # Inductor fuses and reorders the sums of a matmul's backward: fp32 agrees to a few ulps of 1e-5.
    _assert_step_matches(piped, piped, model, (x,), {}, F.mse_loss, y, rtol=1e-4, atol=1e-5)
    assert not counters["graph_break"]
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] > 0


def test_compile_leaves_the_schedule_eager_and_split_again_uncompiles():
    torch.manual_seed(0)
    model = mlp()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2)
    backend = CountingBackend()
    piped.compile(backend=backend)
    x = torch.randn(4, 16)
    torch.testing.assert_close(piped(x), model(x))
    assert backend.graphs > 0
    # The schedule's Python (threads, gates) is never traced: every graph is one placed module's.
    assert not counters["graph_break"]
    graphs = backend.graphs
    torch_mp.split(piped, ["cpu", "cpu"], chunks=2)  # a new split: eager again
    torch.testing.assert_close(piped(x), model(x))
    assert backend.graphs == graphs


def test_torch_compile_of_a_model_holding_a_pipeline():
    """A compiled parent runs the pipeline eagerly (one graph break, at its entry) and the stages
    compiled, as if the pipeline itself had been compiled."""
    torch.manual_seed(0)
    model = mlp()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=4)
    backend = CountingBackend()
    torch._dynamo.reset()
    counters.clear()
    outer = torch.compile(nn.Sequential(piped, nn.Tanh()), backend=backend)
    x = torch.randn(10, 16)
    output = outer(x)
    torch.testing.assert_close(output, torch.tanh(model(x)))
    output.square().sum().backward()
    torch.tanh(model(x)).square().sum().backward()
    for (name, p), q in zip(piped.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    breaks = counters["graph_break"]
    assert sum(breaks.values()) == 1 and "a pipeline's schedule runs eagerly" in next(iter(breaks)), dict(breaks)
    assert backend.graphs > MLP_KINDS  # the stages' and the Tanh after them


# --- 2 ranks ------------------------------------------------------------------------------------


def _compiled_across_ranks(rank, world):
    torch.manual_seed(0)
    model = mlp()
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=4, schedule="interleaved_1f1b", timeout=60)
    backend = CountingBackend()
    runner = _compile(piped, "torch.compile", backend)
    x, y = torch.randn(10, 16), torch.randn(10, 8)
    _assert_step_matches(piped, runner, model, (x,), {}, F.mse_loss, y)
    # This rank's two stages hold some of the MLP's kinds of layers; stand-ins of the other rank's
    # stages stay eager.
    _assert_stages_compiled(backend, MLP_KINDS)
    with torch.no_grad():
        output = runner(x)
    if rank == world - 1:
        torch.testing.assert_close(output, model(x))

    model, kwargs = gpt2_case()
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=2, schedule="gpipe", output_merge=MEAN_LOSS, timeout=60)
    backend = CountingBackend()
    runner = _compile(piped, "model.compile", backend)
    _assert_step_matches(piped, runner, model, (), kwargs, _model_loss)
    _assert_stages_compiled(backend, 6)


def test_compiled_pipeline_across_ranks_matches_eager():
    run_ranks(2, _compiled_across_ranks, timeout=240)


_FRESH_PROCESS = """
import copy, sys
import torch, torch_mp
from torch.nn import functional as F
from models import mlp

torch.manual_seed(0)
model = mlp()
piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=4)
assert "torch._dynamo" not in sys.modules, "split imported dynamo"
runner = torch.compile(piped, backend="aot_eager", fullgraph=True)
x, y = torch.randn(10, 16), torch.randn(10, 8)
loss = runner.train_step(x, target=y, loss_fn=F.mse_loss)
expected = F.mse_loss(model(x), y)
expected.backward()
torch.testing.assert_close(loss, expected.detach())
for p, q in zip(piped.parameters(), model.parameters()):
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
torch.testing.assert_close(runner(x), model(x))
from torch._dynamo.utils import counters
assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"], dict(counters)
"""


def test_torch_compile_of_a_split_made_before_dynamo_was_imported():
    """A script's usual order: split (which does not import dynamo), then torch.compile."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
