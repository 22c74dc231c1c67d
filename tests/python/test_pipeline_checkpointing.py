"""torch.utils.checkpoint called from outside the placed layers (the parent's forward around a
layer, transformers' gradient checkpointing) under split, pipeline and tensor_parallel: the dense
model's loss and gradients, reentrant or not, or a clear error before anything is sent."""
import copy
import functools

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import torch_mp
from distributed import run_ranks
from test_tensor_parallel_wrapper import assert_same_step_and_state

SCHEDULES = ("gpipe", "1f1b", "zb_h1", "zbv", "interleaved_1f1b")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class CheckpointedInParent(nn.Module):
    """Four Linear+Tanh blocks and a head, each block called through torch.utils.checkpoint by the
    parent's forward (a stem before them, so that the blocks' inputs need gradients, which a
    reentrant checkpoint needs to give the blocks theirs)."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


def dense_case(reentrant: bool):
    torch.manual_seed(0)
    model = CheckpointedInParent(reentrant)
    x, y = torch.randn(8, 8), torch.randn(8, 3)
    dense = copy.deepcopy(model)
    loss = F.mse_loss(dense(x), y)
    loss.backward()
    return model, dense, x, y, loss


def assert_dense_grads(model, dense, what):
    checked = 0
    for (name, p), (_, q) in zip(model.named_parameters(), dense.named_parameters()):
        if not p.is_meta:
            assert p.grad is not None, f"{what}: {name} has no gradient"
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("chunks", [1, 2])
def test_checkpoint_in_the_parents_forward_under_split(chunks, reentrant):
    for schedule in SCHEDULES[:4]:
        model, dense, x, y, expected = dense_case(reentrant)
        split = torch_mp.split(model, ["cpu", "cpu"], chunks=chunks, schedule=schedule)
        loss = split.train_step(x, target=y, loss_fn=F.mse_loss)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
        assert_dense_grads(split, dense, f"split chunks={chunks} {schedule}")


def check_checkpoint_in_the_parents_forward(rank, world):
    for schedule in SCHEDULES:
        for reentrant in (False, True):
            for mode in ("never", "always"):  # the pipeline's own recomputation nested in the user's
                model, dense, x, y, expected = dense_case(reentrant)
                piped = torch_mp.pipeline(model, chunks=2, schedule=schedule, checkpoint=mode)
                what = f"rank {rank} {schedule} reentrant={reentrant} checkpoint={mode}"
                if reentrant and schedule in ("zbv", "interleaved_1f1b"):
                    # The reentrant checkpoint around a stand-in links this rank's stages through
                    # meta history: refused on every rank before anything is sent.
                    with pytest.raises(ValueError, match="use_reentrant=True.*expected use_reentrant=False"):
                        piped.train_step(x, target=y, loss_fn=F.mse_loss)
                    continue
                loss = piped.train_step(x, target=y, loss_fn=F.mse_loss)
                torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6, msg=what)
                assert_dense_grads(piped, dense, what)


def test_checkpoint_in_the_parents_forward_under_pipeline():
    # Before the fix: "Tensor on device cpu is not on the expected device meta!" on rank 1 (the
    # recomputation ran the layer on its meta placeholder), a CollectiveError on rank 0.
    run_ranks(2, check_checkpoint_in_the_parents_forward, timeout=600)


def llama(checkpointing: str, use_reentrant: bool = False):
    """A tiny Llama whose decoder layers are checkpointed: ``"inside"`` by transformers'
    ``gradient_checkpointing_enable()`` (since 5.19 it checkpoints the layer's forward, inside the
    call torch_mp places), ``"around"`` through each layer's ``__call__`` (what transformers 5.18's
    did, and training code wrapping each layer call does: the checkpoint outside the placed call)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      max_position_embeddings=32, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    if checkpointing == "inside":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        for layer in model.model.layers:
            def call(self, *args, **kwargs):
                return checkpoint(functools.partial(nn.Module.__call__, self, **kwargs), *args,
                                  use_reentrant=use_reentrant)

            layer.__class__ = type(f"CallCheckpointed{type(layer).__name__}", (type(layer),), {"__call__": call})
    ids = torch.randint(0, 96, (4, 10))
    dense = copy.deepcopy(model).train()
    expected = dense(input_ids=ids, labels=ids).loss
    expected.backward()
    return model.train(), dense, ids, expected


LLAMA_CASES = [("inside", False), ("around", False), ("around", True)]


def model_loss(output, _):
    return output.loss


def test_llama_gradient_checkpointing_under_split():
    for case in LLAMA_CASES:
        model, dense, ids, expected = llama(*case)
        split = torch_mp.split(model, ["cpu", "cpu"], chunks=2, schedule="1f1b")
        loss = split.train_step(input_ids=ids, labels=ids, loss_fn=model_loss)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
        assert_dense_grads(split, dense, f"split {case}")


def check_llama_gradient_checkpointing(rank, world):
    for case, schedule in ((LLAMA_CASES[0], "1f1b"), (LLAMA_CASES[1], "1f1b"), (LLAMA_CASES[1], "zbv"),
                           (LLAMA_CASES[2], "gpipe")):
        model, dense, ids, expected = llama(*case)
        piped = torch_mp.pipeline(model, chunks=2, schedule=schedule)
        loss = piped.train_step(input_ids=ids, labels=ids, loss_fn=model_loss)
        what = f"rank {rank} {schedule} {case}"
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6, msg=what)
        assert_dense_grads(piped, dense, what)


def test_llama_gradient_checkpointing_under_pipeline():
    run_ranks(2, check_llama_gradient_checkpointing, timeout=600)


def check_llama_gradient_checkpointing_tensor_parallel(rank, world):
    for case in LLAMA_CASES:
        model, dense, ids, _ = llama(*case)
        dense.zero_grad(set_to_none=True)
        sharded = torch_mp.tensor_parallel(model)
        assert_same_step_and_state(dense, sharded, ids, f"tensor_parallel {case}")


def test_llama_gradient_checkpointing_under_tensor_parallel():
    run_ranks(2, check_llama_gradient_checkpointing_tensor_parallel, timeout=600)


class RecordedDropout(nn.Module):
    """Dropout that keeps each mask it draws, by its input's sum: a checkpoint's recomputation
    must draw the forward's mask, or the gradient is not that of the output computed."""

    def __init__(self, masks: dict):
        super().__init__()
        self.masks = masks

    def forward(self, x):
        mask = torch.rand_like(x) > 0.5
        if not x.is_meta:  # not another rank's stand-in
            self.masks.setdefault(round(float(x.detach().double().sum()), 6), []).append(mask)
        return x * mask * 2


class DropoutBlock(nn.Module):
    def __init__(self, masks: dict):
        super().__init__()
        self.linear, self.dropout = nn.Linear(16, 16), RecordedDropout(masks)

    def forward(self, x):
        return self.dropout(torch.tanh(self.linear(x)))


class CheckpointedDropout(CheckpointedInParent):
    def __init__(self, reentrant: bool, blocks: int = 4):
        nn.Module.__init__(self)
        self.masks: dict = {}
        self.stem = nn.Linear(16, 16)
        self.blocks = nn.ModuleList(DropoutBlock(self.masks) for _ in range(blocks))
        self.head = nn.Linear(16, 2)
        self.reentrant = reentrant


def assert_recomputed_the_forwards_draws(model, what):
    pairs = [masks for masks in model.masks.values() if len(masks) == 2]
    assert pairs, what
    assert all(torch.equal(*masks) for masks in pairs), (
        f"{what}: {sum(not torch.equal(*m) for m in pairs)} of {len(pairs)} recomputations drew another mask")


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputation_draws_the_forwards_random_numbers_under_split(reentrant):
    # Before: the checkpoint restored the random state of its start, and other micro-batches had
    # drawn since (waiting for the stage's turn): 55 of 96 recomputed dropout masks differed.
    torch.manual_seed(0)
    model = torch_mp.split(CheckpointedDropout(reentrant), ["cpu", "cpu"], chunks=8, schedule="gpipe")
    for _ in range(3):
        model.train_step(torch.randn(64, 16), target=torch.randn(64, 2), loss_fn=F.mse_loss)
    assert_recomputed_the_forwards_draws(model, "split")


def check_checkpoint_recomputation_draws(rank, world):
    for schedule in ("interleaved_1f1b", "zbv"):  # a rank's forward waits for its later stage's turn
        torch.manual_seed(0)
        model = torch_mp.pipeline(CheckpointedDropout(False, blocks=8), chunks=8, schedule=schedule)
        for _ in range(2):
            model.train_step(torch.randn(64, 16), target=torch.randn(64, 2), loss_fn=F.mse_loss)
        assert_recomputed_the_forwards_draws(model, f"rank {rank} {schedule}")


def test_checkpoint_recomputation_draws_the_forwards_random_numbers_under_pipeline():
    run_ranks(2, check_checkpoint_recomputation_draws, timeout=600)
