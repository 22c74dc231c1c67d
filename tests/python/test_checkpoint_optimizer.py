"""Optimizer state of any shape in checkpoints (issue 21, item 9): state shaped like its parameter is
cut like the parameter; state of another shape (Adafactor-like row and column statistics) of a
parameter cut across ranks is each rank's own, saved and restored per rank; a checkpoint whose such
state cannot be cut for another layout is a clear error at load."""
import json
import os

import pytest
import torch
from distributed import run_ranks
from torch.distributed.tensor import DTensor
from models import mlp

import torch_mp

transformers = pytest.importorskip("transformers")
VOCAB = 64


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def statistics_of(model, optimizer):
    """Row and column statistics of each 2-D parameter's local tensor in the optimizer's state:
    state of another shape than its parameter, each rank's own for a sharded one (what Adafactor
    keeps; Adafactor itself is refused on DTensor parameters at its first step)."""
    for param in model.parameters():
        local = param.to_local().detach()
        if local.dim() == 2:
            optimizer.state[param].update({"row_var": local.square().mean(1), "col_var": local.square().mean(0),
                                           "step": torch.tensor(2.0)})


def per_rank_state(rank, world, folder):
    """A TP Llama after an SGD step with per-rank statistics in its optimizer state: saved, loaded
    into a fresh model and optimizer, every rank gets its own statistics back exactly."""
    model = torch_mp.tensor_parallel(llama())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    statistics_of(model, optimizer)
    path = os.path.join(folder, "adafactor")
    torch_mp.save(model, path, optimizer=optimizer)
    fresh = torch_mp.tensor_parallel(llama(seed=3))
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    torch_mp.load(fresh, path, optimizer=fresh_optimizer)
    saved = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        for key, value in optimizer.state[saved[name]].items():
            got = fresh_optimizer.state[param][key]
            assert torch.equal(got.to_local() if hasattr(got, "to_local") else got,
                               value.to_local() if hasattr(value, "to_local") else value), (rank, name, key)


def test_per_rank_optimizer_state_on_tensor_parallel_llama_round_trips(tmp_path):
    """Before: rank 0 alone saved the row and column statistics and every rank read them (Adafactor
    resumed 4.15028 against 4.15046 uninterrupted)."""
    run_ranks(2, per_rank_state, str(tmp_path))
    index = json.loads((tmp_path / "adafactor" / "torch_mp_checkpoint.json").read_text())
    state = index["optimizer"]["state"]["model.layers.0.mlp.up_proj.weight"]
    assert sorted(state["per_rank"]) == ["col_var", "row_var", "step"]
    assert [index["tensors"][name]["pieces"][0]["file"] for name in state["per_rank"]["col_var"]] == [
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    # The statistics of a weight cut across 2 ranks cannot be cut for the whole weight: a clear error.
    dense = llama(seed=4)
    before = {key: value.clone() for key, value in dense.state_dict().items()}
    with pytest.raises(ValueError, match=r"optimizer state '(row|col)_var' of 'model\..*weight' .* another shape "
                                         r".* saved by 2 tensor-parallel rank"):
        torch_mp.load(dense, tmp_path / "adafactor", optimizer=torch.optim.SGD(dense.parameters(), lr=0.1))
    assert all(torch.equal(value, before[key]) for key, value in dense.state_dict().items())  # raised first
    torch_mp.load(dense, tmp_path / "adafactor")  # the weights alone load


# --- property: optimizer state of random shapes, different on each rank --------------------------

PLAN = {"0": "colwise", "2": "rowwise"}  # 0.weight, 0.bias, 2.weight cut; 2.bias whole


def random_states(rank, world, folder):
    """Hypothesis draws, the same on every rank (derandomized), each parameter's state: keys whose
    tensors have the parameter's shape, or another shape (for a parameter cut across ranks, a
    different one on each rank), and JSON values. Saved and loaded into a fresh optimizer, every
    rank's state comes back exactly."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    torch.manual_seed(0)
    model = torch_mp.tensor_parallel(mlp((16, 32, 8)), plan=PLAN)
    cut = {"0.weight", "0.bias", "2.weight"}
    shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)

    # Every rank draws the same examples; no shrinking, where the ranks would part ways.
    @settings(max_examples=15, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def round_trip(data):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
        expected = {}
        for name, param in model.named_parameters():
            state = {}
            for key in data.draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3)):
                kind = data.draw(st.sampled_from(["like", "other", "value"]))
                if kind == "value":
                    # (Not strings: torch's Optimizer.load_state_dict turns them into generators.)
                    state[key] = data.draw(st.integers(-10, 10) | st.floats(-1, 1) | st.lists(st.integers(), max_size=2))
                    continue
                per_rank = [data.draw(shapes) for _ in range(world)] if name in cut else [data.draw(shapes)] * world
                values = [torch.randn(param.shape if kind == "like" else shape, generator=generator)
                          for shape in per_rank]
                state[key] = values[rank if name in cut else 0]
            optimizer.state[param] = state
            expected[name] = state
        path = os.path.join(folder, "random")
        torch_mp.save(model, path, optimizer=optimizer)
        loaded = torch.optim.SGD(model.parameters(), lr=0.5)
        torch_mp.load(model, path, optimizer=loaded, restore_rng=False)
        for name, param in model.named_parameters():
            got = loaded.state.get(param, {})
            assert set(got) == set(expected[name]), name
            for key, value in expected[name].items():
                if isinstance(value, torch.Tensor):
                    # State shaped like a DTensor parameter comes back a DTensor placed as it is.
                    local = got[key].to_local() if isinstance(got[key], DTensor) else got[key]
                    assert local.shape == value.shape and torch.equal(local, value), (name, key)
                else:
                    assert got[key] == value, (name, key)

    round_trip()


def test_optimizer_state_of_random_shapes_per_rank_round_trips(tmp_path):
    pytest.importorskip("hypothesis")
    run_ranks(2, random_states, str(tmp_path))
