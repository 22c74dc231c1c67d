"""Pipeline schedules from Python: every shape of the grid gives a schedule the checker accepts, and
interleaved 1F1B on four Gloo ranks with 16 micro-batches matches the dense model."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from models import GPT, mlp
from test_pipeline import assert_step_matches, gpt_loss
from torch_mp import _C

KINDS = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv")


def stages_per_rank_of(kind):
    """The stages per rank each kind runs: 1F1B and ZB-H1 one, ZB-V two (a V), the others 1-4."""
    return {"1f1b": range(1, 2), "zb_h1": range(1, 2), "zbv": range(2, 3)}.get(kind, range(1, 5))


def test_every_shape_gives_a_valid_schedule():
    """Ranks 1-8, the stages per rank of each kind, micro-batches 1-32, every kind: the schedule
    runs every forward and backward (and, in the zero-bubble ones, every W) once, on the rank the
    kind places the stage on, and passes the checker."""
    shapes = 0
    for kind in KINDS:
        kinds = (0, 1, 2) if kind in ("zb_h1", "zbv") else (0, 1)
        for ranks in range(1, 9):
            for per_rank in stages_per_rank_of(kind):
                placement = _C._pipeline_stage_ranks(kind, ranks, per_rank)
                for chunks in range(1, 33):
                    where = f"{kind} on {ranks} ranks x {per_rank} stages, {chunks} micro-batches"
                    schedule = _C._pipeline_schedule(kind, ranks, per_rank, chunks)
                    _C._check_pipeline_schedule(schedule, placement, chunks)
                    assert len(schedule) == ranks, where
                    for rank, actions in enumerate(schedule):
                        expected = {(k, stage, m) for k in kinds for stage in range(ranks * per_rank)
                                    if placement[stage] == rank for m in range(chunks)}
                        assert len(actions) == len(expected) and set(actions) == expected, where
                    shapes += 1
    assert shapes == 8 * 32 * (4 + 1 + 4 + 1 + 1)


def test_zbv_places_stages_in_a_v_and_prints_actions():
    assert _C._pipeline_stage_ranks("zbv", 3, 2) == [0, 1, 2, 2, 1, 0]
    assert _C._pipeline_stage_ranks("interleaved_1f1b", 3, 2) == [0, 1, 2, 0, 1, 2]
    names = [_C._pipeline_action_name(*action) for action in _C._pipeline_schedule("zbv", 2, 2, 4)[0]]
    assert names[:6] == ["0F0", "0F1", "0F2", "3F0", "3B0", "3W0"]
    with pytest.raises(ValueError, match="rank 0 runs F\\(stage 3, micro-batch 0\\) but stage 3 lives on rank 1"):
        _C._check_pipeline_schedule(_C._pipeline_schedule("zbv", 2, 2, 4), 4, 4)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(KINDS), ranks=st.integers(1, 16), per_rank=st.integers(1, 6), chunks=st.integers(1, 80))
def test_larger_shapes_give_valid_schedules(kind, ranks, per_rank, chunks):
    """Beyond the grid: up to 16 ranks, 6 stages per rank and 80 micro-batches. A rank keeps at most
    the warm-up plus one micro-batch in flight (interleaved: Megatron-Core's warm-up with the largest
    micro-batch group, num_ranks + chunks % num_ranks, or all chunks when fewer than 2 * num_ranks).
    In the zero-bubble schedules a micro-batch is in flight until its W: ZB-H1 holds as many as
    1F1B's first rank (num_ranks), ZB-V twice as many of its half-size stages."""
    per_rank = {"1f1b": 1, "zb_h1": 1, "zbv": 2}.get(kind, per_rank)
    schedule = _C._pipeline_schedule(kind, ranks, per_rank, chunks)
    _C._check_pipeline_schedule(schedule, _C._pipeline_stage_ranks(kind, ranks, per_rank), chunks)
    group = chunks if chunks < 2 * ranks else ranks + chunks % ranks
    release = 2 if kind in ("zb_h1", "zbv") else 1
    for rank, actions in enumerate(schedule):
        in_flight, most = 0, 0
        for action_kind, _, _ in actions:
            in_flight += 1 if action_kind == 0 else -1 if action_kind == release else 0
            most = max(most, in_flight)
        if kind == "gpipe":
            bound = per_rank * chunks
        elif kind == "zb_h1":
            bound = ranks
        elif kind == "zbv":
            bound = 2 * ranks
        elif per_rank == 1:
            bound = ranks - rank
        else:
            bound = (ranks - rank - 1) * 2 + (per_rank - 1) * group + 1
        if kind in ("zb_h1", "zbv"):
            assert most <= min(bound, per_rank * chunks), (rank, most, bound)
        else:
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
