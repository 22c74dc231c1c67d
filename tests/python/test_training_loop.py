"""One training script, written as users write it for the dense model, run unchanged on every
layout: AdamW with warm-up and a cosine learning rate, weight decay with a frozen embedding,
``torch_mp.clip_grad_norm_`` at 1.0, gradient accumulation over 2, activation checkpointing,
dropout, a save at step 5 and a resume into a fresh model. Every step's loss and the final stock
state dict must be the dense run's: fp32 within 1e-5; under bf16 autocast to bf16 rounding."""
import contextlib
import copy
import math
import os
import pickle

import pytest
import torch
from distributed import run_ranks
from torch.nn.parallel import DistributedDataParallel

import torch_mp

transformers = pytest.importorskip("transformers")

STEPS, SAVE_AT, ACCUMULATION, ROWS = 10, 5, 2, 4


def make_model(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=dropout, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    model.model.embed_tokens.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def micro_steps(step: int):
    """The batch of each accumulation step, the same on every rank."""
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randint(3, 64, (ROWS, 8), generator=generator) for _ in range(ACCUMULATION)]


def warmup_cosine(step: int) -> float:
    return (step + 1) / 3 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / (STEPS - 2)))


class Layout:
    """How a layout wraps the model and feeds it its rows; the loop itself never changes."""

    def __init__(self, name: str, world: int = 1):
        self.name, self.world = name, world
        self.dp_rank, self.dp_size, self.mesh = 0, 1, None

    def wrap(self, model):
        if self.name == "split":
            return torch_mp.split(model, ["cpu", "cpu"], chunks=2, schedule="1f1b")
        if self.name.startswith("pipeline"):
            return torch_mp.pipeline(model, chunks=2, schedule=self.name.split("_", 1)[1])
        if self.name == "tp":
            return torch_mp.tensor_parallel(model)
        if self.name == "dp_tp":
            self.mesh = self.mesh or torch_mp.init_mesh(dp=2, tp=2)
            self.dp_rank, self.dp_size = self.mesh["dp"].get_local_rank(), 2
            sharded = torch_mp.tensor_parallel(model, group=self.mesh["tp"])
            with torch_mp.local_parameters(sharded):  # DDP needs plain tensors
                return DistributedDataParallel(sharded, process_group=self.mesh["dp"].get_group())
        return model

    def rows(self, ids):
        return ids.chunk(self.dp_size)[self.dp_rank]

    def loss_of(self, loss: torch.Tensor) -> float:
        """The whole batch's loss, from this data-parallel rank's mean."""
        if self.dp_size > 1:
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss, group=self.mesh["dp"].get_group())
            loss /= self.dp_size
        return loss.item()


def forward_backward(model, ids, scale: float) -> torch.Tensor:
    if hasattr(model, "train_step"):
        return model.train_step(input_ids=ids, labels=ids, loss_fn=lambda out, _: out.loss * scale) / scale
    loss = model(input_ids=ids, labels=ids).loss
    (loss * scale).backward()
    return loss


def train(layout: Layout, folder: str, dropout: float, autocast: bool):
    """The training script. Returns each step's loss and the final stock state dict."""
    def fresh():
        model = layout.wrap(make_model(dropout))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)

    torch.manual_seed(7)  # the stream dropout draws from, the same on every rank
    model, optimizer, scheduler = fresh()
    precision = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    losses = []
    for step in range(STEPS):
        if step == SAVE_AT:
            torch_mp.save(model, folder, optimizer=optimizer, extra={"scheduler": scheduler.state_dict()})
            model, optimizer, scheduler = fresh()
            scheduler.load_state_dict(torch_mp.load(model, folder, optimizer=optimizer)["scheduler"])
        total = 0.0
        for ids in micro_steps(step):
            with precision:
                loss = forward_backward(model, layout.rows(ids), 1 / ACCUMULATION)
            total += layout.loss_of(loss) / ACCUMULATION
        torch_mp.clip_grad_norm_(model, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, torch_mp.full_state_dict(model)


def train_on_ranks(rank, world, name, folder, dropout, autocast):
    losses, state = train(Layout(name, world), os.path.join(folder, "checkpoint"), dropout, autocast)
    if rank == 0:
        with open(os.path.join(folder, "result.pickle"), "wb") as handle:
            pickle.dump((losses, state), handle)


def run_layout(name: str, world: int, tmp_path, dropout: float, autocast: bool):
    if world == 1:
        return train(Layout(name), str(tmp_path / "checkpoint"), dropout, autocast)
    run_ranks(world, train_on_ranks, name, str(tmp_path), dropout, autocast, timeout=400.0)
    with open(tmp_path / "result.pickle", "rb") as handle:
        return pickle.load(handle)


# (layout, ranks, dropout). Dropout is on where the layout draws the dense model's masks: tensor
# parallelism draws each mask at the dense shape and keeps this rank's block. Data parallelism and
# micro-batches draw a mask per part of the batch (Bernoulli draws of a part are not the rows of the
# whole batch's draw), so there the loop runs without dropout.
LAYOUTS = [("split", 1, 0.0), ("pipeline_1f1b", 2, 0.0), ("pipeline_zbv", 2, 0.0), ("tp", 2, 0.1), ("dp_tp", 4, 0.0)]


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory):
    runs = {}

    def run(dropout, autocast):
        if (dropout, autocast) not in runs:
            runs[dropout, autocast] = train(Layout("dense"), str(tmp_path_factory.mktemp("dense") / "ckpt"),
                                            dropout, autocast)
        return runs[dropout, autocast]
    return run


@pytest.mark.parametrize("name,world,dropout", LAYOUTS, ids=[name for name, _, _ in LAYOUTS])
def test_fp32_loop_matches_dense(name, world, dropout, tmp_path, dense_runs):
    expected_losses, expected_state = dense_runs(dropout, False)
    losses, state = run_layout(name, world, tmp_path, dropout, False)
    assert losses == pytest.approx(expected_losses, abs=1e-5, rel=1e-5)
    assert state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name,world,dropout", LAYOUTS, ids=[name for name, _, _ in LAYOUTS])
def test_bf16_autocast_loop_matches_dense(name, world, dropout, tmp_path, dense_runs):
    expected_losses, _ = dense_runs(dropout, True)
    losses, _ = run_layout(name, world, tmp_path, dropout, True)
    # bf16 keeps 8 bits of mantissa: matmuls summed in another order differ by a few units of 2^-8.
    assert losses == pytest.approx(expected_losses, rel=2e-2)
