"""Pipeline schedules from Python: every shape of the grid gives a schedule the checker accepts, and
interleaved 1F1B on four Gloo ranks with 16 micro-batches matches the dense model."""
import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from models import GPT, mlp
from test_pipeline import assert_step_matches, gpt_loss
from torch_mp import _C

KINDS = ("gpipe", "1f1b", "interleaved_1f1b")


def test_every_shape_gives_a_valid_schedule():
    """Ranks 1-8, stages per rank 1-4 (1F1B: 1), micro-batches 1-32, every kind: the schedule runs
    every forward and backward once, on the rank holding its stage, and passes the checker."""
    shapes = 0
    for kind in KINDS:
        for ranks in range(1, 9):
            for per_rank in range(1, 2 if kind == "1f1b" else 5):
                for chunks in range(1, 33):
                    where = f"{kind} on {ranks} ranks x {per_rank} stages, {chunks} micro-batches"
                    schedule = _C._pipeline_schedule(kind, ranks, per_rank, chunks)
                    _C._check_pipeline_schedule(schedule, ranks * per_rank, chunks)
                    assert len(schedule) == ranks, where
                    for rank, actions in enumerate(schedule):
                        expected = {(backward, stage, m) for backward in (False, True)
                                    for stage in range(rank, ranks * per_rank, ranks) for m in range(chunks)}
                        assert len(actions) == len(expected) and set(actions) == expected, where
                    shapes += 1
    assert shapes == 8 * 32 * (4 + 1 + 4)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), ranks=st.integers(1, 16), per_rank=st.integers(1, 6), chunks=st.integers(1, 80))
def test_larger_shapes_give_valid_schedules(kind, ranks, per_rank, chunks):
    """Beyond the grid: up to 16 ranks, 6 stages per rank and 80 micro-batches. A rank keeps at most
    the warm-up plus one micro-batch in flight (interleaved: Megatron-Core's warm-up with the largest
    micro-batch group, num_ranks + chunks % num_ranks, or all chunks when fewer than 2 * num_ranks)."""
    per_rank = 1 if kind == "1f1b" else per_rank
    schedule = _C._pipeline_schedule(kind, ranks, per_rank, chunks)
    _C._check_pipeline_schedule(schedule, ranks * per_rank, chunks)
    group = chunks if chunks < 2 * ranks else ranks + chunks % ranks
    for rank, actions in enumerate(schedule):
        in_flight, most = 0, 0
        for backward, _, _ in actions:
            in_flight += -1 if backward else 1
            most = max(most, in_flight)
        if kind == "gpipe":
            bound = per_rank * chunks
        elif per_rank == 1:
            bound = ranks - rank
        else:
            bound = (ranks - rank - 1) * 2 + (per_rank - 1) * group + 1
        assert most == min(bound, per_rank * chunks), (rank, most, bound)


def _interleaved_parity(rank, world):
    """8 stages on 4 ranks, 16 micro-batches of uneven sizes (a batch of 20: four of 2, twelve of 1),
    for an MLP and a GPT whose head is tied to the embedding across the first and last rank."""
    cases = [(mlp((16,) + (32,) * 7 + (8,)), torch.randn(20, 16), torch.randn(20, 8), F.mse_loss),
             (GPT(depth=8), torch.randint(0, 97, (20, 16)), torch.randint(0, 97, (20, 16)), gpt_loss)]
    for dense, inputs, target, loss_fn in cases:
        piped = torch_mp.pipeline(copy.deepcopy(dense), chunks=16, schedule="interleaved_1f1b", stages_per_rank=2)
        assert_step_matches(piped, dense, inputs, target, loss_fn)


def test_interleaved_1f1b_on_four_ranks_with_16_micro_batches_matches_dense():
    run_ranks(4, _interleaved_parity, timeout=240)
