"""torch_mp.plan and torch_mp.parallelize: the cost model's arithmetic (the bubble replayed from the
C++ schedules against the closed forms, memory sums), the search (deterministic for a fixed cost
table, never an infeasible layout, a clear refusal naming the smallest memory), and applied plans
against the dense model (tiny Llama, 4 Gloo ranks, two memory limits giving different layouts).
``plan(measure=)`` runs layouts for real, and a recomputing pp 2 x tp 2 plan is applied: marked
``planner_full``, run by ``make test-planner``."""
import dataclasses
import os
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_mp
from torch_mp import _C
from torch_mp._planner.costs import CostTable, Line, measure_costs
from torch_mp._planner.model import Layout, peak_bytes, simulate, step_seconds
from torch_mp._planner.plans import size
from distributed import run_ranks
from tensors import expect_dense_step

transformers = pytest.importorskip("transformers")

VOCAB = 64


def table(layers=4, forward=1e-3, backward=2e-3, param=1 << 20, activation=1 << 12, heads=4, **changes):
    fields = dict(
        layers=tuple(f"layers.{i}" for i in range(layers)),
        forward=(Line(0.0, forward),) * layers, backward=(Line(0.0, backward),) * layers,
        outside_forward=Line(0.0, 0.0), outside_backward=Line(0.0, 0.0),
        param_bytes=(param,) * layers, sharded_param_bytes=(param,) * layers,
        first_param_bytes=0, first_sharded_bytes=0, last_param_bytes=0, last_sharded_bytes=0,
        activation_bytes=(activation,) * layers, outside_activation_bytes=0, boundary_bytes=256,
        alpha_s=1e-5, beta_s_per_byte=1e-10, tp_must_divide=(heads,), sequence_parallel=True)
    fields.update(changes)
    return CostTable(**fields)


# --- the cost model -----------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,chunks", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_simulated_schedule_has_the_closed_form_bubble(schedule, stages, chunks):
    """Equal stages, free sends: GPipe and 1F1B take (chunks + stages - 1) x (F + B) (Huang et al.
    2019; Narayanan et al. 2019), the schedule replayed from the C++ action lists."""
    makespan = simulate(schedule, stages, chunks, {0: [1.0] * stages, 1: [2.0] * stages, 2: [0.0] * stages}, 0.0)
    assert makespan == pytest.approx((chunks + stages - 1) * 3.0)


def test_zero_bubble_h1_is_shorter_than_1f1b():
    """ZB-H1 fills the bubble with weight gradients: with B = W = 1 and F = 1 on 4 stages and 8
    micro-batches, 1F1B takes 33 and ZB-H1 (Qi et al., 2024: bubble (p - 1)(F + B - W)) 8 x 3 + 3 = 27."""
    durations = {0: [1.0] * 4, 1: [1.0] * 4, 2: [1.0] * 4}
    assert simulate("1f1b", 4, 8, {0: [1.0] * 4, 1: [2.0] * 4, 2: [0.0] * 4}, 0.0) == pytest.approx(33.0)
    assert simulate("zb_h1", 4, 8, durations, 0.0) == pytest.approx(27.0)


@pytest.mark.parametrize("stages,chunks", [(2, 2), (2, 4), (3, 6), (4, 4), (4, 8)])
def test_simulated_interleaved_1f1b_has_the_closed_form_bubble(stages, chunks):
    """Two stages per rank, F = 1 and B = 2 each, chunks a multiple of the ranks: 2 chunks x 3 per
    rank plus a bubble of (p - 1) x 3, a half of 1F1B's (Narayanan et al. 2021, section 2.2: the
    bubble divided by the stages per rank)."""
    twice = 2 * stages
    makespan = simulate("interleaved_1f1b", stages, chunks, {0: [1.0] * twice, 1: [2.0] * twice, 2: [0.0] * twice},
                        0.0)
    assert makespan == pytest.approx((2 * chunks + stages - 1) * 3.0)


@pytest.mark.parametrize("stages,chunks", [(2, 4), (2, 8), (3, 6), (3, 8), (4, 8)])
def test_simulated_zero_bubble_v_leaves_only_the_warm_up(stages, chunks):
    """ZB-V (Qi et al., ICLR 2024, section 6), F = B = W = 1 per stage, two stages per rank in a V,
    at least 2 p micro-batches: each rank's 6 m of work and the (p - 1) forwards before the last
    rank's first; shorter than ZB-H1 and 1F1B doing the same work on whole stages."""
    twice = 2 * stages
    makespan = simulate("zbv", stages, chunks, {kind: [1.0] * twice for kind in (0, 1, 2)}, 0.0)
    assert makespan == pytest.approx(6 * chunks + stages - 1)
    assert makespan < simulate("zb_h1", stages, chunks, {kind: [2.0] * stages for kind in (0, 1, 2)}, 0.0)
    assert makespan < simulate("1f1b", stages, chunks, {0: [2.0] * stages, 1: [4.0] * stages, 2: [0.0] * stages}, 0.0)


def test_two_stages_per_rank_hold_the_activations_their_schedule_keeps():
    """8 layers without parameters on 4 ranks, 8 micro-batches of one row, A bytes a layer: 1F1B
    (2 layers a stage) holds 4, 3, 2, 1 micro-batches of 2 A; ZB-V (1 layer a stage, two per rank
    in a V) holds 8 A on every rank (Qi et al. 2024: 1F1B's first rank's, on every rank);
    interleaved 1F1B 11 A on the first rank, p (1 + (p - 1) / (p v)) stages' worth (Narayanan
    et al. 2021, section 2.2), down to 5 A on the last."""
    activation = 1000
    # boundary_bytes 0: no received inputs' gradients kept (their own term), the in-flight counts alone
    costs = table(layers=8, param=0, activation=activation, boundary_bytes=0)
    one_f_one_b = Layout(4, 1, 1, "1f1b", 8, "never", False, (2, 2, 2, 2), 8)
    assert peak_bytes(costs, one_f_one_b) == [8 * activation, 6 * activation, 4 * activation, 2 * activation]
    zbv = Layout(4, 1, 1, "zbv", 8, "never", False, (1,) * 8, 8)
    assert peak_bytes(costs, zbv) == [8 * activation] * 4
    interleaved = dataclasses.replace(zbv, schedule="interleaved_1f1b")
    assert peak_bytes(costs, interleaved) == [11 * activation, 9 * activation, 7 * activation, 5 * activation]


def test_search_offers_two_stages_per_rank():
    """Interleaved 1F1B and ZB-V are candidates with 2 pp stages (pp at most half the layers); with
    1 MiB a rank and no tensor parallel only pp 4 fits, where ZB-V, the shortest bubble, is chosen."""
    costs = table(layers=8, param=1 << 16, activation=1 << 10)
    plan = torch_mp.plan(torch.nn.Module(), 4, "1GiB", 16, costs=costs, schedules=("1f1b", "zb_h1", "zbv",
                                                                                        "interleaved_1f1b"))
    every = (plan.chosen,) + plan.alternatives + plan.rejected
    for schedule in ("zbv", "interleaved_1f1b"):
        found = [c.layout for c in every if c.layout.schedule == schedule]
        assert found and all(len(layout.balance) == 2 * layout.pp and sum(layout.balance) == 8 for layout in found)
    pipelined = torch_mp.plan(torch.nn.Module(), 4, "1MiB", 16, costs=dataclasses.replace(costs, tp_must_divide=(1,)),
                              schedules=("1f1b", "zb_h1", "zbv"), max_chunks=16)
    assert pipelined.schedule == "zbv" and pipelined.pp == 4, str(pipelined)


def test_peak_memory_is_the_largest_phase():
    """4 layers of 1 MiB fp32 on pp 2: each stage holds 2 MiB of parameters, 2 of gradients, 4 of
    AdamW state; 1F1B with 4 micro-batches of 2 rows keeps 2 in flight on stage 0 and 1 on stage 1
    with the gradients (a forward runs after a backward), and stage 1 the gradients of 3 finished
    micro-batches' received inputs (256 bytes a row); GPipe runs every forward first: 4 in flight
    without gradients or, at the second backward's start, 3 with them and one finished
    micro-batch's input gradient; checkpointing keeps each micro-batch's stage input and one
    micro-batch's saved tensors. A backward that adds to existing gradients has half a layer's
    weight gradients in flight (``ACCUMULATED``): 0.5 MiB."""
    costs = table()
    mib = 1 << 20
    layout = Layout(2, 1, 1, "1f1b", 4, "never", False, (2, 2), 8)
    one = 2 * 4096 * 2  # two layers' saved bytes, 2 rows
    inputs = 3 * 256 * 2
    accumulated = mib // 2
    assert peak_bytes(costs, layout) == [8 * mib + accumulated + 2 * one, 8 * mib + accumulated + one + inputs]
    assert peak_bytes(costs, dataclasses.replace(layout, schedule="gpipe")) == \
        [8 * mib + accumulated + 3 * one, 8 * mib + accumulated + 3 * one + inputs // 3]
    assert peak_bytes(costs, dataclasses.replace(layout, checkpoint="always")) == \
        [8 * mib + accumulated + 2 * 256 * 2 + one, 8 * mib + accumulated + 256 * 2 + one + inputs]
    # One micro-batch: its backward makes every gradient while freeing fewer activation bytes, so the
    # step's end holds the most (each gradient, the last stage's kept input gradient); the
    # gradients were left out, 0.75 of the measured on the benchmark's MLP at pp 4 and tp 4.
    assert peak_bytes(costs, dataclasses.replace(layout, chunks=1)) == [8 * mib, 8 * mib + 8 * 256]
    # Activations larger than the gradients: the first backward's start, before any gradient.
    big = table(activation=1 << 20)
    assert peak_bytes(big, dataclasses.replace(layout, schedule="gpipe")) == [6 * mib + 4 * 2 * 2 * mib] * 2
    # The data-parallel all-reduce runs after the backwards: the gradients and the flattened copy it
    # reduces in place, no activations. Tensor parallel divides matrices.
    assert peak_bytes(costs, Layout(1, 1, 2, "1f1b", 1, "never", False, (4,), 8))[0] == 16 * mib + 4 * mib
    assert peak_bytes(costs, Layout(1, 2, 1, "1f1b", 1, "never", False, (4,), 8))[0] < 8 * mib + 4 * 8 * 4096


def test_step_time_counts_the_tensor_parallel_all_reduces():
    costs = table(layers=2)
    plain = step_seconds(costs, Layout(1, 1, 1, "1f1b", 1, "never", False, (2,), 8))
    assert plain == pytest.approx(2 * 8 * 3e-3)
    tp2 = step_seconds(costs, Layout(1, 2, 1, "1f1b", 1, "never", False, (2,), 8))
    # Half the compute, then 2 layers x 2 all-reduces, forward and backward, of 8 rows x 256 bytes.
    assert tp2 == pytest.approx(plain / 2 + 2 * 2 * 2 * costs.all_reduce_s(8 * 256, 2, "tp"))


def test_ranks_sharing_cores_compute_faster_while_others_wait():
    """Two pipeline ranks on one core (host_cores=1, host_ranks=2), the table measured with both
    computing at once: a rank alone computes twice as fast. GPipe, F = 1 and B = 2: one
    micro-batch runs one action at a time (3 instead of 6); with two, the actions that overlap run
    at the table's speed (6 instead of 9: F(0,0) 0.5 alone, F(0,1) and F(1,0) together to 1.5,
    F(1,1) to 2, B(1,0) to 3, B(0,0) and B(1,1) together to 5, B(0,1) alone to 6)."""
    durations = {0: [1.0] * 2, 1: [2.0] * 2, 2: [0.0] * 2}
    assert simulate("gpipe", 2, 1, durations, 0.0, [2.0, 1.0]) == pytest.approx(3.0)
    assert simulate("gpipe", 2, 2, durations, 0.0, [2.0, 1.0]) == pytest.approx(6.0)
    assert simulate("gpipe", 2, 2, durations, 0.0, [1.0, 1.0]) == simulate("gpipe", 2, 2, durations, 0.0) == 9.0
    with pytest.raises(ValueError, match="speedup has 1 entries"):
        simulate("gpipe", 2, 2, durations, 0.0, [2.0])
    # step_seconds: the compute halves, the sends (over the "pp" link) do not.
    layout = Layout(2, 1, 1, "1f1b", 1, "never", False, (1, 1), 8)
    alone = step_seconds(table(layers=2), layout)
    shared = step_seconds(table(layers=2, host_cores=1.0, host_ranks=2), layout)
    sends = 2 * table(layers=2).send_s(8 * 256)
    assert shared == pytest.approx((alone - sends) / 2 + sends)
    # As many cores as ranks: no sharing; without a pipeline every rank computes at once.
    assert step_seconds(table(layers=2, host_cores=2.0, host_ranks=2), layout) == alone
    dp2 = Layout(1, 1, 2, "1f1b", 1, "never", False, (2,), 8)
    assert step_seconds(table(layers=2, host_cores=1.0, host_ranks=2), dp2) == step_seconds(table(layers=2), dp2)
    with pytest.raises(ValueError, match="host_cores"):
        step_seconds(table(layers=2, host_cores=-1.0), layout)


def test_each_mesh_dim_costs_over_its_own_link():
    """Past one node, tensor parallel's all-reduces, data parallel's gradient average and the
    pipeline's sends go over different links: each term of the step time takes its dim's
    (alpha, beta), the others the fitted one."""
    costs = table(layers=2, tp_link=(1e-6, 1e-12), dp_link=(1e-2, 1e-8), pp_link=(0.5, 1e-7))
    plain = 2 * 8 * 3e-3
    tp2 = step_seconds(costs, Layout(1, 2, 1, "1f1b", 1, "never", False, (2,), 8))
    # 2 layers x 2 all-reduces, forward and backward, of 8 rows x 256 bytes over 2 ranks (ring: 2
    # steps of half the bytes, each paying the latency).
    assert tp2 == pytest.approx(plain / 2 + 8 * 2 * (1e-6 + 1e-12 * 8 * 256 / 2))
    dp2 = step_seconds(costs, Layout(1, 1, 2, "1f1b", 1, "never", False, (2,), 8))
    assert dp2 == pytest.approx(plain / 2 + 2 * (1e-2 + 1e-8 * (2 << 20) / 2))
    pp2 = step_seconds(costs, Layout(2, 1, 1, "1f1b", 1, "never", False, (1, 1), 8))
    assert pp2 == pytest.approx(plain + 2 * (0.5 + 1e-7 * 8 * 256))  # one send forward, one back
    fitted = table(layers=2)
    assert fitted.link("tp") == fitted.link("dp") == fitted.link("pp") == (1e-5, 1e-10)


def test_plan_takes_a_link_per_mesh_dim():
    """8 layers of 1 MiB at 64 MiB a rank: over one link with 0.1 ms latency plain data parallel
    is the pick (test_plan_prefers_more_memory_saving_layouts_as_memory_shrinks); with data parallel
    across nodes (10 ms, 100 MB/s) and tensor parallel within one (1 us, 100 GB/s), tensor parallel
    4. ``collectives=`` as a dict by dim sets the links of a ``costs=`` table too, and of a measured
    one (the fitted link for the dims it leaves out)."""
    costs = table(layers=8, alpha_s=1e-4)
    links = {"tp": (1e-6, 1e-11), "dp": (1e-2, 1e-8)}
    across = torch_mp.plan(torch.nn.Module(), 4, "64MiB", 16, costs=costs, collectives=links)
    assert (across.pp, across.tp, across.dp) == (1, 4, 1)
    assert across == torch_mp.plan(torch.nn.Module(), 4, "64MiB", 16,
                                   costs=dataclasses.replace(costs, tp_link=links["tp"], dp_link=links["dp"]))
    measured = measure_costs(llama(), {"input_ids": ids()}, collectives={**links, "pp": (5e-5, 1e-9)})
    assert [measured.link(dim) for dim in ("tp", "dp", "pp")] == [links["tp"], links["dp"], (5e-5, 1e-9)]


def check_links_fitted_per_dim(rank, world):
    """Each dim's link fitted on its own group: over the world (tp on neighbouring ranks, pp
    between ranks two apart, dp over all four) and over an init_mesh DeviceMesh; a dim given in
    ``collectives`` is kept."""
    model, sample = llama(), {"input_ids": ids()}

    def check(costs):
        links = [costs.tp_link, costs.dp_link, costs.pp_link]
        assert all(link is not None and link[0] > 0 and link[1] > 0 for link in links), links
        assert len(set(links)) == 3, links  # three fits, not one for every dim

    measured = measure_costs(model, sample)
    check(measured)
    # Four ranks on this host share its cores (host_sharing).
    assert (measured.host_cores, measured.host_ranks) == (len(os.sched_getaffinity(0)) / torch.get_num_threads(), 4)
    on_mesh = measure_costs(model, sample, group=torch_mp.init_mesh(pp=2, dp=2, tp=1),
                            collectives={"tp": (1e-6, 1e-11)})
    check(on_mesh)
    assert on_mesh.tp_link == (1e-6, 1e-11)
    # step_seconds reads each dim's own link: the data-parallel average over "dp", the sends over "pp".
    dp2 = Layout(1, 1, 2, "1f1b", 1, "never", False, (len(measured.layers),), 8)
    slow_dp = dataclasses.replace(measured, dp_link=(1.0, measured.dp_link[1]))
    assert step_seconds(slow_dp, dp2) - step_seconds(measured, dp2) == pytest.approx(2 * (1.0 - measured.dp_link[0]))
    pp2 = Layout(2, 1, 1, "1f1b", 1, "never", False, (2, 2), 8)
    slow_pp = dataclasses.replace(measured, pp_link=(1.0, measured.pp_link[1]))
    assert step_seconds(slow_pp, pp2) - step_seconds(measured, pp2) == pytest.approx(2 * (1.0 - measured.pp_link[0]))


def test_plan_fits_a_link_per_mesh_dim_on_its_own_group():
    """With the ranks at hand (4 Gloo ranks), measure_costs (what plan(sample=) calls) fits "tp" and
    "dp" by all-reduces and "pp" by sends between neighbours, each on its own group, instead of
    one fit over the world for every dim."""
    run_ranks(4, check_links_fitted_per_dim, timeout=400)


# --- the search -----------------------------------------------------------------------------------

def test_plan_is_deterministic_for_a_fixed_cost_table():
    costs = table(layers=8, activation=1 << 16)
    plans = [torch_mp.plan(torch.nn.Module(), 8, "64MiB", 32, costs=costs) for _ in range(2)]
    assert plans[0] == plans[1]
    assert str(plans[0]) == str(plans[1])
    assert "chosen" in str(plans[0]) and "slower by" in str(plans[0])


def test_stage_balance_counts_the_head_with_the_last_stage():
    """8 equal layers and, outside them, a head costing 4 layers' time (an LLM's projection to
    the vocabulary): on pp 2 the last stage takes fewer layers than the first (the balance of
    the layers alone would be 4 | 4, the last stage then running 8 layers' time to 4)."""
    costs = table(layers=8, outside_forward=Line(0.0, 4e-3), outside_backward=Line(0.0, 8e-3))
    chosen = torch_mp.plan(torch.nn.Module(), 2, "1GiB", 16, costs=costs)
    two_stages = [c for c in [chosen.chosen, *chosen.alternatives] if c.layout.pp == 2 and c.layout.schedule == "1f1b"]
    assert two_stages and all(tuple(c.layout.balance) == (6, 2) for c in two_stages)


def test_plan_prefers_more_memory_saving_layouts_as_memory_shrinks():
    """8 layers of 1 MiB: one rank holding all (8 x 4 MiB of state) needs more than 32 MiB; at 64
    MiB plain data parallel fits and is fastest (no bubble; with a link latency of 0.1 ms, tensor
    parallel's 32 all-reduces cost more than one of the gradients); at 24 MiB only a split of the
    layers fits."""
    costs = table(layers=8, alpha_s=1e-4)
    roomy = torch_mp.plan(torch.nn.Module(), 4, "64MiB", 16, costs=costs)
    assert (roomy.pp, roomy.tp, roomy.dp) == (1, 1, 4)
    tight = torch_mp.plan(torch.nn.Module(), 4, "24MiB", 16, costs=costs)
    assert tight.pp * tight.tp > 1 and tight.peak_bytes <= 24 << 20
    assert any(c.reason.startswith("does not fit (needs") for c in tight.rejected)


def test_printed_plan_reads_by_step_time_then_by_memory_over_the_limit():
    """print(plan): the pick and the alternatives that fit by predicted step time, then, under a line
    of their own, the layouts that do not fit, least over the limit first, each saying by how much
    (and, where it would be faster than the pick, by how much: here plain data parallel, 2% faster,
    needs 48 MiB of 24)."""
    memory = 24 << 20
    plan = torch_mp.plan(torch.nn.Module(), 4, memory, 16, costs=table(layers=8, alpha_s=1e-4))
    lines = str(plan).splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "pp"])
    split = next(i for i, line in enumerate(lines) if "does not fit 24.0 MiB, least over first:" in line)
    fit = [line.split() for line in lines[header + 1:split]]
    over = [line.split() for line in lines[split + 1:split + 5]]
    assert [row[-1] for row in fit[:1]] == ["chosen"] and all("slower by" in " ".join(row) for row in fit[1:])
    times = [float(row[8]) for row in fit]
    assert times == sorted(times) and len(fit) == 8 and len(over) == 4
    assert [c.peak for c in plan.rejected] == sorted(c.peak for c in plan.rejected)
    for row, candidate in zip(over, plan.rejected):
        assert " ".join(row).endswith(candidate.reason)
        assert candidate.reason.startswith(f"does not fit (needs {size(candidate.peak)}, "
                                           f"{size(candidate.peak - memory)} over)")
    data_parallel = next(c for c in plan.rejected if c.layout.dp == 4)
    assert data_parallel.step_s < plan.step_s
    assert data_parallel.reason.endswith(f"; {(1 - data_parallel.step_s / plan.step_s) * 100:.0f}% faster")
    assert all("faster" not in c.reason for c in plan.rejected if c.step_s >= plan.step_s)


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 6), world=st.sampled_from([1, 2, 4, 6, 8]), batch=st.sampled_from([4, 8, 12, 16]),
       memory_mib=st.integers(1, 64), activation=st.integers(0, 1 << 16), heads=st.sampled_from([1, 2, 3, 4, 8]),
       forward=st.floats(1e-5, 1e-2), backward=st.floats(1e-5, 1e-2))
def test_plan_never_proposes_an_infeasible_layout(layers, world, batch, memory_mib, activation, heads, forward,
                                                 backward):
    costs = table(layers=layers, param=1 << 18, activation=activation, heads=heads, forward=forward,
                  backward=backward)
    try:
        plan = torch_mp.plan(torch.nn.Module(), world, memory_mib << 20, batch, costs=costs)
    except ValueError as error:
        assert "fits no layout" in str(error) or "no layout" in str(error)
        return
    chosen = plan.chosen.layout
    assert chosen.pp * chosen.tp * chosen.dp == world and chosen.pp <= layers and heads % chosen.tp == 0
    assert batch % (chosen.dp * chosen.chunks) == 0 and sum(chosen.balance) == layers
    assert plan.peak_bytes <= memory_mib << 20
    # Ranked by step time rounded to the nanosecond, then peak: an alternative may be faster by less.
    assert all(c.peak <= memory_mib << 20 and c.step_s >= plan.step_s - 1e-9 for c in plan.alternatives)
    assert all(c.peak > memory_mib << 20 for c in plan.rejected)


def test_plan_refuses_when_nothing_fits_naming_the_smallest_memory():
    costs = table(layers=2)
    smallest = min(c.peak for c in torch_mp.plan(torch.nn.Module(), 2, "1GiB", 8, costs=costs).alternatives +
                   (torch_mp.plan(torch.nn.Module(), 2, "1GiB", 8, costs=costs).chosen,))
    with pytest.raises(ValueError, match=f"fits no layout .* the smallest needs .*{smallest} bytes"):
        torch_mp.plan(torch.nn.Module(), 2, smallest - 1, 8, costs=costs)
    assert torch_mp.plan(torch.nn.Module(), 2, smallest, 8, costs=costs).peak_bytes == smallest


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(world_size=0), ValueError, "world_size = 0"),
    (dict(batch=2.0), ValueError, "batch = 2.0"),
    (dict(device_memory="lots"), ValueError, "device_memory = 'lots'"),
    (dict(costs=None), ValueError, "expected sample="),
    (dict(schedules=("zb_v",)), ValueError, "schedules"),
    (dict(collectives={"ep": (1e-5, 1e-9)}), ValueError, r"collectives = \{'ep'"),
    (dict(collectives=(1e-5,)), ValueError, r"collectives = \(1e-05,\); expected \(alpha_s, beta_s_per_byte\)"),
])
def test_plan_bad_input(kwargs, error, match):
    args = dict(world_size=2, device_memory="1GiB", batch=8, costs=table())
    args.update(kwargs)
    with pytest.raises(error, match=match):
        torch_mp.plan(torch.nn.Module(), **args)


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 6), world=st.sampled_from([1, 2, 4, 8]), batch=st.sampled_from([4, 8, 16]),
       memory_mib=st.integers(4, 64), activation=st.integers(0, 1 << 16), heads=st.sampled_from([1, 2, 4]),
       forward=st.floats(1e-5, 1e-2), output=st.integers(0, 1 << 12))
def test_python_plan_is_the_cpp_plan_for_the_same_cost_table(layers, world, batch, memory_mib, activation, heads,
                                                             forward, output):
    """One cost table to both faces: Python's ``torch_mp.plan`` carries ``torch_mp::planner::search``'s
    answer whole (the C++ search through ``_C``): the pick, every alternative and rejected layout
    in the same order with the same step time, peaks and verdict, or the same refusal."""
    costs = table(layers=layers, param=1 << 18, activation=activation, heads=heads, forward=forward,
                  output_bytes=output, first_param_bytes=1 << 16, last_param_bytes=1 << 17, last_sharded_bytes=1 << 16)
    memory = memory_mib << 20
    try:
        cpp = _C._plan_search(costs, world, memory, batch, ["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"], 8,
                              "Module")
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(str(error).splitlines()[0])):
            torch_mp.plan(torch.nn.Module(), world, memory, batch, costs=costs)
        return
    plan = torch_mp.plan(torch.nn.Module(), world, memory, batch, costs=costs)

    def fields(candidate):
        return ((candidate.layout.pp, candidate.layout.tp, candidate.layout.dp, candidate.layout.schedule,
                 candidate.layout.chunks, candidate.layout.checkpoint, candidate.layout.sequence_parallel,
                 candidate.layout.balance, candidate.layout.batch, candidate.layout.fully_shard),
                candidate.step_s, candidate.peak_bytes, candidate.reason)

    assert fields(plan.chosen) == cpp[0]
    assert [fields(c) for c in plan.alternatives] == list(cpp[1])
    assert [fields(c) for c in plan.rejected] == list(cpp[2])
    for candidate in (plan.chosen,) + plan.alternatives[:3]:
        assert step_seconds(costs, candidate.layout) == candidate.step_s
        assert tuple(peak_bytes(costs, candidate.layout)) == candidate.peak_bytes


def test_a_layout_that_does_not_match_the_cost_table_is_refused():
    """The cost model checks a layout against the table before any arithmetic: a balance over other
    layers than the table's, or a table whose per-layer fields differ in length."""
    costs = table(layers=4)
    with pytest.raises(ValueError, match="layout.balance adds up to 5 layers; expected the cost table's 4"):
        peak_bytes(costs, Layout(2, 1, 1, "1f1b", 2, "never", False, (2, 3), 8))
    with pytest.raises(ValueError, match="costs.activation_bytes has 3 entries; expected one per layer"):
        step_seconds(dataclasses.replace(costs, activation_bytes=(1, 2, 3)),
                     Layout(2, 1, 1, "1f1b", 2, "never", False, (2, 2), 8))


# --- applied plans against the dense model ---------------------------------------------------------

def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                                      use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(100)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    return model


def loss_fn(output, ids):
    return F.cross_entropy(output.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def ids(rows=8):
    return torch.randint(0, VOCAB, (rows, 8), generator=torch.Generator().manual_seed(3))


def llama_costs():
    """The tiny Llama's measured bytes with fixed times (a deterministic plan)."""
    measured = measure_costs(llama(), {"input_ids": ids()}, collectives=(5e-5, 1e-9))
    count = len(measured.layers)
    return dataclasses.replace(measured, forward=(Line(1e-4, 1e-4),) * count, backward=(Line(2e-4, 2e-4),) * count,
                               outside_forward=Line(1e-4, 1e-4), outside_backward=Line(1e-4, 1e-4))


def check_plan_matches_dense(rank, world, plans):
    batch = ids()
    for plan in plans:
        dense = llama()
        model = torch_mp.parallelize(llama(), plan)
        expect_dense_step(model, dense, batch, batch, loss_fn)


def test_applied_plans_give_the_dense_loss_and_gradients():
    """Two memory limits, two layouts (the roomy one data parallel, the tight one below every
    layout without both a pipeline and tensor parallelism), each applied on 4 Gloo ranks with the
    whole batch passed on every rank."""
    costs = llama_costs()
    roomy = torch_mp.plan(llama(), 4, "1GiB", 8, costs=costs)
    one_kind = min(c.peak for c in (roomy.chosen,) + roomy.alternatives if c.layout.pp == 1 or c.layout.tp == 1)
    tight = torch_mp.plan(llama(), 4, one_kind - 1, 8, costs=costs)
    assert (roomy.pp, roomy.tp, roomy.dp) == (1, 1, 4)
    assert tight.pp > 1 and tight.tp > 1
    run_ranks(4, check_plan_matches_dense, [roomy, tight], timeout=400)


@pytest.mark.planner_full
def test_applied_plans_of_every_kind_of_pipeline_give_the_dense_numbers():
    """The search's other pp 2 x tp 2 layouts, each applied on 4 Gloo ranks with the dense loss and
    gradients: recomputing the tensor-parallel layers (checkpoint "always", sequence parallel; the
    search offered no recompute with tp > 1 while the pipeline's recompute of a tensor-parallel
    layer failed), ZB-V and interleaved 1F1B (two stages a rank)."""
    costs = llama_costs()
    roomy = torch_mp.plan(llama(), 4, "1GiB", 8, costs=costs)

    def first(**fields):
        found = next(c for c in (roomy.chosen,) + roomy.alternatives
                     if c.layout.pp == 2 and c.layout.tp == 2
                     and all(getattr(c.layout, name) == value for name, value in fields.items()))
        return dataclasses.replace(roomy, chosen=found)

    plans = [first(checkpoint="always", sequence_parallel=True), first(schedule="zbv"),
             first(schedule="interleaved_1f1b")]
    run_ranks(4, check_plan_matches_dense, plans, timeout=400)


def check_measure_keeps_the_fastest_measured(rank, world):
    batch = ids()
    plan = torch_mp.plan(llama(), world, "1GiB", 8, sample={"input_ids": batch[:2]}, measure=2, loss_fn=loss_fn,
                         target=batch[:2], collectives=(5e-5, 1e-9))
    assert len(plan.measured) == 2
    fastest = min(plan.measured, key=lambda pair: pair[1])[0]
    assert plan.chosen.layout == fastest
    plans = [None] * world
    torch.distributed.all_gather_object(plans, (plan.chosen.layout, [s for _, s in plan.measured]))
    assert all(p == plans[0] for p in plans)  # every rank keeps the same layout, from the same figures


@pytest.mark.planner_full
def test_measure_runs_the_top_layouts_and_keeps_the_fastest():
    run_ranks(2, check_measure_keeps_the_fastest_measured, timeout=300)


def test_measure_needs_the_world_and_a_loss():
    with pytest.raises(ValueError, match="measure = True runs the layouts on this world"):
        torch_mp.plan(llama(), 4, "1GiB", 8, sample={"input_ids": ids()}, measure=True)


def test_experts_are_planned_only_cut_over_tensor_parallel():
    """transformers' Mixtral experts run in the pipeline only once tensor parallel replaced them."""
    plan = torch_mp.plan(torch.nn.Module(), 4, "1GiB", 8, costs=table(experts=4))
    assert all(c.layout.tp > 1 for c in (plan.chosen,) + plan.alternatives + plan.rejected)
    assert plan.ep == plan.tp


def test_measuring_a_model_leaves_it_ready_for_parallelize():
    """plan(model, sample=...) then parallelize(model, plan) on the same model: measuring must leave
    no reference to its parameters behind (the pipeline moves them with torch.utils.swap_tensors,
    which refuses a parameter something else still holds)."""
    model = llama()
    measure_costs(model, {"input_ids": ids()}, collectives=(5e-5, 1e-9))
    for name, param in model.named_parameters():
        torch.utils.swap_tensors(param, torch.nn.Parameter(param.detach().clone()))


def test_saved_bytes_count_each_storage_the_forward_saves_once():
    """The bytes autograd saves, each storage once while the forward runs: the same as a count that
    keeps the graph (and so every saved storage) alive, and the same for the tiny Llama's identical
    layers 1 to 3. Measuring kept nothing, and a later storage at a freed one's address was taken
    for it: layers of 17600 bytes a row measured 704 to 12480, different on every call."""
    model = llama()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        output = model(input_ids=ids())
    logits = output.logits.numel() * 4  # the loss's copy, which measure_costs adds
    costs = [measure_costs(model, {"input_ids": ids()}, collectives=(5e-5, 1e-9)) for _ in range(2)]
    assert costs[0].activation_bytes == costs[1].activation_bytes
    assert costs[0].activation_bytes[1] == costs[0].activation_bytes[2] == costs[0].activation_bytes[3]
    assert (sum(costs[0].activation_bytes) + costs[0].outside_activation_bytes) * 8 == sum(saved.values()) + logits


def check_costs_of_a_tensor_parallel_model(rank, world):
    dense = measure_costs(llama(), {"input_ids": ids()}, collectives=(5e-5, 1e-9))
    model = torch_mp.tensor_parallel(llama())
    costs = measure_costs(model, {"input_ids": ids()}, collectives=(5e-5, 1e-9))
    for field in ("param_bytes", "sharded_param_bytes", "first_param_bytes", "first_sharded_bytes",
                  "last_param_bytes", "last_sharded_bytes", "boundary_bytes", "tp_must_divide"):
        assert getattr(costs, field) == getattr(dense, field), field
    # What one of 2 ranks saves: the sharded part halved (Korthikanti et al.: 24/34 of a block's).
    for held, whole in zip(costs.activation_bytes, dense.activation_bytes):
        assert 0.55 * whole < held < 0.75 * whole
    plan = torch_mp.plan(model, world, "1GiB", 8, sample={"input_ids": ids()}, collectives=(5e-5, 1e-9))
    assert plan.costs.param_bytes == dense.param_bytes


def test_costs_of_a_tensor_parallel_model_are_the_dense_models_parameters():
    """measure_costs (and plan(sample=)) on a tensor_parallel model: DTensor parameters have no
    storage of their own ("invalid python storage" from untyped_storage); their local tensors' are
    used. Parameters count at their global size, sharded as placed: the dense model's bytes."""
    run_ranks(2, check_costs_of_a_tensor_parallel_model, timeout=300)
