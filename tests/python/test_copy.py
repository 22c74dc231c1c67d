"""Copies of parallelized modules (copy.deepcopy, state_dict round trips) against the dense model:
the copy trains with the dense model's gradients, on its own weights; what cannot be copied
(a pipeline's runner) is a clear error."""
import copy
import io

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from models import mlp

transformers = pytest.importorskip("transformers")
from test_tensor_parallel_wrapper import gpt, logits_of  # noqa: E402 - needs transformers


def llama_one_kv_head():
    """Fewer key/value heads than ranks: each rank keeps the one KV head whole, its gradient summed."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
                                      use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def perturbed(model):
    """``model`` with every parameter moved off its initial value (norm weights of 1 hide mistakes)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model


def assert_trains_like(dense, sharded, ids, name):
    """One forward, backward and SGD step: the same logits, full gradients (gathered from the
    sharded ones) and weights as the dense model."""
    def step(model):
        model.zero_grad(set_to_none=True)
        logits = logits_of(model, ids)
        logits.square().mean().backward()
        return logits.detach()

    expected_logits = step(dense)
    dense_grads = {key: p.grad.clone() for key, p in dense.named_parameters()}
    torch.testing.assert_close(step(sharded), expected_logits, rtol=1e-4, atol=1e-5, msg=name)
    grads = torch_mp.full_state_dict(_gradients_as_module(sharded))
    for key, grad in dense_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}.grad")
    for model in (dense, sharded):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    gathered, reference = torch_mp.full_state_dict(sharded), dense.state_dict()
    for key in reference:
        torch.testing.assert_close(gathered[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def _gradients_as_module(sharded):
    """``sharded`` with its parameters' gradients in their place, for full_state_dict to gather."""
    holder = copy.deepcopy(sharded)
    with torch.no_grad():
        for (_, param), (_, original) in zip(holder.named_parameters(), sharded.named_parameters()):
            param.copy_(original.grad)
    return holder


def _tensor_parallel_copies(rank, world):
    ids = torch.randint(0, 97, (2, 4 * world), generator=torch.Generator().manual_seed(2))
    cases = [("gpt sequence parallel", gpt, {"sequence_parallel": True}),
             ("gpt sequence parallel, async TP", gpt, {"sequence_parallel": True, "async_tp": True}),
             ("llama sequence parallel, one KV head", llama_one_kv_head, {"sequence_parallel": True}),
             ("gpt, own group", gpt, {"sequence_parallel": True, "group": dist.new_group(list(range(world)))})]
    for name, make, options in cases:
        torch.manual_seed(0)
        dense = perturbed(make().train())
        original = torch_mp.tensor_parallel(copy.deepcopy(dense), **options)
        copied = copy.deepcopy(original)
        assert torch_mp.state_of(copied) is not torch_mp.state_of(original)
        assert torch_mp.state_of(copied).group is torch_mp.state_of(original).group
        assert copied.torch_mp_plan == original.torch_mp_plan and copied.torch_mp_plan is not original.torch_mp_plan
        _assert_own_shared_input_copies(copied, original)
        # The copy trains as the dense model does, on its own weights; the original stays as it was.
        before = {key: p.detach().clone() for key, p in original.named_parameters()}
        assert_trains_like(copy.deepcopy(dense), copied, ids, f"{name}: deep copy")
        for key, param in original.named_parameters():
            assert torch.equal(param, before[key]) and param.grad is None, f"{name}: the original's {key} changed"
        # A copy of a copy that has trained, and the original itself, both still match the dense model.
        assert_trains_like(copy.deepcopy(dense), copy.deepcopy(original), ids, f"{name}: second copy")
        assert_trains_like(copy.deepcopy(dense), original, ids, f"{name}: original")

    # A state_dict round trip through torch.save, loaded by assignment (new parameters, no hooks yet;
    # a model without tied weights: assignment unties them, in the dense model too).
    torch.manual_seed(0)
    dense = perturbed(llama_one_kv_head().train())
    original = torch_mp.tensor_parallel(copy.deepcopy(dense), sequence_parallel=True)
    fresh = torch_mp.tensor_parallel(llama_one_kv_head(), sequence_parallel=True)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer), assign=True)
    assert_trains_like(dense, fresh, ids, "state_dict loaded with assign=True")

    # The whole module through torch.save and torch.load: a plain plan, and sequence parallel (its
    # gradient sums and gathers are hooks, put back on the loaded parameters) with one KV head kept
    # whole by both ranks, and with async TP.
    for name, make, options in [("plain", gpt, {}), ("sequence parallel", llama_one_kv_head, {"sequence_parallel": True}),
                                ("async TP", gpt, {"sequence_parallel": True, "async_tp": True})]:
        torch.manual_seed(0)
        dense = perturbed(make().train())
        buffer = io.BytesIO()
        torch.save(torch_mp.tensor_parallel(copy.deepcopy(dense), **options), buffer)
        buffer.seek(0)
        assert_trains_like(dense, torch.load(buffer, weights_only=False), ids, f"torch.save of the module, {name}")

    # A pipelined module's runner holds the original's stages: copying it is an error.
    piped = torch_mp.pipeline(mlp(), chunks=2)
    with pytest.raises(TypeError, match=r"copy.deepcopy: the module was returned by torch_mp.pipeline"):
        copy.deepcopy(piped)


def _assert_own_shared_input_copies(copied, original):
    """Column-parallel siblings of the copy share one input copy, not the original's."""
    def shared(model):
        return {name: layer.shared_input_copy for name, layer in model.named_modules()
                if getattr(layer, "shared_input_copy", None) is not None}

    mine, theirs = shared(copied), shared(original)
    assert mine.keys() == theirs.keys()
    assert not {id(s) for s in mine.values()} & {id(s) for s in theirs.values()}
    assert len({id(s) for s in mine.values()}) == len({id(s) for s in theirs.values()})


def test_deep_copies_of_tensor_parallel_models_train_like_the_dense_model():
    run_ranks(2, _tensor_parallel_copies, timeout=280)


def test_deep_copy_of_a_split_trains_itself():
    torch.manual_seed(0)
    dense = perturbed(mlp())
    x, y = torch.randn(8, 16), torch.randn(8, 8)
    original = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"])
    copied = perturbed(copy.deepcopy(original))
    expected = perturbed(copy.deepcopy(dense))
    assert copied.device_map == original.device_map and copied.device_map is not original.device_map
    torch.testing.assert_close(copied(x), expected(x))
    copied.train_step(x, target=y, loss_fn=F.mse_loss)
    F.mse_loss(expected(x), y).backward()
    for (key, param), reference in zip(copied.named_parameters(), expected.parameters()):
        torch.testing.assert_close(param.grad, reference.grad, rtol=1e-5, atol=1e-6, msg=key)
    assert all(param.grad is None for param in original.parameters())


@pytest.mark.parametrize("schedule", ["gpipe", "zbv"])
def test_deep_copy_of_a_pipelined_split_is_an_error(schedule):
    piped = torch_mp.split(mlp(), ["cpu", "cpu"], chunks=2, schedule=schedule)
    with pytest.raises(TypeError, match=r"copy.deepcopy: the module was returned by torch_mp.split\(..., chunks > 1\), "
                                        r"whose pipeline runs the original's stages; expected a deep copy of the "
                                        r"module before torch_mp.split"):
        copy.deepcopy(piped)
