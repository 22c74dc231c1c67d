"""A rank that dies mid-step, or never reaches a collective: the other ranks fail within the group's
timeout with torch_mp.CollectiveError naming the operator, the collective, the group and the rank."""
import os
import re
import signal
import time

import pytest
import torch
from distributed import fail_in_forward, run_ranks_until_death

import torch_mp
from torch_mp.nn import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

GROUP_TIMEOUT = 5.0
WORLD = 3
VICTIM = 1


def train_until_a_peer_fails(rank, world, how):
    """Trains a tensor-parallel model; on the third step the victim dies after its forward (killed)
    or stalls before it. Returns the survivor's error message and how long it waited for it."""
    torch.manual_seed(0)
    embedding, up, down = VocabParallelEmbedding(66, 16), ColumnParallelLinear(16, 48), RowParallelLinear(48, 16)
    head = ColumnParallelLinear(16, 66)
    parameters = [p for layer in (embedding, up, down, head) for p in layer.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    ids = torch.randint(0, 66, (4, 8))
    for step in range(3):
        start = time.monotonic()
        try:
            if rank == VICTIM and step == 2 and how == "stalls":
                time.sleep(GROUP_TIMEOUT + 1)  # the others give up meanwhile; this rank then just ends
                os._exit(0)
            hidden = embedding(ids)
            loss = vocab_parallel_cross_entropy(head(hidden + down(torch.relu(up(hidden)))), ids)
            if rank == VICTIM and step == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-step: after the forward, before the backward
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        except torch_mp.CollectiveError as error:
            return str(error), time.monotonic() - start
    return None


def survivors_messages(results, how, timed_out: str):
    """Each survivor's error message, checked to have come within the timeout (and, for a stalled
    peer, only once the timeout had passed, saying ``timed_out``)."""
    assert sorted(results) == [r for r in range(WORLD) if r != VICTIM], results
    messages = {}
    for rank, outcome in results.items():
        assert outcome is not None, f"rank {rank} finished its steps although rank {VICTIM} was gone"
        message, waited = outcome
        assert waited < GROUP_TIMEOUT + 2, f"rank {rank} waited {waited:.1f} s: {message}"
        if how == "stalls":
            assert timed_out in message and waited >= GROUP_TIMEOUT - 0.5, message
        messages[rank] = message
    return messages


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_survivors_fail_with_a_clear_error_within_the_timeout(how):
    results = run_ranks_until_death(WORLD, train_until_a_peer_fails, how, group_timeout=GROUP_TIMEOUT, timeout=90)
    for rank, message in survivors_messages(results, how, "got no answer within 5.0 s").items():
        pattern = (rf"^torch_mp\.[a-z_]+( backward)?: (all_reduce|all_gather|reduce_scatter) on group '0' "
                   rf"\(default_pg, rank {rank} of {WORLD}\) (got no answer within 5\.0 s|failed after [0-9.]+ s): "
                   r"a peer rank has died or (did not reach this collective|left the group) \(gloo: .+\)$")
        assert re.match(pattern, message), message
        if how == "dies":
            assert " backward: " in message, message


def pipeline_until_a_peer_fails(rank, world, how):
    """A 3-stage pipeline; in the second step the middle stage dies (killed) or stalls in its third
    micro-batch's forward. Returns the survivor's error message and how long its step ran."""
    from torch.nn import functional as F

    from models import mlp

    torch.manual_seed(0)
    model = torch_mp.pipeline(mlp((8, 16, 16, 16, 16, 16, 4)), chunks=4)
    if rank == VICTIM:  # in step two's third micro-batch; a stalled rank sleeps past the others' timeout
        fail_in_forward(model, 4 + 3, how, GROUP_TIMEOUT + 1)
    inputs, target = torch.randn(8, 8), torch.randn(8, 4)
    for _ in range(2):
        start = time.monotonic()
        try:
            model.train_step(inputs, target=target, loss_fn=F.mse_loss)
        except torch_mp.CollectiveError as error:
            return str(error), time.monotonic() - start
    return None


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_pipeline_survivors_name_the_rank_stage_and_micro_batch_they_waited_for(how):
    results = run_ranks_until_death(WORLD, pipeline_until_a_peer_fails, how, group_timeout=GROUP_TIMEOUT,
                                    timeout=90)
    for rank, message in survivors_messages(results, how, "got no answer within 5 s").items():
        pattern = (rf"^torch_mp\.pipeline: rank {rank} of {WORLD} in group '0' (failed|got no answer within 5 s) "
                   rf"receiving the (activations|gradients) of micro-batch \d for stage \d from rank {VICTIM}: "
                   r"a peer rank has died")
        assert re.match(pattern, message), message
