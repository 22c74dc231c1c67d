"""Parameter gradient hooks under micro-batched pipelines, against the dense model: post-accumulate
hooks run once per step on the whole gradient; non-linear ``register_hook`` hooks, which would see
the gradient in parts, are refused before anything runs."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from models import mlp
from test_pipeline import gpt_case as pipeline_gpt_case

SCHEDULES = ["gpipe", "1f1b", "zb_h1", "zbv"]


def gpt_case(batch=6):
    torch.manual_seed(0)
    return pipeline_gpt_case(batch)


def halve_then_shift(model, calls):
    """Two post-accumulate hooks per parameter whose order matters (x / 2 + 1e-3 is not (x + 1e-3) / 2),
    counting their calls."""
    for name, param in model.named_parameters():
        def halve(p, name=name):
            calls[name] = calls.get(name, 0) + 1
            p.grad.mul_(0.5)

        def shift(p):
            p.grad.add_(1e-3)

        param.register_post_accumulate_grad_hook(halve)
        param.register_post_accumulate_grad_hook(shift)


def step(model, train_step, inputs, target, loss_fn):
    """Two steps accumulating gradients (no zero_grad between), then one SGD step."""
    for _ in range(2):
        if train_step:
            model.train_step(inputs, target=target, loss_fn=loss_fn)
        else:
            loss_fn(model(inputs), target).backward()
    torch.optim.SGD([p for p in model.parameters() if not p.is_meta], lr=0.1).step()
    return {name: (p.grad.detach().cpu().clone(), p.detach().cpu().clone())
            for name, p in model.named_parameters() if not p.is_meta}


def assert_same(actual, expected):
    assert actual
    for name, (grad, param) in actual.items():
        torch.testing.assert_close(grad, expected[name][0], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(param, expected[name][1], rtol=1e-5, atol=1e-6, msg=name)


# --- one process ------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("checkpoint", ["never", "except_last"])
def test_split_post_accumulate_hooks_run_once_per_step_on_the_whole_gradient(devices, schedule, checkpoint):
    dense, inputs, target, loss_fn = gpt_case()
    piped = torch_mp.split(copy.deepcopy(dense), devices, chunks=3, schedule=schedule, checkpoint=checkpoint)
    dense_calls, piped_calls = {}, {}
    halve_then_shift(dense, dense_calls)
    halve_then_shift(piped, piped_calls)
    expected = step(dense, False, inputs, target, loss_fn)
    assert_same(step(piped, True, inputs, target, loss_fn), expected)
    assert piped_calls == dense_calls == {name: 2 for name, _ in dense.named_parameters()}


def test_split_hooks_are_back_in_place_after_a_step_and_after_a_failed_one():
    dense, inputs, target, loss_fn = gpt_case()
    piped = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=2)
    calls = {}
    halve_then_shift(piped, calls)
    before = {name: list(p._post_accumulate_grad_hooks.values()) for name, p in piped.named_parameters()}
    piped.train_step(inputs, target=target, loss_fn=loss_fn)
    with pytest.raises(RuntimeError, match="boom"):
        piped.train_step(inputs, target=target, loss_fn=lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    assert {name: list(p._post_accumulate_grad_hooks.values()) for name, p in piped.named_parameters()} == before
    assert set(calls.values()) == {1}  # the failed step ran no hook


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_split_refuses_a_non_linear_gradient_hook_before_anything_runs(schedule):
    torch.manual_seed(0)
    model = mlp((16, 32, 32, 8))
    piped = torch_mp.split(model, ["cpu", "cpu"], chunks=4, schedule=schedule)
    before = {name: p.detach().clone() for name, p in piped.named_parameters()}
    piped[2].weight.register_hook(lambda grad: grad.clamp(-1e-3, 1e-3))
    with pytest.raises(ValueError, match=r"split: a gradient hook \(Tensor.register_hook\) on parameter '2.weight' "
                                         r"would see the gradient in parts .*expected chunks=1, or the hook "
                                         r"registered with register_post_accumulate_grad_hook.*"
                                         r"registered as torch_mp.linear_hook\(hook\) runs on the parts"):
        piped.train_step(torch.randn(8, 16), target=torch.randn(8, 8), loss_fn=F.mse_loss)
    assert all(p.grad is None for p in piped.parameters())
    for name, param in piped.named_parameters():
        assert torch.equal(param, before[name])


@pytest.mark.parametrize("chunks, train_step", [(1, True), (3, False), (3, True)],
                         ids=["chunks=1", "merged output's backward", "linear hook"])
def test_split_gradient_hooks_that_are_allowed_match_dense(chunks, train_step):
    """Any hook at chunks=1 (one backward) and through the one backward of the merged output of
    ``model(...)``; a hook marked linear in a pipelined train_step."""
    torch.manual_seed(0)
    dense = mlp((16, 32, 32, 8))
    inputs, target = torch.randn(9, 16), torch.randn(9, 8)
    piped = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=chunks)
    any_hook = chunks == 1 or not train_step
    for model in (dense, piped):
        if any_hook:
            model[0].weight.register_hook(lambda grad: grad.clamp(-1e-2, 1e-2))
        model[2].weight.register_hook(torch_mp.linear_hook(lambda grad: grad * 3))
    expected = step(dense, False, inputs, target, F.mse_loss)
    assert_same(step(piped, train_step, inputs, target, F.mse_loss), expected)


# --- across ranks -----------------------------------------------------------------------------

def _hook_calls(piped, first):
    """Each hook runs once per step on the parameters this rank holds then: ``first`` in the first
    step; in the second only what the rank kept after the first (its share)."""
    kept = {name for name, p in piped.named_parameters() if not p.is_meta}
    return {name: 1 + (name in kept) for name in first}


def _pipeline_hooks(rank, world):
    # GPT's head shares the embedding's weight, held on both ranks and summed after the step.
    for schedule, chunks in [("gpipe", 3), ("1f1b", 3), ("interleaved_1f1b", 4), ("zb_h1", 3), ("zbv", 4),
                             ("1f1b", 1)]:
        dense, inputs, target, loss_fn = gpt_case(batch=8)
        piped = torch_mp.pipeline(copy.deepcopy(dense), chunks=chunks, schedule=schedule)
        dense_calls, piped_calls = {}, {}
        halve_then_shift(dense, dense_calls)
        halve_then_shift(piped, piped_calls)
        expected = step(dense, False, inputs, target, loss_fn)
        first = {name for name, p in piped.named_parameters() if not p.is_meta}
        assert_same(step(piped, True, inputs, target, loss_fn), expected)
        assert piped_calls == _hook_calls(piped, first), (schedule, chunks)

    # Hooks registered before pipeline(), which replaces the parameters it keeps: they move along.
    dense, inputs, target, loss_fn = gpt_case(batch=8)
    hooked = copy.deepcopy(dense)
    dense_calls, piped_calls = {}, {}
    halve_then_shift(dense, dense_calls)
    halve_then_shift(hooked, piped_calls)
    piped = torch_mp.pipeline(hooked, chunks=3, schedule="1f1b")
    first = {name for name, p in piped.named_parameters() if not p.is_meta}
    assert_same(step(piped, True, inputs, target, loss_fn), step(dense, False, inputs, target, loss_fn))
    assert piped_calls == _hook_calls(piped, first)
    dense, inputs, target, loss_fn = gpt_case(batch=8)
    dense.get_parameter("blocks.0.mlp.0.weight").register_hook(lambda grad: grad.clamp(-1e-3, 1e-3))
    piped = torch_mp.pipeline(dense, chunks=2, schedule="1f1b")
    with pytest.raises(ValueError, match=r"would see the gradient in parts|rank\(s\) \[0\] refuse a gradient hook"):
        piped.train_step(inputs, target=target, loss_fn=loss_fn)

    for chunks, name in [(2, "blocks.0.mlp.0.weight"), (1, "tok.weight")]:  # a tied parameter: in parts at chunks=1
        dense, inputs, target, loss_fn = gpt_case(batch=8)
        piped = torch_mp.pipeline(dense, chunks=chunks, schedule="1f1b")
        param = piped.get_parameter(name)
        if not param.is_meta:
            param.register_hook(lambda grad: grad.clamp(-1e-3, 1e-3))
        pattern = f"parameter '{name}' would see the gradient in parts" if not param.is_meta else \
            r"rank\(s\) \[0\] refuse a gradient hook"
        with pytest.raises(ValueError, match=pattern):
            piped.train_step(inputs, target=target, loss_fn=loss_fn)
        assert all(p.grad is None for p in piped.parameters())


def test_pipeline_post_accumulate_hooks_and_refused_hooks_across_ranks():
    run_ranks(2, _pipeline_hooks, timeout=280)


# --- property ---------------------------------------------------------------------------------

def affine(scale, shift):
    def hook(param):
        param.grad.mul_(scale).add_(shift)
    return hook


@settings(max_examples=12, deadline=None, derandomize=True)
@given(schedule=st.sampled_from(SCHEDULES), chunks=st.integers(2, 5), extra=st.integers(0, 6),
       checkpoint=st.sampled_from(["never", "except_last", "always"]), steps=st.integers(1, 2),
       hooked=st.lists(st.tuples(st.integers(0, 7), st.floats(0.25, 2.0), st.floats(-1e-2, 1e-2)), max_size=6))
def test_post_accumulate_hooks_match_dense_on_random_pipelines(schedule, chunks, extra, checkpoint, steps, hooked):
    """Random schedules, micro-batch counts (of unequal sizes), checkpointing, steps accumulating
    gradients, and hooks (p.grad * a + b, several per parameter, in order) on random parameters."""
    torch.manual_seed(0)
    dense = mlp((16, 32, 32, 32, 8))
    inputs, target = torch.randn(chunks + extra, 16), torch.randn(chunks + extra, 8)
    piped = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=chunks, schedule=schedule,
                           checkpoint=checkpoint)
    for model in (dense, piped):
        params = list(model.parameters())
        for index, scale, shift in hooked:
            params[index].register_post_accumulate_grad_hook(affine(scale, shift))
    for _ in range(steps):
        F.mse_loss(dense(inputs), target).backward()
        piped.train_step(inputs, target=target, loss_fn=F.mse_loss)
    for (name, param), reference in zip(piped.named_parameters(), dense.parameters()):
        torch.testing.assert_close(param.grad, reference.grad, rtol=1e-5, atol=1e-6, msg=name)
