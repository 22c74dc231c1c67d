"""Guarantees tested directly, each by a test that fails when that one guarantee is broken: the
schedule checker names the rule a schedule breaks, a pipeline's own timeout bounds its waits when it
is below the group's, and max_memory moves the cut of balance="auto"."""
import copy
import re
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_mp
from distributed import fail_in_forward, run_ranks_until_death
from models import mlp
from torch_mp import _C


# --- the schedule checker -------------------------------------------------------------------------

def test_checker_names_a_backward_before_its_forward():
    """Such a schedule also deadlocks (the backward waits for its own forward); the error must name
    the broken rule, not the deadlock it causes."""
    last_stage_first = [[(False, 0, 0), (False, 0, 1), (True, 0, 0), (True, 0, 1)],
                        [(True, 1, 0), (False, 1, 0), (False, 1, 1), (True, 1, 1)]]
    with pytest.raises(ValueError, match=re.escape(
            "pipeline schedule: rank 1 runs B(stage 1, micro-batch 0) before its forward")):
        _C._check_pipeline_schedule(last_stage_first, 2, 2)
    # A middle stage of an interleaved schedule: rank 1 swaps micro-batch 2's forward and backward of
    # stage 4 (its second stage of three).
    schedule = _C._pipeline_schedule("interleaved_1f1b", 3, 3, 6)
    rank1 = schedule[1]
    f, b = rank1.index((False, 4, 2)), rank1.index((True, 4, 2))
    rank1[f], rank1[b] = rank1[b], rank1[f]
    with pytest.raises(ValueError, match=re.escape("rank 1 runs B(stage 4, micro-batch 2) before its forward")):
        _C._check_pipeline_schedule(schedule, 9, 6)


# --- pipeline(..., timeout=) below the group's timeout ---------------------------------------------

GROUP_TIMEOUT = 30.0
PIPELINE_TIMEOUT = 2.0
STALL = 15.0  # the stalled rank's sleep: longer than the pipeline's timeout, shorter than the group's


def _stall_mid_step(rank, world):
    """Two stages, 1F1B, 4 micro-batches; rank 1 stalls in its second micro-batch's forward, after
    the step's agreement (a group collective) has passed. Returns rank 0's error and its wait."""
    torch.manual_seed(0)
    model = torch_mp.pipeline(mlp((8, 16, 16, 16, 4)), chunks=4, timeout=PIPELINE_TIMEOUT)
    if rank == 1:
        fail_in_forward(model, 2, "stalls", STALL)
    inputs, target = torch.randn(8, 8), torch.randn(8, 4)
    start = time.monotonic()
    try:
        model.train_step(inputs, target=target, loss_fn=F.mse_loss)
    except torch_mp.CollectiveError as error:
        return str(error), time.monotonic() - start
    return None


def test_pipeline_timeout_below_the_group_timeout_bounds_the_wait():
    results = run_ranks_until_death(2, _stall_mid_step, group_timeout=GROUP_TIMEOUT, timeout=120)
    assert sorted(results) == [0], results
    assert results[0] is not None, "rank 0 finished its step although rank 1 stalled"
    message, waited = results[0]
    assert re.search(r"got no answer within 2(\.0)? s", message), message
    assert "from rank 1" in message, message
    # It waited for the pipeline's 2 s, not the group's 30 s nor the stalled rank's 15 s: the margin
    # covers a busy machine, the bound stays well below both.
    assert PIPELINE_TIMEOUT - 0.5 <= waited < PIPELINE_TIMEOUT + 8, f"waited {waited:.1f} s: {message}"


# --- max_memory moves balance="auto"'s cut ----------------------------------------------------------

LAYER_BYTES = (64 * 64 + 64) * 4  # one Linear(64, 64) in float32


@pytest.mark.parametrize("layers, max_memory, counts", [
    (4, [LAYER_BYTES, "1MB"], (1, 3)),
    (4, ["1MB", LAYER_BYTES], (3, 1)),
    (7, ["1MB", LAYER_BYTES, "1MB"], (3, 1, 3)),
    (9, [LAYER_BYTES, "1MB", "1MB"], (1, 4, 4)),
], ids=["first of two", "second of two", "middle of three", "first of three"])
def test_max_memory_forces_an_uneven_cut(layers, max_memory, counts):
    """Equal layers: without a limit the cut is even; a limit of one layer on one device, below
    what any even cut puts there, forces the cut given. The split model computes the dense output."""
    torch.manual_seed(0)
    dense = nn.Sequential(*[nn.Linear(64, 64) for _ in range(layers)])
    devices = ["cpu"] * len(counts)
    limited = next(d for d, limit in enumerate(max_memory) if limit == LAYER_BYTES)

    def cut(model):  # layers per stage, from the bytes each stage holds
        parameters = [row.parameters for row in torch_mp.memory_report(model).rows]
        assert all(p % LAYER_BYTES == 0 for p in parameters), parameters
        return tuple(p // LAYER_BYTES for p in parameters)

    even = cut(torch_mp.split(copy.deepcopy(dense), devices, balance="auto"))
    assert max(even) - min(even) <= 1 and even[limited] > 1, even  # the limit rules this cut out

    split = torch_mp.split(copy.deepcopy(dense), devices, balance="auto", max_memory=max_memory)
    assert cut(split) == counts
    x = torch.randn(5, 64)
    torch.testing.assert_close(split(x), dense(x), rtol=1e-5, atol=1e-6)
