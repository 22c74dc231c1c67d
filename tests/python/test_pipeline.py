"""Pipelines against the dense model: same weights, same loss, gradients and optimizer step, for
every schedule, in one process (split with chunks) and across Gloo ranks (pipeline)."""
import copy
import gc
import random
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from models import GPT, mlp


def gpt_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def mlp_case(batch=13):  # chunks of 2 to 6 do not divide it: micro-batches of unequal sizes
    return mlp((16, 32, 32, 32, 32, 32, 32, 32, 8)), torch.randn(batch, 16), torch.randn(batch, 8), F.mse_loss


def gpt_case(batch=6):
    return GPT(depth=4), torch.randint(0, 97, (batch, 16)), torch.randint(0, 97, (batch, 16)), gpt_loss


def dense_step(model, inputs, target, loss_fn):
    """Loss, gradients and parameters after one SGD step of the unpipelined model."""
    loss = loss_fn(model(inputs), target)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return loss.detach(), grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_step_matches(piped, dense, inputs, target, loss_fn):
    """One train_step and SGD step of ``piped`` against ``dense``; parameters this rank does not hold
    (meta tensors) are skipped."""
    expected_loss, expected_grads, expected_params = dense_step(dense, inputs, target, loss_fn)
    loss = piped.train_step(inputs, target=target, loss_fn=loss_fn)
    torch.optim.SGD([p for p in piped.parameters() if not p.is_meta], lr=0.1).step()
    torch.testing.assert_close(loss.cpu(), expected_loss, rtol=1e-5, atol=1e-6)
    checked = 0
    for name, param in piped.named_parameters():
        if param.is_meta:
            continue
        torch.testing.assert_close(param.grad.cpu(), expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(param.detach().cpu(), expected_params[name], rtol=1e-5, atol=1e-6, msg=name)
        checked += 1
    assert checked > 0


# --- one process ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [mlp_case, gpt_case], ids=["mlp", "gpt"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("checkpoint", ["never", "except_last", "always"])
def test_split_train_step_matches_dense(case, schedule, checkpoint):
    torch.manual_seed(0)
    model, inputs, target, loss_fn = case()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu", "cpu"], chunks=4, schedule=schedule,
                           checkpoint=checkpoint)
    assert_step_matches(piped, model, inputs, target, loss_fn)


@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 10])
def test_split_forward_with_uneven_micro_batches(chunks):
    """Batches that chunks do not divide, and more chunks than stages; backward through the merged
    output (one GPipe pass driven by the caller's loss.backward()) gives the dense gradients."""
    torch.manual_seed(0)
    model, inputs, target, loss_fn = mlp_case(batch=10)
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=chunks, checkpoint="except_last")
    output = piped(inputs)
    torch.testing.assert_close(output, model(inputs))
    loss_fn(output, target).backward()
    loss_fn(model(inputs), target).backward()
    for (name, p), (_, q) in zip(piped.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_split_merges_structured_outputs():
    """A forward that returns (logits, loss) when given targets: logits are concatenated, the loss
    merged as output_merge says, and without a word on it an error naming it."""
    torch.manual_seed(0)
    model, ids, targets, _ = gpt_case(batch=5)
    expected_logits, expected_loss = model(ids, targets=targets)
    with pytest.raises(ValueError, match=r"output '1' is a scalar in each micro-batch.*pass output_merge=\{'1': "
                                         r"'mean'\}"):
        torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2)(ids, targets=targets)
    # The model's loss is a mean over tokens, as many in every sequence: micro-batches of 3 and 2
    # sequences weigh 3/5 and 2/5.
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2, output_merge={"1": "mean"})
    logits, loss = piped(ids, targets=targets)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(loss, expected_loss)
    # A sum over samples merges by "sum", or by a callable given the values and micro-batch sizes.
    model = SumOut()
    x = torch.randn(5, 8)
    for how in ("sum", lambda values, sizes: sum(values)):
        piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=3, output_merge={"total": how})
        out = piped(x)
        torch.testing.assert_close(out["total"], model(x)["total"])
        torch.testing.assert_close(out["rows"], model(x)["rows"])
    with pytest.raises(TypeError, match="output_merge = 'max'; expected 'mean', 'sum', a callable"):
        torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=3, output_merge="max")


class SumOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))

    def forward(self, x):
        rows = self.layers(x)
        return {"rows": rows, "total": rows.sum()}


def test_split_pipelined_keeps_stock_state_dict_and_can_be_resplit():
    torch.manual_seed(0)
    model, inputs, _, _ = gpt_case()
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2)
    assert list(piped.state_dict()) == list(model.state_dict())
    torch_mp.split(piped, ["cpu", "cpu"])  # back to the plain split: its own forward again
    assert "forward" not in vars(piped)
    torch.testing.assert_close(piped(inputs), model(inputs))


class Repeat(nn.Module):
    """A linear layer applied ``times`` times: the same bytes, ``times`` the compute."""

    def __init__(self, width: int, times: int):
        super().__init__()
        self.linear, self.times = nn.Linear(width, width), times

    def forward(self, x):
        for _ in range(self.times):
            x = torch.tanh(self.linear(x))
        return x


class Costly(nn.Module):
    """A linear layer whose forward takes ``units`` milliseconds on ``Costly.clock``, a fake timer
    (shared by copies of the model)."""

    clock = None

    def __init__(self, units: int):
        super().__init__()
        self.linear, self.units = nn.Linear(16, 16), units

    def forward(self, x):
        Costly.clock.now += self.units * 1e-3
        return self.linear(x)


def test_balance_by_time_follows_compute_not_bytes(monkeypatch):
    """Equal bytes, compute 24 : 8 : 8 : 8 on a fake clock (a shared machine's timings move by
    orders of magnitude): by time the cut is [0 | 1 2 3], by bytes [0 1 | 2 3]."""
    import sys
    import types

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(Costly, "clock", clock)
    monkeypatch.setattr(sys.modules["torch_mp._pipelining.pipeline"], "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    torch.manual_seed(0)
    model = nn.Sequential(*(Costly(units) for units in (24, 8, 8, 8)))
    sample = (torch.randn(4, 16),)
    by_bytes = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], balance="auto")
    by_time = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], balance="time", sample=sample, chunks=2)
    assert sorted(torch_mp.state_of(by_bytes).stage_of.items()) == [("0", 0), ("1", 0), ("2", 1), ("3", 1)]
    assert sorted(torch_mp.state_of(by_time).stage_of.items()) == [("0", 0), ("1", 1), ("2", 1), ("3", 1)]
    torch.testing.assert_close(by_time(*sample), model(*sample))


class WithHead(nn.Module):
    """Four layers of 8 units and, outside them, a head of 24 (an LLM's projection to its vocabulary)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Costly(8) for _ in range(4))
        self.head = Costly(24)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_balance_by_time_counts_the_modules_outside_the_layers(monkeypatch):
    """The head's time goes with the last layer's stage (where the cut places it): on a fake clock
    the cut is [0 1 2 | 3 head] (by the layers' time alone it would be [0 1 | 2 3 head], the second
    stage running 40 units to the first's 16)."""
    import sys
    import types

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(Costly, "clock", clock)
    monkeypatch.setattr(sys.modules["torch_mp._pipelining.pipeline"], "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    torch.manual_seed(0)
    model = WithHead()
    sample = (torch.randn(4, 16),)
    by_time = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], balance="time", sample=sample, chunks=2,
                             layers=[f"layers.{i}" for i in range(4)])
    assert sorted(torch_mp.state_of(by_time).stage_of.items()) == [
        ("head.linear", 1), ("layers.0", 0), ("layers.1", 0), ("layers.2", 0), ("layers.3", 1)]
    torch.testing.assert_close(by_time(*sample), model(*sample))


@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_batch_norm_normalizes_micro_batches_and_tracks_whole_batch_statistics(checkpoint):
    """In training each micro-batch is normalized with its own statistics; the running statistics
    are updated once per batch, from the whole batch, as the dense model updates them (a
    recomputed forward does not count twice); in eval mode the pipeline equals the dense model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 8))
    inputs, target = torch.randn(12, 8) * 3 + 1, torch.randn(12, 8)
    piped = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=3, layers=["0", "1", "2", "3"],
                           checkpoint=checkpoint)
    for _ in range(2):
        piped.train_step(inputs, target=target, loss_fn=F.mse_loss)
        model(inputs)  # the dense model's running statistics, from the whole batch
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(piped[1], name), getattr(model[1], name), msg=name)
    expected = torch.cat([copy.deepcopy(model)(part) for part in inputs.chunk(3)])
    torch.testing.assert_close(piped(inputs), expected)
    model(inputs)
    piped.eval(), model.eval()
    torch.testing.assert_close(piped(inputs), model(inputs))
    assert list(piped.state_dict()) == list(model.state_dict())


def test_schedule_checker_rejects_broken_schedules():
    check = torch_mp._C._check_pipeline_schedule
    good = torch_mp._C._pipeline_schedule("1f1b", 2, 1, 2)
    check(good, 2, 2)
    missing = [good[0], good[1][:-1]]
    with pytest.raises(ValueError, match=r"no rank runs B\(stage 1, micro-batch 1\); expected rank 1"):
        check(missing, 2, 2)
    with pytest.raises(ValueError, match=r"rank 0 runs F\(stage 1, micro-batch 0\) but stage 1 lives on rank 1"):
        check([good[0] + [(False, 1, 0)], good[1]], 2, 2)
    with pytest.raises(ValueError, match=r"runs F\(stage 0, micro-batch 0\) twice"):
        check([good[0] + [(False, 0, 0)], good[1]], 2, 2)
    # Rank 0 waits for micro-batch 0's gradient before sending micro-batch 1's activation, which rank
    # 1 needs before it runs micro-batch 0's backward.
    deadlock = [[(False, 0, 0), (True, 0, 0), (False, 0, 1), (True, 0, 1)],
                [(False, 1, 0), (False, 1, 1), (True, 1, 0), (True, 1, 1)]]
    with pytest.raises(ValueError, match=r"deadlocks:\n  rank 0 waits in B\(stage 0, micro-batch 0\) for "
                                         r"B\(stage 1, micro-batch 0\) on rank 1\n  rank 1 waits in "
                                         r"F\(stage 1, micro-batch 1\) for F\(stage 0, micro-batch 1\) on rank 0"):
        check(deadlock, 2, 2)
    with pytest.raises(ValueError, match=r"'1f1b' runs one stage per rank"):
        torch_mp._C._pipeline_schedule("1f1b", 2, 2, 4)


@pytest.mark.parametrize("schedule, ranks, stages_per_rank, chunks", [
    (schedule, *sizes) for schedule in ("gpipe", "1f1b", "interleaved_1f1b")
    for sizes in [(2, 1, 1), (4, 1, 3), (3, 2, 2), (4, 2, 8), (1, 3, 4)]
    if schedule != "1f1b" or sizes[1] == 1])  # 1f1b has one stage per rank
def test_schedules_cover_every_action_without_deadlock(schedule, ranks, stages_per_rank, chunks):
    actions = torch_mp._C._pipeline_schedule(schedule, ranks, stages_per_rank, chunks)
    torch_mp._C._check_pipeline_schedule(actions, ranks * stages_per_rank, chunks)
    if schedule != "gpipe":  # 1F1B keeps at most (stages - stage) micro-batches in flight per stage
        for rank, rank_actions in enumerate(actions):
            in_flight, most = 0, 0
            for backward, _, _ in rank_actions:
                in_flight += -1 if backward else 1
                most = max(most, in_flight)
            if stages_per_rank == 1:
                assert most <= min(ranks - rank, chunks)


# --- one stage per rank -------------------------------------------------------------------------

def _parity_on_ranks(rank, world, configs):
    for case_name, schedule, stages_per_rank, chunks, checkpoint in configs:
        torch.manual_seed(0)
        model, inputs, target, loss_fn = {"mlp": mlp_case, "gpt": gpt_case}[case_name]()
        piped = torch_mp.pipeline(copy.deepcopy(model), chunks=chunks, schedule=schedule,
                                  stages_per_rank=stages_per_rank, checkpoint=checkpoint)
        assert_step_matches(piped, model, inputs, target, loss_fn)
        # New batch shapes need shape headers again; the first shapes then come from the cache.
        for batch in (len(inputs) - 1, len(inputs)):
            if batch >= chunks:
                assert_step_matches(piped, model, inputs[:batch], target[:batch], loss_fn)
        # Forward only: the output on every rank (broadcast from the rank of the last stage).
        torch.testing.assert_close(piped(inputs), model(inputs))


def _random_configs(world, count, seed):
    rng = random.Random(seed)
    configs = []
    for _ in range(count):
        schedule = rng.choice(["gpipe", "1f1b", "interleaved_1f1b"])
        stages_per_rank = 1 if schedule == "1f1b" else rng.choice([1, 2])
        if world * stages_per_rank > 8:  # the mlp has 8 layers
            stages_per_rank = 1
        chunks = rng.randint(1, 6)  # fewer chunks than stages too
        configs.append((rng.choice(["mlp", "gpt"]) if world * stages_per_rank <= 4 else "mlp", schedule,
                        stages_per_rank, chunks, rng.choice(["never", "except_last", "always"])))
    return configs


@pytest.mark.parametrize("world", [2, 3, 4])
def test_pipeline_matches_dense_on_random_configs(world):
    configs = _random_configs(world, count=4, seed=world)
    if world == 2:  # every schedule at least once, and the tied GPT head across ranks
        configs += [("gpt", "gpipe", 1, 3, "never"), ("gpt", "1f1b", 1, 1, "never"),
                    ("gpt", "interleaved_1f1b", 2, 4, "except_last")]
    run_ranks(world, _parity_on_ranks, configs, timeout=300)


def _disagreeing(rank, world, chunks, batches, pattern):
    torch.manual_seed(0)
    model, inputs, target, loss_fn = mlp_case(batch=batches[rank])
    piped = torch_mp.pipeline(model, chunks=chunks[rank], timeout=20)
    with pytest.raises(ValueError, match=pattern):
        piped.train_step(inputs, target=target, loss_fn=loss_fn)


@pytest.mark.parametrize("chunks, batches, pattern", [
    ((2, 3), (12, 12), r"ranks disagree before running the schedule \(chunks: rank 0 has 2, rank 1 has 3"),
    ((2, 2), (12, 14), r"input shapes: ranks \[0\] / ranks \[1\] differ; rank \d's first micro-batch has "
                       r"inputs \[\d+, 16\] float32, targets \[\d+, 8\] float32"),
], ids=["chunks", "batch shapes"])
def test_pipeline_ranks_that_disagree_fail_fast(chunks, batches, pattern):
    run_ranks(2, _disagreeing, chunks, batches, pattern, timeout=120)


def _time_balanced(rank, world):
    """Each rank times the layers itself; the costs are summed over the ranks, so all cut alike
    (whatever a busy machine's timings are) and each holds the parameters of its stage."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = nn.Sequential(Repeat(64, 24), Repeat(64, 8), Repeat(64, 8), Repeat(64, 8))
    sample = (torch.randn(16, 64),)
    piped = torch_mp.pipeline(copy.deepcopy(model), balance="time", sample=sample, chunks=2)
    stage_of = sorted(torch_mp.state_of(piped).stage_of.items())
    every = [None] * world
    dist.all_gather_object(every, stage_of)
    assert all(cut == stage_of for cut in every)
    held = {name.split(".")[0] for name, p in piped.named_parameters() if not p.is_meta}
    assert held == {name for name, stage in stage_of if stage == rank}


def test_pipeline_balance_by_time_is_the_same_on_every_rank():
    run_ranks(2, _time_balanced, timeout=120)


def test_pipeline_example_in_one_process_and_under_torchrun():
    """The example trains in one process (a thread per stage) and on two ranks (interleaved 1F1B):
    the loss falls, and both print the same losses, since both run the same arithmetic."""
    import os
    import re
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "python", "pipeline_train.py")
    common = [script, "--steps", "8", "--chunks", "4"]
    local = subprocess.run([sys.executable, *common], capture_output=True, text=True, timeout=300)
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            *common, "--schedule", "interleaved_1f1b"], capture_output=True, text=True, timeout=300)
    for result in (local, ranks):
        assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", local.stdout).groups())
    assert last < first / 2, local.stdout
    assert "rank 0 of 2, stages [0, 2]" in ranks.stdout
    assert re.search(r"loss [\d.]+ -> [\d.]+", ranks.stdout).group() == f"loss {first:.3f} -> {last:.3f}"


def test_split_pipeline_on_each_device_list(devices):
    """["cpu", "cpu"] everywhere; ["cuda:0", "cpu"] where a GPU exists (stage threads on their own
    CUDA stream, activations and gradients crossing between the GPU and the CPU)."""
    torch.manual_seed(0)
    model, inputs, target, loss_fn = mlp_case()
    piped = torch_mp.split(copy.deepcopy(model), devices, chunks=4, schedule="1f1b", checkpoint="except_last")
    assert_step_matches(piped, model, inputs, target, loss_fn)  # the target reaches the last stage's device
    torch.testing.assert_close(piped(inputs).cpu(), model(inputs))



def _messages_per_step(rank, world):
    """Steps matching the dense model's, while counting the pipeline's tensors sent on this rank
    and the messages (isend calls) that carry them."""
    import torch.distributed as dist

    from torch_mp._pipelining.transport import GroupTransport

    isend, send = dist.isend, GroupTransport.send
    counted = {"tensors": 0, "messages": 0}

    def counting_send(self, dst, key, tensor):
        counted["tensors"] += 1
        dist.isend = counting_isend
        try:
            send(self, dst, key, tensor)
        finally:
            dist.isend = isend

    def counting_isend(*args, **kwargs):
        counted["messages"] += 1
        return isend(*args, **kwargs)

    GroupTransport.send = counting_send
    try:
        for name, case in (("mlp", mlp_case), ("gpt", gpt_case)):
            torch.manual_seed(0)
            model, inputs, target, loss_fn = case(batch=26)
            piped = torch_mp.pipeline(copy.deepcopy(model), chunks=4, schedule="1f1b")
            steps = []
            # 26 rows: micro-batches of 7, 7, 6, 6; 22: 6, 6, 5, 5 (every activation and gradient
            # changes shape); 23: 6, 6, 6, 5 (micro-batch 2's change back).
            for batch in (26, 26, 22, 22, 23):
                counted.update(tensors=0, messages=0)
                assert_step_matches(piped, model, inputs[:batch], target[:batch], loss_fn)
                steps.append((counted["tensors"], counted["messages"]))
            tensors = steps[0][0]
            assert tensors >= 4 and all(t == tensors for t, _ in steps), (name, steps)
            # A header first, then each tensor alone; a header for each that changed.
            assert [m for _, m in steps] == [2 * tensors, tensors, 2 * tensors, tensors, tensors + tensors // 4], \
                (name, steps)
    finally:
        GroupTransport.send = send


def test_pipeline_over_gloo_sends_each_tensor_alone_once_its_shape_is_known():
    """Over Gloo, a step whose activations and gradients have the shapes of the step before sends
    each in one message (no header), as torch.distributed.pipelining does; a new or changed shape
    costs one header message more. The losses, gradients and SGD steps equal the dense model's
    throughout (an MLP, and a GPT whose head is tied to the embedding across the ranks; 1F1B on 2
    ranks, micro-batches of unequal sizes)."""
    run_ranks(2, _messages_per_step, timeout=300)


def _outputs_freed(rank, world):
    torch.manual_seed(0)
    model, inputs, target, _ = gpt_case(batch=8)
    piped = torch_mp.pipeline(copy.deepcopy(model), chunks=4, schedule="1f1b")
    outputs = []

    def loss_fn(logits, targets):
        # 1F1B on the last stage: each earlier micro-batch's backward ran before this forward.
        assert [ref() for ref in outputs] == [None] * len(outputs), "an earlier micro-batch's output is alive"
        outputs.append(weakref.ref(logits))
        return gpt_loss(logits, targets)

    gc.disable()
    try:
        for _ in range(2):
            piped.train_step(inputs, target=target, loss_fn=loss_fn)
            assert [ref() for ref in outputs] == [None] * len(outputs), "an output outlived the step"
    finally:
        gc.enable()
    assert len(outputs) == (8 if rank == world - 1 else 0)
    piped.zero_grad(set_to_none=True)
    assert_step_matches(piped, model, inputs, target, gpt_loss)


def test_pipeline_train_step_frees_each_output_once_its_loss_is_made():
    """The last stage's output (a GPT's logits: an LLM's largest activation) is freed once its
    micro-batch's loss is made, not kept to the step's end, and nothing of the step waits for the
    garbage collector (it is off here): under 1F1B the last stage holds one micro-batch's logits
    at a time, as torch.distributed.pipelining's does. The step still gives the dense numbers."""
    run_ranks(2, _outputs_freed, timeout=300)


def _plain_loop_refused(rank, world):
    torch.manual_seed(0)
    model, inputs, target, loss_fn = mlp_case(batch=8)
    other = copy.deepcopy(model)
    kept = loss_fn(other(inputs), target)  # a loss kept for logging, its graph holding the parameters
    with pytest.raises(ValueError, match="not yet run backward"):
        torch_mp.pipeline(other, chunks=2)
    dense = copy.deepcopy(model)
    piped = torch_mp.pipeline(model, chunks=2)
    output = piped(inputs)
    torch.testing.assert_close(output, dense(inputs))
    loss = loss_fn(output, target) + sum(p.square().sum() for p in piped.parameters() if not p.is_meta)
    with pytest.raises(RuntimeError, match=r"expected loss = model.train_step\(inputs"):
        loss.backward()
    with torch.no_grad():
        assert not piped(inputs).requires_grad
    piped.eval()
    assert not piped(inputs).requires_grad
    piped.zero_grad(set_to_none=True)  # the regularizer's part may have run before the refusal
    assert_step_matches(piped.train(), dense, inputs, target, loss_fn)


def test_pipeline_output_refuses_a_backward_and_a_graph_refuses_the_move():
    """Across ranks ``model(...)`` runs the forward only: in a training loop's forward (training
    mode, grad on) a backward through its output raises, naming train_step (it raised torch's "does
    not require grad", and with a second loss term, a regularizer, the output's part of the
    gradients was silently left out); under no_grad or in eval mode the output is as before. A
    loss still holding its graph when pipeline() moves the parameters is a ValueError naming it
    (was torch's "Expected use_count of t1 to be 1 or 2")."""
    run_ranks(2, _plain_loop_refused, timeout=300)
