"""Checkpoints of FSDP2 over a pipeline (``pipeline(model, group=mesh["pp"], data_parallel=mesh["dp"],
fully_shard=True)``, issue 23) on a pp 2 x dp 2 mesh of 4 Gloo ranks: ``torch_mp.save`` writes each
replica's FSDP2 shard of its stage's tensors (and of their AdamW state) in the stock names; the
checkpoint resumes bit-identical at the same layout, and loads into a pp 2 x dp 2 pipeline without
fully_shard and into the plain model, each against the dense model's weights and losses. A tiny
transformers Llama and the GPT of models.py (its head tied to the embedding), random weights.
Before this, ``torch_mp.save`` raised TypeError ("'model.embed_tokens.weight' is a DTensor")."""
import json
import os

import pytest
import torch
from models import GPT
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

import torch_mp
from torch_mp._checkpoint.format import INDEX
from distributed import run_ranks
from test_mesh3d import batch, llama
from test_mesh3d import loss_fn as llama_loss

pytest.importorskip("transformers")

STEPS, GPT_VOCAB = 2, 64


def gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(vocab=GPT_VOCAB, dim=32, heads=4, depth=4)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    return model


def gpt_loss(logits, ids):
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten())


MODELS = {"llama": (llama, llama_loss, "input_ids"), "gpt": (gpt, gpt_loss, "ids")}


def train(model, optimizer, first, count, kind, rows):
    """``count`` AdamW steps on the batches ``first`` .. ``first + count - 1`` (8 rows each), of
    which this replica takes ``rows``; the losses (the whole batch's, on every rank)."""
    _, loss_fn, argument = MODELS[kind]
    losses = []
    for step in range(first, first + count):
        ids = batch(8, seed=step)[rows]
        if torch_mp.state_of(model) is not None:
            loss = model.train_step(**{argument: ids}, target=ids, loss_fn=loss_fn)
        else:
            loss = loss_fn(model(**{argument: ids}), ids)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def adamw(model):
    """AdamW whose eps keeps gradients that are rounding noise (GPT's key bias, which the softmax
    ignores) from stepping as far as real ones: the parallel and dense runs then agree to 1e-4."""
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, eps=1e-4)


def assert_equal(state, expected, what):
    assert set(state) == set(expected), what
    for key, value in expected.items():
        assert torch.equal(state[key], value), f"{what}: {key}"


def check_save_and_load(rank, world, folder, kind):
    make = MODELS[kind][0]
    mesh = torch_mp.init_mesh(pp=2, dp=2, tp=1)
    replica = slice(4 * mesh["dp"].get_local_rank(), 4 * mesh["dp"].get_local_rank() + 4)
    every = slice(0, 8)

    def sharded(seed):
        return torch_mp.pipeline(make(seed), group=mesh["pp"], data_parallel=mesh["dp"], chunks=2, fully_shard=True)

    dense = make(0)
    dense_optimizer = adamw(dense)
    dense_losses = train(dense, dense_optimizer, 0, STEPS, kind, every)
    dense_state = {key: value.clone() for key, value in dense.state_dict().items()}
    dense_losses += train(dense, dense_optimizer, STEPS, STEPS, kind, every)

    # 2 * STEPS steps uninterrupted, then STEPS steps and a save, from the same weights.
    model = sharded(0)
    optimizer = adamw(model)
    whole = train(model, optimizer, 0, 2 * STEPS, kind, replica)
    whole_state = torch_mp.full_state_dict(model)
    torch.testing.assert_close(torch.tensor(whole), torch.tensor(dense_losses), rtol=1e-5, atol=1e-6)

    model = sharded(0)
    optimizer = adamw(model)
    first = train(model, optimizer, 0, STEPS, kind, replica)
    saved = torch_mp.full_state_dict(model)
    for key, value in dense_state.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    path = os.path.join(folder, "checkpoint")
    torch_mp.save(model, path, optimizer=optimizer, extra={"losses": first})

    # Each replica wrote its FSDP2 shard of its stage's tensors (and their Adam moments): ranges of dim 0.
    with open(os.path.join(path, INDEX)) as handle:
        tensors = json.load(handle)["tensors"]
    layer = "model.layers.0.mlp.up_proj.weight" if kind == "llama" else "blocks.0.mlp.0.weight"
    for name in (layer, f"optimizer/{layer}/exp_avg"):
        rows = tensors[name]["shape"][0]
        assert tensors[name]["dim"] == 0 and sorted(p["bounds"][0] for p in tensors[name]["pieces"]) == \
            [[0, rows // 2], [rows // 2, rows]], name

    # The same layout resumes bit-identical: the uninterrupted run's losses and weights exactly.
    model = sharded(5)
    optimizer = adamw(model)
    losses = torch_mp.load(model, path, optimizer=optimizer)["losses"]
    assert all(isinstance(p, DTensor) for layer in model.modules() for p in layer.parameters(recurse=False)
               if type(layer).__name__ in ("LlamaDecoderLayer", "Block") and not p.is_meta)
    assert_equal(torch_mp.full_state_dict(model), saved, "loaded into fully_shard")
    assert losses + train(model, optimizer, STEPS, STEPS, kind, replica) == whole
    assert_equal(torch_mp.full_state_dict(model), whole_state, "resumed")

    # A pp 2 x dp 2 pipeline without fully_shard, and the plain model on every rank: the saved weights
    # exactly, then the dense run's losses (the Adam state loaded with them).
    model = torch_mp.pipeline(make(6), group=mesh["pp"], data_parallel=mesh["dp"], chunks=2)
    optimizer = adamw(model)
    torch_mp.load(model, path, optimizer=optimizer)
    assert_equal(torch_mp.full_state_dict(model), saved, "loaded into the pipeline without fully_shard")
    torch.testing.assert_close(torch.tensor(train(model, optimizer, STEPS, STEPS, kind, replica)),
                               torch.tensor(dense_losses[STEPS:]), rtol=1e-5, atol=1e-6)
    plain = make(7)
    optimizer = adamw(plain)
    torch_mp.load(plain, path, optimizer=optimizer)
    assert_equal(plain.state_dict(), saved, "loaded into the plain model")
    torch.testing.assert_close(torch.tensor(train(plain, optimizer, STEPS, STEPS, kind, every)),
                               torch.tensor(dense_losses[STEPS:]), rtol=1e-5, atol=1e-6)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_fully_shard_pipeline_saves_resumes_and_loads_elsewhere(tmp_path, kind):
    run_ranks(4, check_save_and_load, str(tmp_path), kind, timeout=400)
