"""One state record per parallelized module: ``split``, ``pipeline`` and ``tensor_parallel`` each store
one ``ParallelState`` under one attribute, ``torch_mp.state_of`` returns it, and the attributes the
README documents (``device_map``, ``output_device``, ``torch_mp_plan``, ``torch_mp_replicated``,
``torch_mp_kept_whole``) are views onto it."""
import copy

import pytest
import torch
from torch import nn

import torch_mp
from distributed import run_ranks
from models import GPT, mlp

VIEWS = {
    "split": {"device_map": "device_map", "output_device": "output_device"},
    "pipeline": {},
    "tensor_parallel": {"torch_mp_plan": "plan", "torch_mp_replicated": "replicated",
                        "torch_mp_kept_whole": "kept_whole"},
}


def assert_one_record(module: nn.Module, kind: str) -> torch_mp.ParallelState:
    """The module holds exactly one record, of ``kind``, under one attribute; no submodule holds one
    or any other torch_mp marker; the documented attributes are the record's own objects."""
    records = [name for name, value in vars(module).items() if isinstance(value, torch_mp.ParallelState)]
    assert len(records) == 1, records
    state = torch_mp.state_of(module)
    assert vars(module)[records[0]] is state and state.kind == kind
    assert torch_mp.state_of(module, required=kind) is state
    for name, submodule in module.named_modules():
        markers = [key for key, value in vars(submodule).items()
                   if key.startswith("_torch_mp") or isinstance(value, torch_mp.ParallelState)]
        assert markers == (records if submodule is module else []), (name, markers)
    for attribute, field in VIEWS[kind].items():
        assert getattr(module, attribute) is getattr(state, field), attribute
    for other, views in VIEWS.items():
        if other != kind:
            assert not any(attribute in vars(module) for attribute in views if attribute not in VIEWS[kind]), other
    return state


def test_split_holds_one_record():
    model = torch_mp.split(mlp(), ["cpu", "cpu"])
    state = assert_one_record(model, "split")
    assert list(state.device_map) == [str(i) for i in range(7)]
    assert state.output_device == torch.device("cpu") and state.pipe is None
    assert len(state.hooks) == len(state.device_map) + 1
    assert sorted(set(state.stage_of.values())) == [0, 1]


def test_a_second_split_replaces_the_record_and_its_hooks():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    model = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=2, layers=["0", "1", "2", "3"])
    first = assert_one_record(model, "split")
    assert first.pipe is not None and first.hooks == []
    assert type(model[1]).__name__ == "DeferredBatchNorm1d"
    model = torch_mp.split(model, ["cpu", "cpu", "cpu"], layers=["0", "1", "2", "3"])
    second = assert_one_record(model, "split")
    assert second is not first and second.pipe is None
    # The pipelined split is undone: stock batch norm, no gated forwards, no earlier hooks.
    assert type(model[1]) is nn.BatchNorm1d
    assert all("forward" not in vars(submodule) for submodule in model.modules())
    assert len(model._forward_hooks) == 1 and all(len(layer._forward_pre_hooks) == 1 for layer in model)
    x = torch.randn(6, 8)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)


def test_tensor_parallel_holds_one_record():
    model = torch_mp.tensor_parallel(GPT(vocab=32, dim=16, heads=2, depth=2, context=8))
    state = assert_one_record(model, "tensor_parallel")
    assert state.specs and set(state.specs) <= set(state.plan)
    assert state.plan["blocks.0.attn.proj"] == "rowwise" and state.kept_whole == {}
    assert torch_mp.state_of(model, required=("split", "tensor_parallel")) is state


def test_state_of_names_what_was_expected():
    plain = mlp()
    assert torch_mp.state_of(plain) is None
    with pytest.raises(ValueError, match=r"torch_mp.state_of: Sequential holds no torch_mp state; expected a "
                                         r"module returned by torch_mp.split$"):
        torch_mp.state_of(plain, required="split")
    model = torch_mp.split(mlp(), ["cpu", "cpu"])
    with pytest.raises(ValueError, match=r"Sequential holds the state of torch_mp.split; expected a module "
                                         r"returned by torch_mp.pipeline or torch_mp.tensor_parallel$"):
        torch_mp.state_of(model, required=("pipeline", "tensor_parallel"))
    with pytest.raises(ValueError, match=r"required = 'fsdp'; expected kinds among"):
        torch_mp.state_of(model, required="fsdp")
    with pytest.raises(TypeError, match=r"torch_mp.state_of: expected module to be a torch.nn.Module, got str"):
        torch_mp.state_of("model")


def test_a_second_wrapper_is_refused_before_it_changes_anything():
    split = torch_mp.split(GPT(vocab=32, dim=16, heads=2, depth=2, context=8), ["cpu", "cpu"])
    before = {name: p.clone() for name, p in split.named_parameters()}
    with pytest.raises(ValueError, match=r"tensor_parallel: GPT was already returned by torch_mp.split; expected a "
                                         r"module no torch_mp wrapper has parallelized yet"):
        torch_mp.tensor_parallel(split)
    assert {name: p.shape for name, p in split.named_parameters()} == {n: p.shape for n, p in before.items()}
    assert_one_record(split, "split")
    sharded = torch_mp.tensor_parallel(GPT(vocab=32, dim=16, heads=2, depth=2, context=8))
    with pytest.raises(ValueError, match=r"split: GPT was already returned by torch_mp.tensor_parallel"):
        torch_mp.split(sharded, ["cpu", "cpu"])
    with pytest.raises(ValueError, match=r"tensor_parallel: GPT was already returned by torch_mp.tensor_parallel"):
        torch_mp.tensor_parallel(sharded)
    assert_one_record(sharded, "tensor_parallel")


def check_pipeline_and_tensor_parallel(rank, world):
    torch.manual_seed(0)
    piped = torch_mp.pipeline(GPT(vocab=32, dim=16, heads=2, depth=4, context=8), chunks=2)
    state = assert_one_record(piped, "pipeline")
    assert state.group is None and state.pipe is not None
    assert sorted(set(state.stage_of.values())) == [0, 1]
    with pytest.raises(ValueError, match=r"pipeline: GPT was already returned by torch_mp.pipeline"):
        torch_mp.pipeline(piped)
    # Tensor parallel composes under a pipeline (tests/python/test_mesh3d.py), not over one.
    with pytest.raises(ValueError, match=r"tensor_parallel: GPT was already returned by torch_mp.pipeline; expected "
                                         r"torch_mp.tensor_parallel first, then torch_mp.pipeline"):
        torch_mp.tensor_parallel(piped)
    # The blocks hold real tensors on their stage's rank only.
    for name, stage in state.stage_of.items():
        if name.startswith("blocks."):
            held = [not p.is_meta for p in piped.get_submodule(name).parameters()]
            assert all(held) if stage == rank else not any(held), (name, stage)

    sharded = torch_mp.tensor_parallel(GPT(vocab=32, dim=16, heads=2, depth=2, context=8))
    state = assert_one_record(sharded, "tensor_parallel")
    assert sharded.blocks[0].attn.proj.weight.to_local().shape == (16, 16 // world)  # a DTensor: its shard
    report = torch_mp.memory_report(sharded)
    assert [row.where for row in report.rows] == [f"rank {r}" for r in range(world)]


def test_pipeline_and_tensor_parallel_on_two_ranks_hold_one_record():
    run_ranks(2, check_pipeline_and_tensor_parallel)
