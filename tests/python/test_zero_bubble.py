"""Zero-bubble schedules (ZB-H1, ZB-V) against the dense model, and the B/W split under them: the
deferred_linear operator, the W that runs its weight gradients, in one process and on Gloo ranks."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from models import GPT
from test_pipeline import assert_step_matches, gpt_loss
from torch_mp import _C
from torch_mp._pipelining import zero_bubble

SCHEDULES = ("zb_h1", "zbv")


def tanh_mlp(width=24, depth=8) -> nn.Sequential:
    layers = [nn.Linear(12, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 5))


def mlp_case(batch=13):  # 4 or 5 micro-batches do not divide 13: unequal sizes
    torch.manual_seed(0)
    return tanh_mlp(), torch.randn(batch, 12), torch.randn(batch, 5), F.mse_loss


def gpt_case(batch=7):
    torch.manual_seed(0)
    return GPT(depth=4), torch.randint(0, 97, (batch, 16)), torch.randint(0, 97, (batch, 16)), gpt_loss


# --- the operator ----------------------------------------------------------------------------

def test_deferred_linear_passes_opcheck():
    x = torch.randn(3, 5, 4, requires_grad=True)
    w, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    slot = zero_bubble.allocate_slots(1)
    stored = torch.randn(4, 6, requires_grad=True)  # a weight kept [in, out], passed transposed (Conv1D)
    for args in [(x, w, b, -1), (x, w, None, -1), (x, w, b, slot), (x[0, 0], w, b, slot), (x, stored.t(), b, slot)]:
        torch.library.opcheck(torch.ops.torch_mp.deferred_linear.default, args)
    zero_bubble.discard(slot, 1)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.torch_mp.deferred_linear(*a, -1),
                                    (x.double(), w.double(), b.double()))


def test_backward_leaves_the_weight_gradient_to_w():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, requires_grad=True)
    w, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    grad = torch.randn(3, 5, 6)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.linear(x2, w2, b2).backward(grad)
    slot = zero_bubble.allocate_slots(1)
    torch.ops.torch_mp.deferred_linear(x, w, b, slot).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    assert w.grad is None and b.grad is None
    assert _C._pending_weight_gradients(slot) == 1
    assert zero_bubble.run_weight_gradients(slot) == 1
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-6)
    # create_graph=True: the first backward returns every gradient, differentiable; the double
    # backward passes through the op's backward again, which defers as any, and W completes it.
    def double_backward(linear):
        w3 = w.detach().clone().requires_grad_()
        (gx,) = torch.autograd.grad(linear(x, w3).square().sum(), x, create_graph=True)
        gx.sum().backward()
        return w3

    expected = double_backward(lambda x, w: F.linear(x, w))
    actual = double_backward(lambda x, w: torch.ops.torch_mp.deferred_linear(x, w, None, slot))
    zero_bubble.run_weight_gradients(slot)
    torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-5, atol=1e-5)


def test_a_transposed_weight_defers_into_its_stored_layout():
    """A weight passed as the transpose of a parameter stored [in, out] (transformers' Conv1D):
    its gradient waits for W, which writes it in the stored layout; another view does not wait."""
    torch.manual_seed(0)
    x, grad = torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 5, 6)
    stored, b = torch.randn(4, 6, requires_grad=True), torch.randn(6, requires_grad=True)
    x2, stored2, b2 = (t.detach().clone().requires_grad_() for t in (x, stored, b))
    torch.addmm(b2, x2.view(-1, 4), stored2).view(3, 5, 6).backward(grad)
    slot = zero_bubble.allocate_slots(1)
    torch.ops.torch_mp.deferred_linear(x, stored.t(), b, slot).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    assert stored.grad is None and b.grad is None and _C._pending_weight_gradients(slot) == 1
    assert zero_bubble.run_weight_gradients(slot) == 1
    assert stored.grad.shape == (4, 6) and stored.grad.is_contiguous()
    torch.testing.assert_close(stored.grad, stored2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-6)
    # Not a transpose of a leaf (a slice of one): the joint backward, nothing queued.
    wide = torch.randn(6, 8, requires_grad=True)
    torch.ops.torch_mp.deferred_linear(x, wide[:, :4], None, slot).backward(grad)
    assert _C._pending_weight_gradients(slot) == 0 and wide.grad is not None


# --- one process ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [mlp_case, gpt_case], ids=["tanh_mlp", "gpt"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_split_matches_dense(case, schedule, checkpoint):
    model, inputs, target, loss_fn = case()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu"] * 4, chunks=5, schedule=schedule, checkpoint=checkpoint)
    assert_step_matches(piped, model, inputs, target, loss_fn)
    # A second step accumulates on top of the first, as the dense model's .grad does.
    model.zero_grad(set_to_none=True)
    piped.zero_grad(set_to_none=True)
    assert_step_matches(piped, model, inputs, target, loss_fn)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gradient_hooks_see_the_weight_gradient(schedule):
    """A Linear whose weight has a gradient hook keeps the joint backward: the hook gets the
    gradient (never None) and changes it as in the dense model; W would write .grad past it. (The
    hook is linear: a pipeline refuses any other, which would see each micro-batch's part.)"""
    model, inputs, target, loss_fn = mlp_case()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu"] * 4, chunks=4, schedule=schedule)
    seen = []

    def triple(grad):
        seen.append(grad)
        return None if grad is None else grad * 3

    for module in (model, piped):
        module[2].weight.register_hook(torch_mp.linear_hook(triple))
    assert_step_matches(piped, model, inputs, target, loss_fn)
    assert seen and all(grad is not None for grad in seen)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_w_runs_the_linear_weight_gradients_after_b(schedule, monkeypatch):
    """Each W finds its stage's linear weights without the gradient of its micro-batch (B left it
    queued) and adds it: after the first W of a stage its weights' .grad appears; the B of every
    micro-batch ran before (the last stage's B of micro-batch 0 precedes every W of it)."""
    model, inputs, target, loss_fn = mlp_case()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu"] * 4, chunks=4, schedule=schedule)
    pipe = torch_mp.state_of(piped).pipe
    linears = {}
    for name, stage in pipe.stage_of.items():
        module = piped.get_submodule(name)
        if isinstance(module, nn.Linear):
            linears.setdefault(stage, []).append(module)
    seen = []
    run = zero_bubble.run_weight_gradients

    def recording(slot):
        pending = _C._pending_weight_gradients(slot)
        before = [None if layer.weight.grad is None else layer.weight.grad.clone() for layer in linears_of(slot)]
        done = run(slot)
        after = [layer.weight.grad.clone() for layer in linears_of(slot)]
        seen.append((slot, pending, done, before, after))
        return done

    first = []

    def linears_of(slot):
        stage = (slot - first[0]) // 4
        return linears.get(stage, [])

    first.append(zero_bubble.allocate_slots(0))  # the step's slots start there
    monkeypatch.setattr(zero_bubble, "run_weight_gradients", recording)
    piped.train_step(inputs, target=target, loss_fn=loss_fn)
    assert len(seen) == 4 * 4  # one W per (stage, micro-batch)
    stages_seen = set()
    for slot, pending, done, before, after in seen:
        stage = (slot - first[0]) // 4
        assert pending == done == len(linears.get(stage, []))
        if stage not in stages_seen:  # the stage's first W: no weight gradient before it
            assert all(grad is None for grad in before), stage
            stages_seen.add(stage)
        for grad_before, grad_after in zip(before, after):
            assert grad_before is None or not torch.equal(grad_before, grad_after)


def test_split_zero_bubble_on_llama():
    transformers = pytest.importorskip("transformers")
    from test_pipeline_models import MEAN_LOSS, _model_loss, check_parity, llama_case
    for schedule in SCHEDULES:
        check_parity(*llama_case(), _model_loss, chunks=3, schedule=schedule, output_merge=MEAN_LOSS)
    assert transformers


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gpt2_conv1d_weight_gradients_wait_for_w(schedule, monkeypatch):
    """GPT-2's linears are transformers' Conv1D (weight [in, out]): their weight gradients wait for
    W as nn.Linear's do (4 per block, and the LM head tied to the embedding), at the dense model's
    numbers."""
    pytest.importorskip("transformers")
    from test_pipeline_models import MEAN_LOSS, _model_loss, check_parity, gpt2_case
    model, kwargs = gpt2_case()
    pending = []
    run = zero_bubble.run_weight_gradients
    monkeypatch.setattr(zero_bubble, "run_weight_gradients",
                        lambda slot: pending.append(_C._pending_weight_gradients(slot)) or run(slot))
    check_parity(model, kwargs, _model_loss, chunks=3, schedule=schedule, output_merge=MEAN_LOSS)
    # 2 stages of 2 blocks, 4 Conv1D calls each per micro-batch; the stage with the LM head one more.
    assert sorted(set(pending)) == [8, 9], pending


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb_h1"])
def test_only_zero_bubble_schedules_defer(schedule):
    """Other schedules neither allocate slots nor queue work: their backward is the joint one."""
    model, inputs, target, loss_fn = mlp_case()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu"] * 2, chunks=2, schedule=schedule)
    before = zero_bubble.allocate_slots(0)
    piped.train_step(inputs, target=target, loss_fn=loss_fn)
    assert (zero_bubble.allocate_slots(0) > before) == (schedule == "zb_h1")


def test_bad_combinations_fail_before_anything_runs():
    with pytest.raises(ValueError, match=r"'zbv' runs two stages per rank \(in a V\) but stages_per_rank = 1"):
        torch_mp.pipeline(tanh_mlp(), schedule="zbv", stages_per_rank=1)
    with pytest.raises(ValueError, match=r"'zb_h1' runs one stage per rank but stages_per_rank = 2"):
        torch_mp.pipeline(tanh_mlp(), schedule="zb_h1", stages_per_rank=2)
    with pytest.raises(ValueError, match=r"split: schedule 'zbv' pairs the stages in a V .* there are 3 devices; "
                                         r"expected an even number of devices"):
        torch_mp.split(tanh_mlp(), ["cpu"] * 3, chunks=2, schedule="zbv")


# --- across ranks ------------------------------------------------------------------------------

def _across_ranks(rank, world):
    run = zero_bubble.run_weight_gradients
    for schedule in SCHEDULES:
        for case in (mlp_case, gpt_case):
            dense, inputs, target, loss_fn = case()
            piped = torch_mp.pipeline(copy.deepcopy(dense), chunks=5, schedule=schedule, timeout=60)
            pending = []  # linear calls waiting at each W of this rank
            zero_bubble.run_weight_gradients = lambda slot: pending.append(_C._pending_weight_gradients(slot)) or run(slot)
            try:
                assert_step_matches(piped, dense, inputs, target, loss_fn)
            finally:
                zero_bubble.run_weight_gradients = run
            stages = 2 if schedule == "zbv" else 1
            assert len(pending) == stages * 5 and all(count > 0 for count in pending), pending
    try:
        from test_pipeline_models import MEAN_LOSS, _model_loss, check_parity_across_ranks, gpt2_case, llama_case
    except pytest.skip.Exception:
        return
    # Llama's rotary embedding, defined after the layers but called before the first, runs where
    # its inputs are (under ZB-V rank 1 runs stage 1 before stage 2); GPT-2 (transformers' Conv1D
    # layers: no nn.Linear, a joint backward) runs as well.
    for schedule in SCHEDULES:
        check_parity_across_ranks(rank, world, *llama_case(), _model_loss, chunks=3, schedule=schedule,
                                  output_merge=MEAN_LOSS)
        check_parity_across_ranks(rank, world, *gpt2_case(), _model_loss, chunks=3, schedule=schedule,
                                  output_merge=MEAN_LOSS)


def test_pipeline_on_two_ranks_matches_dense():
    """ZB-H1 (2 stages) and ZB-V (4 stages in a V: rank 0 holds the first and the last) on 2 Gloo
    ranks, 5 micro-batches of a batch of 13 (or 7): a Linear/Tanh MLP, a GPT whose head is tied to
    its embedding; transformers' Llama and GPT-2."""
    run_ranks(2, _across_ranks, timeout=240)
