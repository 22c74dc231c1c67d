"""Checkpoints of pipelines (issue 21, item 10): after train_step and AdamW steps on ``pipeline`` (2
Gloo ranks), ``full_state_dict`` gathers the stock state dict and ``torch_mp.save`` writes each
rank's stages in the stock names and layout, with the optimizer state and random state. Resuming
gives the uninterrupted run's losses exactly; the checkpoint loads into a pipeline with another
split of the layers, into ``tensor_parallel``, ``split`` and the plain model, each against the
dense model's parameters."""
import json
import os

import pytest
import torch
from distributed import run_ranks
from models import GPT
from torch.nn import functional as F

import torch_mp
from torch_mp._checkpoint.safetensors import SafetensorsFile, write_file

VOCAB, STEPS, LR = 96, 2, 1e-2
PLAN = {"tok": "vocab", "head": "colwise_gather", "blocks.*.attn.qkv": "qkv", "blocks.*.attn.proj": "rowwise",
        "blocks.*.mlp.0": "colwise", "blocks.*.mlp.2": "rowwise"}


def gpt(seed=0):
    """GPT with 4 blocks and a head tied to the embedding, every parameter moved off its initial
    value (layer norms of ones and zeros hide mistakes)."""
    torch.manual_seed(seed)
    model = GPT(vocab=VOCAB, dim=32, heads=4, depth=4)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    return model


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def steps(model, optimizer, count, losses):
    """``count`` steps on batches drawn from the global generator (which the checkpoint carries)."""
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (4, 8))
        if torch_mp.state_of(model) is not None:
            loss = model.train_step(ids, target=ids, loss_fn=loss_fn)
        else:
            loss = loss_fn(model(ids), ids)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def dense_run(count):
    """The plain model's losses and state after ``count`` steps from the ranks' seeds."""
    model = gpt()
    optimizer = adamw(model)
    torch.manual_seed(100)
    return steps(model, optimizer, count, []), model


def save_mid_run(rank, world, folder):
    """2 * STEPS steps uninterrupted; then, from the same seeds, STEPS steps, full_state_dict and a
    save."""
    for phase in ("whole", "first"):
        model = torch_mp.pipeline(gpt(), chunks=2)
        optimizer = adamw(model)
        torch.manual_seed(100)
        losses = steps(model, optimizer, 2 * STEPS if phase == "whole" else STEPS, [])
        if phase == "first":
            full = torch_mp.full_state_dict(model)
            torch_mp.save(model, os.path.join(folder, "ckpt"), optimizer=optimizer, extra={"losses": losses})
            if rank == 0:
                write_file(os.path.join(folder, "full.safetensors"), list(full.items()))
        elif rank == 0:
            with open(os.path.join(folder, "whole.json"), "w") as handle:
                json.dump(losses, handle)


def assert_equals_file(state, path):
    reader = SafetensorsFile(path)
    assert set(state) == set(reader.keys())
    for key in sorted(reader.keys()):
        assert torch.equal(state[key], reader.read(key)), key


def resume_elsewhere(rank, world, folder):
    """In new processes: the same pipeline resumes (losses to compare with the uninterrupted run);
    a pipeline with another split of the blocks and a tensor-parallel model load the checkpoint."""
    results = {}
    for name, make in (("resumed", lambda: torch_mp.pipeline(gpt(seed=5), chunks=2)),
                       ("resplit", lambda: torch_mp.pipeline(gpt(seed=6), chunks=2, balance=[1, 3])),
                       ("interleaved", lambda: torch_mp.pipeline(gpt(seed=6), chunks=2, schedule="interleaved_1f1b"))):
        model = make()
        optimizer = adamw(model)
        losses = torch_mp.load(model, os.path.join(folder, "ckpt"), optimizer=optimizer)["losses"]
        if name != "resumed":  # block 1 on rank 1 (1 + 3 blocks; 4 stages of one): rank 0 saved it
            assert model.blocks[1].mlp[0].weight.is_meta == (rank == 0)
        assert_equals_file(torch_mp.full_state_dict(model), os.path.join(folder, "full.safetensors"))
        results[name] = steps(model, optimizer, STEPS, losses)
    tp = torch_mp.tensor_parallel(gpt(seed=7), plan=PLAN)
    torch_mp.load(tp, os.path.join(folder, "ckpt"), optimizer=adamw(tp))
    assert_equals_file(torch_mp.full_state_dict(tp), os.path.join(folder, "full.safetensors"))
    if rank == 0:
        with open(os.path.join(folder, "resumed.json"), "w") as handle:
            json.dump(results, handle)


@pytest.fixture(scope="module")
def pipeline_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    run_ranks(2, save_mid_run, str(folder))
    return folder


def test_full_state_dict_of_a_pipeline_is_the_dense_models(pipeline_checkpoint):
    _, dense = dense_run(STEPS)
    full = SafetensorsFile(str(pipeline_checkpoint / "full.safetensors"))
    assert set(full.keys()) == set(dense.state_dict())
    for key, value in dense.state_dict().items():
        found = full.read(key)
        if key.endswith("qkv.bias"):
            # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift of every
            # score of a query); AdamW scales its rounding noise, which differs, up to the learning rate.
            found, value = torch.cat([found[:32], found[64:]]), torch.cat([value[:32], value[64:]])
        torch.testing.assert_close(found, value, rtol=1e-5, atol=1e-5, msg=key)


def test_each_rank_writes_its_stages_in_the_stock_layout(pipeline_checkpoint):
    index = json.loads((pipeline_checkpoint / "ckpt" / "torch_mp_checkpoint.json").read_text())
    tensors = index["tensors"]
    file_of = {name: entry["pieces"][0]["file"] for name, entry in tensors.items()}
    assert all(entry["dim"] is None and len(entry["pieces"]) == 1 for entry in tensors.values())
    assert file_of["blocks.0.mlp.0.weight"] == file_of["tok.weight"] == "rank-00000-of-00002.safetensors"
    assert file_of["blocks.3.mlp.0.weight"] == "rank-00001-of-00002.safetensors"
    assert file_of["optimizer/blocks.3.mlp.0.weight/exp_avg"] == "rank-00001-of-00002.safetensors"
    assert tensors["blocks.3.mlp.0.weight"]["shape"] == [128, 32]
    assert {"rng/cpu/0", "rng/cpu/1"} <= set(tensors)
    assert set(index["optimizer"]["state"]) == {name for name, _ in gpt().named_parameters()}


def test_pipeline_resumes_bit_identical_and_loads_into_another_split_and_tensor_parallel(pipeline_checkpoint):
    run_ranks(2, resume_elsewhere, str(pipeline_checkpoint))
    whole = json.loads((pipeline_checkpoint / "whole.json").read_text())
    results = json.loads((pipeline_checkpoint / "resumed.json").read_text())
    assert results["resumed"] == whole  # exact: JSON keeps every bit of a float
    assert results["resplit"] == whole
    assert results["interleaved"] == whole


def test_pipeline_checkpoint_loads_into_the_plain_model_and_split(pipeline_checkpoint):
    full = str(pipeline_checkpoint / "full.safetensors")
    plain = gpt(seed=8)
    optimizer = adamw(plain)
    torch_mp.load(plain, pipeline_checkpoint / "ckpt", optimizer=optimizer)
    assert_equals_file(plain.state_dict(), full)
    other = torch_mp.load_full_state_dict(gpt(seed=9), pipeline_checkpoint / "ckpt")
    assert_equals_file(other.state_dict(), full)
    split = torch_mp.split(gpt(seed=10), ["cpu", "cpu"])
    torch_mp.load(split, pipeline_checkpoint / "ckpt")
    assert_equals_file(split.state_dict(), full)
    # The plain model goes on from the pipeline's optimizer state as the dense run does (random
    # states are restored only at the world size that saved them: the batches are drawn again).
    torch.manual_seed(100)
    for _ in range(STEPS):
        torch.randint(0, VOCAB, (4, 8))
    losses = steps(plain, optimizer, STEPS, [])
    expected, _ = dense_run(2 * STEPS)
    torch.testing.assert_close(losses, expected[STEPS:], rtol=1e-5, atol=1e-5)


# --- a transformers Llama ----------------------------------------------------------------------

def llama(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    return model


def llama_loss(output, ids):
    return loss_fn(output.logits, ids)


def llama_pipeline(rank, world, folder):
    """One train_step and AdamW step of Llama pipelined on 2 ranks and of the dense Llama; the
    pipeline's full_state_dict against the dense parameters, its checkpoint loaded into the plain
    Llama with its optimizer state against the dense optimizer's."""
    dense = llama(seed=0)
    piped = torch_mp.pipeline(llama(seed=0), chunks=2)
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    optimizers = [adamw(model) for model in (dense, piped)]
    llama_loss(dense(input_ids=ids), ids).backward()
    piped.train_step(input_ids=ids, target=ids, loss_fn=llama_loss)
    for optimizer in optimizers:
        optimizer.step()
    full = torch_mp.full_state_dict(piped)
    assert list(full) == list(dense.state_dict())
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=1e-5, atol=1e-5, msg=key)
    path = os.path.join(folder, "llama")
    torch_mp.save(piped, path, optimizer=optimizers[1])
    if rank == 0:
        plain = llama(seed=1)
        optimizer = adamw(plain)
        torch_mp.load(plain, path, optimizer=optimizer)
        assert all(torch.equal(value, full[key]) for key, value in plain.state_dict().items())
        expected = dict(zip(dense.parameters(), plain.parameters()))
        for param, state in optimizers[0].state.items():
            for key, value in state.items():
                torch.testing.assert_close(optimizer.state[expected[param]][key], value, rtol=1e-5, atol=1e-5)


def test_llama_pipeline_state_and_checkpoint_are_the_dense_models(tmp_path):
    run_ranks(2, llama_pipeline, str(tmp_path))
