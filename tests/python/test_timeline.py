"""train_step(..., timeline=True): every stage's F and B of every micro-batch recorded once, in the
schedule's order, with sensible times; the same loss and gradients as without it; the picture a
valid PNG; in one process and on 2 Gloo ranks."""
import copy
import os
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import torch_mp
from torch_mp import _C
from torch_mp._pipelining.timeline import Recorder
from distributed import run_ranks
from models import GPT, mlp

SLACK = 1e-6  # seconds: two stamps of one instant, taken one after the other


def gpt_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def png_size(path: str):
    """(width, height) of a PNG file, after checking its signature and header chunk."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_png(path: str) -> None:
    width, height = png_size(path)
    assert 300 <= width <= 5000 and 100 <= height <= 3000, (width, height)
    assert os.path.getsize(path) > 5000  # boxes, labels and a legend, not an empty canvas


def compute(timeline, stage, kind):
    return [e for e in timeline.events if e.stage == stage and e.kind == kind]


def assert_every_action_once(timeline, num_stages: int, count: int) -> None:
    for stage in range(num_stages):
        for kind in ("F", "B"):
            found = sorted(e.micro_batch for e in compute(timeline, stage, kind))
            assert found == list(range(count)), (stage, kind, found)
    for e in timeline.events:
        assert 0 <= e.start <= e.end + SLACK, e


def assert_summary_adds_up(timeline) -> None:
    first, last = timeline.span
    assert last > first >= 0
    busy, idle = timeline.busy(), timeline.idle()
    assert set(busy) == set(range(timeline.num_stages))
    for lane, seconds in idle.items():
        assert -SLACK <= seconds <= last - first + SLACK
    assert 0.0 <= timeline.bubble < 1.0
    expected = sum(idle.values()) / (len(idle) * (last - first))
    assert timeline.bubble == pytest.approx(expected)
    assert timeline.summary().startswith(timeline.schedule)


# --- one process ------------------------------------------------------------------------------

def _local_step(make, inputs, target, loss_fn, schedule, chunks, checkpoint, timeline):
    model = torch_mp.split(make(), ["cpu", "cpu", "cpu"], chunks=chunks, schedule=schedule, checkpoint=checkpoint)
    loss = model.train_step(inputs, target=target, loss_fn=loss_fn, timeline=timeline)
    return model, loss, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("case, checkpoint", [("mlp", "never"), ("mlp", "always"), ("gpt", "except_last")])
def test_split_timeline_records_every_action_in_schedule_order(case, checkpoint, schedule, tmp_path):
    torch.manual_seed(0)
    if case == "mlp":
        dense, inputs, target, loss_fn = mlp((16, 32, 32, 32, 32, 32, 8)), torch.randn(10, 16), torch.randn(10, 8), \
            F.mse_loss
    else:
        dense, inputs, target, loss_fn = GPT(depth=3), torch.randint(0, 97, (5, 16)), torch.randint(0, 97, (5, 16)), \
            gpt_loss
    chunks, stages = 5, 3
    plain, plain_loss, plain_grads = _local_step(lambda: copy.deepcopy(dense), inputs, target, loss_fn, schedule,
                                                 chunks, checkpoint, False)
    assert plain.last_timeline is None
    model, loss, grads = _local_step(lambda: copy.deepcopy(dense), inputs, target, loss_fn, schedule, chunks,
                                     checkpoint, True)
    assert torch.equal(loss, plain_loss)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name

    timeline = model.last_timeline
    assert isinstance(timeline, torch_mp.Timeline)
    assert (timeline.schedule, timeline.num_stages, timeline.num_micro_batches, timeline.lanes) == \
        (schedule, stages, chunks, "stage")
    assert all(e.rank is None and e.kind in ("F", "B") for e in timeline.events)
    assert_every_action_once(timeline, stages, chunks)
    order = _C._pipeline_schedule(schedule, stages, 1, chunks)
    for stage in range(stages):
        expected = [("B" if backward else "F", m) for backward, _, m in order[stage]]
        actions = timeline.actions(stage)
        if stage == stages - 1:  # every action of the last stage waits for its turn
            assert actions == expected
        for kind in ("F", "B"):  # earlier stages' backwards run when the last stage's reach them
            assert [a for a in actions if a[0] == kind] == [a for a in expected if a[0] == kind]
        forwards = compute(timeline, stage, "F")
        for before, after in zip(forwards, forwards[1:]):  # one forward at a time per stage
            assert before.end <= after.start + SLACK
    for m in range(chunks):  # a micro-batch flows forward through the stages, and back
        f = {e.stage: e for e in timeline.events if e.micro_batch == m and e.kind == "F"}
        b = {e.stage: e for e in timeline.events if e.micro_batch == m and e.kind == "B"}
        for stage in range(1, stages):
            assert f[stage - 1].end <= f[stage].start + SLACK
            assert b[stage].end <= b[stage - 1].start + SLACK
        assert f[stages - 1].end <= b[stages - 1].start + SLACK
    assert_summary_adds_up(timeline)

    path = tmp_path / "timeline.png"
    torch_mp.plot_timeline(timeline, path)
    assert_png(str(path))


def test_split_without_timeline_records_nothing(monkeypatch):
    """timeline=False makes no recorder, and a step keeps the last recorded timeline."""
    torch.manual_seed(0)
    model = torch_mp.split(mlp(), ["cpu", "cpu"], chunks=3)
    inputs, target = torch.randn(6, 16), torch.randn(6, 8)
    model.train_step(inputs, target=target, loss_fn=F.mse_loss, timeline=True)
    recorded = model.last_timeline

    def refuse(*args, **kwargs):
        raise AssertionError("a recorder was made without timeline=True")

    monkeypatch.setattr("torch_mp._pipelining.pipeline.Recorder", refuse)
    model.train_step(inputs, target=target, loss_fn=F.mse_loss)
    assert model.last_timeline is recorded


def test_split_timeline_leaves_no_hooks_on_inputs():
    """Gradient hooks watch the tensors a stage receives; on a leaf the caller passed into a later
    stage they are removed after the step."""
    torch.manual_seed(0)

    class Skip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

        def forward(self, x, bias):
            return self.layers[1](self.layers[0](x) + bias)

    model = torch_mp.split(Skip(), ["cpu", "cpu"], chunks=2, chunk_spec={"bias": None})
    bias = torch.randn(8, requires_grad=True)
    for _ in range(2):
        model.train_step(torch.randn(4, 8), bias, target=torch.randn(4, 8), loss_fn=F.mse_loss, timeline=True)
    assert not bias._backward_hooks
    assert_every_action_once(model.last_timeline, 2, 2)


def test_timeline_bad_input(tmp_path):
    torch.manual_seed(0)
    model = torch_mp.split(mlp(), ["cpu", "cpu"], chunks=2)
    inputs, target = torch.randn(4, 16), torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"timeline='yes'\); expected True or False"):
        model.train_step(inputs, target=target, loss_fn=F.mse_loss, timeline="yes")
    with pytest.raises(TypeError, match="expected timeline to be a torch_mp.Timeline .* got NoneType"):
        torch_mp.plot_timeline(model.last_timeline, tmp_path / "t.png")
    model.train_step(inputs, target=target, loss_fn=F.mse_loss, timeline=True)
    timeline = model.last_timeline
    with pytest.raises(TypeError, match="expected path to be a str or os.PathLike, got int"):
        torch_mp.plot_timeline(timeline, 3)
    with pytest.raises(ValueError, match=r"path = '.*t.svg'; expected a file name ending in .png"):
        torch_mp.plot_timeline(timeline, tmp_path / "t.svg")
    with pytest.raises(FileNotFoundError, match="plot_timeline: cannot write path = .*missing"):
        torch_mp.plot_timeline(timeline, tmp_path / "missing" / "t.png")
    if sys.platform.startswith("linux"):  # not writable, even for root
        with pytest.raises(PermissionError, match="plot_timeline: cannot write path = '/sys/t.png'"):
            torch_mp.plot_timeline(timeline, "/sys/t.png")
    with pytest.raises(ValueError, match="has no events"):
        torch_mp.plot_timeline(torch_mp.Timeline([], "1f1b", 2, 2), tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()  # nothing half-written
    with pytest.raises(ValueError, match="lanes = 'device'"):
        torch_mp.Timeline([], "1f1b", 2, 2, lanes="device")
    unsplit = torch_mp.split(mlp(), ["cpu", "cpu"])
    with pytest.raises(ValueError, match="runs no schedule"):
        unsplit.train_step(inputs, target=target, loss_fn=F.mse_loss, timeline=True)


def test_import_does_not_load_matplotlib():
    code = "import sys, torch_mp; assert 'matplotlib' not in sys.modules, 'import torch_mp loaded matplotlib'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_timeline_summary_numbers():
    """Busy, waiting and idle seconds and the bubble of a hand-made timeline of two ranks."""
    E = torch_mp.TimelineEvent
    events = [E(0, 0, "F", 0, 0.0, 1.0), E(0, 0, "F", 1, 1.0, 2.0), E(0, 0, "B", 0, 4.0, 6.0),
              E(0, 0, "recv-wait", 0, 4.0, 5.0), E(0, 0, "B", 1, 6.0, 7.0),
              E(1, 1, "F", 0, 0.0, 2.0), E(1, 1, "recv-wait", 0, 0.0, 1.0), E(1, 1, "B", 0, 2.0, 4.0),
              E(1, 1, "F", 1, 4.0, 5.0), E(1, 1, "W", 0, 5.0, 6.0), E(1, 1, "B", 1, 5.5, 6.0)]
    timeline = torch_mp.Timeline(events, "zb_h1", 2, 2, lanes="rank")
    assert timeline.span == (0.0, 7.0)
    assert timeline.busy() == {0: 4.0, 1: 5.0}  # overlapping W and B count once; waits do not count
    assert timeline.waiting() == {0: 1.0, 1: 1.0}
    assert timeline.idle() == {0: 3.0, 1: 2.0}
    assert timeline.bubble == pytest.approx(5.0 / 14.0)
    assert timeline.actions(1) == [("F", 0), ("B", 0), ("F", 1), ("W", 0), ("B", 1)]


_interval = st.tuples(st.integers(0, 40), st.integers(0, 8)).map(lambda t: (t[0], t[0] + t[1]))
_event = st.tuples(st.integers(0, 3), st.sampled_from(["F", "B", "W", "recv-wait"]), _interval)


@settings(max_examples=200, deadline=None)
@given(st.lists(_event, min_size=1, max_size=12), st.sampled_from(["stage", "rank"]))
def test_timeline_summary_counts_time_cells(drawn, lanes):
    """busy, waiting, idle and the bubble against counting the unit time cells each interval
    covers (integer times), for overlapping actions and waits; stage s on rank s % 2."""
    events = [torch_mp.TimelineEvent(stage, stage % 2, kind, 0, float(a), float(b)) for stage, kind, (a, b) in drawn]
    timeline = torch_mp.Timeline(events, "1f1b", 4, 1, lanes=lanes)
    first, last = int(min(a for _, _, (a, _) in drawn)), int(max(b for _, _, (_, b) in drawn))

    def cells(keep, kinds):
        return {t for stage, kind, (a, b) in drawn if keep(stage) and kind in kinds for t in range(a, b)}

    def lane_of(stage):
        return stage % 2 if lanes == "rank" else stage

    for stage in range(4):
        waits = cells(lambda s: lane_of(s) == lane_of(stage), ["recv-wait"])
        assert timeline.busy()[stage] == len(cells(lambda s: s == stage, "FBW") - waits)
        assert timeline.waiting()[stage] == len(cells(lambda s: s == stage, ["recv-wait"]))
    idle = {}
    for lane in {lane_of(stage) for stage, _, _ in drawn}:
        working = cells(lambda s: lane_of(s) == lane, "FBW") - cells(lambda s: lane_of(s) == lane, ["recv-wait"])
        idle[lane] = (last - first) - len(working)
    assert timeline.idle() == idle
    expected = sum(idle.values()) / (len(idle) * (last - first)) if last > first else 0.0
    assert timeline.bubble == pytest.approx(expected)
    assert 0.0 <= timeline.bubble <= 1.0


def test_recorder_names_the_kinds_of_actions():
    """F and B from a schedule's (backward, stage, micro-batch); W from a kind 2 (zero-bubble)."""
    recorder = Recorder(0, [torch.device("cpu")] * 2)
    for kind in (False, True, 0, 1, 2, "W"):
        recorder.record(kind, 1, 0, recorder.now())
    assert [e.kind for e in recorder.events] == ["F", "B", "F", "B", "W", "W"]
    assert all(e.rank == 0 and e.stage == 1 and e.start <= e.end for e in recorder.events)


# --- two ranks --------------------------------------------------------------------------------

def _ranks_timeline(rank, world, folder):
    for schedule, stages_per_rank in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)):
        chunks, stages = 4, world * stages_per_rank
        torch.manual_seed(0)
        dense = GPT(depth=stages)
        inputs, target = torch.randint(0, 97, (8, 16)), torch.randint(0, 97, (8, 16))
        runs = []
        for timeline in (False, True):
            model = torch_mp.pipeline(copy.deepcopy(dense), chunks=chunks, schedule=schedule,
                                      stages_per_rank=stages_per_rank)
            loss = model.train_step(inputs, target=target, loss_fn=gpt_loss, timeline=timeline)
            runs.append((model, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (plain, plain_loss, plain_grads), (model, loss, grads) = runs
        assert plain.last_timeline is None
        assert torch.equal(loss, plain_loss)
        assert plain_grads.keys() == grads.keys() and grads
        for name, grad in plain_grads.items():
            assert torch.equal(grads[name], grad), name

        timeline = model.last_timeline
        assert (timeline.schedule, timeline.num_stages, timeline.num_micro_batches, timeline.lanes) == \
            (schedule, stages, chunks, "rank")
        assert_every_action_once(timeline, stages, chunks)
        order = _C._pipeline_schedule(schedule, world, stages_per_rank, chunks)
        for r in range(world):  # every rank's actions as its list says, one after another
            done = [e for e in timeline.events if e.rank == r and e.kind in ("F", "B")]
            assert [(e.kind, e.stage, e.micro_batch) for e in done] == \
                [("B" if backward else "F", stage, m) for backward, stage, m in order[r]]
            for before, after in zip(done, done[1:]):
                assert before.end <= after.start + SLACK
            assert all(e.stage % world == r for e in timeline.events if e.rank == r)
        waits = [e for e in timeline.events if e.kind == "recv-wait"]
        assert {e.rank for e in waits} == set(range(world))  # every rank receives something
        for wait in waits:  # inside the action that needed the message, on its stage
            assert any(e.rank == wait.rank and e.stage == wait.stage and e.micro_batch == wait.micro_batch
                       and e.start - SLACK <= wait.start and wait.end <= e.end + SLACK
                       for e in timeline.events if e.kind in ("F", "B")), wait
        assert_summary_adds_up(timeline)
        # Every rank holds the same timeline.
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, timeline.events)
        assert all(events == gathered[0] for events in gathered)
        if rank == 0:
            path = os.path.join(folder, f"{schedule}.png")
            torch_mp.plot_timeline(timeline, path)
            assert_png(path)


def _disagreeing(rank, world):
    torch.manual_seed(0)
    model = torch_mp.pipeline(mlp(), chunks=2, timeout=20)
    with pytest.raises(ValueError, match=r"ranks disagree before running the schedule \(timeline: rank 0 has "
                                         r"True, rank 1 has False\)"):
        model.train_step(torch.randn(4, 16), target=torch.randn(4, 8), loss_fn=F.mse_loss, timeline=rank == 0)
    assert model.last_timeline is None


def test_pipeline_ranks_that_disagree_on_timeline_fail_fast():
    run_ranks(2, _disagreeing, timeout=120)


def test_pipeline_timeline_on_two_ranks(tmp_path):
    run_ranks(2, _ranks_timeline, str(tmp_path), timeout=240)
    assert sorted(os.listdir(tmp_path)) == ["1f1b.png", "gpipe.png", "interleaved_1f1b.png"]
