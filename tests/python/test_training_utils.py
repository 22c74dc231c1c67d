"""The training loop around a split, pipelined or tensor-parallel model gives the dense model's
numbers: the global gradient norm and clipping (torch_mp.clip_grad_norm_, train_step(max_norm=)),
fp16 loss scaling (torch_mp.GradScaler), frozen parameters, and an optimizer built before wrapping."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_mp
from distributed import run_ranks
from models import GPT
from zoo import build, batch, output_of

VOCAB, DIM = 24, 16


class Net(nn.Module):
    """An embedding, four Linear+Tanh blocks and a head: pipeline cuts between the blocks and keeps
    the embedding and the head on every rank (their gradients summed across the ranks)."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(4))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def net_and_batch(tied=False):
    torch.manual_seed(0)
    model = Net(tied)
    with torch.no_grad():  # non-trivial weights: larger than the default init, biases not small
        for param in model.parameters():
            param.normal_(0.0, 1.5 / math.sqrt(param.shape[-1]))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 6), generator=generator)
    return model, ids, torch.randint(0, VOCAB, (4, 6), generator=generator)


def cross_entropy(logits, target):
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def dense_norm(model, norm_type=2.0):
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None], norm_type)


def local_parameters(model, dense):
    """(name, parameter, dense parameter) for the parameters this rank holds for real."""
    dense_params = dict(dense.named_parameters())
    return [(name, p, dense_params[name]) for name, p in model.named_parameters() if not p.is_meta]


# --- global norm and clipping -------------------------------------------------------------------

def check_pipeline_norm(rank, world, schedule, tied):
    dense, ids, target = net_and_batch(tied)
    model = torch_mp.pipeline(copy.deepcopy(dense), chunks=2, schedule=schedule)
    cross_entropy(dense(ids), target).backward()
    model.train_step(ids, target=target, loss_fn=cross_entropy)
    for norm_type in (2.0, 1.0, 3.0, math.inf):
        expected = dense_norm(dense, norm_type)
        torch.testing.assert_close(torch_mp.get_total_norm(model, norm_type), expected, rtol=1e-5, atol=0,
                                   msg=f"norm_type {norm_type}")
    # torch's own sees this rank's stages only (the bug this replaces).
    own = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert own < dense_norm(dense) - 0.1
    # Clip, step, and the next loss is the dense one.
    total = torch_mp.clip_grad_norm_(model, 0.5)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5), rtol=1e-5, atol=0)
    for m in (dense, model):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
        m.zero_grad()
    expected_loss = cross_entropy(dense(ids), target)
    loss = model.train_step(ids, target=target, loss_fn=cross_entropy, max_norm=0.5)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-5, atol=1e-6)
    expected_loss.backward()
    torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5)
    for name, p, q in local_parameters(model, dense):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("schedule,tied", [("1f1b", False), ("1f1b", True), ("interleaved_1f1b", False),
                                           ("zbv", True)])
def test_pipeline_global_norm_and_clip_match_dense(schedule, tied):
    """4 blocks on 2 ranks: each rank's own norm misses the other's stages (and would count the
    embedding and head twice if summed); torch_mp's is the dense norm on every rank, and the loss
    after a clipped SGD step is the dense one."""
    run_ranks(2, check_pipeline_norm, schedule, tied)


def test_split_global_norm_and_train_step_clip_match_dense():
    dense, ids, target = net_and_batch(tied=True)
    model = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=2, schedule="zbv")
    loss = model.train_step(ids, target=target, loss_fn=cross_entropy, max_norm=0.5)
    torch.testing.assert_close(loss, cross_entropy(dense(ids), target).detach())
    cross_entropy(dense(ids), target).backward()
    expected = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5)
    assert expected > 1.0  # the clip did something
    for (name, p), q in zip(model.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(torch_mp.get_total_norm(model), torch.tensor(0.5), rtol=1e-5, atol=0)
    # A plain module, and an iterable of parameters in one process, are torch's.
    torch.testing.assert_close(torch_mp.get_total_norm(dense.parameters(), 1.0), dense_norm(dense, 1.0))


def check_tensor_parallel_norm(rank, world, name):
    dense = build(name)
    inputs = batch(name)
    model = torch_mp.tensor_parallel(copy.deepcopy(dense))
    for m in (dense, model):
        output_of(m, inputs).square().mean().backward()
    for norm_type in (2.0, 1.0, math.inf):
        torch.testing.assert_close(torch_mp.get_total_norm(model, norm_type), dense_norm(dense, norm_type),
                                   rtol=1e-5, atol=0, msg=f"{name}, norm_type {norm_type}")
    total = torch_mp.clip_grad_norm_(model, 0.05)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.05), rtol=1e-5, atol=0)
    for m in (dense, model):
        torch.optim.SGD(m.parameters(), lr=1.0).step()
    gathered = torch_mp.full_state_dict(model)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(gathered[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["llama", "falcon_mqa", "mixtral", "gpt2"])
def test_tensor_parallel_global_norm_and_clip_match_dense(name):
    """Shards counted once, replicated parameters (norms, routers) once, a key/value head kept by
    both ranks (Falcon's multi-query attention) once, MoE experts once; after clip and SGD the
    gathered weights are the dense ones (torch's clip: Llama 2.074 / 1.854 against 2.382)."""
    run_ranks(2, check_tensor_parallel_norm, name, timeout=360.0)


def check_dp_by_tp_norm(rank, world, fsdp):
    from torch.nn.parallel import DistributedDataParallel

    mesh = torch_mp.init_mesh(dp=2, tp=2)
    dp_rank = mesh["dp"].get_local_rank()
    dense = build("llama")
    ids = batch("llama", batch_size=4)["input_ids"]
    sharded = torch_mp.tensor_parallel(copy.deepcopy(dense), group=mesh["tp"])
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        model = fully_shard(sharded, mesh=mesh["dp"])
    else:
        with torch_mp.local_parameters(sharded):
            model = DistributedDataParallel(sharded, process_group=mesh["dp"].get_group())
    dense(input_ids=ids).logits.square().mean().backward()
    model(input_ids=ids.chunk(2)[dp_rank]).logits.square().mean().backward()
    torch.testing.assert_close(torch_mp.get_total_norm(model), dense_norm(dense), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch_mp.get_total_norm(model, math.inf), dense_norm(dense, math.inf), rtol=1e-5, atol=0)
    # torch's own sees DTensor parameters (DDP's plain leaves' averaged gradients, FSDP2's 2-D shards).
    expected = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.5)
    torch.testing.assert_close(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)), float(expected),
                               rtol=1e-5, atol=0)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.optim.SGD(dense.parameters(), lr=0.1).step()
    gathered = torch_mp.full_state_dict(model)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(gathered[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_dp_by_tp_global_norm_matches_dense(fsdp):
    """Data-parallel replicas (DDP) counted once; FSDP2's DTensor shards summed over the dp mesh; torch's
    own clip_grad_norm_ gives the dense norm too and the clipped SGD step the dense weights."""
    run_ranks(4, check_dp_by_tp_norm, fsdp, timeout=360.0)


def check_bad_arguments(rank, world):
    dense, ids, target = net_and_batch()
    model = torch_mp.pipeline(copy.deepcopy(dense))
    with pytest.raises(ValueError, match=r"model is an iterable of 10 parameters, not all DTensors, in a world of 2"):
        torch_mp.get_total_norm(model.parameters())
    with pytest.raises(ValueError, match=r"train_step\(\.\.\., max_norm=-1\); expected None or a number >= 0"):
        model.train_step(ids, target=target, loss_fn=cross_entropy, max_norm=-1)
    # Ranks that disagree on max_norm stop before the schedule runs.
    with pytest.raises(ValueError, match=r"max_norm: rank 0 has .*, rank 1 has "):
        model.train_step(ids, target=target, loss_fn=cross_entropy, max_norm=1.0 if rank == 0 else None)


def test_bad_arguments_are_clear_errors():
    model, _, _ = net_and_batch()
    with pytest.raises(ValueError, match=r"norm_type = 0; expected a number > 0 or math.inf"):
        torch_mp.get_total_norm(model, 0)
    with pytest.raises(ValueError, match=r"clip_grad_norm_: max_norm = -0.5; expected a number >= 0"):
        torch_mp.clip_grad_norm_(model, -0.5)
    with pytest.raises(TypeError, match=r"expected model to be a module or parameters \(tensors\), got an iterable "
                                        r"holding str"):
        torch_mp.get_total_norm(["weight"])
    with pytest.raises(TypeError, match=r"GradScaler: expected model to be a torch.nn.Module or None, got list"):
        torch_mp.GradScaler("cpu", model=[])
    run_ranks(2, check_bad_arguments)


# --- fp16 loss scaling ----------------------------------------------------------------------------

def first_sharded_weight(model):
    """This rank's shard of the first colwise layer's weight."""
    return next(m.weight for m in model.modules() if isinstance(m, torch_mp.nn.ColumnParallelLinear))


def check_scaler_tensor_parallel(rank, world):
    torch.manual_seed(0)
    dense = GPT(vocab=97, dim=32, heads=4, depth=2)
    ids = torch.randint(0, 97, (4, 8))
    model = torch_mp.tensor_parallel(copy.deepcopy(dense))

    def loss_of(m):
        return m(ids, targets=ids)[1]

    # No overflow: three steps equal the dense run with torch's scaler (the scale grows at step 2).
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2),
               torch_mp.GradScaler("cpu", init_scale=256.0, growth_interval=2, model=model)]
    # SGD: the key bias's gradient is 0 up to rounding, which AdamW would scale up to its sign.
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (dense, model)]
    for _ in range(3):
        for m, scaler, optimizer in zip((dense, model), scalers, optimizers):
            optimizer.zero_grad()
            scaler.scale(loss_of(m)).backward()
            scaler.step(optimizer)
            scaler.update()
    assert scalers[1].get_scale() == scalers[0].get_scale() == 512.0
    gathered = torch_mp.full_state_dict(model)
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(gathered[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Only rank 0's shard overflows: both ranks skip the step and halve the scale.
    for default_groups in (False, True):
        scaler = torch_mp.GradScaler("cpu", init_scale=256.0, model=None if default_groups else model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        optimizer.zero_grad()
        scaler.scale(loss_of(model)).backward()
        if rank == 0:
            first_sharded_weight(model).grad.to_local()[0, 0] = math.inf  # a DTensor op would be a collective
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
        assert scaler.get_scale() == 128.0
        for p, q in zip(model.parameters(), before):
            assert torch.equal(p, q)


def check_scaler_pipeline(rank, world):
    dense, ids, target = net_and_batch()
    model = torch_mp.pipeline(copy.deepcopy(dense), chunks=2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=64.0), torch_mp.GradScaler("cpu", init_scale=64.0)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (dense, model)]
    for step in range(3):
        overflow = step == 1
        scalers[0].scale(cross_entropy(dense(ids), target)).backward()
        model.train_step(ids, target=target, loss_fn=lambda o, t: scalers[1].scale(cross_entropy(o, t)))
        if overflow:  # rank 1's last block (its stage only) overflows; in the dense model too
            dense.blocks[3][0].weight.grad[0, 0] = math.inf
            if rank == 1:
                model.blocks[3][0].weight.grad[0, 0] = math.inf
        for scaler, optimizer in zip(scalers, optimizers):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        assert scalers[1].get_scale() == scalers[0].get_scale() == (32.0 if step >= 1 else 64.0)
    for name, p, q in local_parameters(model, dense):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_grad_scaler_decides_as_the_dense_model():
    """torch's GradScaler skips the step on the rank whose shard overflows and steps on the other
    (their scales part); torch_mp.GradScaler skips on every rank and keeps one scale; with no
    overflow its steps are the dense run's with torch's scaler (tensor parallel and pipeline)."""
    run_ranks(2, check_scaler_tensor_parallel)
    run_ranks(2, check_scaler_pipeline)


# --- frozen parameters and optimizers built before wrapping ---------------------------------------

def freeze(model):
    for module in (model.emb, model.blocks[0], model.blocks[2]):
        module.requires_grad_(False)
    return model


def adamw_steps(model, dense, ids, target, steps=3, optimizers=None):
    optimizers = optimizers or [torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1) for m in (dense, model)]
    for _ in range(steps):
        for optimizer in optimizers:
            optimizer.zero_grad()
        cross_entropy(dense(ids), target).backward()
        model.train_step(ids, target=target, loss_fn=cross_entropy)
        for optimizer in optimizers:
            optimizer.step()


def assert_frozen_and_dense(model, dense, initial):
    for name, p, q in local_parameters(model, dense):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert p.grad is None, f"{name}: frozen, yet given a .grad"
            assert torch.equal(p, initial[name]), f"{name}: frozen, yet moved"


def check_frozen_pipeline(rank, world, schedule):
    dense, ids, target = net_and_batch()
    freeze(dense)
    initial = {name: p.detach().clone() for name, p in dense.named_parameters()}
    model = torch_mp.pipeline(copy.deepcopy(dense), chunks=2, schedule=schedule)
    adamw_steps(model, dense, ids, target)
    assert_frozen_and_dense(model, dense, initial)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b", "zbv"])
def test_frozen_parameters_stay_frozen_in_pipelines(schedule):
    """The embedding (kept on both ranks) and two blocks frozen, AdamW with weight decay 0.1: no
    .grad is ever created for them and they stay bit-identical (the cross-rank sum gave the
    embedding a zero .grad, and weight decay moved it by 0.041)."""
    run_ranks(2, check_frozen_pipeline, schedule)


@pytest.mark.parametrize("chunks,schedule", [(1, "gpipe"), (2, "1f1b"), (2, "zbv")])
def test_frozen_parameters_stay_frozen_in_split(chunks, schedule):
    dense, ids, target = net_and_batch()
    freeze(dense)
    initial = {name: p.detach().clone() for name, p in dense.named_parameters()}
    model = torch_mp.split(copy.deepcopy(dense), ["cpu", "cpu"], chunks=chunks, schedule=schedule)
    adamw_steps(model, dense, ids, target)
    assert_frozen_and_dense(model, dense, initial)


def check_optimizer_before_pipeline(rank, world, optimizer_class):
    dense, ids, target = net_and_batch(tied=True)
    model = copy.deepcopy(dense)
    optimizers = [optimizer_class(m.parameters(), lr=0.05) for m in (dense, model)]
    model = torch_mp.pipeline(model, chunks=2, schedule="zbv")
    adamw_steps(model, dense, ids, target, optimizers=optimizers)
    for name, p, q in local_parameters(model, dense):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in model.parameters() if p.is_meta)


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_optimizer_built_before_pipeline_steps_its_parameters(optimizer_class):
    """pipeline keeps the user's Parameter objects (it replaced them: the optimizer stepped stale
    copies, 0.143 off with no warning); 3 steps give the dense parameters."""
    run_ranks(2, check_optimizer_before_pipeline, optimizer_class)


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_optimizer_built_before_split_steps_its_parameters(optimizer_class):
    dense, ids, target = net_and_batch(tied=True)
    model = copy.deepcopy(dense)
    optimizers = [optimizer_class(m.parameters(), lr=0.05) for m in (dense, model)]
    model = torch_mp.split(model, ["cpu", "cpu"], chunks=2)
    adamw_steps(model, dense, ids, target, optimizers=optimizers)
    for name, p, q in local_parameters(model, dense):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def check_optimizer_before_tensor_parallel(rank, world, optimizer_class):
    dense = build("llama")
    model = copy.deepcopy(dense)
    early = optimizer_class(model.parameters(), lr=0.05)
    model = torch_mp.tensor_parallel(model)
    output_of(model, batch("llama")).float().pow(2).mean().backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="replaced by its DTensor shard.*optimizer built after tensor_parallel"):
        early.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    optimizer_class(model.parameters(), lr=0.05).step()  # one built afterwards steps


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_optimizer_built_before_tensor_parallel_is_refused_at_its_step(optimizer_class):
    """tensor_parallel replaces the sharded layers' parameters by their shards: an optimizer built
    before stepped the old ones, which the model no longer reads (the parameters stayed where they
    were, no warning). Its first step is a ValueError, before it changes anything."""
    run_ranks(2, check_optimizer_before_tensor_parallel, optimizer_class)


def check_frozen_tensor_parallel(rank, world):
    dense = build("llama")
    for module in (dense.model.embed_tokens, dense.model.layers[0]):
        module.requires_grad_(False)
    initial = {name: p.detach().clone() for name, p in dense.named_parameters()}
    inputs = batch("llama")
    model = torch_mp.tensor_parallel(copy.deepcopy(dense))
    # SGD with weight decay: AdamW's update of an element whose gradient is ~0 is ~its sign, which
    # the ranks' other summation order can flip.
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1) for m in (dense, model)]
    for _ in range(2):
        for m, optimizer in zip((dense, model), optimizers):
            optimizer.zero_grad()
            output_of(m, inputs).square().mean().backward()
            torch_mp.clip_grad_norm_(m, 1.0)
            optimizer.step()
    gathered = torch_mp.full_state_dict(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            torch.testing.assert_close(gathered[name], initial[name], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(gathered[name], dense.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_parameters_stay_frozen_under_tensor_parallel():
    run_ranks(2, check_frozen_tensor_parallel, timeout=360.0)
