"""Statistics over the whole batch under micro-batches: batch norms that normalize with batch
statistics (in eval mode too), instance norms updating running statistics, and MoE load-balancing
losses. The dense model's numbers where the micro-batches can give them, otherwise a ValueError
before anything runs (on every rank of a pipeline)."""
import copy

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks


def normed(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), norm, nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():  # a non-trivial affine part
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_(0, 0.5)
    return model


NORMS = {"batch norm without running statistics": lambda: nn.BatchNorm1d(6, track_running_stats=False),
         "instance norm with running statistics": lambda: nn.InstanceNorm1d(6, affine=True, track_running_stats=True),
         "sync batch norm": lambda: nn.SyncBatchNorm(6)}
REFUSED_IN = {"batch norm without running statistics": ("eval", "train"),
              "instance norm with running statistics": ("train",), "sync batch norm": ("train",)}


def batch(norm: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(*((8, 6, 5) if "instance" in norm else (8, 6))) * 3 + 1


def loss_fn(out, y):
    return F.mse_loss(out, y)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_norms_with_batch_statistics_in_split(norm, mode):
    model = normed(NORMS[norm]())
    if "instance" in norm:  # [N, C, L] in, channels last for the linears
        model = nn.Sequential(Transposed(model[0]), model[1], Transposed(nn.Sequential(*model[2:])))
    getattr(model, mode)()
    x = batch(norm)
    dense = copy.deepcopy(model)
    expected = dense(x)
    y = torch.randn(expected.shape)
    loss_fn(expected, y).backward()
    one = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=1)  # the whole batch in one
    torch.testing.assert_close(one(x), expected)
    split = torch_mp.split(model, ["cpu", "cpu"], chunks=2)
    if mode in REFUSED_IN[norm]:
        # Before: BatchNorm1d(track_running_stats=False) in eval gave outputs 0.359 off, no error.
        with pytest.raises(ValueError, match=r"micro-batches would see only its own rows.*expected chunks=1"):
            split(x)
        with pytest.raises(ValueError, match=r"micro-batches would see only its own rows"):
            split.train_step(x, target=y, loss_fn=loss_fn)
        assert all(p.grad is None for p in split.parameters())  # refused before anything ran
        return
    torch.testing.assert_close(split(x), expected)
    split.zero_grad()
    split.train_step(x, target=y, loss_fn=loss_fn)
    for p, q in zip(split.parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


class Transposed(nn.Module):
    """``inner`` on [N, L, C]: the linears of a model whose norm takes [N, C, L]."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


def test_batch_norm_with_running_statistics_equals_the_dense_model_in_eval():
    model = normed(nn.BatchNorm1d(6)).train()
    x = batch("batch norm")
    model(x)  # running statistics that are not the initial ones
    model.eval()
    split = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2)
    torch.testing.assert_close(split(x), model(x))


def mixtral(coef: float):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        output_router_logits=True, router_aux_loss_coef=coef, use_cache=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0)
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():  # experts and routers that matter: routing far from ties
        for name, param in model.named_parameters():
            param.normal_(0, 0.5 if "gate" in name and param.dim() == 2 else 0.2)
    ids = torch.randint(0, 96, (4, 7))
    dense = copy.deepcopy(model).train()
    expected = dense(input_ids=ids, labels=ids)
    expected.loss.backward()
    return model.train(), dense, ids, expected


def model_loss(output, _):
    return output.loss


def router_grads(model):
    return [p.grad for name, p in model.named_parameters() if name.endswith("gate.weight") and not p.is_meta]


def test_moe_load_balancing_loss_is_refused_under_micro_batches():
    model, dense, ids, expected = mixtral(0.5)
    assert expected.aux_loss.item() != 0
    split = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=2, output_merge="mean")
    # Before: loss 5.18466 against 5.18336 dense on the model, router gradients 0.009 off.
    with pytest.raises(ValueError, match=r"load-balancing loss.*router_aux_loss_coef=0.5.*expected chunks=1"):
        split.train_step(input_ids=ids, labels=ids, loss_fn=model_loss)
    with pytest.raises(ValueError, match="load-balancing loss"):
        split(input_ids=ids, labels=ids)
    assert all(p.grad is None for p in split.parameters())
    # One micro-batch sees the whole batch: the dense loss and router gradients, the aux loss included.
    one = torch_mp.split(copy.deepcopy(model), ["cpu", "cpu"], chunks=1)
    torch.testing.assert_close(one.train_step(input_ids=ids, labels=ids, loss_fn=model_loss), expected.loss.detach())
    for got, want in zip(router_grads(one), router_grads(dense)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Without router logits the loss is a mean over tokens again, and the micro-batches add up to it.
    dense.zero_grad()
    plain = dense(input_ids=ids, labels=ids, output_router_logits=False).loss
    loss = split.train_step(input_ids=ids, labels=ids, output_router_logits=False, loss_fn=model_loss)
    torch.testing.assert_close(loss, plain.detach())


def check_refused_on_every_rank(rank, world):
    model, _, ids, _ = mixtral(0.5)
    piped = torch_mp.pipeline(model, chunks=2)
    with pytest.raises(ValueError, match="load-balancing loss"):
        piped.train_step(input_ids=ids, labels=ids, loss_fn=model_loss)
    model = normed(nn.BatchNorm1d(6, track_running_stats=False)).eval()
    piped = torch_mp.pipeline(model, chunks=2)
    with pytest.raises(ValueError, match="BatchNorm1d '1' normalizes with the batch's statistics in eval mode"):
        piped(batch("batch norm"))
    # The group still works: nothing was sent before the errors.
    x = batch("batch norm")
    dense = normed(nn.LayerNorm(6))
    expected = loss_fn(dense(x), x[:, :3])
    loss = torch_mp.pipeline(copy.deepcopy(dense), chunks=2).train_step(x, target=x[:, :3], loss_fn=loss_fn)
    torch.testing.assert_close(loss, expected.detach())


def test_refused_on_every_rank_of_a_pipeline():
    run_ranks(2, check_refused_on_every_rank, timeout=600)
